"""DDP and FSDP2 on CPU with gloo: two processes on 127.0.0.1 (tests/_dist_worker.py), checked
against a single-process FusedEMA (and a float64 loop) of the same model on the same data.

One pair of processes runs every phase (DDP, FSDP2 + DCP save, resume, a rank killed while
saving) so torch is imported once per rank; the tests below read what they wrote.
"""
import importlib.util
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

import fused_ema
from fused_ema import FusedEMA
from fused_ema import distributed as fdist

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TIMEOUT_S = 150


def _load_worker():
    path = os.path.join(HERE, "_dist_worker.py")
    spec = importlib.util.spec_from_file_location("_dist_worker", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


W = _load_worker()


def _fsdp_available() -> bool:
    try:
        fdist._fully_shard()
        import torch.distributed.checkpoint  # noqa: F401
        from torch.distributed.device_mesh import init_device_mesh  # noqa: F401
    except ImportError:
        return False
    return fdist._dtensor_type() is not None


pytestmark = [
    pytest.mark.skipif(not torch.distributed.is_available()
                       or not torch.distributed.is_gloo_available(), reason="this torch build has no torch.distributed / gloo"),
    pytest.mark.skipif(not _fsdp_available(),
                       reason="this torch has no FSDP2 (fully_shard), DTensor or DCP"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Starts the two ranks once (torchrun-like environment, loopback only) and waits."""
    out = str(tmp_path_factory.mktemp("dist"))
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               WORLD_SIZE="2", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    procs, logs = [], []
    for rank in range(2):
        log = open(os.path.join(out, f"rank{rank}.log"), "w")
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, os.path.join(HERE, "_dist_worker.py"),
                                       out], env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)),
                                      stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + TIMEOUT_S
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            codes.append(None)
    for p, c in zip(procs, codes):
        if c is None:
            p.kill()
            p.wait()
    for log in logs:
        log.close()
    text = "\n".join(f"--- rank {r} (exit {c}):\n"
                     + open(os.path.join(out, f"rank{r}.log")).read()[-4000:]
                     for r, c in enumerate(codes))
    # rank 1 kills itself (exit 3) in the middle of the last checkpoint; rank 0 exits 0
    if codes != [0, 3]:
        pytest.fail(f"the distributed workers failed (expected exits [0, 3], got {codes}):\n{text}")
    return out


def _load(out, name):
    return torch.load(os.path.join(out, name), weights_only=False)


@pytest.fixture(scope="module")
def reference():
    """The single-process run on the full batches: FusedEMA snapshots after each step and an
    independent float64 EMA of the parameters."""
    model = W.make_model(0)
    ema = FusedEMA(model, decay=W.DECAY)
    opt = torch.optim.SGD(model.parameters(), lr=W.LR)
    ema64 = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    snaps = {}
    for step in range(W.STEPS):
        W.train_step(model, opt, step)
        ema.update()
        with torch.no_grad():
            for n, p in model.named_parameters():
                ema64[n].mul_(W.DECAY).add_(p.double(), alpha=1 - W.DECAY)
        snaps[step + 1] = {k: v.clone() for k, v in ema.state_dict()["emas"][0].items()}
    return {"snaps": snaps, "ema64": ema64, "model": model}


def _assert_ema_close(got, want, atol=2e-6):
    assert sorted(got) == sorted(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=atol,
                                   msg=lambda m, k=k: f"{k}: {m}")


def test_reference_is_a_real_ema(reference):
    final = reference["snaps"][W.STEPS]
    for n, p in reference["model"].named_parameters():
        torch.testing.assert_close(final[n].double(), reference["ema64"][n], rtol=1e-6, atol=1e-6)
        # the EMA lags the weights: comparing against it can fail
        assert (final[n] - p.detach()).abs().max() > 1e-4, n
    assert final["scale"].eq(0.5).all()


def test_ddp_ema_equals_single_process_and_is_identical_on_both_ranks(run, reference):
    r0, r1 = _load(run, "ddp_rank0.pt"), _load(run, "ddp_rank1.pt")
    e0, e1 = r0["ema"]["emas"][0], r1["ema"]["emas"][0]
    assert all(not k.startswith("module.") for k in e0)
    for k in e0:
        assert torch.equal(e0[k], e1[k]), k  # no communication, yet bit-identical replicas
    assert r0["ema"]["step"] == W.STEPS
    _assert_ema_close(dict(e0), reference["snaps"][W.STEPS])


def test_fsdp_ema_is_sharded_like_the_params(run):
    for rank in range(2):
        res = _load(run, f"res_rank{rank}.pt")
        for name, (ptype, etype, same_mesh, same_placements) in res["types"].items():
            assert (ptype, etype, same_mesh, same_placements) == (
                "DTensor", "DTensor", True, True), name
        assert res["local_numel"] * 2 == res["total_numel"]  # every dim 0 is even
        assert "DTensor" in res["sharded_sd_types"]  # state_dict() is a sharded state dict


def test_fsdp_non_blocking_ema_equals_the_synchronous_one(run):
    """FusedEMA(non_blocking=True) attached to the FSDP2 optimizer: each rank's local
    shards updated on its worker thread, bit for bit the synchronous EMA's."""
    for rank in range(2):
        res = _load(run, f"res_rank{rank}.pt")
        assert res["nonblocking_step"] == W.STEPS
        assert res["nonblocking_equal"]


def test_fsdp_gathered_ema_equals_single_process(run, reference):
    full = _load(run, "fsdp_full.pt")
    assert full["step"] == W.STEPS
    assert all(type(v) is torch.Tensor for v in full["emas"][0].values())
    _assert_ema_close(dict(full["emas"][0]), reference["snaps"][W.STEPS])
    # the plain state dict loads into an unsharded FusedEMA
    ema = FusedEMA(W.make_model(5), decay=W.DECAY)
    ema.load_state_dict(full)
    assert ema.step == W.STEPS


def test_fsdp_swapped_and_forward_error(run, reference):
    res = _load(run, "res_rank0.pt")
    assert res["swapped_local_equal"] and res["restored"]
    # after the swap the model computes with its own weights again (gathered EMA dropped)
    assert torch.equal(res["after_swap_out"], res["plain_out"])
    # inside the swap it computes with the EMA of step CKPT_STEP + 1
    model = W.make_model(0)
    model.load_state_dict(reference["snaps"][W.CKPT_STEP + 1])
    x, _ = W.batch(99)
    with torch.no_grad():
        want = model(x)
    torch.testing.assert_close(res["swapped_out"], want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(res["swapped_out"], res["plain_out"], atol=1e-4)
    msg = res["forward_error"]
    assert msg and "ema.swapped()" in msg and "full_state_dict" in msg


def test_dcp_resume_with_two_ranks_continues_to_the_same_result(run):
    res = _load(run, "res_rank0.pt")
    assert res["resumed_step"] == W.CKPT_STEP
    assert res["full_roundtrip"]  # full_state_dict -> load_full_state_dict on the shards
    full, resumed = _load(run, "fsdp_full.pt"), _load(run, "fsdp_resumed.pt")
    assert resumed["step"] == W.STEPS
    for k, v in full["emas"][0].items():
        assert torch.equal(resumed["emas"][0][k], v), k


def _load_unsharded(path):
    import torch.distributed.checkpoint as dcp
    model = W.make_model(42)
    ema = FusedEMA(model, decay=W.DECAY)
    sd = {"model": model.state_dict(), "ema": ema.state_dict()}
    dcp.load(sd, checkpoint_id=path)  # no process group: one process reads every shard
    model.load_state_dict(sd["model"])
    ema.load_state_dict(sd["ema"])
    return model, ema


def test_dcp_saved_by_two_ranks_loads_in_one_process_and_training_continues(run, reference):
    path = os.path.join(run, "ckpt", f"step_{W.CKPT_STEP:04d}")
    model, ema = _load_unsharded(path)
    assert ema.step == W.CKPT_STEP
    _assert_ema_close(ema.state_dict()["emas"][0], reference["snaps"][W.CKPT_STEP])
    opt = torch.optim.SGD(model.parameters(), lr=W.LR)
    for step in range(W.CKPT_STEP, W.STEPS):
        W.train_step(model, opt, step)
        ema.update()
    full = _load(run, "fsdp_full.pt")
    _assert_ema_close(ema.state_dict()["emas"][0], dict(full["emas"][0]))


def test_killed_rank_leaves_the_last_completed_checkpoint_loadable(run, reference):
    import torch.distributed.checkpoint as dcp
    err = open(os.path.join(run, "kill_rank0.txt")).read()
    assert err != "no error"  # rank 0 saw its peer die while saving
    root = os.path.join(run, "ckpt")
    broken = os.path.join(root, f"step_{W.STEPS:04d}")
    assert os.path.isdir(broken) and not os.path.exists(os.path.join(broken, ".metadata"))
    last = fdist.latest_checkpoint(root)
    assert os.path.basename(last) == f"step_{W.CKPT_STEP:04d}"
    _, ema = _load_unsharded(last)
    _assert_ema_close(ema.state_dict()["emas"][0], reference["snaps"][W.CKPT_STEP])
    model = W.make_model(1)
    target = FusedEMA(model, decay=W.DECAY)
    # DCP's CheckpointException derives from BaseException
    with pytest.raises(BaseException, match="metadata"):
        dcp.load({"model": model.state_dict(), "ema": target.state_dict()}, checkpoint_id=broken)


def test_helpers_on_plain_models():
    model = W.make_model(0)
    ema = FusedEMA(model, decay=0.5)
    assert not fdist.is_sharded(model)
    assert fdist.local_numel(ema) == sum(p.numel() for p in model.parameters())
    full = fdist.full_state_dict(ema)  # no process group: rank 0, plain copies
    assert torch.equal(full["emas"][0]["l1.weight"], ema.module.l1.weight)
    fdist.reshard(model)  # no FSDP module: nothing happens
    assert fdist.latest_checkpoint("/nonexistent/fused_ema") is None
    assert fused_ema.distributed is fdist
