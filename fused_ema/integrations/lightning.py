"""Lightning: ``EMAWeightAveraging``, a callback in the form of Lightning 2.6's, on
``FusedEMA`` (one fused update after each optimizer step; FSDP2 shards averaged locally).

>>> from fused_ema.integrations.lightning import EMAWeightAveraging
>>> trainer = Trainer(callbacks=[EMAWeightAveraging(decay=0.999)])

As Lightning's: the same constructor (``device``, ``use_buffers``, ``decay``,
``update_every_n_steps``, ``update_starting_at_step``, ``update_starting_at_epoch``) and
``should_update``; the first update copies the model, later ones average; validation runs
with the EMA weights (swapped in and out); the checkpoint's ``state_dict`` holds the EMA
weights, ``current_model_state`` the model's and ``averaging_state`` the ``n_averaged``
count, so checkpoints of either callback resume with the other; at the end of training
the EMA weights are copied into the model.

What differs: the update is ``ema.lerp_(param, 1 - decay)`` in one fused call (Lightning's
``AveragedModel`` computes ``decay * ema + (1 - decay) * param`` per tensor, one rounding
more: within one ulp of the operands per update). Integer buffers (BatchNorm's
``num_batches_tracked``) are copied, not averaged and truncated. Parameters with
``requires_grad=False`` are not averaged: the EMA module holds the model's own
(``FusedEMA``'s ``frozen="share"``: no memory, no work per step) or, with ``device=``
given, copies of them kept there (``frozen="copy"``; Lightning's ``AveragedModel`` holds a
full copy on that device). The EMA is built at
``on_fit_start``, after the strategy has moved and sharded the model, so a model sharded
with FSDP2 (``ModelParallelStrategy``, ``configure_model``) gets an EMA of its local
shards (Lightning's callback warns and keeps a full unsharded copy).

A drop-in for the modules ``lightning.pytorch.callbacks.weight_averaging`` (2.6.6), where
``EMAWeightAveraging`` is defined, and ``lightning.pytorch.callbacks``, where users import
it from: ``EMAWeightAveraging`` is ours; every other public name of those modules
(``WeightAveraging``, ``get_ema_avg_fn``, ``ModelCheckpoint`` ...) is Lightning's own
object, imported on first use.
"""
from contextlib import ExitStack
from typing import Any, Dict, Optional, Union

import torch

from . import _delegate
from ..ema import FusedEMA
from ..validation import check_unit

__all__ = ["EMAWeightAveraging"]
__getattr__, __dir__ = _delegate.delegate(
    __name__, ["lightning.pytorch.callbacks.weight_averaging", "lightning.pytorch.callbacks"],
    "lightning==2.6.6")


try:  # subclass Lightning's Callback when Lightning is installed (the Trainer checks it)
    from lightning.pytorch.callbacks.callback import Callback as _Callback
except ImportError:  # pragma: no cover - the class is unusable without Lightning anyway
    try:
        from pytorch_lightning.callbacks.callback import Callback as _Callback
    except ImportError:
        _Callback = object


class EMAWeightAveraging(_Callback):
    """Exponential moving average of the LightningModule's weights (see the module
    docstring). ``decay``: the EMA decay in [0, 1]; the other arguments as Lightning's."""

    def __init__(
        self,
        device: Optional[Union[torch.device, str, int]] = None,
        use_buffers: bool = True,
        decay: float = 0.999,
        update_every_n_steps: int = 1,
        update_starting_at_step: Optional[int] = None,
        update_starting_at_epoch: Optional[int] = None,
    ):
        check_unit("decay", decay)
        self._device = torch.device(device) if isinstance(device, str) else device
        self._use_buffers = use_buffers
        self.decay = decay
        self.update_every_n_steps = update_every_n_steps
        self.update_starting_at_step = update_starting_at_step
        self.update_starting_at_epoch = update_starting_at_epoch
        self.ema: Optional[FusedEMA] = None
        self._latest_update_step = 0
        self._latest_update_epoch = -1
        self._swap: Optional[ExitStack] = None
        self._pending: Optional[Dict[str, Any]] = None  # a checkpoint read before the EMA exists

    # ------------------------------------------------------------------ when to update

    def should_update(self, step_idx: Optional[int] = None,
                      epoch_idx: Optional[int] = None) -> bool:
        """Lightning's rule: after optimizer step ``step_idx`` (0-based) from
        ``update_starting_at_step`` every ``update_every_n_steps``; after epoch ``epoch_idx``
        from ``update_starting_at_epoch`` when that is set."""
        if step_idx is not None:
            starts = self.update_starting_at_step is None or step_idx >= self.update_starting_at_step
            every = self.update_every_n_steps > 0 and step_idx % self.update_every_n_steps == 0
            if starts and every:
                return True
        if epoch_idx is not None:
            if self.update_starting_at_epoch is not None and epoch_idx >= self.update_starting_at_epoch:
                return True
        return False

    # ------------------------------------------------------------------ the EMA

    def _build(self, pl_module) -> FusedEMA:
        if self.ema is None:
            device = self._device
            if isinstance(device, int):
                device = torch.device("cuda", device)
            # update_after_step=1: the first update copies the model (AveragedModel's
            # n_averaged == 0), the later ones average with `decay`
            self.ema = FusedEMA(pl_module, decay=self.decay, update_after_step=1,
                                buffers="average" if self._use_buffers else "copy",
                                device=device, frozen="share" if device is None else "copy")
            if self._pending is not None:
                self._load(self._pending, pl_module)
                self._pending = None
        return self.ema

    @property
    def n_averaged(self) -> int:
        return 0 if self.ema is None else self.ema.step

    def _update(self, pl_module) -> None:
        self._build(pl_module).update()

    # ------------------------------------------------------------------ hooks

    def on_fit_start(self, trainer, pl_module) -> None:
        self._build(pl_module)  # after the strategy moved (and sharded) the model

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step_idx = trainer.global_step - 1
        if trainer.global_step > self._latest_update_step and self.should_update(step_idx=step_idx):
            self._update(pl_module)
            self._latest_update_step = trainer.global_step

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if (trainer.current_epoch > self._latest_update_epoch
                and self.should_update(epoch_idx=trainer.current_epoch)):
            self._update(pl_module)
            self._latest_update_epoch = trainer.current_epoch

    def on_train_end(self, trainer, pl_module) -> None:
        if self.ema is not None:
            self.ema.copy_to()

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        if self.ema is not None and self._swap is None:
            self._swap = ExitStack()
            self._swap.enter_context(self.ema.swapped())

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self._swap is not None:
            swap, self._swap = self._swap, None
            swap.close()

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> Dict[str, Any]:
        return {"latest_update_step": self._latest_update_step}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self._latest_update_step = state_dict["latest_update_step"]

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: Dict[str, Any]) -> None:
        """The checkpoint's ``state_dict`` becomes the EMA weights (what inference loads),
        the model's goes to ``current_model_state`` (Lightning's layout)."""
        if self.ema is None:
            return
        checkpoint["current_model_state"] = checkpoint["state_dict"]
        checkpoint["state_dict"] = self.ema.module.state_dict()
        checkpoint["averaging_state"] = {"n_averaged": torch.tensor(self.ema.step)}

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: Dict[str, Any]) -> None:
        if self.ema is None:
            self._pending = checkpoint  # loaded when the EMA is built (on_fit_start)
            return
        self._load(checkpoint, pl_module)

    def _load(self, checkpoint: Dict[str, Any], pl_module) -> None:
        if "current_model_state" in checkpoint and "averaging_state" in checkpoint:
            n = checkpoint["averaging_state"].get("n_averaged", 0)
            n = int(n.item()) if isinstance(n, torch.Tensor) else int(n)
            self.ema.module.load_state_dict(checkpoint["state_dict"])
            pl_module.load_state_dict(checkpoint["current_model_state"])
            self.ema.step = n
        else:  # not written with weight averaging: both start from the model's weights
            self.ema.module.load_state_dict(checkpoint["state_dict"], strict=False)
