"""fused_ema.integrations.ema_pytorch against ema-pytorch's EMA: the same runs with both,
compared tensor by tensor, and ema-pytorch's own test files (from its published sdist) run
with ``from ema_pytorch import`` pointed at our module."""
import io

import pytest
import torch
from torch import nn

ema_pytorch = pytest.importorskip("ema_pytorch")

from fused_ema.integrations import ema_pytorch as ours  # noqa: E402
from integration_helpers import (  # noqa: E402
    assert_within_ulps, call_parametrized, exec_repointed, own_test_names, sdist_file, step_scale)

PIN = "ema-pytorch==0.8.3"
# ema-pytorch's own tests, by file (checked against the sdist below, so none is left out)
OWN_TESTS = {
    "tests/test_ema_pytorch.py": [
        "test_readme_basic_ema", "test_readme_post_hoc_ema", "test_readme_switch_ema",
        "test_ema_tensor_pytree", "test_ema_tensor_detach_and_device"],
    "tests/test_ema_module_kwargs.py": [
        "test_readme_module_target_injection", "test_ema_module_wrapper_scenarios",
        "test_multi_view_ssl", "test_self_flow_example", "test_next_latent_prediction",
        "test_invalid_kwarg_raises_assertion_at_init",
        "test_forward_only_online_and_only_ema_flags"],
}


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4),
                         nn.LayerNorm(4))


def _train(model, steps, seed=1, sgd=False):
    g = torch.Generator().manual_seed(seed)
    opt = (torch.optim.SGD(model.parameters(), lr=1e-2) if sgd
           else torch.optim.Adam(model.parameters(), lr=1e-2))
    for _ in range(steps):
        loss = model(torch.randn(12, 6, generator=g)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        yield


def _tensors(ema):
    return {k: v for k, v in ema.state_dict().items() if k.startswith("ema_model.")}


KWARGS = [
    dict(beta=0.99, update_after_step=5, update_every=3, power=3 / 4),
    dict(beta=0.9, update_after_step=0, update_every=1, inv_gamma=2.0, min_value=0.3),
    dict(beta=0.999, update_after_step=2, update_every=2,
         param_or_buffer_names_no_ema={"1.running_mean"}, ignore_names={"3.bias"},
         ignore_startswith_names={"4."}),
    dict(beta=1.0, update_after_step=3, update_every=1),  # frozen: copies, then stays
]


@pytest.mark.parametrize("kwargs", KWARGS, ids=range(len(KWARGS)))
def test_same_run_each_update_checked(kwargs, engine):
    """Every update: ema-pytorch from our previous state gives ours within 1 ulp (of the
    operands); copies, ignored and integer tensors, counters and decays are identical."""
    model = _model()
    mine = ours.EMA(model, **kwargs)
    theirs = ema_pytorch.EMA(model, **kwargs)
    free = ema_pytorch.EMA(model, **kwargs)  # runs on its own, compared at the end
    for step, _ in enumerate(_train(model, 25)):
        theirs.load_state_dict(mine.state_dict())  # the same state before each update
        old = {k: v.clone() for k, v in _tensors(mine).items()}
        online_before = {k: v.clone() for k, v in model.state_dict().items()}
        mine.update()
        theirs.update()
        free.update()
        assert mine.step.item() == theirs.step.item() == step + 1
        assert mine.initted.item() == theirs.initted.item()
        assert mine.get_current_decay() == theirs.get_current_decay()
        for k, a in _tensors(mine).items():
            b = theirs.state_dict()[k]
            if torch.equal(a, b):
                continue
            name = k[len("ema_model."):]
            scale = step_scale([old[k]], [online_before[name]])[0]
            assert_within_ulps(a, b, 1.0, f"step {step} {k}", scale)
    for (k, a), b in zip(_tensors(mine).items(), _tensors(free).values()):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)
        else:
            assert torch.equal(a, b), k


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_update_model_with_ema(beta):
    """update_model_with_ema_every writes the online model: two identical runs, one each
    (plain SGD: Adam would amplify the first 1-ulp difference of the weights)."""
    kw = dict(beta=0.95, update_after_step=1, update_every=1, update_model_with_ema_every=7,
              update_model_with_ema_beta=beta)
    models = [_model(), _model()]
    emas = [ours.EMA(models[0], **kw), ema_pytorch.EMA(models[1], **kw)]
    for _ in zip(_train(models[0], 22, sgd=True), _train(models[1], 22, sgd=True)):
        for e in emas:
            e.update()
    for (k, a), b in zip(models[0].state_dict().items(), models[1].state_dict().values()):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=k)
    for (k, a), b in zip(_tensors(emas[0]).items(), _tensors(emas[1]).values()):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=k)


def test_what_is_averaged_copied_ignored():
    model = _model()
    mine = ours.EMA(model, beta=0.5, update_after_step=0, update_every=1,
                    param_or_buffer_names_no_ema={"1.running_mean"}, ignore_names={"3.bias"})
    mine.update()  # the first call copies
    ignored_before = mine.ema_model[3].bias.clone()
    nbt_before = mine.ema_model[1].num_batches_tracked.clone()
    for _ in _train(model, 3):
        pass
    mine.update()  # step 1: decay from epoch 0 -> 0, a copy of everything tracked
    mine.update()  # step 2: a real average
    assert torch.equal(mine.ema_model[1].running_mean, model[1].running_mean)  # copied
    assert torch.equal(mine.ema_model[3].bias, ignored_before)  # ignored: never written
    assert torch.equal(mine.ema_model[1].num_batches_tracked, nbt_before)  # ints: untouched


def test_state_dict_interchangeable_and_torch_save():
    model = _model()
    kw = dict(beta=0.99, update_after_step=2, update_every=2)
    mine = ours.EMA(model, **kw)
    theirs = ema_pytorch.EMA(model, **kw)
    for _ in _train(model, 9):
        mine.update()
        theirs.update()
    assert list(mine.state_dict()) == list(theirs.state_dict())
    buf = io.BytesIO()
    torch.save(theirs.state_dict(), buf)
    buf.seek(0)
    resumed = ours.EMA(model, **kw)
    resumed.load_state_dict(torch.load(buf))
    assert resumed.step.item() == 9 and resumed._host_step == 9 and resumed._host_initted
    for _ in _train(model, 4, seed=3):
        resumed.update()
        theirs.update()
    for (k, a), b in zip(_tensors(resumed).items(), _tensors(theirs).values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)


def test_optimizer_hook_lazy_init_forward():
    model = _model()
    mine = ours.EMA(model, beta=0.9, update_after_step=0, update_every=1, lazy_init_ema=True)
    assert mine.ema_model is None
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = mine.add_to_optimizer_post_step_hook(opt)
    model(torch.randn(4, 6)).sum().backward()
    opt.step()
    assert mine.step.item() == 1 and mine.ema_model is not None
    handle.remove()
    x = torch.randn(3, 6)
    mine.eval()
    model.eval()
    assert torch.equal(mine(x), mine.ema_model(x))


def test_user_supplied_ema_model_and_bad_input():
    model = _model()
    supplied = _model(seed=3)
    mine = ours.EMA(model, ema_model=lambda: supplied, update_every=1)
    assert mine.ema_model is supplied
    with pytest.raises(ValueError, match="beta"):
        ours.EMA(model, beta=2.0)
    # a model whose tensors no longer match the EMA's: nothing is written
    mine = ours.EMA(model, beta=0.5, update_after_step=0, update_every=1)
    mine.update()
    mine.update()
    before = {k: v.clone() for k, v in mine.state_dict().items()}
    model[0].weight = nn.Parameter(torch.zeros(16, 7))
    with pytest.raises(ValueError, match="shape"):
        mine.update()
    after = mine.state_dict()
    for k, v in before.items():
        if k.startswith("ema_model."):
            assert torch.equal(after[k], v), k
    # and the counters did not move: the next good update is the one that failed
    assert mine.step.item() == mine._host_step == 2 and mine.initted.item()
    # the first update (the copy) with an EMA model of another shape: still not initted
    fresh = ours.EMA(_model(), ema_model=model, update_every=1)
    with pytest.raises(ValueError, match="shape"):
        fresh.update()
    assert fresh.step.item() == fresh._host_step == 0
    assert not fresh.initted.item() and not fresh._host_initted


@pytest.mark.parametrize("inv_gamma,power,min_value,beta", [
    (1.0, 2 / 3, 0.0, 0.9999), (1.0, 3 / 4, 0.2, 0.999), (2.0, 0.5, 0.0, 0.99),
    (3.0, 1.0, 0.5, 0.995), (1.5, 0.37, 0.0, 1.0)])
def test_decay_schedule_bit_for_bit(inv_gamma, power, min_value, beta):
    """The decay at every step of a long run is ema-pytorch's float, to the bit."""
    model = nn.Linear(2, 2)
    kw = dict(beta=beta, update_after_step=5, inv_gamma=inv_gamma, power=power,
              min_value=min_value)
    mine, theirs = ours.EMA(model, **kw), ema_pytorch.EMA(model, **kw)
    steps = list(range(0, 3000)) + list(range(3000, 400_000, 997)) + [10 ** 7]
    for step in steps:
        mine._host_step = step
        theirs.step.fill_(step)
        assert mine.get_current_decay() == theirs.get_current_decay(), step


@pytest.fixture(scope="module")
def own_tests():
    """Each of ema-pytorch's test files, executed with its imports pointed at ours."""
    found = {}
    for path in OWN_TESTS:
        source = sdist_file(PIN, path)
        found[path] = (own_test_names(source),
                       exec_repointed(source, "ema_pytorch", ours.__name__, path))
    return found


def test_own_test_list_is_complete(own_tests):
    for path, (names, namespace) in own_tests.items():
        assert names == OWN_TESTS[path], path
        assert namespace.get("EMA", ours.EMA) is ours.EMA  # the import was repointed


@pytest.mark.parametrize("path,name", [(p, n) for p, ns in OWN_TESTS.items() for n in ns])
def test_ema_pytorchs_own_tests(path, name, own_tests, tmp_path, monkeypatch):
    """ema-pytorch's own tests against our module (EMA ours; EMAPytree, EMATensor,
    PostHocEMA, EMAModuleWrapper delegated to ema-pytorch)."""
    monkeypatch.chdir(tmp_path)  # test_readme_post_hoc_ema writes checkpoints to the cwd
    torch.manual_seed(0)
    assert call_parametrized(own_tests[path][1][name]) >= 1
