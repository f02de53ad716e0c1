"""The benchmark cases: one parameter set (``models.py``) on one device in one
configuration, with the shared EMA lists every plain-function method updates, their
starting values (regenerated, never stored) and the closed-form EMA to check against.

* ``fp32``: fp32 params, fp32 EMA, one decay;
* ``bf16``: bf16 params, fp32 EMA, one decay (the mixed-precision training case);
* ``fp32x2``: fp32 params, two fp32 EMAs with two decays (e.g. eval EMA + teacher).
"""
from dataclasses import dataclass, field
from typing import List, Sequence

import torch
from torch import nn

from models import spec

KINDS = ("fp32", "bf16", "fp32x2")
KIND_LABELS = {
    "fp32": "fp32 params, fp32 EMA",
    "bf16": "bf16 params, fp32 EMA",
    "fp32x2": "fp32, two decays",
}


class ParamsModule(nn.Module):
    """Holds a parameter list so module-based EMA libraries can wrap it."""

    def __init__(self, tensors: Sequence[torch.Tensor]):
        super().__init__()
        self.p = nn.ParameterList([nn.Parameter(t) for t in tensors])


@dataclass
class Case:
    model: str
    kind: str
    device: torch.device
    decays: tuple
    names: List[str]
    module: ParamsModule
    params: List[torch.Tensor]
    emas: List[List[torch.Tensor]]  # shared EMA lists, one per decay
    fillers: list  # fillers[k](i, out) writes EMA list k's starting value of tensor i into out
    ref: List[List[torch.Tensor]] = field(default_factory=list)  # expected after CHECK_STEPS
    numel: int = 0

    @property
    def param_dtype(self) -> torch.dtype:
        return self.params[0].dtype

    @property
    def ema_dtype(self) -> torch.dtype:
        return self.emas[0][0].dtype

    @property
    def num_decays(self) -> int:
        return len(self.decays)

    @property
    def bytes_per_update(self) -> int:
        """The least traffic the job needs: read each param once, read and write each EMA."""
        p, e = self.param_dtype.itemsize, self.ema_dtype.itemsize
        return self.numel * (p + 2 * e * self.num_decays)

    def start(self, k: int, i: int) -> torch.Tensor:
        """EMA list k's starting value for tensor i (fp32, regenerated: nothing is stored)."""
        return self.fillers[k](i, torch.empty(self.params[i].shape, device=self.device))

    @torch.no_grad()
    def reset(self, ema_lists: Sequence[Sequence[torch.Tensor]]) -> None:
        """Writes the starting values into ``ema_lists`` (one list per decay)."""
        for k, emas in enumerate(ema_lists):
            for i, e in enumerate(emas):
                if e.dtype == torch.float32 and e.is_contiguous():
                    self.fillers[k](i, e.detach())
                else:
                    e.detach().copy_(self.start(k, i))

    @torch.no_grad()
    def expected(self, steps: int) -> List[List[torch.Tensor]]:
        """The EMA after ``steps`` updates from ``start``, in closed form:
        ``p + d**steps * (e0 - p)``, with ``d**steps`` in float64 and one fp32 lerp per
        tensor (error about 1e-7, far below the check's tolerance). The iterative float64
        loop is in tests/test_benchmarks.py."""
        out = []
        for k, d in enumerate(self.decays):
            w = float(d) ** steps
            out.append([torch.lerp(p.detach().float(), self.start(k, i), w)
                         for i, p in enumerate(self.params)])
        return out


CHECK_STEPS = 2
_TILE = 1_000_003  # a prime: tiled values never line up with chunk or vector boundaries


def _filler(device, seed: int):
    """Fills tensors with N(0, 1) values tiled from one random block: as good as fresh
    random numbers for timing and checking, and 20x faster to make for 1B elements."""
    gen = torch.Generator().manual_seed(seed)
    block = torch.randn(_TILE, generator=gen).to(device)
    offsets = torch.randint(0, _TILE, (1 << 16,), generator=gen).tolist()

    def fill(i: int, out: torch.Tensor) -> torch.Tensor:
        flat, n = out.view(-1), out.numel()
        pos, src = 0, offsets[i % len(offsets)]
        while pos < n:
            m = min(n - pos, _TILE - src)
            flat[pos:pos + m].copy_(block[src:src + m])
            pos, src = pos + m, 0
        return out
    return fill


def build_case(model: str, kind: str, device: str = "cpu",
               decays: Sequence[float] = (0.999, 0.9999), seed: int = 0,
               with_reference: bool = True) -> Case:
    """Params and EMA starting values drawn from N(0, 1) in the model's shapes; the shared
    EMA lists in fp32 (the EMA dtype of every case)."""
    if kind not in KINDS:
        raise ValueError(f"unknown case kind {kind!r}; choose from {', '.join(KINDS)}")
    device = torch.device(device)
    decays = tuple(decays[:2] if kind == "fp32x2" else decays[:1])
    param_dtype = torch.bfloat16 if kind == "bf16" else torch.float32
    shapes = spec(model)
    fill_param = _filler(device, seed)
    tensors = [fill_param(i, torch.empty(shape, dtype=param_dtype, device=device))
               for i, (_, shape) in enumerate(shapes)]
    module = ParamsModule(tensors)
    params = list(module.parameters())
    fillers = [_filler(device, seed + 1 + k) for k in range(len(decays))]
    emas = [[torch.empty(p.shape, dtype=torch.float32, device=device) for p in params]
            for _ in decays]
    case = Case(model, kind, device, decays, [n for n, _ in shapes], module, params, emas,
                fillers, numel=sum(p.numel() for p in params))
    case.reset(case.emas)
    if with_reference:
        case.ref = case.expected(CHECK_STEPS)
    return case


@torch.no_grad()
def max_error(case: Case, ema_lists: Sequence[Sequence[torch.Tensor]]) -> float:
    """Largest |EMA - expected| over all tensors and decays."""
    worst = [torch.zeros((), device=case.device)]
    largest = max(p.numel() for p in case.params)
    scratch = torch.empty(largest, dtype=case.ema_dtype, device=case.device)
    for got, want in zip(ema_lists, case.ref):
        for g, w in zip(got, want):
            if g.numel():
                diff = scratch[:g.numel()].view(g.shape)
                torch.sub(g.detach().to(w.dtype), w, out=diff)
                worst.append(diff.abs_().max().float())
    return torch.stack(worst).max().item()
