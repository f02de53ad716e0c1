"""The pure-PyTorch path.

It runs wherever the compiled module is missing or ``FUSED_EMA_BACKEND=python``
is set, and it is the reference the compiled paths are tested against. It
checks the same things as ``csrc/plan.cpp`` with the same messages, so an error
does not depend on the backend.
"""
import math
from typing import List, Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
MAX_DECAYS = 8


def _ema_name(num_decays: int, k: int, i: int) -> str:
    return f"emas[{i}]" if num_decays == 1 else f"emas[{k}][{i}]"


def _span(t: torch.Tensor):
    begin = t.data_ptr()
    return begin, begin + t.numel() * t.element_size()


def is_dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: its elements fill numel slots of memory in some order."""
    expected = 1
    for stride, size in sorted((st, n) for n, st in zip(t.shape, t.stride()) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _check_dense_and_aligned(t: torch.Tensor, name: str, check_memory: bool) -> None:
    """The compiled kernels walk a dense tensor's storage as one flat array."""
    if not (t.is_contiguous() or is_dense(t)):
        raise ValueError(f"fused_ema: {name} is neither contiguous nor dense (strides "
                         f"{list(t.stride())}); pass contiguous or dense (e.g. channels_last) "
                         "tensors")
    if check_memory and t.data_ptr() % t.element_size():
        raise ValueError(f"fused_ema: {name} starts at address {hex(t.data_ptr())}, which is not "
                         f"a multiple of its element size ({t.element_size()} bytes); copy it "
                         "into a tensor of its own")


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal strides wherever they matter (a dimension of size 1 has any stride)."""
    if a.is_contiguous() and b.is_contiguous():
        return True
    return all(n <= 1 or sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride()))


def validate(emas_per_decay: Sequence[Sequence[torch.Tensor]], params: Sequence[torch.Tensor],
             check_memory: bool = True):
    """Raises for anything the update cannot do; writes nothing.

    ``check_memory=False`` leaves out the overlap checks, which need real
    storage (for fake tensors while tracing).
    """
    num_decays = len(emas_per_decay)
    if not 1 <= num_decays <= MAX_DECAYS:
        raise ValueError(
            f"fused_ema: between 1 and {MAX_DECAYS} decays per update, got {num_decays}")
    n = len(params)
    for k, emas in enumerate(emas_per_decay):
        if len(emas) != n:
            raise ValueError(
                f"fused_ema: got {len(emas)} EMA tensors for {n} params; each EMA list "
                "must be as long as params")
    if n == 0:
        return
    device = params[0].device
    check_memory = check_memory and device.type != "meta"
    if device.type not in ("cpu", "cuda", "meta"):
        raise ValueError(f"fused_ema: params[0] is on {device}; fused_ema runs on CPU and CUDA tensors")
    ema_spans, param_spans = [], []
    for i, p in enumerate(params):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"fused_ema: params[{i}] is {type(p).__name__}, not a tensor")
        if p.device != device:
            raise ValueError(
                f"fused_ema: params[{i}] is on {p.device} but params[0] is on {device}; "
                "one update runs on one device")
        if p.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"fused_ema: params[{i}] has dtype {p.dtype}; params must be float32, float16, "
                "bfloat16 or float64")
        _check_dense_and_aligned(p, f"params[{i}]", check_memory)
        if check_memory and p.numel():
            param_spans.append((*_span(p), -1, i))
        for k, emas in enumerate(emas_per_decay):
            e, name = emas[i], _ema_name(num_decays, k, i)
            if not isinstance(e, torch.Tensor):
                raise TypeError(f"fused_ema: {name} is {type(e).__name__}, not a tensor")
            if e.shape != p.shape:
                raise ValueError(
                    f"fused_ema: {name} has shape {list(e.shape)} but params[{i}] has shape "
                    f"{list(p.shape)}")
            if e.device != device:
                raise ValueError(
                    f"fused_ema: {name} is on {e.device} but params[{i}] is on {p.device}; keep "
                    "the EMA on its params' device (FusedEMA(device=...) handles an EMA kept "
                    "elsewhere)")
            if e.dtype not in FLOAT_DTYPES:
                raise TypeError(
                    f"fused_ema: {name} has dtype {e.dtype}; an EMA must be float32, float16, "
                    "bfloat16 or float64")
            _check_dense_and_aligned(e, name, check_memory)
            if not _same_layout(e, p):
                raise ValueError(
                    f"fused_ema: {name} has strides {list(e.stride())} but params[{i}] has "
                    f"strides {list(p.stride())}; an EMA must have its param's memory layout "
                    "(make it with param.detach().clone())")
            if check_memory and e.numel():
                ema_spans.append((*_span(e), k, i))
    if not check_memory:
        return

    def name(span):
        return f"params[{span[3]}]" if span[2] < 0 else _ema_name(num_decays, span[2], span[3])

    ema_spans.sort()
    for prev, cur in zip(ema_spans, ema_spans[1:]):
        if cur[0] < prev[1]:
            raise ValueError(
                f"fused_ema: {name(cur)} overlaps {name(prev)} in memory; every EMA needs "
                "storage of its own")
    starts = [s[0] for s in ema_spans]
    import bisect

    for p in param_spans:
        j = bisect.bisect_left(starts, p[1])
        if j == 0 or ema_spans[j - 1][1] <= p[0]:
            continue
        e = ema_spans[j - 1]
        if e[3] == p[3]:
            raise ValueError(
                f"fused_ema: {name(e)} shares memory with {name(p)}; the EMA must be a separate "
                "copy of its param (e.g. param.detach().clone())")
        raise ValueError(
            f"fused_ema: {name(e)} overlaps {name(p)} in memory; EMAs and params must not "
            "share storage")


def check_decay(decay: float, k: Optional[int] = None) -> float:
    """A float decay must be a number in [0, 1]."""
    d = float(decay)
    if not (math.isfinite(d) and 0.0 <= d <= 1.0):
        where = "" if k is None else f"s[{k}]"
        raise ValueError(f"fused_ema: decay{where} must be a number in [0, 1], got {d}")
    return d


def multi_ema_update_(
    emas_per_decay: Sequence[Sequence[torch.Tensor]],
    params: Sequence[torch.Tensor],
    decays: Sequence[float],
    decay_tensor: Optional[torch.Tensor] = None,
    skip: Optional[torch.Tensor] = None,
    *,
    validated: bool = False,
) -> None:
    """``emas_per_decay[k][i].lerp_(params[i], 1 - decay_k)`` in fp32 (fp64 for fp64 EMAs).

    ``decays`` are host floats, or ``decay_tensor`` holds them (one per list).
    Nothing is written when ``skip`` is non-zero.
    """
    num_decays = len(emas_per_decay)
    if not validated:
        validate(emas_per_decay, params)
    if decay_tensor is not None:
        if decay_tensor.numel() != num_decays:
            raise ValueError(
                f"fused_ema: got {decay_tensor.numel()} decay values for {num_decays} EMA list(s)")
        if decay_tensor.dtype not in (torch.float32, torch.float64):
            raise TypeError(
                f"fused_ema: a decay tensor must be float32 or float64, got {decay_tensor.dtype}")
        if decay_tensor.device.type == "cpu":
            decays = [check_decay(d, k if num_decays > 1 else None)
                      for k, d in enumerate(decay_tensor.reshape(-1).tolist())]
            decay_tensor = None
    else:
        if len(decays) != num_decays:
            raise ValueError(f"fused_ema: got {len(decays)} decays for {num_decays} EMA list(s)")
        decays = [check_decay(d, k if num_decays > 1 else None) for k, d in enumerate(decays)]
    device_skip = None
    if skip is not None:
        if skip.numel() != 1:
            raise ValueError(f"fused_ema: skip must hold one value, got {skip.numel()}")
        if skip.device.type == "cpu":
            if bool(skip.reshape(()).item() != 0):
                return
        else:
            device_skip = skip.reshape(()) != 0
    if not params:
        return

    with torch.no_grad():
        for k, emas in enumerate(emas_per_decay):
            weights = {}  # opmath dtype -> lerp weight (1 - decay) as lerp will see it
            for p, e in zip(params, emas):
                op = torch.float64 if e.dtype == torch.float64 else torch.float32
                if op not in weights:
                    if decay_tensor is None:
                        w = 1.0 - decays[k]
                        # weight 1 in the opmath type (as lerp rounds it): a copy
                        weights[op] = (w, torch.tensor(w, dtype=op).item() == 1.0)
                    else:
                        weights[op] = ((1.0 - decay_tensor.reshape(-1)[k].double()).to(op), None)
                w, copy = weights[op]
                target = e if e.dtype == op else e.to(op)
                src = p.to(op)
                # Weight 1 (decay 0) is a copy, as in csrc/ema_math.h: lerp's
                # formula would keep a NaN or inf EMA non-finite forever.
                if copy is None:  # a device weight: no host sync
                    new = torch.where(w == 1, src, target.lerp(src, w))
                elif copy:
                    new = src
                else:
                    new = target.lerp(src, w)
                if device_skip is not None:
                    new = torch.where(device_skip, target, new)
                e.copy_(new)
