"""The per-step update: plans over the model's current tensors, and the check that the
model still holds them.

A ``Binding`` is rebuilt (by ``FusedEMA``) whenever that check fails: a parameter
replaced by assignment, a submodule replaced, a tensor given new storage (``.data = ``,
``model.to()``), a resize. The check has two parts, each stated once: the plans' own (in
C++, ``first_stale``: every tensor they hold against the key it had) and a ``Watch`` of
what the plans cannot see (each tracked tensor and submodule by identity in its owner's
dict, the tensors the plans read through a copy or a view). A step costs a few
nanoseconds per tensor and no Python loop over tensors.
"""
import re
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from . import _ext, distributed, functional, validation
from .functional import EMAPlan


class Stale(Exception):
    """A plan found a tensor changed under it (nothing of its group written); ``start`` is
    that group (the caller binds again and goes on from there)."""

    def __init__(self, start: int):
        super().__init__(start)
        self.start = start


class PyWatch:
    """``_C.Watch`` in Python (used when the compiled module is absent): the same rules."""

    def __init__(self, tensors, owners, keys, objects):
        self._tensors = list(tensors)
        self._keys = [validation.tensor_key(t) for t in self._tensors]
        self._entries = list(zip(owners, keys, objects))

    def first_changed(self) -> int:
        j = validation.first_changed(self._tensors, self._keys)
        if j >= 0:
            return j
        for j, (owner, key, obj) in enumerate(self._entries):
            now = owner.get(key) if isinstance(owner, dict) else getattr(owner, key)
            if now is not obj:
                return len(self._tensors) + j
        return -1

    def __len__(self) -> int:
        return len(self._tensors) + len(self._entries)


def watch(tensors: Sequence[torch.Tensor], entries: Sequence[Tuple[object, str, object]]):
    """A watch of ``tensors`` (by key) and of ``(owner, key, object)`` entries (the object
    is ``owner[key]`` for a dict owner, else ``getattr(owner, key)``)."""
    make = _ext._C.Watch if _ext._C is not None else PyWatch
    return make(list(tensors), [o for o, _, _ in entries], [k for _, k, _ in entries],
                [x for _, _, x in entries])


def flat(t: torch.Tensor) -> torch.Tensor:
    """A 1-D view in memory order of a dense tensor that is not contiguous; else the tensor
    itself (a tensor that is not dense is left for the engine to refuse, naming it)."""
    if t.is_contiguous() or not validation.is_dense(t):
        return t
    return t.as_strided((t.numel(),), (1,))


def name_indices(message: str, names: Sequence[str]) -> str:
    """Adds the parameter name after each ``params[i]`` / ``emas[i]`` of an engine error."""
    def sub(m):
        i = int(m.group(2))
        return f"{m.group(0)} ('{names[i]}')" if i < len(names) else m.group(0)

    return re.sub(r"(params|emas(?:\[\d+\])?)\[(\d+)\]", sub, message)


def match(found: Dict[str, tuple], names: Sequence[str], known: set,
          ema_by_name: Dict[str, torch.Tensor]) -> List[torch.Tensor]:
    """The model's tensor for each tracked name, checked against the EMA's; raises naming
    what differs (``found``: name -> (tensor, container, key) of the model)."""
    missing = [n for n in names if n not in found]
    extra = [n for n in found if n not in known]
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
    for n in names:
        t, e = found[n][0], ema_by_name[n]
        if t.shape != e.shape:
            raise ValueError(
                f"fused_ema: '{n}' has shape {list(t.shape)} in the model but "
                f"{list(e.shape)} in the EMA; the model's tensors were replaced by tensors of "
                "another shape: build a new FusedEMA")
        out.append(t)
    return out


def model_device(names, kinds, srcs) -> Optional[torch.device]:
    """The one device of the model's tracked floating tensors (None when there are none:
    every parameter shared)."""
    floats = [(n, t) for n, t, kind in zip(names, srcs, kinds) if kind != "other"]
    if not floats:
        return None
    first = floats[0][1].device
    for n, t in floats:
        if t.device != first:
            raise ValueError(f"fused_ema: '{n}' is on {t.device} but '{floats[0][0]}' is on "
                             f"{first}; FusedEMA needs the model on one device")
    return first


def host_offload(src_device: Optional[torch.device], ema_device: torch.device,
                 rounding: str):
    """The class that carries a non-blocking update of a model on ``src_device`` into an
    EMA on ``ema_device`` (``_C.HostOffload``: a CUDA model, an EMA in host memory, the
    compiled CUDA module), or None: the update stages full copies instead. Stochastic
    rounding keys its random bits by (tensor, element) of the whole tensors, which the
    offload's chunks do not keep: it stages too."""
    if (src_device is None or src_device.type != "cuda" or ema_device.type != "cpu"
            or rounding != "nearest" or not _ext.compiled_for("cuda")):
        return None
    return _ext._C.HostOffload


class Binding:
    """The plans of one EMA over one model's current tensors, and the watch of what they
    cannot see.

    Args:
        names, kinds: the tracked tensors (``selection.Selection``), in model order.
        srcs: the model's tensor for each name.
        emas: ``emas[k][i]``: the k-th EMA's tensor for ``names[i]``, laid out as ``srcs[i]``
            (``ema_copy.follow_layout``).
        ema_device: where the EMA lives (another device than the model's: each update
            stages the model's tensors there first).
        entries: ``(owner, key, object)`` for each object whose replacement means the model
            changed (tracked tensors in their module's dict, submodules in their parent's).
        rounding, seed: how the averaged tensors' EMAs are rounded (``"stochastic"``: bf16
            EMAs, random bits keyed by the seed and each update's step); copies round to
            nearest.
        non_blocking: updates are queued on a worker thread (``FusedEMA(non_blocking=True)``):
            the buffers are read from copies staged when the update is queued, and a model
            whose update ``host_offload`` carries gets a ``HostOffload`` per group of its
            other tensors instead of staged copies and plans (``offload`` is then True; see
            ``issue``).
        buffers: whether each tensor is a buffer (written by the forward, not by the
            optimizer).
    """

    def __init__(self, names: Sequence[str], kinds: Sequence[str],
                 srcs: Sequence[torch.Tensor], emas: Sequence[Sequence[torch.Tensor]],
                 ema_device: torch.device, capturable: bool,
                 entries: Sequence[Tuple[object, str, object]] = (),
                 rounding: str = "nearest", seed: int = 0, non_blocking: bool = False,
                 buffers: Sequence[bool] = ()):
        num_decays = len(emas)
        src_device = model_device(names, kinds, srcs)
        cross = src_device is not None and src_device != ema_device  # placement: options.py
        pin = cross and ema_device.type == "cpu" and src_device.type == "cuda"
        offload = host_offload(src_device, ema_device, rounding) if non_blocking else None
        # Each tensor is read by a plan from the model (its own memory), by a plan from a
        # staging copy on the EMA's device (made by stage()), or by an offload. Queued
        # updates read the buffers (the forward writes them, not the optimizer) from
        # staging copies made when the update is queued. What the plans reach only
        # through a copy, a 1-D view or an offload is watched instead.
        plan_srcs, offloaded, unseen, staging = {}, [], [], []
        with torch.no_grad():
            for i, (t, kind) in enumerate(zip(srcs, kinds)):
                snapshot = non_blocking and i < len(buffers) and buffers[i]
                if kind == "other":  # copied by copy_others, from staging where made
                    if snapshot or (offload is not None and cross):
                        staging.append((torch.empty_like(t, device=ema_device,
                                                         pin_memory=pin), t))
                        unseen.append(t)
                    continue
                if offload is not None and not snapshot:
                    offloaded.append(i)  # views of the model's tensor and of its EMAs
                    unseen += [t] + [emas[k][i] for k in range(num_decays)]
                    continue
                if cross or snapshot:
                    s = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype,
                                            device=ema_device, pin_memory=pin)
                    staging.append((s, t))
                    plan_srcs[i] = s
                    unseen.append(t)
                else:
                    plan_srcs[i] = t
                    if not t.is_contiguous():
                        unseen.append(t)
                unseen += [emas[k][i] for k in range(num_decays)
                           if not emas[k][i].is_contiguous()]
        groups, offloads = [], []
        for kind in ("average", "copy"):
            for through_offload in (False, True):
                idx = [i for i, k in enumerate(kinds) if k == kind and
                       (i in offloaded) == through_offload]
                if not idx:
                    continue
                # DTensors (FSDP2): the engine updates the local shards
                ps = [flat(distributed.local(srcs[i] if through_offload else plan_srcs[i]))
                      for i in idx]
                es = [[flat(distributed.local(emas[k][i])) for i in idx]
                      for k in range(num_decays)]
                try:
                    if through_offload:
                        device = src_device.index if src_device.index is not None else 0
                        offloads.append((kind, offload([e for per_decay in es for e in per_decay],
                                                       ps, num_decays, device)))
                    else:
                        groups.append((kind, EMAPlan.multi(
                            es, ps, rounding=rounding if kind == "average" else "nearest",
                            seed=seed), ps, es))
                except (ValueError, TypeError, RuntimeError) as exc:
                    raise type(exc)(name_indices(str(exc), [names[i] for i in idx])) from None
        self.groups = groups
        self.offloads = offloads
        self.offload = bool(offloads)
        # (kind, call(decays, decay_tensor, skip) -> stale index or -1) for each group
        self._calls = [(kind, plan.try_update_) if plan._plan is None
                       else (kind, plan._plan.update_) for kind, plan, _, _ in groups]
        self.rounding, self.seed = rounding, seed
        self.names = list(names)
        self.srcs = list(srcs)
        self.emas = [list(e) for e in emas]
        self.cross = cross
        self.stages = bool(staging)
        self._pin_sync = pin
        self._staging = staging
        other = [i for i, k in enumerate(kinds) if k == "other"]
        staged = {id(t): s for s, t in staging}
        self._other_srcs = [staged.get(id(srcs[i]), srcs[i]) for i in other]
        self._other_emas = [[emas[k][i] for i in other] for k in range(num_decays)]
        self.zeros = [0.0] * num_decays
        self.zeros_t = (torch.zeros(num_decays, dtype=torch.float64, device=ema_device)
                        if capturable else None)
        self._watch = watch(unseen, list(entries) + distributed.watch_entries(srcs))

    # ------------------------------------------------------------------ per step

    def intact(self) -> bool:
        """Nothing the plans cannot see changed (what they check themselves, every tensor
        they hold, they check before they write)."""
        return self._watch.first_changed() < 0

    def stage(self, wait: bool = True):
        """Copies the tensors the plans read from staging (all of an EMA kept elsewhere,
        the buffers of a queued update) there. From a CUDA model with ``wait=False``:
        returns an event recorded after the copies on the current stream instead of waiting
        for them (whoever reads the staging waits on it; the next work queued on that
        stream, the forward's and the optimizer's, follows the copies)."""
        with torch.no_grad():
            for s, t in self._staging:
                s.copy_(t, non_blocking=self._pin_sync)
        if self._pin_sync:
            stream = torch.cuda.current_stream(self._staging[0][1].device)
            if not wait:
                event = torch.cuda.Event()
                event.record(stream)
                return event
            stream.synchronize()
        return None

    def run(self, decays, skip, start: int = 0, step=0) -> None:
        """One update: ``decays`` is a list of host floats (one per EMA) or a tensor of
        them; copy groups get zeros. ``step``: the update's counter (an int, or a device
        tensor), the key of stochastic rounding. Raises ``Stale(j)`` when group j found a
        tensor changed (nothing of it written; the groups before it are updated)."""
        if self.offload:  # not queued (traced): the same copies, consumed here
            return self.issue(skip)(decays)
        self._run_plans(decays, skip, start, step)
        self.copy_others(skip)

    def _run_plans(self, decays, skip, start: int = 0, step=0) -> None:
        host = type(decays) is list
        zeros = self.zeros if host else self.zeros_t
        step, step_t = (0, step) if isinstance(step, torch.Tensor) else (step, None)
        calls = self._calls
        for j in range(start, len(calls)):
            kind, call = calls[j]
            d = decays if kind == "average" else zeros
            if (call(d, None, skip, step, step_t) if host
                    else call([], d, skip, step, step_t)) >= 0:
                raise Stale(j)

    def issue(self, skip):
        """A queued update through the offloads (``offload``), on the training thread:
        stages the buffers and queues the offloads' copies, after the work queued so far on
        the current stream, with no host wait; returns ``consume(decays)`` for the worker.
        ``skip``: None or a flag on the model's device, read by the offloads."""
        ready = self.stage(wait=False) if self.stages else None
        for _, offload in self.offloads:
            offload.issue(None, skip)

        def consume(decays) -> None:
            ran, error = True, None
            for kind, offload in self.offloads:  # each one, so every slot is released
                try:
                    ran = offload.consume(decays if kind == "average" else self.zeros) and ran
                except Exception as exc:  # noqa: BLE001 - raised once all are consumed
                    error = error or exc
            if error is not None:
                raise error
            if ready is not None:
                ready.synchronize()  # the staged buffers
            if ran:  # else the skip flag was set
                self._run_plans(decays, None)
                self.copy_others(None)

        return consume

    def order_before_writes(self) -> None:
        """Training thread, before the next optimizer step: the current stream waits for the
        copies ``issue`` queued (a stream wait, no host wait)."""
        for _, offload in self.offloads:
            offload.order_before_writes(None)

    def run_traced(self, decays, skip, step) -> None:
        """The update as torch ops (dynamo traces them with their fake kernels, not the
        pybind plan)."""
        zeros = self.zeros_t
        for kind, _, ps, es in self.groups:
            average = kind == "average"
            functional.multi_ema_update_(es, ps, decays if average else zeros, skip=skip,
                                         rounding=self.rounding if average else "nearest",
                                         seed=self.seed, step=step)
        self.copy_others(skip)

    def copy_others(self, skip) -> None:
        """Non-float tensors (integer counters such as BatchNorm's num_batches_tracked)
        are copied: one ATen multi-tensor copy per EMA."""
        if not self._other_srcs:
            return
        with torch.no_grad():
            for emas in self._other_emas:
                if skip is None:
                    torch._foreach_copy_(emas, self._other_srcs)
                    continue
                for e, t in zip(emas, self._other_srcs):
                    e.copy_(torch.where(skip.to(e.device).reshape(()) != 0, e, t.to(e.device)))


class ListRun:
    """An update from a parameter list laid out as the EMA's parameters (``update(params)``)
    rather than from the bound model: through the functional path, whose C++ plan cache
    makes a list given again cheap. ``pairs``: (tensor, EMA tensors per decay, kind)."""
    cross = offload = stages = False

    def __init__(self, pairs, num_decays: int, rounding: str = "nearest", seed: int = 0):
        groups = []
        for kind in ("average", "copy"):
            sel = [(t, es) for t, es, k in pairs if k == kind]
            if not sel:
                continue
            for t, es in sel:
                if any(e.stride() != t.stride() and t.numel() > 1 for e in es):
                    raise ValueError("fused_ema: a tensor of the list has another memory "
                                     "layout than its EMA (strides differ); pass tensors "
                                     "laid out as the model's")
            ps = [flat(t) for t, _ in sel]
            es = [[flat(es[k]) for _, es in sel] for k in range(num_decays)]
            groups.append((kind, ps, es))
        self._groups = groups
        self._others = [(t, es) for t, es, k in pairs if k == "other"]
        self._zeros = [0.0] * num_decays
        self._rounding, self._seed = rounding, seed

    def run(self, decays, skip, start: int = 0, step=0) -> None:
        host = type(decays) is list
        zeros = self._zeros if host else torch.zeros_like(decays)
        for kind, ps, es in self._groups:
            average = kind == "average"
            functional.multi_ema_update_(es, ps, decays if average else zeros, skip=skip,
                                         rounding=self._rounding if average else "nearest",
                                         seed=self._seed, step=step)
        with torch.no_grad():
            for t, es in self._others:
                for e in es:
                    e.copy_(t if skip is None else torch.where(skip.reshape(()) != 0, e, t))

    run_traced = run
