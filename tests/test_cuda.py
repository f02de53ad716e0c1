"""The CUDA kernel against the float64 reference and the fallback.

Skipped without a CUDA device; run it wherever one is present.
"""
import pytest
import torch

import fused_ema
from fused_ema import EMAPlan, _ext, ema_update_, multi_ema_update_

from test_engine import CHUNK, DTYPES, make, reference, tolerances, with_fallback

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or _ext._C is None or not _ext._C.compiled_with_cuda(),
    reason="needs a CUDA device and fused_ema built with its CUDA kernels")

SIZES = [0, 1, 3, 7, 8, 9, 1000, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5]


def cuda(tensors, offset=0):
    """Copies to the GPU, each `offset` elements into its own buffer (unaligned for offset > 0)."""
    return [torch.cat([torch.zeros(offset, dtype=t.dtype), t]).cuda()[offset:] for t in tensors]


def test_backend_is_cuda():
    assert fused_ema.backend(torch.zeros(1, device="cuda")) == "cuda"


@pytest.mark.parametrize("param_dtype", DTYPES)
@pytest.mark.parametrize("ema_dtype", DTYPES)
@pytest.mark.parametrize("offset", [0, 1, 3])
def test_dtype_matrix(param_dtype, ema_dtype, offset):
    emas, params = make(SIZES, param_dtype, ema_dtype, offset=offset)
    expected = [reference(e, p, 0.9) for e, p in zip(emas, params)]
    from_fallback = with_fallback(emas, params, 0.9)
    emas, params = cuda(emas, offset), cuda(params, offset)
    ema_update_(emas, params, 0.9)
    for e, ref, fb in zip(emas, expected, from_fallback):
        torch.testing.assert_close(e.double().cpu(), ref, **tolerances(ema_dtype))
        torch.testing.assert_close(e.cpu(), fb, **tolerances(ema_dtype))


def test_decay_zero_and_one_are_exact():
    for dtype in DTYPES:
        emas, params = make([1, 5, CHUNK + 7], torch.bfloat16, dtype, offset=1)
        emas, params = cuda(emas), cuda(params)
        before = [e.clone() for e in emas]
        ema_update_(emas, params, 1.0)
        assert all(torch.equal(a, b) for a, b in zip(emas, before))
        ema_update_(emas, params, 0.0)
        assert all(torch.equal(e, p.float().to(dtype)) for e, p in zip(emas, params))


def test_many_tiny_tensors_one_launch():
    g = torch.Generator().manual_seed(1)
    sizes = torch.randint(0, 6, (10000,), generator=g).tolist()
    emas, params = make(sizes, torch.float32, torch.float32)
    expected = [reference(e, p, 0.99) for e, p in zip(emas, params)]
    emas, params = cuda(emas), cuda(params)
    plan = EMAPlan(emas, params)
    plan.update_(0.99)  # warm-up outside the profiler
    for e, ref in zip(emas, expected):
        torch.testing.assert_close(e.double().cpu(), ref, **tolerances(torch.float32))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        plan.update_(0.99)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert len(kernels) == 1, [k.name for k in kernels]


def test_tensor_decay_and_skip_on_device_without_sync():
    emas, params = make([3, CHUNK + 1], torch.float32, torch.float32)
    emas, params = cuda(emas), cuda(params)
    by_float = [e.clone() for e in emas]
    ema_update_(by_float, params, 0.875)
    before = [e.clone() for e in emas]
    decay = torch.tensor(0.875, device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        ema_update_(emas, params, decay, skip=torch.tensor(True, device="cuda"))
        torch.cuda.synchronize()
        assert all(torch.equal(a, b) for a, b in zip(emas, before))
        ema_update_(emas, params, decay, skip=torch.tensor(0.0, device="cuda"))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.equal(a, b) for a, b in zip(emas, by_float))


def test_cuda_graph_capture():
    emas, params = make([3, 1000, CHUNK + 3], torch.bfloat16, torch.float32, offset=1)
    emas, params = cuda(emas), cuda(params)
    expected = [e.double() for e in emas]
    decay = torch.tensor(0.5, device="cuda")
    skip = torch.tensor(False, device="cuda")
    plan = EMAPlan(emas, params)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        ema_update_(emas, params, decay, skip=skip)  # warm-up builds the cached plan
    torch.cuda.current_stream().wait_stream(stream)
    expected = [0.5 * r + 0.5 * p.double() for r, p in zip(expected, params)]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        plan.update_(decay, skip=skip)
        ema_update_(emas, params, decay, skip=skip)
    for d, s in [(0.5, False), (0.25, True), (0.75, False)]:
        decay.fill_(d)
        skip.fill_(s)
        graph.replay()
        if not s:
            for _ in range(2):
                expected = [d * r + (1 - d) * p.double() for r, p in zip(expected, params)]
    torch.cuda.synchronize()
    for e, ref in zip(emas, expected):
        torch.testing.assert_close(e.double(), ref, rtol=1e-5, atol=1e-5)


def test_first_call_inside_capture_works():
    emas, params = make([10, CHUNK + 1], torch.float32, torch.float32, seed=3)
    expected = [reference(reference(e, p, 0.5).float(), p, 0.5) for e, p in zip(emas, params)]
    emas, params = cuda(emas), cuda(params)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # the plan's table is uploaded inside the graph
        ema_update_(emas, params, 0.5)
    graph.replay()
    graph.replay()
    torch.cuda.synchronize()
    for e, ref in zip(emas, expected):
        torch.testing.assert_close(e.double().cpu(), ref, **tolerances(torch.float32))


def thrash(count, seed=100):
    """Updates `count` other tensor lists once each (evicting cached plans)."""
    for i in range(count):
        e, p = make([i + 1], torch.float32, torch.float32, seed=seed + i)
        ema_update_(cuda(e), cuda(p), 0.9)


def test_captured_graph_keeps_its_table_after_eviction():
    """Issue 9 item 2: replay after the plan was evicted reads a live table."""
    emas, params = make([3, 1000, CHUNK + 3], torch.float32, torch.float32, seed=5)
    expected = emas
    for _ in range(3):
        expected = [reference(e, p, 0.5).float() for e, p in zip(expected, params)]
    emas, params = cuda(emas), cuda(params)
    decay = torch.tensor(0.5, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        ema_update_(emas, params, decay)  # warm-up: the plan and its table
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ema_update_(emas, params, decay)
    thrash(80)  # more lists than the plan cache holds
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    thrash(80, seed=1000)  # reuses freed memory
    graph.replay()
    graph.replay()
    torch.cuda.synchronize()
    for e, ref in zip(emas, expected):
        torch.testing.assert_close(e.double().cpu(), ref.double(), **tolerances(torch.float32))
    del graph
    thrash(1)  # frees the released table


def test_many_lists_in_turn_allocate_no_new_device_memory():
    """Issue 9 item 3: past warm-up, cycling lists (more than the cache holds, too) makes
    no cudaMalloc (the caching allocator's segment count stays put) and no sync."""
    lists = [[cuda(t) for t in make([i + 1, 7], torch.float32, torch.float32, seed=i)]
             for i in range(80)]
    for _ in range(2):
        for emas, params in lists:
            ema_update_(emas, params, 0.9)
    torch.cuda.synchronize()
    segments = torch.cuda.memory_stats()["segment.all.allocated"]
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            for emas, params in lists:
                ema_update_(emas, params, 0.9)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert torch.cuda.memory_stats()["segment.all.allocated"] == segments


def test_plan_used_on_another_stream_right_after_building():
    emas, params = make([5, CHUNK + 2], torch.float32, torch.float32, seed=7)
    expected = [reference(e, p, 0.25) for e, p in zip(emas, params)]
    emas, params = cuda(emas), cuda(params)
    torch.cuda.synchronize()
    plan = EMAPlan(emas, params)  # upload ordered on the current stream
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):  # no wait_stream: the plan orders s after its upload
        plan.update_(0.25)
    torch.cuda.synchronize()
    for e, ref in zip(emas, expected):
        torch.testing.assert_close(e.double().cpu(), ref, **tolerances(torch.float32))


@pytest.mark.parametrize("dtype", DTYPES)
def test_channels_last(dtype):
    param = torch.randn(4, 6, 5, 3, dtype=torch.float32).to(dtype)
    ema = torch.randn(4, 6, 5, 3).to(dtype)
    expected = reference(ema, param, 0.9)
    param = param.cuda().to(memory_format=torch.channels_last)
    ema = ema.cuda().to(memory_format=torch.channels_last)
    ema_update_([ema], [param], 0.9)
    torch.testing.assert_close(ema.double().cpu(), expected, **tolerances(dtype))


def test_misaligned_cuda_tensor_is_rejected():
    storage = torch.zeros(64, dtype=torch.uint8, device="cuda").untyped_storage()
    t = torch.empty(0, device="cuda")
    t.set_(storage[1:33], 0, (8,), (1,))
    with pytest.raises(ValueError, match=r"params\[0\] starts at address .* not a multiple"):
        ema_update_([torch.zeros(8, device="cuda")], [t], 0.5)


def test_multi_decay_equals_separate_updates():
    _, params = make([1, 3, CHUNK + 9], torch.bfloat16, torch.bfloat16, offset=1)
    params = cuda(params)
    lists = [cuda(make([p.numel() for p in params], torch.float32, dt, seed=k)[0])
             for k, dt in enumerate([torch.float32, torch.bfloat16, torch.float64])]
    separate = [[e.clone() for e in emas] for emas in lists]
    for emas, d in zip(separate, [0.5, 0.9, 0.999]):
        ema_update_(emas, params, d)
    multi_ema_update_(lists, params, torch.tensor([0.5, 0.9, 0.999], dtype=torch.float64,
                                                  device="cuda"))
    for got, want in zip(lists, separate):
        assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_ema_on_cpu_for_cuda_params_gets_a_hint():
    with pytest.raises(ValueError, match=r"emas\[0\] is on cpu but params\[0\] is on cuda.*device="):
        ema_update_([torch.zeros(3)], [torch.zeros(3, device="cuda")], 0.5)


def test_non_default_stream():
    emas, params = make([CHUNK + 1], torch.float32, torch.float32)
    expected = [reference(e, p, 0.5) for e, p in zip(emas, params)]
    emas, params = cuda(emas), cuda(params)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        ema_update_(emas, params, 0.5)
    torch.cuda.current_stream().wait_stream(s)
    torch.testing.assert_close(emas[0].double().cpu(), expected[0], **tolerances(torch.float32))


def test_torch_compile_on_cuda():
    model = torch.nn.Linear(16, 8).cuda()
    params = list(model.parameters())
    ema = [p.detach().clone() for p in params]

    @torch.compile(fullgraph=True)
    def step(decay):
        ema_update_(ema, params, decay)

    step(torch.tensor(0.0, device="cuda"))
    assert all(torch.equal(e, p) for e, p in zip(ema, params))


def test_stochastic_rounding_matches_the_cpu_kernel_and_replays_in_a_graph():
    """The CUDA kernels' stochastic rounding gives the CPU kernel's bits (one and three
    decays, odd sizes, offset views); captured with the step on the device, each replay
    reads the step it is given."""
    from fused_ema import fallback
    gen = torch.Generator().manual_seed(0)
    sizes = [1, 3, 1000, CHUNK + 3, 3 * CHUNK + 7]
    params = [torch.randn(n + 1, generator=gen)[1:] for n in sizes]
    emas = [[torch.randn(n + 1, generator=gen).bfloat16()[1:] for n in sizes] for _ in range(3)]
    for decays in ([0.9], [0.999, 0.3, 0.0]):
        cpu = [[e.clone() for e in es] for es in emas[:len(decays)]]
        gpu = [[e.cuda() for e in es] for es in cpu]
        multi_ema_update_(cpu, params, decays, rounding="stochastic", seed=5, step=77)
        multi_ema_update_(gpu, [p.cuda() for p in params], decays, rounding="stochastic", seed=5,
                          step=77)
        for a, b in zip(cpu, gpu):
            for x, y in zip(a, b):
                assert torch.equal(x.view(torch.int16), y.cpu().view(torch.int16))
    e_cpu = [e.clone() for e in emas[0]]
    e_gpu = [e.cuda() for e in e_cpu]
    p_gpu = [p.cuda() for p in params]
    plan = EMAPlan(e_gpu, p_gpu, rounding="stochastic", seed=1)
    step = torch.zeros((), dtype=torch.int64, device="cuda")
    plan.update_(0.9, step=step)  # warm-up outside the capture
    fallback.multi_ema_update_([e_cpu], params, [0.9], rounding=(1, 0, None))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        plan.update_(0.9, step=step)
    for s in (1, 2, 3):
        step.fill_(s)
        graph.replay()
        fallback.multi_ema_update_([e_cpu], params, [0.9], rounding=(1, s, None))
    torch.cuda.synchronize()
    for x, y in zip(e_cpu, e_gpu):
        assert torch.equal(x.view(torch.int16), y.cpu().view(torch.int16))
