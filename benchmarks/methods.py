"""Every method compared, each as a ``Runner`` built from a ``Case`` (``cases.py``).

A method's builder takes a case and returns a ``Runner``: ``step()`` applies one EMA
update (all decays of the case), ``emas`` are the EMA tensors it updates (one list per
decay) so the harness can reset them and check the result. Builders raise
``Unsupported`` for a configuration a method cannot do; the table then says why.

Each method is written the way its users write it, at its best settings: library
objects own their EMA copy as in real use, plain functions update the case's
shared EMA tensors.
"""
import copy
import math
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch

import fused_ema

try:  # issue 3; the benchmark runs without it
    from fused_ema import FusedEMA
except ImportError:  # pragma: no cover - depends on the checkout
    try:
        from fused_ema.ema import FusedEMA
    except ImportError:
        FusedEMA = None

try:
    import torch_ema
except ImportError:  # pragma: no cover - optional benchmark extra
    torch_ema = None
try:
    import ema_pytorch
except ImportError:  # pragma: no cover - optional benchmark extra
    ema_pytorch = None

from cases import KINDS, Case


class Unsupported(Exception):
    """The method cannot run this case (the message says why)."""


@dataclass
class Runner:
    step: Callable[[], None]
    emas: List[List[torch.Tensor]]
    note: str = ""
    keep: object = None  # objects the step needs alive (library EMA objects, buffers)


@dataclass
class Method:
    key: str
    label: str
    kinds: tuple
    build: Callable[[Case], Runner]
    group: str  # "baseline", "library", "fused"
    reference: bool = False  # a bandwidth reference, not an EMA
    ref_bytes_per_element: int = 0  # a reference's traffic per element of the case
    graph_safe: bool = True  # False: the update syncs with the host, no CUDA graph capture
    writes: bool = True  # False: times an update's host work only, with nothing written
    # Unless named in --methods, not run on cases with more tensors than this (why: limited)
    max_tensors: Optional[int] = None
    limited: str = ""

    def bytes_per_update(self, case: Case) -> int:
        if self.reference:
            return ref_numel(case) * self.ref_bytes_per_element
        return case.bytes_per_update if self.writes else 0


# --------------------------------------------------------------------------------------
# Bandwidth references: the same element count and bytes, one flat in-place pass.

REF_CAP = 1 << 28  # 268M elements (1 GiB in fp32): far beyond any cache, and --large fits


def ref_numel(case: Case) -> int:
    """Elements of a reference's flat buffers: the case's, up to ``REF_CAP`` (GB/s does
    not depend on the size once it is far beyond the caches)."""
    return min(case.numel, REF_CAP)


def _capped(case: Case, n: int) -> str:
    return "" if n >= case.numel else f"{n / 1e6:.0f}M elements: compare GB/s"


def _flat_add(ema_dtype, param_dtype):
    def build(case: Case) -> Runner:
        # Values do not change the speed of an add (no denormals): constant fills are
        # quicker to make than random ones.
        n = ref_numel(case)
        a = torch.full((n,), 0.5, dtype=ema_dtype, device=case.device)
        b = torch.full((n,), 1e-3, dtype=param_dtype, device=case.device)

        def step():
            a.add_(b)
        return Runner(step, [], keep=(a, b), note=_capped(case, n))
    return build


def _tensor_add(case: Case) -> Runner:
    """``ema.add_(param)`` over the EMA's own tensors (one add_ per tensor): the same memory
    and per-tensor layout as the update, with ATen's add kernel. Not the reference of the
    targets (that is the flat one); it tells a kernel's cost from the layout's."""
    emas, params = case.emas[0], case.params

    def step():
        with torch.no_grad():
            torch._foreach_add_(emas, params)
    return Runner(step, [])


def _flat_copy(case: Case) -> Runner:
    # Moves 12 bytes per element (read + write), like an fp32 EMA update.
    n = ref_numel(case) * 3 // 2
    a = torch.empty(n, device=case.device)
    b = torch.full((n,), 0.5, device=case.device)

    def step():
        a.copy_(b)
    return Runner(step, [], keep=(a, b), note=_capped(case, ref_numel(case)))


# --------------------------------------------------------------------------------------
# Baselines written inline by users.

def _one_decay(case: Case) -> float:
    if case.num_decays != 1:
        raise Unsupported("one decay per update")
    return case.decays[0]


def naive_mul_add(case: Case) -> Runner:
    d = _one_decay(case)
    emas, params = case.emas[0], case.params

    def step():
        with torch.no_grad():
            for e, p in zip(emas, params):
                e.mul_(d).add_(p, alpha=1 - d)
    return Runner(step, case.emas)


def naive_lerp(case: Case) -> Runner:
    d = _one_decay(case)
    emas, params = case.emas[0], case.params
    if case.param_dtype == case.ema_dtype:
        def step():
            with torch.no_grad():
                for e, p in zip(emas, params):
                    e.lerp_(p, 1 - d)
        return Runner(step, case.emas)

    def step():  # lerp_ needs equal dtypes: cast each param
        with torch.no_grad():
            for e, p in zip(emas, params):
                e.lerp_(p.to(e.dtype), 1 - d)
    return Runner(step, case.emas, note="cast per tensor")


def _by_dtype(emas, params):
    groups: Dict[tuple, tuple] = {}
    for e, p in zip(emas, params):
        groups.setdefault((e.dtype, p.dtype), ([], []))
        groups[(e.dtype, p.dtype)][0].append(e)
        groups[(e.dtype, p.dtype)][1].append(p)
    return list(groups.values())


def foreach_mul_add(case: Case) -> Runner:
    """NeMo's EMA: ``_foreach_mul_`` then ``_foreach_add_``."""
    d = _one_decay(case)
    groups = _by_dtype(case.emas[0], case.params)

    def step():
        with torch.no_grad():
            for emas, params in groups:
                torch._foreach_mul_(emas, d)
                torch._foreach_add_(emas, params, alpha=1 - d)
    return Runner(step, case.emas)


def foreach_lerp(case: Case) -> Runner:
    """timm ModelEmaV3 / swa_utils.get_ema_multi_avg_fn: ``_foreach_lerp_`` per dtype group;
    with bf16 params a fresh fp32 copy of the params first (lerp needs equal dtypes)."""
    d = _one_decay(case)
    groups = _by_dtype(case.emas[0], case.params)
    if case.param_dtype == case.ema_dtype:
        def step():
            with torch.no_grad():
                for emas, params in groups:
                    torch._foreach_lerp_(emas, params, 1 - d)
        return Runner(step, case.emas)

    def step():
        with torch.no_grad():
            for emas, params in groups:
                torch._foreach_lerp_(emas, [p.to(e.dtype) for e, p in zip(emas, params)], 1 - d)
    return Runner(step, case.emas, note="fresh .float()")


def _foreach_lerp_groups(groups, weight):
    for emas, params in groups:
        torch._foreach_lerp_(emas, params, weight)


def compiled_foreach_lerp(case: Case) -> Runner:
    """``torch.compile`` (default mode) of the per-dtype-group ``_foreach_lerp_`` above: what a
    user tries first to make timm's update fast. Compiled and warmed up here, so the compile
    is not timed; a further call must not compile again (``fail_on_recompile``)."""
    d = _one_decay(case)
    groups = _by_dtype(case.emas[0], case.params)
    # A fresh cache: graphs of earlier cases would count against dynamo's recompile limit
    # (past it, the function silently runs eagerly).
    torch.compiler.reset()
    lerp = torch.compile(_foreach_lerp_groups)

    def step():
        with torch.no_grad():
            lerp(groups, 1 - d)
    t = time.perf_counter()
    step()
    compile_s = time.perf_counter() - t
    with torch.compiler.set_stance("fail_on_recompile"):
        step()
    return Runner(step, case.emas, keep=lerp, note=f"compiled in {compile_s:.0f} s")


def foreach_lerp_buffer(case: Case) -> Runner:
    """bf16 params: ``_foreach_copy_`` into a preallocated fp32 buffer, then ``_foreach_lerp_``."""
    d = _one_decay(case)
    if case.param_dtype == case.ema_dtype:
        raise Unsupported("only for params in another dtype than the EMA")
    bufs = [torch.empty_like(e) for e in case.emas[0]]
    emas, params = case.emas[0], case.params

    def step():
        with torch.no_grad():
            torch._foreach_copy_(bufs, params)
            torch._foreach_lerp_(emas, bufs, 1 - d)
    return Runner(step, case.emas, note="prealloc buffer", keep=bufs)


def foreach_lerp_x2(case: Case) -> Runner:
    if case.num_decays != 2:
        raise Unsupported("two-decay case only")
    (ema_a, ema_b), params, (da, db) = case.emas, case.params, case.decays

    def step():
        with torch.no_grad():
            torch._foreach_lerp_(ema_a, params, 1 - da)
            torch._foreach_lerp_(ema_b, params, 1 - db)
    return Runner(step, case.emas)


# --------------------------------------------------------------------------------------
# Libraries, at their best settings.

def averaged_model(case: Case) -> Runner:
    """``torch.optim.swa_utils.AveragedModel`` with ``get_ema_multi_avg_fn`` (foreach lerp)."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    d = _one_decay(case)
    avg = AveragedModel(case.module, multi_avg_fn=get_ema_multi_avg_fn(d), use_buffers=False)
    if case.param_dtype != case.ema_dtype:
        avg = avg.to(case.ema_dtype)
    emas = [p.detach() for p in avg.module.parameters()]
    avg.update_parameters(case.module)  # the first call copies the weights
    try:
        avg.update_parameters(case.module)
    except RuntimeError as exc:
        raise Unsupported(f"AveragedModel fails with an fp32 EMA of bf16 params: "
                          f"{str(exc).splitlines()[0]}") from None
    module = case.module

    def step():
        avg.update_parameters(module)
    return Runner(step, [emas], keep=avg)


def torch_ema_(case: Case) -> Runner:
    """torch_ema 0.3 ``ExponentialMovingAverage(params, decay, use_num_updates=False)``."""
    if torch_ema is None:
        raise Unsupported("torch_ema not installed (pip install -e '.[bench]')")
    d = _one_decay(case)
    if case.param_dtype != case.ema_dtype:
        raise Unsupported("keeps its EMA in the params' dtype (no fp32 EMA of bf16 params)")
    ema = torch_ema.ExponentialMovingAverage(case.params, decay=d, use_num_updates=False)

    def step():
        ema.update()
    return Runner(step, [ema.shadow_params], keep=ema)


def ema_pytorch_(case: Case) -> Runner:
    """ema-pytorch 0.8.3 ``EMA(use_foreach=True, update_every=1, update_after_step=0)``,
    ``min_value=beta`` so every update uses ``beta`` (no warm-up); bf16 params: an fp32
    ``ema_model`` with ``coerce_dtype=True``."""
    if ema_pytorch is None:
        raise Unsupported("ema-pytorch not installed (pip install -e '.[bench]')")
    d = _one_decay(case)
    ema_model = None
    if case.param_dtype != case.ema_dtype:
        ema_model = copy.deepcopy(case.module).to(case.ema_dtype)
    ema = ema_pytorch.EMA(case.module, ema_model=ema_model, beta=d, update_after_step=0,
                          update_every=1, min_value=d, use_foreach=True,
                          include_online_model=False,
                          coerce_dtype=case.param_dtype != case.ema_dtype)
    ema.update()  # the first call copies the weights
    emas = [p.detach() for p in ema.ema_model.parameters()]

    def step():
        ema.update()
    return Runner(step, [emas], keep=ema)


# --------------------------------------------------------------------------------------
# fused_ema.

def fused_ema_update(case: Case) -> Runner:
    d = _one_decay(case)
    emas, params = case.emas[0], case.params

    def step():
        fused_ema.ema_update_(emas, params, d)
    return Runner(step, case.emas)


def fused_plan(case: Case) -> Runner:
    d = _one_decay(case)
    plan = fused_ema.EMAPlan(case.emas[0], case.params)

    def step():
        plan.update_(d)
    return Runner(step, case.emas, keep=plan)


def fused_plan_flat(case: Case) -> Runner:
    """``EMAPlan.update_`` over copies of the case's tensors that are views of one flat param
    buffer and one flat EMA buffer: the memory layout of the flat bandwidth reference. The
    gap from the reference to this row is what the per-tensor work costs (the check that
    no tensor was replaced, one row per tensor); from this row to ``EMAPlan.update_`` on the
    case's own tensors is what separately allocated tensors cost the memory system."""
    d = _one_decay(case)
    flat_params = torch.empty(case.numel, dtype=case.param_dtype, device=case.device)
    flat_emas = torch.empty(case.numel, dtype=case.ema_dtype, device=case.device)
    params, emas, pos = [], [], 0
    with torch.no_grad():
        for p in case.params:
            n = p.numel()
            params.append(flat_params[pos:pos + n].view(p.shape).copy_(p))
            emas.append(flat_emas[pos:pos + n].view(p.shape))
            pos += n
    plan = fused_ema.EMAPlan(emas, params)

    def step():
        plan.update_(d)
    return Runner(step, [emas], keep=(plan, flat_params, flat_emas))


def fused_plan_skip(case: Case) -> Runner:
    """``EMAPlan.update_(decay, skip=<a set flag>)``: an update's host work (the check that
    no tensor was replaced or resized, reading the flag) with nothing written. On tensors
    with elements this is what a GPU user pays per step before the launch: the empty
    tensors of the host-cost case do not need their storage read."""
    d = _one_decay(case)
    plan = fused_ema.EMAPlan(case.emas[0], case.params)
    skip = torch.ones((), dtype=torch.bool, device=case.device)

    def step():
        plan.update_(d, skip=skip)
    return Runner(step, case.emas, keep=(plan, skip))


def _fused_ema_class(case: Case) -> Runner:
    if FusedEMA is None:
        raise Unsupported("fused_ema.FusedEMA not available in this checkout")
    if case.num_decays == 1:
        ema = FusedEMA(case.module, decay=case.decays[0])
        modules = [ema.module]
    else:
        ema = FusedEMA(case.module, decays=tuple(case.decays))
        modules = list(ema.modules)
    emas = [[p.detach() for p in m.parameters()] for m in modules]
    if any(e.dtype != case.ema_dtype for row in emas for e in row):
        raise Unsupported(f"EMA dtype {emas[0][0].dtype}, expected {case.ema_dtype}")

    def step():
        ema.update()
    return Runner(step, emas, keep=ema)


def fused_ema_update_x2(case: Case) -> Runner:
    if case.num_decays != 2:
        raise Unsupported("two-decay case only")
    (ema_a, ema_b), params, (da, db) = case.emas, case.params, case.decays

    def step():
        fused_ema.ema_update_(ema_a, params, da)
        fused_ema.ema_update_(ema_b, params, db)
    return Runner(step, case.emas)


def fused_plan_x2(case: Case) -> Runner:
    if case.num_decays != 2:
        raise Unsupported("two-decay case only")
    plan_a = fused_ema.EMAPlan(case.emas[0], case.params)
    plan_b = fused_ema.EMAPlan(case.emas[1], case.params)
    da, db = case.decays

    def step():
        plan_a.update_(da)
        plan_b.update_(db)
    return Runner(step, case.emas, keep=(plan_a, plan_b))


def fused_multi(case: Case) -> Runner:
    if case.num_decays != 2:
        raise Unsupported("two-decay case only")
    emas, params, decays = case.emas, case.params, list(case.decays)

    def step():
        fused_ema.multi_ema_update_(emas, params, decays)
    return Runner(step, case.emas)


def fused_plan_multi(case: Case) -> Runner:
    if case.num_decays != 2:
        raise Unsupported("two-decay case only")
    plan = fused_ema.EMAPlan.multi(case.emas, case.params)
    decays = list(case.decays)

    def step():
        plan.update_(decays)
    return Runner(step, case.emas, keep=plan)


METHODS: List[Method] = [
    Method("bw_add", "bandwidth ref: flat fp32 a.add_(b)", KINDS,
           lambda c: _flat_add(torch.float32, torch.float32)(c), "reference", reference=True,
           ref_bytes_per_element=12),
    Method("bw_add_mixed", "bandwidth ref: flat fp32 a.add_(bf16 b)", ("bf16",),
           lambda c: _flat_add(torch.float32, torch.bfloat16)(c), "reference", reference=True,
           ref_bytes_per_element=10),
    Method("bw_add_tensors", "bandwidth ref: a.add_(b) on the EMA's tensors", ("fp32",),
           _tensor_add, "reference", reference=True, ref_bytes_per_element=12),
    Method("bw_copy", "bandwidth ref: flat D2D copy_", (),  # added on CUDA only
           _flat_copy, "reference", reference=True, ref_bytes_per_element=12),
    Method("naive_mul_add", "naive loop: mul_ + add_", ("fp32", "bf16"), naive_mul_add, "baseline"),
    Method("naive_lerp", "naive loop: lerp_", ("fp32", "bf16"), naive_lerp, "baseline"),
    Method("foreach_mul_add", "_foreach_mul_ + _foreach_add_ (NeMo)", ("fp32", "bf16"),
           foreach_mul_add, "baseline"),
    Method("foreach_lerp", "_foreach_lerp_ by dtype (timm)", ("fp32", "bf16"), foreach_lerp,
           "baseline"),
    Method("compiled_foreach_lerp", "torch.compile(_foreach_lerp_ by dtype)", ("fp32",),
           compiled_foreach_lerp, "baseline", max_tensors=1000,
           limited="compiling for thousands of tensors takes minutes"),
    Method("foreach_lerp_buf", "_foreach_copy_ to buf + _foreach_lerp_", ("bf16",),
           foreach_lerp_buffer, "baseline"),
    Method("foreach_lerp_x2", "2 x _foreach_lerp_", ("fp32x2",), foreach_lerp_x2, "baseline"),
    Method("averaged_model", "swa_utils.AveragedModel (EMA fn)", ("fp32", "bf16"),
           averaged_model, "library", graph_safe=False),
    Method("torch_ema", "torch_ema 0.3", ("fp32", "bf16"), torch_ema_, "library"),
    Method("ema_pytorch", "ema-pytorch 0.8.3 (foreach)", ("fp32", "bf16"), ema_pytorch_,
           "library", graph_safe=False),
    Method("ema_update", "fused_ema.ema_update_", ("fp32", "bf16"), fused_ema_update, "fused"),
    Method("plan", "fused_ema.EMAPlan.update_", ("fp32", "bf16"), fused_plan, "fused"),
    Method("plan_flat", "fused_ema.EMAPlan.update_ [views of one flat buffer]", ("fp32",),
           fused_plan_flat, "fused"),
    Method("plan_skip", "fused_ema.EMAPlan.update_ [skip=True: host work only]", ("fp32",),
           fused_plan_skip, "fused", writes=False),
    Method("fused_ema", "fused_ema.FusedEMA.update", KINDS, _fused_ema_class, "fused"),
    Method("ema_update_x2", "2 x fused_ema.ema_update_", ("fp32x2",), fused_ema_update_x2,
           "fused"),
    Method("plan_x2", "2 x EMAPlan.update_", ("fp32x2",), fused_plan_x2, "fused"),
    Method("multi_ema_update", "fused_ema.multi_ema_update_ (1 pass)", ("fp32x2",), fused_multi,
           "fused"),
    Method("plan_multi", "EMAPlan.multi(...).update_ (1 pass)", ("fp32x2",), fused_plan_multi,
           "fused"),
]
METHOD_BY_KEY = {m.key: m for m in METHODS}
EMA_METHOD_KEYS = [m.key for m in METHODS if not m.reference]


def methods_for(kind: str, device: str, keys: Optional[Sequence[str]] = None) -> List[Method]:
    """The methods run for a case: the references always, then the selected EMA methods."""
    out = []
    for m in METHODS:
        if m.reference:
            if kind in m.kinds or (m.key == "bw_copy" and device == "cuda"):
                out.append(m)
        elif kind in m.kinds and (keys is None or m.key in keys):
            out.append(m)
    return out


def gbps(bytes_moved: float, seconds: float) -> float:
    return bytes_moved / seconds / 1e9 if seconds and math.isfinite(seconds) else float("nan")
