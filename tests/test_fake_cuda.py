"""The host side of the CUDA path (csrc/plan.cpp: plan cache, table upload, lifetime
under graph capture), driven by a fake CUDA runtime on CPU-only machines.

The real host code is compiled and linked with tests/fake_cuda/fake_cuda.cpp, whose
runtime keeps device memory in host blocks poisoned when freed, simulates streams,
events and graph capture, checks that every kernel reads a live table whose upload is
ordered before it, and counts runtime calls. A "kernel" updates the EMAs from the table
it reads (with the CPU kernel), so the values below also prove what it read.
"""
import os

import pytest
import torch

import fused_ema
from fused_ema import _ext

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

CAPACITY = 64  # PlanCache::kCapacity in csrc/plan.cpp
DEFAULT = 1    # the fake's default stream

pytestmark = pytest.mark.skipif(_ext._C is None, reason="needs the compiled CPU kernels")


@pytest.fixture(scope="module")
def fake():
    import fake_cuda

    module = fake_cuda.load()
    module.install()
    yield module
    module.uninstall()


@pytest.fixture(autouse=True)
def fresh(request):
    if "fake" not in request.fixturenames:
        yield
        return
    fake = request.getfixturevalue("fake")
    fake.set_stream(DEFAULT)
    fake.clear_plan_cache()
    fake.free_released_tables()
    fake.clear_errors()
    fake.reset_counters()
    yield
    assert fake.errors() == []


def tensors(n, seed, sizes=(1, 7, 70000)):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(sizes[i % len(sizes)], generator=g) for i in range(n)]
    emas = [torch.randn(p.shape, generator=g) for p in params]
    return emas, params


def expected_after(emas, params, decays):
    """The same updates through the compiled CPU path (bit-identical code)."""
    out = [e.clone() for e in emas]
    with torch.no_grad():
        for d in decays:
            fused_ema.ema_update_(out, params, d)
    return out


def equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def calls(fake, *names):
    c = fake.counters()
    return {n: c.get(n, 0) for n in names}


def test_functional_update_reads_its_table_from_device_memory(fake):
    emas, params = tensors(5, seed=0)
    want = expected_after(emas, params, [0.9, 0.5])
    fake.update(emas, params, [0.9])
    fake.update(emas, params, [0.5])
    assert equal(emas, want)
    assert calls(fake, "copy_to_device", "launch", "sync_event") == {
        "copy_to_device": 1, "launch": 2, "sync_event": 0}


def test_multi_decay_and_device_decay_and_skip(fake):
    _, params = tensors(3, seed=1)
    a, b = tensors(3, seed=2)[0], tensors(3, seed=3)[0]
    want_a, want_b = expected_after(a, params, [0.75]), expected_after(b, params, [0.25])
    fake.update(a + b, params, [], torch.tensor([0.75, 0.25], dtype=torch.float64))
    assert equal(a, want_a) and equal(b, want_b)
    before = [t.clone() for t in a]
    fake.update(a, params, [0.5], None, torch.tensor(True))
    assert equal(a, before)


def test_capture_evict_replay_reads_no_freed_memory(fake):
    """Issue 9 item 2: a graph must own the table it captured."""
    emas, params = tensors(3, seed=4)
    fake.update(emas, params, [0.5])  # warm-up: an eager table
    want = expected_after(emas, params, [0.25, 0.25])
    s = fake.new_stream()
    fake.begin_capture(s)
    fake.set_stream(s)
    fake.update(emas, params, [0.25])
    graph = fake.end_capture(s)
    fake.set_stream(DEFAULT)
    for i in range(CAPACITY + 6):  # evicts the captured list's plan
        fake.update(*tensors(1, seed=100 + i, sizes=(i + 1,)), [0.9])
    fake.replay(graph, s)
    fake.replay(graph, s)
    assert fake.errors() == []
    assert equal(emas, want)
    # The table is freed once the graph is gone, at the next call, without a sync.
    live = fake.live_device_blocks()
    fake.destroy_graph(graph)
    assert fake.num_released_tables() >= 1
    fake.update(emas, params, [0.5])
    assert fake.num_released_tables() == 0
    assert fake.live_device_blocks() < live + 1  # the released one went, a new one came
    # One host wait in all: the capture waited for the warm-up's upload.
    assert calls(fake, "sync_event")["sync_event"] == 1


def test_evicted_list_can_be_captured_again(fake):
    """Issue 9 item 3: a list warmed up, then evicted, is captured (with a graph-owned table)."""
    emas, params = tensors(4, seed=5)
    want = expected_after(emas, params, [0.9, 0.9, 0.5, 0.5])  # in the order they run
    fake.update(emas, params, [0.9])
    for i in range(CAPACITY + 1):
        fake.update(*tensors(1, seed=200 + i, sizes=(i + 2,)), [0.9])
    s = fake.new_stream()
    fake.begin_capture(s)
    fake.set_stream(s)
    fake.update(emas, params, [0.5])
    fake.update(emas, params, [0.5])  # same capture, same table
    graph = fake.end_capture(s)
    # warm-up, the evicting lists, and one copy captured for both updates
    assert calls(fake, "copy_to_device")["copy_to_device"] == 1 + (CAPACITY + 1) + 1
    fake.set_stream(DEFAULT)
    fake.update(emas, params, [0.9])  # the captured copy has not run: a table of its own
    fake.replay(graph, s)
    assert equal(emas, want)
    fake.destroy_graph(graph)


def test_first_call_inside_capture_works(fake):
    emas, params = tensors(2, seed=6)
    want = expected_after(emas, params, [0.5, 0.5])
    s = fake.new_stream()
    fake.begin_capture(s)
    fake.set_stream(s)
    fake.update(emas, params, [0.5])
    graph = fake.end_capture(s)
    assert equal(emas, tensors(2, seed=6)[0])  # captured work does not run
    fake.replay(graph, s)
    fake.replay(graph, s)
    assert equal(emas, want)
    fake.destroy_graph(graph)


def test_thrashing_more_than_eight_lists_needs_no_upload_or_sync(fake):
    """Issue 9 item 3: 20 lists in turn: in steady state no allocation, copy, free or sync."""
    lists = [tensors(2, seed=300 + i, sizes=(i + 3, 5)) for i in range(20)]
    for _ in range(2):
        for emas, params in lists:
            fake.update(emas, params, [0.9])
    fake.reset_counters()
    for _ in range(3):
        for emas, params in lists:
            fake.update(emas, params, [0.9])
    c = fake.counters()
    assert c.get("launch") == 60
    for name in ("alloc_device", "alloc_pinned", "copy_to_device", "free_device", "free_pinned",
                 "record_event", "wait_event", "sync_event"):
        assert c.get(name, 0) == 0, (name, c)


def test_beyond_the_cache_every_upload_is_stream_ordered(fake):
    """More lists than the cache holds: each call uploads, but never waits for the device."""
    lists = [tensors(1, seed=400 + i, sizes=(i + 1,)) for i in range(CAPACITY + 16)]
    want = [expected_after(e, p, [0.9, 0.9]) for e, p in lists]
    fake.reset_counters()
    for _ in range(2):
        for emas, params in lists:
            fake.update(emas, params, [0.9])
    c = fake.counters()
    assert c.get("copy_to_device") == 2 * len(lists)
    assert c.get("sync_event", 0) == 0 and c.get("wait_event", 0) == 0
    assert all(equal(e, w) for (e, _), w in zip(lists, want))


def test_another_stream_waits_for_the_upload_once(fake):
    emas, params = tensors(3, seed=7)
    plan = fake.Plan(emas, params, 1)  # uploaded on the default stream
    want = expected_after(emas, params, [0.9, 0.8, 0.7])
    s = fake.new_stream()
    fake.set_stream(s)
    fake.reset_counters()
    for d in (0.9, 0.8, 0.7):
        plan.update([d])
    assert calls(fake, "wait_event", "record_stream", "sync_event", "copy_to_device") == {
        "wait_event": 1, "record_stream": 1, "sync_event": 0, "copy_to_device": 0}
    assert equal(emas, want)
    del plan  # freed: the fake checks the allocator was told about stream s


def test_a_plan_on_another_device_names_its_device_in_every_call(fake):
    # A plan for cuda:1 built and updated while cuda:0 is current (the fake's current
    # stream stands for device 0's): every runtime call that acts on a device must name
    # device 1, or the upload's pinned staging is recorded against device 0's stream.
    emas, params = tensors(3, seed=9)
    want = expected_after(emas, params, [0.9, 0.8])
    fake.reset_counters()
    plan = fake.Plan(emas, params, 1, device=1)
    for d in (0.9, 0.8):
        plan.update([d])
    seen = fake.devices()
    assert {"current_stream", "alloc_device", "copy_to_device", "record_event"} <= set(seen)
    assert {call: sorted(set(devs)) for call, devs in seen.items()} == {
        call: [1] for call in seen}
    assert equal(emas, want)


def test_bound_plan_captured_on_another_stream_outlives_the_plan(fake):
    emas, params = tensors(3, seed=8)
    plan = fake.Plan(emas, params, 1)
    want = expected_after(emas, params, [0.5, 0.5])
    s = fake.new_stream()
    fake.begin_capture(s)
    fake.set_stream(s)
    plan.update([0.5])
    graph = fake.end_capture(s)
    # Captured work does not wait for the earlier upload: the host waited once instead.
    assert calls(fake, "sync_event", "retain_in_graph") == {"sync_event": 1, "retain_in_graph": 1}
    del plan
    fake.replay(graph, s)
    fake.replay(graph, s)
    assert equal(emas, want)
    fake.destroy_graph(graph)
    fake.set_stream(DEFAULT)
    fake.update(*tensors(1, seed=9), [0.5])  # frees the released table
    assert fake.num_released_tables() == 0


def test_a_layout_change_is_a_new_plan(fake):
    """TensorKey includes the strides: the same storage, shape and contiguity (none) in
    another dense layout gets another plan."""
    p = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)
    e = p.clone() + 1
    fake.update([e], [p], [0.5])
    for t in (e, p):
        t.set_(t.untyped_storage(), 0, t.shape, (60, 20, 1, 4))
    want = expected_after([e], [p], [0.5])
    fake.update([e], [p], [0.5])
    assert equal([e], want)
    assert calls(fake, "copy_to_device")["copy_to_device"] == 2


def test_two_captures_before_any_eager_call(fake):
    """A table copied inside one capture serves that capture only."""
    emas, params = tensors(2, seed=10)
    want = expected_after(emas, params, [0.5])
    graphs = []
    for _ in range(2):
        s = fake.new_stream()
        fake.begin_capture(s)
        fake.set_stream(s)
        fake.update(emas, params, [0.5])
        graphs.append((fake.end_capture(s), s))
    fake.set_stream(DEFAULT)
    graph, s = graphs[1]
    fake.replay(graph, s)  # the second graph alone: it copies its own table
    assert equal(emas, want)
    for graph, _ in graphs:
        fake.destroy_graph(graph)


def test_released_tables_are_freed_outside_capture_only(fake):
    emas, params = tensors(2, seed=11)
    s = fake.new_stream()
    fake.begin_capture(s)
    fake.set_stream(s)
    fake.update(emas, params, [0.5])
    first = fake.end_capture(s)
    fake.destroy_graph(first)
    released = fake.num_released_tables()
    assert released >= 1
    fake.begin_capture(s)
    fake.update(emas, params, [0.5])  # inside another capture: nothing is freed
    second = fake.end_capture(s)
    assert fake.num_released_tables() == released
    fake.set_stream(DEFAULT)
    fake.update(emas, params, [0.5])
    assert fake.num_released_tables() == 0
    fake.destroy_graph(second)


def test_host_side_never_syncs_or_mallocs():
    """The CUDA host code has no raw allocation, free or synchronisation left to call."""
    forbidden = ("cudaMalloc(", "cudaFree(", "cudaStreamSynchronize", "cudaDeviceSynchronize",
                 "cudaMemcpy(", "cudaMallocHost", "cudaHostAlloc")
    for name in ("ema_cuda.cu", "plan.cpp", "offload.cpp"):
        with open(os.path.join(ROOT, "csrc", name)) as f:
            text = f.read()
        for word in forbidden:
            assert word not in text, (name, word)
