"""The pure-PyTorch path.

It runs wherever the compiled module is missing or ``FUSED_EMA_BACKEND=python`` is set,
and it is the reference the compiled paths are tested against. Its checks are
``validation``'s, whose messages are the compiled path's.
"""
from typing import Optional, Sequence, Tuple

import torch

from . import validation


# ---- stochastic rounding's random bits: csrc/ema_math.h, in Python ----------------------
_M32, _M64 = (1 << 32) - 1, (1 << 64) - 1


def _mix64(x: int) -> int:
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & _M64
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def step_key(seed: int, step: int) -> int:
    return _mix64(_mix64((seed + 0x9E3779B97F4A7C15) & _M64) ^ (step & _M64))


def element_key(skey: int, tensor: int, hi: int) -> int:
    return _mix64(_mix64(skey ^ tensor) ^ hi) & _M32


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``x * c mod 2**32`` for int64 tensors of values below 2**32, without overflow."""
    return ((((x * (c >> 16)) & 0xFFFF) << 16) + x * (c & 0xFFFF)) & _M32


def random_bits(key: int, lo: torch.Tensor) -> torch.Tensor:
    """32 random bits (int64 values) for the elements ``lo`` (indices mod 2**32)."""
    x = lo ^ key
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def round_bf16_stochastic(value: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """float32 ``value`` to bf16, up in magnitude with probability equal to the dropped
    fraction: the top 16 of ``bits`` added below the kept bits, then truncated."""
    u = value.view(torch.int32).to(torch.int64) & _M32
    u = torch.where(value.isnan(), 0x7FC00000, u + (bits >> 16)) >> 16
    return torch.where(u >= 1 << 15, u - (1 << 16), u).to(torch.int16).view(torch.bfloat16)


def stochastic_bf16(value: torch.Tensor, ema: torch.Tensor, skey: int, tensor: int):
    """``value`` (float32, shaped as ``ema``) rounded stochastically for EMA tensor number
    ``tensor`` of the update keyed ``skey``: each element's bits come from its index in
    ``ema``'s memory order (the order the compiled kernels walk)."""
    n = ema.numel()
    index = torch.arange(n, dtype=torch.int64, device=ema.device).as_strided(ema.shape,
                                                                             ema.stride())
    bits = torch.empty_like(index)
    for hi in range((max(n, 1) - 1 >> 32) + 1):  # one key per 2**32 elements
        part = (index >> 32) == hi
        bits = torch.where(part, random_bits(element_key(skey, tensor, hi), index & _M32), bits)
    return round_bf16_stochastic(value, bits)


def lerp(ema: torch.Tensor, param: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``ema_lerp`` of csrc/ema_math.h (torch.lerp's two-branch form), one op per rounding
    as the kernels round: the same bits (torch.lerp's CPU vector loop fuses a multiply-add).
    ``weight``: a 0-d tensor of the update's dtype."""
    diff = param - ema
    low = ema + weight * diff
    high = param - diff * (1 - weight)
    if weight.device.type == "cpu" and weight.dim() == 0:
        return low if weight.item() < 0.5 else high  # host memory: no sync
    return torch.where(weight < 0.5, low, high)


def multi_ema_update_(
    emas_per_decay: Sequence[Sequence[torch.Tensor]],
    params: Sequence[torch.Tensor],
    decays: Sequence[float],
    decay_tensor: Optional[torch.Tensor] = None,
    skip: Optional[torch.Tensor] = None,
    *,
    rounding: Optional[Tuple[int, Optional[int], Optional[torch.Tensor]]] = None,
    validated: bool = False,
) -> None:
    """``emas_per_decay[k][i].lerp_(params[i], 1 - decay_k)`` in fp32 (fp64 for fp64 EMAs),
    with the two ends exact as in ``csrc/ema_math.h``: decay 0 copies the param, decay 1
    leaves the EMA as it is (whatever either holds: NaN, inf, -0.0).

    ``decays`` are host floats, or ``decay_tensor`` holds them (one per list). Nothing is
    written when ``skip`` is non-zero. ``rounding``: ``validation.rounding_args`` of a
    stochastic update (bf16 EMAs; a step tensor on the device is read here, a host sync),
    None to round to nearest.
    """
    num_decays = len(emas_per_decay)
    if not validated:
        validation.validate(emas_per_decay, params)
        if rounding is not None:
            validation.check_stochastic(emas_per_decay)
    device = params[0].device if params else None
    decays, decay_tensor, skipped, device_skip = validation.update_args(
        num_decays, decays, decay_tensor, skip, device)
    if skipped or not params:
        return
    skey = None
    if rounding is not None:
        seed, step, step_tensor = rounding
        skey = step_key(seed, step if step_tensor is None else int(step_tensor.item()))
    n = len(params)
    with torch.no_grad():
        for k, emas in enumerate(emas_per_decay):
            weights = {}  # opmath dtype -> (lerp weight 1 - decay as lerp sees it, host value)
            for i, (p, e) in enumerate(zip(params, emas)):
                op = torch.float64 if e.dtype == torch.float64 else torch.float32
                if op not in weights:
                    if decay_tensor is None:  # a 0-d host tensor and its value
                        w = torch.tensor(1.0 - decays[k], dtype=op)
                        weights[op] = (w, w.item())
                    else:  # a device weight: selected on the device, no host sync
                        weights[op] = ((1.0 - decay_tensor.reshape(-1)[k].double()).to(op), None)
                w, host_w = weights[op]
                if host_w == 0.0:
                    continue  # decay 1: the EMA stays as it is
                target = e if e.dtype == op else e.to(op)
                src = p.to(op)
                if host_w is None:
                    new = torch.where(w == 1, src, torch.where(w == 0, target,
                                                               lerp(target, src, w)))
                elif host_w == 1.0:
                    new = src  # decay 0: a copy (lerp would keep a NaN EMA NaN)
                else:
                    new = lerp(target, src, w)
                if skey is not None:
                    new = stochastic_bf16(new, e, skey, k * n + i)
                if device_skip is not None:
                    new = torch.where(device_skip, target, new)
                e.copy_(new)
