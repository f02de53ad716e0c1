"""The per-step update: the model's tensors matched to the EMA's, the plans built once
over them, the per-step check that the model still holds those tensors, and the run.

A ``Binding`` is rebuilt (by ``FusedEMA``) whenever that check fails: a parameter
replaced by assignment, a submodule replaced, a tensor given new storage (``.data = ``,
``model.to()``), a resize. The check is one C++ loop (``IdentityWatch``) plus the
plan's own check of every tensor's pointer, shape, dtype and layout, so a step costs a
few nanoseconds per tensor and no Python loop over tensors.
"""
import operator
import re
from typing import Dict, List, Sequence, Tuple

import torch

from . import _ext, distributed, functional
from .fallback import is_dense
from .functional import EMAPlan


class Stale(Exception):
    """A plan call failed because a tensor changed under it; ``start`` is the first group
    not yet updated (the caller binds again and goes on from there)."""

    def __init__(self, start: int):
        super().__init__(start)
        self.start = start


class PyIdentityWatch:
    """The pure-Python ``IdentityWatch`` (used when the compiled module is absent)."""

    def __init__(self, dicts, keys, objects, tensors):
        self._dicts, self._keys, self._objects = list(dicts), list(keys), list(objects)
        self._tensors = [(t, t.data_ptr()) for t in tensors]

    def intact(self) -> bool:
        if not all(map(operator.is_, map(dict.get, self._dicts, self._keys), self._objects)):
            return False
        return all(t.data_ptr() == p for t, p in self._tensors)

    def __len__(self) -> int:
        return len(self._dicts) + len(self._tensors)


def identity_watch(dicts, keys, objects, tensors):
    if _ext._C is not None and all(isinstance(d, dict) for d in dicts):
        return _ext._C.IdentityWatch(list(dicts), list(keys), list(objects), list(tensors))
    return PyIdentityWatch(dicts, keys, objects, tensors)


def flat(t: torch.Tensor) -> torch.Tensor:
    """The tensor itself when contiguous, else a 1-D view of a dense tensor in memory order."""
    if t.is_contiguous():
        return t
    return t.as_strided((t.numel(),), (1,))


def tensor_key(t: torch.Tensor):
    return (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, t.device)


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


def model_device(names, kinds, srcs) -> torch.device:
    """The one device of the model's floating tensors."""
    floats = [(n, t) for n, t, kind in zip(names, srcs, kinds) if kind != "other"]
    first = floats[0][1].device
    for n, t in floats:
        if t.device != first:
            raise ValueError(f"fused_ema: '{n}' is on {t.device} but '{floats[0][0]}' is on "
                             f"{first}; FusedEMA needs the model on one device")
    return first


class Binding:
    """The plans of one EMA over one model's current tensors.

    Args:
        names, kinds: the tracked tensors (``selection.Selection``), in model order.
        srcs: the model's tensor for each name.
        emas: ``emas[k][i]``: the k-th EMA's tensor for ``names[i]``.
        ema_device: where the EMA lives (another device than the model's: each update
            stages the model's tensors there first).
        watched: ``(dict, key, object)`` for each object whose replacement in its dict
            means the model changed (tracked tensors, submodules).
    """

    def __init__(self, names: Sequence[str], kinds: Sequence[str],
                 srcs: Sequence[torch.Tensor], emas: Sequence[Sequence[torch.Tensor]],
                 ema_device: torch.device, capturable: bool,
                 watched: Sequence[Tuple[dict, str, object]] = ()):
        num_decays = len(emas)
        src_device = model_device(names, kinds, srcs)
        cross = src_device != ema_device
        if cross and capturable:
            raise ValueError(f"fused_ema: capturable=True needs the model and the EMA on one "
                             f"device; the model is on {src_device}, the EMA on {ema_device}")
        pin = cross and ema_device.type == "cpu" and src_device.type == "cuda"
        # Layout: an EMA tensor takes its model tensor's strides (e.g. channels_last), so
        # both are read as 1-D views in the same memory order.
        plan_srcs, views = [], []
        with torch.no_grad():
            for i, (n, t, kind) in enumerate(zip(names, srcs, kinds)):
                if kind == "other":
                    plan_srcs.append(t)
                    continue
                if not (t.is_contiguous() or is_dense(t)):
                    raise ValueError(f"fused_ema: '{n}' is neither contiguous nor dense "
                                     f"(strides {t.stride()}); make it contiguous")
                for k in range(num_decays):
                    e = emas[k][i]
                    if e.stride() != t.stride() and t.numel() > 1:
                        new = torch.empty_strided(t.shape, t.stride(), dtype=e.dtype,
                                                  device=e.device)
                        new.copy_(e)
                        e.data = new
                if cross:
                    s = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype,
                                            device=ema_device, pin_memory=pin)
                    plan_srcs.append(s)
                    views.append(t)  # the plan sees the staging copy only
                else:
                    plan_srcs.append(t)
                    if not t.is_contiguous():
                        views.append(t)
                for k in range(num_decays):
                    if not emas[k][i].is_contiguous():
                        views.append(emas[k][i])
        # Plans first: if one fails (a tensor the engine refuses), nothing of the old
        # binding has been replaced yet.
        groups = []
        for kind in ("average", "copy"):
            idx = [i for i, k in enumerate(kinds) if k == kind]
            if not idx:
                continue
            # DTensors (FSDP2): the engine updates the local shards
            ps = [flat(distributed.local(plan_srcs[i])) for i in idx]
            es = [[flat(distributed.local(emas[k][i])) for i in idx] for k in range(num_decays)]
            try:
                plan = EMAPlan.multi(es, ps)
            except (ValueError, TypeError, RuntimeError) as exc:
                raise type(exc)(name_indices(str(exc), [names[i] for i in idx])) from None
            groups.append((kind, plan, ps, es))
        self.groups = groups
        # (kind, the fastest call taking host float decays) for each group
        self._calls = [(kind, _float_call(plan)) for kind, plan, _, _ in groups]
        self.names = list(names)
        self.srcs = list(srcs)
        self.emas = [list(e) for e in emas]
        self.cross = cross
        self.ema_device = ema_device
        self.num_decays = num_decays
        self._pin_sync = pin
        self._staging = [(s, t) for s, t, kind in zip(plan_srcs, srcs, kinds)
                         if cross and kind != "other"]
        self._others = self._group_others(kinds, srcs, emas, views)
        self.zeros = [0.0] * num_decays
        self.zeros_t = (torch.zeros(num_decays, dtype=torch.float64, device=ema_device)
                        if capturable else None)
        watched = list(watched)
        self._watch = identity_watch([d for d, _, _ in watched], [k for _, k, _ in watched],
                                     [o for _, _, o in watched], views)
        self._dtensor_views = distributed.watch(srcs)  # a shard re-homed by FSDP
        self._keys = self.plan_keys()

    def _group_others(self, kinds, srcs, emas, views):
        """Non-float tensors (integer counters such as BatchNorm's num_batches_tracked) are
        copied with one ``torch.cat`` per dtype: their EMA copies are re-homed as views of
        one flat tensor per dtype (``.data`` is set, so the tensor objects stay the same)."""
        groups: Dict[Tuple[torch.dtype, torch.device], List[int]] = {}
        for i, kind in enumerate(kinds):
            if kind == "other":
                groups.setdefault((srcs[i].dtype, srcs[i].device), []).append(i)
        out = []
        with torch.no_grad():
            for (dtype, _), idx in groups.items():
                total = sum(srcs[i].numel() for i in idx)
                flats = []
                for k in range(len(emas)):
                    buf = torch.empty(total, dtype=dtype, device=self.ema_device)
                    off = 0
                    for i in idx:
                        e, n = emas[k][i], srcs[i].numel()
                        view = buf[off:off + n].view(e.shape)
                        view.copy_(e)
                        e.data = view
                        views.append(e)
                        off += n
                    flats.append(buf)
                for i in idx:
                    views.append(srcs[i])
                contiguous = all(srcs[i].is_contiguous() for i in idx)
                srcs_or_views = ([srcs[i].reshape(-1) for i in idx] if contiguous
                                 else [srcs[i] for i in idx])
                out.append((srcs_or_views, contiguous, flats))
        return out

    # ------------------------------------------------------------------ per step

    def intact(self) -> bool:
        """The model still holds the tensors the plans were built for (what the plans check
        themselves, pointer, shape, dtype, layout of each tensor, is not repeated here)."""
        if not self._watch.intact():
            return False
        for t, ptr in self._dtensor_views:
            if t.data_ptr() != ptr:
                return False
        return True

    def plan_keys(self):
        return [tensor_key(t) for _, _, ps, es in self.groups
                for t in ps + [e for lst in es for e in lst]]

    def stage(self) -> None:
        """Copies the model's tensors to the EMA's device (an EMA kept elsewhere)."""
        with torch.no_grad():
            for s, t in self._staging:
                s.copy_(t, non_blocking=self._pin_sync)
        if self._pin_sync:
            torch.cuda.current_stream(self._staging[0][1].device).synchronize()

    def run(self, decays, skip, start: int = 0) -> None:
        """One update: ``decays`` is a list of host floats (one per EMA) or a tensor of
        them; copy groups get zeros. Raises ``Stale(j)`` when group j found a tensor
        changed (the groups before it are updated)."""
        host = type(decays) is list
        zeros = self.zeros if host else self.zeros_t
        calls = self._calls
        for j in range(start, len(calls)):
            kind, call = calls[j]
            try:
                if host:
                    call(decays if kind == "average" else zeros, None, skip)
                else:
                    self.groups[j][1].update_(decays if kind == "average" else zeros, skip)
            except RuntimeError:
                if self.plan_keys() == self._keys:
                    raise
                raise Stale(j) from None
        if self._others:
            self.copy_others(skip)

    def run_traced(self, decays, skip) -> None:
        """The update as torch ops (dynamo traces them with their fake kernels, not the
        pybind plan)."""
        zeros = self.zeros_t
        for kind, _, ps, es in self.groups:
            functional.multi_ema_update_(es, ps, decays if kind == "average" else zeros,
                                         skip=skip)
        if self._others:
            self.copy_others(skip)

    def copy_others(self, skip) -> None:
        with torch.no_grad():
            for srcs, contiguous, flats in self._others:
                if not contiguous:
                    srcs = [t.reshape(-1) for t in srcs]
                if skip is None and not self.cross:
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


def _float_call(plan: EMAPlan):
    """``call(decays, decay_tensor, skip)``: the bound compiled plan itself when there is
    one (no Python between the caller and C++), else the plan's own ``update_``."""
    bound = getattr(plan, "_plan", None)
    if bound is not None:
        return bound.update_
    return lambda decays, decay_tensor, skip: plan.update_(decays, skip)


class ListRun:
    """An update from a parameter list laid out as the EMA's parameters (``update(params)``)
    rather than from the bound model: through the functional path, whose C++ plan cache
    makes a list given again cheap. ``pairs``: (tensor, EMA tensors per decay, kind)."""
    cross = False

    def __init__(self, pairs, num_decays: int):
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

    def run(self, decays, skip, start: int = 0) -> None:
        host = type(decays) is list
        zeros = self._zeros if host else torch.zeros_like(decays)
        for kind, ps, es in self._groups:
            functional.multi_ema_update_(es, ps, decays if kind == "average" else zeros,
                                         skip=skip)
        with torch.no_grad():
            for t, es in self._others:
                for e in es:
                    e.copy_(t if skip is None else torch.where(skip.reshape(()) != 0, e, t))

    run_traced = run
