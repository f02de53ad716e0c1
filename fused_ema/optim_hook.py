"""``FusedEMA.attach``: an optimizer step-post hook that updates the EMA, skipping the
steps a ``GradScaler`` skipped (read from its found-inf flag, on the device); with
``non_blocking=True`` also a step-pre hook that orders the optimizer's writes after the
queued update's reads of the parameters (a stream wait for a CUDA model's offload, else a
wait for the worker)."""
from typing import Optional

import torch


class Handle:
    """Returned by ``FusedEMA.attach``: ``remove()`` detaches the EMA from the optimizer."""

    def __init__(self, ema, optimizer, *handles):
        self._ema, self._optimizer, self._handles = ema, optimizer, handles

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._ema.synchronize()  # no later step waits for an update the hook queued
        self._ema._attached.pop(id(self._optimizer), None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def attach(ema, optimizer, scaler=None) -> Handle:
    """See ``FusedEMA.attach``."""
    if not hasattr(optimizer, "register_step_post_hook"):
        raise TypeError(f"fused_ema: attach needs a torch.optim.Optimizer, got "
                        f"{type(optimizer).__name__}")
    if scaler is not None and not hasattr(scaler, "_per_optimizer_states"):
        raise TypeError(f"fused_ema: scaler must be a torch.amp.GradScaler, got "
                        f"{type(scaler).__name__}")
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    ours = ema._averaged_sources()
    if not ours:
        raise ValueError("fused_ema: this EMA averages no parameter (every one has "
                         "requires_grad=False); call ema.update() where you need a copy")
    if not any(id(t) in held for _, t in ours):
        raise ValueError(
            "fused_ema: the optimizer holds none of the parameters this EMA averages "
            f"({len(ours)} tensors, e.g. '{ours[0][0]}'); "
            "attach the optimizer that trains the EMA's model")
    if id(optimizer) in ema._attached:
        raise RuntimeError("fused_ema: this EMA is already attached to this optimizer; "
                           "call handle.remove() first")

    def hook(opt, args, kwargs):
        skip = getattr(opt, "found_inf", None)
        if skip is None and scaler is not None:
            skip = scaler_found_inf(scaler, opt)
        ema.update(skip=skip)

    handles = [optimizer.register_step_post_hook(hook)]
    if ema.non_blocking:
        def before_step(opt, args, kwargs):
            ema._before_optimizer_step()

        handles.append(optimizer.register_step_pre_hook(before_step))
    handle = Handle(ema, optimizer, *handles)
    ema._attached[id(optimizer)] = handle
    return handle


def scaler_found_inf(scaler, optimizer) -> Optional[torch.Tensor]:
    """The scaler's found-inf for this optimizer's current step (None when it recorded none)."""
    if not getattr(scaler, "is_enabled", lambda: True)():
        return None
    states = getattr(scaler, "_per_optimizer_states", {})
    state = states.get(id(optimizer)) if id(optimizer) in states else None
    if not state:
        return None
    found = list(state.get("found_inf_per_device", {}).values())
    if not found:
        return None
    out = found[0]
    for f in found[1:]:
        out = out + f.to(out.device)
    return out
