"""FusedEMA against a plain float64 reference loop, ema-pytorch and torch_ema."""
import io
import math
import re
import warnings

import pytest
import torch
from torch import nn

import fused_ema
from conftest import requires_cuda
from fused_ema import FusedEMA
from fused_ema.schedules import Constant, Cosine, HalfLife, Warmup

TOL = dict(rtol=1e-5, atol=1e-6)  # fp32 EMA against a float64 loop


# ----------------------------------------------------------------------------- helpers

def make_model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 3)).to(dtype)


def float_state(model):
    """name -> float64 copy of every parameter and floating buffer; ints as they are."""
    out = {}
    for n, t in list(model.named_parameters()) + list(model.named_buffers()):
        out[n] = t.detach().double().clone() if t.is_floating_point() else t.detach().clone()
    return out


def perturb(model, gen, scale=0.1):
    """A stand-in for a training step: every parameter and buffer changes."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_((torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale).to(p))
        for b in model.buffers():
            if b.is_floating_point():
                b.add_((torch.rand(b.shape, generator=gen, dtype=torch.float64) * scale).to(b))
            else:
                b.add_(1)


class Reference:
    """The plain loop: ema = d * ema + (1 - d) * x in float64, per tensor, per step."""

    def __init__(self, model, average=("params",), copy_names=(), skip_names=()):
        self.state = float_state(model)
        self.params = {n for n, _ in model.named_parameters()}
        self.average_buffers = "buffers" in average
        self.copy_names, self.skip_names = set(copy_names), set(skip_names)

    def update(self, model, decay):
        if decay is None:
            return
        now = float_state(model)
        for n, x in now.items():
            if n in self.skip_names:
                continue
            if not x.is_floating_point() or n in self.copy_names:
                self.state[n] = x.clone()
            elif n in self.params or self.average_buffers:
                self.state[n] = decay * self.state[n] + (1 - decay) * x
            else:
                self.state[n] = x.clone()


def ref_decay(s, schedule, after=0, every=1):
    """The decay of the update at call s (0-based), None for a call that updates nothing."""
    if (s + 1) % every:
        return None
    if s < after:
        return 0.0
    return schedule(s - after) ** every


def assert_matches(ema_module, ref, **tol):
    tol = tol or TOL
    for n, t in list(ema_module.named_parameters()) + list(ema_module.named_buffers()):
        if n in ref.skip_names:
            continue
        expected = ref.state[n]
        if t.is_floating_point():
            torch.testing.assert_close(t.double(), expected, **tol, msg=lambda m: f"{n}: {m}")
        else:
            assert torch.equal(t, expected), n


def snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ----------------------------------------------------------------------------- core

def test_constant_decay_matches_reference(engine):
    model = make_model()
    ema = FusedEMA(model, decay=0.9)
    ref = Reference(model)
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        perturb(model, g)
        ema.update()
        ref.update(model, 0.9)
    assert_matches(ema.module, ref)
    assert ema.step == 20
    assert ema.module[1].num_batches_tracked.item() == 20  # integer counter copied


def test_tau_is_one_minus_decay():
    model = make_model()
    a, b = FusedEMA(model, tau=0.25), FusedEMA(model, decay=0.75)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        perturb(model, g)
        a.update()
        b.update()
    assert_same(snapshot(a.module), snapshot(b.module))


def test_module_is_a_frozen_eval_copy():
    model = make_model()
    model.train()
    ema = FusedEMA(model, decay=0.9)
    m = ema.module
    assert m is not model and isinstance(m, nn.Sequential)
    assert not m.training and all(not p.requires_grad for p in m.parameters())
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(m.parameters(), model.parameters()))
    fresh = make_model(seed=5)
    fresh.load_state_dict(m.state_dict())  # loads into a fresh instance of the model class
    x = torch.randn(4, 5)
    torch.testing.assert_close(fresh.eval()(x), ema(x))
    assert ema.modules == [m]


def test_tied_weights_stay_tied():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.out = nn.Linear(4, 10, bias=False)
            self.out.weight = self.emb.weight

    model = Tied()
    ema = FusedEMA(model, decay=0.5)
    with torch.no_grad():
        model.emb.weight.add_(1.0)
    ema.update()
    assert ema.module.out.weight is ema.module.emb.weight
    torch.testing.assert_close(ema.module.emb.weight, model.emb.weight - 0.5)


@pytest.mark.parametrize("decay", [
    Constant(0.8),
    Warmup(0.99, gamma=2.0, power=0.75, min_decay=0.3),
    Cosine(0.7, total_steps=9),
    HalfLife(3),
    lambda step: 0.5 + 0.4 * math.tanh(step / 5),
], ids=["Constant", "Warmup", "Cosine", "HalfLife", "callable"])
@pytest.mark.parametrize("after,every", [(0, 1), (4, 1), (0, 3), (5, 2)])
def test_schedules_update_after_step_and_every(decay, after, every):
    model = make_model()
    ema = FusedEMA(model, decay=decay, update_after_step=after, update_every=every)
    schedule = decay if callable(decay) else None
    ref = Reference(model)
    g = torch.Generator().manual_seed(2)
    for s in range(15):
        perturb(model, g)
        d = ref_decay(s, schedule, after, every)
        if d is not None:
            assert ema.decay_at() == [pytest.approx(d, rel=1e-12)]
        ema.update()
        ref.update(model, d)
        assert_matches(ema.module, ref)


def test_update_every_keeps_the_averaging_horizon():
    # A weight that jumps once and then stays: with update_every=k and decay**k the EMA
    # agrees with the every-step EMA at each k-th step.
    p = torch.zeros(3)
    every, fast = FusedEMA([p], decay=0.9, update_every=4), FusedEMA([p], decay=0.9)
    p.fill_(1.0)
    for s in range(1, 17):
        every.update()
        fast.update()
        if s % 4 == 0:
            torch.testing.assert_close(every.parameters()[0], fast.parameters()[0])


def test_dqn_hard_update():
    online = make_model()
    target = FusedEMA(online, tau=1.0, update_every=5)
    g = torch.Generator().manual_seed(3)
    last = snapshot(target.module)
    for s in range(1, 16):
        perturb(online, g)
        target.update()
        if s % 5 == 0:
            assert_same(snapshot(target.module), snapshot(online))
            last = snapshot(target.module)
        else:
            assert_same(snapshot(target.module), last)


def test_multiple_decays_in_one_pass(engine):
    model = make_model()
    decays = (0.9, 0.99, Warmup(0.999, power=0.75))
    ema = FusedEMA(model, decays=decays)
    singles = [FusedEMA(model, decay=d) for d in decays]
    g = torch.Generator().manual_seed(4)
    for _ in range(8):
        perturb(model, g)
        ema.update()
        for e in singles:
            e.update()
    assert len(ema.modules) == 3 and ema.module is ema.modules[0]
    for m, e in zip(ema.modules, singles):
        assert_same(snapshot(m), snapshot(e.module))
    assert len({id(p) for m in ema.modules for p in m.parameters()}) == 3 * 6


def test_decays_limit_and_single_choice():
    model = make_model()
    with pytest.raises(ValueError, match="1 to 8"):
        FusedEMA(model, decays=[0.9] * 9)
    with pytest.raises(ValueError, match="exactly one"):
        FusedEMA(model, decay=0.9, tau=0.1)
    with pytest.raises(ValueError, match="exactly one"):
        FusedEMA(model)


@pytest.mark.parametrize("kwargs", [
    dict(decay=1.5), dict(decay=-0.01), dict(decay=float("nan")), dict(tau=1.01),
    dict(tau=-1.0), dict(decays=[0.9, 2.0]), dict(decay=0.9, update_every=0),
    dict(decay=0.9, update_after_step=-1), dict(decay=0.9, buffers="sum"),
])
def test_bad_settings_raise(kwargs):
    with pytest.raises(ValueError):
        FusedEMA(make_model(), **kwargs)


def test_bad_types_raise():
    with pytest.raises(TypeError, match="not tau"):
        FusedEMA(make_model(), tau=Cosine(0.99, total_steps=3))
    with pytest.raises(TypeError):
        FusedEMA(make_model(), decay="0.9")
    with pytest.raises(TypeError):
        FusedEMA(make_model(), decay=0.9, ema_dtype=torch.int32)
    with pytest.raises(TypeError, match="not a tensor"):
        FusedEMA([torch.zeros(2), "x"], decay=0.9)


def test_bad_callable_decay_changes_nothing():
    model = make_model()
    ema = FusedEMA(model, decay=lambda step: 0.9 if step < 2 else 1.5)
    ema.update()
    ema.update()
    before = snapshot(ema.module)
    perturb(model, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ema.update()
    assert_same(snapshot(ema.module), before)
    assert ema.step == 2


def test_no_floating_parameters_is_an_error():
    class Counter(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("n", torch.zeros((), dtype=torch.int64))
            self.p = nn.Parameter(torch.zeros(3, dtype=torch.int64), requires_grad=False)

    with pytest.raises(ValueError, match="no floating-point parameters"):
        FusedEMA(Counter(), decay=0.9)
    with pytest.raises(ValueError, match="no floating-point parameters"):
        FusedEMA(nn.ReLU(), decay=0.9)


# ----------------------------------------------------------------------------- dtypes

def test_bf16_model_gets_fp32_ema_by_default():
    model = make_model(dtype=torch.bfloat16)
    ema = FusedEMA(model, decay=0.999)
    assert {t.dtype for t in ema.module.state_dict().values() if t.is_floating_point()} == \
        {torch.float32}
    ref = Reference(model)
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        perturb(model, g, scale=1.0)
        ema.update()
        ref.update(model, 0.999)
    assert_matches(ema.module, ref)


def test_bf16_ema_stops_moving_and_warns():
    p = torch.ones(1000, dtype=torch.bfloat16)
    with pytest.warns(UserWarning, match="barely moves"):
        stuck = FusedEMA([p], decay=0.999, ema_dtype=torch.bfloat16)
    fp32 = FusedEMA([p], decay=0.999)
    p.fill_(1.5)  # EMA 1.0, increment 0.0005 per step: under bf16's spacing of 1/128 at 1.0
    for _ in range(50):
        stuck.update()
        fp32.update()
    assert torch.all(stuck.parameters()[0] == 1.0)
    torch.testing.assert_close(fp32.parameters()[0],
                               torch.full((1000,), 1.5 - 0.5 * 0.999 ** 50), rtol=1e-5, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FusedEMA([p], decay=0.9, ema_dtype=torch.bfloat16)  # coarse enough: no warning


@pytest.mark.parametrize("ema_dtype", [torch.float64, torch.float16, None])
def test_ema_dtype_survives_state_dict(ema_dtype):
    model = make_model(dtype=torch.bfloat16)
    ema = FusedEMA(model, decay=0.9, ema_dtype=ema_dtype)
    expected = ema_dtype or torch.float32
    perturb(model, torch.Generator().manual_seed(0))
    ema.update()
    buf = io.BytesIO()
    torch.save(ema.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf)
    assert {t.dtype for t in sd["emas"][0].values() if t.is_floating_point()} == {expected}
    other = FusedEMA(make_model(dtype=torch.bfloat16, seed=3), decay=0.9, ema_dtype=ema_dtype)
    other.load_state_dict(sd)
    assert_same(snapshot(other.module), snapshot(ema.module))
    wrong = torch.float32 if ema_dtype is not None else torch.float64
    mismatched = FusedEMA(make_model(dtype=torch.bfloat16), decay=0.9, ema_dtype=wrong)
    before = snapshot(mismatched.module)
    with pytest.raises(ValueError, match="ema_dtype"):
        mismatched.load_state_dict(sd)
    assert_same(snapshot(mismatched.module), before)


# ----------------------------------------------------------------------------- buffers

@pytest.mark.parametrize("mode", ["copy", "average", "ignore"])
def test_buffer_modes(mode):
    model = make_model()
    ema = FusedEMA(model, decay=0.8, buffers=mode)
    initial = snapshot(ema.module)
    bn = "1.running_mean", "1.running_var", "1.num_batches_tracked"
    ref = Reference(model, average=("params", "buffers") if mode == "average" else ("params",),
                    skip_names=bn if mode == "ignore" else ())
    g = torch.Generator().manual_seed(0)
    for _ in range(6):
        perturb(model, g)
        ema.update()
        ref.update(model, 0.8)
    assert_matches(ema.module, ref)
    if mode == "ignore":
        for n in bn:
            assert torch.equal(ema.module.state_dict()[n], initial[n])
    else:
        assert ema.module[1].num_batches_tracked.item() == 6


def test_many_integer_buffers_are_copied():
    model = nn.Sequential(*[nn.BatchNorm1d(3) for _ in range(6)])
    ema = FusedEMA(model, decays=(0.9, 0.5))
    for i, bn in enumerate(model):
        bn.num_batches_tracked.fill_(i * 10 + 1)
    ema.update()
    for m in ema.modules:
        assert [bn.num_batches_tracked.item() for bn in m] == [1, 11, 21, 31, 41, 51]
    state = m.state_dict()  # the counters are views of one tensor now: still saved each
    assert state["5.num_batches_tracked"].item() == 51


# ----------------------------------------------------------------------------- matching

class Wrapper(nn.Module):
    """A DDP-style wrapper: names gain a `module.` prefix."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return self.module(x)


def test_compiled_model_prefix():
    model = make_model()
    compiled = torch.compile(model)  # not run: only the wrapper's names matter
    assert next(iter(dict(compiled.named_parameters()))).startswith("_orig_mod.")
    ema = FusedEMA(compiled, decay=0.9)
    assert "0.weight" in ema.module.state_dict()
    make_model().load_state_dict(ema.module.state_dict())
    ref = Reference(model)
    perturb(model, torch.Generator().manual_seed(0))
    ema.update(compiled)
    ref.update(model, 0.9)
    assert_matches(ema.module, ref)


def test_ddp_style_prefixes():
    model = make_model()
    ema = FusedEMA(model, decay=0.9)
    other = Wrapper(make_model(seed=1))  # a different model with `module.` names
    ref = Reference(other.module)
    perturb(other, torch.Generator().manual_seed(0))
    ema.update(other)  # matched by name through the prefix
    ref.state = float_state(model)
    ref.update(other.module, 0.9)
    assert_matches(ema.module, ref)
    ema.copy_to(Wrapper(model))
    assert_same(snapshot(model), snapshot(ema.module))
    # a checkpoint whose keys carry the prefixes loads too
    sd = ema.state_dict()
    sd["emas"] = [{"module._orig_mod." + k: v for k, v in s.items()} for s in sd["emas"]]
    fresh = FusedEMA(make_model(seed=7), decay=0.9)
    fresh.load_state_dict(sd)
    assert_same(snapshot(fresh.module), snapshot(ema.module))


def _real_ddp_prefix_check(store_dir):
    """Runs in a child process (see test_real_ddp_prefix)."""
    import os
    import traceback

    import torch.distributed as dist

    code = 1
    try:
        dist.init_process_group("gloo", init_method=f"file://{store_dir}/store", rank=0,
                                world_size=1)
        model = make_model()
        ddp = nn.parallel.DistributedDataParallel(model)
        ema = FusedEMA(ddp, decay=0.5)
        assert "0.weight" in ema.module.state_dict()
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        ema.attach(opt)
        ref = Reference(model)
        ddp(torch.randn(8, 5)).sum().backward()
        opt.step()
        ref.update(model, 0.5)
        assert_matches(ema.module, ref)
        code = 0
    except BaseException:
        traceback.print_exc()
    # Leave without tearing the process group down: gloo's destructor can hang
    # joining its threads (seen once in a full CI run).
    os._exit(code)


def test_real_ddp_prefix(tmp_path):
    import multiprocessing

    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    child = multiprocessing.get_context("spawn").Process(target=_real_ddp_prefix_check,
                                                         args=(str(tmp_path),))
    child.start()
    child.join(120)
    if child.is_alive():
        child.kill()
        pytest.fail("the single-process DDP run did not finish in 120 s")
    assert child.exitcode == 0, "the DDP check failed in the child process (traceback above)"


def test_unmatched_model_is_an_error():
    ema = FusedEMA(make_model(), decay=0.9)
    other = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    with pytest.raises(ValueError, match=r"1\.running_mean"):
        ema.copy_to(other)
    bigger = make_model()
    bigger.add_module("4", nn.Linear(3, 1))
    with pytest.raises(ValueError, match=r"4\.weight"):
        ema.update(bigger)


def test_exclude_names_patterns_prefixes_and_regex():
    model = make_model()
    ema = FusedEMA(model, decay=0.5, exclude=["3", "*.bias", re.compile(r"running_var$")])
    initial = snapshot(ema.module)
    perturb(model, torch.Generator().manual_seed(0))
    ema.update()
    now = snapshot(ema.module)
    for n in ["3.weight", "3.bias", "0.bias", "1.bias", "1.running_var"]:
        assert torch.equal(now[n], initial[n]), n
    for n in ["0.weight", "1.weight", "1.running_mean"]:
        assert not torch.equal(now[n], initial[n]), n
    with pytest.raises(ValueError, match="match no parameter"):
        FusedEMA(model, decay=0.5, exclude=["nothing.here"])
    with pytest.raises(ValueError, match="every floating-point parameter is excluded"):
        FusedEMA(model, decay=0.5, exclude=["*"])


def test_frozen_parameters_are_copied():
    model = make_model()
    model[0].weight.requires_grad_(False)
    ema = FusedEMA(model, decay=0.5, frozen="copy")
    perturb(model, torch.Generator().manual_seed(0))
    ema.update()
    assert torch.equal(ema.module[0].weight, model[0].weight)  # copied
    ref = Reference(model, copy_names=["0.weight"])
    model[0].weight.requires_grad_(True)
    ema.replan()  # after unfreezing it is averaged
    perturb(model, torch.Generator().manual_seed(1))
    ref.state = float_state(ema.module)
    ema.update()
    ref.copy_names = set()
    ref.update(model, 0.5)
    assert_matches(ema.module, ref)


@pytest.mark.parametrize("frozen, says", [("copy", "only copies"),
                                          ("share", "shares them with the model")])
def test_all_frozen_warns(frozen, says):
    model = make_model().requires_grad_(False)
    with pytest.warns(UserWarning, match=says):
        FusedEMA(model, decay=0.9, frozen=frozen)


# ----------------------------------------------------------------------------- replaced tensors

def test_replaced_parameter_is_replanned():
    model = make_model()
    ema = FusedEMA(model, decay=0.5)
    model[3] = nn.Linear(7, 3)  # same names and shapes, new tensors
    ref = Reference(model)
    ref.state = float_state(ema.module)
    ema.update()
    ref.update(model, 0.5)
    assert_matches(ema.module, ref)
    model[3].weight = nn.Parameter(torch.ones(3, 7))
    ema.update()
    ref.update(model, 0.5)
    assert_matches(ema.module, ref)


def test_new_storage_is_replanned():
    model = make_model()
    ema = FusedEMA(model, decay=0.5)
    ref = Reference(model)
    model.double()  # every parameter gets new storage of another dtype
    perturb(model, torch.Generator().manual_seed(0))
    ema.update()
    ref.update(model, 0.5)
    assert_matches(ema.module, ref)
    assert ema.module[0].weight.dtype == torch.float32  # the EMA keeps its dtype
    with torch.no_grad():
        model[0].weight.data = model[0].weight.data.clone() * 2  # new storage, same shape
    ema.update()
    ref.update(model, 0.5)
    assert_matches(ema.module, ref)


def test_replaced_parameter_of_another_shape_is_an_error():
    model = make_model()
    ema = FusedEMA(model, decay=0.5)
    model[3].weight = nn.Parameter(torch.zeros(4, 7))
    before = snapshot(ema.module)
    with pytest.raises(ValueError, match=r"'3\.weight' has shape \[4, 7\]"):
        ema.update()
    assert_same(snapshot(ema.module), before)


def test_channels_last_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1))
    model = model.to(memory_format=torch.channels_last)
    assert not model[0].weight.is_contiguous()
    ema = FusedEMA(model, decay=0.7)
    ref = Reference(model)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        perturb(model, g)
        ema.update()
        ref.update(model, 0.7)
    assert_matches(ema.module, ref)
    model.to(memory_format=torch.contiguous_format)  # new layout: replanned
    perturb(model, g)
    ema.update()
    ref.update(model, 0.7)
    assert_matches(ema.module, ref)


# ----------------------------------------------------------------------------- bare tensors

def test_list_of_tensors_and_named_pairs():
    params = [torch.randn(4, 3), torch.randn(5)]
    ema = FusedEMA(params, decay=0.6)
    named = FusedEMA([("a", params[0]), ("b", params[1])], decay=0.6)
    assert ema.module is None
    refs = [p.double().clone() for p in params]
    for _ in range(4):
        for p in params:
            p.add_(torch.randn_like(p))
        ema.update()
        named.update()
        refs = [0.6 * r + 0.4 * p.double() for r, p in zip(refs, params)]
    for e, r in zip(ema.parameters(), refs):
        torch.testing.assert_close(e.double(), r, **TOL)
    assert [n for n, *_ in named.named_pairs()] == ["a", "b"]
    assert torch.equal(named.state_dict()["emas"][0]["b"], ema.parameters()[1])
    with ema.swapped():
        assert torch.equal(params[0], ema.parameters()[0])
    assert not torch.equal(params[0], ema.parameters()[0])


def test_named_pairs_is_the_seam():
    model = make_model()
    ema = FusedEMA(model, decays=(0.9, 0.5), buffers="ignore")
    pairs = list(ema.named_pairs(1))
    assert [n for n, *_ in pairs] == ["0.weight", "0.bias", "1.weight", "1.bias", "3.weight",
                                      "3.bias"]
    for n, e, p in pairs:
        assert p is dict(model.named_parameters())[n]
        assert e is dict(ema.modules[1].named_parameters())[n]


# ----------------------------------------------------------------------------- other libraries

def test_matches_torch_ema():
    torch_ema = pytest.importorskip("torch_ema")
    model = make_model()
    params = list(model.parameters())
    ref = torch_ema.ExponentialMovingAverage(params, decay=0.99, use_num_updates=True)
    # torch_ema's num_updates warmup: min(decay, (1 + n) / (10 + n)) with n counted from 1
    ours = FusedEMA(params, decay=lambda step: min(0.99, (2 + step) / (11 + step)))
    plain_ref = torch_ema.ExponentialMovingAverage(params, decay=0.95, use_num_updates=False)
    plain = FusedEMA(model, decay=0.95, buffers="ignore")
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        perturb(model, g)
        ref.update()
        ours.update()
        plain_ref.update()
        plain.update()
    for a, b in zip(ours.parameters(), ref.shadow_params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(plain.parameters(), plain_ref.shadow_params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # torch_ema's store / copy_to / restore is ema.swapped()
    before = [p.clone() for p in params]
    with plain.swapped():
        plain_ref.store()
        plain_ref.copy_to()
        for p, e in zip(params, plain_ref.shadow_params):
            torch.testing.assert_close(p, e, rtol=1e-5, atol=1e-6)
        plain_ref.restore()
    for p, b in zip(params, before):
        assert torch.equal(p, b)


def test_matches_ema_pytorch_warmup_and_update_after_step():
    ema_pytorch = pytest.importorskip("ema_pytorch")

    class Net(nn.Module):  # floating buffer only: ema-pytorch leaves integer buffers alone
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(5, 4)
            self.register_buffer("stat", torch.zeros(4))

    torch.manual_seed(0)
    model = Net()
    ref = ema_pytorch.EMA(model, beta=0.995, update_after_step=3, update_every=1, inv_gamma=2.0,
                          power=0.75, min_value=0.2, include_online_model=False)
    ours = FusedEMA(model, decay=Warmup(0.995, gamma=2.0, power=0.75, min_decay=0.2),
                    update_after_step=3, buffers="average")
    g = torch.Generator().manual_seed(0)
    for _ in range(25):
        perturb(model, g)
        ref.update()
        ours.update()
        for (n, a), b in zip(ours.module.state_dict().items(), ref.ema_model.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)


# ----------------------------------------------------------------------------- optimizer hook

OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01),
    "adam-foreach": lambda p: torch.optim.Adam(p, lr=0.01, foreach=True),
    "adam-fused": lambda p: torch.optim.Adam(p, lr=0.01, fused=True),
    "adamw-fused": lambda p: torch.optim.AdamW(p, lr=0.01, fused=True),
}


def train_step(model, opt, gen, scaler=None, inf=False):
    x = torch.randn(8, 5, generator=gen)
    loss = model(x).square().mean()
    opt.zero_grad()
    if scaler is None:
        loss.backward()
        opt.step()
        return
    scaler.scale(loss).backward()
    if inf:
        model[0].weight.grad[0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_attach_updates_after_each_step(name):
    model = make_model()
    opt = OPTIMIZERS[name](model.parameters())
    ema = FusedEMA(model, decay=0.8)
    handle = ema.attach(opt)
    ref = Reference(model)
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        train_step(model, opt, g)
        ref.update(model, 0.8)
    assert_matches(ema.module, ref)
    assert ema.step == 4
    with pytest.raises(RuntimeError, match="already attached"):
        ema.attach(opt)
    handle.remove()
    train_step(model, opt, g)
    assert ema.step == 4
    ema.attach(opt).remove()  # attachable again after remove()


@pytest.mark.parametrize("name", ["sgd", "adam-foreach", "adam-fused", "adamw-fused"])
@pytest.mark.parametrize("pass_scaler", [True, False])
def test_attach_skips_steps_the_grad_scaler_skipped(name, pass_scaler):
    model = make_model()
    opt = OPTIMIZERS[name](model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    ema = FusedEMA(model, decay=0.8)
    ema.attach(opt, scaler=scaler if pass_scaler else None)
    ref = Reference(model)
    g = torch.Generator().manual_seed(0)
    for s in range(6):
        params_before = {n: p.detach().clone() for n, p in model.named_parameters()}
        ema_before = snapshot(ema.module)
        skipped = s in (2, 3)
        train_step(model, opt, g, scaler=scaler, inf=skipped)
        if skipped:
            # the optimizer skipped the step (BatchNorm statistics did move in the forward)
            assert_same({n: p.detach() for n, p in model.named_parameters()}, params_before)
            assert_same(snapshot(ema.module), ema_before)  # and so did the EMA
        else:
            ref.update(model, 0.8)
    assert_matches(ema.module, ref)
    assert ema.step == 4  # skipped steps are not counted (a CPU found-inf is read for free)


def test_optimizer_without_the_models_parameters():
    ema = FusedEMA(make_model(), decay=0.9)
    opt = torch.optim.SGD(make_model().parameters(), lr=0.1)
    with pytest.raises(ValueError, match="holds none of the parameters"):
        ema.attach(opt)
    with pytest.raises(TypeError, match="GradScaler"):
        ema.attach(torch.optim.SGD(ema.module.parameters(), lr=0.1), scaler=object())


# ----------------------------------------------------------------------------- swap and copy

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swapped_restores_the_online_weights_exactly(dtype):
    model = make_model(dtype=dtype)
    ema = FusedEMA(model, decays=(0.9, 0.5))
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        perturb(model, g)
        ema.update()
    online = snapshot(model)
    for index in (0, 1):
        with ema.swapped(index=index) as m:
            assert m is model
            for (n, t), e in zip(model.state_dict().items(),
                                 ema.modules[index].state_dict().values()):
                assert torch.equal(t, e.to(t.dtype)), n
            model(torch.randn(4, 5, dtype=dtype))  # train-mode forward moves BN statistics
        assert_same(snapshot(model), online)
    with pytest.raises(KeyError):
        with ema.swapped():
            raise KeyError("inside")
    assert_same(snapshot(model), online)
    ema.copy_to(index=1)
    for t, e in zip(model.state_dict().values(), ema.modules[1].state_dict().values()):
        assert torch.equal(t, e.to(t.dtype))


# ----------------------------------------------------------------------------- checkpoints

def run(ema, model, gen, steps):
    for _ in range(steps):
        perturb(model, gen)
        ema.update()


@pytest.mark.parametrize("capturable", [False, True])
def test_resume_is_bit_exact(capturable, engine):
    settings = dict(decays=(Cosine(0.9, total_steps=12), 0.95), update_every=2,
                    update_after_step=3, capturable=capturable)
    full_model = make_model(dtype=torch.bfloat16)
    full = FusedEMA(full_model, **settings)
    run(full, full_model, torch.Generator().manual_seed(0), 13)

    model = make_model(dtype=torch.bfloat16)
    first = FusedEMA(model, **settings)
    gen = torch.Generator().manual_seed(0)
    run(first, model, gen, 7)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "ema": first.state_dict(), "gen": gen.get_state()},
               buf)
    buf.seek(0)
    ckpt = torch.load(buf)
    model2 = make_model(dtype=torch.bfloat16, seed=9)
    model2.load_state_dict(ckpt["model"])
    second = FusedEMA(model2, **settings)
    second.load_state_dict(ckpt["ema"])
    assert second.step == 7
    gen2 = torch.Generator()
    gen2.set_state(ckpt["gen"])
    run(second, model2, gen2, 6)
    for a, b in zip(full.modules, second.modules):
        assert_same(snapshot(a), snapshot(b))


def test_load_with_other_settings_says_what_differs():
    model = make_model()
    ema = FusedEMA(model, decay=Cosine(0.99, total_steps=100), update_every=2)
    sd = ema.state_dict()
    other = FusedEMA(model, decay=0.99, update_every=3, buffers="average")
    before = snapshot(other.module)
    with pytest.raises(ValueError) as info:
        other.load_state_dict(sd)
    msg = str(info.value)
    assert "Cosine" in msg and "update_every" in msg and "buffers" in msg
    assert_same(snapshot(other.module), before)
    assert other.step == 0


def test_load_state_dict_of_another_model_is_an_error():
    ema = FusedEMA(make_model(), decay=0.9)
    small = FusedEMA(nn.Sequential(nn.Linear(5, 7)), decay=0.9)
    before = snapshot(ema.module)
    with pytest.raises(ValueError, match="another model"):
        ema.load_state_dict(small.state_dict())
    wide = FusedEMA(nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(),
                                  nn.Linear(8, 3)), decay=0.9)
    with pytest.raises(ValueError, match=r"'0\.weight' has shape \[8, 5\]"):
        ema.load_state_dict(wide.state_dict())
    with pytest.raises(ValueError, match="not a FusedEMA state_dict"):
        ema.load_state_dict(ema.module.state_dict())
    assert_same(snapshot(ema.module), before)


# ----------------------------------------------------------------------------- capturable

@pytest.mark.parametrize("decay", [0.9, Warmup(0.99, power=0.75), Cosine(0.8, total_steps=10)],
                         ids=["float", "Warmup", "Cosine"])
def test_capturable_matches_default(decay):
    model = make_model()
    settings = dict(decays=(decay, HalfLife(4)), update_after_step=2, update_every=3,
                    buffers="average")
    host = FusedEMA(model, **settings)
    device = FusedEMA(model, capturable=True, **settings)
    assert isinstance(device._step_t, torch.Tensor)
    g = torch.Generator().manual_seed(0)
    for s in range(14):
        perturb(model, g)
        skip = torch.tensor(s == 8)  # a found-inf flag: no update, not counted
        host.update(skip=skip)
        device.update(skip=skip)
        for a, b in zip(host.modules, device.modules):
            for (n, x), y in zip(a.state_dict().items(), b.state_dict().values()):
                torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7, msg=n)
    assert host.step == device.step == 13


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_capturable_under_torch_compile(backend):
    if fused_ema.backend("cpu") == "python":
        pytest.skip("the pure-PyTorch fallback reads CPU decays on the host (not traceable)")
    model = make_model()
    settings = dict(decay=Cosine(0.8, total_steps=6), update_every=2, update_after_step=1)
    eager = FusedEMA(model, **settings)
    ema = FusedEMA(model, capturable=True, **settings)
    update = torch.compile(ema.update, backend=backend, fullgraph=True)
    g = torch.Generator().manual_seed(0)
    for _ in range(7):
        perturb(model, g)
        update()
        eager.update()
    for (n, x), y in zip(eager.module.state_dict().items(), ema.module.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7, msg=n)
    assert ema.step == 7


# ----------------------------------------------------------------------------- CUDA

@requires_cuda
def test_cuda_model_with_cpu_ema():
    model = make_model().cuda()
    ema = FusedEMA(model, decay=0.8, device="cpu")
    assert ema.module[0].weight.device.type == "cpu"
    ref = Reference(model)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        perturb(model, g)
        ema.update()
        ref.update(model, 0.8)
    ref.state = {k: v.cpu() for k, v in ref.state.items()}
    assert_matches(ema.module, ref)
    with ema.swapped():
        assert torch.equal(model[0].weight.cpu(), ema.module[0].weight)


@requires_cuda
def test_ema_follows_a_model_moved_to_cuda():
    model = make_model()
    ema = FusedEMA(model, decay=0.8)
    model.cuda()
    ema.update()
    assert ema.module[0].weight.device.type == "cuda"


@requires_cuda
def test_capturable_in_a_cuda_graph():
    model = make_model().cuda()
    ema = FusedEMA(model, decay=Cosine(0.9, total_steps=20), capturable=True)
    host = FusedEMA(model, decay=Cosine(0.9, total_steps=20))
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):  # warm up outside the graph
            ema.update()
            host.update()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ema.update()
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        perturb(model, g)
        graph.replay()
        host.update()
    torch.cuda.synchronize()
    assert ema.step == 8
    for x, y in zip(host.module.state_dict().values(), ema.module.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)


@requires_cuda
@pytest.mark.parametrize("capturable", [False, True])
def test_cuda_grad_scaler_found_inf_is_read_on_the_device(capturable):
    model = make_model().cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, fused=True)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 8)
    ema = FusedEMA(model, decay=0.8, capturable=capturable)
    ema.attach(opt, scaler=scaler)
    g = torch.Generator().manual_seed(0)
    for s in range(4):
        before = snapshot(ema.module)
        x = torch.randn(8, 5, generator=g).cuda()
        opt.zero_grad()
        scaler.scale(model(x).square().mean()).backward()
        if s == 2:
            model[0].weight.grad[0, 0] = float("inf")
        scaler.step(opt)
        scaler.update()
        after = snapshot(ema.module)
        if s == 2:
            assert_same(after, before)
        else:
            assert not torch.equal(after["0.weight"], before["0.weight"])
    # without capturable a device flag cannot be read for free: the step still counts
    assert ema.step == (3 if capturable else 4)
