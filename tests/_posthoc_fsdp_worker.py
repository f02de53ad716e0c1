"""One rank of test_posthoc.py's FSDP2 test (two ranks, gloo on 127.0.0.1): a sharded model
with a PostHocEMA; each rank writes its own shards, synthesis returns DTensors, and rank 0
saves their gathered values for the test to compare with a one-process run."""
import os
import sys
from datetime import timedelta

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _dist_worker as W  # noqa: E402  (the model, batches and sharding of the DDP/FSDP tests)

from fused_ema import PostHocEMA  # noqa: E402

STEPS, EVERY = 12, 3


def main() -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    out = sys.argv[1]
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    model = W.shard(W.make_model(0), init_device_mesh("cpu", (world,)))
    ph = PostHocEMA(model, snapshot_every=EVERY, directory=os.path.join(out, "snaps"))
    opt = torch.optim.SGD(model.parameters(), lr=W.LR)
    for step in range(STEPS):
        W.train_step(model, opt, step, rank, world)
        ph.update()
    ph.flush()
    state = ph.synthesize(sigma_rel=0.07)
    types = {n: type(v).__name__ for n, v in state.items()}
    full = {n: (v.full_tensor() if hasattr(v, "full_tensor") else v).clone()
            for n, v in state.items()}
    local = {n: list(v.to_local().shape) for n, v in state.items() if hasattr(v, "to_local")}
    if rank == 0:
        torch.save({"full": full, "types": types, "local_shapes": local,
                    "files": sorted(os.listdir(os.path.join(out, "snaps"))),
                    "error": ph.last_synthesis.relative_error}, os.path.join(out, "result.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # Everything the test reads is written and the group is destroyed: leave without the
    # interpreter's teardown, where gloo's threads once aborted a rank under CI load
    # ("terminate called without an active exception", a known c10d/gloo exit race).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
