"""torch_ema: ``ExponentialMovingAverage`` with torch_ema's API and state_dict, the update
fused into one call for all parameters.

>>> from fused_ema.integrations.torch_ema import ExponentialMovingAverage
>>> ema = ExponentialMovingAverage(model.parameters(), decay=0.995)
>>> ema.update()                      # after optimizer.step()
>>> with ema.average_parameters():    # evaluate with the averaged weights
...     evaluate(model)

What differs from torch_ema 0.3: the update is ``shadow.lerp_(param, 1 - decay)``;
torch_ema computes ``shadow - (1 - decay) * (shadow - param)``, which rounds the same
way whenever ``1 - decay < 0.5``, so results agree bit for bit at any decay above 0.5,
and within two ulps (of the operands) for the first 8 updates of ``use_num_updates=True``
(decay <= 0.5, where lerp takes its other branch and both round ``s - p``). 16-bit
shadows are updated in fp32 and rounded once (torch_ema rounds after each of its three
ops). Bad input raises before anything is modified (torch_ema's ``load_state_dict``
asserts after assigning), a NaN decay included (torch_ema's range check lets it through).

A drop-in for the package ``torch_ema`` (0.3): ``ExponentialMovingAverage`` is ours; its
other public name (the submodule ``ema``) is torch_ema's own, imported on first use.
"""
import contextlib
import copy
import weakref
from typing import Iterable, List, Optional

import torch

from . import _delegate, _pairs
from ..validation import check_unit  # the one [0, 1] rule (ValueError, as torch_ema's)

__all__ = ["ExponentialMovingAverage"]
__getattr__, __dir__ = _delegate.delegate(__name__, ["torch_ema"], "torch-ema==0.3")


class ExponentialMovingAverage:
    """Maintains an exponential moving average of a list of parameters (torch_ema's API).

    Args:
        parameters: the tensors to average (``model.parameters()``); all of them are
            averaged, whatever their ``requires_grad``.
        decay: the decay, in [0, 1].
        use_num_updates: use ``min(decay, (1 + n) / (10 + n))`` at the n-th update.
    """

    def __init__(self, parameters: Iterable[torch.nn.Parameter], decay: float,
                 use_num_updates: bool = True):
        self.decay = check_unit("decay", decay)  # NaN too (torch_ema's own check lets it through)
        self.num_updates = 0 if use_num_updates else None
        parameters = list(parameters)
        self.shadow_params = [p.clone().detach() for p in parameters]
        self.collected_params = None
        # weak references, as torch_ema: the EMA does not keep the model alive
        self._params_refs = [weakref.ref(p) for p in parameters]

    def _get_parameters(self, parameters: Optional[Iterable[torch.nn.Parameter]]):
        if parameters is None:
            parameters = [p() for p in self._params_refs]
            if any(p is None for p in parameters):
                raise ValueError(
                    "(One of) the parameters with which this ExponentialMovingAverage was "
                    "initialized no longer exists (was garbage collected); please either provide "
                    "`parameters` explicitly or keep the model to which they belong from being "
                    "garbage collected.")
            return parameters
        parameters = list(parameters)
        if len(parameters) != len(self.shadow_params):
            raise ValueError(
                "Number of parameters passed as argument is different from number of shadow "
                "parameters maintained by this ExponentialMovingAverage")
        return parameters

    def update(self, parameters: Optional[Iterable[torch.nn.Parameter]] = None) -> None:
        """One update (call it after each ``optimizer.step()``): all tensors in one call."""
        parameters = self._get_parameters(parameters)
        decay = self.decay
        num_updates = self.num_updates
        if num_updates is not None:
            num_updates += 1
            decay = min(decay, (1 + num_updates) / (10 + num_updates))
        _pairs.lerp_(self.shadow_params, parameters, decay)  # raises before writing
        self.num_updates = num_updates

    def copy_to(self, parameters: Optional[Iterable[torch.nn.Parameter]] = None) -> None:
        """Copies the averaged parameters into ``parameters`` (default: the tracked ones)."""
        parameters = self._get_parameters(parameters)
        _pairs.copy_([p.data for p in parameters], self.shadow_params, "parameters",
                     "shadow params")

    def store(self, parameters: Optional[Iterable[torch.nn.Parameter]] = None) -> None:
        """Saves the current parameters, for ``restore()``."""
        parameters = self._get_parameters(parameters)
        self.collected_params = [p.clone() for p in parameters]

    def restore(self, parameters: Optional[Iterable[torch.nn.Parameter]] = None) -> None:
        """Puts back the parameters saved by ``store()``."""
        if self.collected_params is None:
            raise RuntimeError("This ExponentialMovingAverage has no `store()`ed weights to "
                               "`restore()`")
        parameters = self._get_parameters(parameters)
        _pairs.copy_([p.data for p in parameters], self.collected_params, "parameters",
                     "stored params")

    @contextlib.contextmanager
    def average_parameters(self, parameters: Optional[Iterable[torch.nn.Parameter]] = None):
        """The averaged parameters inside the block, the model's own afterwards."""
        parameters = self._get_parameters(parameters)
        self.store(parameters)
        self.copy_to(parameters)
        try:
            yield
        finally:
            self.restore(parameters)

    def to(self, device=None, dtype=None) -> None:
        """Moves the shadow (and stored) tensors; ``dtype`` applies to floating ones."""
        def move(ts: List[torch.Tensor]) -> List[torch.Tensor]:
            return [t.to(device=device, dtype=dtype) if t.is_floating_point()
                    else t.to(device=device) for t in ts]
        self.shadow_params = move(self.shadow_params)
        if self.collected_params is not None:
            self.collected_params = move(self.collected_params)

    def state_dict(self) -> dict:
        """torch_ema's format (references to the tensors, as ``nn.Module.state_dict``)."""
        return {"decay": self.decay, "num_updates": self.num_updates,
                "shadow_params": self.shadow_params,
                "collected_params": self.collected_params}

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads a ``state_dict()`` of this class or of torch_ema's; everything is checked
        before anything is assigned."""
        state_dict = copy.deepcopy(state_dict)
        decay = check_unit("decay", state_dict["decay"])
        num_updates = state_dict["num_updates"]
        if not (num_updates is None or (isinstance(num_updates, int)
                                        and not isinstance(num_updates, bool))):
            raise ValueError(f"Invalid num_updates: {num_updates!r}")
        shadow = state_dict["shadow_params"]
        collected = state_dict["collected_params"]
        for what, ts in (("shadow_params", shadow), ("collected_params", collected)):
            if what == "collected_params" and ts is None:
                continue
            if not isinstance(ts, list) or not all(isinstance(t, torch.Tensor) for t in ts):
                raise ValueError(f"{what} must be a list of tensors")
        if collected is not None and len(collected) != len(shadow):
            raise ValueError("collected_params and shadow_params had different lengths")
        if len(shadow) != len(self._params_refs):
            raise ValueError("Tried to `load_state_dict()` with the wrong number of parameters "
                             "in the saved state.")
        params = [p() for p in self._params_refs]
        if not any(p is None for p in params):
            for i, (t, p) in enumerate(zip(shadow, params)):
                if t.shape != p.shape:
                    raise ValueError(f"shadow_params[{i}] has shape {list(t.shape)} in the saved "
                                     f"state but the parameter has {list(p.shape)}")
            # as torch.optim.Optimizer: cast to the parameters' device and dtype
            shadow = [t.to(device=p.device, dtype=p.dtype) for t, p in zip(shadow, params)]
            if collected is not None:
                collected = [t.to(device=p.device, dtype=p.dtype)
                             for t, p in zip(collected, params)]
        self.decay = decay
        self.num_updates = num_updates
        self.shadow_params = shadow
        self.collected_params = collected
