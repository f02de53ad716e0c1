"""Each drop-in module offers every public name of the module it replaces, at the pinned
version: its accelerated classes are ours, the rest is the library's own object, imported
on first use (PEP 562 ``__getattr__``). timm's is checked in test_integrations_timm.py
(``import timm`` needs torchvision, which may not be installed)."""
import importlib
import subprocess
import sys

import pytest

from integration_helpers import assert_drop_in, public_names

# (adapter, a module it replaces, the names that are ours)
DROP_INS = [
    ("ema_pytorch", "ema_pytorch", ["EMA"]),
    ("torch_ema", "torch_ema", ["ExponentialMovingAverage"]),
    ("diffusers", "diffusers.training_utils", ["EMAModel"]),
    ("sb3", "stable_baselines3.common.utils", ["polyak_update"]),
    ("lightning", "lightning.pytorch.callbacks.weight_averaging", ["EMAWeightAveraging"]),
    ("lightning", "lightning.pytorch.callbacks", ["EMAWeightAveraging"]),
]


@pytest.mark.parametrize("adapter,library,own", DROP_INS, ids=[d[1] for d in DROP_INS])
def test_every_public_name(adapter, library, own):
    real = pytest.importorskip(library)
    ours = importlib.import_module(f"fused_ema.integrations.{adapter}")
    n = assert_drop_in(ours, real, own)
    assert sorted(set(own) & set(ours.__all__)) == sorted(own)
    assert set(public_names(real)) <= set(dir(ours))  # the module's __dir__ lists them
    print(f"{adapter}: {n} of {n} public names of {library}")


def test_delegation_is_lazy():
    """Importing an adapter does not import its library; the first delegated name does."""
    code = """if True:
        import importlib, sys
        for adapter, library, name in [("ema_pytorch", "ema_pytorch", "PostHocEMA"),
                                       ("torch_ema", "torch_ema", "ema"),
                                       ("diffusers", "diffusers", "compute_snr"),
                                       ("sb3", "stable_baselines3", "get_device")]:
            mod = importlib.import_module("fused_ema.integrations." + adapter)
            assert library not in sys.modules, (adapter, "imported on import")
            getattr(mod, name)
            assert library in sys.modules, (adapter, "not imported on use")
        print("lazy")"""
    for library in ("ema_pytorch", "torch_ema", "diffusers", "stable_baselines3"):
        pytest.importorskip(library)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "lazy", out.stderr


def test_missing_library_and_unknown_names(monkeypatch):
    """Without the library a delegated name says what to install; private names are not
    delegated; a name the library lacks is an AttributeError naming both."""
    from fused_ema.integrations import ema_pytorch as ours
    for name in [k for k in sys.modules if k == "ema_pytorch" or k.startswith("ema_pytorch.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "ema_pytorch", None)  # import ema_pytorch fails
    with pytest.raises(ImportError,
                       match=r"PostHocEMA is ema_pytorch's own .*ema-pytorch==0\.8\.3"):
        ours.PostHocEMA
    with pytest.raises(ImportError, match="ema-pytorch==0.8.3"):
        from fused_ema.integrations.ema_pytorch import KarrasEMA  # noqa: F401
    with pytest.raises(AttributeError):
        ours.__wrapped__  # not delegated: no import tried (it would raise ImportError)
    monkeypatch.undo()
    pytest.importorskip("ema_pytorch")
    with pytest.raises(AttributeError, match=r"no attribute 'NoSuchEMA' \(nor has ema_pytorch\)"):
        ours.NoSuchEMA


def test_ema_of_a_pytree_is_ema_pytorchs():
    """As ema-pytorch's EMA: EMA(pytree) returns ema-pytorch's EMAPytree."""
    ema_pytorch = pytest.importorskip("ema_pytorch")
    import torch

    from fused_ema.integrations.ema_pytorch import EMA
    tree = {"w": torch.ones(3)}
    ema = EMA(tree, beta=0.5, update_after_step=0, update_every=1)
    assert type(ema) is ema_pytorch.EMAPytree
    with pytest.raises(TypeError, match="nn.Module or a pytree"):
        EMA(None)
