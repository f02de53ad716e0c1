"""The host-memory EMA's pipeline (csrc/offload.cpp: chunked device-to-host copies on a
side stream into bounded pinned staging, the CPU update per chunk on a worker thread),
driven by a fake CUDA runtime whose streams are queues (tests/fake_cuda/fake_offload.cpp).

The fake runs a stream's work only once what it waits on is done, as a GPU would, and
checks the two hazards as work runs (a copy before the optimizer's write to its source; the
next step's write before a copy from its memory); host waits are logged per thread. The
"device" tensors are host tensors the fake's copies read; the test's "optimizer" writes
them through the fake's training stream.
"""
import copy
import pathlib
import threading
import time

import pytest
import torch

from fused_ema import FusedEMA, _ext, binding

TRAIN = 1  # the fake's current stream: the training stream
ROOT = pathlib.Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(_ext._C is None, reason="needs the compiled CPU kernels")


@pytest.fixture(scope="module")
def module():
    import fake_cuda

    return fake_cuda.load()


@pytest.fixture
def fake(module):
    module.q_install()  # a fresh queued runtime; this thread is the training thread
    yield module
    assert module.q_drain() == 0, "work left waiting on a stream"
    errors = module.q_errors()
    module.q_uninstall()
    assert errors == []


def make(sizes, num_decays=1, dtype=torch.float32, ema_dtype=torch.float32, flat=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    if flat:  # params laid out back to back (adjacent device memory)
        buf = torch.randn(sum(sizes), generator=g).to(dtype)
        params = list(buf.split(list(sizes)))
    else:
        params = [torch.randn(n, generator=g).to(dtype) for n in sizes]
    emas = [[torch.randn(p.shape, generator=g).to(ema_dtype) for p in params]
            for _ in range(num_decays)]
    return params, emas


def values(params, step):
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=g).to(p.dtype) for p in params]


def offload(fake, params, emas, cap, chunk):
    return fake.HostOffload([e for es in emas for e in es], params, len(emas), 0,
                            cap_bytes=cap, chunk_bytes=chunk)


def expected(emas, vals, decays):
    """The same update through the compiled CPU op (the kernel the offload runs: same bits),
    also under FUSED_EMA_BACKEND=python."""
    out = [[e.clone() for e in es] for es in emas]
    torch.ops.fused_ema.multi_ema_update_([e for es in out for e in es], vals, decays,
                                          None, None)
    return out


def assert_equal(got, want):
    for a, b in zip(got, want):
        for x, y in zip(a, b):
            assert torch.equal(x, y)


def consume_on_a_thread(off, decays, fake=None):
    """``off.consume(decays)`` on a worker thread. With ``fake``: meanwhile a thread of
    the fake runs its streams continuously, as a GPU runs beside the host (a slot released
    before the host is done with it is then overwritten under it)."""
    out = {}

    def work():
        try:
            out["ran"] = off.consume(decays)
        except Exception as exc:  # noqa: BLE001
            out["error"] = exc

    t = threading.Thread(target=work)
    if fake is not None:
        fake.q_gpu_start()
    t.start()
    t.join(30)
    if fake is not None:
        fake.q_gpu_stop()
    assert not t.is_alive()
    return out


SIZES = (5, 1000, 70000, 3, 20000, 64)


def test_the_copies_follow_the_optimizers_writes(fake):
    params, emas = make(SIZES)
    off = offload(fake, params, emas, cap=1 << 20, chunk=1 << 20)
    vals = values(params, 0)
    want = expected(emas, vals, [0.5])
    held = fake.q_hold(TRAIN)  # the optimizer's kernels are still running at issue()
    for p, v in zip(params, vals):
        fake.q_write(TRAIN, p, v)
    off.issue(TRAIN)
    assert fake.q_counters()["d2h_copies"] > 0
    fake.q_release(held)
    assert consume_on_a_thread(off, [0.5]) == {"ran": True}
    assert_equal(emas, want)


@pytest.mark.parametrize("num_decays,dtype", [(1, torch.float32), (3, torch.bfloat16)])
def test_bounded_staging_and_the_next_step_after_the_copies(fake, num_decays, dtype):
    """Staging for 2 chunks, 5 or 6 chunks per update: later chunks wait (on
    the GPU) for the host to free a slot; the next optimizer step, queued while the
    worker is still at it, waits (on the GPU) for the last copy. Same bits as the update
    from each step's values."""
    params, emas = make(SIZES, num_decays, dtype)
    decays = [0.9, 0.5, 0.0][:num_decays]
    chunk = (16 << 10) * params[0].element_size()
    cap = 2 * chunk
    off = offload(fake, params, emas, cap=cap, chunk=chunk)
    assert off.num_slots == 2 and off.num_chunks > 2 * off.num_slots
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    for p, v in zip(params, values(params, 0)):
        fake.q_write(TRAIN, p, v)
    for step in range(6):
        fake.q_reset_counters()
        want = expected(emas, values(params, step), decays)
        off.issue(TRAIN)
        c = fake.q_counters()
        assert c["d2h_bytes"] == off.staged_bytes == param_bytes  # the params once
        # the training thread goes on: the next step's optimizer writes are queued now
        off.order_before_writes(TRAIN)
        for p, v in zip(params, values(params, step + 1)):
            fake.q_write(TRAIN, p, v)
        assert consume_on_a_thread(off, decays, fake) == {"ran": True}
        assert_equal(emas, want)
        c = fake.q_counters()
        assert c["training_host_waits"] == 0 and c["host_waits"] == off.num_chunks
        assert c["pinned_peak"] <= cap + 4 * off.num_slots + 8  # the cap plus the flags


def test_call_order_and_no_host_wait_on_the_training_thread(fake):
    params, emas = make(SIZES)
    off = offload(fake, params, emas, cap=128 << 10, chunk=64 << 10)
    fake.q_clear_calls()
    off.issue(TRAIN)
    off.order_before_writes(TRAIN)
    assert consume_on_a_thread(off, [0.5]) == {"ran": True}
    calls = fake.q_calls()
    training = [c[2:] for c in calls if c.startswith("T:")]
    worker = [c[2:] for c in calls if c.startswith("W:")]
    assert "sync_event" not in training
    # per chunk: a host wait for its copy, then (after its update) the slot's release
    assert worker == ["sync_event", "signal_host_value"] * off.num_chunks
    # an event after the optimizer, the side stream waits on it, then per chunk: the slot
    # gate, the copies, the chunk's event; at last the training stream's wait
    assert training[:2] == ["record_event", "wait_event"]
    assert training[2] == "wait_host_value" and training[-1] == "wait_event"
    assert training.count("wait_host_value") == off.num_chunks
    assert training.count("copy_to_host") == off.num_copies


def test_adjacent_tensors_are_one_copy_per_chunk(fake):
    params, emas = make(SIZES, flat=True)
    off = offload(fake, params, emas, cap=1 << 20, chunk=1 << 20)
    # 64-byte aligned offsets in the slot break adjacency only where a size is not a
    # multiple of 16 floats; the rest merge
    separate = offload(fake, *make(SIZES), cap=1 << 20, chunk=1 << 20)
    assert off.num_copies < separate.num_copies == len(SIZES)
    big = [4096, 8192, 65536, 16]
    one = offload(fake, *make(big, flat=True), cap=1 << 20, chunk=1 << 20)
    assert one.num_chunks == 1 and one.num_copies == 1
    for o in (off, separate, one):
        o.issue(TRAIN)
        assert consume_on_a_thread(o, [0.5]) == {"ran": True}


def test_skip_flag_on_the_device_and_a_bad_decay_release_the_slots(fake):
    params, emas = make(SIZES, seed=3)
    off = offload(fake, params, emas, cap=128 << 10, chunk=64 << 10)
    before = [[e.clone() for e in es] for es in emas]
    off.issue(TRAIN, torch.tensor(True))  # a GradScaler found inf
    assert consume_on_a_thread(off, [0.5]) == {"ran": False}
    assert_equal(emas, before)
    off.issue(TRAIN)
    out = consume_on_a_thread(off, [1.5])
    assert isinstance(out.get("error"), ValueError)  # checked before anything is written
    assert_equal(emas, before)
    want = expected(emas, [p.clone() for p in params], [0.25])
    off.issue(TRAIN, torch.tensor(False))  # the slots were all released: no deadlock
    assert consume_on_a_thread(off, [0.25]) == {"ran": True}
    assert_equal(emas, want)


def test_packing(module):
    sizes = [5, 1000, 70000, 3, 20000, 64, 1]
    chunk = 4096
    chunks = module.pack_offload_chunks(sizes, [4] * len(sizes), chunk)
    covered = {i: 0 for i in range(len(sizes))}
    for segments in chunks:
        end = 0
        for tensor, start, length, offset in segments:
            assert offset % 64 == 0 and offset >= end
            assert start == covered[tensor]  # in order, no gap, no overlap
            covered[tensor] += length
            end = offset + 4 * length
        assert end <= chunk
    assert covered == dict(enumerate(sizes))
    assert len(chunks) <= sum(sizes) * 4 // chunk + len(sizes)


# ---- FusedEMA(non_blocking=True) through the offload ------------------------------------
# The fake's "device" tensors are host tensors, so a CPU model stands for the CUDA model:
# binding.host_offload is pointed at the fake's HostOffload (a small cap: several chunks
# per slot), and the "optimizer" queues its writes on the fake's training stream, as a GPU
# optimizer's kernels are queued. Everything else is FusedEMA's own path: the binding's
# offloads, the worker, attach's hooks, the readers' waits.

OFFLOAD_CHUNK = 16 << 10
OFFLOAD_CAP = 2 * OFFLOAD_CHUNK


class QueuedWrites(torch.optim.Optimizer):
    """Step t writes ``values(params, t)`` into the params through the training stream."""

    def __init__(self, params, fake):
        super().__init__(params, {})
        self.fake, self.t = fake, 0

    def step(self, closure=None):
        self.t += 1
        ps = [p for g in self.param_groups for p in g["params"]]
        for p, v in zip(ps, values([p.detach().view(-1) for p in ps], self.t)):
            self.fake.q_write(TRAIN, p.detach().view(-1), v)


def offload_model(seed=0):
    torch.manual_seed(seed)
    # params of several chunks, a float buffer (a "copy" group), an integer one (staged
    # and copied by the worker)
    return torch.nn.Sequential(torch.nn.Linear(64, 300), torch.nn.BatchNorm1d(300),
                               torch.nn.Linear(300, 7))


@pytest.fixture
def through_fake(fake, monkeypatch):
    """FusedEMA's bindings with non_blocking=True use the fake's HostOffload."""
    made = []

    def factory(*args):
        off = fake.HostOffload(*args, cap_bytes=OFFLOAD_CAP, chunk_bytes=OFFLOAD_CHUNK)
        made.append(off)
        return off

    monkeypatch.setattr(binding, "host_offload", lambda *_: factory)
    return made


def train(opt, ref, ref_model, steps):
    """``steps`` optimizer steps; ``ref`` (synchronous, on ``ref_model``) sees each step's
    values written directly."""
    for _ in range(steps):
        opt.step()  # pre-step hook, the queued writes, the post-step hook's update
        with torch.no_grad():
            for p, v in zip(ref_model.parameters(),
                            values([p.view(-1) for p in ref_model.parameters()], opt.t)):
                p.view(-1).copy_(v)
        ref.update()


@pytest.mark.parametrize("decays", [(0.9,), (0.5, 0.99)])
def test_fused_ema_through_the_offload_same_bits_no_hazard(fake, through_fake, decays):
    model = offload_model()
    ref_model = copy.deepcopy(model)
    # a parameter copied, not averaged (copy=): the copy group, with zero decays
    ema = FusedEMA(model, decays=list(decays), non_blocking=True, copy=["2.bias"])
    ref = FusedEMA(ref_model, decays=list(decays), copy=["2.bias"])
    opt = QueuedWrites(model.parameters(), fake)
    ema.attach(opt)
    # the params through an offload per group (average, copy); the buffers (which the
    # forward writes) staged when the update is queued, on the training stream
    assert ema._binding.offload and len(through_fake) == 2
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    fake.q_reset_counters()
    fake.q_gpu_start()
    try:
        train(opt, ref, ref_model, steps=5)
        got = ema.state_dict()  # a reader: waits for the pending update
    finally:
        fake.q_gpu_stop()
    want = ref.state_dict()
    for k in range(len(decays)):
        for (name, a, _), (_, b, _) in zip(ema.named_pairs(k), ref.named_pairs(k)):
            assert torch.equal(a, b), name
    assert got["step"] == want["step"] == 5
    c = fake.q_counters()
    assert c["training_host_waits"] == 0
    assert c["d2h_bytes"] == 5 * param_bytes  # the averaged params once per update
    assert all(o.num_slots * o.slot_bytes <= OFFLOAD_CAP for o in through_fake)
    assert through_fake[0].num_chunks > through_fake[0].num_slots  # chunks wait for slots


def test_the_next_step_waits_on_the_stream_not_on_the_worker(fake, through_fake, monkeypatch):
    """attach's pre-step hook returns while the worker still updates from the staging (a
    slow worker here); the optimizer's writes wait on the training stream for the copies
    (the fake checks each write against the copies queued before it)."""
    issue, finished = binding.Binding.issue, threading.Event()

    def slow_issue(self, skip):
        consume = issue(self, skip)
        finished.clear()

        def slow(decays):
            time.sleep(0.3)  # the worker is slow: a hook that waited for it would see it end
            consume(decays)
            finished.set()

        return slow

    monkeypatch.setattr(binding.Binding, "issue", slow_issue)
    model = offload_model()
    ema = FusedEMA(model, decay=0.9, non_blocking=True)
    opt = QueuedWrites(model.parameters(), fake)
    ema.attach(opt)
    seen = []
    opt.register_step_pre_hook(lambda *_: seen.append(finished.is_set()))  # after ema's
    fake.q_gpu_start()
    try:
        for _ in range(3):
            fake.q_clear_calls()
            opt.step()
        ema.synchronize()
    finally:
        fake.q_gpu_stop()
    assert seen == [False, False, False]
    calls = [c for c in fake.q_calls() if c.startswith("T:")]
    # the hook's stream wait comes before this step's issue
    first_issue = calls.index("T:record_event")
    assert calls[:first_issue].count("T:wait_event") == 1
    assert "T:sync_event" not in calls


def test_a_bad_skip_flag_queues_nothing(fake, through_fake):
    model = offload_model()
    ema = FusedEMA(model, decay=0.9, non_blocking=True)
    before = [e.clone() for _, e, _ in ema.named_pairs()]
    with pytest.raises(ValueError, match="skip"):
        ema.update(skip=torch.zeros(2))  # FusedEMA's own check
    ema.synchronize()
    assert all(torch.equal(a, e) for a, (_, e, _) in zip(before, ema.named_pairs()))
    assert ema.step == 0
    off = through_fake[0]  # the offload's check, before it queues anything
    fake.q_clear_calls()
    with pytest.raises(ValueError, match="skip must hold one value"):
        off.issue(None, torch.zeros(2))
    assert fake.q_calls() == []
    off.issue(None, torch.tensor(False))  # nothing was left pending by the refused call
    assert consume_on_a_thread(off, [0.5]) == {"ran": True}


def test_a_param_given_new_storage_is_read_from_its_new_storage(fake, through_fake):
    """``p.data = ...`` between steps: FusedEMA's per-step check sees it before the
    offload would copy from the old storage, and binds again (new offloads)."""
    model = offload_model()
    ref_model = copy.deepcopy(model)
    ema = FusedEMA(model, decay=0.9, non_blocking=True)
    ref = FusedEMA(ref_model, decay=0.9)
    opt = QueuedWrites(model.parameters(), fake)
    ema.attach(opt)
    train(opt, ref, ref_model, steps=2)
    ema.synchronize()
    assert fake.q_drain() == 0
    for m in (model, ref_model):
        m[0].bias.data = torch.full_like(m[0].bias, 3.0)  # new storage, not written by opt
    ema.update()
    ref.update()
    ema.synchronize()
    assert len(through_fake) == 2  # bound again: a new offload
    for (name, a, _), (_, b, _) in zip(ema.named_pairs(), ref.named_pairs()):
        assert torch.equal(a, b), name



def test_bench_offload_counts_what_it_says(module, tmp_path):
    """benchmarks/bench_offload.py on small models and a small cap: its table is the
    counters' (a planted extra copy per update shows as a ratio above 1)."""
    import json
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_offload

    assert bench_offload.main(["--models", "tiny", "many_small", "--cap-mib", "1",
                               "--chunk-mib", "1", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "bench_offload.json").read_text())
    for row in record["rows"]:
        assert row["d2h_bytes_per_update"] == row["param_bytes"]
        assert row["pinned_peak"] <= (1 << 20) + 4 * row["slots"] + 8
        assert row["same_bits"] and row["fake_errors"] == []
    assert record["rows"][1]["chunks"] > record["rows"][1]["slots"] == 1
    assert "| 2000 x 1024 | 2000 |" in (tmp_path / "bench_offload.md").read_text()


def test_bench_offload_default_run_leaves_git_status_clean(module, tmp_path):
    from test_outputs import check_default_run

    check_default_run(tmp_path, "benchmarks/bench_offload.py", ["--models", "tiny", "--steps", "1"],
                      "bench_offload.md")
