"""Loads the compiled module, or says once why not and lets the fallback run.

``FUSED_EMA_BACKEND=python`` (read at import) forces the pure-PyTorch fallback.
"""
import os
import warnings

import torch

FORCE_PYTHON = os.environ.get("FUSED_EMA_BACKEND", "").strip().lower() == "python"

try:
    from . import _C  # noqa: F401  (also registers torch.ops.fused_ema)
    LOAD_ERROR = None
except ImportError as exc:  # missing build, or built against another torch
    _C = None
    LOAD_ERROR = exc
    if not FORCE_PYTHON:
        warnings.warn(
            f"fused_ema: the compiled module could not be loaded ({exc}); using the "
            "pure-PyTorch fallback. Rebuild with `pip install --no-build-isolation -e .`.",
            RuntimeWarning,
            stacklevel=2,
        )

if _C is not None:
    # Shape-only versions for torch.compile / FakeTensor tracing: the ops return
    # nothing and mutate `emas` in place, as their schemas say.
    # They also check what can be checked without memory (lengths, shapes,
    # devices, dtypes), so a bad call fails when traced, not later.
    from . import validation as _validation

    def _validate_fake(emas_per_decay, params, stochastic):
        _validation.validate(emas_per_decay, params, check_memory=False)
        if stochastic:
            _validation.check_stochastic(emas_per_decay)

    @torch.library.register_fake("fused_ema::ema_update_")
    def _ema_update_fake(emas, params, decay, decay_tensor=None, skip=None, stochastic=False,
                         seed=0, step=0, step_tensor=None):
        _validate_fake([emas], params, stochastic)

    @torch.library.register_fake("fused_ema::multi_ema_update_")
    def _multi_ema_update_fake(emas, params, decays, decay_tensor=None, skip=None,
                               stochastic=False, seed=0, step=0, step_tensor=None):
        n = len(params)
        k = len(emas) // n if n and len(emas) % n == 0 else 1
        _validate_fake([emas[j * n:(j + 1) * n] for j in range(k)] if n else [emas], params,
                       stochastic)


def compiled_for(device_type: str) -> bool:
    """True when the compiled module has kernels for this device type."""
    if FORCE_PYTHON or _C is None:
        return False
    if device_type == "cpu":
        return True
    return device_type == "cuda" and _C.compiled_with_cuda()
