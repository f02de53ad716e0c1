"""fused_ema.integrations.transformers: the EMACallback in real Hugging Face Trainer runs
(transformers has no EMA of its own: the EMA is checked against a float64 reference of
the same trajectory, evaluation and checkpoints against what the Trainer did)."""
import shutil

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from fused_ema.integrations.transformers import FILENAME, EMACallback  # noqa: E402


class Regressor(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
        self.weights_seen_in_eval = []

    def forward(self, x, labels=None):
        if not self.training:
            self.weights_seen_in_eval.append(self.net[0].weight.detach().clone())
        out = self.net(x)
        loss = nn.functional.mse_loss(out, labels) if labels is not None else None
        return {"loss": loss, "logits": out}


class Rows(torch.utils.data.Dataset):
    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 4, generator=g)
        self.y = self.x.sum(1, keepdim=True).sin()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


class Trajectory(TrainerCallback):
    """Records the weights after every optimizer step (what the EMA must average)."""

    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.steps.append([p.detach().double().clone() for p in model.parameters()])


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=12,
                learning_rate=5e-2, eval_strategy="steps", eval_steps=6, save_steps=6,
                logging_steps=1000, report_to=[], use_cpu=True, seed=0,
                disable_tqdm=True, dataloader_num_workers=0)
    base.update(kw)
    return TrainingArguments(**base)


def _trainer(tmp_path, callbacks, model=None, **kw):
    model = model or Regressor()
    return Trainer(model=model, args=_args(tmp_path, **kw), train_dataset=Rows(96, 0),
                   eval_dataset=Rows(16, 1), callbacks=callbacks), model


def test_ema_matches_float64_reference_and_evaluates_with_it(tmp_path, engine):
    traj = Trajectory()
    cb = EMACallback(decay=0.8, copy_at_end=False)
    trainer, model = _trainer(tmp_path, [traj, cb])
    trainer.train()
    assert cb.ema.step == 12 == len(traj.steps)
    ref = [p.detach().double().clone() for p in Regressor().parameters()]  # the start
    refs = []
    for step in traj.steps:
        ref = [r * 0.8 + 0.2 * p for r, p in zip(ref, step)]
        refs.append([r.clone() for r in ref])
    for e, r in zip(cb.ema.parameters(), ref):
        torch.testing.assert_close(e.double(), r, rtol=1e-6, atol=1e-7)
    # the two evaluations (steps 6 and 12) ran with the EMA weights of that step
    seen = model.weights_seen_in_eval
    assert len(seen) == 4  # 16 eval rows / 8 per batch, twice
    torch.testing.assert_close(seen[0].double(), refs[5][0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(seen[2].double(), refs[11][0], rtol=1e-6, atol=1e-7)
    # and the model got its own weights back afterwards
    torch.testing.assert_close(model.net[0].weight.double(), traj.steps[-1][0], rtol=0, atol=0)


def test_checkpoint_resume_and_copy_at_end(tmp_path):
    """A run interrupted at step 6 and resumed from its checkpoint ends with the same EMA
    as the uninterrupted run; each checkpoint holds the EMA; at the end the model holds it."""
    cb_full = EMACallback(decay=0.7)
    trainer, model = _trainer(tmp_path / "full", [cb_full])
    trainer.train()
    full = [p.detach().clone() for p in cb_full.ema.parameters()]
    for p, e in zip(model.parameters(), full):
        assert torch.equal(p, e)  # copy_at_end
    for step in (6, 12):
        saved = torch.load(tmp_path / "full" / f"checkpoint-{step}" / FILENAME,
                           weights_only=False)
        assert saved["step"] == step

    # the same run, "interrupted" after step 6: its last checkpoint is checkpoint-6
    trainer, _ = _trainer(tmp_path / "part", [EMACallback(decay=0.7)])
    trainer.train()
    shutil.rmtree(tmp_path / "part" / "checkpoint-12")
    cb_b = EMACallback(decay=0.7)
    trainer, _ = _trainer(tmp_path / "part", [cb_b])
    trainer.train(resume_from_checkpoint=True)  # from checkpoint-6
    assert cb_b.ema.step == 12
    for a, b in zip(cb_b.ema.parameters(), full):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_resume_without_ema_file_is_an_error_unless_asked_for_a_new_ema(tmp_path):
    """No EMA in the checkpoint: an error that says to pass resume_from='', and that
    advice works: a new EMA starts from the resumed model and averages steps 7..12."""
    trainer, first = _trainer(tmp_path, [], max_steps=6)
    trainer.train()
    start = [p.detach().double().clone() for p in first.parameters()]  # = checkpoint-6
    trainer, _ = _trainer(tmp_path, [EMACallback(decay=0.9)])
    with pytest.raises(FileNotFoundError, match=f"{FILENAME}.*resume_from=''"):
        trainer.train(resume_from_checkpoint=True)
    traj = Trajectory()
    cb = EMACallback(decay=0.9, resume_from="", copy_at_end=False)
    trainer, _ = _trainer(tmp_path, [traj, cb])
    trainer.train(resume_from_checkpoint=True)
    assert cb.ema.step == 6 == len(traj.steps)
    ref = start
    for step in traj.steps:
        ref = [r * 0.9 + 0.1 * p for r, p in zip(ref, step)]
    for e, r in zip(cb.ema.parameters(), ref):
        torch.testing.assert_close(e.double(), r, rtol=1e-6, atol=1e-7)
