"""Bad input: a clear error naming the offending tensor, and nothing modified.

Each case puts the bad tensor last, after good ones, so an update that wrote
before validating everything would show in the snapshot comparison.
"""
import math

import pytest
import torch

from fused_ema import EMAPlan, ema_update_, multi_ema_update_


def good(n=3, count=2):
    params = [torch.randn(n + i) for i in range(count)]
    emas = [p.clone() + 1 for p in params]
    return emas, params


def snapshot(*lists):
    return [t.clone() for ts in lists for t in ts if t.device.type != "meta"]


def unchanged(before, *lists):
    after = [t for ts in lists for t in ts if t.device.type != "meta"]
    return len(before) == len(after) and all(torch.equal(a, b) for a, b in zip(before, after))


def expect(exc, match, emas, params, decay=0.9, **kw):
    before = snapshot(emas, params)
    with pytest.raises(exc, match=match):
        ema_update_(emas, params, decay, **kw)
    assert unchanged(before, emas, params)
    with pytest.raises(exc, match=match):
        EMAPlan(emas, params).update_(decay, **kw)
    assert unchanged(before, emas, params)


def test_lists_of_different_lengths(engine):
    emas, params = good()
    expect(ValueError, r"got 2 EMA tensors .* 3 params", emas, params + [torch.zeros(2)])


def test_shape_mismatch(engine):
    emas, params = good()
    expect(ValueError, r"emas\[2\] has shape \[3, 4\] but params\[2\] has shape \[4, 3\]",
           emas + [torch.zeros(3, 4)], params + [torch.zeros(4, 3)])


def test_ema_on_another_device(engine):
    emas, params = good()
    expect(ValueError, r"emas\[2\] is on meta but params\[2\] is on cpu.*FusedEMA\(device=",
           emas + [torch.empty(5, device="meta")], params + [torch.zeros(5)])


def test_integer_and_bool_emas(engine):
    for dtype in (torch.int64, torch.int32, torch.bool, torch.uint8):
        emas, params = good()
        expect(TypeError, r"emas\[2\] has dtype .*an EMA must be float32",
               emas + [torch.zeros(5, dtype=dtype)], params + [torch.zeros(5)])


def test_integer_params(engine):
    emas, params = good()
    expect(TypeError, r"params\[2\] has dtype .*params must be float32",
           emas + [torch.zeros(5)], params + [torch.zeros(5, dtype=torch.int64)])


def test_non_contiguous(engine):
    # Dense layouts are accepted when EMA and param share them (see test_layouts.py).
    emas, params = good()
    expect(ValueError, r"emas\[2\] has strides \[1, 6\] but params\[2\] has strides \[4, 1\]",
           emas + [torch.zeros(4, 6).t()], params + [torch.zeros(6, 4)])
    emas, params = good()
    expect(ValueError, r"emas\[2\] has strides \[4, 1\] but params\[2\] has strides \[1, 6\]",
           emas + [torch.zeros(6, 4)], params + [torch.zeros(4, 6).t()])
    emas, params = good()
    expect(ValueError, r"params\[2\] is neither contiguous nor dense",
           emas + [torch.zeros(3)], params + [torch.zeros(6)[::2]])


def test_ema_aliasing_its_param(engine):
    emas, params = good()
    p = torch.zeros(5)
    expect(ValueError, r"emas\[2\] shares memory with params\[2\]", emas + [p], params + [p])
    p = torch.zeros(6)
    expect(ValueError, r"emas\[2\] shares memory with params\[2\]", emas + [p[1:]], params + [p[:5]])


def test_overlapping_emas(engine):
    emas, params = good()
    buf = torch.zeros(10)
    expect(ValueError, r"emas\[3\] overlaps emas\[2\] in memory",
           emas + [buf[:6], buf[4:]], params + [torch.zeros(6), torch.zeros(6)])


def test_ema_overlapping_another_param(engine):
    emas, params = good()
    shared = torch.zeros(5)
    expect(ValueError, r"emas\[0\] overlaps params\[2\] in memory",
           [shared[:3]] + emas[1:] + [torch.zeros(5)], params + [shared])


def test_params_may_share_memory(engine):
    # Tied weights are read twice and that is fine.
    tied = torch.randn(4)
    emas = [torch.zeros(4), torch.zeros(4)]
    ema_update_(emas, [tied, tied], 0.0)
    assert torch.equal(emas[0], tied) and torch.equal(emas[1], tied)


@pytest.mark.parametrize("decay", [math.nan, math.inf, -math.inf, -0.1, 1.5])
def test_bad_decay_values(engine, decay):
    emas, params = good()
    expect(ValueError, r"decay must be a number in \[0, 1\]", emas, params, decay)
    expect(ValueError, r"decay must be a number in \[0, 1\]", emas, params,
           torch.tensor(decay, dtype=torch.float64))


def test_bad_decay_tensor_dtype(engine):
    emas, params = good()
    expect(TypeError, r"decay tensor must be float32 or float64", emas, params,
           torch.tensor(1, dtype=torch.int64))


def test_wrong_number_of_decays(engine):
    emas, params = good()
    other = [e.clone() for e in emas]
    before = snapshot(emas, other, params)
    with pytest.raises(ValueError, match=r"got 3 decays for 2 EMA list"):
        multi_ema_update_([emas, other], params, [0.9, 0.99, 0.999])
    with pytest.raises(ValueError, match=r"got 1 decay values for 2 EMA list"):
        multi_ema_update_([emas, other], params, torch.tensor([0.9]))
    with pytest.raises(ValueError, match=r"decays\[1\] must be a number in \[0, 1\]"):
        multi_ema_update_([emas, other], params, [0.9, 2.0])
    assert unchanged(before, emas, other, params)


def test_multi_list_of_wrong_length(engine):
    emas, params = good()
    with pytest.raises(ValueError, match=r"emas\[1\] for 2 params"):
        multi_ema_update_([emas, emas[:1]], params, [0.9, 0.99])


def test_too_many_decays(engine):
    emas, params = good()
    lists = [[e.clone() for e in emas] for _ in range(9)]
    with pytest.raises(ValueError, match=r"between 1 and 8 decays"):
        multi_ema_update_(lists, params, [0.5] * 9)


def test_bad_skip(engine):
    emas, params = good()
    expect(ValueError, r"skip must hold one value", emas, params, skip=torch.zeros(2))
