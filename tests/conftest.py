import pytest
import torch

from fused_ema import _ext

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(params=["compiled", "python"])
def engine(request, monkeypatch):
    """Runs a test once through the compiled kernels and once through the fallback."""
    if request.param == "compiled":
        if _ext._C is None:
            pytest.skip(f"compiled module not available: {_ext.LOAD_ERROR}")
        if _ext.FORCE_PYTHON:
            pytest.skip("FUSED_EMA_BACKEND=python: the compiled kernels are not used")
    else:
        monkeypatch.setattr(_ext, "FORCE_PYTHON", True)
    return request.param
