"""Hugging Face ``Trainer``: ``EMACallback``, a ``TrainerCallback`` that keeps a
``FusedEMA`` of the model, evaluates with it, saves it with every checkpoint and restores
it when training resumes.

>>> from fused_ema.integrations.transformers import EMACallback
>>> trainer = Trainer(model, args, train_dataset=..., eval_dataset=...,
...                   callbacks=[EMACallback(decay=0.999)])
>>> trainer.train()                       # or train(resume_from_checkpoint=True)

- Update: after each optimizer step (``on_step_end``; with gradient accumulation, once
  per accumulated step), one fused call.
- Evaluation during training (``eval_strategy`` steps or epoch) runs with the EMA weights:
  they are swapped into the model when the Trainer decides to evaluate and swapped back
  in ``on_evaluate``. For ``trainer.evaluate()`` outside ``train()``, use
  ``with callback.ema.swapped(): trainer.evaluate()``.
- Checkpoints: ``checkpoint-N/fused_ema.pt`` holds ``FusedEMA.state_dict()`` (weights,
  step counter, settings); it is deleted with its checkpoint by ``save_total_limit``.
- Resume: at ``on_train_begin`` with ``global_step > 0`` the EMA is loaded from
  ``<output_dir>/checkpoint-<global_step>/fused_ema.pt`` (where ``resume_from_checkpoint``
  points when it is ``True`` or a checkpoint of ``output_dir``), or from the directory given
  as ``resume_from=``; a missing file is an error (the EMA would silently restart), and
  ``resume_from=''`` starts a new EMA from the resumed model instead.
- At the end of training (``copy_at_end=True``) the EMA weights are copied into the model,
  so ``trainer.save_model()`` saves them.

Not a drop-in: transformers (5.23) has no EMA of its own, so this module replaces no
module and delegates nothing.
"""
import os
import warnings
from contextlib import ExitStack
from typing import Optional

import torch

from ..ema import FusedEMA

__all__ = ["EMACallback"]

FILENAME = "fused_ema.pt"

try:
    from transformers import TrainerCallback as _Callback
except ImportError:  # pragma: no cover - the class is unusable without transformers anyway
    _Callback = object


class EMACallback(_Callback):
    """Keeps an EMA of the Trainer's model. ``decay``, ``update_after_step``,
    ``update_every``, ``ema_dtype``, ``buffers``, ``device``, ``frozen``: as ``FusedEMA``'s.
    ``evaluate_with_ema``: evaluate with the EMA weights during training.
    ``copy_at_end``: copy the EMA into the model when training ends.
    ``resume_from``: a checkpoint directory to load the EMA from (default: found from the
    resumed ``global_step``; ``''``: start a new EMA from the resumed model)."""

    def __init__(self, decay=0.999, *, update_after_step: int = 0, update_every: int = 1,
                 ema_dtype: Optional[torch.dtype] = None, buffers: str = "copy",
                 device=None, frozen: str = "share", evaluate_with_ema: bool = True,
                 copy_at_end: bool = True, resume_from: Optional[str] = None):
        self._kwargs = dict(decay=decay, update_after_step=update_after_step,
                            update_every=update_every, ema_dtype=ema_dtype, buffers=buffers,
                            device=device, frozen=frozen)
        self.evaluate_with_ema = evaluate_with_ema
        self.copy_at_end = copy_at_end
        self.resume_from = resume_from
        self.ema: Optional[FusedEMA] = None
        self._swap: Optional[ExitStack] = None

    # ------------------------------------------------------------------ training

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.ema is None:
            self.ema = FusedEMA(model, **self._kwargs)
        if state.global_step > 0 and self.resume_from != "":  # resuming ('': a new EMA)
            folder = self.resume_from
            if folder is None:
                folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            path = os.path.join(folder, FILENAME)
            if not os.path.exists(path):
                raise FileNotFoundError(
                    f"fused_ema: resuming at step {state.global_step} but {path} does not exist; "
                    "pass EMACallback(resume_from=<checkpoint dir>) or start a new EMA with "
                    "resume_from=''")
            self.ema.load_state_dict(torch.load(path, map_location="cpu", weights_only=False))

    def on_step_end(self, args, state, control, **kwargs):
        self.ema.update()
        self._maybe_swap_in(control)

    def on_epoch_end(self, args, state, control, **kwargs):
        self._maybe_swap_in(control)

    def on_train_end(self, args, state, control, **kwargs):
        self._swap_out()
        if self.copy_at_end and self.ema is not None:
            self.ema.copy_to()

    # ------------------------------------------------------------------ evaluation

    def _maybe_swap_in(self, control) -> None:
        """The Trainer evaluates right after this callback when ``should_evaluate`` is set."""
        if self.evaluate_with_ema and control.should_evaluate and self._swap is None:
            self._swap = ExitStack()
            self._swap.enter_context(self.ema.swapped())

    def _swap_out(self) -> None:
        if self._swap is not None:
            swap, self._swap = self._swap, None
            swap.close()

    def on_evaluate(self, args, state, control, **kwargs):
        self._swap_out()

    # ------------------------------------------------------------------ checkpoints

    def on_save(self, args, state, control, **kwargs):
        self._swap_out()
        if self.ema is None or not state.is_world_process_zero:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if not os.path.isdir(folder):
            warnings.warn(f"fused_ema: no checkpoint folder {folder}; the EMA was not saved",
                          RuntimeWarning)
            return
        torch.save(self.ema.state_dict(), os.path.join(folder, FILENAME))
