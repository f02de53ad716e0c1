"""``FusedEMA``: a target network, momentum teacher or eval EMA updated by one fused call.

A thin layer over the functional core: it copies the model, matches the model's
tensors to the EMA's by name, sorts them into "average", "copy" and "other"
(non-float, copied) groups, builds one ``EMAPlan`` per group once, and turns the
decay (a float, a schedule or a callable) into this step's value. Distributed
details (DTensor, FSDP) stay out of this file; ``named_pairs`` is the seam.
"""
import copy
import math
import numbers
import operator
import re
import warnings
from contextlib import contextmanager
from fnmatch import fnmatchcase
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from . import distributed, fallback, functional
from .functional import EMAPlan
from .schedules import Constant, HalfLife, Schedule

__all__ = ["FusedEMA"]

FLOAT_DTYPES = fallback.FLOAT_DTYPES
_HALF_DTYPES = (torch.float16, torch.bfloat16)
_BUFFER_MODES = ("copy", "average", "ignore")
_FORMAT = "fused_ema.FusedEMA/1"

DecayLike = Union[float, Schedule, Callable[[Any], Any]]


# ----------------------------------------------------------------------------- helpers

def _unwrap(model: nn.Module) -> nn.Module:
    """The module under DDP / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and isinstance(
                getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _normalize(name: str) -> str:
    """Drops the ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) wrapper prefixes."""
    parts = name.split(".")
    i = 0
    while i < len(parts) - 1 and parts[i] in ("module", "_orig_mod"):
        i += 1
    return ".".join(p for p in parts[i:] if p != "_orig_mod")


def _walk(module: nn.Module) -> List[Tuple[str, torch.Tensor, dict, str, bool]]:
    """(name, tensor, container dict, key, is_param) for each parameter and buffer, once
    (tied tensors under their first name); names have the wrapper prefixes removed."""
    out, seen = [], set()
    for mod_name, mod in module.named_modules():
        prefix = mod_name + "." if mod_name else ""
        for is_param, container in ((True, mod._parameters), (False, mod._buffers)):
            for key, t in container.items():
                if t is None or id(t) in seen:
                    continue
                seen.add(id(t))
                out.append((prefix + key, t, container, key, is_param))
    names = [_normalize(n) for n, *_ in out]
    if len(set(names)) == len(names):
        out = [(n, *rest) for n, (_, *rest) in zip(names, out)]
    return out


def _is_dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense (contiguous in some dimension order, e.g. channels_last)."""
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _flat(t: torch.Tensor) -> torch.Tensor:
    """The tensor itself when contiguous, else a 1-D view of a dense tensor in memory order."""
    if t.is_contiguous():
        return t
    return t.as_strided((t.numel(),), (1,))


def _key(t: torch.Tensor):
    return (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, t.device)


def _check_unit(what: str, value: float) -> float:
    v = float(value)
    if not (math.isfinite(v) and 0.0 <= v <= 1.0):
        raise ValueError(f"fused_ema: {what} must be a number in [0, 1], got {value!r}")
    return v


def _is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


class _Callable(Schedule):
    """A user function ``step -> decay`` (or ``step -> tau`` when ``tau=True``)."""

    def __init__(self, fn: Callable, tau: bool = False):
        self.fn, self.is_tau = fn, tau
        self.name = getattr(fn, "__qualname__", None) or type(fn).__name__

    def __call__(self, step: int) -> float:
        value = self.fn(step)
        if isinstance(value, torch.Tensor):
            value = value.item()
        value = float(value)
        return 1.0 - value if self.is_tau else value

    def tensor(self, step: torch.Tensor) -> torch.Tensor:
        value = self.fn(step)
        if not isinstance(value, torch.Tensor):
            value = torch.full_like(step, float(value), dtype=torch.float64)
        value = value.to(torch.float64)
        return 1.0 - value if self.is_tau else value

    @property
    def max_decay(self) -> Optional[float]:
        return None

    def settings(self) -> Dict[str, Any]:
        return {"type": "tau callable" if self.is_tau else "callable", "name": self.name}


def _as_schedule(value, what: str) -> Schedule:
    if isinstance(value, Schedule):
        return value
    if _is_number(value):
        return Constant(_check_unit(what, value))
    if isinstance(value, torch.Tensor):
        raise TypeError(f"fused_ema: {what} must be a float, a schedule or a callable, got a "
                        "tensor; use capturable=True to keep the decay on the device")
    if callable(value):
        return _Callable(value)
    raise TypeError(f"fused_ema: {what} must be a float, a schedule from fused_ema.schedules "
                    f"or a callable step -> decay, got {type(value).__name__}")


def _tau_schedule(tau) -> Schedule:
    if isinstance(tau, Schedule):
        raise TypeError(
            "fused_ema: schedules give the decay (momentum), not tau; pass the schedule as "
            "decay=... (tau = 1 - decay)")
    if _is_number(tau):
        return Constant(1.0 - _check_unit("tau", tau))
    if callable(tau) and not isinstance(tau, torch.Tensor):
        return _Callable(tau, tau=True)
    raise TypeError(f"fused_ema: tau must be a float or a callable step -> tau, got "
                    f"{type(tau).__name__}")


def _compile_patterns(exclude) -> List[Tuple[Any, Callable[[str], bool]]]:
    if exclude is None:
        return []
    if isinstance(exclude, (str, re.Pattern)):
        exclude = [exclude]
    out = []
    for pat in exclude:
        if isinstance(pat, re.Pattern):
            out.append((pat.pattern, lambda n, p=pat: p.search(n) is not None))
        elif isinstance(pat, str):
            norm = _normalize(pat)
            out.append((pat, lambda n, p=norm: n == p or n.startswith(p + ".")
                        or fnmatchcase(n, p)))
        else:
            raise TypeError(f"fused_ema: exclude takes names, glob patterns or re.Pattern "
                            f"objects, got {type(pat).__name__}")
    return out


def _name_indices(message: str, names: Sequence[str], num_decays: int) -> str:
    """Adds the parameter name after each ``params[i]`` / ``emas[i]`` of an engine error."""
    def sub(m):
        i = int(m.group(2))
        return f"{m.group(0)} ('{names[i]}')" if i < len(names) else m.group(0)

    return re.sub(r"(params|emas(?:\[\d+\])?)\[(\d+)\]", sub, message)


class _Handle:
    """Returned by ``FusedEMA.attach``: ``remove()`` detaches the EMA from the optimizer."""

    def __init__(self, ema: "FusedEMA", optimizer, handle):
        self._ema, self._optimizer, self._handle = ema, optimizer, handle

    def remove(self) -> None:
        self._handle.remove()
        self._ema._attached.pop(id(self._optimizer), None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


# ----------------------------------------------------------------------------- FusedEMA

class FusedEMA:
    """An exponential moving average of a model (or of a list of tensors), updated for all
    tensors at once by the fused engine: ``ema = decay * ema + (1 - decay) * param``.

    Args:
        model: an ``nn.Module`` (DDP / ``torch.compile`` wrappers are looked through), or an
            iterable of tensors or of ``(name, tensor)`` pairs.
        decay: a float in [0, 1], a schedule from :mod:`fused_ema.schedules`, or a callable
            ``step -> decay``. Exactly one of ``decay``, ``tau`` and ``decays``.
        tau: ``1 - decay`` (Stable-Baselines3 / RL convention): a float or a callable
            ``step -> tau``. ``tau=1.0`` copies (DQN's hard update, with ``update_every``).
        decays: up to 8 decays (each as ``decay``): K EMAs of the model from one read of its
            weights; ``modules[k]`` is the k-th, ``module`` the first.
        update_after_step: the first N updates copy the model (decay 0).
        update_every: update on every k-th call only (the k-th, 2k-th, ...), with the decay
            raised to the k-th power so the averaging horizon (in optimizer steps) stays the
            same: one update with ``decay**k`` weighs the present as k updates with ``decay``
            would, for weights that move slowly.
        ema_dtype: dtype of the EMA's floating tensors. Default: float32 for 16-bit weights
            (a bf16 EMA with decay 0.999 stops moving: the increment is below bf16
            resolution), the weight's own dtype otherwise.
        buffers: ``"copy"`` (default) copies buffers at each update (BatchNorm statistics,
            counters); ``"average"`` averages floating buffers and copies the others;
            ``"ignore"`` leaves them as they were when the EMA was built.
        exclude: names, glob patterns (``"*.bias"``), module prefixes (``"head"``) or
            ``re.Pattern`` objects of tensors to leave out (never updated).
        capturable: keep the step counter on the device and compute the schedule there:
            an update makes no host sync and can be captured in a CUDA graph or traced by
            ``torch.compile``.
        device: where the EMA lives (default: the model's device). Another device, e.g.
            ``"cpu"`` for a CUDA model, saves accelerator memory; each update then copies the
            weights over first.

    The step counter counts calls to ``update`` (optimizer steps, with ``attach``). A
    schedule is evaluated at ``step - update_after_step``, so ``Warmup`` and ``Cosine``
    start when averaging does; ``Warmup`` returns 0 (a copy) at that first step, as in timm,
    diffusers and ema-pytorch.

    Parameters (``nn.Parameter``) with ``requires_grad=False`` are copied, not averaged
    (read when the plan is built; call ``replan()`` after freezing or unfreezing).
    """

    def __init__(
        self,
        model: Union[nn.Module, Iterable[torch.Tensor], Iterable[Tuple[str, torch.Tensor]]],
        decay: Optional[DecayLike] = None,
        *,
        tau: Optional[Union[float, Callable]] = None,
        decays: Optional[Sequence[DecayLike]] = None,
        update_after_step: int = 0,
        update_every: int = 1,
        ema_dtype: Optional[torch.dtype] = None,
        buffers: str = "copy",
        exclude: Optional[Iterable[Union[str, "re.Pattern"]]] = None,
        capturable: bool = False,
        device: Optional[Union[str, torch.device]] = None,
    ):
        # -- settings (all checked before anything is copied)
        given = [n for n, v in (("decay", decay), ("tau", tau), ("decays", decays))
                 if v is not None]
        if len(given) != 1:
            raise ValueError(
                "fused_ema: give exactly one of decay=, tau= (tau = 1 - decay) or decays=; got "
                + (" and ".join(given) if given else "none"))
        if decay is not None:
            schedules = [_as_schedule(decay, "decay")]
        elif tau is not None:
            schedules = [_tau_schedule(tau)]
        else:
            if isinstance(decays, (str, bytes)) or not isinstance(decays, Iterable):
                raise TypeError("fused_ema: decays must be a sequence of decays")
            decays = list(decays)
            if not 1 <= len(decays) <= fallback.MAX_DECAYS:
                raise ValueError(f"fused_ema: decays takes 1 to {fallback.MAX_DECAYS} decays, "
                                 f"got {len(decays)}")
            schedules = [_as_schedule(d, f"decays[{k}]") for k, d in enumerate(decays)]
        for what, v, low in (("update_after_step", update_after_step, 0),
                             ("update_every", update_every, 1)):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < low:
                raise ValueError(f"fused_ema: {what} must be an integer >= {low}, got {v!r}")
        if buffers not in _BUFFER_MODES:
            raise ValueError(f"fused_ema: buffers must be one of {_BUFFER_MODES}, got {buffers!r}")
        if ema_dtype is not None and ema_dtype not in FLOAT_DTYPES:
            raise TypeError(f"fused_ema: ema_dtype must be one of {FLOAT_DTYPES}, got {ema_dtype}")
        self._schedules: List[Schedule] = schedules
        self.num_decays = len(schedules)
        self.update_after_step = int(update_after_step)
        self.update_every = int(update_every)
        self.buffers = buffers
        self.ema_dtype = ema_dtype
        self.capturable = bool(capturable)
        self._device_explicit = device is not None
        patterns = _compile_patterns(exclude)

        # -- source tensors
        if isinstance(model, nn.Module):
            self._model: Optional[nn.Module] = _unwrap(model)
            src = _walk(self._model)
            self._bare: Optional[List[torch.Tensor]] = None
        elif isinstance(model, torch.Tensor):
            raise TypeError("fused_ema: pass a module or an iterable of tensors, not one tensor "
                            "(wrap it in a list)")
        elif isinstance(model, Iterable):
            self._model = None
            items = list(model)
            src = []
            for i, item in enumerate(items):
                if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
                    name, t = item
                else:
                    name, t = str(i), item
                if not isinstance(t, torch.Tensor):
                    raise TypeError(f"fused_ema: item {i} of the parameter list is "
                                    f"{type(t).__name__}, not a tensor")
                src.append((name, t, None, None, True))
            self._bare = [t for _, t, *_ in src]
            if len({n for n, *_ in src}) != len(src):
                raise ValueError("fused_ema: the (name, tensor) pairs have repeated names")
        else:
            raise TypeError(f"fused_ema: expected an nn.Module or an iterable of tensors, got "
                            f"{type(model).__name__}")

        # -- what happens to each tensor
        self._known_order = [n for n, *_ in src]
        self._known = set(self._known_order)
        used = set()
        names, kinds, excluded = [], [], []
        for name, t, _, _, is_param in src:
            hit = [p for p, match in patterns if match(name)]
            used.update(hit)
            if hit:
                excluded.append(name)
                continue
            if is_param:
                if t.dtype in FLOAT_DTYPES:
                    frozen = isinstance(t, nn.Parameter) and not t.requires_grad
                    kind = "copy" if frozen else "average"
                elif t.is_floating_point() or t.is_complex():
                    raise TypeError(
                        f"fused_ema: parameter '{name}' has dtype {t.dtype}; fused_ema averages "
                        "float32/float16/bfloat16/float64 tensors; leave it out with exclude=")
                else:
                    kind = "other"
            else:
                if buffers == "ignore":
                    continue
                if t.dtype in FLOAT_DTYPES:
                    kind = "average" if buffers == "average" else "copy"
                else:
                    kind = "other"
            names.append(name)
            kinds.append(kind)
        unused = [p for p, _ in patterns if p not in used]
        if unused:
            raise ValueError(f"fused_ema: exclude pattern(s) {unused} match no parameter or "
                             "buffer of the model")
        param_names = {n for n, _, _, _, is_param in src if is_param}
        float_params = [n for n, k in zip(names, kinds) if n in param_names and k != "other"]
        if not float_params:
            if not any(t.dtype in FLOAT_DTYPES for n, t, _, _, p in src if p):
                raise ValueError("fused_ema: the model has no floating-point parameters; "
                                 "there is nothing to average")
            raise ValueError(f"fused_ema: every floating-point parameter is excluded "
                             f"(exclude={[p for p, _ in patterns]}); an update would touch no "
                             "parameter")
        if not any(k == "average" for k in kinds):
            warnings.warn("fused_ema: every parameter has requires_grad=False, so the EMA only "
                          "copies the model", UserWarning, stacklevel=2)
        self._names, self._kinds, self._excluded = names, kinds, sorted(excluded)

        # -- the EMA tensors
        first = next((t for _, t, *_ in src if t.dtype in FLOAT_DTYPES), src[0][1])
        self._device = torch.device(device) if device is not None else first.device
        if self.capturable and self._device_explicit and self._device != first.device:
            raise ValueError(
                f"fused_ema: capturable=True needs the EMA on the model's device ({first.device}),"
                f" not {self._device}: a cross-device update cannot avoid a host sync")
        self._warn_half(src)

        def ema_copy(t: torch.Tensor) -> torch.Tensor:
            dtype = self._ema_dtype_for(t.dtype)
            return t.detach().to(device=self._device, dtype=dtype, copy=True)

        self.modules: Optional[List[nn.Module]] = None
        self._bare_emas: Optional[List[List[torch.Tensor]]] = None
        with torch.no_grad():
            if self._model is not None:
                self.modules = []
                sharded = distributed.is_sharded(self._model)
                for _ in range(self.num_decays):
                    memo = {}
                    for name, t, _, _, is_param in src:
                        e = ema_copy(t)
                        memo[id(t)] = nn.Parameter(e, requires_grad=False) if is_param else e
                    try:  # an FSDP2 model is not copied: a module tree holds the shards
                        m = (distributed.ema_module(self._model, memo) if sharded
                             else copy.deepcopy(self._model, memo))
                    except Exception as exc:
                        raise TypeError(f"fused_ema: could not deep-copy the model ({exc}); "
                                        "FusedEMA(model.parameters(), ...) averages the "
                                        "tensors without a module copy") from exc
                    m.requires_grad_(False)
                    m.eval()
                    self.modules.append(m)
            else:
                self._bare_emas = [[ema_copy(t) for _, t, *_ in src]
                                   for _ in range(self.num_decays)]

        # -- the step counter and the plans
        self._step = 0
        self._step_t = (torch.zeros((), dtype=torch.int64, device=self._device)
                        if self.capturable else None)
        self._attached: Dict[int, _Handle] = {}
        self._const = None
        if all(type(s) in (Constant, HalfLife) for s in schedules):
            self._const = [s(0) ** self.update_every for s in schedules]
        self._bind()

    # ------------------------------------------------------------------ properties

    @property
    def module(self) -> Optional[nn.Module]:
        """The (first) EMA model: a frozen deep copy in eval mode whose weights are the EMA."""
        return self.modules[0] if self.modules is not None else None

    @property
    def step(self) -> int:
        """Number of ``update`` calls so far (a host sync when ``capturable=True``)."""
        if self.capturable:
            return int(self._step_t.item())
        return self._step

    @property
    def schedules(self) -> List[Schedule]:
        return list(self._schedules)

    def parameters(self, index: int = 0) -> List[torch.Tensor]:
        """The EMA of each parameter, in the model's (or the given list's) order."""
        if self._model is None:
            return list(self._bare_emas[index])
        return list(self.modules[index].parameters())

    def named_pairs(self, index: int = 0) -> Iterator[Tuple[str, torch.Tensor, torch.Tensor]]:
        """``(name, ema_tensor, model_tensor)`` for each tensor the update touches (params and
        tracked buffers): the seam for code that handles distributed tensors."""
        self._ensure_bound()
        for i, name in enumerate(self._names):
            yield name, self._emas[index][i], self._srcs[i]

    def decay_at(self, step: Optional[int] = None) -> List[float]:
        """The decays (one per EMA) the update at ``step`` applies (default: the next update),
        including ``update_after_step`` and the ``update_every`` power."""
        if step is None:
            step = self.step
        return self._decays_at(int(step))

    def __call__(self, *args, **kwargs):
        """Runs the (first) EMA model."""
        if self.module is None:
            raise TypeError("fused_ema: this FusedEMA averages a list of tensors; it has no module")
        return self.module(*args, **kwargs)

    def __repr__(self) -> str:
        sched = ", ".join(repr(s) for s in self._schedules)
        step = "<on the device>" if self.capturable else self._step
        return (f"FusedEMA(decays=[{sched}], tensors={len(self._names)}, step={step}, "
                f"update_after_step={self.update_after_step}, update_every={self.update_every}, "
                f"buffers={self.buffers!r}, device={self._device}, capturable={self.capturable})")

    # ------------------------------------------------------------------ dtype and warnings

    def _ema_dtype_for(self, dtype: torch.dtype) -> torch.dtype:
        if dtype not in FLOAT_DTYPES:
            return dtype
        if self.ema_dtype is not None:
            return self.ema_dtype
        return torch.float32 if dtype in _HALF_DTYPES else dtype

    def _warn_half(self, src) -> None:
        dtypes = {self._ema_dtype_for(t.dtype) for _, t, *_ in src if t.dtype in FLOAT_DTYPES}
        for dtype in dtypes & set(_HALF_DTYPES):
            eps = torch.finfo(dtype).eps
            for k, s in enumerate(self._schedules):
                top = s.max_decay
                if top is None:
                    continue
                top = top ** self.update_every
                if 1.0 - top < eps:
                    warnings.warn(
                        f"fused_ema: a {dtype} EMA with decay {top:g} barely moves: each update "
                        f"adds (1 - decay) = {1 - top:.3g} of the difference, below the {dtype} "
                        f"resolution ({eps:.3g}); use ema_dtype=torch.float32",
                        UserWarning, stacklevel=3)
                    return

    # ------------------------------------------------------------------ binding

    def _model_tensors(self, model: Optional[nn.Module] = None) -> Dict[str, tuple]:
        """name -> (tensor, container, key) of the model (or of the bare list)."""
        if model is None and self._model is None:
            return {n: (t, None, None) for n, t in zip(self._known_order, self._bare)}
        model = self._model if model is None else _unwrap(model)
        return {n: (t, c, k) for n, t, c, k, _ in _walk(model)}

    def _ema_tensors(self, index: int) -> Dict[str, torch.Tensor]:
        if self.modules is not None:
            return {n: t for n, t, *_ in _walk(self.modules[index])}
        return dict(zip(self._known_order, self._bare_emas[index]))

    def _match(self, model: Optional[nn.Module]):
        """The model's tensor for each tracked name, checked; raises naming what differs."""
        found = self._model_tensors(model)
        missing = [n for n in self._names if n not in found]
        extra = [n for n in found if n not in self._known]
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"the EMA has {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                             "that the model lacks")
            if extra:
                parts.append(f"the model has {extra[:5]}{' ...' if len(extra) > 5 else ''} that "
                             "the EMA lacks")
            raise ValueError("fused_ema: the model's parameters do not match the EMA's: "
                             + "; ".join(parts) + ". Build a new FusedEMA for a changed model.")
        out = []
        ema0 = self._ema_tensors(0)
        for n in self._names:
            t = found[n][0]
            e = ema0[n]
            if t.shape != e.shape:
                raise ValueError(
                    f"fused_ema: '{n}' has shape {list(t.shape)} in the model but "
                    f"{list(e.shape)} in the EMA; the model's tensors were replaced by tensors of "
                    "another shape: build a new FusedEMA")
            out.append(t)
        return out, found

    def _bind(self, model: Optional[nn.Module] = None) -> None:
        """Matches the model's tensors to the EMA's and builds the plans (validation once)."""
        if model is not None:
            model = _unwrap(model)
        distributed.reshard(self._model if model is None else model)  # FSDP2: sharded params
        srcs, found = self._match(model)
        floats = [t for t, kind in zip(srcs, self._kinds) if kind != "other"]
        devices = {t.device for t in floats}
        if len(devices) > 1:
            first = floats[0].device
            name = next(n for n, t, kind in zip(self._names, srcs, self._kinds)
                        if kind != "other" and t.device != first)
            raise ValueError(f"fused_ema: '{name}' is on {found[name][0].device} but "
                             f"'{self._names[0]}' is on {first}; FusedEMA needs the model on one "
                             "device")
        model_device = floats[0].device
        distributed.check_device(model_device, self._device, floats)
        if model_device != self._device and not self._device_explicit:
            self._move_ema(model_device)  # the model moved and the EMA follows it
        emas_by_name = [self._ema_tensors(k) for k in range(self.num_decays)]
        emas = [[e[n] for n in self._names] for e in emas_by_name]
        cross = model_device != self._device
        if cross and self.capturable:
            raise ValueError(f"fused_ema: capturable=True needs the model and the EMA on one "
                             f"device; the model is on {model_device}, the EMA on {self._device}")
        pin = cross and self._device.type == "cpu" and model_device.type == "cuda"
        # Layout: an EMA tensor takes its model tensor's strides (e.g. channels_last), so
        # both are read as 1-D views in the same memory order.
        plan_srcs, views = [], []
        with torch.no_grad():
            for i, (n, t, kind) in enumerate(zip(self._names, srcs, self._kinds)):
                if kind == "other":
                    plan_srcs.append(t)
                    continue
                if not (t.is_contiguous() or _is_dense(t)):
                    raise ValueError(f"fused_ema: '{n}' is neither contiguous nor dense "
                                     f"(strides {t.stride()}); make it contiguous")
                for k in range(self.num_decays):
                    e = emas[k][i]
                    if e.stride() != t.stride() and t.numel() > 1:
                        new = torch.empty_strided(t.shape, t.stride(), dtype=e.dtype,
                                                  device=e.device)
                        new.copy_(e)
                        e.data = new
                if cross:
                    s = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype,
                                            device=self._device, pin_memory=pin)
                    plan_srcs.append(s)
                    views.append((t, t.data_ptr()))  # the plan sees the staging copy only
                else:
                    plan_srcs.append(t)
                    if not t.is_contiguous():
                        views.append((t, t.data_ptr()))
                for k in range(self.num_decays):
                    if not emas[k][i].is_contiguous():
                        views.append((emas[k][i], emas[k][i].data_ptr()))
        # Plans first: if one fails (a tensor the engine refuses), nothing of the old
        # binding has been replaced yet.
        plans = []
        for kind in ("average", "copy"):
            idx = [i for i, k in enumerate(self._kinds) if k == kind]
            if not idx:
                continue
            # DTensors (FSDP2): the engine updates the local shards
            ps = [_flat(distributed.local(plan_srcs[i])) for i in idx]
            es = [[_flat(distributed.local(emas[k][i])) for i in idx]
                  for k in range(self.num_decays)]
            try:
                plan = EMAPlan.multi(es, ps)
            except (ValueError, TypeError, RuntimeError) as exc:
                names = [self._names[i] for i in idx]
                raise type(exc)(_name_indices(str(exc), names, self.num_decays)) from None
            plans.append((kind, plan.update_, ps, es))
        if self._model is not None:
            target = self._model if model is None else model
            # what the per-step check compares by identity: each tracked tensor in its
            # module's dict, and each submodule in its parent's (a replaced submodule)
            conts = [(c, k, t) for t, c, k in (found[n] for n in self._names)]
            conts += [(m._modules, k, c) for m in target.modules()
                      for k, c in m._modules.items() if c is not None]
            self._containers = [c for c, _, _ in conts]
            self._ckeys = [k for _, k, _ in conts]
            self._cobjs = [t for _, _, t in conts]
            self._model = target
        else:
            self._containers = None
        self._plans = plans
        self._srcs = srcs
        self._emas = emas
        self._cross = cross
        self._pin_sync = pin
        self._staging = [(s, t) for s, t, kind in zip(plan_srcs, srcs, self._kinds)
                         if cross and kind != "other"]
        self._views = views + distributed.watch(srcs)  # a shard re-homed by FSDP
        self._others = self._group_others(srcs, emas)
        self._float_zeros = [0.0] * self.num_decays
        self._keys = self._plan_keys()
        if self.capturable:
            self._zeros = torch.zeros(self.num_decays, dtype=torch.float64, device=self._device)
            if self._step_t.device != self._device:
                self._step_t = self._step_t.to(self._device)

    def _group_others(self, srcs, emas):
        """Non-float tensors (integer counters such as BatchNorm's num_batches_tracked) are
        copied with one ``torch.cat`` per dtype: their EMA copies are re-homed as views of
        one flat tensor per dtype (``.data`` is set, so the tensor objects stay the same)."""
        groups: Dict[Tuple[torch.dtype, torch.device], List[int]] = {}
        for i, kind in enumerate(self._kinds):
            if kind == "other":
                groups.setdefault((srcs[i].dtype, srcs[i].device), []).append(i)
        out = []
        with torch.no_grad():
            for (dtype, _), idx in groups.items():
                total = sum(srcs[i].numel() for i in idx)
                flats = []
                for k in range(self.num_decays):
                    flat = torch.empty(total, dtype=dtype, device=self._device)
                    off = 0
                    for i in idx:
                        e, n = emas[k][i], srcs[i].numel()
                        view = flat[off:off + n].view(e.shape)
                        view.copy_(e)
                        e.data = view
                        self._views.append((e, e.data_ptr()))
                        off += n
                    flats.append(flat)
                views = [srcs[i].reshape(-1) for i in idx]
                for i in idx:
                    self._views.append((srcs[i], srcs[i].data_ptr()))
                contiguous = all(srcs[i].is_contiguous() for i in idx)
                out.append((views if contiguous else [srcs[i] for i in idx], contiguous, flats))
        return out

    def _plan_keys(self):
        return [_key(t) for _, _, ps, es in self._plans for t in ps + [e for l in es for e in l]]

    def _move_ema(self, device: torch.device) -> None:
        with torch.no_grad():
            if self.modules is not None:
                for m in self.modules:
                    m.to(device)
            else:
                for emas in self._bare_emas:
                    for e in emas:
                        e.data = e.data.to(device)
        self._device = device
        if self._step_t is not None:
            self._step_t = self._step_t.to(device)

    def _bound(self) -> bool:
        """Cheap per-step check that the model still holds the tensors the plans were built for
        (a replaced Parameter or buffer, or a view whose tensor got new storage)."""
        if self._containers is not None and not all(
                map(operator.is_, map(dict.get, self._containers, self._ckeys), self._cobjs)):
            return False
        for t, ptr in self._views:
            if t.data_ptr() != ptr:
                return False
        return True

    def _ensure_bound(self) -> None:
        if not self._bound():
            self._bind()

    def replan(self) -> None:
        """Rebuilds the plans from the model's current tensors (done automatically when a
        tensor was replaced; call it after changing ``requires_grad``)."""
        if self._model is not None:
            srcs = self._model_tensors()
            for i, n in enumerate(self._names):
                if self._kinds[i] in ("average", "copy") and n in srcs:
                    t = srcs[n][0]
                    if isinstance(t, nn.Parameter):
                        self._kinds[i] = "average" if t.requires_grad else "copy"
        self._bind()

    # ------------------------------------------------------------------ update

    def _decays_at(self, s: int) -> List[float]:
        if s < self.update_after_step:
            return [0.0] * self.num_decays
        if self._const is not None:
            return list(self._const)
        t = s - self.update_after_step
        k = self.update_every
        return [float(sched(t)) ** k for sched in self._schedules]

    def _decays_tensor(self, s: torch.Tensor) -> torch.Tensor:
        t = (s - self.update_after_step).to(torch.float64).clamp_min(0)
        ds = torch.stack([sched.tensor(t).reshape(()) for sched in self._schedules])
        if self.update_every > 1:
            ds = ds ** self.update_every
        if self.update_after_step > 0:
            ds = torch.where(s < self.update_after_step, torch.zeros_like(ds), ds)
        return ds

    def update(self, model: Optional[nn.Module] = None, *,
               skip: Optional[torch.Tensor] = None) -> None:
        """One update from the model's current weights (all tensors in one fused call).

        ``model``: update from this model instead (matched by name; DDP and torch.compile
        wrappers of the EMA's model are the same model). ``skip``: a 0-d tensor, e.g. a
        GradScaler's found-inf: when non-zero nothing changes (read on the device, no sync).
        A skipped step is not counted when the flag can be read for free (a CPU tensor) or
        with ``capturable=True``; a CUDA flag without ``capturable`` still advances the step
        counter, as reading it would need a host sync.
        """
        compiling = torch.compiler.is_compiling()
        if model is not None and _unwrap(model) is not self._model:
            if self._model is None:
                raise TypeError("fused_ema: this FusedEMA averages a list of tensors; "
                                "update() takes no model")
            self._bind(model)
        elif not compiling and not self._bound():
            self._bind()
        if skip is not None and not isinstance(skip, torch.Tensor):
            skip = torch.tensor(bool(skip))
        if self.capturable:
            return self._update_capturable(skip, compiling)
        s = self._step
        if skip is not None and skip.device.type == "cpu":
            if skip.reshape(-1)[0].item() != 0:  # host memory: no sync
                return
            skip = None
        if (s + 1) % self.update_every:
            self._step = s + 1
            return
        decays = self._decays_at(s)
        if self._cross:
            self._stage()
            if skip is not None and skip.device != self._device:
                skip = skip.to(self._device)
        self._run(decays, self._float_zeros, skip)
        self._step = s + 1

    def _stage(self) -> None:
        with torch.no_grad():
            for s, t in self._staging:
                s.copy_(t, non_blocking=self._pin_sync)
        if self._pin_sync:
            torch.cuda.current_stream(self._staging[0][1].device).synchronize()

    def _run(self, decays, zeros, skip, start: int = 0) -> None:
        for j in range(start, len(self._plans)):
            kind, call, _, _ = self._plans[j]
            try:
                call(decays if kind == "average" else zeros, skip)
            except RuntimeError:
                if self._plan_keys() == self._keys:
                    raise
                # A tensor got new storage (model.to(), p.data = ...): plan again and go on
                # from this group (the groups before it are already updated).
                self._bind()
                if self._cross:
                    self._stage()
                return self._run(decays, zeros, skip, j)
        if self._others:
            self._copy_others(skip)

    def _copy_others(self, skip) -> None:
        with torch.no_grad():
            for srcs, contiguous, flats in self._others:
                if not contiguous:
                    srcs = [t.reshape(-1) for t in srcs]
                if skip is None and not self._cross:
                    if len(srcs) == 1:
                        flats[0].copy_(srcs[0])
                    else:
                        torch.cat(srcs, out=flats[0])
                    for f in flats[1:]:
                        f.copy_(flats[0])
                    continue
                new = torch.cat(srcs).to(flats[0].device)
                for f in flats:
                    if skip is None:
                        f.copy_(new)
                    else:
                        f.copy_(torch.where(skip.to(f.device).reshape(()) != 0, f, new))

    def _update_capturable(self, skip, compiling: bool) -> None:
        s = self._step_t
        decays = self._decays_tensor(s)
        flag = None
        if self.update_every > 1:
            flag = (s + 1) % self.update_every != 0
        if skip is not None:
            found = skip.reshape(()) != 0
            flag = found if flag is None else flag | found
        if compiling:
            # dynamo traces the torch ops (with their fake kernels), not the pybind plan
            for kind, _, ps, es in self._plans:
                functional.multi_ema_update_(es, ps, decays if kind == "average" else self._zeros,
                                             skip=flag)
            if self._others:
                self._copy_others(flag)
        else:
            self._run(decays, self._zeros, flag)
        with torch.no_grad():
            if skip is not None:
                s.add_((skip.reshape(()) == 0).to(torch.int64))
            else:
                s.add_(1)

    # ------------------------------------------------------------------ optimizer hook

    def attach(self, optimizer: torch.optim.Optimizer, scaler=None) -> _Handle:
        """Updates the EMA after every ``optimizer.step()``; ``handle.remove()`` stops it.

        With ``scaler`` (a ``torch.amp.GradScaler``): a step the scaler skips (inf/NaN
        gradients) does not update the EMA. Optimizers that step themselves with the
        scaler's found-inf flag (``fused=True`` Adam/AdamW/SGD) pass the flag on to the
        kernel as ``skip``: no host sync. The found-inf flag is honoured even without
        ``scaler=``; give it for optimizers that take ``grad_scaler=`` in ``step``.
        """
        if not hasattr(optimizer, "register_step_post_hook"):
            raise TypeError(f"fused_ema: attach needs a torch.optim.Optimizer, got "
                            f"{type(optimizer).__name__}")
        if scaler is not None and not hasattr(scaler, "_per_optimizer_states"):
            raise TypeError(f"fused_ema: scaler must be a torch.amp.GradScaler, got "
                            f"{type(scaler).__name__}")
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        ours = [t for t, kind in zip(self._srcs, self._kinds) if kind == "average"]
        if not ours:
            raise ValueError("fused_ema: this EMA averages no parameter (every one has "
                             "requires_grad=False); call ema.update() where you need a copy")
        if not any(id(t) in held for t in ours):
            raise ValueError(
                "fused_ema: the optimizer holds none of the parameters this EMA averages "
                f"({len(ours)} tensors, e.g. '{self._names[self._kinds.index('average')]}'); "
                "attach the optimizer that trains the EMA's model")
        if id(optimizer) in self._attached:
            raise RuntimeError("fused_ema: this EMA is already attached to this optimizer; "
                               "call handle.remove() first")

        def hook(opt, args, kwargs):
            skip = getattr(opt, "found_inf", None)
            if skip is None and scaler is not None:
                skip = _scaler_found_inf(scaler, opt)
            self.update(skip=skip)

        handle = _Handle(self, optimizer, optimizer.register_step_post_hook(hook))
        self._attached[id(optimizer)] = handle
        return handle

    # ------------------------------------------------------------------ swap and copy

    def _pairs_for(self, model, index: int):
        if index < 0 or index >= self.num_decays:
            raise IndexError(f"fused_ema: index {index} out of range for {self.num_decays} EMA(s)")
        if model is None or (self._model is not None and _unwrap(model) is self._model):
            self._ensure_bound()
            return list(zip(self._srcs, self._emas[index]))
        if self._model is None:
            raise TypeError("fused_ema: this FusedEMA averages a list of tensors; copy_to and "
                            "swapped take no model")
        srcs, _ = self._match(model)
        return list(zip(srcs, self._emas[index]))

    @torch.no_grad()
    def copy_to(self, model: Optional[nn.Module] = None, index: int = 0) -> None:
        """Writes the EMA weights (and tracked buffers) into ``model`` (default: the online
        model)."""
        for t, e in self._pairs_for(model, index):
            t.copy_(e)
        distributed.reshard(self._model if model is None else model)

    @contextmanager
    def swapped(self, model: Optional[nn.Module] = None, index: int = 0):
        """Puts the EMA weights (and tracked buffers) into the online model for the block
        and restores the model's own values exactly afterwards.

        >>> with ema.swapped():
        ...     evaluate(model)
        """
        pairs = self._pairs_for(model, index)
        with torch.no_grad():
            saved = [t.detach().clone() for t, _ in pairs]
            for t, e in pairs:
                t.copy_(e)
        try:
            yield model if model is not None else (self._model if self._model is not None
                                                   else None)
        finally:
            with torch.no_grad():
                for (t, _), b in zip(pairs, saved):
                    t.copy_(b)
            distributed.reshard(self._model if model is None else model)  # drop gathered EMA

    # ------------------------------------------------------------------ state dict

    def _settings(self) -> Dict[str, Any]:
        return {
            "decays": [s.settings() for s in self._schedules],
            "update_after_step": self.update_after_step,
            "update_every": self.update_every,
            "buffers": self.buffers,
            "ema_dtype": None if self.ema_dtype is None else str(self.ema_dtype),
            "exclude": list(self._excluded),
        }

    def state_dict(self) -> Dict[str, Any]:
        """EMA tensors in their own dtype (one dict per decay: the EMA module's state_dict,
        or name -> tensor for a list of tensors), the step counter and the settings."""
        if self.modules is not None:
            emas = [m.state_dict() for m in self.modules]
        else:
            emas = [dict(zip(self._known_order, e)) for e in self._bare_emas]
        return {"format": _FORMAT, "step": self.step, "emas": emas, "settings": self._settings()}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Loads a ``state_dict()``; checks everything first (settings, names, shapes,
        dtypes) and raises naming what differs, with nothing modified."""
        if not isinstance(state_dict, dict) or state_dict.get("format") != _FORMAT:
            raise ValueError("fused_ema: not a FusedEMA state_dict (expected the dict returned "
                             "by FusedEMA.state_dict())")
        saved, ours = state_dict["settings"], self._settings()
        diffs = [f"{k}: checkpoint has {saved.get(k)!r}, this FusedEMA has {v!r}"
                 for k, v in ours.items() if saved.get(k) != v]
        if diffs:
            raise ValueError("fused_ema: the checkpoint was saved with other settings:\n  "
                             + "\n  ".join(diffs))
        step = state_dict["step"]
        if isinstance(step, torch.Tensor):
            step = int(step.item())
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
            raise ValueError(f"fused_ema: bad step in the checkpoint: {step!r}")
        emas = state_dict["emas"]
        if len(emas) != self.num_decays:
            raise ValueError(f"fused_ema: the checkpoint holds {len(emas)} EMA(s), this "
                             f"FusedEMA {self.num_decays}")
        targets = self.state_dict()["emas"]
        plan = []
        for k, (sd, tgt) in enumerate(zip(emas, targets)):
            sd = {_normalize(n): v for n, v in sd.items()}
            tgt = {_normalize(n): v for n, v in tgt.items()}
            missing = [n for n in tgt if n not in sd]
            extra = [n for n in sd if n not in tgt]
            if missing or extra:
                raise ValueError(
                    f"fused_ema: the checkpoint is of another model: missing {missing[:5]}, "
                    f"unexpected {extra[:5]}")
            for n, t in tgt.items():
                v = sd[n]
                if not isinstance(v, torch.Tensor) or v.shape != t.shape:
                    raise ValueError(f"fused_ema: '{n}' has shape "
                                     f"{list(getattr(v, 'shape', []))} in the checkpoint, "
                                     f"{list(t.shape)} here")
                if v.dtype != t.dtype:
                    raise ValueError(f"fused_ema: '{n}' is {v.dtype} in the checkpoint but "
                                     f"{t.dtype} here (ema_dtype differs)")
                plan.append((t, distributed.like(t, v)))  # a full tensor into a shard
        with torch.no_grad():
            for t, v in plan:
                t.copy_(v)
        self._step = int(step)
        if self.capturable:
            self._step_t.fill_(int(step))


def _scaler_found_inf(scaler, optimizer) -> Optional[torch.Tensor]:
    """The scaler's found-inf for this optimizer's current step (None when it recorded none)."""
    if not getattr(scaler, "is_enabled", lambda: True)():
        return None
    states = getattr(scaler, "_per_optimizer_states", {})
    state = states.get(id(optimizer)) if id(optimizer) in states else None
    if not state:
        return None
    found = list(state.get("found_inf_per_device", {}).values())
    if not found:
        return None
    out = found[0]
    for f in found[1:]:
        out = out + f.to(out.device)
    return out
