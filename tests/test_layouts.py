"""Memory layouts in the functional API: dense non-contiguous tensors (channels_last, a
permutation) updated in one pass when EMA and param share the layout, clear errors
otherwise; and addresses that are not a multiple of the element size (from_blob, DLPack)
rejected before anything is written. Both engines, against the float64 reference."""
import pytest
import torch

from fused_ema import EMAPlan, ema_update_, multi_ema_update_

from test_engine import reference, tolerances
from test_validation import expect, good


def dense_layouts():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 7, 2, generator=g)
    return {
        "channels_last": x.to(memory_format=torch.channels_last),
        "permuted": torch.randn(7, 3, 5, generator=g).permute(1, 2, 0),
        "transposed": torch.randn(9, 65537 // 9 + 1, generator=g).t(),
        "size_one_dims": torch.randn(4, 1, 1, 3, generator=g).to(memory_format=torch.channels_last),
    }


@pytest.mark.parametrize("layout", list(dense_layouts()))
@pytest.mark.parametrize("ema_dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_dense_layouts_match_reference_and_fallback(engine, layout, ema_dtype):
    param = dense_layouts()[layout]
    ema = (param * 0.5 + 1).to(ema_dtype)  # keeps the strides (preserve_format)
    assert not param.is_contiguous() or layout == "size_one_dims"
    assert ema.stride() == param.stride()
    contiguous = [torch.randn(11), torch.randn(3, 4)]
    emas = [ema] + [t.clone().to(ema_dtype) for t in contiguous]
    params = [param] + contiguous
    expected = [reference(e, p, 0.9) for e, p in zip(emas, params)]
    ema_update_(emas, params, 0.9)
    for e, ref in zip(emas, expected):
        torch.testing.assert_close(e.double(), ref, **tolerances(ema_dtype))
    assert emas[0].stride() == param.stride()


def test_dense_layout_is_the_same_numbers_on_both_engines(monkeypatch):
    from fused_ema import _ext

    if _ext._C is None:
        pytest.skip("compiled module not available")
    param = torch.randn(2, 8, 5, 5).to(memory_format=torch.channels_last)
    ema = torch.randn(2, 8, 5, 5).to(memory_format=torch.channels_last)
    a, b = ema.clone(), ema.clone()
    ema_update_([a], [param], 0.75)
    monkeypatch.setattr(_ext, "FORCE_PYTHON", True)
    ema_update_([b], [param], 0.75)
    assert torch.equal(a, b)


def test_plan_and_multi_decay_on_channels_last(engine):
    param = torch.randn(2, 4, 3, 3).to(memory_format=torch.channels_last)
    fast, slow = param.clone() + 1, param.clone() - 1
    want_fast, want_slow = reference(fast, param, 0.5), reference(slow, param, 0.99)
    multi_ema_update_([[fast], [slow]], [param], [0.5, 0.99])
    torch.testing.assert_close(fast.double(), want_fast, **tolerances(torch.float32))
    torch.testing.assert_close(slow.double(), want_slow, **tolerances(torch.float32))
    plan = EMAPlan([fast], [param])
    want = reference(fast, param, 0.5)
    plan.update_(0.5)
    torch.testing.assert_close(fast.double(), want, **tolerances(torch.float32))


def test_different_layouts_are_an_error(engine):
    emas, params = good()
    expect(ValueError, r"emas\[2\] has strides \[1, 6\] but params\[2\] has strides \[4, 1\]"
           r".*param's memory layout",
           emas + [torch.zeros(4, 6).t()], params + [torch.zeros(6, 4)])
    emas, params = good()
    p = torch.zeros(2, 3, 4, 5)
    expect(ValueError, r"emas\[2\] has strides .* but params\[2\] has strides",
           emas + [p.clone()], params + [p.to(memory_format=torch.channels_last)])


def test_a_plan_refuses_a_layout_change(engine):
    param = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)
    ema = param.clone()
    plan = EMAPlan([ema], [param])
    # Same storage, same shape, another dense layout: another tensor as far as the plan goes.
    for t in (ema, param):
        t.set_(t.untyped_storage(), 0, t.shape, (60, 20, 1, 4))
    with pytest.raises(RuntimeError, match="replaced or resized"):
        plan.update_(0.5)


def test_not_dense_is_an_error(engine):
    emas, params = good()
    expect(ValueError, r"params\[2\] is neither contiguous nor dense \(strides \[2\]\)",
           emas + [torch.zeros(5)], params + [torch.zeros(10)[::2]])
    emas, params = good()
    expect(ValueError, r"emas\[2\] is neither contiguous nor dense",
           emas + [torch.zeros(4, 10)[:, :5]], params + [torch.zeros(4, 5)])
    emas, params = good()
    expect(ValueError, r"params\[2\] is neither contiguous nor dense",  # expanded: overlapping
           emas + [torch.zeros(4, 5)], params + [torch.zeros(1, 5).expand(4, 5)])


def misaligned(dtype, n=6):
    """A tensor whose address is one byte past a multiple of its element size."""
    storage = torch.zeros(n * torch.finfo(dtype).bits // 8 + 16, dtype=torch.uint8)
    base = storage.data_ptr()
    start = (-base) % 16 + 1  # 16-byte aligned, plus one byte
    t = torch.empty(0, dtype=dtype)
    t.set_(storage.untyped_storage()[start:start + n * t.element_size()], 0, (n,), (1,))
    assert t.data_ptr() % t.element_size() == 1
    return t


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_misaligned_tensors_are_rejected(engine, dtype):
    emas, params = good()
    expect(ValueError, r"params\[2\] starts at address 0x[0-9a-f]+, which is not a multiple of "
           r"its element size", emas + [torch.zeros(6, dtype=dtype)], params + [misaligned(dtype)])
    emas, params = good()
    expect(ValueError, r"emas\[2\] starts at address .* not a multiple of its element size",
           emas + [misaligned(dtype)], params + [torch.zeros(6, dtype=dtype)])
