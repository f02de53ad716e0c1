"""FusedEMA's parts on their own: the pure selection of what happens to each tensor, the
per-step identity check (compiled and pure-Python), and the guarantee that a replaced
or resized tensor is seen before anything is written, however it was replaced."""
import re

import pytest
import torch
from torch import nn

from fused_ema import EMAPlan, FusedEMA, _ext, selection
from fused_ema.binding import PyWatch

WATCHES = [pytest.param(PyWatch, id="python")]
if _ext._C is not None:
    WATCHES.append(pytest.param(_ext._C.Watch, id="compiled"))


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 3))


def reference_step(ema_state, model, decay):
    """float64 EMA of every floating parameter, buffers copied (FusedEMA's defaults)."""
    params = {n for n, _ in model.named_parameters()}
    for n, t in list(model.named_parameters()) + list(model.named_buffers()):
        x = t.detach().double()
        if n in params:
            ema_state[n] = decay * ema_state[n] + (1 - decay) * x
        else:
            ema_state[n] = x.clone()


def ema_state_of(module):
    return {n: t.detach().double().clone()
            for n, t in list(module.named_parameters()) + list(module.named_buffers())}


def assert_state(module, state):
    for n, t in list(module.named_parameters()) + list(module.named_buffers()):
        torch.testing.assert_close(t.detach().double(), state[n], rtol=1e-6, atol=1e-7,
                                   msg=lambda m: f"{n}: {m}")


# ----------------------------------------------------------------------------- selection

@pytest.mark.parametrize("frozen", ["share", "copy", "average"])
def test_selection_is_a_pure_description(frozen):
    model = make_model()
    model[3].bias.requires_grad_(False)
    model[1].weight.requires_grad_(False)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    sel = selection.select(selection.walk(model), buffers="copy", exclude=["0.bias"],
                           copy=["*.running_var", "1.weight"], frozen=frozen)
    assert sel.excluded == ["0.bias"]
    frozen_role = {"share": "shared", "copy": "copy", "average": "average"}[frozen]
    assert sel.roles == {
        "0.weight": "average", "0.bias": "excluded", "1.weight": "copy",  # copy= first
        "1.bias": "average", "1.running_mean": "copy", "1.running_var": "copy",
        "1.num_batches_tracked": "other", "3.weight": "average", "3.bias": frozen_role}
    assert sel.names == [n for n, r in sel.roles.items() if r not in ("excluded", "shared")]
    assert sel.shared == (["3.bias"] if frozen == "share" else [])
    sel_avg = selection.select(selection.walk(model), buffers="average",
                               copy=["*.running_var"], frozen=frozen)
    assert sel_avg.roles["1.running_mean"] == "average"
    assert sel_avg.roles["1.running_var"] == "copy"  # copy= wins over buffers="average"
    assert selection.select(selection.walk(model), buffers="ignore", frozen=frozen).roles[
        "1.running_mean"] == "ignored"
    for n, t in model.state_dict().items():  # the model is only read
        assert torch.equal(t, before[n])


def test_selection_errors():
    model = make_model()
    with pytest.raises(ValueError, match=r"copy pattern\(s\) \['nothing\*'\] match no"):
        selection.select(selection.walk(model), copy=["nothing*"], frozen="share")
    with pytest.raises(TypeError, match="copy takes names"):
        selection.select(selection.walk(model), copy=[3], frozen="share")


def test_walk_drops_wrapper_prefixes_and_ties():
    model = make_model()
    model.tied = model[0]  # the same module (and tensors) under a second name
    names = [s.name for s in selection.walk(model)]
    assert names.count("0.weight") == 1 and not any(n.startswith("tied.") for n in names)
    wrapped = nn.Module()
    wrapped.module = make_model()
    assert [s.name for s in selection.walk(wrapped)][0] == "0.weight"


# ----------------------------------------------------------------------------- the watch

@pytest.mark.parametrize("Watch", WATCHES)
def test_watch_names_the_first_change(Watch):
    d1 = {"a": object(), "b": object()}
    d2 = {"c": object()}
    t, u = torch.randn(4), torch.randn(3)
    watch = Watch([t, u], [d1, d1, d2], ["a", "b", "c"], [d1["a"], d1["b"], d2["c"]])
    assert len(watch) == 5
    assert watch.first_changed() == -1 and watch.first_changed() == -1
    d1["unrelated"] = 1  # a write to a watched dict that keeps every watched entry
    assert watch.first_changed() == -1
    d1["b"] = object()
    assert watch.first_changed() == 3  # tensors first, then the entries in order
    d1["b"] = watch_obj = object()
    assert watch.first_changed() == 3
    del watch_obj
    watch = Watch([t, u], [d1, d2], ["a", "c"], [d1["a"], d2["c"]])
    del d2["c"]
    assert watch.first_changed() == 3
    d2["c"] = object()
    assert watch.first_changed() == 3
    watch = Watch([t, u], [d1], ["a"], [d1["a"]])
    u.data = torch.randn(3)  # new storage under the same tensor object
    assert watch.first_changed() == 1
    u.data = u.data[:2]  # a new shape
    assert watch.first_changed() == 1


@pytest.mark.parametrize("Watch", WATCHES)
def test_watch_follows_an_attribute_of_any_owner(Watch):
    # A DTensor's local shard is an attribute (a slot), not a dict entry.
    class Owner:
        __slots__ = ("_local_tensor",)

    owner = Owner()
    owner._local_tensor = first = torch.randn(2)
    watch = Watch([], [owner], ["_local_tensor"], [first])
    assert watch.first_changed() == -1
    owner._local_tensor = torch.randn(2)
    assert watch.first_changed() == 0
    del owner._local_tensor
    with pytest.raises(AttributeError):
        watch.first_changed()


# ----------------------------------------------------------------------------- replacements

REPLACEMENTS = {
    "setattr Parameter": lambda m: setattr(m[0], "weight", nn.Parameter(torch.randn(7, 5))),
    "dict write": lambda m: m[0]._parameters.__setitem__("weight",
                                                         nn.Parameter(torch.randn(7, 5))),
    ".data = same shape": lambda m: setattr(m[0].weight, "data", torch.randn(7, 5)),
    "buffer assignment": lambda m: setattr(m[1], "running_mean", torch.randn(7)),
    "submodule": lambda m: m.__setitem__(3, nn.Linear(7, 3)),
    "resize_ round trip": lambda m: m[3].bias.data.resize_(10_000).resize_(3).normal_(),
    "set_ to new storage": lambda m: m[3].bias.data.set_(torch.randn(3)),
    "to(float64)": lambda m: m.double(),
}


@pytest.fixture(params=[p.id for p in WATCHES])
def watch_kind(request, monkeypatch):
    """Runs a FusedEMA test with the compiled identity watch and with the pure-Python one."""
    if request.param == "python":
        from fused_ema import binding
        monkeypatch.setattr(binding, "watch", lambda tensors, entries: PyWatch(
            tensors, *([[e[j] for e in entries] for j in range(3)])))
    return request.param


@pytest.mark.parametrize("how", list(REPLACEMENTS))
def test_every_kind_of_replacement_is_followed(how, watch_kind):
    model = make_model()
    ema = FusedEMA(model, decay=0.5)
    assert type(ema._binding._watch).__name__ == ("PyWatch" if watch_kind == "python"
                                                  else "Watch")
    state = ema_state_of(ema.module)
    for step in range(3):
        if step == 1:
            with torch.no_grad():
                REPLACEMENTS[how](model)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1)
        ema.update()
        reference_step(state, model, 0.5)
        assert_state(ema.module, state)


def test_overwrite_module_params_on_conversion_is_followed():
    model = make_model()
    ema = FusedEMA(model, decay=0.5)
    state = ema_state_of(ema.module)
    old = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        model.double()  # new Parameter objects written straight into the module dicts
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(old)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema.update()
    reference_step(state, model, 0.5)
    assert_state(ema.module, state)


@pytest.mark.parametrize("how", ["resize", "setattr", "data"])
def test_a_tensor_of_another_shape_fails_before_anything_is_written(how):
    model = make_model()
    ema = FusedEMA(model, decay=0.5)
    before = {n: t.clone() for n, t in ema.module.state_dict().items()}
    with torch.no_grad():
        if how == "resize":
            model[3].weight.requires_grad_(False).resize_(4, 7)
        elif how == "setattr":
            model[3].weight = nn.Parameter(torch.zeros(4, 7))
        else:
            model[3].weight.data = torch.zeros(4, 7)
    with pytest.raises(ValueError, match=re.escape("'3.weight' has shape [4, 7]")):
        ema.update()
    for n, t in ema.module.state_dict().items():
        assert torch.equal(t, before[n]), n
    assert ema.step == 0


@pytest.mark.parametrize("which", ["param", "ema"])
@pytest.mark.parametrize("how", ["data", "resize", "dtype view", "transpose"])
def test_plan_check_sees_every_change_of_params_and_emas(which, how):
    params = [torch.randn(4, 4) for _ in range(3)] + [torch.randn(0)]
    emas = [torch.randn(4, 4) for _ in range(3)] + [torch.randn(0)]
    plan = EMAPlan(emas, params)
    plan.update_(0.5)
    target = (params if which == "param" else emas)[1]
    if how == "data":
        target.data = torch.randn(4, 4)
    elif how == "resize":
        target.resize_(16)
    elif how == "dtype view":
        target.data = target.data.view(torch.int32)
    else:
        target.data = target.data.t()
    before = [e.clone() for e in emas]
    with pytest.raises(RuntimeError, match=rf"{which}s\[1\] was replaced or resized"):
        plan.update_(0.5)
    for e, b in zip(emas, before):
        if e.dtype == b.dtype and e.shape == b.shape:
            assert torch.equal(e, b)


@pytest.mark.parametrize("num_decays", [1, 3])
@pytest.mark.parametrize("changed", [["param", 0], ["param", 599], ["ema", 0], ["ema", 599],
                                     ["ema0", 300], ["param", 450, "ema", 20],
                                     ["ema", 599, "param", 599], ["ema", 10, "ema0", 500]])
def test_plan_check_on_several_threads_names_the_first_changed_tensor(num_decays, changed):
    # 600 tensors of 64 elements: a CPU plan large enough that its update and its check run
    # on several threads, each taking a share of the tensors. Whichever share sees a
    # change, the error names the first changed tensor (params before EMAs) and nothing
    # is written. The change: new storage for the tensor's storage object, the TensorImpl
    # untouched (as FSDP frees and reallocates flat parameters).
    if _ext._C is None:
        pytest.skip("the compiled engine is not built")
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        params = [torch.randn(64) for _ in range(600)]
        lists = [[torch.randn(64) for _ in range(600)] for _ in range(num_decays)]
        plan = EMAPlan.multi(lists, params) if num_decays > 1 else EMAPlan(lists[0], params)
        decays = [0.5] * num_decays if num_decays > 1 else 0.5
        plan.update_(decays)
        for which, i in zip(changed[::2], changed[1::2]):
            target = (params[i] if which == "param" else lists[0][i] if which == "ema0" else
                      lists[-1][i])
            storage = target.untyped_storage()
            storage.resize_(storage.nbytes() + 4096)  # a new allocation, the same tensor
        before = [[e.clone() for e in emas] for emas in lists]
        def position(which, i):  # in the order the plan checks: params, then each EMA list
            return i if which == "param" else 600 * (1 if which == "ema0" else num_decays) + i

        pairs = list(zip(changed[::2], changed[1::2]))
        first_which, first_i = min(pairs, key=lambda p: position(*p))
        k = 0 if first_which == "ema0" else num_decays - 1
        name = (f"params[{first_i}]" if first_which == "param" else
                f"emas[{k}][{first_i}]" if num_decays > 1 else f"emas[{first_i}]")
        with pytest.raises(RuntimeError, match=re.escape(name) + " was replaced or resized"):
            plan.update_(decays)
        assert all(torch.equal(e, b) for emas, bs in zip(lists, before) for e, b in zip(emas, bs))
    finally:
        torch.set_num_threads(saved)
