"""The two ends of the decay are exact: decay 0 (lerp weight 1) is a copy even when the EMA
holds NaN or +-inf, and decay 1 (weight 0) leaves the EMA bit for bit as it was (-0.0, inf,
NaN), whatever the param holds."""
import pytest
import torch
from torch import nn

from fused_ema import FusedEMA, ema_update_, multi_ema_update_

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
SIZES = [1, 7, 9, 1000, 65536 + 5]  # singles, packs, several rows


def as_ema(p, ema_dtype):
    """The param as decay 0 gives it: through the update's opmath type."""
    op = torch.float64 if ema_dtype == torch.float64 else torch.float32
    return p.to(op).to(ema_dtype)


def poisoned(sizes, param_dtype, ema_dtype, seed=0):
    """Finite params; EMAs cycling through NaN, +inf, -inf (offset 1: unaligned too)."""
    g = torch.Generator().manual_seed(seed)
    params, emas = [], []
    for n in sizes:
        params.append(torch.randn(n + 1, generator=g, dtype=torch.float64).to(param_dtype)[1:])
        bad = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=ema_dtype)
        emas.append(bad.repeat(n // 3 + 2)[: n + 1][1:].clone())
    return emas, params


@pytest.mark.parametrize("as_tensor", [False, True])
@pytest.mark.parametrize("param_dtype", DTYPES)
@pytest.mark.parametrize("ema_dtype", DTYPES)
def test_decay_zero_replaces_non_finite_ema(engine, param_dtype, ema_dtype, as_tensor):
    emas, params = poisoned(SIZES, param_dtype, ema_dtype)
    ema_update_(emas, params, torch.tensor(0.0, dtype=torch.float64) if as_tensor else 0.0)
    for e, p in zip(emas, params):
        assert torch.equal(e, as_ema(p, ema_dtype))


# One EMA dtype for every decay (the compiled CPU loop then updates all EMAs of a row
# in one pass), or a different one per decay (a pass per EMA).
EMA_DTYPE_LISTS = {
    "mixed": [torch.float32, torch.float32, torch.bfloat16, torch.float64, torch.float16],
    **{f"all-{str(dt)[6:]}": [dt] * 5 for dt in DTYPES},
}


@pytest.mark.parametrize("as_tensor", [False, True])
@pytest.mark.parametrize("param_dtype", DTYPES)
@pytest.mark.parametrize("ema_dtypes", list(EMA_DTYPE_LISTS))
def test_multi_decay_zero_replaces_non_finite_ema(engine, param_dtype, as_tensor, ema_dtypes):
    # Decay 0 next to decays that keep averaging.
    decays = [0.0, 0.9, 0.0, 0.0, 0.0]
    dtypes = EMA_DTYPE_LISTS[ema_dtypes]
    lists = [poisoned(SIZES, param_dtype, dt, seed=3)[0] for dt in dtypes]
    _, params = poisoned(SIZES, param_dtype, torch.float32, seed=3)
    arg = torch.tensor(decays, dtype=torch.float64) if as_tensor else decays
    multi_ema_update_(lists, params, arg)
    for d, dt, emas in zip(decays, dtypes, lists):
        for e, p in zip(emas, params):
            if d == 0.0:
                assert torch.equal(e, as_ema(p, dt))
            else:
                assert not e.isfinite().any()  # averaging keeps a non-finite EMA non-finite


def test_frozen_parameter_recovers_from_nan(engine):
    model = nn.Linear(4, 3)
    model.bias.requires_grad_(False)  # frozen: copied at every update
    ema = FusedEMA(model, decay=0.9, frozen="copy")
    with torch.no_grad():
        model.bias.fill_(float("nan"))
    ema.update()
    assert ema.module.bias.isnan().all()
    with torch.no_grad():
        model.bias.copy_(torch.tensor([1.0, -2.0, 3.5]))
    ema.update()
    assert torch.equal(ema.module.bias, model.bias)  # not stuck at NaN


def test_update_after_step_copies_over_nan(engine):
    model = nn.Linear(4, 3)
    ema = FusedEMA(model, decay=0.9, update_after_step=3)
    with torch.no_grad():
        model.weight.fill_(float("inf"))
    ema.update()
    with torch.no_grad():
        model.weight.normal_()
    ema.update()  # still a copy (decay 0)
    assert torch.equal(ema.module.weight, model.weight)


BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
        torch.float64: torch.int64}


def edgy(sizes, param_dtype, ema_dtype, seed=0):
    """EMAs cycling through -0.0, +-inf, NaN and finite values; params through NaN, +-inf,
    finite and -0.0 (offset 1: unaligned too)."""
    g = torch.Generator().manual_seed(seed)
    emas_vals = torch.tensor([-0.0, float("inf"), -float("inf"), float("nan"), 1.5],
                             dtype=ema_dtype)
    param_vals = torch.tensor([float("nan"), float("inf"), -float("inf"), 2.0, -0.0],
                              dtype=param_dtype)
    emas, params = [], []
    for n in sizes:
        shift = int(torch.randint(0, 5, (), generator=g))
        emas.append(emas_vals.roll(shift).repeat(n // 5 + 2)[: n + 1][1:].clone())
        params.append(param_vals.repeat(n // 5 + 2)[: n + 1][1:].clone())
    return emas, params


def same_bits(a, b):
    return torch.equal(a.view(BITS[a.dtype]), b.view(BITS[b.dtype]))


@pytest.mark.parametrize("as_tensor", [False, True])
@pytest.mark.parametrize("param_dtype", DTYPES)
@pytest.mark.parametrize("ema_dtype", DTYPES)
def test_decay_one_leaves_the_ema_bit_for_bit(engine, param_dtype, ema_dtype, as_tensor):
    emas, params = edgy(SIZES, param_dtype, ema_dtype)
    before = [e.clone() for e in emas]
    ema_update_(emas, params, torch.tensor(1.0, dtype=torch.float64) if as_tensor else 1.0)
    assert all(same_bits(e, b) for e, b in zip(emas, before))


@pytest.mark.parametrize("as_tensor", [False, True])
@pytest.mark.parametrize("param_dtype", DTYPES)
@pytest.mark.parametrize("ema_dtypes", list(EMA_DTYPE_LISTS))
def test_multi_decay_one_leaves_the_ema_bit_for_bit(engine, param_dtype, as_tensor, ema_dtypes):
    # Decay 1 next to decays that average and copy (the one-pass loop selects per decay).
    decays = [1.0, 0.9, 1.0, 0.0, 1.0]
    dtypes = EMA_DTYPE_LISTS[ema_dtypes]
    lists = [edgy(SIZES, param_dtype, dt, seed=5)[0] for dt in dtypes]
    _, params = edgy(SIZES, param_dtype, torch.float32, seed=5)
    before = [[e.clone() for e in emas] for emas in lists]
    arg = torch.tensor(decays, dtype=torch.float64) if as_tensor else decays
    multi_ema_update_(lists, params, arg)
    for d, emas, old in zip(decays, lists, before):
        if d == 1.0:
            assert all(same_bits(e, b) for e, b in zip(emas, old))


def test_fused_ema_with_decay_one_ignores_a_nan_model(engine):
    model = nn.Linear(4, 3)
    ema = FusedEMA(model, decay=1.0)
    with torch.no_grad():
        ema.module.bias.copy_(torch.tensor([-0.0, 1.0, 2.0]))
        model.weight.fill_(float("nan"))
        model.bias.fill_(float("inf"))
    before = {n: t.clone() for n, t in ema.module.state_dict().items()}
    ema.update()
    for n, t in ema.module.state_dict().items():
        assert same_bits(t, before[n]), n
