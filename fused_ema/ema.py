"""``FusedEMA``: a target network, momentum teacher or eval EMA updated by one fused call.

A thin class over parts that each do one job:

* ``options``    the settings, checked (decays become schedules);
* ``selection``  what happens to each tensor (averaged, copied, excluded): a pure
                 function of the model and the options;
* ``ema_copy``   building the EMA copy;
* ``binding``    the per-step update: plans built once, a C++ check that the model still
                 holds the same tensors, the run;
* ``checkpoint`` ``state_dict`` / ``load_state_dict``;
* ``distributed`` the DTensor / FSDP2 seams (``named_pairs`` is the public one).

This file holds the state (step counter, EMA copies, the current binding) and the
public methods.
"""
import re
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from . import checkpoint, distributed, ema_copy, optim_hook, selection, validation
from .worker import Worker
from .binding import Binding, ListRun, Stale, match, model_device
from .options import DecayLike, Options, check_placement, constant_decays
from .schedules import Schedule
from .selection import unwrap
from .validation import FLOAT_DTYPES

__all__ = ["FusedEMA"]


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
        copy: names or patterns (as ``exclude``) of floating tensors to copy rather than
            average (ema-pytorch's ``param_or_buffer_names_no_ema``), e.g.
            ``["*.running_mean", "*.running_var"]`` with ``buffers="average"``.
        ema_model: the EMA model to use instead of a deep copy (one module per decay), for
            models ``copy.deepcopy`` refuses (weight norm, hooks, non-leaf attributes): a
            module with the model's parameter and buffer names and shapes; its tensors take
            the model's values (EMA dtype and device) and it is frozen and put in eval mode.
        frozen: what happens to frozen parameters (``requires_grad=False``, e.g. a LoRA
            model's base). ``"share"`` (default): the EMA module holds the model's own
            tensors (in the model's dtype): no memory, no work per update, not in
            ``state_dict()``, skipped by ``swapped``/``copy_to``/``store``/``restore``; the
            EMA must then be on the model's device. ``"copy"``: copies in the EMA dtype,
            refreshed at every update. ``"average"``: averaged like the others (torch_ema).
        rounding: ``"nearest"`` (default) or ``"stochastic"``: a bf16 EMA
            (``ema_dtype=torch.bfloat16``) whose averaged tensors are rounded up or down with
            probability given by the distance, so it keeps moving where round-to-nearest
            stops; the random bits are a pure function of (``seed``, step, tensor,
            element), so a resumed run continues bit for bit.
        seed: the seed of stochastic rounding (an integer in [0, 2**63)).
        non_blocking: for an EMA in host memory (``device="cpu"`` or a CPU model):
            ``update()`` and the ``attach`` hook queue the update on a worker thread and
            return; every method that touches a tensor waits for it first, and so does
            ``optimizer.step()`` with ``attach`` (a pre-step hook). Without ``attach``,
            call ``ema.synchronize()`` before anything writes the model's weights (the
            worker reads them). An EMA on an accelerator ignores it (its update is already
            an asynchronous launch). Not with ``capturable=True``.

    The step counter counts calls to ``update`` (optimizer steps, with ``attach``). A
    schedule is evaluated at ``step - update_after_step``, so ``Warmup`` and ``Cosine``
    start when averaging does; ``Warmup`` returns 0 (a copy) at that first step, as in timm,
    diffusers and ema-pytorch.

    Which parameters are frozen is read when the plan is built: call ``replan()`` after
    freezing or unfreezing (with ``"share"``, an unfrozen parameter's EMA then starts from
    its current value, a frozen one's EMA is dropped).
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
        copy: Optional[Iterable[Union[str, "re.Pattern"]]] = None,
        ema_model: Optional[Union[nn.Module, Sequence[nn.Module]]] = None,
        frozen: str = "share",
        rounding: str = "nearest",
        seed: int = 0,
        non_blocking: bool = False,
    ):
        opts = Options.check(decay, tau, decays, update_after_step, update_every, ema_dtype,
                             buffers, capturable, frozen, rounding, seed, non_blocking)
        self._schedules: List[Schedule] = opts.schedules
        self.num_decays = len(opts.schedules)
        self.update_after_step = opts.update_after_step
        self.update_every = opts.update_every
        self.buffers = opts.buffers
        self.ema_dtype = opts.ema_dtype
        self.capturable = opts.capturable
        self.frozen = opts.frozen
        self.rounding = opts.rounding
        self.seed = opts.seed
        self.non_blocking = opts.non_blocking
        self._worker: Optional[Worker] = None  # started by the first queued update
        self._pending = None  # what the queued update needs to be finished here
        self._device_explicit = device is not None

        # -- what happens to each tensor
        if isinstance(model, nn.Module):
            self._model: Optional[nn.Module] = unwrap(model)
            sources = selection.walk(self._model)
            self._bare: Optional[List[torch.Tensor]] = None
        elif isinstance(model, torch.Tensor):
            raise TypeError("fused_ema: pass a module or an iterable of tensors, not one tensor "
                            "(wrap it in a list)")
        elif isinstance(model, Iterable):
            self._model = None
            sources = selection.from_list(list(model))
            self._bare = [s.tensor for s in sources]
        else:
            raise TypeError(f"fused_ema: expected an nn.Module or an iterable of tensors, got "
                            f"{type(model).__name__}")
        # what select() is given again by replan()
        self._select_args = dict(buffers=self.buffers, exclude=selection.pattern_list(exclude),
                                 copy=selection.pattern_list(copy), frozen=self.frozen)
        self._selection = selection.select(sources, **self._select_args)
        self._copy_patterns = [p for p, _ in selection.compile_patterns(
            self._select_args["copy"], "copy")]
        shared = set(self._selection.shared)
        given = self._given_modules(ema_model, sources, shared)
        self._known_order = [s.name for s in sources]
        self._known = set(self._known_order)
        if "average" not in self._selection.kinds:
            what = ("shares them with the model and averages nothing (frozen='share'); call "
                    "replan() after unfreezing some" if shared else "only copies the model")
            warnings.warn(f"fused_ema: every parameter has requires_grad=False, so the EMA "
                          f"{what}", UserWarning, stacklevel=2)

        # -- the EMA copies
        first = next((s.tensor for s in sources if s.tensor.dtype in FLOAT_DTYPES),
                     sources[0].tensor)
        self._device = torch.device(device) if device is not None else first.device
        check_placement(self._device, first.device, capturable=self.capturable,
                        shared=self._selection.shared)
        ema_copy.warn_if_frozen_by_rounding(sources, self._schedules, self.update_every,
                                             self.ema_dtype, self.rounding)
        self.modules: Optional[List[nn.Module]] = None
        self._bare_emas: Optional[List[List[torch.Tensor]]] = None
        if given is not None:
            self.modules = [ema_copy.adopt_module(m, sources, theirs, self._device,
                                                  self.ema_dtype, shared)
                            for m, theirs in given]
        elif self._model is not None:
            self.modules = [ema_copy.copy_module(self._model, sources, self._device,
                                                  self.ema_dtype, shared)
                            for _ in range(self.num_decays)]
        else:
            self._bare_emas = [ema_copy.copy_list(sources, self._device, self.ema_dtype, shared)
                               for _ in range(self.num_decays)]

        # -- the step counter and the plans
        self._step = 0
        self._step_t = (torch.zeros((), dtype=torch.int64, device=self._device)
                        if self.capturable else None)
        self._attached: Dict[int, optim_hook.Handle] = {}
        self._const = constant_decays(self._schedules, self.update_every)
        self._binding: Optional[Binding] = None
        self._stored = None  # store() / restore()
        self._bind()

    def _given_modules(self, ema_model, sources, shared):
        """(module, its sources) for each user-supplied EMA model, all checked; None when
        the EMA copies are to be built."""
        if ema_model is None:
            return None
        if self._model is None:
            raise TypeError("fused_ema: ema_model= needs a model (an nn.Module), not a list "
                            "of tensors")
        mods = [ema_model] if isinstance(ema_model, nn.Module) else list(ema_model)
        if len(mods) != self.num_decays:
            raise ValueError(f"fused_ema: ema_model= gives {len(mods)} module(s) for "
                             f"{self.num_decays} decay(s); pass one module per decay")
        if len({id(m) for m in mods}) != len(mods):
            raise ValueError("fused_ema: ema_model= gives the same module twice; each decay "
                             "needs its own")
        single = len(mods) == 1 and isinstance(ema_model, nn.Module)
        return [(m, ema_copy.check_given_module(self._model, m, sources, -1 if single else k,
                                                shared))
                for k, m in enumerate(mods)]

    # ------------------------------------------------------------------ properties

    @property
    def modules(self) -> Optional[List[nn.Module]]:
        """The EMA models, one per decay (None for a list of tensors)."""
        self.synchronize()
        return self._modules

    @modules.setter
    def modules(self, value: Optional[List[nn.Module]]) -> None:
        self._modules = value

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

    @step.setter
    def step(self, value: int) -> None:
        """Sets the counter (a resume that restored only the EMA weights): the next
        ``update`` applies the decay of step ``value``."""
        self._set_step(validation.check_count("step", value))

    @property
    def schedules(self) -> List[Schedule]:
        return list(self._schedules)

    def parameters(self, index: int = 0) -> List[torch.Tensor]:
        """The EMA of each parameter, in the model's (or the given list's) order (a shared
        frozen parameter is the model's own)."""
        self.synchronize()
        if self._model is None:
            return list(self._bare_emas[index])
        return list(self.modules[index].parameters())

    def named_pairs(self, index: int = 0) -> Iterator[Tuple[str, torch.Tensor, torch.Tensor]]:
        """``(name, ema_tensor, model_tensor)`` for each tensor the update touches (params and
        tracked buffers): the seam for code that handles distributed tensors."""
        b = self._ensure_bound()
        for i, name in enumerate(b.names):
            yield name, b.emas[index][i], b.srcs[i]

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
        return (f"FusedEMA(decays=[{sched}], tensors={len(self._selection.names)}, "
                f"step={step}, update_after_step={self.update_after_step}, "
                f"update_every={self.update_every}, buffers={self.buffers!r}, "
                f"frozen={self.frozen!r}, rounding={self.rounding!r}, device={self._device}, "
                f"capturable={self.capturable})")

    # ------------------------------------------------------------------ binding

    def _model_tensors(self, model: Optional[nn.Module] = None) -> Dict[str, tuple]:
        """name -> (tensor, container, key, is_param) of the model (or of the bare list)."""
        if model is None and self._model is None:
            return {n: (t, None, None, True) for n, t in zip(self._known_order, self._bare)}
        model = self._model if model is None else unwrap(model)
        return {s.name: (s.tensor, s.container, s.key, s.is_param)
                for s in selection.walk(model)}

    @property
    def _queues(self) -> bool:
        """Whether updates are queued on the worker (``non_blocking``, an EMA in host
        memory; never while torch.compile traces)."""
        return self.non_blocking and self._device.type == "cpu"

    def _ema_tensors(self, index: int) -> Dict[str, torch.Tensor]:
        if self.modules is not None:
            return {s.name: s.tensor for s in selection.walk(self.modules[index])}
        return dict(zip(self._known_order, self._bare_emas[index]))

    def _match(self, model: Optional[nn.Module]):
        found = self._model_tensors(model)
        return match(found, self._selection.names, self._known, self._ema_tensors(0)), found

    def _binding_for(self, model: Optional[nn.Module] = None) -> Binding:
        """Matches a model's tensors (default: the online model's) to the EMA's and builds
        the plans over them (validation once). Another model's binding is used for one
        update and not kept: the EMA stays bound to its own model."""
        own = model is None
        target = self._model if own else unwrap(model)
        distributed.reshard(target)  # FSDP2: the sharded params are the ones to match
        names, kinds = self._selection.names, self._selection.kinds
        srcs, found = self._match(None if own else target)
        floats = [t for t, kind in zip(srcs, kinds) if kind != "other"]
        src_device = model_device(names, kinds, srcs)
        distributed.check_device(src_device, self._device, floats)
        shared = self._selection.shared
        if own and src_device not in (None, self._device) and not self._device_explicit:
            self._move_ema(src_device)  # the model moved and the EMA follows it
        check_placement(self._device, src_device, capturable=self.capturable,
                        shared=shared if own else ())
        if own and shared:
            self._share({n: found[n][0] for n in shared})
        emas = [[e[n] for n in names] for e in map(self._ema_tensors, range(self.num_decays))]
        ema_copy.follow_layout(srcs, emas)
        entries = []
        if own and target is not None:
            # what the per-step check compares by identity: each tracked or shared tensor
            # in its module's dict (a frozen parameter replaced is shared again), and each
            # submodule in its parent's (a replaced submodule)
            entries = [(c, k, t) for t, c, k, _ in (found[n] for n in names + shared)]
            entries += [(m._modules, k, c) for m in target.modules()
                        for k, c in m._modules.items() if c is not None]
        return Binding(names, kinds, srcs, emas, self._device, self.capturable, entries,
                       self.rounding, self.seed, non_blocking=own and self._queues,
                       buffers=[not found[n][3] for n in names])

    def _share(self, model_tensors: Dict[str, torch.Tensor]) -> None:
        """Makes every EMA hold ``model_tensors`` (name -> the model's tensor) where it
        holds another tensor under that name: a frozen parameter shared, a copy dropped."""
        for k in range(self.num_decays):
            held = self._ema_tensors(k)
            self._replace(k, {id(held[n]): t for n, t in model_tensors.items()
                              if held[n] is not t})

    def _replace(self, index: int, new: Dict[int, torch.Tensor]) -> None:
        """``new[id(t)]`` in place of each EMA tensor ``t`` of the ``index``-th EMA."""
        if not new:
            return
        if self.modules is not None:
            ema_copy.replace_tensors(self.modules[index], new)
        else:
            self._bare_emas[index] = [new.get(id(e), e) for e in self._bare_emas[index]]

    def _owned(self, index: int) -> List[torch.Tensor]:
        """The EMA's own tensors (all but the shared ones) of the ``index``-th EMA."""
        shared = set(self._selection.shared)
        return [t for n, t in self._ema_tensors(index).items() if n not in shared]

    @torch.compiler.disable  # plans are built eagerly, also when update() is compiled
    def _bind(self) -> Binding:
        """Binds the EMA to its own model's current tensors."""
        self.synchronize()
        self._binding = binding = self._binding_for()
        if self.capturable and self._step_t.device != self._device:
            self._step_t = self._step_t.to(self._device)
        return binding

    def _move_ema(self, device: torch.device) -> None:
        self._retensor(lambda e: e.to(device))
        self._device = device
        if self._step_t is not None:
            self._step_t = self._step_t.to(device)

    def _ensure_bound(self) -> Binding:
        self.synchronize()
        b = self._binding
        if b is None or not b.intact():
            b = self._bind()
        return b

    def replan(self) -> None:
        """Rebuilds the plans from the model's current tensors (done automatically when a
        tensor was replaced; call it after changing ``requires_grad``). With
        ``frozen="share"``, a parameter unfrozen since gets an EMA of its own (starting
        from its current value), one frozen since is shared (its EMA dropped)."""
        self.synchronize()
        self._match(None)  # a model of other names or shapes: the usual error, nothing changed
        sources = (selection.walk(self._model) if self._model is not None
                   else selection.from_list(list(zip(self._known_order, self._bare))))
        new = selection.select(sources, **self._select_args)
        was, now = set(self._selection.shared), set(new.shared)
        by_name = {s.name: s for s in sources}
        make = ema_copy.ema_source if self.modules is not None else (
            lambda s, device, dtype: ema_copy.ema_tensor(s.tensor, device, dtype))
        with torch.no_grad():  # every new tensor made before anything is replaced
            own = {n: [make(by_name[n], self._device, self.ema_dtype)
                       for _ in range(self.num_decays)] for n in was - now}
        for k in range(self.num_decays):
            held = self._ema_tensors(k)
            swap = {id(held[n]): own[n][k] for n in own}
            swap.update({id(held[n]): by_name[n].tensor for n in now - was})
            self._replace(k, swap)
        self._selection = new
        self._bind()

    def _averaged_sources(self) -> List[Tuple[str, torch.Tensor]]:
        b = self._ensure_bound()
        return [(n, t) for n, t, kind in zip(b.names, b.srcs, self._selection.kinds)
                if kind == "average"]

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
               skip: Optional[torch.Tensor] = None, step: Optional[int] = None) -> None:
        """One update from the model's current weights (all tensors in one fused call).

        ``model``: update from this model instead (matched by name; DDP and torch.compile
        wrappers of the EMA's model are the same model), or from a parameter list laid out
        as the model's ``parameters()`` (torch_ema's ``update(parameters)``). ``skip``: a 0-d tensor, e.g. a
        GradScaler's found-inf: when non-zero nothing changes (read on the device, no sync).
        A skipped step is not counted when the flag can be read for free (a CPU tensor) or
        with ``capturable=True``; a CUDA flag without ``capturable`` still advances the step
        counter, as reading it would need a host sync. ``step``: the optimizer step this
        update is for (timm, diffusers): the counter is set to it first, so the update
        applies the decay of that step.

        With ``non_blocking=True`` (an EMA in host memory) the update is queued on the
        worker thread and this returns (after waiting for the previous one); see
        ``synchronize``.
        """
        self.synchronize()
        if step is not None:
            self._set_step(validation.check_count("step", step))
        if skip is not None:  # a Python bool too
            skip = validation.check_skip(skip if isinstance(skip, torch.Tensor)
                                         else torch.tensor(bool(skip)))
        compiling = torch.compiler.is_compiling()
        b, rebind = self._binding, self._bind
        if model is not None and not isinstance(model, nn.Module):
            b = self._list_run(model)  # through the functional path: never stale
            rebind = None
        elif model is not None and unwrap(model) is not self._model:
            if self._model is None:
                raise TypeError("fused_ema: this FusedEMA averages a list of tensors; "
                                "update() takes no model")
            b = self._binding_for(model)  # around the binding: the EMA stays bound to its own
            rebind = lambda: self._binding_for(model)  # noqa: E731
        elif b is None or (not compiling and not b.intact()):
            b = self._bind()
        if self.capturable:
            return self._update_capturable(b, skip, compiling, rebind)
        s = self._step
        if skip is not None and skip.device.type == "cpu":
            if skip.reshape(()).item() != 0:  # host memory: no sync
                return
            skip = None
        if (s + 1) % self.update_every:
            self._step = s + 1
            return
        decays = self._decays_at(s)
        queue = self._queues and not compiling
        ready = None
        if b.cross and skip is not None and skip.device != self._device and not b.offload:
            # queued: read by the worker once `ready` (recorded after it) completes
            skip = skip.to(self._device, non_blocking=queue)
        if b.stages and not (queue and b.offload):  # an offload's issue() stages itself
            ready = b.stage(wait=not queue)  # a CUDA model, queued: the worker waits
        if queue:
            self._queue(b, decays, skip, rebind, s, ready)
        else:
            self._run(b, decays, skip, rebind, s)
        self._step = s + 1

    def _queue(self, b, decays, skip, rebind, s: int, ready=None) -> None:
        """Queues the update on the worker thread (nothing is pending: update() waited).
        ``ready``: a CUDA event the staging copies complete at, waited on by the worker.
        Through offloads (``b.offload``) the copies are queued here, on the training
        stream's order, and consumed chunk by chunk by the worker."""
        if b.offload:
            consume = b.issue(skip)

            def job():
                consume(decays)  # its tensors were checked (b.intact()): nothing is stale
        else:
            def job():
                if ready is not None:
                    ready.synchronize()  # on the worker: the training thread does not wait
                try:
                    b.run(decays, skip, 0, s)
                except Stale as stale:
                    return stale.start  # nothing of it written: finished by synchronize()
                return None

        if self._worker is None:
            self._worker = Worker()
        self._pending = (decays, skip, rebind, s, b)
        self._worker.submit(job)

    def _before_optimizer_step(self) -> None:
        """``attach``'s pre-step hook with ``non_blocking=True``: the optimizer is about to
        write the parameters the pending update reads. Through offloads the current stream
        waits for their copies (no host wait; the worker may still be updating from the
        staging); else this thread waits for the worker."""
        if self._pending is not None and self._pending[4].offload:
            self._pending[4].order_before_writes()
        else:
            self.synchronize()

    def synchronize(self) -> None:
        """Waits for the update queued by ``non_blocking=True`` (a no-op when none is
        pending). Every method that touches a tensor calls it first, and so does the
        optimizer's ``step()`` with ``attach``; call it yourself before anything else
        writes the model's weights (the worker reads them), or reads the EMA tensors
        directly.

        An exception in the worker is raised here, the original one, after the step
        counter is set back to that update's step: the EMA is then as a synchronous
        ``update()`` that raised would leave it (the engine checks every tensor before it
        writes one). A group of tensors whose plan found a tensor replaced (``.data =``)
        was not written by the worker: it is bound again and updated here, on this thread.
        """
        w = self._worker
        if w is None or not w.pending:
            return
        result, exc = w.wait()
        decays, skip, rebind, s, _ = self._pending
        self._pending = None
        if exc is not None:
            self._step = s
            if hasattr(exc, "add_note"):
                exc.add_note(f"fused_ema: raised by the non-blocking update of step {s} on the "
                             f"worker thread; the step counter is back at {s}")
            raise exc
        if result is not None:
            b = rebind() if rebind is not None else self._bind()
            if b.stages:
                b.stage()
            self._run(b, decays, skip, rebind, s, int(result))

    def _list_run(self, tensors) -> ListRun:
        """The update from a parameter list of the EMA's layout (``update(params)``)."""
        per_decay = [self._list_pairs(tensors, k, "update()") for k in range(self.num_decays)]
        pairs = [(t, [per_decay[k][i][1] for k in range(self.num_decays)], kind)
                 for i, (t, _, kind) in enumerate(per_decay[0])]
        return ListRun(pairs, self.num_decays, self.rounding, self.seed)

    def _run(self, b: Binding, decays, skip, rebind, step, start: int = 0) -> None:
        """``step``: this update's counter (an int, or the device counter when capturable):
        it keys stochastic rounding's random bits. ``start``: the first group to update."""
        while True:
            try:
                return b.run(decays, skip, start, step)
            except Stale as stale:
                # A tensor got new storage (model.to(), p.data = ...): bind again and go on
                # from this group (the groups before it are already updated).
                start = stale.start
                b = rebind()
                if b.stages:
                    b.stage()

    def _update_capturable(self, b: Binding, skip, compiling: bool, rebind) -> None:
        s = self._step_t
        decays = self._decays_tensor(s)
        flag = None
        if self.update_every > 1:
            flag = (s + 1) % self.update_every != 0
        if skip is not None:
            found = skip.reshape(()) != 0
            flag = found if flag is None else flag | found
        if compiling:
            b.run_traced(decays, flag, s)
        else:
            self._run(b, decays, flag, rebind, s)
        with torch.no_grad():
            if skip is not None:
                s.add_((skip.reshape(()) == 0).to(torch.int64))
            else:
                s.add_(1)

    # ------------------------------------------------------------------ optimizer hook

    def attach(self, optimizer: torch.optim.Optimizer, scaler=None) -> optim_hook.Handle:
        """Updates the EMA after every ``optimizer.step()``; ``handle.remove()`` stops it.

        With ``scaler`` (a ``torch.amp.GradScaler``): a step the scaler skips (inf/NaN
        gradients) does not update the EMA. Optimizers that step themselves with the
        scaler's found-inf flag (``fused=True`` Adam/AdamW/SGD) pass the flag on to the
        kernel as ``skip``: no host sync. The found-inf flag is honoured even without
        ``scaler=``; give it for optimizers that take ``grad_scaler=`` in ``step``.
        """
        return optim_hook.attach(self, optimizer, scaler)

    # ------------------------------------------------------------------ swap and copy

    def _ema_params(self, index: int) -> List[Tuple[str, torch.Tensor]]:
        """(name, EMA tensor) of each parameter in ``model.parameters()`` order (for a list of
        tensors: its order): the layout a parameter list must have."""
        if self.modules is None:
            return list(zip(self._known_order, self._bare_emas[index]))
        return [(s.name, s.tensor) for s in selection.walk(self.modules[index]) if s.is_param]

    def _list_pairs(self, tensors, index: int, what: str) -> List[Tuple[torch.Tensor, ...]]:
        """(tensor, EMA tensor, kind) for a parameter list of the EMA's layout, checked
        (count, types, shapes) before anything is read or written; excluded ones dropped."""
        tensors = list(tensors)
        ours = self._ema_params(index)
        if len(tensors) != len(ours):
            raise ValueError(f"fused_ema: {what} got {len(tensors)} tensors but this EMA has "
                             f"{len(ours)} parameters; pass a list laid out as the model's "
                             "parameters()")
        roles = self._selection.roles
        out = []
        for i, (t, (n, e)) in enumerate(zip(tensors, ours)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"fused_ema: {what}: item {i} is {type(t).__name__}, not a "
                                "tensor")
            if t.shape != e.shape:
                raise ValueError(f"fused_ema: {what}: item {i} has shape {list(t.shape)} but "
                                 f"the EMA of '{n}' has {list(e.shape)}")
            if roles.get(n, "average") in ("average", "copy", "other"):
                out.append((t, e, roles.get(n, "average")))
        return out

    def _pairs_for(self, model, index: int):
        if index < 0 or index >= self.num_decays:
            raise IndexError(f"fused_ema: index {index} out of range for {self.num_decays} EMA(s)")
        if model is not None and not isinstance(model, nn.Module):
            return [(t, e) for t, e, _ in self._list_pairs(model, index, "a parameter list")]
        if model is None or (self._model is not None and unwrap(model) is self._model):
            b = self._ensure_bound()
            return list(zip(b.srcs, b.emas[index]))
        if self._model is None:
            raise TypeError("fused_ema: this FusedEMA averages a list of tensors; pass a list "
                            "of tensors, not a module")
        srcs, _ = self._match(model)
        return list(zip(srcs, self._ensure_bound().emas[index]))

    def _target(self, model):
        return self._model if model is None else (model if isinstance(model, nn.Module)
                                                   else None)

    @torch.no_grad()
    def copy_to(self, model=None, index: int = 0) -> None:
        """Writes the EMA weights (and tracked buffers) into ``model``: the online model
        (default), another model of the same names, or a parameter list laid out as the
        model's ``parameters()`` (torch_ema's ``copy_to(parameters)``)."""
        for t, e in self._pairs_for(model, index):
            t.copy_(e)
        distributed.reshard(self._target(model))

    @torch.no_grad()
    def set(self, model=None) -> None:
        """Copies the model (default: the online model; or a model of the same names, or a
        parameter list of the model's layout) into every EMA: timm's ``set``, a hard
        update. The step counter is kept (``reset()`` also zeroes it)."""
        pairs = [self._pairs_for(model, k) for k in range(self.num_decays)]
        for per_decay in pairs:
            for t, e in per_decay:
                e.copy_(t)

    def reset(self) -> None:
        """Starts the average again: the EMA becomes the online model, the step counter 0."""
        self.set()
        self._set_step(0)

    @torch.no_grad()
    def store(self, model=None) -> None:
        """Saves the online model's weights (and tracked buffers), or a given parameter
        list's, for ``restore()`` (torch_ema, diffusers): ``store(); copy_to(); evaluate;
        restore()``. ``swapped()`` does the three in one block."""
        pairs = self._pairs_for(model, 0)
        self._stored = ([t for t, _ in pairs], [t.detach().clone() for t, _ in pairs],
                        self._target(model))

    @torch.no_grad()
    def restore(self) -> None:
        """Writes back what ``store()`` saved (once: a second ``restore`` needs a new
        ``store``)."""
        stored = getattr(self, "_stored", None)
        if stored is None:
            raise RuntimeError("fused_ema: restore() without store(); call ema.store() before "
                               "copying the EMA into the model")
        self.synchronize()  # the worker may be reading the model's tensors
        for t, saved in zip(stored[0], stored[1]):
            t.copy_(saved)
        self._stored = None
        distributed.reshard(stored[2])

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
            distributed.reshard(self._target(model))  # drop gathered EMA

    # ------------------------------------------------------------------ device, dtype, pickling

    def to(self, device: Optional[Union[str, torch.device]] = None,
           dtype: Optional[torch.dtype] = None, non_blocking: bool = False) -> "FusedEMA":
        """Moves the EMA (every decay's copy) to ``device`` and / or casts its floating
        tensors to ``dtype``. A device other than the model's keeps the EMA there (each
        update copies the weights over first, as with ``FusedEMA(device=...)``)."""
        if dtype is not None:
            validation.check_float_dtype("dtype", dtype)
        new_device = self._device if device is None else torch.device(device)
        if new_device.type == "cuda" and new_device.index is None:
            new_device = torch.device("cuda", torch.cuda.current_device())
        b = self._ensure_bound()
        src_device = model_device(b.names, self._selection.kinds, b.srcs)
        shared = self._selection.shared
        check_placement(new_device, src_device or (  # every parameter shared: theirs
            self._ema_tensors(0)[shared[0]].device if shared else None),
            capturable=self.capturable, shared=shared)
        distributed.check_device(src_device, new_device,
                                 [t for t, k in zip(b.srcs, self._selection.kinds)
                                  if k != "other"])
        self._retensor(lambda e: e.to(device=new_device,
                                      dtype=dtype if e.is_floating_point() else None,
                                      non_blocking=non_blocking))
        if device is not None:
            self._device = new_device
            self._device_explicit = src_device is not None and new_device != src_device
            if self._step_t is not None:
                self._step_t = self._step_t.to(new_device)
        if dtype is not None:
            self.ema_dtype = dtype
        self._bind()
        return self

    def pin_memory(self) -> "FusedEMA":
        """Puts a CPU EMA in pinned (page-locked) memory: the staging copies of a CUDA model's
        weights then run without an extra host copy."""
        if self._device.type != "cpu":
            raise ValueError(f"fused_ema: pin_memory() is for an EMA in host memory; this one "
                             f"is on {self._device}")
        if not torch.cuda.is_available():
            raise RuntimeError("fused_ema: pin_memory() needs CUDA (pinned memory is for "
                               "copies to a GPU)")
        self._retensor(lambda e: e.pin_memory())
        self._bind()
        return self

    @torch.no_grad()
    def _retensor(self, fn) -> None:
        """``e.data = fn(e)`` for every tensor the EMA owns (the objects stay: modules keep
        theirs; shared ones are the model's)."""
        self.synchronize()
        tensors = [e for k in range(self.num_decays) for e in self._owned(k)]
        new = [fn(e.data) for e in tensors]  # all made before any is replaced
        for e, d in zip(tensors, new):
            e.data = d

    def __getstate__(self) -> Dict[str, Any]:
        # The binding (compiled plans, identity watch) is a cache rebuilt on first use;
        # optimizer hooks stay with the object that registered them.
        self.synchronize()
        state = self.__dict__.copy()
        state["_binding"] = None
        state["_attached"] = {}
        state["_worker"] = None
        state["_pending"] = None
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        if "modules" in state:  # pickled before `modules` became a property
            state["_modules"] = state.pop("modules")
        state.setdefault("non_blocking", False)
        state.setdefault("_worker", None)
        state.setdefault("_pending", None)
        self.__dict__.update(state)
        # Bound now, so that a compiled update() never meets a missing binding. Where the
        # model is not whole yet (an EMA pickled inside its own model), the first update
        # binds instead, and reports whatever fails then.
        try:
            self._bind()
        except Exception:
            self._binding = None

    # ------------------------------------------------------------------ state dict

    def state_dict(self) -> Dict[str, Any]:
        """EMA tensors in their own dtype (one dict per decay: the EMA module's state_dict,
        or name -> tensor for a list of tensors), the step counter and the settings."""
        self.synchronize()
        return checkpoint.state_dict(self)

    def load_state_dict(self, state_dict: Dict[str, Any], strict: bool = True) -> None:
        """Loads a ``state_dict()``; checks everything first (settings, names, shapes,
        dtypes) and raises naming what differs, with nothing modified. ``strict=False``
        adopts the checkpoint's decays, ``update_after_step`` and ``update_every`` (settings
        that do not change the tensors) with a warning instead of refusing."""
        self.synchronize()
        checkpoint.load_state_dict(self, state_dict, strict=strict)

    def _set_step(self, step: int) -> None:
        self.synchronize()
        self._step = int(step)
        if self.capturable:
            self._step_t.fill_(int(step))

    def _settings_changed(self) -> None:
        """Recomputes what depends on the schedules and update_every."""
        self._const = constant_decays(self._schedules, self.update_every)
