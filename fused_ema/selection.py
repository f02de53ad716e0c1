"""What happens to each tensor of a model: a pure function from the model and the options
to a plain description (names and roles), read by everything else.

Roles:
    ``average``   a floating tensor the update averages;
    ``copy``      a floating tensor the update copies (frozen parameters, buffers by default,
                  names matched by ``copy=``);
    ``other``     a non-floating tensor (e.g. ``num_batches_tracked``), copied;
    ``shared``    a frozen parameter (``requires_grad=False``) with ``frozen="share"``: the
                  EMA holds the model's own tensor, never updated, not in the checkpoint;
    ``excluded``  matched by ``exclude=``: never updated;
    ``ignored``   a buffer with ``buffers="ignore"``: kept as built.
"""
import re
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .validation import FLOAT_DTYPES

TRACKED = ("average", "copy", "other")


@dataclass(frozen=True)
class Source:
    """One parameter or buffer of the model: where it lives (``container[key]``, the dict
    of its module; None for a bare list) and whether it is a parameter."""
    name: str
    tensor: torch.Tensor
    container: Optional[dict]
    key: Optional[str]
    is_param: bool


@dataclass
class Selection:
    """The roles of a model's tensors: ``names``/``kinds`` in model order for the tracked
    ones (average, copy, other), the sorted names of ``excluded`` ones, the ``shared``
    ones in model order, and the role of every name."""
    names: List[str]
    kinds: List[str]
    excluded: List[str]
    roles: Dict[str, str] = field(default_factory=dict)
    shared: List[str] = field(default_factory=list)


def unwrap(model: nn.Module) -> nn.Module:
    """The module under DDP / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and isinstance(
                getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def normalize(name: str) -> str:
    """Drops the ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) wrapper prefixes."""
    parts = name.split(".")
    i = 0
    while i < len(parts) - 1 and parts[i] in ("module", "_orig_mod"):
        i += 1
    return ".".join(p for p in parts[i:] if p != "_orig_mod")


def walk(module: nn.Module) -> List[Source]:
    """Each parameter and buffer once (tied tensors under their first name), with the
    wrapper prefixes removed from the names when that keeps them unique."""
    out, seen = [], set()
    for mod_name, mod in module.named_modules():
        prefix = mod_name + "." if mod_name else ""
        for is_param, container in ((True, mod._parameters), (False, mod._buffers)):
            for key, t in container.items():
                if t is None or id(t) in seen:
                    continue
                seen.add(id(t))
                out.append(Source(prefix + key, t, container, key, is_param))
    names = [normalize(s.name) for s in out]
    if len(set(names)) == len(names):
        out = [Source(n, s.tensor, s.container, s.key, s.is_param) for n, s in zip(names, out)]
    return out


def from_list(items: Sequence[Any]) -> List[Source]:
    """Sources for an iterable of tensors or of ``(name, tensor)`` pairs."""
    out = []
    for i, item in enumerate(items):
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            name, t = item
        else:
            name, t = str(i), item
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"fused_ema: item {i} of the parameter list is "
                            f"{type(t).__name__}, not a tensor")
        out.append(Source(name, t, None, None, True))
    if len({s.name for s in out}) != len(out):
        raise ValueError("fused_ema: the (name, tensor) pairs have repeated names")
    return out


def pattern_list(patterns) -> Optional[list]:
    """``exclude=`` / ``copy=`` as a list (one pattern, or an iterable read once), or None."""
    if patterns is None:
        return None
    if isinstance(patterns, (str, re.Pattern)):
        return [patterns]
    return list(patterns)


def compile_patterns(patterns, what: str = "exclude") -> List[Tuple[Any, Callable[[str], bool]]]:
    """(pattern as given, name -> bool) for names, globs, module prefixes and re.Patterns."""
    if patterns is None:
        return []
    if isinstance(patterns, (str, re.Pattern)):
        patterns = [patterns]
    out = []
    for pat in patterns:
        if isinstance(pat, re.Pattern):
            out.append((pat.pattern, lambda n, p=pat: p.search(n) is not None))
        elif isinstance(pat, str):
            norm = normalize(pat)
            out.append((pat, lambda n, p=norm: n == p or n.startswith(p + ".")
                        or fnmatchcase(n, p)))
        else:
            raise TypeError(f"fused_ema: {what} takes names, glob patterns or re.Pattern "
                            f"objects, got {type(pat).__name__}")
    return out


def is_frozen(t: torch.Tensor) -> bool:
    """A parameter the optimizer does not train (what ``frozen=`` is about)."""
    return isinstance(t, nn.Parameter) and not t.requires_grad


def select(sources: Sequence[Source], *, buffers: str = "copy", exclude=None,
           copy=None, frozen: str) -> Selection:
    """The role of each source (see the module docstring); raises for a model with nothing
    to average, a parameter of an unsupported dtype or a pattern that matches nothing.
    ``frozen``: what frozen parameters become: ``"share"``, ``"copy"`` or ``"average"``
    (``exclude=`` and ``copy=`` patterns come first)."""
    excl = compile_patterns(exclude, "exclude")
    copies = compile_patterns(copy, "copy")
    used = set()
    names, kinds, excluded, roles, shared = [], [], [], {}, []
    for s in sources:
        t, name = s.tensor, s.name
        hit = [p for p, match in excl if match(name)]
        used.update(("exclude", p) for p in hit)
        if hit:
            excluded.append(name)
            roles[name] = "excluded"
            continue
        if not s.is_param and buffers == "ignore":
            roles[name] = "ignored"
            continue
        forced = [p for p, match in copies if match(name)]
        used.update(("copy", p) for p in forced)
        if s.is_param and frozen == "share" and not forced and is_frozen(t):
            shared.append(name)  # whatever its dtype: the EMA never reads it
            roles[name] = "shared"
            continue
        if t.dtype in FLOAT_DTYPES:
            if forced:
                kind = "copy"
            elif s.is_param:
                kind = "copy" if frozen == "copy" and is_frozen(t) else "average"
            else:
                kind = "average" if buffers == "average" else "copy"
        elif s.is_param and (t.is_floating_point() or t.is_complex()):
            raise TypeError(
                f"fused_ema: parameter '{name}' has dtype {t.dtype}; fused_ema averages "
                "float32/float16/bfloat16/float64 tensors; leave it out with exclude=")
        else:
            kind = "other"
        names.append(name)
        kinds.append(kind)
        roles[name] = kind
    for what, pats in (("exclude", excl), ("copy", copies)):
        unused = [p for p, _ in pats if (what, p) not in used]
        if unused:
            raise ValueError(f"fused_ema: {what} pattern(s) {unused} match no parameter or "
                             "buffer of the model")
    param_names = {s.name for s in sources if s.is_param}
    if not any(s.tensor.dtype in FLOAT_DTYPES for s in sources if s.is_param):
        raise ValueError("fused_ema: the model has no floating-point parameters; "
                         "there is nothing to average")
    if not shared and not any(n in param_names and k != "other" for n, k in zip(names, kinds)):
        raise ValueError(f"fused_ema: every floating-point parameter is excluded "
                         f"(exclude={[p for p, _ in excl]}); an update would touch no "
                         "parameter")
    return Selection(names, kinds, sorted(excluded), roles, shared)
