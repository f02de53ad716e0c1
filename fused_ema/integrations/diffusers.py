"""diffusers: ``EMAModel`` with diffusers' constructor, decay schedule, state_dict and
``save_pretrained``/``from_pretrained``, the update fused into one call for all parameters.

>>> from fused_ema.integrations.diffusers import EMAModel
>>> ema_unet = EMAModel(unet.parameters(), decay=0.9999, use_ema_warmup=True,
...                     model_cls=UNet2DConditionModel, model_config=unet.config)
>>> ema_unet.step(unet.parameters())     # after each optimizer step

What differs from diffusers 0.42: the update is ``shadow.lerp_(param, 1 - decay)``
(diffusers: ``shadow - (1 - decay) * (shadow - param)``): bit for bit on the compiled
engine while ``1 - decay < 0.5`` (with diffusers' default ``foreach=False``; its foreach
path may fuse a multiply-add: one ulp); within two ulps of the operands for the first
updates of the schedule, where the decay is below 0.5 (the very first, decay 0, gives the
parameter exactly; diffusers' ``s - (s - p)`` can be an ulp off). ``foreach`` is accepted
and changes nothing: the fused update is always used (and allocates no temporary).
Parameters with ``requires_grad=False`` are copied, as in diffusers. Shadows on another
device than the parameters (offload) are updated without calling ``to()`` first.
DeepSpeed ZeRO-3 gathering is not done (diffusers gathers each parameter when ZeRO-3 is
enabled): averaging ZeRO-3 shards needs the EMA sharded like them.

A drop-in for the module ``diffusers.training_utils`` (0.42.1), where training scripts
import ``EMAModel`` from: ``EMAModel`` is ours; every other public name of that module
(``compute_snr``, ``cast_training_params``, ``free_memory`` ...) is diffusers' own object,
imported on first use.
"""
import copy
import warnings
from typing import Any, Dict, Iterable, Optional, Union

import torch

from . import _delegate, _pairs
from ..validation import check_unit

__all__ = ["EMAModel"]
__getattr__, __dir__ = _delegate.delegate(__name__, ["diffusers.training_utils"],
                                          "diffusers==0.42.1")


def _deprecated(what: str) -> None:
    warnings.warn(f"{what} is deprecated (as in diffusers)", FutureWarning, stacklevel=3)


class EMAModel:
    """Exponential moving average of a model's parameters (diffusers' ``EMAModel`` API)."""

    def __init__(
        self,
        parameters: Iterable[torch.nn.Parameter],
        decay: float = 0.9999,
        min_decay: float = 0.0,
        update_after_step: int = 0,
        use_ema_warmup: bool = False,
        inv_gamma: Union[float, int] = 1.0,
        power: Union[float, int] = 2 / 3,
        foreach: bool = False,
        model_cls: Optional[Any] = None,
        model_config: Optional[Dict[str, Any]] = None,
        **kwargs,
    ):
        if isinstance(parameters, torch.nn.Module):
            _deprecated("Passing a `torch.nn.Module` to `EMAModel`")
            parameters = parameters.parameters()
            use_ema_warmup = True  # diffusers' behaviour for a module
        if kwargs.get("max_value") is not None:
            _deprecated("The `max_value` argument")
            decay = kwargs["max_value"]
        if kwargs.get("min_value") is not None:
            _deprecated("The `min_value` argument")
            min_decay = kwargs["min_value"]
        check_unit("decay", decay)
        parameters = list(parameters)
        self.shadow_params = [p.clone().detach() for p in parameters]
        if kwargs.get("device") is not None:
            _deprecated("The `device` argument")
            self.to(device=kwargs["device"])
        self.temp_stored_params = None
        self.decay = decay
        self.min_decay = min_decay
        self.update_after_step = update_after_step
        self.use_ema_warmup = use_ema_warmup
        self.inv_gamma = inv_gamma
        self.power = power
        self.optimization_step = 0
        self.cur_decay_value = None  # set in `step()`
        self.foreach = foreach
        self.model_cls = model_cls
        self.model_config = model_config
        self._lerp = _pairs.Lerp("shadow params", "parameters")  # the plan, built once

    @classmethod
    def from_pretrained(cls, path, model_cls, foreach: bool = False) -> "EMAModel":
        """Loads an EMA saved by ``save_pretrained`` (this class's or diffusers')."""
        _, ema_kwargs = model_cls.from_config(path, return_unused_kwargs=True)
        model = model_cls.from_pretrained(path)
        ema_model = cls(model.parameters(), model_cls=model_cls, model_config=model.config,
                        foreach=foreach)
        ema_model.load_state_dict(ema_kwargs)
        return ema_model

    def save_pretrained(self, path) -> None:
        """Saves the EMA weights as a ``model_cls`` model, the EMA settings in its config."""
        if self.model_cls is None:
            raise ValueError("`save_pretrained` can only be used if `model_cls` was defined at "
                             "__init__.")
        if self.model_config is None:
            raise ValueError("`save_pretrained` can only be used if `model_config` was defined "
                             "at __init__.")
        model = self.model_cls.from_config(self.model_config)
        state_dict = self.state_dict()
        state_dict.pop("shadow_params", None)
        model.register_to_config(**state_dict)
        self.copy_to(model.parameters())
        model.save_pretrained(path)

    def get_decay(self, optimization_step: int) -> float:
        """The decay of the update at ``optimization_step`` (diffusers' schedule)."""
        step = max(0, optimization_step - self.update_after_step - 1)
        if step <= 0:
            return 0.0
        if self.use_ema_warmup:
            value = 1 - (1 + step / self.inv_gamma) ** -self.power
        else:
            value = (1 + step) / (10 + step)
        value = min(value, self.decay)
        return max(value, self.min_decay)

    @torch.no_grad()
    def step(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """One update after an optimizer step: averaged in one fused call for the parameters
        that require grad, copied for the others. Checked whole before anything is written."""
        if isinstance(parameters, torch.nn.Module):
            _deprecated("Passing a `torch.nn.Module` to `EMAModel.step`")
            parameters = parameters.parameters()
        parameters = list(parameters)
        _pairs.check_pairs(self.shadow_params, parameters, "shadow params", "parameters")
        decay = self.get_decay(self.optimization_step + 1)
        avg_s, avg_p, copy_s, copy_p = [], [], [], []
        for s, p in zip(self.shadow_params, parameters):
            if p.requires_grad:
                avg_s.append(s)
                avg_p.append(p)
            else:
                copy_s.append(s)
                copy_p.append(p)
        self._lerp(avg_s, avg_p, decay)
        _pairs.copy_(copy_s, [p.to(s.device) for s, p in zip(copy_s, copy_p)])
        self.optimization_step += 1
        self.cur_decay_value = decay

    def copy_to(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Writes the averaged weights into ``parameters``."""
        parameters = list(parameters)
        _pairs.check_pairs([p.data for p in parameters], self.shadow_params, "parameters",
                           "shadow params")
        _pairs.copy_([p.data for p in parameters],
                     [s.to(p.device) for s, p in zip(self.shadow_params, parameters)],
                     "parameters", "shadow params")

    def pin_memory(self) -> None:
        """Moves the shadows to pinned host memory (for non-blocking offload copies)."""
        self.shadow_params = [p.pin_memory() for p in self.shadow_params]

    def to(self, device=None, dtype=None, non_blocking: bool = False) -> None:
        """Moves the shadows; ``dtype`` applies to floating ones."""
        self.shadow_params = [
            p.to(device=device, dtype=dtype, non_blocking=non_blocking) if p.is_floating_point()
            else p.to(device=device, non_blocking=non_blocking)
            for p in self.shadow_params]

    def state_dict(self) -> dict:
        """diffusers' format (accelerate saves it with ``register_for_checkpointing``)."""
        return {
            "decay": self.decay,
            "min_decay": self.min_decay,
            "optimization_step": self.optimization_step,
            "update_after_step": self.update_after_step,
            "use_ema_warmup": self.use_ema_warmup,
            "inv_gamma": self.inv_gamma,
            "power": self.power,
            "shadow_params": self.shadow_params,
        }

    def store(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Saves the current parameters (on the CPU, as diffusers) for ``restore()``."""
        self.temp_stored_params = [p.detach().cpu().clone() for p in parameters]

    def restore(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Puts back what ``store()`` saved and forgets it."""
        if self.temp_stored_params is None:
            raise RuntimeError("This ExponentialMovingAverage has no `store()`ed weights to "
                               "`restore()`")
        parameters = list(parameters)
        _pairs.check_pairs([p.data for p in parameters], self.temp_stored_params,
                           "parameters", "stored params")
        for c, p in zip(self.temp_stored_params, parameters):
            p.data.copy_(c.data)
        self.temp_stored_params = None

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads a ``state_dict()`` (this class's or diffusers'); missing keys keep their
        value. Everything is checked before anything is assigned, ``shadow_params`` against
        the current ones (as many, of the same shapes)."""
        state_dict = copy.deepcopy(state_dict)
        new = {k: state_dict.get(k, getattr(self, k)) for k in
               ("decay", "min_decay", "optimization_step", "update_after_step",
                "use_ema_warmup", "inv_gamma", "power")}
        check_unit("decay", new["decay"])
        checks = (("min_decay", float), ("optimization_step", int),
                  ("update_after_step", int), ("use_ema_warmup", bool),
                  ("inv_gamma", (float, int)), ("power", (float, int)))
        for key, kind in checks:
            if not isinstance(new[key], kind):
                raise ValueError(f"Invalid {key}")
        shadow = state_dict.get("shadow_params", None)
        if shadow is not None:
            if not isinstance(shadow, list):
                raise ValueError("shadow_params must be a list")
            if not all(isinstance(p, torch.Tensor) for p in shadow):
                raise ValueError("shadow_params must all be Tensors")
            # an EMA of another model would be swapped in silently and fail at the next step
            _pairs.check_pairs(self.shadow_params, shadow, "shadow params",
                               "shadow_params in the state dict")
        for key, value in new.items():
            setattr(self, key, value)
        if shadow is not None:
            self.shadow_params = shadow
