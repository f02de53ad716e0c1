"""Schedules against the closed forms of the libraries they stand in for."""
import math

import numpy as np
import pytest
import torch

from fused_ema import schedules
from fused_ema.schedules import Constant, Cosine, HalfLife, Warmup

ALL = [
    Constant(0.999),
    Warmup(),
    Warmup(decay=0.999, gamma=10.0, power=0.75, min_decay=0.5),
    Cosine(0.996, total_steps=50),
    Cosine(0.99, end=0.999, total_steps=7),
    HalfLife(693),
]


def test_constant():
    s = Constant(0.9)
    assert [s(t) for t in (0, 1, 10**9)] == [0.9, 0.9, 0.9]
    assert s.max_decay == 0.9


def test_warmup_is_timm_and_diffusers_form():
    # timm ModelEmaV3.get_decay / diffusers EMAModel.get_decay with update_after_step=0
    # get step s+1; both return 0 when max(0, step - 1) == 0, else the clamped formula.
    decay, gamma, power, min_decay = 0.9999, 1.0, 2 / 3, 0.1
    s = Warmup(decay, gamma=gamma, power=power, min_decay=min_decay)
    for t in [0, 1, 2, 5, 100, 31_600, 10**6, 10**9]:
        if t == 0:
            expected = 0.0
        else:
            expected = min(max(1 - (1 + t / gamma) ** -power, min_decay), decay)
        assert s(t) == pytest.approx(expected, rel=1e-15, abs=0)
    # crowsonkb's notes (ema-pytorch docstring): gamma=1, power=2/3 reaches 0.999 at 31.6K
    # steps and 0.9999 at 1M; power=3/4 reaches 0.999 at 10K steps.
    assert Warmup(1.0)(31_600) == pytest.approx(0.999, abs=1e-6)
    assert Warmup(1.0)(10**6) == pytest.approx(0.9999, abs=1e-7)
    assert Warmup(1.0, power=0.75)(10**4 - 1) == pytest.approx(0.999, abs=1e-6)
    assert s(10**12) == decay  # clamped above


def test_warmup_matches_ema_pytorch_current_decay():
    ema_pytorch = pytest.importorskip("ema_pytorch")
    net = torch.nn.Linear(2, 2)
    ref = ema_pytorch.EMA(net, beta=0.999, update_after_step=0, inv_gamma=3.0, power=0.7,
                          min_value=0.2)
    s = Warmup(0.999, gamma=3.0, power=0.7, min_decay=0.2)
    for step in range(1, 40):
        ref.step.fill_(step)
        # ema-pytorch evaluates its warmup at epoch = step - update_after_step - 1
        assert ref.get_current_decay() == pytest.approx(s(step - 1), rel=1e-6)


def test_cosine_is_byol_dino_moco_form():
    start, total = 0.996, 40
    s = Cosine(start, total_steps=total)
    assert s(0) == start
    assert s(total) == 1.0
    assert s(total + 100) == 1.0  # stays at the end
    assert s(total // 2) == pytest.approx((start + 1) / 2)
    for k in range(total + 1):
        byol = 1 - (1 - start) * (math.cos(math.pi * k / total) + 1) / 2
        assert s(k) == pytest.approx(byol, rel=1e-15)
    # DINO's cosine_scheduler(base, final=1, epochs, niter_per_ep)
    iters = np.arange(total)
    dino = 1 + 0.5 * (start - 1) * (1 + np.cos(np.pi * iters / len(iters)))
    np.testing.assert_allclose([s(int(i)) for i in iters], dino, rtol=1e-15)
    # MoCo v3: m = 1 - 0.5 * (1 + cos(pi * epoch / epochs)) * (1 - moco_m)
    assert s(13) == pytest.approx(1 - 0.5 * (1 + math.cos(math.pi * 13 / total)) * (1 - start))


def test_cosine_between_any_two_values():
    s = Cosine(0.9, end=0.99, total_steps=10)
    values = [s(t) for t in range(11)]
    assert values[0] == 0.9 and values[-1] == pytest.approx(0.99)
    assert all(a < b for a, b in zip(values, values[1:]))


def test_half_life():
    for h in [1, 10, 693, 1e5]:
        s = HalfLife(h)
        assert s(0) ** h == pytest.approx(0.5, rel=1e-10)
    assert HalfLife(693)(5) == pytest.approx(0.999, abs=1e-6)


@pytest.mark.parametrize("s", ALL, ids=repr)
def test_tensor_form_equals_float_form(s):
    steps = list(range(0, 60)) + [1000, 10**6]
    t = torch.tensor(steps, dtype=torch.float64)
    got = torch.stack([s.tensor(x) for x in t])
    expected = torch.tensor([s(k) for k in steps], dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=1e-13, atol=1e-15)
    assert got.dtype == torch.float64


@pytest.mark.parametrize("make", [
    lambda: Constant(1.5), lambda: Constant(-0.1), lambda: Constant(float("nan")),
    lambda: Warmup(decay=2.0), lambda: Warmup(gamma=0), lambda: Warmup(power=-1),
    lambda: Warmup(decay=0.9, min_decay=0.95), lambda: Cosine(1.2, total_steps=3),
    lambda: Cosine(0.9, total_steps=0), lambda: Cosine(0.9, total_steps=2.5),
    lambda: HalfLife(0), lambda: HalfLife(float("inf")),
])
def test_bad_settings_raise(make):
    with pytest.raises(ValueError):
        make()


def test_cosine_needs_total_steps():
    with pytest.raises(TypeError, match="total_steps"):
        Cosine(0.99)


def test_settings_repr_and_equality():
    assert Cosine(0.99, total_steps=5) == Cosine(0.99, 1.0, 5)
    assert Cosine(0.99, total_steps=5) != Cosine(0.99, total_steps=6)
    assert Constant(0.9) != HalfLife(10)
    assert repr(Warmup(0.99)) == ("Warmup(decay=0.99, gamma=1.0, power=0.6666666666666666, "
                                  "min_decay=0.0)")
    assert schedules.HalfLife(10).settings() == {"type": "HalfLife", "half_life": 10.0}
    assert len({Constant(0.9), Constant(0.9), Constant(0.8)}) == 2
