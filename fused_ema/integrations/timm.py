"""timm: ``ModelEmaV3`` (and ``ModelEmaV2``) with timm's constructor, ``update(model, step)``,
``set()``, ``.module`` and checkpoints, the averaging fused into one call for all tensors.

>>> from fused_ema.integrations.timm import ModelEmaV3
>>> model_ema = ModelEmaV3(model, decay=0.9998, use_warmup=True)
>>> model_ema.update(model, step=num_updates)      # as timm's train.py

timm's ``CheckpointSaver(model, optimizer, model_ema=model_ema)`` saves
``state_dict_ema`` from ``.module`` and ``load_checkpoint(model, path, use_ema=True)``
reads it back, as with timm's own class (the EMA module's state_dict is the same).

Like timm 1.0: everything in the model's ``state_dict`` is averaged when floating point
and copied otherwise (``exclude_buffers=True``: parameters averaged, buffers copied);
``step=None`` uses ``decay`` without warmup. What differs: the update is the fused
``lerp`` (torch's CPU ``lerp_`` fuses a multiply-add, ours does not: within one ulp of the
operands per update, bit for bit with the pure-PyTorch fallback). A bfloat16 EMA with
``stochastic_rounding=True`` (timm's default for bf16 EMAs) is rounded stochastically
inside the fused kernel (``rounding="stochastic"``: computed in float32, no float32 copy,
no generator state): the random bits are keyed by ``stochastic_rounding_seed`` and the
``step`` given to ``update`` (else the count of updates), so a resumed run that passes
``step`` continues bit for bit. Not timm's random stream: equal in distribution, not bit
for bit. ``foreach`` is accepted and changes nothing (the update is always fused, also
for an EMA on another device).

``ModelEmaV2(model, decay, device)`` is ``ModelEmaV3`` without a schedule: ``decay`` at
every ``update(model)``, no stochastic rounding. What differs from timm's V2: integer
buffers are copied (timm's V2 averages them in float and truncates the result back), and
an EMA wider than the model (float64 of float32) is updated in its own dtype (timm's V2
rounds ``(1 - decay) * model`` in the model's).

A drop-in for the modules ``timm.utils.model_ema`` (1.0.31), where the EMA classes are
defined, and ``timm.utils``, where training scripts import them from: ``ModelEmaV2`` and
``ModelEmaV3`` are ours; every other public name of those modules (the deprecated
``ModelEma``, ``CheckpointSaver``, ``AverageMeter`` ...) is timm's own object, imported on
first use.
"""
from copy import deepcopy
from typing import Optional

import torch
from torch import nn

from . import _delegate, _pairs
from ..validation import check_unit

__all__ = ["ModelEmaV2", "ModelEmaV3"]
__getattr__, __dir__ = _delegate.delegate(__name__, ["timm.utils.model_ema", "timm.utils"],
                                          "timm==1.0.31")


class ModelEmaV3(nn.Module):
    """timm's ``ModelEmaV3`` (see the module docstring); the same arguments."""

    def __init__(
        self,
        model: nn.Module,
        decay: float = 0.9999,
        min_decay: float = 0.0,
        update_after_step: int = 0,
        use_warmup: bool = False,
        warmup_gamma: float = 1.0,
        warmup_power: float = 2 / 3,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
        stochastic_rounding: bool = True,
        stochastic_rounding_seed: int = 0,
        foreach: bool = True,
        exclude_buffers: bool = False,
    ):
        super().__init__()
        check_unit("decay", decay)
        check_unit("min_decay", min_decay)
        self.module = deepcopy(model)
        self.module.eval()
        self.decay = decay
        self.min_decay = min_decay
        self.update_after_step = update_after_step
        self.use_warmup = use_warmup
        self.warmup_gamma = warmup_gamma
        self.warmup_power = warmup_power
        self.foreach = foreach
        self.device = device
        self.dtype = dtype
        self.stochastic_rounding = stochastic_rounding
        self.stochastic_rounding_seed = stochastic_rounding_seed
        self.exclude_buffers = exclude_buffers
        if device is not None and device != next(model.parameters()).device:
            self.foreach = False  # as timm (informational here)
            self.module.to(device=device)
        if dtype is not None:
            self.module.to(dtype=dtype)
        self._lerp = _pairs.Lerp("ema tensors", "model tensors")
        self._sr_lerp = _pairs.Lerp("ema tensors", "model tensors", rounding="stochastic",
                                    seed=stochastic_rounding_seed)
        self._updates = 0  # the stochastic rounding's step when update() is given none

    def get_decay(self, step: Optional[int] = None) -> float:
        """The decay of the update at ``step`` (timm's schedule; ``None``: ``decay``)."""
        if step is None:
            return self.decay
        step = max(0, step - self.update_after_step - 1)
        if step <= 0:
            return 0.0
        if self.use_warmup:
            decay = 1 - (1 + step / self.warmup_gamma) ** -self.warmup_power
            return max(min(decay, self.decay), self.min_decay)
        return self.decay

    def _apply(self, lerp_e, lerp_m, copy_e, copy_m, decay: float, step: int) -> None:
        _pairs.check_pairs(lerp_e, lerp_m, "ema tensors", "model tensors")
        _pairs.check_pairs(copy_e, copy_m, "ema tensors", "model tensors")
        sr_e, sr_m, plain_e, plain_m = [], [], [], []
        for e, m in zip(lerp_e, lerp_m):
            if self.stochastic_rounding and e.dtype == torch.bfloat16:
                sr_e.append(e)
                sr_m.append(m)
            else:
                plain_e.append(e)
                plain_m.append(m)
        self._lerp(plain_e, plain_m, decay)
        if sr_e:
            self._sr_lerp(sr_e, [m.to(e.device) for e, m in zip(sr_e, sr_m)], decay, step)
        _pairs.copy_(copy_e, [m.to(e.device) for e, m in zip(copy_e, copy_m)],
                     "ema tensors", "model tensors")

    @torch.no_grad()
    def update(self, model: nn.Module, step: Optional[int] = None) -> None:
        """One update from ``model`` (matched by position in the state_dict, as timm)."""
        decay = self.get_decay(step)
        sr_step = self._updates if step is None else step
        self._updates += 1
        if self.exclude_buffers:
            self._apply(list(self.module.parameters()), list(model.parameters()),
                        list(self.module.buffers()), list(model.buffers()), decay, sr_step)
            return
        # keep_vars: the tensor objects themselves, the same at every step (the cached
        # plan is found by identity); the order is state_dict's, as timm pairs them
        ema_sd = list(self.module.state_dict(keep_vars=True).values())
        model_sd = list(model.state_dict(keep_vars=True).values())
        if len(ema_sd) != len(model_sd):
            raise ValueError(f"fused_ema: the model's state_dict has {len(model_sd)} entries, "
                             f"the EMA's {len(ema_sd)}")
        lerp_e, lerp_m, copy_e, copy_m = [], [], [], []
        for e, m in zip(ema_sd, model_sd):
            if e.is_floating_point():
                lerp_e.append(e)
                lerp_m.append(m)
            else:
                copy_e.append(e)
                copy_m.append(m)
        self._apply(lerp_e, lerp_m, copy_e, copy_m, decay, sr_step)

    @torch.no_grad()
    def set(self, model: nn.Module) -> None:
        """Copies the model's state_dict into the EMA."""
        ema_sd = list(self.module.state_dict().values())
        model_sd = [m.to(device=e.device) for e, m in zip(ema_sd, model.state_dict().values())]
        _pairs.check_pairs(ema_sd, model_sd, "ema tensors", "model tensors")
        for e, m in zip(ema_sd, model_sd):
            e.copy_(m)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


class ModelEmaV2(ModelEmaV3):
    """timm's ``ModelEmaV2`` (see the module docstring): every ``state_dict`` entry
    averaged with ``decay`` at every ``update(model)``; the EMA on ``device`` if given."""

    def __init__(self, model: nn.Module, decay: float = 0.9999,
                 device: Optional[torch.device] = None):
        super().__init__(model, decay=decay, device=device, stochastic_rounding=False)

    def update(self, model: nn.Module) -> None:
        super().update(model)
