"""fused_ema.integrations.sb3 against Stable-Baselines3's own polyak_update."""
import pytest
import torch
from torch import nn

sb3 = pytest.importorskip("stable_baselines3")
from stable_baselines3.common import utils as sb3_utils  # noqa: E402

from fused_ema.integrations import sb3 as ours  # noqa: E402
from integration_helpers import assert_within_ulps, load_functions, sdist_file, step_scale  # noqa: E402

SB3_POLYAK = sb3_utils.polyak_update
SB3_PIN = f"stable-baselines3=={sb3.__version__}"


def _pairs(shapes, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]
    targets = [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]
    return params, targets


SHAPES = [(0,), (1,), (3,), (65537,), (17, 33), (4, 3, 5, 5), (70000,)]


@pytest.mark.parametrize("tau", [0.0, 0.005, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_matches_sb3(tau, dtype, engine):
    params, targets = _pairs(SHAPES, dtype)
    expected = [t.clone() for t in targets]
    scales = step_scale(targets, params)
    SB3_POLYAK(params, expected, tau)
    ours.polyak_update(params, targets, tau)
    for i, (t, e, s) in enumerate(zip(targets, expected, scales)):
        if tau in (0.0, 1.0):
            assert torch.equal(t, e), f"tensor {i}"
        elif dtype in (torch.float32, torch.float64):
            assert_within_ulps(t, e, 1.0, f"tensor {i}", s)
        else:
            # SB3 rounds to 16 bits twice (after mul_ and after add); we round once from fp32
            assert_within_ulps(t, e, 2.0, f"tensor {i}", s)


def test_channels_last_and_strided_views(engine):
    params, targets = _pairs([(4, 3, 5, 5)] * 2)
    params = [p.to(memory_format=torch.channels_last) for p in params]
    targets = [targets[0].to(memory_format=torch.channels_last), targets[1]]  # mixed layouts
    big = torch.randn(10, 10)
    params.append(big[:, 2])  # a strided column view
    targets.append(torch.randn(10))
    expected = [t.clone() for t in targets]
    scales = step_scale(targets, params)
    SB3_POLYAK(params, expected, 0.3)
    ours.polyak_update(params, targets, 0.3)
    for t, e, s in zip(targets, expected, scales):
        assert_within_ulps(t, e, 1.0, scale=s)


def test_batchnorm_statistics_copied_exactly():
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8))
    target = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8))
    net(torch.randn(16, 4))  # move the running statistics
    stats = sb3_utils.get_parameters_by_name(net, ["running_"])
    stats_t = sb3_utils.get_parameters_by_name(target, ["running_"])
    assert len(stats) == 2
    ours.polyak_update(stats, stats_t, 1.0)
    for s, t in zip(stats, stats_t):
        assert torch.equal(s, t)


def test_bad_input_changes_nothing():
    params, targets = _pairs([(3,), (5,)])
    before = [t.clone() for t in targets]
    with pytest.raises(ValueError, match="target_params"):
        ours.polyak_update(params, targets[:1], 0.1)
    with pytest.raises(ValueError, match=r"params\[1\]"):
        ours.polyak_update([params[0], torch.zeros(4)], targets, 0.1)
    with pytest.raises(ValueError, match="tau"):
        ours.polyak_update(params, targets, 1.5)
    with pytest.raises(TypeError, match="floating-point"):
        ours.polyak_update([params[0], torch.zeros(5, dtype=torch.int64)], targets, 0.1)
    for t, b in zip(targets, before):
        assert torch.equal(t, b)


def test_patch_replaces_and_restores():
    from stable_baselines3.dqn import dqn
    from stable_baselines3.sac import sac
    from stable_baselines3.td3 import td3
    with ours.patch():
        for mod in (dqn, sac, td3, sb3_utils):
            assert mod.polyak_update is ours.polyak_update
    for mod in (dqn, sac, td3, sb3_utils):
        assert mod.polyak_update is SB3_POLYAK
    ours.patch()
    assert dqn.polyak_update is ours.polyak_update
    ours.unpatch()
    assert dqn.polyak_update is SB3_POLYAK


@pytest.fixture
def one_thread():
    """RL loops of tiny networks: many small ops, which extra threads only slow down."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class _Checked:
    """Every call runs SB3's polyak_update on copies of the targets, then ours on the real
    targets, and compares: the training runs on our numbers, each call checked."""

    def __init__(self):
        self.calls = {"soft": 0, "hard": 0, "empty": 0}

    def __call__(self, params, target_params, tau):
        params, target_params = list(params), list(target_params)
        expected = [t.detach().clone() for t in target_params]
        scales = step_scale(target_params, params)
        SB3_POLYAK(params, expected, tau)
        ours.polyak_update(params, target_params, tau)
        for t, e, s in zip(target_params, expected, scales):
            if tau == 1.0:
                assert torch.equal(t, e)
            else:
                assert_within_ulps(t.detach(), e, 1.0, scale=s)
        key = "empty" if not params else ("hard" if tau == 1.0 else "soft")
        self.calls[key] += 1


def test_dqn_training_every_call_checked(one_thread):
    import gymnasium as gym
    from stable_baselines3 import DQN
    checked = _Checked()
    with ours.patch(checked):
        model = DQN("MlpPolicy", gym.make("CartPole-v1"), learning_starts=50, train_freq=1,
                    target_update_interval=20, tau=0.5, batch_size=16, buffer_size=1000,
                    policy_kwargs={"net_arch": [32]}, seed=0, device="cpu")
        model.learn(300)
    assert checked.calls["soft"] >= 10  # one per target update
    target = list(model.q_net_target.parameters())
    online = list(model.q_net.parameters())
    assert not all(torch.equal(a, b) for a, b in zip(target, online))


def test_sac_training_every_call_checked(one_thread):
    import gymnasium as gym
    from stable_baselines3 import SAC
    checked = _Checked()
    with ours.patch(checked):
        model = SAC("MlpPolicy", gym.make("Pendulum-v1"), learning_starts=50, batch_size=16,
                    buffer_size=1000, policy_kwargs={"net_arch": [32, 32]}, seed=0,
                    device="cpu")
        model.learn(120)
    assert checked.calls["soft"] >= 60  # tau=0.005 after every gradient step
    # BatchNorm statistics: SAC calls polyak_update(..., 1.0) on them (empty for an MLP)
    assert checked.calls["empty"] == checked.calls["soft"]


def test_td3_with_batchnorm_features_every_call_checked(one_thread):
    """TD3 with a BatchNorm feature extractor: the statistics go through tau=1."""
    import gymnasium as gym
    from stable_baselines3 import TD3
    from stable_baselines3.common.torch_layers import BaseFeaturesExtractor

    class BNExtractor(BaseFeaturesExtractor):
        def __init__(self, space):
            super().__init__(space, features_dim=8)
            self.net = nn.Sequential(nn.Linear(space.shape[0], 8), nn.BatchNorm1d(8))

        def forward(self, x):
            return self.net(x)

    checked = _Checked()
    with ours.patch(checked):
        model = TD3("MlpPolicy", gym.make("Pendulum-v1"), learning_starts=50, batch_size=16,
                    buffer_size=1000, seed=0, device="cpu",
                    policy_kwargs={"net_arch": [16], "features_extractor_class": BNExtractor,
                                   "share_features_extractor": False})
        model.learn(120)
    assert checked.calls["hard"] > 0 and checked.calls["soft"] > 0


def test_sb3_own_polyak_test_from_sdist(monkeypatch):
    """SB3's own ``test_polyak`` (tests/test_utils.py of its published sdist), run against
    our polyak_update."""
    source = sdist_file(SB3_PIN, "tests/test_utils.py")
    ns = load_functions(source, ["test_polyak"], {"th": torch, "polyak_update":
                                                  ours.polyak_update})
    ns["test_polyak"]()
