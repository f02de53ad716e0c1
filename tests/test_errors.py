"""One validator per language: for every kind of bad input, the compiled path (csrc/plan.cpp)
and the fallback (fused_ema/validation.py) raise the same exception type with the same
message, through each entry point, and write nothing.

The table is the rules' list: a case builds (emas_per_decay, params) or gives bad decays
or a bad skip flag; each entry point is called once with the compiled kernels and once
forced onto the fallback.
"""
import pytest
import torch

from fused_ema import EMAPlan, _ext, ema_update_, multi_ema_update_

pytestmark = pytest.mark.skipif(_ext._C is None or _ext.FORCE_PYTHON,
                                reason="compares the compiled path with the fallback")


def good(n=3):
    params = [torch.randn(4), torch.randn(2, 3)]
    return [[p.clone() + 1 for p in params] for _ in range(n)], params


def single(emas, params):
    return [emas], params


def case_shape():
    emas, params = good(1)
    return single(emas[0] + [torch.zeros(3, 4)], params + [torch.zeros(4, 3)])


def case_ema_device():
    emas, params = good(1)
    return single(emas[0] + [torch.empty(5, device="meta")], params + [torch.zeros(5)])


def case_param_device():
    emas, params = good(1)
    return single(emas[0] + [torch.empty(5, device="meta")], params + [torch.empty(5, device="meta")])


def case_ema_dtype():
    emas, params = good(1)
    return single(emas[0] + [torch.zeros(5, dtype=torch.int32)], params + [torch.zeros(5)])


def case_param_dtype():
    emas, params = good(1)
    return single(emas[0] + [torch.zeros(5)], params + [torch.zeros(5, dtype=torch.int64)])


def case_not_dense():
    emas, params = good(1)
    return single(emas[0] + [torch.zeros(5)], params + [torch.zeros(10)[::2]])


def case_other_layout():
    emas, params = good(1)
    p = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)
    return single(emas[0] + [p.contiguous()], params + [p])


def case_misaligned():
    emas, params = good(1)
    raw = torch.zeros(40, dtype=torch.uint8)
    t = torch.empty(0)
    t.set_(raw.untyped_storage()[(-raw.data_ptr()) % 16 + 1:][:20], 0, (5,), (1,))
    return single(emas[0] + [t], params + [torch.zeros(5)])


def case_emas_overlap():
    emas, params = good(1)
    buf = torch.zeros(8)
    return single(emas[0] + [buf[:5], buf[3:8]], params + [torch.zeros(5), torch.zeros(5)])


def case_ema_is_its_param():
    emas, params = good(1)
    p = torch.zeros(5)
    return single(emas[0] + [p[:]], params + [p])


def case_ema_overlaps_another_param():
    emas, params = good(1)
    return single([params[0][:]] + emas[0][1:], params)


def case_too_many_decays():
    emas, params = good(9)
    return emas, params


CASES = {
    "shape": case_shape, "EMA device": case_ema_device, "param device": case_param_device,
    "EMA dtype": case_ema_dtype, "param dtype": case_param_dtype, "not dense": case_not_dense,
    "other layout": case_other_layout, "misaligned": case_misaligned,
    "EMAs overlap": case_emas_overlap, "EMA is its param": case_ema_is_its_param,
    "EMA overlaps another param": case_ema_overlaps_another_param,
    "too many decays": case_too_many_decays,
}

# (name, decays for one EMA list, for two, skip): bad values with good tensors
VALUES = {
    "decay above 1": ([1.5], [0.5, 1.5], None),
    "decay NaN": ([float("nan")], [float("nan"), 0.5], None),
    "decay below 0": ([-0.25], [0.5, -0.25], None),
    "decay count": ([0.5, 0.5], [0.5], None),
    "decay tensor dtype": (torch.tensor([1], dtype=torch.int64), torch.tensor([1, 1]), None),
    "decay tensor count": (torch.tensor([0.5, 0.5]), torch.tensor([0.5, 0.5, 0.5]), None),
    "decay tensor value": (torch.tensor([2.0]), torch.tensor([0.5, 2.0]), None),
    "skip of two values": ([0.5], [0.5, 0.5], torch.zeros(2, dtype=torch.bool)),
    "skip complex": ([0.5], [0.5, 0.5], torch.zeros((), dtype=torch.complex64)),
}


def run(entry, emas_per_decay, params, decays, skip):
    """(exception type, message) of one call, or None."""
    try:
        if entry == "ema_update_":
            decay = decays if isinstance(decays, torch.Tensor) else decays[0]
            if len(emas_per_decay) != 1 or (not isinstance(decays, torch.Tensor)
                                            and len(decays) != 1):
                multi_ema_update_(emas_per_decay, params, decays, skip=skip)
            else:
                ema_update_(emas_per_decay[0], params, decay, skip=skip)
        elif entry == "multi_ema_update_":
            multi_ema_update_(emas_per_decay, params, decays, skip=skip)
        else:
            plan = EMAPlan.multi(emas_per_decay, params)
            one_float = len(emas_per_decay) == 1 and isinstance(decays, list) and len(decays) == 1
            plan.update_(decays[0] if one_float else decays, skip)
    except (ValueError, TypeError, RuntimeError) as exc:
        return type(exc), str(exc)
    return None


def both_paths(monkeypatch, make, entry, decays=None, skip=None):
    """The same tensors through both paths (a message may name an address)."""
    results = []
    emas_per_decay, params = make()
    for force_python in (False, True):
        monkeypatch.setattr(_ext, "FORCE_PYTHON", force_python)
        before = [t.clone() for ts in emas_per_decay + [params] for t in ts
                  if t.device.type != "meta"]
        d = decays if decays is not None else [0.5] * len(emas_per_decay)
        results.append(run(entry, emas_per_decay, params, d, skip))
        after = [t for ts in emas_per_decay + [params] for t in ts if t.device.type != "meta"]
        assert all(torch.equal(a, b) for a, b in zip(before, after)), "written before failing"
    return results


ENTRIES = ["ema_update_", "multi_ema_update_", "EMAPlan"]


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("case", list(CASES))
def test_bad_tensors_same_error_on_both_paths(monkeypatch, case, entry):
    compiled, fallback = both_paths(monkeypatch, CASES[case], entry)
    assert compiled is not None, "the compiled path accepted it"
    assert compiled == fallback


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("value", list(VALUES))
@pytest.mark.parametrize("num_decays", [1, 2])
def test_bad_values_same_error_on_both_paths(monkeypatch, value, entry, num_decays):
    one, two, skip = VALUES[value]
    decays = one if num_decays == 1 else two
    compiled, fallback = both_paths(monkeypatch, lambda: good(num_decays), entry, decays, skip)
    assert compiled is not None, "the compiled path accepted it"
    assert compiled == fallback


@pytest.mark.parametrize("replace", ["param", "ema"])
def test_a_stale_tensor_is_named_alike(monkeypatch, replace):
    messages = []
    for force_python in (False, True):
        monkeypatch.setattr(_ext, "FORCE_PYTHON", force_python)
        emas_per_decay, params = good(2)
        plan = EMAPlan.multi(emas_per_decay, params)
        target = params[1] if replace == "param" else emas_per_decay[1][0]
        target.data = torch.zeros_like(target)
        before = [t.clone() for ts in emas_per_decay for t in ts]
        with pytest.raises(RuntimeError) as info:
            plan.update_([0.5, 0.5])
        assert all(torch.equal(a, b) for a, b in zip(before, [t for ts in emas_per_decay
                                                               for t in ts]))
        messages.append(str(info.value))
    want = "params[1]" if replace == "param" else "emas[1][0]"
    assert messages[0] == messages[1] and messages[0].startswith(f"fused_ema: {want} was ")


# ---- stochastic rounding: the bf16 rule and the step, on both paths ----------------------

def good_bf16(n=2, odd=None):
    """bf16 EMAs (``odd``: (k, i, dtype) of one EMA of another dtype)."""
    emas, params = good(n)
    emas = [[e.bfloat16() for e in es] for es in emas]
    if odd is not None:
        k, i, dtype = odd
        emas[k][i] = emas[k][i].to(dtype)
    return emas, params


# (name, tensors for one EMA list, for two, step, seed)
ROUNDING = {
    "float32 EMAs": (lambda: good(1), lambda: good(2), 0, 0),
    "one float16 EMA": (lambda: good_bf16(1, (0, 1, torch.float16)),
                        lambda: good_bf16(2, (1, 0, torch.float16)), 0, 0),
    "float64 and float32 EMAs": (lambda: good_bf16(1, (0, 0, torch.float64)),
                                 lambda: good_bf16(2, (1, 1, torch.float32)), 0, 0),
    "no step": (lambda: good_bf16(1), lambda: good_bf16(2), None, 0),
    "negative step": (lambda: good_bf16(1), lambda: good_bf16(2), -1, 0),
    "float step tensor": (lambda: good_bf16(1), lambda: good_bf16(2), torch.tensor(1.0), 0),
    "step tensor of two": (lambda: good_bf16(1), lambda: good_bf16(2),
                           torch.tensor([1, 2]), 0),
    "negative seed": (lambda: good_bf16(1), lambda: good_bf16(2), 0, -1),
    "seed of 64 bits": (lambda: good_bf16(1), lambda: good_bf16(2), 0, 1 << 63),
}


def run_stochastic(entry, emas_per_decay, params, step, seed):
    decays = [0.5] * len(emas_per_decay)
    try:
        if entry == "ema_update_" and len(emas_per_decay) == 1:
            ema_update_(emas_per_decay[0], params, 0.5, rounding="stochastic", seed=seed,
                        step=step)
        elif entry in ("ema_update_", "multi_ema_update_"):
            multi_ema_update_(emas_per_decay, params, decays, rounding="stochastic", seed=seed,
                              step=step)
        else:
            EMAPlan.multi(emas_per_decay, params, rounding="stochastic",
                          seed=seed).update_(decays, step=step)
    except (ValueError, TypeError, RuntimeError) as exc:
        return type(exc), str(exc)
    return None


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("case", list(ROUNDING))
@pytest.mark.parametrize("num_decays", [1, 2])
def test_bad_rounding_same_error_on_both_paths(monkeypatch, case, entry, num_decays):
    one, two, step, seed = ROUNDING[case]
    results = []
    emas_per_decay, params = (one if num_decays == 1 else two)()
    for force_python in (False, True):
        monkeypatch.setattr(_ext, "FORCE_PYTHON", force_python)
        before = [t.clone() for ts in emas_per_decay for t in ts]
        results.append(run_stochastic(entry, emas_per_decay, params, step, seed))
        assert all(torch.equal(a, b) for a, b in zip(before, [t for ts in emas_per_decay
                                                               for t in ts])), "written"
    assert results[0] is not None, "the compiled path accepted it"
    assert results[0] == results[1]


@pytest.mark.parametrize("step, seed", [(torch.tensor(1.0), 0), (torch.tensor([1, 2]), 0)])
def test_the_ops_check_the_step_as_the_fallback(step, seed):
    """The C++ ops' own step checks (for callers of torch.ops.fused_ema) say what
    validation.rounding_args says."""
    emas, params = good_bf16(1)
    with pytest.raises((ValueError, TypeError)) as ours:
        torch.ops.fused_ema.ema_update_(emas[0], params, 0.5, None, None, True, seed, 0, step)
    with pytest.raises((ValueError, TypeError)) as python:
        from fused_ema import validation
        validation.rounding_args(True, seed, step, params[0].device)
    assert (ours.type, str(ours.value)) == (python.type, str(python.value))


def test_the_ops_name_the_ema_that_is_not_bf16():
    emas, params = good_bf16(2, (1, 1, torch.float16))
    flat = [e for es in emas for e in es]
    before = [e.clone() for e in flat]
    with pytest.raises(ValueError, match=r"emas\[1\]\[1\] is float16; rounding='stochastic'"):
        torch.ops.fused_ema.multi_ema_update_(flat, params, [0.5, 0.5], None, None, True, 0, 3)
    assert all(torch.equal(a, b) for a, b in zip(before, flat))
