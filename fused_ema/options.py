"""``FusedEMA``'s settings, checked and normalised before anything is copied.

``decay`` / ``tau`` / ``decays`` become a list of schedules (a float is a ``Constant``,
a callable ``step -> decay`` is wrapped); the other options are checked and kept as
plain values. Nothing here touches a tensor.
"""
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Union

import torch

from .schedules import Constant, HalfLife, Schedule
from .validation import (MAX_DECAYS, check_count, check_float_dtype, check_rounding,
                         check_seed, check_unit)

BUFFER_MODES = ("copy", "average", "ignore")
FROZEN_MODES = ("share", "copy", "average")

DecayLike = Union[float, Schedule, Callable[[Any], Any]]


def is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


class CallableSchedule(Schedule):
    """A user function ``step -> decay`` (or ``step -> tau`` when ``tau=True``)."""

    def __init__(self, fn: Callable, tau: bool = False):
        self.fn, self.is_tau = fn, tau
        self.name = getattr(fn, "__qualname__", None) or type(fn).__name__

    def __call__(self, step: int) -> float:
        value = self.fn(step)
        if isinstance(value, torch.Tensor):
            value = value.item()
        value = float(value)
        return 1.0 - value if self.is_tau else value

    def tensor(self, step: torch.Tensor) -> torch.Tensor:
        value = self.fn(step)
        if not isinstance(value, torch.Tensor):
            value = torch.full_like(step, float(value), dtype=torch.float64)
        value = value.to(torch.float64)
        return 1.0 - value if self.is_tau else value

    @property
    def max_decay(self) -> Optional[float]:
        return None

    def settings(self) -> Dict[str, Any]:
        return {"type": "tau callable" if self.is_tau else "callable", "name": self.name}


def as_schedule(value, what: str) -> Schedule:
    if isinstance(value, Schedule):
        return value
    if is_number(value):
        return Constant(check_unit(what, value))
    if isinstance(value, torch.Tensor):
        raise TypeError(f"fused_ema: {what} must be a float, a schedule or a callable, got a "
                        "tensor; use capturable=True to keep the decay on the device")
    if callable(value):
        return CallableSchedule(value)
    raise TypeError(f"fused_ema: {what} must be a float, a schedule from fused_ema.schedules "
                    f"or a callable step -> decay, got {type(value).__name__}")


def tau_schedule(tau) -> Schedule:
    if isinstance(tau, Schedule):
        raise TypeError(
            "fused_ema: schedules give the decay (momentum), not tau; pass the schedule as "
            "decay=... (tau = 1 - decay)")
    if is_number(tau):
        return Constant(1.0 - check_unit("tau", tau))
    if callable(tau) and not isinstance(tau, torch.Tensor):
        return CallableSchedule(tau, tau=True)
    raise TypeError(f"fused_ema: tau must be a float or a callable step -> tau, got "
                    f"{type(tau).__name__}")


def schedules_from(decay, tau, decays) -> List[Schedule]:
    """The one schedule per EMA that exactly one of ``decay``, ``tau``, ``decays`` gives."""
    given = [n for n, v in (("decay", decay), ("tau", tau), ("decays", decays)) if v is not None]
    if len(given) != 1:
        raise ValueError(
            "fused_ema: give exactly one of decay=, tau= (tau = 1 - decay) or decays=; got "
            + (" and ".join(given) if given else "none"))
    if decay is not None:
        return [as_schedule(decay, "decay")]
    if tau is not None:
        return [tau_schedule(tau)]
    if isinstance(decays, (str, bytes)) or not isinstance(decays, Iterable):
        raise TypeError("fused_ema: decays must be a sequence of decays")
    decays = list(decays)
    if not 1 <= len(decays) <= MAX_DECAYS:
        raise ValueError(f"fused_ema: decays takes 1 to {MAX_DECAYS} decays, "
                         f"got {len(decays)}")
    return [as_schedule(d, f"decays[{k}]") for k, d in enumerate(decays)]


def constant_decays(schedules: Sequence[Schedule], update_every: int) -> Optional[List[float]]:
    """The per-update decays when no schedule depends on the step (computed once)."""
    if all(type(s) in (Constant, HalfLife) for s in schedules):
        return [s(0) ** update_every for s in schedules]
    return None


@dataclass
class Options:
    """FusedEMA's checked settings (all but the schedules are plain values)."""
    schedules: List[Schedule]
    frozen: str
    update_after_step: int = 0
    update_every: int = 1
    buffers: str = "copy"
    ema_dtype: Optional[torch.dtype] = None
    capturable: bool = False
    rounding: str = "nearest"
    seed: int = 0
    non_blocking: bool = False

    @classmethod
    def check(cls, decay, tau, decays, update_after_step, update_every, ema_dtype, buffers,
              capturable, frozen, rounding="nearest", seed=0,
              non_blocking=False) -> "Options":
        schedules = schedules_from(decay, tau, decays)
        after = check_count("update_after_step", update_after_step, 0)
        every = check_count("update_every", update_every, 1)
        if buffers not in BUFFER_MODES:
            raise ValueError(f"fused_ema: buffers must be one of {BUFFER_MODES}, got "
                             f"{buffers!r}")
        if frozen not in FROZEN_MODES:
            raise ValueError(f"fused_ema: frozen must be one of {FROZEN_MODES}, got {frozen!r}")
        if ema_dtype is not None:
            check_float_dtype("ema_dtype", ema_dtype)
        check_rounding(rounding)
        if not isinstance(non_blocking, bool):
            raise TypeError(f"fused_ema: non_blocking must be True or False, got "
                            f"{type(non_blocking).__name__}")
        if non_blocking and capturable:
            raise ValueError(
                "fused_ema: non_blocking=True runs the update on a worker thread, which "
                "capturable=True (an update captured in a CUDA graph or traced by "
                "torch.compile) cannot do; use one or the other")
        return cls(schedules, frozen, after, every, buffers, ema_dtype, bool(capturable),
                   rounding, check_seed(seed), non_blocking)


def check_placement(ema_device: torch.device, model_device: Optional[torch.device], *,
                    capturable: bool, shared: Sequence[str]) -> None:
    """Where the EMA may live: on the model's device when ``capturable`` (a cross-device
    update cannot avoid a host sync) or when it shares frozen parameters with the model
    (``shared``: their names; the EMA module holds the model's own tensors, so it runs on
    the model's device). ``model_device`` None: nothing tracked to place."""
    if model_device is None or ema_device == model_device:
        return
    if capturable:
        raise ValueError(
            f"fused_ema: capturable=True needs the EMA on the model's device ({model_device}),"
            f" not {ema_device}: a cross-device update cannot avoid a host sync")
    if shared:
        more = f" and {len(shared) - 3} more" if len(shared) > 3 else ""
        raise ValueError(
            f"fused_ema: frozen='share' (the default) keeps the model's own frozen parameters "
            f"({', '.join(map(repr, shared[:3]))}{more}: requires_grad=False) in the EMA "
            f"module, which must then be on the model's device ({model_device}), not "
            f"{ema_device}; pass frozen='copy' to keep copies of them on {ema_device}")
