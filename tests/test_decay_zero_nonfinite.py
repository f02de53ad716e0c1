"""Decay 0 (lerp weight 1) is a copy even when the EMA holds NaN or +-inf."""
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
    ema = FusedEMA(model, decay=0.9)
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
