"""ema-pytorch: ``EMA`` with ema-pytorch's constructor, schedule, counters and state_dict,
the averaging fused into one call for all tensors.

>>> from fused_ema.integrations.ema_pytorch import EMA
>>> ema = EMA(model, beta=0.9999, update_after_step=100, update_every=10)
>>> ema.update()          # after each optimizer step
>>> ema(x)                # runs the EMA model

Its numbers, not ours: the decay is ema-pytorch's warmup ``1 - (1 + epoch/inv_gamma)**-power``
computed as it does (float32 tensor ops), clamped to [min_value, beta], with no correction
for ``update_every`` (FusedEMA raises the decay to the k-th power; this class does not).
Float parameters and float buffers (BatchNorm statistics) are averaged, integer buffers
left alone, names in ``param_or_buffer_names_no_ema`` copied, ``ignore_names`` /
``ignore_startswith_names`` skipped, exactly as ema-pytorch 0.8.3.

What differs: the update is the fused ``lerp`` (torch's ``lerp_`` on CPU fuses a
multiply-add, ours does not: each update agrees within one ulp of the operands, bit for
bit with the pure-PyTorch fallback). An EMA on another device or dtype than the model
works without ``allow_different_devices`` / ``coerce_dtype``. The counters are read on
the host (ema-pytorch calls ``.item()`` on its buffers at every update).

A drop-in for the package ``ema_pytorch`` (0.8.3): ``EMA`` is ours; every other public
name of the package (``EMAPytree``, ``EMATensor``, ``EMAModuleWrapper``, ``PostHocEMA``,
``KarrasEMA`` and its submodules) is ema-pytorch's own object, imported on first use
(not accelerated; ``fused_ema.PostHocEMA`` is the fused post-hoc EMA, with its own API).
As in ema-pytorch, ``EMA(pytree)`` of something that is not an ``nn.Module`` returns
ema-pytorch's ``EMAPytree``.
"""
from copy import deepcopy
from typing import Callable, Optional, Set, Tuple, Union

import numpy as np
import torch
from torch import nn

from . import _delegate, _pairs
from ..validation import check_unit

__all__ = ["EMA"]
__getattr__, __dir__ = _delegate.delegate(__name__, ["ema_pytorch"], "ema-pytorch==0.8.3")


def _is_float(t: torch.Tensor) -> bool:
    return torch.is_floating_point(t) or torch.is_complex(t)


class EMA(nn.Module):
    """ema-pytorch's ``EMA`` (see the module docstring); the same arguments."""

    def __new__(cls, model=None, *args, **kwargs):
        if model is not None and not isinstance(model, nn.Module):
            # a pytree: ema-pytorch's EMAPytree, as ema-pytorch's EMA does (not fused)
            return __getattr__("EMAPytree")(model, *args, **kwargs)
        return super().__new__(cls)  # (model=None: deepcopy creates it bare)

    def __init__(
        self,
        model: nn.Module,
        ema_model: Optional[Union[nn.Module, Callable[[], nn.Module]]] = None,
        beta: float = 0.9999,
        update_after_step: int = 100,
        update_every: int = 10,
        inv_gamma: float = 1.0,
        power: float = 2 / 3,
        min_value: float = 0.0,
        param_or_buffer_names_no_ema: Set[str] = set(),
        ignore_names: Set[str] = set(),
        ignore_startswith_names: Set[str] = set(),
        include_online_model: bool = True,
        allow_different_devices: bool = False,
        use_foreach: bool = False,
        update_model_with_ema_every: Optional[int] = None,
        update_model_with_ema_beta: float = 0.0,
        forward_method_names: Tuple[str, ...] = (),
        move_ema_to_online_device: bool = False,
        coerce_dtype: bool = False,
        lazy_init_ema: bool = False,
    ):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"fused_ema: EMA takes an nn.Module or a pytree, got "
                            f"{type(model).__name__}")
        if not isinstance(param_or_buffer_names_no_ema, (set, list)):
            raise TypeError("param_or_buffer_names_no_ema must be a set or a list of names")
        check_unit("beta", beta)
        if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
            raise ValueError(f"fused_ema: update_every must be a positive integer, "
                             f"got {update_every!r}")
        self.beta = beta
        self.is_frozen = beta == 1.0
        self.include_online_model = include_online_model
        if include_online_model:
            self.online_model = model
        else:
            self.online_model = [model]  # kept out of the state_dict, as ema-pytorch
        if not isinstance(ema_model, nn.Module) and callable(ema_model):
            ema_model = ema_model()
        self.ema_model = None
        self.forward_method_names = forward_method_names
        if not lazy_init_ema:
            self.init_ema(ema_model)
        elif ema_model is not None:
            raise ValueError("fused_ema: lazy_init_ema=True builds the EMA model itself; "
                             "pass no ema_model")
        self.update_every = update_every
        self.update_after_step = update_after_step
        self.inv_gamma = inv_gamma
        self.power = power
        self.min_value = min_value
        self.param_or_buffer_names_no_ema = param_or_buffer_names_no_ema
        self.ignore_names = ignore_names
        self.ignore_startswith_names = ignore_startswith_names
        self.update_model_with_ema_every = update_model_with_ema_every
        self.update_model_with_ema_beta = update_model_with_ema_beta
        self.allow_different_devices = allow_different_devices
        self.coerce_dtype = coerce_dtype
        self.move_ema_to_online_device = move_ema_to_online_device
        self.use_foreach = use_foreach  # accepted for compatibility: the update is always fused
        self._lerp_to_ema = _pairs.Lerp("ema tensors", "model tensors")
        self._lerp_to_model = _pairs.Lerp("model tensors", "ema tensors")
        self._saturated: Optional[tuple] = None  # (settings, first epoch at beta)
        self.register_buffer("initted", torch.tensor(False))
        self.register_buffer("step", torch.tensor(0))
        # host copies of the two counters (no device sync per update); refreshed on load
        self._host_step, self._host_initted = 0, False
        self.register_load_state_dict_post_hook(lambda module, keys: module._read_counters())

    def _read_counters(self) -> None:
        self._host_step = int(self.step.item())
        self._host_initted = bool(self.initted.item())

    # -------------------------------------------------------------- the EMA model

    def init_ema(self, ema_model: Optional[nn.Module] = None) -> None:
        self.ema_model = ema_model
        if self.ema_model is None:
            try:
                self.ema_model = deepcopy(self.model)
            except Exception as exc:
                raise TypeError(f"fused_ema: could not deep-copy the model ({exc}); pass "
                                "ema_model= (e.g. for LazyLinear)") from exc
        for p in self.ema_model.parameters():
            p.detach_()
        for name in self.forward_method_names:
            setattr(self, name, getattr(self.ema_model, name))
        self.parameter_names = {n for n, p in self.ema_model.named_parameters() if _is_float(p)}
        self.buffer_names = {n for n, b in self.ema_model.named_buffers() if _is_float(b)}

    @property
    def model(self) -> nn.Module:
        return self.online_model if self.include_online_model else self.online_model[0]

    def eval(self):
        return self.ema_model.eval()

    @torch.no_grad()
    def forward_eval(self, *args, **kwargs):
        training = self.ema_model.training
        out = self.ema_model(*args, **kwargs)
        self.ema_model.train(training)
        return out

    def restore_ema_model_device(self) -> None:
        self.ema_model.to(self.initted.device)

    def add_to_optimizer_post_step_hook(self, optimizer):
        if not hasattr(optimizer, "register_step_post_hook"):
            raise TypeError("fused_ema: the optimizer has no register_step_post_hook")
        return optimizer.register_step_post_hook(lambda *_: self.update())

    def get_params_iter(self, model: nn.Module):
        for name, param in model.named_parameters():
            if name in self.parameter_names:
                yield name, param

    def get_buffers_iter(self, model: nn.Module):
        for name, buffer in model.named_buffers():
            if name in self.buffer_names:
                yield name, buffer

    # -------------------------------------------------------------- copies

    def _all_pairs(self, dst_model: nn.Module, src_model: nn.Module):
        dsts, srcs = [], []
        for it in (self.get_params_iter, self.get_buffers_iter):
            for (_, d), (_, s) in zip(it(dst_model), it(src_model)):
                dsts.append(d.data)
                srcs.append(s.data)
        return dsts, srcs

    def _copy(self, dsts, srcs) -> None:
        if self.allow_different_devices or self.coerce_dtype:
            srcs = [s.to(device=d.device, dtype=d.dtype) for d, s in zip(dsts, srcs)]
        _pairs.copy_(dsts, srcs, "ema tensors", "model tensors")

    def copy_params_from_model_to_ema(self) -> None:
        self._copy(*self._all_pairs(self.ema_model, self.model))

    def copy_params_from_ema_to_model(self) -> None:
        self._copy(*self._all_pairs(self.model, self.ema_model))

    def update_model_with_ema(self, decay: Optional[float] = None) -> None:
        decay = self.update_model_with_ema_beta if decay is None else decay
        if decay == 0.0:
            return self.copy_params_from_ema_to_model()
        self.update_moving_average(self.model, self.ema_model, decay)

    # -------------------------------------------------------------- the update

    def get_current_decay(self) -> float:
        """ema-pytorch's decay, to the bit: its warmup is float32 tensor arithmetic (so
        beta=0.999 gives float32(0.999) = 0.99900001287...). The pow runs as the same
        0-d float32 torch ops; the integer step and the clamp are done on the host, where
        they give the same values."""
        return self._decay_at(self._host_step)

    def _decay_at(self, step: int) -> float:
        epoch = max(step - self.update_after_step - 1, 0)
        if epoch <= 0:
            return 0.0
        top = float(np.float32(self.beta))
        settings = (self.update_after_step, self.inv_gamma, self.power, self.min_value, top)
        if self._saturated is not None and self._saturated[0] == settings and \
                epoch >= self._saturated[1]:
            return top  # the warmup only grows: clamped to beta from here on
        e = torch.tensor(float(epoch), dtype=torch.float32)
        value = (1 - (1 + e / self.inv_gamma) ** -self.power).item()
        if value >= top:
            self._saturated = (settings, epoch)
        return min(max(value, float(np.float32(self.min_value))), top)

    def update(self) -> None:
        """ema-pytorch's update; the counters advance after the tensors were written (a
        model that no longer matches the EMA raises and leaves them as they were)."""
        step = self._host_step
        should_update = step % self.update_every == 0
        if not self._host_initted:
            if self.ema_model is None:
                self.init_ema()
            self.copy_params_from_model_to_ema()
            self.initted.data.copy_(torch.tensor(True))
            self._host_initted = True
        elif should_update and step <= self.update_after_step:
            self.copy_params_from_model_to_ema()
        else:
            if should_update:  # the decay of the step this update completes
                self.update_moving_average(self.ema_model, self.model, self._decay_at(step + 1))
            if (self.update_model_with_ema_every is not None
                    and step % self.update_model_with_ema_every == 0):
                self.update_model_with_ema()
        self._host_step = step + 1
        self.step += 1

    def _skipped(self, name: str) -> bool:
        return name in self.ignore_names or any(
            name.startswith(prefix) for prefix in self.ignore_startswith_names)

    @torch.no_grad()
    def update_moving_average(self, ma_model: nn.Module, current_model: nn.Module,
                              current_decay: Optional[float] = None) -> None:
        """All averaged tensors in one fused call, all copied ones in one ``_foreach_copy_``."""
        if self.is_frozen:
            return
        if self.move_ema_to_online_device:
            ma_dev = next(ma_model.parameters()).device
            cur_dev = next(current_model.parameters()).device
            if ma_dev != cur_dev:
                ma_model.to(cur_dev)
        if current_decay is None:
            current_decay = self.get_current_decay()
        copy_d, copy_s, lerp_d, lerp_s = [], [], [], []
        for it in (self.get_params_iter, self.get_buffers_iter):
            for (name, cur), (_, ma) in zip(it(current_model), it(ma_model)):
                if self._skipped(name):
                    continue
                # the tensor objects themselves (not .data): the same at every step, so
                # the cached plan is found by identity
                if name in self.param_or_buffer_names_no_ema:
                    copy_d.append(ma)
                    copy_s.append(cur)
                else:
                    lerp_d.append(ma)
                    lerp_s.append(cur)
        _pairs.check_pairs(copy_d, copy_s, "ema tensors", "model tensors")
        lerp = self._lerp_to_ema if ma_model is self.ema_model else self._lerp_to_model
        lerp(lerp_d, lerp_s, current_decay)
        self._copy(copy_d, copy_s)

    def __call__(self, *args, **kwargs):
        return self.ema_model(*args, **kwargs)
