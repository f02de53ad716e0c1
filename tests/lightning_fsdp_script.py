"""Run by tests/test_integrations_lightning.py: Lightning's ModelParallelStrategy (FSDP2)
on 2 CPU processes with gloo, the LightningModule sharded in configure_model, trained
with fused_ema's EMAWeightAveraging. Each rank writes its EMA shards and the final model
shards (as full tensors gathered with DTensor.full_tensor) to OUT_DIR/rank{r}.pt."""
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import lightning.pytorch as pl  # noqa: E402
from lightning.pytorch.strategies import ModelParallelStrategy  # noqa: E402

from fused_ema.distributed import _fully_shard  # noqa: E402
from fused_ema.integrations.lightning import EMAWeightAveraging  # noqa: E402

OUT = sys.argv[1]
DECAY = 0.8


class Sharded(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(),
                                 nn.Linear(32, 1))
        self.traj = []

    def configure_model(self):
        fully_shard = _fully_shard()
        mesh = self.device_mesh["data_parallel"] if self.device_mesh.ndim > 1 else self.device_mesh
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def training_step(self, batch, _):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def on_train_batch_end(self, *args):
        self.traj.append({k: v.full_tensor().detach().clone()
                          for k, v in self.net.state_dict().items()})

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def main():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 6, generator=g)
    ds = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True).sin())
    model, cb = Sharded(), EMAWeightAveraging(decay=DECAY)
    start = {k: v.detach().clone() for k, v in model.net.state_dict().items()}
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
                         max_steps=6, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[cb])
    trainer.fit(model, torch.utils.data.DataLoader(ds, batch_size=8))
    ema = {k[len("net."):]: v.full_tensor() if hasattr(v, "full_tensor") else v
           for k, v in cb.ema.module.state_dict().items()}
    local = sum(t.to_local().numel() for t in cb.ema.parameters())
    torch.save({"ema": ema, "traj": model.traj, "start": start, "local_numel": local,
                "steps": cb.ema.step, "sharded": type(next(cb.ema.module.parameters())).__name__},
               os.path.join(OUT, f"rank{trainer.global_rank}.pt"))


if __name__ == "__main__":
    main()
