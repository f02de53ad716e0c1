"""The rules, stated once in Python: what the engine accepts, and when a bound update's
tensors are stale.

``csrc/plan.cpp`` states the same rules in C++ with the same messages (the tests compare
the two, case by case), so an error does not depend on the backend. Everything else in
the package (options, schedules, checkpoints, the drop-ins) checks its numbers here too.
"""
import bisect
import math
import numbers
from typing import List, Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
MAX_DECAYS = 8


# ----------------------------------------------------------------------------- numbers

def check_unit(what: str, value) -> float:
    """A number in [0, 1] (a decay, a tau, a schedule's end point)."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.Tensor)):
        raise TypeError(f"fused_ema: {what} must be a number, got {value!r}")
    v = float(value)
    if not (math.isfinite(v) and 0.0 <= v <= 1.0):
        raise ValueError(f"fused_ema: {what} must be a number in [0, 1], got {v:g}")
    return v


def check_count(what: str, value, low: int = 0) -> int:
    """An integer >= ``low`` (a step, ``update_every``); a 0-d integer tensor is read."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = int(value.item())
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"fused_ema: {what} must be an integer >= {low}, got {value!r}")
    return int(value)


def check_float_dtype(what: str, dtype) -> torch.dtype:
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"fused_ema: {what} must be one of {FLOAT_DTYPES}, got {dtype}")
    return dtype


def decay_name(num_decays: int, k: int) -> str:
    return "decay" if num_decays == 1 else f"decays[{k}]"


# ----------------------------------------------------------------------------- tensors

def ema_name(num_decays: int, k: int, i: int) -> str:
    return f"emas[{i}]" if num_decays == 1 else f"emas[{k}][{i}]"


def tensor_name(index: int, n: int, num_decays: int) -> str:
    """The name of entry ``index`` of the sequence params..., emas (decay-major)."""
    if index < n:
        return f"params[{index}]"
    return ema_name(num_decays, (index - n) // n, (index - n) % n)


def is_dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: its elements fill numel slots of memory in some order."""
    expected = 1
    for stride, size in sorted((st, n) for n, st in zip(t.shape, t.stride()) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal strides wherever they matter (a dimension of size 1 has any stride)."""
    if a.is_contiguous() and b.is_contiguous():
        return True
    return all(n <= 1 or sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride()))


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


def check_lists(emas_per_decay: Sequence[Sequence[torch.Tensor]],
                params: Sequence[torch.Tensor]) -> None:
    """One EMA list per decay, each as long as ``params``."""
    for k, emas in enumerate(emas_per_decay):
        if len(emas) != len(params):
            raise ValueError(
                f"fused_ema: got {len(emas)} EMA tensors in emas[{k}] for {len(params)} params; "
                "each EMA list must be as long as params")


def validate(emas_per_decay: Sequence[Sequence[torch.Tensor]], params: Sequence[torch.Tensor],
             check_memory: bool = True) -> None:
    """Raises for anything the update cannot do; writes nothing.

    ``check_memory=False`` leaves out the checks that need real storage (alignment,
    overlap), for fake tensors while tracing.
    """
    num_decays = len(emas_per_decay)
    if not 1 <= num_decays <= MAX_DECAYS:
        raise ValueError(
            f"fused_ema: between 1 and {MAX_DECAYS} decays per update, got {num_decays}")
    check_lists(emas_per_decay, params)
    n = len(params)
    if n == 0:
        return
    device = params[0].device if isinstance(params[0], torch.Tensor) else None
    if device is not None and device.type not in ("cpu", "cuda", "meta"):
        raise ValueError(f"fused_ema: params[0] is on {device}; fused_ema runs on CPU and CUDA "
                         "tensors")
    check_memory = check_memory and device is not None and device.type != "meta"
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
            e, name = emas[i], ema_name(num_decays, k, i)
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
            if not same_layout(e, p):
                raise ValueError(
                    f"fused_ema: {name} has strides {list(e.stride())} but params[{i}] has "
                    f"strides {list(p.stride())}; an EMA must have its param's memory layout "
                    "(make it with param.detach().clone())")
            if check_memory and e.numel():
                ema_spans.append((*_span(e), k, i))
    if check_memory:
        _check_no_overlap(ema_spans, param_spans, num_decays)


def _span(t: torch.Tensor):
    begin = t.data_ptr()
    return begin, begin + t.numel() * t.element_size()


def _check_no_overlap(ema_spans, param_spans, num_decays: int) -> None:
    def name(span):
        return f"params[{span[3]}]" if span[2] < 0 else ema_name(num_decays, span[2], span[3])

    ema_spans.sort()
    for prev, cur in zip(ema_spans, ema_spans[1:]):
        if cur[0] < prev[1]:
            raise ValueError(
                f"fused_ema: {name(cur)} overlaps {name(prev)} in memory; every EMA needs "
                "storage of its own")
    # EMA spans are now disjoint and sorted: only the last one starting before a param's
    # end can overlap it.
    starts = [s[0] for s in ema_spans]
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


# ----------------------------------------------------------------------------- an update's values

def update_args(num_decays: int, decays: Sequence[float], decay_tensor: Optional[torch.Tensor],
                skip: Optional[torch.Tensor], device: Optional[torch.device]):
    """Checks one update's decays and skip flag (``make_update_args`` in plan.cpp) and
    returns ``(host decays or None, decay tensor or None, skipped, device skip or None)``:
    host values are read here (no sync: host memory), device ones are left to the update.
    ``device``: the EMAs' device (None for an update of no tensors)."""
    if decay_tensor is not None:
        if decay_tensor.numel() != num_decays:
            raise ValueError(f"fused_ema: got {decay_tensor.numel()} decay values for "
                             f"{num_decays} EMA list(s)")
        if decay_tensor.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"fused_ema: a decay tensor must be float32 or float64, got "
                            f"{decay_tensor.dtype}")
        if decay_tensor.device.type == "cpu":
            decays, decay_tensor = decay_tensor.reshape(-1).tolist(), None
        elif device is not None and decay_tensor.device != device:
            raise ValueError(f"fused_ema: the decay tensor is on {decay_tensor.device} but the "
                             f"EMAs are on {device}")
    elif len(decays) != num_decays:
        raise ValueError(f"fused_ema: got {len(decays)} decays for {num_decays} EMA list(s)")
    if decay_tensor is None:
        decays = [check_unit(decay_name(num_decays, k), d) for k, d in enumerate(decays)]
    skipped, device_skip = False, None
    if skip is not None:
        check_skip(skip)
        if skip.device.type == "cpu":
            skipped = bool(skip.reshape(()).item() != 0)
        elif device is not None and skip.device != device:
            raise ValueError(f"fused_ema: skip is on {skip.device} but the EMAs are on {device}")
        else:
            device_skip = skip.reshape(()) != 0
    return (None if decay_tensor is not None else decays), decay_tensor, skipped, device_skip


ROUNDINGS = ("nearest", "stochastic")


def check_rounding(rounding) -> bool:
    """``"nearest"`` (the default) or ``"stochastic"`` (bf16 EMAs); True for stochastic."""
    if rounding not in ROUNDINGS:
        raise ValueError(f"fused_ema: rounding must be one of {ROUNDINGS}, got {rounding!r}")
    return rounding == "stochastic"


def check_seed(seed) -> int:
    """A seed of stochastic rounding's random bits: an integer in [0, 2**63)."""
    seed = check_count("seed", seed)
    if seed >= 1 << 63:
        raise ValueError(f"fused_ema: seed must be an integer in [0, 2**63), got {seed}")
    return seed


def check_stochastic(emas_per_decay: Sequence[Sequence[torch.Tensor]]) -> None:
    """Stochastic rounding is for bf16 EMAs (``check_stochastic`` in plan.cpp)."""
    num_decays = len(emas_per_decay)
    for k, emas in enumerate(emas_per_decay):
        for i, e in enumerate(emas):
            if e.dtype != torch.bfloat16:
                kind = str(e.dtype).replace("torch.", "")
                raise ValueError(
                    f"fused_ema: {ema_name(num_decays, k, i)} is {kind}; rounding='stochastic' "
                    "is for bfloat16 EMAs (round to nearest, the default, for the others)")


STEP_DTYPES = (torch.int64, torch.int32)


def rounding_args(stochastic: bool, seed, step, device: Optional[torch.device]):
    """Checks a stochastic update's seed and step (``make_update_args`` in plan.cpp) and
    returns ``(seed, host step or None, step tensor or None)``: a step is an integer >= 0,
    or a tensor of one int64/int32 value (a CPU one is read here; one on the EMAs' device
    is read by the update: no host sync). ``None`` for an update rounded to nearest."""
    if not stochastic:
        return None
    seed = check_seed(seed)
    if step is None:
        raise ValueError("fused_ema: rounding='stochastic' needs step= (this update's "
                         "counter: with the seed, it keys the random bits)")
    if not isinstance(step, torch.Tensor):
        return seed, check_count("step", step), None
    if step.numel() != 1:
        raise ValueError(f"fused_ema: step must hold one value, got {step.numel()}")
    if step.dtype not in STEP_DTYPES:
        raise TypeError(f"fused_ema: a step tensor must be int64 or int32, got {step.dtype}")
    if step.device.type == "cpu":
        if torch.compiler.is_compiling():  # traced: the op reads it (no .item() in a graph)
            return seed, None, step.reshape(())
        return seed, check_count("step", step), None
    if device is not None and step.device != device:
        raise ValueError(f"fused_ema: the step tensor is on {step.device} but the EMAs are on "
                         f"{device}")
    return seed, None, step.reshape(())


SKIP_DTYPES = (torch.bool, torch.uint8, torch.int32, torch.int64, torch.float32, torch.float64)


def check_skip(skip: torch.Tensor) -> torch.Tensor:
    """A skip flag: one value of a bool, integer or float tensor (a GradScaler's found-inf)."""
    if not isinstance(skip, torch.Tensor):
        raise TypeError(f"fused_ema: skip must be a tensor, got {type(skip).__name__}")
    if skip.numel() != 1:
        raise ValueError(f"fused_ema: skip must hold one value, got {skip.numel()}")
    if skip.dtype not in SKIP_DTYPES:
        raise TypeError(f"fused_ema: skip must be a bool, integer, float32 or float64 tensor, "
                        f"got {skip.dtype}")
    return skip


# ----------------------------------------------------------------------------- staleness

def tensor_key(t: torch.Tensor):
    """What a plan was built for (``TensorKey`` in plan.h): storage address, shape, strides,
    dtype, device. A tensor whose key changed is stale."""
    return (t.data_ptr() if t.numel() else 0, tuple(t.shape), t.stride(), t.dtype, t.device)


def first_changed(tensors: Sequence[torch.Tensor], keys: List[tuple]) -> int:
    """Index of the first tensor whose key is no longer ``keys[i]``, or -1."""
    for i, t in enumerate(tensors):
        if tensor_key(t) != keys[i]:
            return i
    return -1


def stale_error(index: int, n: int, num_decays: int) -> RuntimeError:
    """What ``EMAPlan.update_`` raises for a stale tensor (entry ``index`` of params, emas)."""
    return RuntimeError(
        f"fused_ema: {tensor_name(index, n, num_decays)} was replaced or resized since the plan "
        "was built (its storage, shape, dtype or layout changed); build a new EMAPlan")
