"""fused_ema.integrations.timm against timm's ModelEmaV3, CheckpointSaver and
load_checkpoint, and timm's own ModelEmaV3 tests (tests/test_utils.py of its sdist).

``import timm`` needs torchvision, which has no CPU build for this torch on the package
index. Where it is missing, timm's own files that these tests use are loaded from the
installed timm by path: ``utils/model_ema.py`` and ``models/_helpers.py`` (they import
only torch), ``utils/checkpoint_saver.py`` with its ``unwrap_model`` / ``get_state_dict``
taken from timm's ``utils/model.py``: timm's code throughout, without timm's package
``__init__``.
"""
import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from fused_ema.integrations import timm as ours
from integration_helpers import (assert_drop_in, assert_within_ulps, load_functions,
                                 sdist_file, step_scale)

_spec = importlib.util.find_spec("timm")
if _spec is None:
    pytest.skip("timm is not installed", allow_module_level=True)
TIMM_DIR = Path(_spec.origin).parent


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def timm_parts():
    """(model_ema module, CheckpointSaver, load_checkpoint) from the installed timm."""
    try:
        import timm.utils.model_ema as model_ema
        from timm.models import load_checkpoint
        from timm.utils import CheckpointSaver
        yield model_ema, CheckpointSaver, load_checkpoint
        return
    except ImportError:
        pass
    saved = {k: v for k, v in sys.modules.items() if k == "timm" or k.startswith("timm.")}
    try:
        for pkg in ("timm", "timm.utils", "timm.models"):
            mod = types.ModuleType(pkg)
            mod.__path__ = [str(TIMM_DIR / pkg.partition(".")[2])] if "." in pkg else [
                str(TIMM_DIR)]
            sys.modules[pkg] = mod
        model_ema = _load("timm.utils.model_ema", TIMM_DIR / "utils" / "model_ema.py")
        helpers = _load("timm.models._helpers", TIMM_DIR / "models" / "_helpers.py")
        model_mod = types.ModuleType("timm.utils.model")
        ns = {"ModelEma": model_ema.ModelEma}
        load_functions((TIMM_DIR / "utils" / "model.py").read_text(),
                       ["unwrap_model", "get_state_dict"], ns)
        model_mod.unwrap_model, model_mod.get_state_dict = ns["unwrap_model"], ns[
            "get_state_dict"]
        sys.modules["timm.utils.model"] = model_mod
        saver = _load("timm.utils.checkpoint_saver", TIMM_DIR / "utils" / "checkpoint_saver.py")
        yield model_ema, saver.CheckpointSaver, helpers.load_checkpoint
    finally:
        for k in [k for k in sys.modules if k == "timm" or k.startswith("timm.")]:
            del sys.modules[k]
        sys.modules.update(saved)


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 6 * 6, 5))


def _train(model, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(steps):
        loss = model(torch.randn(6, 3, 8, 8, generator=g)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        yield


SETTINGS = [
    dict(decay=0.998),
    dict(decay=0.999, use_warmup=True, warmup_power=3 / 4, update_after_step=2),
    dict(decay=0.99, use_warmup=True, min_decay=0.5, exclude_buffers=True),
    dict(decay=0.99, foreach=False, dtype=torch.float64),
]


@pytest.mark.parametrize("settings", SETTINGS, ids=range(len(SETTINGS)))
def test_same_run_each_update_checked(settings, timm_parts, engine):
    """Each update from the same state: within 1 ulp of the operands of timm's (lerp_ on
    CPU fuses a multiply-add; ours does not); copied tensors bit for bit."""
    model_ema, _, _ = timm_parts
    model = _model()
    mine = ours.ModelEmaV3(model, **settings)
    theirs = model_ema.ModelEmaV3(model, **settings)
    free = model_ema.ModelEmaV3(model, **settings)
    for step, _ in enumerate(_train(model, 20)):
        theirs.module.load_state_dict(mine.module.state_dict())
        old = [v.clone() for v in mine.module.state_dict().values()]
        online = list(model.state_dict().values())
        scales = step_scale([o.double() for o in old], online)
        mine.update(model, step=step)
        theirs.update(model, step=step)
        free.update(model, step=step)
        assert mine.get_decay(step) == theirs.get_decay(step)
        for (k, a), b, s in zip(mine.module.state_dict().items(),
                                theirs.module.state_dict().values(), scales):
            if a.is_floating_point() and not torch.equal(a, b):
                assert_within_ulps(a, b, 1.0, f"step {step} {k}", s)
            else:
                assert torch.equal(a, b), k
    for (k, a), b in zip(mine.module.state_dict().items(), free.module.state_dict().values()):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)
        else:
            assert torch.equal(a, b), k


def test_every_public_name_of_model_ema(timm_parts):
    """A drop-in for timm.utils.model_ema: ModelEmaV2/V3 ours, the rest timm's (ModelEma)."""
    model_ema, _, _ = timm_parts
    n = assert_drop_in(ours, model_ema, ["ModelEmaV2", "ModelEmaV3"])
    assert ours.ModelEma is model_ema.ModelEma
    print(f"timm: {n} of {n} public names of timm.utils.model_ema")


def test_every_public_name_of_timm_utils():
    """And for timm.utils, where scripts import ModelEmaV3 from (needs torchvision)."""
    pytest.importorskip("torchvision")  # without it timm_parts stands in for timm's package
    n = assert_drop_in(ours, importlib.import_module("timm.utils"), ["ModelEmaV2", "ModelEmaV3"])
    print(f"timm: {n} of {n} public names of timm.utils")


def test_model_ema_v2_each_update_checked(timm_parts):
    """ModelEmaV2: decay at every update, from the same state as timm's V2 within 2 ulps of
    the operands (timm computes decay * e + (1 - decay) * m: three roundings); integer
    buffers copied (timm's truncates its float average: checked apart)."""
    model_ema, _, _ = timm_parts
    model = _model()
    mine = ours.ModelEmaV2(model, decay=0.9)
    theirs = model_ema.ModelEmaV2(model, decay=0.9)
    for step, _ in enumerate(_train(model, 12)):
        theirs.module.load_state_dict(mine.module.state_dict())
        old = [v.clone() for v in mine.module.state_dict().values()]
        scales = step_scale([o.double() for o in old], list(model.state_dict().values()))
        mine.update(model)
        theirs.update(model)
        for (k, a), b, m, s in zip(mine.module.state_dict().items(),
                                   theirs.module.state_dict().values(),
                                   model.state_dict().values(), scales):
            if a.is_floating_point():
                assert_within_ulps(a, b, 2.0, f"step {step} {k}", s)
            else:
                assert torch.equal(a, m), k  # copied
    mine.set(model)
    for a, b in zip(mine.module.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
    assert mine.decay == 0.9 and not mine.module.training


def test_set_forward_and_step_none(timm_parts):
    model_ema, _, _ = timm_parts
    model = _model()
    mine = ours.ModelEmaV3(model, decay=0.9)
    for _ in _train(model, 2):
        pass
    mine.set(model)
    for a, b in zip(mine.module.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
    assert mine.get_decay() == 0.9 == model_ema.ModelEmaV3(model, decay=0.9).get_decay()
    x = torch.randn(2, 3, 8, 8)
    model.eval()
    assert torch.equal(mine(x), model(x))
    assert not mine.module.training


def test_checkpoint_saver_and_load_checkpoint(timm_parts, tmp_path):
    """timm's CheckpointSaver writes our EMA as state_dict_ema; load_checkpoint(use_ema=True)
    reads it into a model (and into our EMA's module on resume, as timm's train.py)."""
    _, CheckpointSaver, load_checkpoint = timm_parts
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mine = ours.ModelEmaV3(model, decay=0.9)
    for step, _ in enumerate(_train(model, 5)):
        mine.update(model, step=step)
    saver = CheckpointSaver(model, opt, args=None, model_ema=mine, checkpoint_dir=str(tmp_path),
                            recovery_dir=str(tmp_path), max_history=2)
    saver.save_checkpoint(epoch=0, metric=1.0)
    path = tmp_path / "last.pth.tar"
    assert torch.load(path, weights_only=False)["state_dict_ema"].keys() == \
        mine.module.state_dict().keys()
    restored = _model(seed=7)
    load_checkpoint(restored, str(path), use_ema=True)
    for a, b in zip(restored.state_dict().values(), mine.module.state_dict().values()):
        assert torch.equal(a, b)
    resumed = ours.ModelEmaV3(_model(seed=8), decay=0.9)
    load_checkpoint(resumed.module, str(path), use_ema=True)
    for a, b in zip(resumed.module.state_dict().values(), mine.module.state_dict().values()):
        assert torch.equal(a, b)


def test_bad_input_changes_nothing():
    model = _model()
    mine = ours.ModelEmaV3(model, decay=0.9)
    before = [v.clone() for v in mine.module.state_dict().values()]
    other = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 6 * 6, 6))
    with pytest.raises(ValueError, match="shape"):
        mine.update(other)
    with pytest.raises(ValueError, match="entries"):
        mine.update(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="decay"):
        ours.ModelEmaV3(model, decay=1.5)
    for a, b in zip(mine.module.state_dict().values(), before):
        assert torch.equal(a, b)


TIMM_OWN = ["test_model_ema_v3_bf16_model_fp32_ema", "test_model_ema_v3_bf16_ema_stochastic_rounding",
            "test_model_ema_v3_fp32_unchanged", "test_model_ema_v3_stochastic_rounding_rank_rng",
            "test_model_ema_v3_stochastic_rounding_advances"]


@pytest.fixture(scope="module")
def timm_own_tests():
    source = sdist_file(f"timm=={_timm_version()}", "tests/test_utils.py")
    return load_functions(source, TIMM_OWN + ["_ema_drift_test"], {"torch": torch,
                                                                   "pytest": pytest})


def _timm_version():
    from importlib.metadata import version
    return version("timm")


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("exclude_buffers", [True, False])
@pytest.mark.parametrize("name", TIMM_OWN)
def test_timm_own_model_ema_tests(name, foreach, exclude_buffers, timm_own_tests, monkeypatch):
    """timm's own ModelEmaV3 tests, with ``from timm.utils.model_ema import ModelEmaV3``
    inside them resolving to our class."""
    fake = types.ModuleType("timm.utils.model_ema")
    fake.ModelEmaV3 = ours.ModelEmaV3
    for pkg in ("timm", "timm.utils"):
        monkeypatch.setitem(sys.modules, pkg, sys.modules.get(pkg) or types.ModuleType(pkg))
    monkeypatch.setitem(sys.modules, "timm.utils.model_ema", fake)
    monkeypatch.setattr(sys.modules["timm.utils"], "model_ema", fake, raising=False)
    fn = timm_own_tests[name]
    args = fn.__code__.co_varnames[:fn.__code__.co_argcount]
    kwargs = {"foreach": foreach, "exclude_buffers": exclude_buffers, "device": "cpu"}
    if name == "test_model_ema_v3_fp32_unchanged" and (foreach or exclude_buffers):
        pytest.skip("not parametrized in timm")
    if name == "test_model_ema_v3_stochastic_rounding_advances" and exclude_buffers:
        pytest.skip("not parametrized by exclude_buffers in timm")
    fn(**{a: kwargs[a] for a in args})


def test_stochastic_rounding_is_the_engines_keyed_by_step(engine):
    """stochastic_rounding=True on a bf16 EMA: the fused kernel's stochastic rounding with
    the seed and the step given to update() (the count of updates without one), so a resumed
    run that passes step continues bit for bit."""
    from fused_ema import ema_update_
    model = _model().bfloat16()
    mine = ours.ModelEmaV3(model, decay=0.99, stochastic_rounding=True,
                           stochastic_rounding_seed=3)
    def floats(m):  # what timm averages: the floating state_dict entries, in its order
        return [v for v in m.state_dict().values() if v.is_floating_point()]

    mirror = [t.clone() for t in floats(mine.module)]

    def train(n):
        g = torch.Generator().manual_seed(1)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for _ in range(n):
            model(torch.randn(6, 3, 8, 8, generator=g).bfloat16()).float().pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            yield

    steps = train(6)
    for step in range(3):
        next(steps)
        mine.update(model, step=step + 100)
        ema_update_(mirror, floats(model), mine.get_decay(step + 100),
                    rounding="stochastic", seed=3, step=step + 100)
    for a, b in zip(floats(mine.module), mirror):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16))
    resumed = ours.ModelEmaV3(model, decay=0.99, stochastic_rounding_seed=3)
    resumed.module.load_state_dict(mine.module.state_dict())
    for step in range(3, 6):
        next(steps)
        mine.update(model, step=step + 100)
        resumed.update(model, step=step + 100)
    for a, b in zip(mine.module.state_dict().values(), resumed.module.state_dict().values()):
        assert torch.equal(a, b)
    # without step: the count of updates
    counted = ours.ModelEmaV3(model, decay=0.99, stochastic_rounding_seed=3)
    mirror = [t.clone() for t in floats(counted.module)]
    for step in range(2):
        counted.update(model)
        ema_update_(mirror, floats(model), 0.99, rounding="stochastic", seed=3, step=step)
    assert all(torch.equal(a, b) for a, b in zip(floats(counted.module), mirror))
