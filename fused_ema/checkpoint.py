"""``FusedEMA`` checkpoints: ``state_dict`` and ``load_state_dict``, kept apart from the
update so the format can be read (and changed) in one place.

A state dict is ``{"format", "step", "emas", "settings"}``: ``emas`` holds one dict per
decay (the EMA module's ``state_dict``, or name -> tensor for a list of tensors) in the
EMA's own dtype, without the frozen parameters it shares with the model
(``frozen="share"``: they are the model's, saved with it); ``settings`` are plain values
(schedules as their ``settings()``). Loading checks everything first and writes nothing
when a check fails.
"""
import warnings
from collections import OrderedDict
from typing import Any, Dict, List

import torch

from . import distributed, schedules as _schedules
from .selection import normalize
from .validation import check_count

FORMAT = "fused_ema.FusedEMA/1"

# Settings a checkpoint may change without changing which tensors exist or their dtypes.
ADOPTABLE = ("decays", "update_after_step", "update_every")


def settings(ema) -> Dict[str, Any]:
    out = {
        "decays": [s.settings() for s in ema._schedules],
        "update_after_step": ema.update_after_step,
        "update_every": ema.update_every,
        "buffers": ema.buffers,
        "ema_dtype": None if ema.ema_dtype is None else str(ema.ema_dtype),
        "exclude": list(ema._selection.excluded),
        "frozen": ema.frozen,
        "rounding": ema.rounding,
        "seed": ema.seed,
    }
    if ema._copy_patterns:  # only when given: older checkpoints keep loading
        out["copy"] = list(ema._copy_patterns)
    return out


def shared_entries(ema, index: int) -> Dict[str, torch.Tensor]:
    """key -> tensor of the ``index``-th EMA's ``state_dict`` entries that are the model's
    own tensors (``frozen="share"``), under every name of a tied one."""
    shared = set(ema._selection.shared)
    if not shared:
        return {}
    held = {n: t for n, t in ema._ema_tensors(index).items() if n in shared}
    if ema.modules is None:
        return held
    ids = {id(t) for t in held.values()}
    return {n: p for n, p in ema.modules[index].named_parameters(remove_duplicate=False)
            if id(p) in ids}


def state_dict(ema) -> Dict[str, Any]:
    emas = []
    for k in range(ema.num_decays):
        skip = shared_entries(ema, k)
        if ema.modules is not None:
            sd = ema.modules[k].state_dict()
            if skip:
                kept = OrderedDict((n, v) for n, v in sd.items() if n not in skip)
                kept._metadata = getattr(sd, "_metadata", None)
                sd = kept
        else:
            sd = {n: e for n, e in zip(ema._known_order, ema._bare_emas[k]) if n not in skip}
        emas.append(sd)
    return {"format": FORMAT, "step": ema.step, "emas": emas, "settings": settings(ema)}


def load_state_dict(ema, state_dict: Dict[str, Any], strict: bool = True) -> None:
    """See ``FusedEMA.load_state_dict``."""
    if not isinstance(state_dict, dict) or state_dict.get("format") != FORMAT:
        raise ValueError("fused_ema: not a FusedEMA state_dict (expected the dict returned "
                         "by FusedEMA.state_dict())")
    missing = [k for k in ("step", "emas") if k not in state_dict]
    if missing:
        raise ValueError(f"fused_ema: the checkpoint has no {' and no '.join(map(repr, missing))}"
                         " entry; it is not a whole FusedEMA.state_dict()")
    # older checkpoints copied the frozen parameters
    # (and rounded to nearest)
    saved = {"frozen": "copy", "rounding": "nearest", "seed": 0,
             **state_dict.get("settings", {})}
    ours = settings(ema)
    differ = [k for k, v in ours.items() if saved.get(k) != v]
    copies = (saved["frozen"], ours["frozen"]) == ("copy", "share")
    if copies:  # the checkpoint's copies of what this EMA shares: checked, not loaded
        differ.remove("frozen")
    adopt = {}
    if not strict:
        for k in [k for k in differ if k in ADOPTABLE]:
            adopt[k] = saved.get(k)
        differ = [k for k in differ if k not in ADOPTABLE]
    if differ:
        raise ValueError("fused_ema: the checkpoint was saved with other settings:\n  "
                         + "\n  ".join(f"{k}: checkpoint has {saved.get(k)!r}, this FusedEMA "
                                       f"has {ours[k]!r}" for k in differ)
                         + ("" if strict else "\n(strict=False adopts only "
                            + ", ".join(ADOPTABLE) + ")"))
    new_schedules = None
    if "decays" in adopt:
        saved_decays = adopt["decays"]
        if not isinstance(saved_decays, list) or len(saved_decays) != ema.num_decays:
            raise ValueError(f"fused_ema: the checkpoint holds {len(saved_decays or [])} "
                             f"decay(s), this FusedEMA {ema.num_decays}")
        new_schedules = [_schedules.from_settings(d) for d in saved_decays]
        if any(s is None for s in new_schedules):
            raise ValueError("fused_ema: the checkpoint's decay is a user callable, which it "
                             "cannot restore; build the FusedEMA with that callable")
    for k in ("update_after_step", "update_every"):
        if k in adopt:
            check_count(f"{k} in the checkpoint", adopt[k], 1 if k == "update_every" else 0)
    step = check_count("step in the checkpoint", state_dict["step"])
    emas = state_dict["emas"]
    if len(emas) != ema.num_decays:
        raise ValueError(f"fused_ema: the checkpoint holds {len(emas)} EMA(s), this "
                         f"FusedEMA {ema.num_decays}")
    writes = _planned_writes(emas, state_dict_of_targets(ema),
                             [shared_entries(ema, k) for k in range(ema.num_decays)], copies,
                             saved["frozen"] == "share")
    # every check passed: write
    with torch.no_grad():
        for t, v in writes:
            t.copy_(v)
    if adopt:
        warnings.warn("fused_ema: load_state_dict(strict=False) adopted the checkpoint's "
                      + ", ".join(f"{k}={adopt[k]!r}" for k in adopt), UserWarning,
                      stacklevel=3)
        if new_schedules is not None:
            ema._schedules = new_schedules
        if "update_after_step" in adopt:
            ema.update_after_step = int(adopt["update_after_step"])
        if "update_every" in adopt:
            ema.update_every = int(adopt["update_every"])
        ema._settings_changed()
    ema._set_step(step)


def state_dict_of_targets(ema) -> List[Dict[str, torch.Tensor]]:
    return state_dict(ema)["emas"]


def _check_shape(name: str, value, target: torch.Tensor) -> None:
    if not isinstance(value, torch.Tensor) or value.shape != target.shape:
        raise ValueError(f"fused_ema: '{name}' has shape "
                         f"{list(getattr(value, 'shape', []))} in the checkpoint, "
                         f"{list(target.shape)} here")


def _planned_writes(emas, targets, shared, copies: bool, saved_shared: bool) -> List[tuple]:
    """(EMA tensor, value) for every entry, all checked first. ``shared``: per EMA, key ->
    tensor it shares with the model; with ``copies`` the checkpoint's copies of those are
    checked for their shape and not loaded (the EMA module holds the model's own).
    ``saved_shared``: the checkpoint left out what its EMA shared (for the message)."""
    writes = []
    for sd, tgt, skip in zip(emas, targets, shared):
        sd = {normalize(n): v for n, v in sd.items()}
        tgt = {normalize(n): v for n, v in tgt.items()}
        skip = {normalize(n): v for n, v in skip.items()}
        for n in [n for n in sd if n in skip and copies]:
            _check_shape(n, sd.pop(n), skip[n])
        missing = [n for n in tgt if n not in sd]
        extra = [n for n in sd if n not in tgt]
        if missing or extra:
            hint = ""
            if any(n in skip for n in extra):
                hint = (f"; {[n for n in extra if n in skip][:5]} are frozen here and shared "
                        "with the model (frozen='share'): unfreeze them and call replan() "
                        "before loading, as they were when the checkpoint was saved")
            elif missing and saved_shared:
                hint = ("; the checkpoint leaves out the frozen parameters its EMA shared with "
                        "the model: if these were frozen then, freeze them and call replan() "
                        "before loading")
            raise ValueError(
                f"fused_ema: the checkpoint is of another model: missing {missing[:5]}, "
                f"unexpected {extra[:5]}{hint}")
        for n, t in tgt.items():
            v = sd[n]
            _check_shape(n, v, t)
            if v.dtype != t.dtype:
                raise ValueError(f"fused_ema: '{n}' is {v.dtype} in the checkpoint but "
                                 f"{t.dtype} here (ema_dtype differs)")
            writes.append((t, distributed.like(t, v)))  # a full tensor into a shard
    return writes
