"""The memory of an EMA (issue 17): accelerator and host bytes per model parameter of
fused_ema's modes and of its peers, for a 1B-parameter model with bf16 weights, in two
layouts: a full fine-tune (every parameter trained) and LoRA (a frozen bf16 base and
trainable bf16 adapters on every projection, about 1% of the parameters).

The 1B model is TinyLlama-1.1B's shapes (``models.llama_1b``; ``models.lora`` adds the
adapters) built on the meta device, so nothing is allocated: each row's bytes come from
a formula stated once below (``Row.formula``), read off the library's code. The same
formulas are checked against the bytes the libraries allocate for a small model of the
same architecture (``SMALL``) on this CPU: what each EMA holds (every tensor reachable
from the EMA object whose storage the model does not own, counted once by storage) and
the peak of what an update allocates and frees (``torch.profiler`` memory events). A row
whose library is not installed here (NeMo) is from its code only, and says so.

On a GPU-less machine the "accelerator" is the CPU standing in for it: an EMA on the
model's device counts as accelerator bytes, an EMA kept in host memory as host bytes
(``FusedEMA(device=...)`` is measured on ``cpu:0``, a device other than the model's
``cpu`` to torch, so the update takes its cross-device path with its staging buffers).

    python benchmarks/bench_memory.py            # the 1B table and the small model's check

Writes bench_memory.md / .json under --out (default runs/ at the repository root, ignored
by git); --update-results writes them to benchmarks/results/. Exits non-zero when a
measured row differs from its formula.
"""
import argparse
import importlib.util
import os
import platform
import sys
import types
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import models  # noqa: E402
from bench_dropins import _timm_model_ema  # noqa: E402
from outputs import add_output_args, write_results  # noqa: E402

from fused_ema import FusedEMA  # noqa: E402

DTYPE = torch.bfloat16  # the model's weights
DECAY = 0.999
LORA_SHARE = 0.01  # adapters' share of the base's parameters
# The small model measured here: the 1B's architecture at a smaller width and depth
# (GQA, SwiGLU, untied head); --quick makes it smaller still.
SMALL = dict(d=256, inter=704, layers=2, vocab=2048, kv=64)
QUICK = dict(d=64, inter=160, layers=1, vocab=256, kv=16)
# An EMA "on another device" when measured here (cpu:0 is not the model's cpu to torch).
OTHER_DEVICE = "cpu:0"

# FusedEMA's rows: the keyword arguments of each, in one place. Issue 17 item 2: the bf16
# row gains rounding="stochastic" (same tensors as ema_dtype=torch.bfloat16 alone: the
# rounding allocates nothing) once that is merged: add it HERE.
FUSED_EMA_KWARGS = {
    "fused_fp32": dict(),
    "fused_bf16": dict(ema_dtype=torch.bfloat16, rounding="stochastic"),
    "fused_copy": dict(frozen="copy"),
    "fused_host": dict(device="cpu", frozen="copy"),  # frozen="share" needs the model's device
    "fused_host_list": dict(device="cpu"),  # of [p for p in model.parameters() if p.requires_grad]
}


# ---------------------------------------------------------------------------- layouts

def layout(name: str, arch: dict):
    """``(name, shape, trainable)`` of each tensor: ``full`` (all trained) or ``lora`` (the
    base frozen, adapters of the rank that makes them closest to LORA_SHARE of the base)."""
    spec = models.llama(**arch)
    if name == "full":
        return [(n, s, True) for n, s in spec]
    return models.lora(spec, lora_rank(spec))


def lora_rank(spec) -> int:
    base = sum(models.numel(s) for _, s in spec)
    per_rank = sum(models.numel(s) for n, s, t in models.lora(spec, 1) if t)
    return max(1, round(LORA_SHARE * base / per_rank))


@dataclass
class Tensors:
    """What a formula reads of a model: numel and bytes per element of each parameter,
    and whether it is trained (``requires_grad``)."""
    numel: List[int]
    itemsize: List[int]
    trainable: List[bool]

    @classmethod
    def of(cls, model: nn.Module) -> "Tensors":
        ps = list(model.parameters())
        return cls([p.numel() for p in ps], [p.element_size() for p in ps],
                   [p.requires_grad for p in ps])

    def count(self, trained_only=False) -> int:
        return sum(n for n, t in zip(self.numel, self.trainable) if t or not trained_only)

    def nbytes(self, per_element: Optional[int] = None, trained_only=False) -> int:
        """Their bytes in their own dtype, or at ``per_element`` bytes each."""
        return sum(n * (per_element or s) for n, s, t in
                   zip(self.numel, self.itemsize, self.trainable) if t or not trained_only)


# ---------------------------------------------------------------------------- the rows

@dataclass
class Bytes:
    """An EMA's bytes: what stays on the accelerator between updates (``acc``), what an
    update allocates there and frees (``acc_update``), what it brings there from the host
    for its duration (``moved``), and what stays in host memory (``host``)."""
    acc: int = 0
    acc_update: int = 0
    moved: int = 0
    host: int = 0


@dataclass
class Row:
    key: str
    label: str
    formula: Callable[[Tensors], Bytes]
    source: str  # where the formula is read from
    build: Optional[Callable] = None  # model -> (the EMA object, one update)
    note: str = ""
    how: str = "measured"  # what the 1B table's row rests on (when the library runs here)
    needs: Optional[str] = None  # the module its library is imported as


def _fused(key):
    def build(model):
        kw = dict(FUSED_EMA_KWARGS[key])
        if kw.get("device") == "cpu":
            kw["device"] = OTHER_DEVICE
        src = ([p for p in model.parameters() if p.requires_grad] if key.endswith("_list")
               else model)
        with warnings.catch_warnings():  # a bf16 EMA at decay 0.999: fused_ema warns
            warnings.simplefilter("ignore")
            ema = FusedEMA(src, decay=DECAY, **kw)
        return ema, ema.update
    return build


def _timm(**kw):
    def build(model):
        m = _timm_model_ema()
        ema = m.ModelEmaV3(model, decay=DECAY, **kw)
        return ema, lambda: ema.update(model, step=10 ** 6)
    return build


def _ema_pytorch(model):
    import ema_pytorch
    ema = ema_pytorch.EMA(model, beta=DECAY, update_after_step=0, update_every=1)
    return ema, ema.update


def _diffusers(model):
    # With --offload_ema, diffusers' training scripts call ema.to(accelerator) before the
    # step and ema.to("cpu") after; on one device there is nothing to move: the same EMA.
    from diffusers.training_utils import EMAModel
    ema = EMAModel(model.parameters(), decay=DECAY)
    ema.optimization_step = 10 ** 6  # past the warmup
    return ema, lambda: ema.step(model.parameters())


def timm_sr_bytes(t: Tensors) -> int:
    """timm ``_lerp_stochastic_round_bf16_`` (timm/utils/model_ema.py): bf16 EMA tensors
    are updated in chunks of at most 2**22 elements (a larger tensor is a chunk of its
    own), each through float32 and int32 temporaries, "~10 bytes / element" (its
    docstring; 10 measured here): the peak is the largest chunk's."""
    chunks, n = [], 0
    for k in t.numel:  # the greedy chunking of _lerp_stochastic_round_bf16_
        if n and n + k > 2 ** 22:
            chunks.append(n)
            n = 0
        n += k
    chunks.append(n)
    return max(chunks) * 10


def cast_bytes(t: Tensors) -> int:
    """``torch._foreach_add_`` of bf16 model tensors into fp32 EMA tensors (timm's update
    for a ``dtype=float32`` EMA of a bf16 model): each model tensor is cast to fp32 first
    (measured here: 4 bytes per element of the largest tensor at the peak)."""
    return 4 * max(t.numel)


def diffusers_step_bytes(t: Tensors) -> int:
    """diffusers ``EMAModel.step`` (foreach=False, the default): per trained parameter
    ``s_param.sub_(one_minus_decay * (s_param - param))``: two temporaries of its size at
    once; the peak is the largest parameter's."""
    return max((2 * n * s for n, s, tr in zip(t.numel, t.itemsize, t.trainable) if tr),
               default=0)


ROWS = [
    Row("fused_fp32", "FusedEMA(model) (fp32 EMA)",
        lambda t: Bytes(acc=t.nbytes(4, trained_only=True)),
        "measured; fused_ema/ema_copy.py copy_module (float32 for 16-bit weights: "
        "options.py), frozen shared (selection.py)", _fused("fused_fp32")),
    Row("fused_bf16", "FusedEMA(model, ema_dtype=bf16, rounding=\"stochastic\")",
        lambda t: Bytes(acc=t.nbytes(2, trained_only=True)),
        "measured; as above, in bf16", _fused("fused_bf16")),
    Row("fused_copy", "FusedEMA(model, frozen=\"copy\")",
        lambda t: Bytes(acc=t.nbytes(4)),
        "measured; ema_copy.py copy_module: frozen tensors copied in fp32", _fused("fused_copy")),
    Row("fused_host", "FusedEMA(model, device=\"cpu\", frozen=\"copy\")",
        lambda t: Bytes(host=t.nbytes(4) + t.nbytes()),
        "measured (on cpu:0); binding.py Binding: the fp32 EMA and a staging copy of the "
        "weights (pinned for a CUDA model) in host memory", _fused("fused_host"),
        note="frozen=\"share\" is refused off the model's device, so a LoRA base is copied "
             "and staged too; the next row avoids that"),
    Row("fused_host_list", "FusedEMA(trained params, device=\"cpu\")",
        lambda t: Bytes(host=t.nbytes(4, trained_only=True) + t.nbytes(trained_only=True)),
        "measured (on cpu:0); as above, for a list of the trained parameters (no EMA module)",
        _fused("fused_host_list")),
    Row("timm", "timm ModelEmaV3(model) (bf16, its stochastic rounding)",
        lambda t: Bytes(acc=t.nbytes(), acc_update=timm_sr_bytes(t)),
        "measured; timm/utils/model_ema.py ModelEmaV3 (deepcopy) and "
        "_lerp_stochastic_round_bf16_ (chunks)", _timm(), needs="timm"),
    Row("timm_fp32", "timm ModelEmaV3(model, dtype=fp32)",
        lambda t: Bytes(acc=t.nbytes(4), acc_update=cast_bytes(t)),
        "measured; ModelEmaV3: deepcopy, then .to(dtype); _foreach_mul_ and _foreach_add_ "
        "(mixed dtypes)", _timm(dtype=torch.float32), needs="timm"),
    Row("ema_pytorch", "ema-pytorch EMA(model)",
        lambda t: Bytes(acc=t.nbytes() + 1 + 8),  # + its `initted` and `step` buffers
        "measured; ema_pytorch.py EMA.init_ema (deepcopy) and update_moving_average",
        _ema_pytorch, needs="ema_pytorch"),
    Row("diffusers", "diffusers EMAModel(model.parameters())",
        lambda t: Bytes(acc=t.nbytes(), acc_update=diffusers_step_bytes(t)),
        "measured; diffusers/training_utils.py EMAModel: shadow_params = clones; step with "
        "foreach=False, the default (foreach=True adds a temporary of every trained "
        "parameter: torch._foreach_sub)",
        _diffusers, needs="diffusers"),
    Row("diffusers_offload", "diffusers EMAModel, --offload_ema",
        lambda t: Bytes(moved=t.nbytes(), acc_update=diffusers_step_bytes(t), host=t.nbytes()),
        "host bytes measured; the accelerator's from the training scripts: ema.to(cuda) "
        "before ema.step, ema.to(cpu) after (pinned host copies)", _diffusers,
        note="The whole EMA comes to the accelerator for every step",
        how="host measured, accelerator from code", needs="diffusers"),
    Row("nemo_offload", "NeMo EMA(cpu_offload=True)",
        lambda t: Bytes(host=2 * t.nbytes(trained_only=True)),
        "from code only (NeMo is not installed): nemo/collections/common/callbacks/ema.py "
        "EMAOptimizer: ema_params = copies of the optimizer's params on the CPU; each update "
        "copies the params to the CPU (param.data.to(cpu)) for a thread that updates the EMA "
        "there while the next step runs (host: EMA + those copies while it runs)",
        note="It averages the optimizer's parameters only: a LoRA base is never copied",
        how="from code"),
]
ROW_BY_KEY = {r.key: r for r in ROWS}


# ---------------------------------------------------------------------------- measuring

_LEAVES = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType,
           types.MethodType, str, bytes, int, float, bool, complex, type(None), torch.dtype,
           torch.device, torch.Generator)


def owned_bytes(ema: object, model: nn.Module) -> int:
    """Bytes of the storages reachable from ``ema`` (through attributes, containers and
    module trees) that ``model``'s tensors do not use; each storage counted once."""
    theirs = {t.untyped_storage().data_ptr() for t in list(model.parameters())
              + list(model.buffers())}
    seen, storages, stack = set(), {}, [ema]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, _LEAVES):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            s = obj.untyped_storage()
            if s.nbytes() and s.data_ptr() not in theirs:
                storages[s.data_ptr()] = s.nbytes()
            continue
        if isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        else:
            stack.extend(getattr(obj, "__dict__", {}).values())
            for slot in getattr(type(obj), "__slots__", ()):
                stack.append(getattr(obj, slot, None))
    return sum(storages.values())


def update_peak_bytes(fn: Callable[[], None]) -> int:
    """The peak, over one call of ``fn``, of the bytes it allocated and not yet freed
    (CPU allocations, from ``torch.profiler``'s memory events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    now = peak = 0
    for _, b in events:
        now += b
        peak = max(peak, now)
    return peak


def available(row: Row) -> bool:
    """The row's library runs here (timm: its model_ema.py, also without torchvision)."""
    if row.build is None:
        return False
    if row.needs == "timm":
        return _timm_model_ema() is not None
    return row.needs is None or importlib.util.find_spec(row.needs) is not None


def measure(row: Row, lay) -> Dict:
    """The row's EMA of a small model on this CPU: bytes it holds after two updates, and
    the peak an update allocates, against the row's formula for the same model."""
    torch.manual_seed(0)
    model = models.build_module(lay, DTYPE, "cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    ema, step = row.build(model)
    step()
    step()
    held = owned_bytes(ema, model)
    peak = update_peak_bytes(step)
    want = row.formula(Tensors.of(model))
    # on one device, what an offloading EMA moves is not allocated: the peak is acc_update's
    want_held = want.acc + want.host
    return dict(held=held, held_formula=want_held, update_peak=peak,
                update_peak_formula=want.acc_update,
                ok=held == want_held and within(peak, want.acc_update))


def within(measured: int, formula: int) -> bool:
    """An update's peak: allocator and profiler bookkeeping add a few bytes per call."""
    return abs(measured - formula) <= max(4096, 0.02 * formula)


# ---------------------------------------------------------------------------- the report

def per_param(b: int, n: int) -> str:
    return f"{b / n:.3f}"


def table_1b(lay_name: str) -> Dict:
    lay = layout(lay_name, models.LLAMA_1B)
    model = models.build_module(lay, DTYPE, "meta")
    t = Tensors.of(model)
    n = t.count()
    rows = {}
    for r in ROWS:
        b = r.formula(t)
        peak = b.acc + b.acc_update + b.moved
        rows[r.key] = dict(acc=b.acc / n, acc_peak=peak / n, host=b.host / n,
                           acc_GiB=b.acc / 2 ** 30, acc_peak_GiB=peak / 2 ** 30,
                           host_GiB=b.host / 2 ** 30)
    return dict(params=n, trainable=t.count(trained_only=True), tensors=len(t.numel),
                adapters_fp32_bytes=t.nbytes(4, trained_only=True) if lay_name == "lora" else None,
                rows=rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a smaller measured model (tests)")
    add_output_args(p, __file__)
    args = p.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    arch = QUICK if args.quick else SMALL
    big = {k: table_1b(k) for k in ("full", "lora")}
    small = {}
    for k in ("full", "lora"):
        lay = layout(k, arch)
        n = sum(models.numel(s) for _, s, _ in lay)
        small[k] = dict(params=n, rows={r.key: measure(r, lay) for r in ROWS if available(r)})
    ok = all(m["ok"] for s in small.values() for m in s["rows"].values())
    cmd = "python benchmarks/bench_memory.py " + " ".join(argv if argv is not None
                                                          else sys.argv[1:])
    meta = {"command": cmd.strip(), "torch": torch.__version__, "machine": platform.machine(),
            "model": "TinyLlama-1.1B shapes (benchmarks/models.py llama_1b), bf16",
            "lora_rank": lora_rank(models.llama(**models.LLAMA_1B)), "small_arch": arch,
            "small_lora_rank": lora_rank(models.llama(**arch)), "formulas_match": ok}
    out = {"meta": meta, "1b": big, "small": small,
           "rows": {r.key: dict(label=r.label, source=r.source, note=r.note, how=r.how,
                                measured=available(r)) for r in ROWS}}
    write_results(args.out, "bench_memory", out, render(out))
    if not ok:
        raise SystemExit("bench_memory: a measured row differs from its formula (see above)")
    return out


def render(out: Dict) -> str:
    meta, big, small, info = out["meta"], out["1b"], out["small"], out["rows"]
    lines = ["# The memory of an EMA: bytes per model parameter, 1B model with bf16 weights", "",
             f"Command: `{meta['command']}`; torch {meta['torch']}. Model: {meta['model']}. "
             "Bytes per model parameter (x 1.1 for GB). Accelerator: the EMA's tensors on the "
             "model's device between updates, and the most during an update (what it "
             "allocates or brings there); host: the most it holds in host memory. "
             "\"measured\": the row's formula agrees with what the library allocates for a "
             "small model on this CPU (the CPU standing in for the accelerator; the check "
             "below); \"from code\": read off the library's code only.", ""]
    for k, title in (("full", "Full fine-tune"), ("lora", "LoRA")):
        b = big[k]
        what = (f"{b['params']:,} parameters, all trained" if k == "full" else
                f"{b['params']:,} parameters: frozen base, adapters rank {meta['lora_rank']} on "
                f"q/k/v/o/gate/up/down = {b['trainable']:,} trained "
                f"({100 * b['trainable'] / b['params']:.2f}%)")
        lines += [f"## {title}: {what}", "",
                  "| EMA | accelerator B/param | during update | host B/param | source |",
                  "|---|---|---|---|---|"]
        for key, r in b["rows"].items():
            src = info[key]["how"] if info[key]["measured"] else "from code"
            lines.append(f"| {info[key]['label']} | {r['acc']:.3f} | {r['acc_peak']:.3f} | "
                         f"{r['host']:.3f} | {src} |")
        if k == "lora":
            f = b["rows"]["fused_fp32"]["acc"] * b["params"] / b["adapters_fp32_bytes"]
            lines += ["", f"FusedEMA(model) owns {f:.3f}x the adapters' fp32 bytes (goal: at "
                      "most 1.05x)."]
        lines.append("")
    lines += ["## Where each row comes from", ""]
    for key, r in info.items():
        note = f" {r['note']}." if r["note"] else ""
        lines.append(f"- **{r['label']}**: {r['source']}.{note}")
    arch = ", ".join(f"{k}={v}" for k, v in meta["small_arch"].items())
    lines += ["", "## The check: a small model of the same architecture on this CPU "
              f"({arch}; LoRA rank {meta['small_lora_rank']})", "",
              "Bytes the EMA holds after two updates (storages reachable from the EMA object "
              "that the model does not own) and the peak an update allocates, against the "
              "formulas the tables above use.", "",
              "| layout | EMA | held | formula | update peak | formula | match |",
              "|---|---|---|---|---|---|---|"]
    for k, s in small.items():
        for key, m in s["rows"].items():
            lines.append(f"| {k} | {info[key]['label']} | {m['held']:,} | {m['held_formula']:,} "
                         f"| {m['update_peak']:,} | {m['update_peak_formula']:,} | "
                         f"{'yes' if m['ok'] else 'NO'} |")
    lines += ["", "Every measured row matches its formula." if meta["formulas_match"] else
              "A measured row differs from its formula: the table above is wrong for it."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
