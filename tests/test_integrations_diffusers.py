"""fused_ema.integrations.diffusers against diffusers' EMAModel (its sdist ships no EMA
tests, so its documented behaviour is tested: the same runs with both, tensor by tensor)."""
import pytest
import torch
from torch import nn

pytest.importorskip("diffusers")
from diffusers import ConfigMixin, ModelMixin  # noqa: E402
from diffusers.configuration_utils import register_to_config  # noqa: E402
from diffusers.training_utils import EMAModel as TheirEMAModel  # noqa: E402

from fused_ema.integrations.diffusers import EMAModel  # noqa: E402
from integration_helpers import assert_within_ulps, step_scale  # noqa: E402


class TinyDenoiser(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, width: int = 8):
        super().__init__()
        self.inp = nn.Conv2d(3, width, 3, padding=1)
        self.norm = nn.GroupNorm(2, width)
        self.out = nn.Conv2d(width, 3, 3, padding=1)

    def forward(self, x):
        return self.out(torch.relu(self.norm(self.inp(x))))


def _train(model, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        x = torch.randn(4, 3, 8, 8, generator=g)
        loss = (model(x) - x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        yield


SETTINGS = [
    dict(decay=0.999),
    dict(decay=0.99, use_ema_warmup=True, power=3 / 4, update_after_step=3),
    dict(decay=0.9, min_decay=0.6, use_ema_warmup=True, inv_gamma=2.0),
    dict(decay=0.99, foreach=True),
]


@pytest.mark.parametrize("settings", SETTINGS, ids=range(len(SETTINGS)))
def test_same_run_each_step_checked(settings, engine):
    """Each step, from the same state: bit for bit (compiled engine, diffusers' default
    per-tensor path) when 1 - decay < 0.5, else within 2 ulps of the operands (both round
    s - p, up to twice the operands); the decays and counters identical. A frozen
    parameter is copied."""
    model = TinyDenoiser()
    model.norm.weight.requires_grad_(False)
    params = list(model.parameters())
    mine = EMAModel(params, **settings)
    theirs = TheirEMAModel(params, **settings)
    free = TheirEMAModel(params, **settings)
    for step, _ in enumerate(_train(model, 30), start=1):
        with torch.no_grad():
            model.norm.weight.add_(0.01)  # a frozen parameter that still changes
        theirs.load_state_dict(mine.state_dict())
        theirs.shadow_params = [s.clone() for s in mine.shadow_params]
        scales = step_scale(mine.shadow_params, params)
        mine.step(params)
        theirs.step(params)
        free.step(params)
        assert mine.optimization_step == theirs.optimization_step == step
        assert mine.cur_decay_value == theirs.cur_decay_value
        exact = (engine == "compiled" and 1 - mine.cur_decay_value < 0.5
                 and not settings.get("foreach"))  # _foreach_sub_(alpha=) may fuse a mul-add
        for i, (a, b, s) in enumerate(zip(mine.shadow_params, theirs.shadow_params, scales)):
            if exact or not params[i].requires_grad:
                assert torch.equal(a, b), (step, i)
            else:
                assert_within_ulps(a, b, 2.0, f"step {step} tensor {i}", s)
    for a, b in zip(mine.shadow_params, free.shadow_params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_store_copy_to_restore_and_to():
    model = TinyDenoiser()
    params = list(model.parameters())
    mine = EMAModel(params, decay=0.9)
    for _ in _train(model, 4):
        mine.step(params)
    online = [p.detach().clone() for p in params]
    mine.store(params)
    assert all(t.device.type == "cpu" for t in mine.temp_stored_params)
    mine.copy_to(params)
    assert all(torch.equal(p, s) for p, s in zip(params, mine.shadow_params))
    mine.restore(params)
    assert mine.temp_stored_params is None
    assert all(torch.equal(p, o) for p, o in zip(params, online))
    with pytest.raises(RuntimeError, match="store"):
        mine.restore(params)
    mine.to(dtype=torch.float64)
    assert all(s.dtype == torch.float64 for s in mine.shadow_params)
    mine.step(params)  # an fp64 EMA of fp32 parameters
    mine.to(dtype=torch.float32, non_blocking=True)
    if torch.cuda.is_available():
        mine.pin_memory()
        assert all(s.is_pinned() for s in mine.shadow_params)


def test_state_dict_interchangeable():
    model = TinyDenoiser()
    params = list(model.parameters())
    mine = EMAModel(params, decay=0.95, use_ema_warmup=True)
    theirs = TheirEMAModel(params, decay=0.95, use_ema_warmup=True)
    for _ in _train(model, 6):
        mine.step(params)
        theirs.step(params)
    assert mine.state_dict().keys() == theirs.state_dict().keys()
    resumed = EMAModel(params)
    resumed.load_state_dict(theirs.state_dict())
    assert resumed.optimization_step == 6 and resumed.use_ema_warmup and resumed.decay == 0.95
    back = TheirEMAModel(params)
    back.load_state_dict(mine.state_dict())
    assert back.optimization_step == 6


def test_save_pretrained_from_pretrained(tmp_path):
    """Saved by ours, loaded by diffusers' EMAModel.from_pretrained, and the other way."""
    model = TinyDenoiser(width=6)
    params = list(model.parameters())
    mine = EMAModel(params, decay=0.97, update_after_step=2, model_cls=TinyDenoiser,
                    model_config=model.config)
    for _ in _train(model, 5):
        mine.step(params)
    mine.save_pretrained(tmp_path / "ours")
    theirs = TheirEMAModel.from_pretrained(tmp_path / "ours", model_cls=TinyDenoiser)
    assert theirs.optimization_step == 5 and theirs.decay == 0.97
    assert theirs.update_after_step == 2
    for a, b in zip(theirs.shadow_params, mine.shadow_params):
        assert torch.equal(a, b)
    theirs.save_pretrained(tmp_path / "theirs")
    again = EMAModel.from_pretrained(tmp_path / "theirs", model_cls=TinyDenoiser)
    assert again.optimization_step == 5
    for a, b in zip(again.shadow_params, mine.shadow_params):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="model_cls"):
        EMAModel(params).save_pretrained(tmp_path / "x")


def test_deprecated_forms():
    model = TinyDenoiser()
    with pytest.warns(FutureWarning):
        ema = EMAModel(model, max_value=0.9, min_value=0.1)
    assert ema.use_ema_warmup and ema.decay == 0.9 and ema.min_decay == 0.1
    with pytest.warns(FutureWarning):
        ema.step(model)
    assert ema.optimization_step == 1


def test_bad_input_changes_nothing():
    model = TinyDenoiser()
    params = list(model.parameters())
    mine = EMAModel(params, decay=0.9)
    for _ in _train(model, 2):
        mine.step(params)
    before = [s.clone() for s in mine.shadow_params]
    with pytest.raises(ValueError, match="parameters"):
        mine.step(params[:-1])
    with pytest.raises(ValueError, match=r"parameters\[0\]"):
        mine.step([torch.zeros(3)] + params[1:])
    assert mine.optimization_step == 2
    for bad, match in (({"decay": 2.0}, "decay must be a number in"), ({"optimization_step": 1.5}, "optimization_step"),
                       ({"shadow_params": (1, 2)}, "list")):
        with pytest.raises(ValueError, match=match):
            mine.load_state_dict(dict(mine.state_dict(), **bad))
    # shadow_params of another model: too few, or one of another shape (with other keys
    # that would otherwise be loaded)
    sd = dict(mine.state_dict(), decay=0.5, optimization_step=7)
    with pytest.raises(ValueError, match=r"got 3 shadow_params in the state dict for 6 "):
        mine.load_state_dict(dict(sd, shadow_params=[s.clone() for s in before[:3]]))
    wrong = [s.clone() for s in before]
    wrong[4] = torch.zeros(5, 8, 3, 3)
    with pytest.raises(ValueError, match=r"shadow_params in the state dict\[4\] has shape "
                                         r"\[5, 8, 3, 3\] but shadow params\[4\] has "
                                         r"\[3, 8, 3, 3\]"):
        mine.load_state_dict(dict(sd, shadow_params=wrong))
    assert mine.decay == 0.9 and mine.optimization_step == 2
    assert all(torch.equal(a, b) for a, b in zip(mine.shadow_params, before))
