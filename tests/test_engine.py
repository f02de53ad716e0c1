"""The engine against a float64 reference, the compiled path against the fallback."""
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings, strategies as st

import fused_ema
from fused_ema import EMAPlan, _ext, ema_update_, multi_ema_update_

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
CHUNK = 65536
SIZES = [0, 1, 3, 7, 8, 9, 1000, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5]


def reference(ema, param, decay):
    """A plain float64 loop: decay * ema + (1 - decay) * param."""
    return decay * ema.double() + (1.0 - decay) * param.double()


def tolerances(dtype):
    # One rounding of the result in the EMA's dtype, plus fp32 arithmetic.
    return {
        torch.float64: dict(rtol=1e-12, atol=1e-12),
        torch.float32: dict(rtol=2e-6, atol=1e-6),
        torch.float16: dict(rtol=1e-3, atol=1e-3),
        torch.bfloat16: dict(rtol=8e-3, atol=8e-3),
    }[dtype]


def make(sizes, param_dtype, ema_dtype, offset=0, seed=0):
    """Params and EMAs, each a contiguous view `offset` elements into its own buffer."""
    g = torch.Generator().manual_seed(seed)
    params, emas = [], []
    for n in sizes:
        pbuf = torch.randn(n + offset, generator=g, dtype=torch.float64).to(param_dtype)
        ebuf = torch.randn(n + offset, generator=g, dtype=torch.float64).to(ema_dtype)
        params.append(pbuf[offset:])
        emas.append(ebuf[offset:])
    return emas, params


def with_fallback(emas, params, decay):
    """The fallback's answer, computed on copies."""
    copies = [e.clone() for e in emas]
    fused_ema.fallback.multi_ema_update_([copies], params, [decay])
    return copies


@pytest.mark.parametrize("param_dtype", DTYPES)
@pytest.mark.parametrize("ema_dtype", DTYPES)
def test_dtype_matrix_against_reference(engine, param_dtype, ema_dtype):
    emas, params = make(SIZES, param_dtype, ema_dtype)
    expected = [reference(e, p, 0.9) for e, p in zip(emas, params)]
    ema_update_(emas, params, 0.9)
    for e, ref in zip(emas, expected):
        assert e.dtype == ema_dtype
        torch.testing.assert_close(e.double(), ref, **tolerances(ema_dtype))


@pytest.mark.parametrize("param_dtype", DTYPES)
@pytest.mark.parametrize("ema_dtype", DTYPES)
@pytest.mark.parametrize("offset", [1, 3])
def test_compiled_matches_fallback_unaligned(param_dtype, ema_dtype, offset):
    if _ext._C is None:
        pytest.skip("compiled module not available")
    emas, params = make([1, 3, 17, CHUNK + 3], param_dtype, ema_dtype, offset=offset)
    expected = with_fallback(emas, params, 0.75)
    ema_update_(emas, params, 0.75)
    for e, ref in zip(emas, expected):
        # The fallback rounds each operation as ema_math.h does: the same bits.
        assert torch.equal(e, ref)


@pytest.mark.parametrize("ema_dtype", DTYPES)
def test_decay_zero_copies_and_one_keeps(engine, ema_dtype):
    for param_dtype in DTYPES:
        emas, params = make([0, 1, 5, CHUNK + 7], param_dtype, ema_dtype, offset=1)
        before = [e.clone() for e in emas]
        ema_update_(emas, params, 1.0)
        for e, b in zip(emas, before):
            assert torch.equal(e, b)
        ema_update_(emas, params, 0.0)
        for e, p in zip(emas, params):
            assert torch.equal(e, p.to(torch.float64 if ema_dtype == torch.float64 else torch.float32).to(ema_dtype))


def test_many_tiny_tensors(engine):
    g = torch.Generator().manual_seed(1)
    sizes = torch.randint(0, 6, (10000,), generator=g).tolist()
    emas, params = make(sizes, torch.float32, torch.float32)
    expected = [reference(e, p, 0.99) for e, p in zip(emas, params)]
    ema_update_(emas, params, 0.99)
    for e, ref in zip(emas, expected):
        torch.testing.assert_close(e.double(), ref, **tolerances(torch.float32))


def test_many_steps_with_a_plan(engine):
    emas, params = make([5, 1000, CHUNK + 1], torch.bfloat16, torch.float32, offset=1)
    expected = [e.double() for e in emas]
    plan = EMAPlan(emas, params)
    for step in range(20):
        for p in params:
            p.add_(0.01 * (step + 1))
        decay = 0.9 + 0.004 * step
        plan.update_(decay)
        expected = [decay * r + (1 - decay) * p.double() for r, p in zip(expected, params)]
    for e, ref in zip(emas, expected):
        torch.testing.assert_close(e.double(), ref, rtol=1e-5, atol=1e-5)


def test_decay_as_tensor_matches_float(engine):
    for dtype in (torch.float32, torch.float64):
        emas, params = make([3, 70000], torch.float32, torch.float32)
        by_float = [e.clone() for e in emas]
        ema_update_(by_float, params, 0.875)  # exact in binary: both read the same value
        ema_update_(emas, params, torch.tensor(0.875, dtype=dtype))
        for a, b in zip(emas, by_float):
            assert torch.equal(a, b)


def test_skip(engine):
    for flag in (torch.tensor(True), torch.tensor(1.0), torch.tensor(1, dtype=torch.int64)):
        emas, params = make([3, 70000], torch.float32, torch.float32)
        before = [e.clone() for e in emas]
        ema_update_(emas, params, 0.5, skip=flag)
        assert all(torch.equal(a, b) for a, b in zip(emas, before))
        EMAPlan(emas, params).update_(0.5, skip=flag)
        assert all(torch.equal(a, b) for a, b in zip(emas, before))
    for flag in (torch.tensor(False), torch.tensor(0.0)):
        emas, params = make([3], torch.float32, torch.float32)
        expected = with_fallback(emas, params, 0.5)
        ema_update_(emas, params, 0.5, skip=flag)
        torch.testing.assert_close(emas[0], expected[0])


@pytest.mark.parametrize("as_tensor", [False, True])
def test_multi_decay_equals_separate_updates(engine, as_tensor):
    decays = [0.5, 0.9, 0.999]
    dtypes = [torch.float32, torch.bfloat16, torch.float64]
    _, params = make([1, 3, CHUNK + 9, 5000], torch.float16, torch.float16, offset=1)
    lists = [make([p.numel() for p in params], torch.float16, dt, seed=k + 7)[0]
             for k, dt in enumerate(dtypes)]
    separate = [[e.clone() for e in emas] for emas in lists]
    for emas, d in zip(separate, decays):
        ema_update_(emas, params, d)
    arg = torch.tensor(decays, dtype=torch.float64) if as_tensor else decays
    multi_ema_update_(lists, params, arg)
    for got, want in zip(lists, separate):
        for a, b in zip(got, want):
            assert torch.equal(a, b)  # same per-element math, one read of params
    plan = EMAPlan.multi(lists, params)
    plan.update_([torch.tensor(d, dtype=torch.float64) for d in decays])
    for emas, d, want in zip(lists, decays, separate):
        ema_update_(want, params, d)
        for a, b in zip(emas, want):
            assert torch.equal(a, b)


def test_empty_lists_are_a_no_op(engine):
    ema_update_([], [], 0.9)
    multi_ema_update_([[], []], [], [0.9, 0.99])
    EMAPlan([], []).update_(0.5)


@pytest.mark.parametrize("under_no_grad", [False, True])
def test_requires_grad_targets_like_sb3(engine, under_no_grad):
    online, target = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    expected = [reference(t, o, 0.995) for t, o in zip(target.parameters(), online.parameters())]
    if under_no_grad:
        with torch.no_grad():
            ema_update_(list(target.parameters()), list(online.parameters()), 0.995)
    else:
        ema_update_(list(target.parameters()), list(online.parameters()), 0.995)
    for t, ref in zip(target.parameters(), expected):
        assert t.requires_grad and t.grad_fn is None
        torch.testing.assert_close(t.detach().double(), ref, **tolerances(torch.float32))


def test_plan_detects_replaced_tensors(engine):
    emas, params = make([4, 6], torch.float32, torch.float32)
    plan = EMAPlan(emas, params)
    plan.update_(0.5)
    params[1].data = torch.zeros(7)
    with pytest.raises(RuntimeError, match="replaced or resized"):
        plan.update_(0.5)
    params[1].data = torch.zeros(6)  # new storage, same shape
    with pytest.raises(RuntimeError, match="replaced or resized"):
        plan.update_(0.5)


def test_functional_path_sees_new_tensors():
    # The compiled functional path caches plans by tensor identity; a new tensor
    # with the same shape must still be updated (not the old one's memory).
    emas, params = make([100], torch.float32, torch.float32)
    ema_update_(emas, params, 0.5)
    fresh = [torch.randn(100)]
    expected = reference(fresh[0], params[0], 0.5)
    ema_update_(fresh, params, 0.5)
    torch.testing.assert_close(fresh[0].double(), expected, **tolerances(torch.float32))


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 3 * CHUNK), min_size=1, max_size=6),
    param_dtype=st.sampled_from(DTYPES),
    ema_dtype=st.sampled_from(DTYPES),
    offset=st.integers(0, 9),
    decay=st.floats(0.0, 1.0),
)
def test_property_compiled_matches_reference_and_fallback(sizes, param_dtype, ema_dtype, offset,
                                                          decay):
    if _ext._C is None:
        pytest.skip("compiled module not available")
    emas, params = make(sizes, param_dtype, ema_dtype, offset=offset)
    expected = [reference(e, p, decay) for e, p in zip(emas, params)]
    from_fallback = with_fallback(emas, params, decay)
    ema_update_(emas, params, decay)
    for e, ref, fb in zip(emas, expected, from_fallback):
        torch.testing.assert_close(e.double(), ref, **tolerances(ema_dtype))
        assert torch.equal(e, fb)  # the fallback rounds as the kernels do


def _available_memory_gib():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return 0.0


@pytest.mark.skipif(_available_memory_gib() < 14, reason="needs ~9 GiB free")
def test_more_than_2_pow_31_elements():
    if _ext._C is None or _ext.FORCE_PYTHON:
        # The fallback's fp32 temporaries of 2^31 elements need ~3x more memory than this
        # test's ~9 GiB (under FUSED_EMA_BACKEND=python it was killed for memory).
        pytest.skip("tests the compiled kernels' 64-bit indexing")
    n = 2**31 + 9
    param = torch.ones(n, dtype=torch.float16)
    ema = torch.zeros(n, dtype=torch.bfloat16)
    ema_update_([ema], [param], 0.5)
    for lo, hi in [(0, 16), (2**31 - 8, 2**31 + 8), (n - 16, n)]:
        assert torch.equal(ema[lo:hi], torch.full((hi - lo,), 0.5, dtype=torch.bfloat16)), (lo, hi)
    del param, ema


def test_opcheck():
    if _ext._C is None:
        pytest.skip("compiled module not available")
    emas, params = make([5, 3, CHUNK + 1], torch.bfloat16, torch.float32)
    op = torch.ops.fused_ema
    torch.library.opcheck(op.ema_update_.default, ([e.clone() for e in emas], params, 0.9, None, None))
    torch.library.opcheck(op.ema_update_.default,
                          ([e.clone() for e in emas], params, 0.0, torch.tensor([0.9]),
                           torch.tensor(False)))
    torch.library.opcheck(op.multi_ema_update_.default,
                          ([e.clone() for e in emas + emas], params, [0.9, 0.5], None, None))


def test_torch_compile_fullgraph_training_step():
    if _ext._C is None or _ext.FORCE_PYTHON:
        pytest.skip("traces the compiled op (not used under FUSED_EMA_BACKEND=python)")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    params = list(model.parameters())
    ema = [p.detach().clone() for p in params]
    teachers = [[p.detach().clone().bfloat16() for p in params] for _ in range(2)]

    @torch.compile(fullgraph=True)
    def apply_step(decay, skip):
        with torch.no_grad():
            torch._foreach_add_(params, [p.grad for p in params], alpha=-0.1)
        ema_update_(ema, params, decay, skip=skip)
        multi_ema_update_(teachers, params, [0.5, 0.0])

    expected = [p.detach().double() for p in params]
    for step in range(3):
        model(torch.randn(4, 8)).square().mean().backward()
        apply_step(torch.tensor(0.9), torch.tensor(step == 1))
        for p in params:
            p.grad = None
        if step != 1:
            expected = [0.9 * r + 0.1 * p.detach().double() for r, p in zip(expected, params)]
    for e, ref in zip(ema, expected):
        torch.testing.assert_close(e.double(), ref, **tolerances(torch.float32))
    for t, p in zip(teachers[1], params):
        assert torch.equal(t, p.detach().bfloat16())


def test_backend_names(monkeypatch):
    expected = "cpp" if _ext._C is not None and not _ext.FORCE_PYTHON else "python"
    assert fused_ema.backend(torch.zeros(1)) == expected
    assert fused_ema.backend("cpu") == expected
    monkeypatch.setattr(_ext, "FORCE_PYTHON", True)
    assert fused_ema.backend(torch.zeros(1)) == "python"


def _run(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120)


def test_env_forces_python_backend():
    out = _run("import torch, fused_ema; print(fused_ema.backend(torch.zeros(1)))",
               FUSED_EMA_BACKEND="python")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "python"


@pytest.mark.skipif(_ext.FORCE_PYTHON, reason="FUSED_EMA_BACKEND=python: no load is tried")
def test_missing_compiled_module_warns_once_and_falls_back():
    code = (
        "import sys, warnings\n"
        "sys.modules['fused_ema._C'] = None  # makes `from . import _C` fail\n"
        "warnings.simplefilter('always')\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    import torch, fused_ema\n"
        "    import fused_ema.functional\n"
        "e, p = [torch.zeros(3)], [torch.ones(3)]\n"
        "fused_ema.ema_update_(e, p, 0.75)\n"
        "print(fused_ema.backend(p[0]), e[0].tolist(), len(w), w[0].message)\n"
    )
    out = _run(code)
    assert out.returncode == 0, out.stderr
    backend, rest = out.stdout.split(" ", 1)
    assert backend == "python"
    assert rest.startswith("[0.25, 0.25, 0.25] 1 fused_ema: the compiled module could not be loaded")


def test_built_with_openmp():
    # Without -fopenmp at::parallel_for silently runs on one thread.
    if _ext._C is None:
        pytest.skip("compiled module not available")
    assert _ext._C.compiled_with_openmp()
