"""The one fused step every adapter shares: lerp (or copy) a list of EMA tensors
towards a list of source tensors, checked whole before anything is written.

The engine (``fused_ema.ema_update_``) takes contiguous tensors and dense tensors of the
same layout on both sides (channels_last weights and their clones) as they are; a source on another device than its EMA (an offloaded EMA) is copied over
first. Anything else (a strided view) takes ``Tensor.lerp_``, which uses the same
two-branch formula.
"""
from typing import List, Optional, Sequence, Tuple

import torch

from ..validation import is_dense
from ..functional import EMAPlan, ema_update_

_FLOAT = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_pairs(emas: Sequence[torch.Tensor], srcs: Sequence[torch.Tensor], what: str,
                src_what: str = "params") -> None:
    """Raises (naming the index) unless every pair can be averaged; writes nothing."""
    if len(emas) != len(srcs):
        raise ValueError(f"fused_ema: got {len(srcs)} {src_what} for {len(emas)} {what}; "
                         "the lists must be equally long")
    for i, (e, s) in enumerate(zip(emas, srcs)):
        if not isinstance(s, torch.Tensor):
            raise TypeError(f"fused_ema: {src_what}[{i}] is {type(s).__name__}, not a tensor")
        if e.shape != s.shape:
            raise ValueError(f"fused_ema: {src_what}[{i}] has shape {list(s.shape)} but "
                             f"{what}[{i}] has {list(e.shape)}")


def lerp_(emas: Sequence[torch.Tensor], srcs: Sequence[torch.Tensor], decay: float,
          what: str = "shadow params", src_what: str = "params", *, rounding: str = "nearest",
          seed: int = 0, step: Optional[int] = None) -> None:
    """``emas[i].lerp_(srcs[i], 1 - decay)`` for all i: one fused call for all tensors the
    engine takes, ``Tensor.lerp_`` for the rest (with ``rounding="stochastic"`` every pair
    goes to the engine, which refuses a strided one). Nothing is written if any pair is
    bad."""
    emas, srcs = list(emas), list(srcs)
    check_pairs(emas, srcs, what, src_what)
    fused_e: List[torch.Tensor] = []
    fused_s: List[torch.Tensor] = []
    slow = []
    for i, (e, s) in enumerate(zip(emas, srcs)):
        if e.dtype not in _FLOAT or s.dtype not in _FLOAT:
            raise TypeError(f"fused_ema: {what}[{i}] / {src_what}[{i}] are {e.dtype} / {s.dtype}; "
                            "only floating-point tensors can be averaged")
        if e.device != s.device:
            s = s.to(e.device, memory_format=torch.preserve_format)
        if (rounding != "nearest" or (e.is_contiguous() and s.is_contiguous())
                or (e.stride() == s.stride() and is_dense(e))):
            fused_e.append(e)  # the engine takes dense layouts (channels_last) as they are
            fused_s.append(s)
        else:
            slow.append((e, s))
    with torch.no_grad():
        # validates all its tensors before writing
        ema_update_(fused_e, fused_s, decay, rounding=rounding, seed=seed, step=step)
        weight = 1.0 - decay
        for e, s in slow:
            e.lerp_(s.to(device=e.device, dtype=e.dtype), weight)


def copy_(dsts: Sequence[torch.Tensor], srcs: Sequence[torch.Tensor],
          what: str = "shadow params", src_what: str = "params") -> None:
    """``dsts[i].copy_(srcs[i])`` for all i, checked whole first."""
    dsts, srcs = list(dsts), list(srcs)
    check_pairs(dsts, srcs, what, src_what)
    if not dsts:
        return
    with torch.no_grad():
        if all(d.device == s.device and d.dtype == s.dtype for d, s in zip(dsts, srcs)):
            torch._foreach_copy_(dsts, srcs)
        else:
            for d, s in zip(dsts, srcs):
                d.copy_(s)


class Lerp:
    """``lerp_`` with a cache: an adapter calls it with the same tensors at every step, so
    the first call validates them and builds an ``EMAPlan``; later calls with the same
    tensor objects (checked by identity, the plan checks storage and shape) are one call.
    Lists with tensors the plan cannot take as they are (strided, another device) always
    take the uncached ``lerp_``. ``rounding``, ``seed``: as ``EMAPlan``'s (each call then
    gives its ``step``)."""

    def __init__(self, what: str = "shadow params", src_what: str = "params", *,
                 rounding: str = "nearest", seed: int = 0):
        self.what, self.src_what = what, src_what
        self.rounding, self.seed = rounding, seed
        self._key: Tuple = ()
        self._plan = None

    def __call__(self, emas: Sequence[torch.Tensor], srcs: Sequence[torch.Tensor],
                 decay: float, step: Optional[int] = None) -> None:
        key = (tuple(map(id, emas)), tuple(map(id, srcs)))
        if key == self._key and type(decay) is float and 0.0 <= decay <= 1.0:
            try:
                self._plan.update_(decay, step=step)
                return
            except RuntimeError:
                self._key, self._plan = (), None  # a tensor got new storage: plan again
        emas, srcs = list(emas), list(srcs)
        lerp_(emas, srcs, decay, self.what, self.src_what, rounding=self.rounding,
              seed=self.seed, step=step)  # validates, then updates
        if all(e.device == s.device and e.is_contiguous() and s.is_contiguous()
               for e, s in zip(emas, srcs)):
            self._plan = EMAPlan(emas, srcs, rounding=self.rounding, seed=self.seed)
            self._key = key
