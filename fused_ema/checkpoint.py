"""``FusedEMA`` checkpoints: ``state_dict`` and ``load_state_dict``, kept apart from the
update so the format can be read (and changed) in one place.

A state dict is ``{"format", "step", "emas", "settings"}``: ``emas`` holds one dict per
decay (the EMA module's ``state_dict``, or name -> tensor for a list of tensors) in the
EMA's own dtype; ``settings`` are plain values (schedules as their ``settings()``).
Loading checks everything first and writes nothing when a check fails.
"""
import warnings
from typing import Any, Dict, List, Optional

import torch

from . import distributed, schedules as _schedules
from .schedules import Schedule
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
    }
    if ema._copy_patterns:  # only when given: older checkpoints keep loading
        out["copy"] = list(ema._copy_patterns)
    return out


def state_dict(ema) -> Dict[str, Any]:
    if ema.modules is not None:
        emas = [m.state_dict() for m in ema.modules]
    else:
        emas = [dict(zip(ema._known_order, e)) for e in ema._bare_emas]
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
    saved, ours = state_dict.get("settings", {}), settings(ema)
    differ = [k for k, v in ours.items() if saved.get(k) != v]
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
    writes = _planned_writes(emas, state_dict_of_targets(ema))
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


def _planned_writes(emas, targets) -> List[tuple]:
    writes = []
    for sd, tgt in zip(emas, targets):
        sd = {normalize(n): v for n, v in sd.items()}
        tgt = {normalize(n): v for n, v in tgt.items()}
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
            writes.append((t, distributed.like(t, v)))  # a full tensor into a shard
    return writes
