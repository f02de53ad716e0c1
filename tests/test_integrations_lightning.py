"""fused_ema.integrations.lightning against Lightning 2.6's EMAWeightAveraging: the same
Trainer runs with each, compared tensor by tensor, and checkpoints across the two."""
import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

pl = pytest.importorskip("lightning.pytorch")
from lightning.pytorch.callbacks import EMAWeightAveraging as TheirEMA  # noqa: E402

from fused_ema.integrations.lightning import EMAWeightAveraging  # noqa: E402

warnings.filterwarnings("ignore", ".*does not have many workers.*")


class Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 1))
        self.seen_in_validation = []
        self.ema_in_validation = []

    def training_step(self, batch, _):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch, _):
        self.seen_in_validation.append(self.net[0].weight.detach().clone())
        for cb in self.trainer.callbacks:
            if isinstance(cb, EMAWeightAveraging):
                self.ema_in_validation.append(cb.ema.module.net[0].weight.detach().clone())
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def _data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g)
    y = x.sum(1, keepdim=True) + 0.1 * torch.randn(n, 1, generator=g)
    ds = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(ds, batch_size=16, shuffle=False)


def _trainer(cb, tmp_path, **kw):
    args = dict(accelerator="cpu", devices=1, max_epochs=2, logger=False,
                enable_progress_bar=False, enable_model_summary=False,
                enable_checkpointing=False, default_root_dir=str(tmp_path), callbacks=[cb],
                num_sanity_val_steps=0)
    args.update(kw)
    return pl.Trainer(**args)


def _ema_state(cb):
    if isinstance(cb, EMAWeightAveraging):
        return cb.ema.module.state_dict()
    return {k[len("module."):]: v for k, v in cb._average_model.state_dict().items()
            if k.startswith("module.")}


@pytest.mark.parametrize("kw", [dict(decay=0.9), dict(decay=0.95, update_every_n_steps=2,
                                                       update_starting_at_step=3),
                                dict(decay=0.8, use_buffers=False)], ids=["plain", "every", "nobuf"])
def test_same_run_as_lightning(kw, tmp_path, engine):
    """Same training, each callback: the EMA weights agree (one ulp per update at most,
    accumulated over the run), the update count is the same, validation saw the EMA
    weights, and the model ends with the EMA weights."""
    runs = {}
    for name, cls in (("ours", EMAWeightAveraging), ("theirs", TheirEMA)):
        model, cb = Tiny(), cls(**kw)
        trainer = _trainer(cb, tmp_path / name, limit_val_batches=1)
        trainer.fit(model, _data(), _data(32, seed=1))
        runs[name] = (model, cb)
    (m_ours, ours), (m_theirs, theirs) = runs["ours"], runs["theirs"]
    assert ours.n_averaged == int(theirs._average_model.n_averaged)
    sd_ours, sd_theirs = _ema_state(ours), _ema_state(theirs)
    for k, v in sd_ours.items():
        if v.is_floating_point():
            torch.testing.assert_close(v, sd_theirs[k], rtol=2e-6, atol=1e-7, msg=k)
    # at the end of training the model holds the EMA weights (both callbacks)
    torch.testing.assert_close(m_ours.net[0].weight, ours.ema.module.net[0].weight,
                               rtol=0, atol=0)
    # validation ran with the EMA weights (the one after epoch 0, while training went on)
    assert len(m_ours.seen_in_validation) == 2
    assert torch.equal(m_ours.seen_in_validation[0], m_ours.ema_in_validation[0])
    torch.testing.assert_close(m_ours.seen_in_validation[0], m_theirs.seen_in_validation[0],
                               rtol=2e-6, atol=1e-7)


def test_checkpoints_across_callbacks(tmp_path):
    """Lightning's checkpoint resumes with ours and ours with Lightning's: the model, the
    EMA weights and the update count all come back."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    for first, second in ((TheirEMA, EMAWeightAveraging), (EMAWeightAveraging, TheirEMA)):
        d = tmp_path / first.__module__.split(".")[0]
        ck = ModelCheckpoint(dirpath=str(d), save_last=True)
        model, cb = Tiny(), first(decay=0.9)
        _trainer(cb, d, enable_checkpointing=True, callbacks=[cb, ck], max_epochs=1,
                 limit_val_batches=0).fit(model, _data())
        path = d / "last.ckpt"
        saved = torch.load(path, weights_only=False)
        ema_weights = _ema_state(cb)
        for k, v in saved["state_dict"].items():
            assert torch.equal(v, ema_weights[k]), k
        assert "current_model_state" in saved and "averaging_state" in saved
        model2, cb2 = Tiny(), second(decay=0.9)
        trainer = _trainer(cb2, d, max_epochs=1, limit_val_batches=0)
        trainer.fit(model2, _data(), ckpt_path=str(path))  # max_epochs reached: no training
        for k, v in _ema_state(cb2).items():
            assert torch.equal(v, ema_weights[k]), k
        n = cb2.n_averaged if isinstance(cb2, EMAWeightAveraging) else int(
            cb2._average_model.n_averaged)
        assert n == 6  # 96 samples / 16 per batch, one epoch


def test_bad_decay():
    with pytest.raises(ValueError, match="decay"):
        EMAWeightAveraging(decay=1.5)


def test_fsdp2_model_parallel_strategy(tmp_path):
    """Lightning's ModelParallelStrategy with the module sharded by FSDP2 in configure_model
    (2 CPU processes, gloo): the EMA holds DTensor shards (half the elements per rank), and
    matches a float64 EMA of the gathered weights after every step (Lightning's own callback
    does not support sharded models)."""
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        pytest.skip("no torch.distributed / gloo")
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lightning_fsdp_script.py")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("LOCAL_RANK", None)
    r = subprocess.run([sys.executable, script, str(tmp_path)], capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{i}.pt", weights_only=False) for i in range(2)]
    full = sum(v.numel() for v in ranks[0]["ema"].values())
    for out in ranks:
        assert out["sharded"] == "DTensor" and out["steps"] == 6
        assert out["local_numel"] < full  # shards, not a full copy
    ref = None
    for weights in ranks[0]["traj"]:  # the first update copies, then decay 0.8
        ref = ({k: v.double() for k, v in weights.items()} if ref is None
               else {k: 0.8 * ref[k] + 0.2 * v.double() for k, v in weights.items()})
    for k, v in ref.items():
        torch.testing.assert_close(ranks[0]["ema"][k].double(), v, rtol=1e-6, atol=1e-7)
        assert torch.equal(ranks[0]["ema"][k], ranks[1]["ema"][k])
