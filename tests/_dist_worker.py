"""One rank of the distributed tests (tests/test_distributed.py starts two of these with a
torchrun-like environment: RANK, WORLD_SIZE, MASTER_ADDR=127.0.0.1, MASTER_PORT).

Phases, in one process group so that torch is imported once per rank:
  ddp     DDP model, FusedEMA on the wrapper, N steps; each rank saves its EMA.
  fsdp    fully_shard model, FusedEMA, N steps with a DCP checkpoint after step K and an
          eval forward under ema.swapped() after step K + 1; the gathered EMA is saved.
  resume  a fresh sharded model and EMA load the checkpoint of step K and train to N.
  kill    a second checkpoint where rank 1 exits (os._exit) after writing its data, before
          the checkpoint is finished; rank 0 records the error it gets.
Also usable as the single-process reference (imported by the test).
"""
import os
import sys
import traceback
from datetime import timedelta

import torch
import torch.nn.functional as F
from torch import nn

STEPS, CKPT_STEP, DECAY, LR, BATCH = 6, 3, 0.8, 0.1, 8


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.l2 = nn.Linear(16, 16)
        self.l3 = nn.Linear(16, 4)
        self.register_buffer("scale", torch.full((4,), 0.5))

    def forward(self, x):
        return self.l3(torch.tanh(self.l2(torch.tanh(self.norm(self.l1(x)))))) * self.scale


def make_model(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


def batch(step: int):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(BATCH, 8, generator=g), torch.randn(BATCH, 4, generator=g)


def train_step(model, opt, step: int, rank: int = 0, world: int = 1) -> None:
    x, y = batch(step)
    n = BATCH // world
    x, y = x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]
    opt.zero_grad()
    F.mse_loss(model(x), y).backward()
    opt.step()


def shard(model, mesh):
    from fused_ema.distributed import _fully_shard
    fully_shard = _fully_shard()
    for m in (model.l1, model.l2, model.l3):
        fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def main() -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    from fused_ema import FusedEMA
    from fused_ema import distributed as fdist

    out = sys.argv[1]
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    res = {}

    def save(name, obj):
        torch.save(obj, os.path.join(out, name))

    # ---------------------------------------------------------------- DDP
    from torch.nn.parallel import DistributedDataParallel as DDP
    model = DDP(make_model(0))
    ema = FusedEMA(model, decay=DECAY)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for step in range(STEPS):
        train_step(model, opt, step, rank, world)
        ema.update()
    save(f"ddp_rank{rank}.pt", {"ema": ema.state_dict(), "model": model.module.state_dict()})

    # ---------------------------------------------------------------- FSDP2
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (world,))
    model = shard(make_model(0), mesh)
    ema = FusedEMA(model, decay=DECAY)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    # the same EMA updated on a worker thread (issue 18): the optimizer's hooks queue it
    # and wait for it; swapped() below writes the model, so it is synchronized first
    ema_nb = FusedEMA(model, decay=DECAY, non_blocking=True)
    ema_nb.attach(opt)
    ema_params = dict(ema.module.named_parameters())
    res["types"] = {n: (type(p).__name__, type(ema_params[n]).__name__,
                        p.device_mesh == ema_params[n].device_mesh,
                        p.placements == ema_params[n].placements)
                    for n, p in model.named_parameters()}
    res["local_numel"] = fdist.local_numel(ema)
    res["total_numel"] = sum(p.numel() for p in ema.parameters())
    try:
        ema.module(torch.zeros(2, 8))
        res["forward_error"] = None
    except RuntimeError as exc:
        res["forward_error"] = str(exc)
    ckpt = os.path.join(out, "ckpt")
    for step in range(STEPS):
        train_step(model, opt, step, rank, world)
        ema.update()
        if step + 1 == CKPT_STEP:
            dcp.save({"model": model.state_dict(), "ema": ema.state_dict()},
                     checkpoint_id=os.path.join(ckpt, f"step_{step + 1:04d}"))
        if step + 1 == CKPT_STEP + 1:
            ema_nb.synchronize()  # the worker reads the weights swapped() writes
            before = [p.to_local().clone() for p in model.parameters()]
            x, _ = batch(99)
            with torch.no_grad():
                plain_out = model(x)
                with ema.swapped():
                    res["swapped_local_equal"] = all(
                        torch.equal(p.to_local(), e.to_local())
                        for p, e in zip(model.parameters(), ema.parameters()))
                    res["swapped_out"] = model(x)
                res["restored"] = all(torch.equal(p.to_local(), b)
                                      for p, b in zip(model.parameters(), before))
                res["after_swap_out"] = model(x)  # leaves the root's gathered params (FSDP2)
            res["plain_out"] = plain_out
    res["nonblocking_step"] = ema_nb.step
    res["nonblocking_equal"] = all(  # the local shards, bit for bit
        torch.equal(a.to_local(), b.to_local())
        for a, b in zip(ema.parameters(), ema_nb.parameters()))
    res["sharded_sd_types"] = sorted({type(v).__name__ for v in ema.state_dict()["emas"][0].values()})
    full = fdist.full_state_dict(ema)
    if rank == 0:
        save("fsdp_full.pt", full)
    else:
        assert full is None

    # ---------------------------------------------------------------- resume from step K
    model2 = shard(make_model(123), mesh)
    ema2 = FusedEMA(model2, decay=DECAY)
    opt2 = torch.optim.SGD(model2.parameters(), lr=LR)
    sd = {"model": model2.state_dict(), "ema": ema2.state_dict()}
    dcp.load(sd, checkpoint_id=fdist.latest_checkpoint(ckpt))
    model2.load_state_dict(sd["model"])
    ema2.load_state_dict(sd["ema"])
    res["resumed_step"] = ema2.step
    for step in range(CKPT_STEP, STEPS):
        train_step(model2, opt2, step, rank, world)
        ema2.update()
    full2 = fdist.full_state_dict(ema2)
    # the full (plain) state dict loads back into the sharded EMA
    bcast = [full2]
    dist.broadcast_object_list(bcast, src=0)
    ema3 = FusedEMA(shard(make_model(7), mesh), decay=DECAY)
    fdist.load_full_state_dict(ema3, bcast[0])
    res["full_roundtrip"] = all(torch.equal(a.to_local(), b.to_local())
                                for a, b in zip(ema2.parameters(), ema3.parameters()))
    if rank == 0:
        save("fsdp_resumed.pt", full2)

    save(f"res_rank{rank}.pt", res)
    dist.barrier()

    # ---------------------------------------------------------------- a rank dies mid-save
    class DyingWriter(FileSystemWriter):
        def write_data(self, plan, planner):
            fut = super().write_data(plan, planner)
            if rank == 1:
                fut.wait()
                os._exit(3)  # killed after writing its shards, before the checkpoint is done
            return fut

    try:
        dcp.save({"model": model.state_dict(), "ema": ema.state_dict()},
                 storage_writer=DyingWriter(os.path.join(ckpt, f"step_{STEPS:04d}")))
        err = "no error"
    except Exception as exc:  # rank 0: the peer is gone
        err = f"{type(exc).__name__}: {exc}"
    with open(os.path.join(out, f"kill_rank{rank}.txt"), "w") as f:
        f.write(err)
    os._exit(0)  # the process group is broken: no clean shutdown


if __name__ == "__main__":
    try:
        main()
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
