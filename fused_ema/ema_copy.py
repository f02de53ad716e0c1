"""Building the EMA copy: a frozen deep copy of the model per decay (or, for a list of
tensors, a list of tensor copies), in the EMA's dtype and on the EMA's device. Shared
tensors (``frozen="share"``: names in ``shared``) are not copied: the EMA holds the
model's own tensor objects."""
import copy
import warnings
from typing import AbstractSet, Dict, List, Optional, Sequence

import torch
from torch import nn

from . import distributed
from .schedules import Schedule
from .selection import Source, walk
from .validation import FLOAT_DTYPES, is_dense

HALF_DTYPES = (torch.float16, torch.bfloat16)


def ema_dtype_for(dtype: torch.dtype, ema_dtype: Optional[torch.dtype]) -> torch.dtype:
    """A floating tensor's EMA dtype: ``ema_dtype`` if given, fp32 for 16-bit weights (a
    bf16 EMA with decay 0.999 stops moving), else the weight's own; others keep theirs."""
    if dtype not in FLOAT_DTYPES:
        return dtype
    if ema_dtype is not None:
        return ema_dtype
    return torch.float32 if dtype in HALF_DTYPES else dtype


def ema_tensor(t: torch.Tensor, device: torch.device, ema_dtype: Optional[torch.dtype]):
    return t.detach().to(device=device, dtype=ema_dtype_for(t.dtype, ema_dtype), copy=True)


def warn_if_frozen_by_rounding(sources: Sequence[Source], schedules: Sequence[Schedule],
                               update_every: int, ema_dtype: Optional[torch.dtype],
                               rounding: str = "nearest") -> None:
    """Warns when a 16-bit EMA rounded to nearest could not move at the schedule's top
    decay (stochastic rounding moves a bf16 EMA by the right amount on average)."""
    dtypes = {ema_dtype_for(s.tensor.dtype, ema_dtype) for s in sources
              if s.tensor.dtype in FLOAT_DTYPES}
    if rounding == "stochastic":
        dtypes.discard(torch.bfloat16)
    for dtype in dtypes & set(HALF_DTYPES):
        eps = torch.finfo(dtype).eps
        for sched in schedules:
            top = sched.max_decay
            if top is None:
                continue
            top = top ** update_every
            if 1.0 - top < eps:
                warnings.warn(
                    f"fused_ema: a {dtype} EMA with decay {top:g} barely moves: each update "
                    f"adds (1 - decay) = {1 - top:.3g} of the difference, below the {dtype} "
                    f"resolution ({eps:.3g}); use ema_dtype=torch.float32"
                    + (" or rounding='stochastic'" if dtype == torch.bfloat16 else ""),
                    UserWarning, stacklevel=4)
                return


def ema_source(s: Source, device: torch.device, ema_dtype: Optional[torch.dtype]):
    """A new EMA tensor for ``s`` (a frozen ``nn.Parameter`` for a parameter)."""
    e = ema_tensor(s.tensor, device, ema_dtype)
    return nn.Parameter(e, requires_grad=False) if s.is_param else e


@torch.no_grad()
def copy_module(model: nn.Module, sources: Sequence[Source], device: torch.device,
                ema_dtype: Optional[torch.dtype], shared: AbstractSet[str]) -> nn.Module:
    """A frozen copy of ``model`` in eval mode whose tensors are EMA copies (``deepcopy``
    with a memo of the new tensors, and of the shared ones mapped to themselves; for a
    sharded model, a module tree of the shards)."""
    memo = {id(s.tensor): s.tensor if s.name in shared else ema_source(s, device, ema_dtype)
            for s in sources}
    try:  # an FSDP2 model is not copied: a module tree holds the shards
        m = (distributed.ema_module(model, memo) if distributed.is_sharded(model)
             else copy.deepcopy(model, memo))
    except Exception as exc:
        raise TypeError(f"fused_ema: could not deep-copy the model ({exc}); pass "
                        "ema_model= (a module of the same structure), or "
                        "FusedEMA(model.parameters(), ...) to average the tensors without a "
                        "module copy") from exc
    m.requires_grad_(False)
    m.eval()
    return m


@torch.no_grad()
def copy_list(sources: Sequence[Source], device: torch.device,
              ema_dtype: Optional[torch.dtype], shared: AbstractSet[str]) -> List[torch.Tensor]:
    return [s.tensor if s.name in shared else ema_tensor(s.tensor, device, ema_dtype)
            for s in sources]


def replace_tensors(module: nn.Module, new: Dict[int, torch.Tensor]) -> None:
    """Puts ``new[id(t)]`` wherever ``module`` holds ``t`` as a parameter or buffer (under
    every name of a tied tensor): sharing a frozen parameter, or ending the sharing."""
    for m in module.modules():
        for container in (m._parameters, m._buffers):
            for key, t in container.items():
                if t is not None and id(t) in new:
                    container[key] = new[id(t)]


@torch.no_grad()
def follow_layout(srcs: Sequence[torch.Tensor],
                  emas_per_decay: Sequence[Sequence[torch.Tensor]]) -> None:
    """Gives each EMA tensor its model tensor's memory layout when the model's changed
    since the copy was made (``model.to(memory_format=torch.channels_last)``): the engine
    reads both as one flat array. The tensor objects stay (``.data`` is set)."""
    for i, t in enumerate(srcs):
        if t.numel() <= 1 or not is_dense(t):
            continue
        for emas in emas_per_decay:
            e = emas[i]
            if e.stride() != t.stride() and e.shape == t.shape:
                new = torch.empty_strided(t.shape, t.stride(), dtype=e.dtype, device=e.device)
                new.copy_(e)
                e.data = new


def check_given_module(model: nn.Module, given: nn.Module, sources: Sequence[Source],
                       index: int, shared: AbstractSet[str]) -> List[Source]:
    """Checks a user-supplied EMA model (``FusedEMA(model, ema_model=...)``) against the
    model: the same parameter and buffer names and shapes, no tensor shared (but those
    in ``shared``, which it will hold). Returns its sources in the model's order; writes
    nothing."""
    what = "ema_model" if index < 0 else f"ema_model[{index}]"
    if not isinstance(given, nn.Module):
        raise TypeError(f"fused_ema: {what} must be an nn.Module, got {type(given).__name__}")
    if given is model:
        raise ValueError(f"fused_ema: {what} is the model itself; pass a separate module of "
                         "the same structure")
    if distributed.is_sharded(model):
        raise ValueError("fused_ema: ema_model= is not supported for a sharded (DTensor) "
                         "model; the EMA's module tree is built from the shards")
    theirs = {s.name: s for s in walk(given)}
    ours = [s.name for s in sources]
    missing = [n for n in ours if n not in theirs]
    extra = [n for n in theirs if n not in set(ours)]
    if missing or extra:
        raise ValueError(f"fused_ema: {what} does not have the model's structure: missing "
                         f"{missing[:5]}, unexpected {extra[:5]}")
    model_ids = {id(s.tensor) for s in sources}
    out = []
    for s in sources:
        t = theirs[s.name]
        if t.tensor.shape != s.tensor.shape:
            raise ValueError(f"fused_ema: '{s.name}' has shape {list(t.tensor.shape)} in "
                             f"{what} but {list(s.tensor.shape)} in the model")
        if s.name not in shared and (id(t.tensor) in model_ids or (
                t.tensor.numel() and s.tensor.numel()
                and t.tensor.untyped_storage().data_ptr()
                == s.tensor.untyped_storage().data_ptr())):
            raise ValueError(f"fused_ema: '{s.name}' of {what} shares memory with the "
                             "model's; the EMA needs tensors of its own")
        out.append(t)
    return out


@torch.no_grad()
def adopt_module(given: nn.Module, sources: Sequence[Source], theirs: Sequence[Source],
                 device: torch.device, ema_dtype: Optional[torch.dtype],
                 shared: AbstractSet[str]) -> nn.Module:
    """Makes a checked user-supplied module the EMA copy: each of its tensors but the shared
    ones takes a copy of the model's (EMA dtype, EMA device; the tensor objects stay);
    frozen, in eval mode. (``FusedEMA``'s binding puts the model's shared tensors in.)"""
    for s, t in zip(sources, theirs):
        if s.name not in shared:
            t.tensor.data = ema_tensor(s.tensor, device, ema_dtype)
    given.requires_grad_(False)
    given.eval()
    return given
