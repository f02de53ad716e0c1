"""Stable-Baselines3: ``polyak_update`` on the fused engine, and ``patch()`` to make every
SB3 (and sb3-contrib) algorithm use it.

>>> from fused_ema.integrations import sb3
>>> sb3.patch()            # DQN, SAC, TD3, TQC, QR-DQN, CrossQ ... now update targets fused
>>> model = SAC("MlpPolicy", env).learn(10_000)

What differs from SB3's own: the update is ``target.lerp_(param, tau)`` in one call for
all tensors (SB3 multiplies by ``1 - tau`` then adds ``tau * param``, two roundings per
element): results agree within one float32 ulp per update; ``tau=1`` (DQN's hard update,
the BatchNorm statistics) and ``tau=0`` agree bit for bit. A ``tau`` outside [0, 1], a
length mismatch, a shape mismatch or a non-float tensor raises before anything is written
(SB3 raises the length mismatch from ``zip(strict=True)`` after updating the first tensors).

A drop-in for the module ``stable_baselines3.common.utils`` (2.9.2), where
``polyak_update`` lives: ``polyak_update`` is ours (and ``patch``/``unpatch``); every other
public name of that module (``get_device``, ``set_random_seed`` ...) is SB3's own object,
imported on first use.
"""
import sys
from typing import Iterable, List

import torch

from . import _delegate, _pairs
from ..validation import check_unit

__all__ = ["polyak_update", "patch", "unpatch"]
__getattr__, __dir__ = _delegate.delegate(__name__, ["stable_baselines3.common.utils"],
                                          "stable-baselines3==2.9.2")


def polyak_update(params: Iterable[torch.Tensor], target_params: Iterable[torch.Tensor],
                  tau: float) -> None:
    """``target = (1 - tau) * target + tau * param`` for every pair, in one fused call
    (SB3's signature: ``tau=1`` copies, ``tau=0`` leaves the targets unchanged)."""
    params, target_params = list(params), list(target_params)
    if isinstance(tau, torch.Tensor):
        tau = tau.item()
    tau = check_unit("tau", tau)
    if tau == 1.0:  # a hard update: an exact copy, whatever the dtypes (SB3 gives the same)
        _pairs.copy_(target_params, params, "target_params", "params")
        return
    _pairs.lerp_(target_params, params, 1.0 - tau, "target_params", "params")


def _sb3_modules():
    """Loaded modules of SB3 and sb3-contrib that hold their own ``polyak_update`` name."""
    for name, mod in list(sys.modules.items()):
        if mod is None or not (name.startswith("stable_baselines3") or
                               name.startswith("sb3_contrib")):
            continue
        if "polyak_update" in getattr(mod, "__dict__", {}):
            yield mod


class _Patch:
    """What ``patch()`` changed; ``undo()`` (or leaving the ``with`` block) puts SB3's back."""

    def __init__(self, replaced):
        self._replaced = replaced

    def undo(self) -> None:
        for mod, original in self._replaced:
            mod.polyak_update = original
        self._replaced = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.undo()


_active: List[_Patch] = []


def patch(fn=None) -> _Patch:
    """Points ``polyak_update`` in every algorithm module of SB3 (and sb3-contrib, if
    installed) at ``fn`` (default: this module's fused ``polyak_update``).

    The algorithms import the function by name (``from ...utils import polyak_update``),
    so the name is replaced in each module that holds it. Use as a call (stays until
    ``unpatch()``) or as ``with sb3.patch(): ...``.
    """
    import stable_baselines3  # noqa: F401  (loads the algorithm modules)
    import stable_baselines3.common.utils  # noqa: F401
    try:
        import sb3_contrib  # noqa: F401
    except ImportError:
        pass
    fn = polyak_update if fn is None else fn
    replaced = []
    for mod in _sb3_modules():
        replaced.append((mod, mod.polyak_update))
        mod.polyak_update = fn
    handle = _Patch(replaced)
    _active.append(handle)
    return handle


def unpatch() -> None:
    """Undoes every ``patch()`` (latest first)."""
    while _active:
        _active.pop().undo()
