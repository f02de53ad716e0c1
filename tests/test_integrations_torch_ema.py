"""fused_ema.integrations.torch_ema against torch_ema's ExponentialMovingAverage."""
import gc

import pytest
import torch
from torch import nn

torch_ema = pytest.importorskip("torch_ema")

from fused_ema import backend  # noqa: E402
from fused_ema.integrations import torch_ema as ours  # noqa: E402
from integration_helpers import assert_within_ulps, step_scale  # noqa: E402


def _model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 7), nn.ReLU(),
                      nn.Linear(7, 3))
    return m.to(dtype)


def _same_after(a, b, updates):
    """Bit for bit on the compiled engine; with the fallback (no compiled module, or
    FUSED_EMA_BACKEND=python) each update may differ by 1 ulp (see _same), `updates` in all."""
    if backend(a) == "python":
        assert_within_ulps(a, b, float(updates))
    else:
        assert torch.equal(a, b)


def _train_steps(model, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    dtype = next(model.parameters()).dtype
    for _ in range(steps):
        x = torch.randn(8, 3, 8, 8, generator=g).to(dtype)
        loss = model(x).float().pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        yield


def _same(a, b, engine, scale=None):
    """Bit for bit on both engines (the fallback rounds each operation as the kernels)."""
    assert torch.equal(a, b)


@pytest.mark.parametrize("decay", [0.9, 0.999, 0.5001])
def test_same_run_bit_for_bit_above_half(decay, engine):
    """decay > 0.5: lerp and torch_ema's sub/mul/sub round identically: every step equal."""
    model = _model()
    theirs = torch_ema.ExponentialMovingAverage(model.parameters(), decay=decay,
                                                use_num_updates=False)
    mine = ours.ExponentialMovingAverage(model.parameters(), decay=decay, use_num_updates=False)
    params = list(model.parameters())
    for _ in _train_steps(model, 20):
        theirs.update()
        mine.update()
        for a, b, p in zip(mine.shadow_params, theirs.shadow_params, params):
            _same(a, b, engine, scale=torch.maximum(b.abs(), p.detach().abs()))
            if engine != "compiled":
                a.copy_(b)  # compare each update from the same state


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_same_run_with_num_updates(dtype, engine):
    """use_num_updates: decays 2/11 ... 9/18 for the first 8 updates (lerp's other branch):
    each update within 2 ulps (of the operands) of torch_ema's from the same state (both
    round s - p, which can be twice as large as the operands); bit for bit after."""
    model = _model(dtype)
    theirs = torch_ema.ExponentialMovingAverage(model.parameters(), decay=0.99)
    mine = ours.ExponentialMovingAverage(model.parameters(), decay=0.99)
    params = list(model.parameters())
    for step, _ in enumerate(_train_steps(model, 30), start=1):
        check = torch_ema.ExponentialMovingAverage(params, decay=0.99)
        check.shadow_params = [s.clone() for s in mine.shadow_params]
        check.num_updates = mine.num_updates
        scales = step_scale(mine.shadow_params, params)
        check.update()
        mine.update()
        theirs.update()
        assert mine.num_updates == theirs.num_updates == step
        for a, b, s in zip(mine.shadow_params, check.shadow_params, scales):
            if step > 8:
                _same(a, b, engine, s)
            else:
                assert_within_ulps(a, b, 2.0, f"update {step}", s)
    for a, b in zip(mine.shadow_params, theirs.shadow_params):
        torch.testing.assert_close(a, b, rtol=1e-5 if dtype == torch.float32 else 1e-12,
                                   atol=1e-6 if dtype == torch.float32 else 1e-14)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_params(dtype, engine):
    """16-bit shadows: we round once from fp32, torch_ema after each op: 2 ulps apart at most."""
    model = _model(dtype)
    params = list(model.parameters())
    mine = ours.ExponentialMovingAverage(params, decay=0.9, use_num_updates=False)
    for _ in _train_steps(model, 5):
        check = torch_ema.ExponentialMovingAverage(params, decay=0.9, use_num_updates=False)
        check.shadow_params = [s.clone() for s in mine.shadow_params]
        scales = step_scale(mine.shadow_params, params)
        check.update()
        mine.update()
        for a, b, s in zip(mine.shadow_params, check.shadow_params, scales):
            assert a.dtype == dtype
            assert_within_ulps(a, b, 2.0, scale=s)


def test_copy_store_restore_average_parameters():
    model = _model()
    params = list(model.parameters())
    mine = ours.ExponentialMovingAverage(params, decay=0.9)
    theirs = torch_ema.ExponentialMovingAverage(params, decay=0.9)
    for _ in _train_steps(model, 3):
        mine.update()
        theirs.update()
    online = [p.detach().clone() for p in params]
    with mine.average_parameters():
        for p, s in zip(params, mine.shadow_params):
            assert torch.equal(p, s)
    for p, o in zip(params, online):
        assert torch.equal(p, o)
    mine.store()
    mine.copy_to()
    assert all(torch.equal(p, s) for p, s in zip(params, mine.shadow_params))
    mine.restore()
    assert all(torch.equal(p, o) for p, o in zip(params, online))
    other = _model(seed=5)
    mine.copy_to(other.parameters())
    assert all(torch.equal(p, s) for p, s in zip(other.parameters(), mine.shadow_params))
    with pytest.raises(RuntimeError, match="store"):
        ours.ExponentialMovingAverage(params, 0.9).restore()


def test_state_dict_interchangeable_with_torch_ema():
    model = _model()
    params = list(model.parameters())
    mine = ours.ExponentialMovingAverage(params, decay=0.95)
    theirs = torch_ema.ExponentialMovingAverage(params, decay=0.95)
    for _ in _train_steps(model, 12):
        mine.update()
        theirs.update()
    assert set(mine.state_dict()) == set(theirs.state_dict())
    # torch_ema's checkpoint into ours, then both go on from the same state
    mine2 = ours.ExponentialMovingAverage(params, decay=0.5)
    mine2.load_state_dict(theirs.state_dict())
    assert mine2.decay == 0.95 and mine2.num_updates == 12
    theirs2 = torch_ema.ExponentialMovingAverage(params, decay=0.5)
    theirs2.load_state_dict(mine.state_dict())
    assert theirs2.num_updates == 12
    for _ in _train_steps(model, 3, seed=9):
        mine2.update()
        theirs.update()
    for a, b in zip(mine2.shadow_params, theirs.shadow_params):
        _same_after(a, b, updates=3)  # decay 0.95 > 0.5: bit for bit on the compiled engine
    # and through torch.save
    buf = __import__("io").BytesIO()
    torch.save(mine.state_dict(), buf)
    buf.seek(0)
    mine3 = ours.ExponentialMovingAverage(params, decay=0.1)
    mine3.load_state_dict(torch.load(buf))
    assert all(torch.equal(a, b) for a, b in zip(mine3.shadow_params, mine.shadow_params))


def test_to_dtype_and_device():
    model = _model()
    mine = ours.ExponentialMovingAverage(model.parameters(), decay=0.9)
    mine.to(dtype=torch.float64)
    assert all(s.dtype == torch.float64 for s in mine.shadow_params)
    mine.update()  # an fp64 EMA of fp32 params
    mine.to(device="cpu", dtype=torch.float32)
    assert all(s.dtype == torch.float32 for s in mine.shadow_params)


def test_channels_last_params():
    model = _model().to(memory_format=torch.channels_last)
    params = list(model.parameters())
    mine = ours.ExponentialMovingAverage(params, decay=0.9, use_num_updates=False)
    theirs = torch_ema.ExponentialMovingAverage(params, decay=0.9, use_num_updates=False)
    for _ in _train_steps(model, 3):
        mine.update()
        theirs.update()
    for a, b in zip(mine.shadow_params, theirs.shadow_params):
        _same_after(a, b, updates=3)


def test_bad_input_changes_nothing():
    model = _model()
    params = list(model.parameters())
    mine = ours.ExponentialMovingAverage(params, decay=0.9)
    before = [s.clone() for s in mine.shadow_params]
    for decay in (1.5, -0.1, float("nan")):  # torch_ema raises ValueError out of [0, 1]
        with pytest.raises(ValueError, match="[Dd]ecay"):
            ours.ExponentialMovingAverage(params, decay=decay)
    with pytest.raises(ValueError, match="Number of parameters"):
        mine.update(params[:-1])
    wrong = [p.detach().clone() for p in params]
    wrong[-1] = torch.zeros(5)
    with pytest.raises(ValueError, match=r"params\[5\]"):
        mine.update(wrong)
    assert mine.num_updates == 0
    sd = mine.state_dict()
    bad = dict(sd, shadow_params=sd["shadow_params"][:-1])
    with pytest.raises(ValueError, match="wrong number"):
        mine.load_state_dict(bad)
    with pytest.raises(ValueError, match="[Dd]ecay"):
        mine.load_state_dict(dict(sd, decay=float("nan")))
    bad = dict(sd, num_updates="3")
    with pytest.raises(ValueError, match="num_updates"):
        mine.load_state_dict(bad)
    assert all(torch.equal(a, b) for a, b in zip(mine.shadow_params, before))
    assert mine.num_updates == 0 and mine.decay == 0.9


def test_parameters_garbage_collected():
    model = _model()
    mine = ours.ExponentialMovingAverage(model.parameters(), decay=0.9)
    del model
    gc.collect()
    with pytest.raises(ValueError, match="garbage collected"):
        mine.update()
