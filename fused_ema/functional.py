"""The functional core: ``ema_update_``, ``multi_ema_update_``, ``EMAPlan``, ``backend``.

Every update is ``ema.lerp_(param, 1 - decay)`` computed in fp32 (fp64 for fp64
EMAs), applied to all tensors at once: by the compiled kernels on CPU and CUDA
(``torch.ops.fused_ema``), or by the pure-PyTorch fallback.
"""
from typing import List, Optional, Sequence, Tuple, Union

import torch

from . import _ext, fallback, validation

Decay = Union[float, torch.Tensor]
Step = Union[int, torch.Tensor]

__all__ = ["ema_update_", "multi_ema_update_", "EMAPlan", "backend"]


def backend(tensor: Union[torch.Tensor, torch.device, str]) -> str:
    """Which path an update of tensors on this device takes: "cuda", "cpp" or "python"."""
    if isinstance(tensor, torch.Tensor):
        device_type = tensor.device.type
    else:
        device_type = torch.device(tensor).type
    if _ext.compiled_for(device_type):
        return "cuda" if device_type == "cuda" else "cpp"
    return "python"


def _split_decays(decays) -> Tuple[List[float], Optional[torch.Tensor]]:
    """Host floats, or one tensor holding all decays (read on its device)."""
    if isinstance(decays, torch.Tensor):
        return [], decays.reshape(-1)
    decays = list(decays)
    if not any(isinstance(d, torch.Tensor) for d in decays):
        return [float(d) for d in decays], None
    if len(decays) == 1:
        return [], decays[0].reshape(-1)  # a view: no copy, no launch
    ref = next(d for d in decays if isinstance(d, torch.Tensor))
    dtype = torch.float64 if ref.dtype == torch.float64 else torch.float32
    return [], torch.stack([torch.as_tensor(d, dtype=dtype, device=ref.device).reshape(())
                            for d in decays])


def _device_type(params) -> str:
    return params[0].device.type if params else "cpu"


def _rounding(rounding: str, seed, step, params):
    """``validation.rounding_args`` of an update: None to round to nearest."""
    device = params[0].device if params else None
    return validation.rounding_args(validation.check_rounding(rounding), seed, step, device)


def _op_rounding(rounding) -> tuple:
    """The ops' trailing arguments (stochastic, seed, step, step_tensor)."""
    if rounding is None:
        return False, 0, 0, None
    seed, step, step_tensor = rounding
    return True, seed, step or 0, step_tensor


def _run(emas_per_decay, params, floats, decay_tensor, skip, rounding, single: bool) -> None:
    """The one place a functional update picks its path."""
    if backend(_device_type(params)) == "python" or not params:
        # The fallback also does the no-op of empty lists (after checking decays).
        fallback.multi_ema_update_(emas_per_decay, params, floats, decay_tensor, skip,
                                   rounding=rounding)
        return
    with torch.no_grad():
        if single:
            decay = floats[0] if decay_tensor is None else 0.0
            torch.ops.fused_ema.ema_update_(emas_per_decay[0], params, decay, decay_tensor, skip,
                                            *_op_rounding(rounding))
        else:
            flat = [e for emas in emas_per_decay for e in emas]
            torch.ops.fused_ema.multi_ema_update_(flat, params, floats, decay_tensor, skip,
                                                  *_op_rounding(rounding))


def multi_ema_update_(
    emas_per_decay: Sequence[Sequence[torch.Tensor]],
    params: Sequence[torch.Tensor],
    decays: Union[Sequence[Decay], torch.Tensor],
    *,
    skip: Optional[torch.Tensor] = None,
    rounding: str = "nearest",
    seed: int = 0,
    step: Optional[Step] = None,
) -> None:
    """Updates K EMA lists from one read of ``params``:
    ``emas_per_decay[k][i].lerp_(params[i], 1 - decays[k])``.

    ``decays`` is a sequence of K floats or 0-d tensors, or a tensor of K values
    (read on the device: no host sync). Nothing changes when ``skip`` (a 0-d
    bool/float tensor such as a GradScaler's found-inf) is non-zero. ``rounding``,
    ``seed``, ``step``: as in ``ema_update_``.
    """
    emas_per_decay = [list(e) for e in emas_per_decay]
    params = list(params)
    validation.check_lists(emas_per_decay, params)
    if len(emas_per_decay) == 0:
        raise ValueError("fused_ema: multi_ema_update_ needs at least one EMA list")
    floats, decay_tensor = _split_decays(decays)  # the backends check the count
    _run(emas_per_decay, params, floats, decay_tensor, skip,
         _rounding(rounding, seed, step, params), single=False)


def ema_update_(
    emas: Sequence[torch.Tensor],
    params: Sequence[torch.Tensor],
    decay: Decay,
    *,
    skip: Optional[torch.Tensor] = None,
    rounding: str = "nearest",
    seed: int = 0,
    step: Optional[Step] = None,
) -> None:
    """``emas[i].lerp_(params[i], 1 - decay)`` for every i, in one fused call.

    ``decay`` is a float or a 0-d tensor (on CUDA read on the device: no host
    sync, so the call can be captured in a CUDA graph). Nothing changes when
    ``skip`` is non-zero. EMAs may be fp32, fp16, bf16 or fp64 whatever the
    params' dtype; the arithmetic is fp32 (fp64 for fp64 EMAs).

    ``rounding="stochastic"`` (bf16 EMAs only) rounds each new EMA value up or down
    with probability given by its distance, so updates below bf16's resolution are
    not lost. Its random bits are a pure function of (``seed``, ``step``, tensor,
    element): pass this update's counter as ``step`` (an int, or a tensor of one
    integer, read on the device); the same arguments give the same bits.
    """
    emas, params = list(emas), list(params)
    validation.check_lists([emas], params)
    floats, decay_tensor = _split_decays([decay])
    _run([emas], params, floats, decay_tensor, skip, _rounding(rounding, seed, step, params),
         single=True)


class EMAPlan:
    """A prepared update of fixed EMA and param lists.

    Validation and the chunk table are done once (on CUDA the table lives in
    device memory); ``update_`` is then one call whatever the number of tensors,
    and only checks that no tensor was replaced or resized since.

    >>> plan = EMAPlan(ema_tensors, param_tensors)
    >>> plan.update_(0.999)
    >>> multi = EMAPlan.multi([ema_fast, ema_slow], param_tensors)
    >>> multi.update_([0.99, 0.9999])

    ``rounding="stochastic"`` (bf16 EMAs): every update rounds stochastically, its random
    bits keyed by ``seed`` and the ``step`` given to ``update_``.
    """

    def __init__(self, emas: Sequence[torch.Tensor], params: Sequence[torch.Tensor], *,
                 rounding: str = "nearest", seed: int = 0):
        self._setup([list(emas)], list(params), rounding, seed)

    @classmethod
    def multi(cls, emas_per_decay: Sequence[Sequence[torch.Tensor]],
              params: Sequence[torch.Tensor], *, rounding: str = "nearest",
              seed: int = 0) -> "EMAPlan":
        """A plan for K EMA lists updated with K decays from one read of ``params``."""
        plan = cls.__new__(cls)
        plan._setup([list(e) for e in emas_per_decay], list(params), rounding, seed)
        return plan

    def _setup(self, emas_per_decay: List[List[torch.Tensor]], params: List[torch.Tensor],
               rounding: str, seed: int):
        if len(emas_per_decay) == 0:
            raise ValueError("fused_ema: an EMAPlan needs at least one EMA list")
        validation.check_lists(emas_per_decay, params)
        self.emas_per_decay = emas_per_decay
        self.params = params
        self.num_decays = len(emas_per_decay)
        self.rounding = rounding
        self.stochastic = validation.check_rounding(rounding)
        self.seed = validation.check_seed(seed)
        self.backend = backend(_device_type(params))
        # params..., then each decay's EMAs: the order in which a stale tensor is named
        self._tensors = params + [e for emas in emas_per_decay for e in emas]
        if self.backend == "python":
            validation.validate(emas_per_decay, params)
            if self.stochastic:
                validation.check_stochastic(emas_per_decay)
            self._keys = [validation.tensor_key(t) for t in self._tensors]
            self._plan = None
        else:
            self._plan = _ext._C.Plan(self._tensors[len(params):], params, self.num_decays,
                                      self.stochastic, self.seed)

    @property
    def emas(self) -> List[torch.Tensor]:
        """The first (for a single-decay plan, the only) EMA list."""
        return self.emas_per_decay[0]

    def update_(self, decay: Union[Decay, Sequence[Decay]], skip: Optional[torch.Tensor] = None,
                *, step: Optional[Step] = None):
        """Applies one update: ``decay`` is a float or 0-d tensor, or for a multi plan a
        sequence of K of them (or a tensor of K values). Raises (nothing written) if a
        tensor was replaced or resized since the plan was built. ``step``: this update's
        counter, for a plan that rounds stochastically (an int or a tensor of one
        integer)."""
        plan = None if self.stochastic else self._plan  # the per-step hot paths: no step
        if plan is not None and type(decay) is float and self.num_decays == 1:
            stale = plan.update_((decay,), None, skip)
        elif (plan is not None and type(decay) in (list, tuple)
              and all(type(d) is float for d in decay)):
            stale = plan.update_(decay, None, skip)
        else:
            if self.num_decays == 1 and not isinstance(decay, (list, tuple)):
                decay = [decay]
            stale = self.try_update_(*_split_decays(decay), skip, *self.step_args(step))
        if stale >= 0:
            raise validation.stale_error(stale, len(self.params), self.num_decays)

    def step_args(self, step: Optional[Step]) -> Tuple[int, Optional[torch.Tensor]]:
        """``(host step, step tensor)`` of an update of this plan (checked; (0, None) for a
        plan that rounds to nearest)."""
        if not self.stochastic:
            return 0, None
        device = self.params[0].device if self.params else None
        _, step, step_tensor = validation.rounding_args(True, self.seed, step, device)
        return step or 0, step_tensor

    def try_update_(self, decays: List[float], decay_tensor: Optional[torch.Tensor],
                    skip: Optional[torch.Tensor], step: int = 0,
                    step_tensor: Optional[torch.Tensor] = None) -> int:
        """The update with host ``decays`` or a ``decay_tensor`` (and, for a plan that
        rounds stochastically, ``step_args``), if no tensor is stale: returns -1, or the
        index of the first stale tensor with nothing written (what the compiled plan's
        ``update_`` returns; ``FusedEMA`` then binds again)."""
        if self._plan is not None:
            return self._plan.update_(decays, decay_tensor, skip, step, step_tensor)
        stale = validation.first_changed(self._tensors, self._keys)  # the compiled plan's check
        if stale < 0:
            rounding = (self.seed, step, step_tensor) if self.stochastic else None
            fallback.multi_ema_update_(self.emas_per_decay, self.params, decays, decay_tensor,
                                       skip, rounding=rounding, validated=True)
        return stale

    def __repr__(self) -> str:
        n = len(self.params)
        numel = sum(p.numel() for p in self.params)
        rounding = f", rounding='stochastic', seed={self.seed}" if self.stochastic else ""
        return (f"EMAPlan(tensors={n}, elements={numel}, decays={self.num_decays}{rounding}, "
                f"backend={self.backend!r})")
