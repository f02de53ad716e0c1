"""FusedEMA's drop-in surface (issue 11): settable step, set/reset, store/restore,
copy_to/update on a parameter list, pickling, .to()/pin_memory(), load_state_dict
strict=False, copy= by name, a user-supplied EMA model. Numbers against a float64 loop;
failed calls modify nothing."""
import copy
import io
import pickle
import warnings

import pytest
import torch
from torch import nn

from fused_ema import FusedEMA
from fused_ema.schedules import Warmup
from test_fused_ema import assert_same, snapshot

TOL = dict(rtol=1e-6, atol=1e-7)


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 3))


def bump(model, amount=0.1):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(amount)
        model[1].running_mean.add_(amount)


def state(module):
    return {n: t.detach().double().clone() for n, t in module.state_dict().items()}


def ref_update(ref, model, decay, average=lambda n: True):
    params = {n for n, _ in model.named_parameters()}
    for n, t in model.state_dict().items():
        x = t.detach().double()
        if n in params and average(n):
            ref[n] = decay * ref[n] + (1 - decay) * x
        else:
            ref[n] = x.clone()


def assert_state(module, ref):
    for n, t in module.state_dict().items():
        torch.testing.assert_close(t.detach().double(), ref[n], **TOL, msg=lambda m: f"{n}: {m}")


# ----------------------------------------------------------------------------- step

def test_step_is_settable_and_update_takes_step():
    model = make_model()
    sched = Warmup(decay=0.999, gamma=1.0, power=1.0)
    ema = FusedEMA(model, decay=sched)
    ema.step = 40
    assert ema.step == 40 and ema.decay_at() == [pytest.approx(sched(40))]
    ref = state(ema.module)
    bump(model)
    ema.update(step=7)  # timm / diffusers pass the optimizer step
    ref_update(ref, model, sched(7))
    assert_state(ema.module, ref)
    assert ema.step == 8
    for bad in (-1, 1.5, True, "3"):
        with pytest.raises(ValueError, match="step must be an integer"):
            ema.step = bad
        with pytest.raises(ValueError, match="step must be an integer"):
            ema.update(step=bad)
    assert ema.step == 8


# ----------------------------------------------------------------------------- set / reset

def test_set_and_reset_copy_the_model():
    model, other = make_model(0), make_model(1)
    ema = FusedEMA(model, decays=[0.9, 0.99])
    bump(model)
    ema.update()
    ema.set(other)  # another model of the same names
    for m in ema.modules:
        for n, t in m.state_dict().items():
            assert torch.equal(t, other.state_dict()[n].to(t.dtype)), n
    assert ema.step == 1
    ema.set(list(model.parameters()))  # a parameter list: parameters only
    for n, p in ema.module.named_parameters():
        assert torch.equal(p, dict(model.named_parameters())[n])
    ema.reset()
    assert ema.step == 0
    for m in ema.modules:
        assert_same(m.state_dict(), model.state_dict())


# ----------------------------------------------------------------------------- store / restore

def test_store_copy_to_restore():
    model = make_model()
    ema = FusedEMA(model, decay=0.5)
    bump(model)
    ema.update()
    before = snapshot(model)
    ema.store()
    ema.copy_to()
    for n, t in model.state_dict().items():
        assert torch.equal(t, ema.module.state_dict()[n]), n
    ema.restore()
    assert_same(model.state_dict(), before)
    with pytest.raises(RuntimeError, match="without store"):
        ema.restore()


def test_store_restore_of_a_parameter_list():
    model = make_model()
    ema = FusedEMA(model, decay=0.5)
    bump(model)
    ema.update()
    params = list(model.parameters())
    saved = [p.detach().clone() for p in params]
    ema.store(params)
    ema.copy_to(params)
    for p, e in zip(params, ema.module.parameters()):
        assert torch.equal(p, e)
    ema.restore()
    for p, s in zip(params, saved):
        assert torch.equal(p, s)


# ----------------------------------------------------------------------------- parameter lists

def test_update_from_a_parameter_list_of_the_same_layout():
    model, other = make_model(0), make_model(1)
    ema = FusedEMA(model, decays=[0.9, 0.5])
    refs = [state(m) for m in ema.modules]
    params = list(other.parameters())
    for _ in range(3):
        bump(other, 0.3)
        ema.update(params)
        for ref, d in zip(refs, (0.9, 0.5)):
            for (n, _), p in zip(model.named_parameters(), params):
                ref[n] = d * ref[n] + (1 - d) * p.detach().double()
    for m, ref in zip(ema.modules, refs):
        assert_state(m, ref)  # buffers untouched: a parameter list has none
    assert ema.step == 3


def test_parameter_list_errors_modify_nothing():
    model = make_model()
    ema = FusedEMA(model, decay=0.5, exclude=["0.bias"])
    before = snapshot(ema.module)
    params = list(model.parameters())
    with pytest.raises(ValueError, match="got 5 tensors but this EMA has 6 parameters"):
        ema.update(params[:-1])
    with pytest.raises(ValueError, match=r"item 5 has shape \[7\]"):
        ema.update(params[:-1] + [torch.zeros(7)])
    with pytest.raises(TypeError, match="item 0 is str"):
        ema.copy_to(["x"] + params[1:])
    assert_same(snapshot(ema.module), before)
    assert ema.step == 0
    # an excluded parameter is neither averaged nor written back
    bump(model)
    ema.update(params)
    assert torch.equal(ema.module[0].bias, before["0.bias"])
    target = [p.detach().clone() for p in params]
    ema.copy_to(target)
    assert torch.equal(target[1], params[1])


# ----------------------------------------------------------------------------- pickling

@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_fused_ema_is_copied_whole(how):
    model = make_model()
    ema = FusedEMA(model, decays=[0.9, Warmup(0.99)], update_every=2)
    bump(model)
    ema.update()
    ema.update()
    if how == "deepcopy":
        twin = copy.deepcopy(ema)
    elif how == "pickle":
        twin = pickle.loads(pickle.dumps(ema))
    else:
        buf = io.BytesIO()
        torch.save(ema, buf)
        buf.seek(0)
        twin = torch.load(buf, weights_only=False)
    assert twin.step == ema.step == 2
    for a, b in zip(ema.modules, twin.modules):
        assert_same(a.state_dict(), b.state_dict())
    twin_model = twin._model  # the copy averages its own copy of the online model
    assert twin_model is not model
    refs = [state(m) for m in twin.modules]
    for s in range(2, 6):
        bump(twin_model)
        twin.update()
        for ref, d in zip(refs, twin.decay_at(s)):
            if (s + 1) % 2 == 0:
                ref_update(ref, twin_model, d)
    for m, ref in zip(twin.modules, refs):
        assert_state(m, ref)
    for a, b in zip(ema.modules, [state(m) for m in ema.modules]):  # the original is intact
        assert_state(a, b)


def test_pickled_ema_is_not_attached():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = FusedEMA(model, decay=0.5)
    ema.attach(opt)
    twin = pickle.loads(pickle.dumps(ema))
    assert twin._attached == {}


# ----------------------------------------------------------------------------- to / pin_memory

def test_to_dtype_and_device():
    model = make_model()
    ema = FusedEMA(model, decay=0.5)
    assert ema.to(dtype=torch.float64) is ema
    assert ema.module[0].weight.dtype == torch.float64
    assert ema.module[1].num_batches_tracked.dtype == torch.int64
    ref = state(ema.module)
    bump(model)
    ema.update()
    ref_update(ref, model, 0.5)
    assert_state(ema.module, ref)
    assert ema.state_dict()["settings"]["ema_dtype"] == "torch.float64"
    ema.to("cpu")
    before = snapshot(ema.module)
    with pytest.raises(TypeError, match="dtype must be one of"):
        ema.to(dtype=torch.int32)
    assert_same(snapshot(ema.module), before)


def test_pin_memory_needs_cuda_and_changes_nothing_without_it():
    ema = FusedEMA(make_model(), decay=0.5)
    if torch.cuda.is_available():
        ema.pin_memory()
        assert ema.module[0].weight.is_pinned()
        return
    before = snapshot(ema.module)
    with pytest.raises(RuntimeError, match="needs CUDA"):
        ema.pin_memory()
    assert_same(snapshot(ema.module), before)


# ----------------------------------------------------------------------------- load_state_dict

def test_load_state_dict_strict_false_adopts_decay_and_step():
    src = FusedEMA(make_model(), decay=0.99, update_after_step=3)
    src.update()
    src.update()
    sd = src.state_dict()
    ema = FusedEMA(make_model(1), decay=0.5)
    before = snapshot(ema.module)
    with pytest.raises(ValueError, match="other settings"):
        ema.load_state_dict(sd)
    assert_same(snapshot(ema.module), before)
    with pytest.warns(UserWarning, match="adopted"):
        ema.load_state_dict(sd, strict=False)
    assert ema.step == 2 and ema.update_after_step == 3
    assert ema.decay_at(10) == [pytest.approx(0.99)]
    assert_same(snapshot(ema.module), snapshot(src.module))


def test_load_state_dict_strict_false_still_refuses_what_changes_tensors():
    sd = FusedEMA(make_model(), decay=0.5, ema_dtype=torch.float64).state_dict()
    ema = FusedEMA(make_model(), decay=0.9)
    before = snapshot(ema.module)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="ema_dtype"):
            ema.load_state_dict(sd, strict=False)
    assert_same(snapshot(ema.module), before)
    assert ema.decay_at(0) == [pytest.approx(0.9)]


# ----------------------------------------------------------------------------- copy=

def test_copy_by_name():
    model = make_model()
    ema = FusedEMA(model, decay=0.5, copy=["3.*"])
    ref = state(ema.module)
    for _ in range(2):
        bump(model)
        ema.update()
        ref_update(ref, model, 0.5, average=lambda n: not n.startswith("3."))
    assert_state(ema.module, ref)
    ema.replan()  # requires_grad=True does not turn a copied parameter back into averaged
    bump(model)
    ema.update()
    ref_update(ref, model, 0.5, average=lambda n: not n.startswith("3."))
    assert_state(ema.module, ref)
    assert ema.state_dict()["settings"]["copy"] == ["3.*"]
    with pytest.raises(ValueError, match="match no parameter"):
        FusedEMA(model, decay=0.5, copy=["nothing.here"])


# ----------------------------------------------------------------------------- ema_model=

class Hooked(nn.Module):
    """A module deepcopy refuses (a non-leaf tensor attribute, as weight_norm leaves after
    a forward)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.cache = self.lin.weight * 2  # non-leaf: deepcopy raises

    def forward(self, x):
        return self.lin(x)


def test_user_supplied_ema_model():
    model = Hooked()
    with pytest.raises(TypeError, match="ema_model="):
        FusedEMA(model, decay=0.5)
    mine = Hooked()
    ema = FusedEMA(model, decay=0.5, ema_model=mine)
    assert ema.module is mine and not mine.training
    assert not any(p.requires_grad for p in mine.parameters())
    assert torch.equal(mine.lin.weight, model.lin.weight)
    ref = state(mine)
    with torch.no_grad():
        model.lin.weight.add_(1.0)
    ema.update()
    ref_update(ref, model, 0.5)
    assert_state(mine, ref)


def test_user_supplied_ema_model_errors_modify_nothing():
    model = make_model()
    wrong = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 4))
    before = snapshot(wrong)
    with pytest.raises(ValueError, match=r"'3.weight' has shape \[4, 7\] in ema_model"):
        FusedEMA(model, decay=0.5, ema_model=wrong)
    assert_same(snapshot(wrong), before)
    with pytest.raises(ValueError, match="missing"):
        FusedEMA(model, decay=0.5, ema_model=nn.Linear(5, 7))
    with pytest.raises(ValueError, match="model itself"):
        FusedEMA(model, decay=0.5, ema_model=model)
    with pytest.raises(ValueError, match="one module per decay"):
        FusedEMA(model, decays=[0.5, 0.9], ema_model=make_model())
    with pytest.raises(TypeError, match="must be an nn.Module"):
        FusedEMA(model, decay=0.5, ema_model=[3])


# ----------------------------------------------------------------------------- issue 16's bugs

def test_update_from_another_model_leaves_the_binding_alone():
    model, other = make_model(0), make_model(1)
    ema = FusedEMA(model, decay=0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ema.attach(optimizer)
    ref = state(ema.module)
    ema.update(other)  # around the binding: matched by name, for this update only
    ref_update(ref, other, 0.5)
    bump(model)
    ema.update()  # the bound model again, not `other`
    ref_update(ref, model, 0.5)
    for n, t in state(ema.module).items():
        torch.testing.assert_close(t, ref[n], **TOL, msg=n)
    with ema.swapped():  # swaps into the bound model
        assert torch.equal(model[0].weight, ema.module[0].weight)
    assert not torch.equal(other[0].weight, ema.module[0].weight)
    model(torch.randn(2, 5)).sum().backward()
    optimizer.step()  # the hook updates from the bound model
    ref_update(ref, model, 0.5)
    for n, t in state(ema.module).items():
        torch.testing.assert_close(t, ref[n], **TOL, msg=n)
    target = make_model(2)
    ema.copy_to()
    assert torch.equal(model[3].bias, ema.module[3].bias)
    assert not torch.equal(target[3].bias, ema.module[3].bias)


@pytest.mark.parametrize("missing", [["step"], ["emas"], ["step", "emas"]])
def test_load_state_dict_without_step_or_emas_names_them(missing):
    ema = FusedEMA(make_model(), decay=0.9)
    sd = ema.state_dict()
    for k in missing:
        del sd[k]
    before = snapshot(ema.module)
    with pytest.raises(ValueError, match="has no " + " and no ".join(f"'{k}'" for k in missing)):
        ema.load_state_dict(sd)
    assert_same(snapshot(ema.module), before)


@pytest.mark.parametrize("skip", [torch.zeros(2, dtype=torch.bool), torch.ones(3),
                                  torch.zeros(0, dtype=torch.bool)])
def test_skip_must_hold_one_value(skip):
    model = make_model()
    ema = FusedEMA(model, decay=0.5)
    bump(model)
    before = snapshot(ema.module)
    with pytest.raises(ValueError, match=f"skip must hold one value, got {skip.numel()}"):
        ema.update(skip=skip)
    assert_same(snapshot(ema.module), before)
    assert ema.step == 0


def test_load_state_dict_strict_false_adopts_a_power_function():
    from fused_ema.schedules import PowerFunction
    saved = FusedEMA(make_model(), decay=PowerFunction(gamma=6.94))
    saved.update()
    ema = FusedEMA(make_model(), decay=0.9)
    with pytest.warns(UserWarning, match="adopted"):
        ema.load_state_dict(saved.state_dict(), strict=False)
    assert isinstance(ema.schedules[0], PowerFunction) and ema.schedules[0].gamma == 6.94
    assert ema.decay_at(5) == saved.decay_at(5)


def test_unpickled_ema_under_torch_compile():
    model = make_model()
    model, ema = pickle.loads(pickle.dumps((model, FusedEMA(model, decay=0.5, capturable=True))))
    ref = state(ema.module)
    update = torch.compile(ema.update, backend="aot_eager", fullgraph=True)
    for _ in range(2):
        bump(model)
        update()
        ref_update(ref, model, 0.5)
    for n, t in state(ema.module).items():
        torch.testing.assert_close(t, ref[n], **TOL, msg=n)


# ----------------------------------------------------------------------------- frozen= (issue 17)

FROZEN = ("0.weight", "0.bias")


def frozen_model(seed=0):
    """make_model with its first layer frozen (a LoRA base in miniature)."""
    model = make_model(seed)
    model[0].requires_grad_(False)
    return model


def owned_bytes(ema):
    return sum(t.numel() * t.element_size() for t in ema.state_dict()["emas"][0].values())


@pytest.mark.parametrize("frozen", ["share", "copy", "average"])
def test_frozen_modes(frozen):
    model = frozen_model()
    ema = FusedEMA(model, decays=[0.5, 0.9], frozen=frozen)
    refs = [state(m) for m in ema.modules]
    for _ in range(3):
        bump(model)  # the frozen layer moves too (changed by hand): each mode shows its rule
        ema.update()
        for ref, d in zip(refs, (0.5, 0.9)):
            ref_update(ref, model, d,
                       average=lambda n: frozen == "average" or n not in FROZEN)
    for m, ref in zip(ema.modules, refs):
        assert_state(m, ref)
    for m in ema.modules:
        assert (m[0].weight is model[0].weight) == (frozen == "share")
        assert not m[0].weight.requires_grad and not m.training
    saved = ema.state_dict()["emas"]
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    frozen_bytes = sum(model.state_dict()[n].numel() * 4 for n in FROZEN)
    for sd in saved:
        assert all((n in sd) == (frozen != "share") for n in FROZEN)
    assert owned_bytes(ema) == model_bytes - (frozen_bytes if frozen == "share" else 0)
    names = [n for n, _, _ in ema.named_pairs()]
    assert all((n in names) == (frozen != "share") for n in FROZEN)
    assert ema.state_dict()["settings"]["frozen"] == frozen
    assert f"frozen={frozen!r}" in repr(ema)


def test_frozen_default_is_share():
    model = frozen_model()
    assert FusedEMA(model, decay=0.5).module[0].weight is model[0].weight


def test_shared_tensors_are_skipped_by_swaps_and_copies():
    model, other = frozen_model(0), frozen_model(1)
    ema = FusedEMA(model, decay=0.5)
    bump(model)
    ema.update()
    bump(model)
    model.eval()
    x = torch.randn(4, 5)
    with torch.no_grad(), ema.swapped():
        torch.testing.assert_close(ema.module(x), model(x))  # a complete model
        assert model[0].weight is ema.module[0].weight
    assert not torch.equal(ema.module(x), model(x))  # the swap was undone
    for how in ("copy_to", "swapped", "store"):
        target = copy.deepcopy(other)
        before = snapshot(target)
        if how == "copy_to":
            ema.copy_to(target)
        elif how == "store":
            ema.store(target)
            ema.copy_to(target)
        else:
            swap = ema.swapped(target)
            swap.__enter__()
        for n, t in target.state_dict().items():  # what the EMA owns, and only that
            assert torch.equal(t, (before if n in FROZEN else ema.module.state_dict())[n]), n
        if how == "store":
            ema.restore()
        elif how == "swapped":
            swap.__exit__(None, None, None)
        if how != "copy_to":
            assert_same(snapshot(target), before)


def test_replan_after_unfreezing_and_freezing():
    model = frozen_model()
    ema = FusedEMA(model, decays=[0.5, 0.9])
    refs = [state(m) for m in ema.modules]
    bump(model)
    model[0].requires_grad_(True)
    model[3].requires_grad_(False)
    ema.replan()
    for m, ref in zip(ema.modules, refs):  # unfrozen: its own EMA, from the current value
        assert m[0].weight is not model[0].weight and not m[0].weight.requires_grad
        assert m[3].weight is model[3].weight  # frozen: its copy dropped
        for n in FROZEN:
            ref[n] = model.state_dict()[n].double().clone()
            assert torch.equal(m.state_dict()[n], model.state_dict()[n])
    assert ema.modules[0][0].weight is not ema.modules[1][0].weight
    for _ in range(2):
        bump(model)
        ema.update()
        for ref, d in zip(refs, (0.5, 0.9)):
            ref_update(ref, model, d, average=lambda n: not n.startswith("3."))
    for m, ref in zip(ema.modules, refs):
        assert_state(m, ref)
    assert sorted(n for n in ema.state_dict()["emas"][0] if n.startswith(("0.", "3."))) == \
        ["0.bias", "0.weight"]


def test_replan_keeps_a_tied_parameter_tied():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[1].weight = model[0].weight  # one tensor under two names
    model[0].weight.requires_grad_(False)
    ema = FusedEMA(model, decay=0.5)
    assert ema.module[0].weight is ema.module[1].weight is model[0].weight
    model[0].weight.requires_grad_(True)
    ema.replan()
    assert ema.module[0].weight is ema.module[1].weight is not model[0].weight
    model[0].weight.requires_grad_(False)
    ema.replan()
    assert ema.module[0].weight is ema.module[1].weight is model[0].weight


def test_a_replaced_frozen_parameter_is_shared_again():
    model = frozen_model()
    ema = FusedEMA(model, decay=0.5)
    ema.update()
    model[0].weight = nn.Parameter(torch.randn(7, 5), requires_grad=False)
    ema.update()  # the per-step check sees it, the rebind shares the new one
    assert ema.module[0].weight is model[0].weight


def test_share_state_dict_round_trip_and_older_checkpoints():
    model = frozen_model()
    ema = FusedEMA(model, decay=0.5)
    bump(model)
    ema.update()
    buf = io.BytesIO()
    torch.save(ema.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf)
    fresh_model = copy.deepcopy(model)
    fresh = FusedEMA(fresh_model, decay=0.5)
    fresh.load_state_dict(sd)
    assert_same(fresh.module.state_dict(), ema.module.state_dict())
    assert fresh.module[0].weight is fresh_model[0].weight and fresh.step == 1
    # a checkpoint of an older FusedEMA (frozen parameters copied, no "frozen" setting)
    # loads: its copies are checked for their shape, the model's own stay
    old_ema = FusedEMA(copy.deepcopy(model), decay=0.5, frozen="copy")
    bump(old_ema._model)
    old_ema.update()
    old = old_ema.state_dict()
    del old["settings"]["frozen"]
    fresh.load_state_dict(old)
    for n, t in fresh.module.state_dict().items():
        want = fresh_model.state_dict()[n] if n in FROZEN else old["emas"][0][n]
        assert torch.equal(t, want), n
    assert fresh.module[0].weight is fresh_model[0].weight
    # what does not fit is refused, nothing written
    before = snapshot(fresh.module)
    bad = copy.deepcopy(old)
    bad["emas"][0]["0.weight"] = torch.zeros(2, 2)
    with pytest.raises(ValueError, match=r"'0.weight' has shape \[2, 2\] in the checkpoint"):
        fresh.load_state_dict(bad)
    with pytest.raises(ValueError, match="frozen: checkpoint has 'share'"):
        FusedEMA(copy.deepcopy(model), decay=0.5, frozen="copy").load_state_dict(sd)
    averaged = FusedEMA(copy.deepcopy(model), decay=0.5, frozen="average").state_dict()
    with pytest.raises(ValueError, match="frozen: checkpoint has 'average'"):
        fresh.load_state_dict(averaged)
    # saved while 0.* was trained, loaded while it is frozen
    trained = FusedEMA(make_model(), decay=0.5).state_dict()
    with pytest.raises(ValueError, match=r"unexpected \['0.weight', '0.bias'\].*replan"):
        fresh.load_state_dict(trained)
    assert_same(snapshot(fresh.module), before)


def test_frozen_bad_input_builds_and_modifies_nothing():
    model = frozen_model()
    before = snapshot(model)
    for bad in ("shared", None, "Share", 1):
        with pytest.raises(ValueError, match="frozen must be one of"):
            FusedEMA(model, decay=0.5, frozen=bad)
    with pytest.raises(ValueError, match=r"frozen='share'.*'0.weight'.*model's device \(cpu\), "
                                         r"not meta.*frozen='copy'"):
        FusedEMA(model, decay=0.5, device="meta")
    assert_same(snapshot(model), before)
    assert not model[0].weight.requires_grad and model[3].weight.requires_grad
    ema = FusedEMA(model, decay=0.5)
    ema_before = snapshot(ema.module)
    with pytest.raises(ValueError, match="frozen='share'.*not meta"):
        ema.to("meta")
    assert_same(snapshot(ema.module), ema_before)
    assert all(t.device.type == "cpu" for t in ema.module.state_dict().values())
    bump(model)
    ema.update()  # still works


def test_share_keeps_the_models_dtype_and_to_casts_only_what_the_ema_owns():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)).to(torch.bfloat16)
    model[0].requires_grad_(False)
    ema = FusedEMA(model, decay=0.5)  # an fp32 EMA of a bf16 model
    assert ema.module[0].weight.dtype == torch.bfloat16  # the model's own
    assert ema.module[2].weight.dtype == torch.float32
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    ema.update()
    x = torch.randn(4, 5, dtype=torch.bfloat16)
    # autocast computes both in bf16 (a linear layer casts its fp32 EMA weights as the
    # swap's copy into the bf16 model rounds them): the same numbers
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = ema.module(x)
        with ema.swapped():
            want = model(x)
    torch.testing.assert_close(got, want)
    ema.to(dtype=torch.float64)
    assert ema.module[2].weight.dtype == torch.float64
    assert ema.module[0].weight.dtype == model[0].weight.dtype == torch.bfloat16


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_shared_tensors_stay_shared_in_copies(how):
    model = frozen_model()
    ema = FusedEMA(model, decay=0.5)
    if how == "deepcopy":
        model2, ema2 = copy.deepcopy((model, ema))
    else:
        model2, ema2 = pickle.loads(pickle.dumps((model, ema)))
    assert ema2.module[0].weight is model2[0].weight is not model[0].weight
    assert ema2._model is model2
    alone = copy.deepcopy(ema)  # carries its own copy of the model, shared with that
    assert alone.module[0].weight is alone._model[0].weight is not model[0].weight
    before = snapshot(ema.module)
    ref = state(ema2.module)
    bump(model2)
    ema2.update()
    ref_update(ref, model2, 0.5, average=lambda n: n not in FROZEN)
    assert_state(ema2.module, ref)
    assert_same(snapshot(ema.module), before)


def test_every_parameter_frozen_and_shared():
    model = nn.Linear(4, 3).requires_grad_(False)
    with pytest.warns(UserWarning, match="shares them with the model"):
        ema = FusedEMA(model, decay=0.5)
    ema.update()
    assert ema.state_dict()["emas"][0] == {}
    model.weight.requires_grad_(True)
    ema.replan()
    ref = state(ema.module)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update()
    ref_update(ref, model, 0.5, average=lambda n: n == "weight")
    assert_state(ema.module, ref)
    assert list(ema.state_dict()["emas"][0]) == ["weight"]


def test_share_with_a_tensor_list_and_a_given_ema_model():
    frozen_p = nn.Parameter(torch.empty(3, device="meta"), requires_grad=False)  # not copyable
    trained = nn.Parameter(torch.randn(4))
    ema = FusedEMA([trained, frozen_p], decay=0.5)
    assert ema.parameters()[1] is frozen_p and ema.parameters()[0] is not trained
    assert list(ema.state_dict()["emas"][0]) == ["0"]
    model = Hooked()
    model.lin.bias.requires_grad_(False)
    mine = Hooked()
    ema = FusedEMA(model, decay=0.5, ema_model=mine)
    assert mine.lin.bias is model.lin.bias and mine.lin.weight is not model.lin.weight


def test_shared_tensors_are_never_copied():
    """A frozen base the EMA could not copy (on the meta device, as an offloaded base is;
    an int8 one, as a quantized base is) is shared as it is: no copy is made, not even one
    dropped later."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[1].weight = nn.Parameter(torch.empty(4, 4, device="meta"), requires_grad=False)
    model[1].bias = nn.Parameter(torch.zeros(4, dtype=torch.int8), requires_grad=False)
    with pytest.raises(NotImplementedError):  # what a copy of the base would do
        FusedEMA(model, decay=0.5, frozen="copy")
    ema = FusedEMA(model, decay=0.5)
    assert ema.module[1].weight is model[1].weight and ema.module[1].bias is model[1].bias
    assert list(ema.state_dict()["emas"][0]) == ["0.weight", "0.bias"]
    ref = state(ema.module[0])
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema.update()
    ref_update(ref, model[0], 0.5)
    assert_state(ema.module[0], ref)
