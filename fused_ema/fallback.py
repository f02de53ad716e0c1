"""The pure-PyTorch path.

It runs wherever the compiled module is missing or ``FUSED_EMA_BACKEND=python`` is set,
and it is the reference the compiled paths are tested against. Its checks are
``validation``'s, whose messages are the compiled path's.
"""
from typing import Optional, Sequence

import torch

from . import validation


def multi_ema_update_(
    emas_per_decay: Sequence[Sequence[torch.Tensor]],
    params: Sequence[torch.Tensor],
    decays: Sequence[float],
    decay_tensor: Optional[torch.Tensor] = None,
    skip: Optional[torch.Tensor] = None,
    *,
    validated: bool = False,
) -> None:
    """``emas_per_decay[k][i].lerp_(params[i], 1 - decay_k)`` in fp32 (fp64 for fp64 EMAs),
    with the two ends exact as in ``csrc/ema_math.h``: decay 0 copies the param, decay 1
    leaves the EMA as it is (whatever either holds: NaN, inf, -0.0).

    ``decays`` are host floats, or ``decay_tensor`` holds them (one per list). Nothing is
    written when ``skip`` is non-zero.
    """
    num_decays = len(emas_per_decay)
    if not validated:
        validation.validate(emas_per_decay, params)
    device = params[0].device if params else None
    decays, decay_tensor, skipped, device_skip = validation.update_args(
        num_decays, decays, decay_tensor, skip, device)
    if skipped or not params:
        return
    with torch.no_grad():
        for k, emas in enumerate(emas_per_decay):
            weights = {}  # opmath dtype -> lerp weight (1 - decay) as lerp sees it
            for p, e in zip(params, emas):
                op = torch.float64 if e.dtype == torch.float64 else torch.float32
                if op not in weights:
                    if decay_tensor is None:
                        w = 1.0 - decays[k]
                        weights[op] = (w, torch.tensor(w, dtype=op).item())
                    else:  # a device weight: selected on the device, no host sync
                        weights[op] = ((1.0 - decay_tensor.reshape(-1)[k].double()).to(op), None)
                w, host_w = weights[op]
                if host_w == 0.0:
                    continue  # decay 1: the EMA stays as it is
                target = e if e.dtype == op else e.to(op)
                src = p.to(op)
                if host_w is None:
                    new = torch.where(w == 1, src, torch.where(w == 0, target,
                                                               target.lerp(src, w)))
                elif host_w == 1.0:
                    new = src  # decay 0: a copy (lerp would keep a NaN EMA NaN)
                else:
                    new = target.lerp(src, w)
                if device_skip is not None:
                    new = torch.where(device_skip, target, new)
                e.copy_(new)
