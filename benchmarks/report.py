"""The reporting side of the benchmark: the targets (ratios of medians from one run),
the console and markdown tables, the JSON/CSV/PNG files, the results page (docs/benchmarks.md)
and the README's summary of it."""
import csv
import math
import sys
from pathlib import Path
from typing import List, NamedTuple, Optional

import torch

from runner import load_warning


HERE = Path(__file__).resolve().parent
REPO = HERE.parent
README_BEGIN = "<!-- BENCHMARK_RESULTS:BEGIN (written by benchmarks/bench.py --update-readme) -->"
README_END = "<!-- BENCHMARK_RESULTS:END -->"
RESULTS_PAGE = REPO / "docs" / "benchmarks.md"  # the full tables, between the same markers


# --------------------------------------------------------------------------------------
# Targets, from the medians of this run

class Target(NamedTuple):
    """A ratio of medians from this run: ``num`` over ``den`` (``None``: per tensor, or a
    count). With a ``goal`` it is a target, met or not; without, shown for information."""
    device: str
    model: str
    kind: str
    what: str
    num: str
    den: Optional[str]
    unit: str  # "time" (ratio of times), "gbps" (ratio of GB/s), "ns_per_tensor", "launches"
    why: str  # what a user pays that this measures, in one line
    goal: Optional[float] = None
    sense: str = ""  # "<=", ">=", "=="


_VS_COMPILE = ("EMAPlan.update_ speedup vs torch.compile(_foreach_lerp_)", "compiled_foreach_lerp",
               "plan", "time", "the anchor a user tries first: compiling timm's foreach update")
TARGETS = [
    Target("cpu", "gpt2_small", "fp32", "GPT-2 small fp32: EMAPlan.update_ time / bandwidth ref "
           "time", "plan", "bw_add", "time", "a large model's update costs the bytes it must "
           "move, no more", 1.10, "<="),
    Target("cpu", "many_small", "fp32", "2000 x 1024: FusedEMA.update speedup vs naive mul_/add_ "
           "loop", "naive_mul_add", "fused_ema", "time", "the per-tensor loop most EMA code "
           "runs", 10.0, ">="),
    Target("cpu", "many_small", "fp32", "2000 x 1024: FusedEMA.update speedup vs _foreach_lerp_",
           "foreach_lerp", "fused_ema", "time", "timm ModelEmaV3 / swa_utils (foreach) on many "
           "small tensors", 3.0, ">="),
    Target("cpu", "gpt2_small", "bf16", "GPT-2 small bf16 params, fp32 EMA: EMAPlan.update_ "
           "speedup vs cast (.float()) + _foreach_lerp_", "foreach_lerp", "plan", "time",
           "mixed precision: an fp32 EMA of bf16 params without a cast copy per step", 4.0, ">="),
    Target("cpu", "gpt2_small", "fp32x2", "GPT-2 small, two decays: EMAPlan.multi (1 pass) "
           "speedup vs 2 x EMAPlan.update_", "plan_x2", "plan_multi", "time",
           "two EMAs (eval EMA + teacher) read the params once", 1.15, ">="),
    Target("cpu", "many_small", "fp32", "2000 x 1024: FusedEMA.update time / EMAPlan.update_ time",
           "fused_ema", "plan", "time", "the module-level class costs little over the raw plan",
           1.10, "<="),
    Target("cpu", "many_tiny", "fp32", "10,000 x 0..5: FusedEMA.update time / EMAPlan.update_ "
           "time", "fused_ema", "plan", "time", "the same where host work is all there is",
           1.10, "<="),
    Target("cpu", "gpt2_small", "fp32x2", "GPT-2 small, two decays: FusedEMA(decays=2) time / "
           "EMAPlan.multi time", "fused_ema", "plan_multi", "time", "the class adds nothing to "
           "the one-pass two-decay update", 1.05, "<="),
    Target("cuda", "gpt2_small", "fp32", "GPT-2 small fp32: EMAPlan.update_ GB/s / D2D copy GB/s",
           "plan", "bw_copy", "gbps", "on a GPU the update runs at copy bandwidth", 0.90, ">="),
    Target("cuda", "gpt2_small", "fp32", "GPT-2 small fp32: device launches per EMAPlan.update_",
           "plan", None, "launches", "one launch per update, whatever the tensor count", 1, "=="),
    Target("cuda", "many_small", "fp32", "2000 x 1024: FusedEMA.update speedup vs "
           "_foreach_lerp_ (wall time, host included)", "foreach_lerp", "fused_ema", "time",
           "what a GPU step with many small tensors waits for", 1.3, ">="),
    # Shown without a goal.
    *(Target(dev, model, "fp32", f"{label}: {_VS_COMPILE[0]}", *_VS_COMPILE[1:])
      for dev, model, label in (("cpu", "resnet50", "ResNet-50"),
                                ("cpu", "gpt2_small", "GPT-2 small"),
                                ("cpu", "many_small", "2000 x 1024"),
                                ("cuda", "gpt2_small", "GPT-2 small"),
                                ("cuda", "many_small", "2000 x 1024"))),
    Target("cpu", "gpt2_small", "bf16", "GPT-2 small bf16: EMAPlan.update_ speedup vs "
           "preallocated fp32 buffer + _foreach_lerp_", "foreach_lerp_buf", "plan", "time",
           "a user who keeps an fp32 copy of the params"),
    Target("cpu", "gpt2_small", "bf16", "GPT-2 small bf16: FusedEMA.update speedup vs cast + "
           "_foreach_lerp_", "foreach_lerp", "fused_ema", "time", "the class, same comparison"),
    Target("cpu", "gpt2_small", "fp32", "GPT-2 small fp32: FusedEMA.update time / bandwidth ref "
           "time", "fused_ema", "bw_add", "time", "the class on a large model"),
    Target("cpu", "gpt2_small", "fp32", "GPT-2 small fp32: EMAPlan.update_ time / a.add_(b) on "
           "the EMA's own tensors", "plan", "bw_add_tensors", "time",
           "the kernel against ATen's add on the same memory"),
    # The 2000 x 1024 gap to the flat reference, split: per-tensor work (views of one flat
    # buffer, the reference's memory) and the layout of separately allocated tensors.
    Target("cpu", "many_small", "fp32", "2000 x 1024: EMAPlan.update_ on views of one flat "
           "buffer / bandwidth ref time", "plan_flat", "bw_add", "time",
           "the per-tensor work alone, in the reference's memory"),
    Target("cpu", "many_small", "fp32", "2000 x 1024: EMAPlan.update_ time / the same on views "
           "of one flat buffer", "plan", "plan_flat", "time",
           "what separately allocated tensors cost the memory system (any EMA pays it)"),
    # The per-step host cost: what bounds a GPU step with many tensors.
    *(Target("cpu", model, "fp32", f"{count}: {label} host cost per tensor", num, None,
             "ns_per_tensor", why)
      for model, count, label, num, why in (
          ("many_empty", "10,000 empty tensors", "EMAPlan.update_", "plan",
           "host time per tensor and step, no kernel work"),
          ("many_empty", "10,000 empty tensors", "FusedEMA.update", "fused_ema",
           "the same through the class"),
          ("many_empty", "10,000 empty tensors", "_foreach_lerp_", "foreach_lerp",
           "the same for timm's update"),
          ("many_tiny", "10,000 x 0..5", "EMAPlan.update_, skip=True (the check, no kernel)",
           "plan_skip", "the per-step check when tensors have storage to read"))),
    Target("cuda", "gpt2_small", "fp32", "GPT-2 small fp32: FusedEMA.update GB/s / D2D copy GB/s",
           "fused_ema", "bw_copy", "gbps", "the class on a GPU"),
]


def _find(cases, device, model, kind) -> Optional[dict]:
    for c in cases:
        if (c["device"], c["model"], c["kind"]) == (device, model, kind):
            return c
    return None


def _value(case, num, den, unit):
    rows = {r["method"]: r for r in case["rows"]}
    for k in (num, den):
        if k is not None and (k not in rows or "median_s" not in rows[k]):
            why = "not run" if k not in rows else rows[k].get("note") or rows[k]["status"]
            return None, f"{k}: {why}"
    if unit == "launches":
        v = rows[num].get("launches")
        return (v, "") if v is not None else (None, "no profiler data")
    if unit == "ns_per_tensor":
        return rows[num]["median_s"] / case["tensors"] * 1e9, ""
    if unit == "gbps":
        return rows[num]["gbps"] / rows[den]["gbps"], ""
    return rows[num]["median_s"] / rows[den]["median_s"], ""


def compute_targets(cases: List[dict]) -> List[dict]:
    out = []
    for t in TARGETS:
        case = _find(cases, t.device, t.model, t.kind)
        if case is None and t.goal is None:
            continue
        row = {"device": t.device, "target": t.what, "why": t.why, "measured": None,
               "met": None, "note": "",
               "goal": "(info)" if t.goal is None else f"{t.sense} {t.goal:g}"}
        if case is None:
            row["note"] = "not run" + (" (no CUDA device)" if t.device == "cuda"
                                       and not torch.cuda.is_available() else "")
        else:
            v, row["note"] = _value(case, t.num, t.den, t.unit)
            row["measured"] = v
            if v is not None and t.goal is not None:
                if t.sense == "<=":
                    row["met"] = v <= t.goal
                    row["by"] = "" if row["met"] else f"{(v / t.goal - 1) * 100:.1f}% over"
                elif t.sense == ">=":
                    row["met"] = v >= t.goal
                    row["by"] = "" if row["met"] else f"{(1 - v / t.goal) * 100:.1f}% short"
                else:
                    row["met"] = abs(v - t.goal) < 1e-9
                    row["by"] = "" if row["met"] else f"{v:g} launches"
        out.append(row)
    return out


# --------------------------------------------------------------------------------------
# Output

def _ms(s):
    if s is None or s != s:
        return "-"
    ms = s * 1e3
    return f"{ms:.3f}" if ms < 1 else f"{ms:.2f}" if ms < 100 else f"{ms:.0f}"


def _x(v):
    return "-" if v is None or v != v else f"{v:.2f}x"


def _pct(v):
    return "-" if v is None or v != v else f"{v * 100:.0f}%"


def case_title(c: dict) -> str:
    rounds = f"{c.get('rounds', '?')} rounds x {c.get('per_round_s', 0):.2g} s"
    if c.get("slow_rounds", c.get("rounds")) != c.get("rounds"):
        rounds += f", {c['slow_rounds']} for methods slower than that"
    if c.get("budget_reduced"):
        rounds += " (cut to fit --time-budget)"
    return (f"{c['model_label']} ({c['tensors']} tensors, {c['numel'] / 1e6:.1f}M elements) · "
            f"{c['kind_label']} · {c['device']} · "
            f"{c['bytes_per_update'] / 1e9:.3f} GB per update · {rounds}")


def case_rows(c: dict, markdown: bool) -> List[List[str]]:
    cuda = c["device"] == "cuda"
    head = ["method", "median ms", "IQR ms", "GB/s", "% of BW ref", "vs naive", "vs foreach_lerp",
            "EMA check"]
    if cuda:
        head[5:5] = ["host ms", "device ms", "launches", "graph ms"]
    out = [head]
    for r in c["rows"]:
        label = r["label"]
        if r["status"] != "ok" or "median_s" not in r:
            cells = [label, r["status"] + (f" [{_footnote(c, r)}]" if r.get("note") else "")]
            out.append(cells + [""] * (len(head) - len(cells)))
            continue
        check = "-" if r["reference"] or "check" not in r else (
            r.get("check", "?") + (f" ({r['max_abs_err']:.0e})" if "max_abs_err" in r else ""))
        ref = r["reference"]
        cells = [label + (f" [{r['note']}]" if r.get("note") else ""), _ms(r["median_s"]),
                 _ms(r["iqr_s"]), f"{r['gbps']:.1f}", _pct(r.get("share_of_reference")),
                 "-" if ref else _x(r.get("speedup_vs_naive")),
                 "-" if ref else _x(r.get("speedup_vs_foreach_lerp")), check]
        if cuda:
            launches = r.get("launches")
            graph = (_ms(r["graph_s"]) if "graph_s" in r
                     else "fails" if "graph_error" in r else "-")
            cells[5:5] = [_ms(r.get("host_s")), _ms(r.get("device_s")),
                          "-" if launches is None else f"{launches:g}", graph]
        out.append(cells)
    return out


def _footnote(c: dict, r: dict) -> int:
    notes = [x for x in c["rows"] if x["status"] != "ok" or "median_s" not in x]
    return 1 + notes.index(r)


def footnotes(c: dict) -> List[str]:
    notes = [x for x in c["rows"] if x["status"] != "ok" or "median_s" not in x]
    return [f"[{i}] {x['label']}: {x.get('note') or x['status']}" for i, x in enumerate(notes, 1)]


def format_table(rows: List[List[str]], left: int = 1) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for j, r in enumerate(rows):
        cells = [c.ljust(w) for c, w in zip(r[:left], widths[:left])] + \
            [c.rjust(w) for c, w in zip(r[left:], widths[left:])]
        lines.append("  ".join(cells).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(rows: List[List[str]], left: int = 1) -> str:
    esc = [[c.replace("|", "\\|") for c in r] for r in rows]
    lines = ["| " + " | ".join(esc[0]) + " |",
             "|" + "|".join(["---"] * left + ["---:"] * (len(esc[0]) - left)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in esc[1:]]
    return "\n".join(lines)


def target_rows(targets: List[dict]) -> List[List[str]]:
    out = [["device", "target", "why", "goal", "measured", "met?"]]
    for t in targets:
        v = t["measured"]
        measured = "-" if v is None else (f"{v:g}" if t["goal"].startswith("==") else f"{v:.2f}")
        if t["met"] is None:
            met = "" if t["goal"] == "(info)" else (t["note"] or "not run")
        else:
            met = "yes" if t["met"] else f"NO ({t.get('by', '')})"
        if t["goal"] == "(info)" and t["note"]:
            met = t["note"]
        out.append([t["device"], t["target"], t["why"], t["goal"], measured, met])
    return out


def machine_line(meta: dict) -> str:
    s = (f"{meta['cpu']}, {meta['logical_cpus']} logical CPUs, {meta['memory_gb']} GB RAM, "
         f"{meta['os']}, Python {meta['python']}, torch {meta['torch']}, "
         f"torch.set_num_threads({meta['torch_threads']}), fused_ema {meta['fused_ema']} "
         f"(CPU backend: {meta['fused_ema_backend_cpu']}, commit {meta['git_commit'] or '?'})")
    if "cuda_device" in meta:
        s += f"; GPU: {meta['cuda_device']} (CUDA {meta['cuda']})"
    return s


def render_markdown(result: dict, png_rel: Optional[str]) -> str:
    meta = result["meta"]
    lines = [
        f"Measured {meta['date']} on: {machine_line(meta)}.",
        "",
        f"Command: `{result['command']}` ({result['elapsed_s']:.0f} s). Medians of "
        f"`torch.utils.benchmark` `blocked_autorange` samples, {result['args']['rounds']} "
        "interleaved rounds per case; GB/s counts the bytes the update must move (fp32 EMA: 12 B "
        "per element; bf16 param + fp32 EMA: 10 B; two fp32 EMAs: 20 B); \"% of BW ref\" is the "
        "share of the fastest bandwidth reference's GB/s in the same case; \"EMA check\" is the "
        "largest difference after two updates from the closed form p + d^2 (e0 - p).",
        "",
    ]
    if load_warning(meta):
        lines += [f"> **Warning:** {load_warning(meta)}.", ""]
    lines += [
        "**Targets** (ratios of medians from this run):",
        "",
        markdown_table(target_rows(result["targets"]), left=3),
        "",
    ]
    for c in result["cases"]:
        lines += [f"**{case_title(c)}**", "", markdown_table(case_rows(c, markdown=True)), ""]
        if footnotes(c):
            lines += [" ".join(footnotes(c)), ""]
    if png_rel:
        lines += [f"![time per method per model]({png_rel})", ""]
    return "\n".join(lines)


def render_summary(result: dict, page: str) -> str:
    """The README's block: one row per case (FusedEMA.update against the per-tensor loop,
    ``_foreach_lerp_`` and the bandwidth reference), the targets counted; ``page`` links
    to the full tables."""
    meta = result["meta"]
    rows = [["case", "tensors", "FusedEMA.update ms", "vs naive loop", "vs _foreach_lerp_",
             "% of bandwidth ref"]]
    for c in result["cases"]:
        r = next((r for r in c["rows"] if r["method"] == "fused_ema" and "median_s" in r), None)
        if r is None:
            continue
        rows.append([f"{c['model_label']} · {c['kind_label']} · {c['device']}", str(c["tensors"]),
                     _ms(r["median_s"]), _x(r.get("speedup_vs_naive")),
                     _x(r.get("speedup_vs_foreach_lerp")), _pct(r.get("share_of_reference"))])
    goals = [t for t in result["targets"] if t["goal"] != "(info)"]
    met = sum(t["met"] is True for t in goals)
    missed = sum(t["met"] is False for t in goals)
    lines = [f"Measured {meta['date']} on: {machine_line(meta)}. Command: `{result['command']}`.",
             ""]
    if load_warning(meta):
        lines += [f"> **Warning:** {load_warning(meta)}.", ""]
    lines += [markdown_table(rows, left=2), "",
              f"Targets: {met} met, {missed} missed, {len(goals) - met - missed} not run, of "
              f"{len(goals)}. Speedups are ratios of medians from the same run (above 1x: "
              "FusedEMA is faster); % of bandwidth ref is FusedEMA's GB/s as a share of a flat "
              f"`a.add_(b)` over as many bytes. Every method, the targets and the chart: [{page}]"
              f"({page}).", ""]
    return "\n".join(lines)


def write_csv(path: Path, result: dict) -> None:
    fields = ["device", "model", "kind", "tensors", "numel", "method", "label", "group", "status",
              "median_s", "iqr_s", "min_s", "samples", "bytes_per_update", "gbps",
              "share_of_reference", "speedup_vs_naive", "speedup_vs_foreach_lerp", "check",
              "max_abs_err", "host_s", "device_s", "launches", "graph_s", "note"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for c in result["cases"]:
            for r in c["rows"]:
                w.writerow({**{k: c[k] for k in ("device", "model", "kind", "tensors", "numel")},
                            **r})


GROUP_COLORS = {"reference": "#9e9e9e", "baseline": "#4c72b0", "library": "#dd8452",
                "fused": "#55a868"}


def write_png(path: Path, result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = result["cases"]
    ncol = min(3, len(cases))
    nrow = math.ceil(len(cases) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(6.8 * ncol, 4.2 * nrow), squeeze=False)
    for ax, c in zip(axes.flat, cases):
        rows = [r for r in c["rows"] if "median_s" in r]
        names = [r["label"] for r in rows][::-1]
        vals = [r["median_s"] * 1e3 for r in rows][::-1]
        colors = [GROUP_COLORS.get(r["group"], "#333") for r in rows][::-1]
        ax.barh(range(len(vals)), vals, color=colors)
        ax.set_yticks(range(len(vals)))
        ax.set_yticklabels(names, fontsize=7)
        ax.set_xlim(0, max(vals, default=1) * 1.18)
        ax.set_xlabel("ms per update (median; shorter is better)", fontsize=8)
        ax.set_title(f"{c['model_label']} · {c['kind']} · {c['device']}", fontsize=9)
        for i, v in enumerate(vals):
            ax.text(v, i, f" {v:.3g}", va="center", fontsize=6)
        ax.tick_params(axis="x", labelsize=7)
    for ax in list(axes.flat)[len(cases):]:
        ax.axis("off")
    handles = [plt.Rectangle((0, 0), 1, 1, color=v) for v in GROUP_COLORS.values()]
    fig.legend(handles, list(GROUP_COLORS), loc="lower center", ncol=4, fontsize=8)
    meta = result["meta"]
    fig.suptitle(f"EMA update time per method: {meta['cpu']}, torch {meta['torch']}, "
                 f"{meta['torch_threads']} threads", fontsize=10)
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def update_readme(readme: Path, block: str, tag: str) -> bool:
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        print(f"README: markers not found in {readme}; not updated", file=sys.stderr)
        return False
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    readme.write_text(head + README_BEGIN + "\n" + block.rstrip() + "\n" + README_END + tail)
    return True
