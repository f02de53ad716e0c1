"""Stochastic rounding of bf16 EMAs (``rounding="stochastic"``).

The random bits are a pure function of (seed, step, tensor, element): the compiled CPU
kernel and the fallback give the same bits (here; the CUDA kernels' device code against
the CPU kernel: tests/test_device_emulation.py, group "stochastic"). Each result is one of
the two bf16 neighbours of the float64 update, it is unbiased (mean over seeds), and a
long run tracks the float64 EMA where round-to-nearest stops moving.
"""
import pytest
import torch
from torch import nn

from fused_ema import EMAPlan, FusedEMA, _ext, ema_update_, fallback, multi_ema_update_

compiled = pytest.mark.skipif(_ext._C is None or _ext.FORCE_PYTHON,
                              reason="compares the compiled kernel with the fallback")

PARAM_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
SIZES = [0, 1, 3, 65537, 200003]  # 200003 > 3 chunks of 65536


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16)


def offset_views(sizes, dtype, offset, gen):
    """Tensors that start `offset` elements into a buffer of their own (not 16-byte aligned)."""
    out = []
    for n in sizes:
        buf = torch.randn(n + offset, generator=gen).to(dtype)
        out.append(buf[offset:])
    return out


@compiled
@pytest.mark.parametrize("param_dtype", PARAM_DTYPES)
@pytest.mark.parametrize("decays", [[0.999], [0.3], [0.0], [1.0], [0.99, 0.0, 0.5]])
@pytest.mark.parametrize("offset", [0, 1, 5])
def test_compiled_gives_the_fallbacks_bits(param_dtype, decays, offset):
    gen = torch.Generator().manual_seed(offset)
    params = offset_views(SIZES, param_dtype, offset, gen)
    emas = [offset_views(SIZES, torch.bfloat16, (offset + k) % 8, gen) for k in range(len(decays))]
    mine = [[e.clone() for e in es] for es in emas]
    multi_ema_update_(mine, params, decays, rounding="stochastic", seed=11, step=12345)
    fallback.multi_ema_update_(emas, params, decays, rounding=(11, 12345, None))
    for k, (a, b) in enumerate(zip(mine, emas)):
        for i, (x, y) in enumerate(zip(a, b)):
            assert torch.equal(bits(x), bits(y)), f"decay {k}, tensor {i} (numel {x.numel()})"


@compiled
def test_compiled_gives_the_fallbacks_bits_for_many_tensors_and_layouts():
    gen = torch.Generator().manual_seed(3)
    shapes = [(7, 3), (1,), (4, 5, 6, 7), (300, 301), (2, 3, 4, 5)] * 40
    params = [torch.randn(s, generator=gen) for s in shapes]
    params[-1] = params[-1].to(memory_format=torch.channels_last)  # memory order != logical
    emas = [p.to(torch.bfloat16) + 0.01 * torch.randn(p.shape, generator=gen).bfloat16()
            for p in params]
    emas[-1] = emas[-1].to(memory_format=torch.channels_last)
    mine = [e.clone(memory_format=torch.preserve_format) for e in emas]
    ema_update_(mine, params, 0.9, rounding="stochastic", seed=0, step=1)
    fallback.multi_ema_update_([emas], params, [0.9], rounding=(0, 1, None))
    assert all(torch.equal(bits(a), bits(b)) for a, b in zip(mine, emas))


def test_each_value_is_a_bf16_neighbour_of_the_float64_update(engine):
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(100_000, generator=gen, dtype=torch.float64)
    e = (p + torch.randn(100_000, generator=gen, dtype=torch.float64)).bfloat16()
    want = e.double() + 0.1 * (p - e.double())  # decay 0.9
    out = e.clone()
    ema_update_([out], [p], 0.9, rounding="stochastic", seed=2, step=0)
    lo = want.float().bfloat16()  # a neighbour; the other one is an ulp away
    ulp = (lo.float().abs() * 2.0 ** -7).double()
    assert ((out.double() - want).abs() <= ulp + 1e-30).all()
    # both neighbours occur: it is not round-to-nearest
    nearest = want.float().bfloat16()
    assert 0.2 < (out != nearest).double().mean() < 0.8


def test_exact_values_stay_exact_and_nan_is_canonical(engine):
    nans = torch.tensor([0x7FC00000, 0x7FFFFFFF, -1, 0x7F800001], dtype=torch.int32)
    p = torch.cat([torch.tensor([1.0, -2.5, 0.0, -0.0, float("inf"), float("-inf")]),
                   nans.view(torch.float32), torch.tensor([3.0e38, 1e-40])])
    e = torch.zeros_like(p, dtype=torch.bfloat16)
    for step in range(20):
        ema_update_([e], [p], 0.0, rounding="stochastic", seed=0, step=step)  # a copy
        assert bits(e)[:6].tolist() == bits(p[:6].bfloat16()).tolist()
        # any NaN (payload, sign) gives the canonical NaN, as round-to-nearest does
        assert bits(e)[6:10].tolist() == [0x7FC0] * 4
        # 3e38 and a subnormal: truncated or one ulp up (in magnitude)
        lo = (p[10:].view(torch.int32) >> 16).to(torch.int16)
        assert ((bits(e)[10:] == lo) | (bits(e)[10:] == lo + 1)).all()


def test_unbiased_over_seeds(engine):
    """A value 3/8 of an ulp above a bf16 number: over 32 seeds x 4096 elements, the mean
    of the rounded copies is the value (binomial std of the fraction: 0.0013)."""
    base = 1.0 + 2 ** -6  # a bf16 number; its ulp is 2**-7
    value = torch.full((4096,), base + 0.375 * 2 ** -7, dtype=torch.float32)
    ups = 0
    for seed in range(32):
        e = torch.zeros(4096, dtype=torch.bfloat16)
        ema_update_([e], [value], 0.0, rounding="stochastic", seed=seed, step=0)
        assert set(e.float().unique().tolist()) <= {base, base + 2 ** -7}
        ups += (e.float() > base).sum().item()
    assert abs(ups / (32 * 4096) - 0.375) < 0.006  # 4.5 std


def test_ten_thousand_steps_track_float64_where_nearest_stops(engine):
    """EMA of a constant 1 + 2**-9 from 1.0 at decay 0.999: bf16 round-to-nearest never
    moves (each step adds 2e-6, far below half an ulp), stochastic rounding follows the
    float64 EMA within a few ulps."""
    target = torch.full((256,), 1.0 + 2 ** -9)
    sr = torch.ones(256, dtype=torch.bfloat16)
    rn = sr.clone()
    plan_sr = EMAPlan([sr], [target], rounding="stochastic", seed=0)
    plan_rn = EMAPlan([rn], [target])
    for step in range(10_000):
        plan_sr.update_(0.999, step=step)
        plan_rn.update_(0.999)
    exact = 1.0 + 2 ** -9 * (1 - 0.999 ** 10_000)
    assert torch.equal(rn, torch.ones_like(rn))  # stuck
    assert abs(sr.double().mean().item() - exact) < 2 ** -9 / 8
    assert (sr.double() - exact).abs().max() <= 2 ** -7


def test_bits_are_a_pure_function_of_seed_step_tensor_element(engine):
    p = [torch.randn(1000), torch.randn(1000)]
    e0 = [x.bfloat16() + 0.001 for x in p]

    def run(seed, step, order=(0, 1)):
        es = [e0[i].clone() for i in order]
        ema_update_(es, [p[i] for i in order], 0.5, rounding="stochastic", seed=seed, step=step)
        return [bits(x) for x in es]

    a = run(1, 5)
    assert all(torch.equal(x, y) for x, y in zip(a, run(1, 5)))
    assert not torch.equal(a[0], run(2, 5)[0])  # the seed
    assert not torch.equal(a[0], run(1, 6)[0])  # the step
    assert not torch.equal(a[0], run(1, 5, order=(1, 0))[1])  # the tensor's index
    # a step given as a tensor is the same step
    es = [x.clone() for x in e0]
    ema_update_(es, p, 0.5, rounding="stochastic", seed=1, step=torch.tensor(5))
    assert all(torch.equal(bits(x), y) for x, y in zip(es, a))


def test_skip_writes_nothing(engine):
    e = torch.randn(100).bfloat16()
    before = e.clone()
    ema_update_([e], [torch.randn(100)], 0.5, rounding="stochastic", step=0,
                skip=torch.tensor(True))
    assert torch.equal(bits(e), bits(before))


def test_nearest_is_unchanged_by_the_new_arguments(engine):
    p, e = torch.randn(1000), torch.randn(1000).bfloat16()
    a, b = e.clone(), e.clone()
    ema_update_([a], [p], 0.9)
    ema_update_([b], [p], 0.9, rounding="nearest", seed=5, step=3)
    assert torch.equal(bits(a), bits(b))
    assert torch.equal(bits(a), bits(e.float().lerp(p, 0.1).bfloat16()))


# ---- FusedEMA ------------------------------------------------------------------------------

def bf16_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.BatchNorm1d(64), nn.Linear(64, 4)).bfloat16()


def train_steps(model, n, seed):
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(n):
        model(torch.randn(8, 32, generator=gen).bfloat16()).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        yield


def ema_bits(ema):
    return [bits(t) if t.dtype == torch.bfloat16 else t for t in ema.module.state_dict().values()]


@pytest.mark.parametrize("capturable", [False, True])
def test_fused_ema_is_the_functional_update_at_its_step(engine, capturable):
    model = bf16_model()
    ema = FusedEMA(model, decay=0.9, ema_dtype=torch.bfloat16, rounding="stochastic", seed=4,
                   capturable=capturable)
    names = [n for n, _ in model.named_parameters()]
    mirror = [t.detach().clone() for t in ema.module.parameters()]
    for step, _ in enumerate(train_steps(model, 5, 0)):
        ema.update()
        ema_update_(mirror, [p.detach() for p in model.parameters()], 0.9,
                    rounding="stochastic", seed=4, step=step)
    for n, a, b in zip(names, ema.module.parameters(), mirror):
        assert torch.equal(bits(a), bits(b)), n


def test_a_resumed_run_continues_bit_for_bit(engine):
    model = bf16_model()
    kw = dict(decay=0.99, ema_dtype=torch.bfloat16, rounding="stochastic", seed=9)
    ema = FusedEMA(model, **kw)
    steps = train_steps(model, 12, 1)
    for _ in range(6):
        next(steps)
        ema.update()
    resumed = FusedEMA(model, **kw)
    resumed.load_state_dict(ema.state_dict())
    for _ in steps:
        ema.update()
        resumed.update()
    assert all(torch.equal(a, b) for a, b in zip(ema_bits(ema), ema_bits(resumed)))


def test_fused_ema_refuses_what_cannot_be_rounded_stochastically():
    model = nn.Linear(4, 4)  # float32: its EMA is float32
    with pytest.raises(ValueError, match=r"emas\[0\] \('weight'\) is float32; rounding="):
        FusedEMA(model, decay=0.9, rounding="stochastic")
    with pytest.raises(ValueError, match="rounding must be one of"):
        FusedEMA(model, decay=0.9, rounding="up")
    with pytest.raises(ValueError, match="seed must be an integer"):
        FusedEMA(model, decay=0.9, ema_dtype=torch.bfloat16, rounding="stochastic", seed=-1)


def test_a_checkpoint_of_other_rounding_is_refused():
    model = bf16_model()
    sr = FusedEMA(model, decay=0.9, ema_dtype=torch.bfloat16, rounding="stochastic")
    rn = FusedEMA(model, decay=0.9, ema_dtype=torch.bfloat16)
    before = ema_bits(rn)
    with pytest.raises(ValueError, match="rounding: checkpoint has 'stochastic'"):
        rn.load_state_dict(sr.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(before, ema_bits(rn)))
    # a checkpoint from before stochastic rounding existed loads into a nearest one
    old = rn.state_dict()
    del old["settings"]["rounding"], old["settings"]["seed"]
    rn.load_state_dict(old)


def test_no_frozen_by_rounding_warning_with_stochastic_rounding(recwarn):
    model = bf16_model()
    FusedEMA(model, decay=0.9999, ema_dtype=torch.bfloat16)
    assert any("or rounding='stochastic'" in str(w.message) for w in recwarn.list)
    recwarn.clear()
    FusedEMA(model, decay=0.9999, ema_dtype=torch.bfloat16, rounding="stochastic")
    assert not any("barely moves" in str(w.message) for w in recwarn.list)


@compiled
def test_capturable_stochastic_update_under_torch_compile():
    """torch.compile(ema.update, fullgraph=True) with the step on the device: the traced
    ops get the device step and give the eager update's bits."""
    model = bf16_model()
    kw = dict(decay=0.9, ema_dtype=torch.bfloat16, rounding="stochastic", seed=2)
    eager = FusedEMA(model, **kw)
    ema = FusedEMA(model, capturable=True, **kw)
    update = torch.compile(ema.update, backend="eager", fullgraph=True)
    for _ in train_steps(model, 4, 3):
        update()
        eager.update()
    assert all(torch.equal(a, b) for a, b in zip(ema_bits(eager), ema_bits(ema)))
    assert ema.step == 4


def test_non_blocking_stochastic_update_gives_the_synchronous_bits(engine):
    """The worker thread's update is keyed by the step it was queued at."""
    model = bf16_model()
    kw = dict(decay=0.9, ema_dtype=torch.bfloat16, rounding="stochastic", seed=6)
    sync = FusedEMA(model, **kw)
    queued = FusedEMA(model, non_blocking=True, **kw)
    for _ in train_steps(model, 4, 5):
        sync.update()
        queued.update()
        queued.synchronize()  # the next training step writes the weights the worker reads
    assert all(torch.equal(a, b) for a, b in zip(ema_bits(sync), ema_bits(queued)))
