"""Decay schedules: pure functions of the step.

A schedule maps ``step`` (the number of optimizer steps since averaging began,
0 for the first one; see ``FusedEMA``) to the decay of that step's update.
Each one has two forms that give the same numbers:

* ``schedule(step)`` with a Python int returns a Python float (the default path:
  nothing touches the device);
* ``schedule.tensor(step)`` with a 0-d float64 tensor returns a 0-d float64
  tensor computed with torch ops on the step's device (``capturable=True``: no
  host sync, safe under CUDA graph capture and ``torch.compile``).

``settings()`` is what a checkpoint stores to check that a resumed run uses the
same schedule.

>>> from fused_ema import schedules
>>> schedules.Constant(0.999)(10)
0.999
>>> schedules.HalfLife(693)(0)  # doctest: +ELLIPSIS
0.99900...
>>> schedules.Cosine(0.996, total_steps=100)(100)
1.0
>>> schedules.PowerFunction(gamma=6.94)(1)  # doctest: +ELLIPSIS
0.00407...
"""
import math
from typing import Any, Dict

import torch

from .validation import check_unit

__all__ = ["Schedule", "Constant", "Warmup", "Cosine", "HalfLife", "PowerFunction"]


def _check_positive(name: str, value) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"fused_ema: {name} must be a number, got {value!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"fused_ema: {name} must be a positive number, got {v}")
    return v


class Schedule:
    """Base class: subclasses define ``__call__`` (int -> float), ``tensor``
    (0-d float64 tensor -> 0-d float64 tensor), ``settings`` and ``max_decay``."""

    def __call__(self, step: int) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def tensor(self, step: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def max_decay(self) -> float:
        """The largest decay the schedule reaches (used to warn about 16-bit EMAs)."""
        raise NotImplementedError  # pragma: no cover - abstract

    def settings(self) -> Dict[str, Any]:
        """A plain dict that identifies the schedule (stored in checkpoints)."""
        raise NotImplementedError  # pragma: no cover - abstract

    def __eq__(self, other) -> bool:
        return isinstance(other, Schedule) and self.settings() == other.settings()

    def __hash__(self) -> int:
        return hash(tuple(sorted(self.settings().items())))

    def __repr__(self) -> str:
        s = self.settings()
        args = ", ".join(f"{k}={v!r}" for k, v in s.items() if k != "type")
        return f"{s['type']}({args})"


class Constant(Schedule):
    """The same decay at every step (``FusedEMA(model, decay=0.999)`` uses this)."""

    def __init__(self, decay: float):
        self.decay = check_unit("decay", decay)

    def __call__(self, step: int) -> float:
        return self.decay

    def tensor(self, step: torch.Tensor) -> torch.Tensor:
        return torch.full_like(step, self.decay, dtype=torch.float64)

    @property
    def max_decay(self) -> float:
        return self.decay

    def settings(self) -> Dict[str, Any]:
        return {"type": "Constant", "decay": self.decay}


class Warmup(Schedule):
    """timm / diffusers / ema-pytorch warmup: ``1 - (1 + step/gamma) ** -power``,
    clamped to ``[min_decay, decay]``; ``0`` (a copy) at step 0, as in those libraries.

    ``gamma=1, power=2/3`` reaches 0.999 after 31.6K steps and 0.9999 after 1M;
    ``power=3/4`` reaches 0.999 after 10K steps (crowsonkb's notes in ema-pytorch).
    """

    def __init__(self, decay: float = 0.9999, gamma: float = 1.0, power: float = 2 / 3,
                 min_decay: float = 0.0):
        self.decay = check_unit("decay", decay)
        self.gamma = _check_positive("gamma", gamma)
        self.power = _check_positive("power", power)
        self.min_decay = check_unit("min_decay", min_decay)
        if self.min_decay > self.decay:
            raise ValueError(
                f"fused_ema: min_decay ({self.min_decay}) must not exceed decay ({self.decay})")

    def __call__(self, step: int) -> float:
        if step <= 0:
            return 0.0
        value = 1.0 - (1.0 + step / self.gamma) ** -self.power
        return min(max(value, self.min_decay), self.decay)

    def tensor(self, step: torch.Tensor) -> torch.Tensor:
        step = step.to(torch.float64)
        value = 1.0 - (1.0 + step / self.gamma) ** -self.power
        value = value.clamp(self.min_decay, self.decay)
        return torch.where(step <= 0, torch.zeros_like(value), value)

    @property
    def max_decay(self) -> float:
        return self.decay

    def settings(self) -> Dict[str, Any]:
        return {"type": "Warmup", "decay": self.decay, "gamma": self.gamma,
                "power": self.power, "min_decay": self.min_decay}


class Cosine(Schedule):
    """BYOL / DINO / MoCo v3 momentum: from ``start`` to ``end`` (default 1) along half a
    cosine over ``total_steps``, then ``end``:
    ``end - (end - start) * (1 + cos(pi * step / total_steps)) / 2``.
    """

    def __init__(self, start: float, end: float = 1.0, total_steps: int = None):
        self.start = check_unit("start", start)
        self.end = check_unit("end", end)
        if total_steps is None:
            raise TypeError("fused_ema: Cosine needs total_steps (the length of the schedule "
                            "in optimizer steps)")
        if isinstance(total_steps, bool) or int(total_steps) != total_steps or total_steps < 1:
            raise ValueError(
                f"fused_ema: total_steps must be a positive integer, got {total_steps!r}")
        self.total_steps = int(total_steps)

    def __call__(self, step: int) -> float:
        step = min(max(step, 0), self.total_steps)
        return self.end - (self.end - self.start) * (
            1.0 + math.cos(math.pi * step / self.total_steps)) / 2.0

    def tensor(self, step: torch.Tensor) -> torch.Tensor:
        step = step.to(torch.float64).clamp(0, self.total_steps)
        return self.end - (self.end - self.start) * (
            1.0 + torch.cos(math.pi * step / self.total_steps)) / 2.0

    @property
    def max_decay(self) -> float:
        return max(self.start, self.end)

    def settings(self) -> Dict[str, Any]:
        return {"type": "Cosine", "start": self.start, "end": self.end,
                "total_steps": self.total_steps}


class HalfLife(Constant):
    """The decay whose EMA forgets half of a value in ``half_life`` steps:
    ``0.5 ** (1 / half_life)`` (``HalfLife(693)`` is about 0.999)."""

    def __init__(self, half_life: float):
        self.half_life = _check_positive("half_life", half_life)
        super().__init__(0.5 ** (1.0 / self.half_life))

    def settings(self) -> Dict[str, Any]:
        return {"type": "HalfLife", "half_life": self.half_life}


class PowerFunction(Schedule):
    """EDM2's power-function EMA (Karras et al. 2024): update ``t = step + 1`` uses
    ``beta_t = (1 - 1/t) ** (gamma + 1)``, so after ``t`` updates the EMA averages the weights
    with a profile proportional to ``tau ** gamma`` over the whole run (``0`` at the first
    update: a copy). ``from_sigma_rel(0.10)`` gives the profile of relative width 0.10
    (gamma = 6.94); ``sigma_rel`` is at most 0.30028 (gamma = -0.38197).
    """

    def __init__(self, gamma: float):
        from ._posthoc_math import GAMMA_MIN
        try:
            g = float(gamma)
        except (TypeError, ValueError):
            raise TypeError(f"fused_ema: gamma must be a number, got {gamma!r}") from None
        if not (math.isfinite(g) and g >= GAMMA_MIN):
            raise ValueError(f"fused_ema: gamma must be a finite number >= {GAMMA_MIN:.5f} (the "
                             f"power-function profile of largest sigma_rel), got {g}")
        self.gamma = g

    @classmethod
    def from_sigma_rel(cls, sigma_rel: float) -> "PowerFunction":
        from ._posthoc_math import sigma_rel_to_gamma
        return cls(sigma_rel_to_gamma(sigma_rel))

    @property
    def sigma_rel(self) -> float:
        from ._posthoc_math import gamma_to_sigma_rel
        return gamma_to_sigma_rel(self.gamma)

    def __call__(self, step: int) -> float:
        t = max(step, 0) + 1
        return (1.0 - 1.0 / t) ** (self.gamma + 1.0)

    def tensor(self, step: torch.Tensor) -> torch.Tensor:
        t = step.to(torch.float64).clamp(min=0) + 1.0
        return (1.0 - 1.0 / t) ** (self.gamma + 1.0)

    @property
    def max_decay(self) -> float:
        return 1.0

    def settings(self) -> Dict[str, Any]:
        return {"type": "PowerFunction", "gamma": self.gamma}


def from_settings(settings: Dict[str, Any]):
    """The schedule a ``settings()`` dict describes, or None (a user callable, which a
    checkpoint cannot hold)."""
    kinds = {cls.__name__: cls for cls in (Constant, Warmup, Cosine, HalfLife, PowerFunction)}
    cls = kinds.get(settings.get("type"))
    if cls is None:
        return None
    return cls(**{k: v for k, v in settings.items() if k != "type"})
