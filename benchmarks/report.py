"""The reporting side of the benchmark: the targets (ratios of medians from one run),
the console and markdown tables, the JSON/CSV/PNG files, the results page (docs/benchmarks.md)
and the README's summary of it."""
import csv
import math
import sys
from pathlib import Path
from typing import List, Optional

import torch

from runner import load_warning


HERE = Path(__file__).resolve().parent
REPO = HERE.parent
README_BEGIN = "<!-- BENCHMARK_RESULTS:BEGIN (written by benchmarks/bench.py --update-readme) -->"
README_END = "<!-- BENCHMARK_RESULTS:END -->"
RESULTS_PAGE = REPO / "docs" / "benchmarks.md"  # the full tables, between the same markers


# --------------------------------------------------------------------------------------
# Targets, from the medians of this run

TARGETS = [
    # (device, model, kind, description, numerator key, denominator key, goal, sense, unit)
    ("cpu", "gpt2_small", "fp32", "GPT-2 small fp32: EMAPlan.update_ time / bandwidth ref time",
     "plan", "bw_add", 1.10, "<=", "time"),
    ("cpu", "many_small", "fp32", "2000 x 1024: FusedEMA.update speedup vs naive mul_/add_ loop",
     "naive_mul_add", "fused_ema", 10.0, ">=", "time"),
    ("cpu", "many_small", "fp32", "2000 x 1024: FusedEMA.update speedup vs _foreach_lerp_",
     "foreach_lerp", "fused_ema", 3.0, ">=", "time"),
    ("cpu", "gpt2_small", "bf16", "GPT-2 small bf16 params, fp32 EMA: EMAPlan.update_ speedup vs "
     "cast (.float()) + _foreach_lerp_", "foreach_lerp", "plan", 4.0, ">=", "time"),
    ("cpu", "gpt2_small", "fp32x2", "GPT-2 small, two decays: EMAPlan.multi (1 pass) speedup vs "
     "2 x EMAPlan.update_", "plan_x2", "plan_multi", 1.15, ">=", "time"),
    # issue 10: the per-step host cost (empty tensors: time / tensor count) and the
    # Python layer's overhead over the plan, over the bandwidth reference and per decay
    ("cpu", "many_empty", "fp32", "10,000 empty tensors: EMAPlan.update_ host cost per tensor",
     "plan", None, 10.0, "<=", "ns_per_tensor"),
    ("cpu", "many_empty", "fp32", "10,000 empty tensors: FusedEMA.update host cost per tensor",
     "fused_ema", None, 20.0, "<=", "ns_per_tensor"),
    ("cpu", "many_small", "fp32", "2000 x 1024: FusedEMA.update time / EMAPlan.update_ time",
     "fused_ema", "plan", 1.10, "<=", "time"),
    ("cpu", "many_small", "fp32", "2000 x 1024: EMAPlan.update_ time / bandwidth ref time",
     "plan", "bw_add", 1.15, "<=", "time"),
    ("cpu", "many_tiny", "fp32", "10,000 x 0..5: FusedEMA.update time / EMAPlan.update_ time",
     "fused_ema", "plan", 1.10, "<=", "time"),
    ("cpu", "many_tiny", "fp32", "10,000 x 0..5: EMAPlan.update_ time / bandwidth ref time",
     "plan", "bw_add", 1.15, "<=", "time"),
    ("cpu", "gpt2_small", "fp32x2", "GPT-2 small, two decays: FusedEMA(decays=2) time / "
     "EMAPlan.multi time", "fused_ema", "plan_multi", 1.05, "<=", "time"),
    ("cuda", "gpt2_small", "fp32", "GPT-2 small fp32: EMAPlan.update_ GB/s / D2D copy GB/s",
     "plan", "bw_copy", 0.90, ">=", "gbps"),
    ("cuda", "gpt2_small", "fp32", "GPT-2 small fp32: device launches per EMAPlan.update_",
     "plan", None, 1, "==", "launches"),
    ("cuda", "many_small", "fp32", "2000 x 1024: FusedEMA.update speedup vs _foreach_lerp_ "
     "(wall time, host included)", "foreach_lerp", "fused_ema", 1.3, ">=", "time"),
]
# Shown beside the targets, without a goal.
INFO = [
    ("cpu", "gpt2_small", "bf16", "GPT-2 small bf16: EMAPlan.update_ speedup vs preallocated fp32 "
     "buffer + _foreach_lerp_", "foreach_lerp_buf", "plan", "time"),
    ("cpu", "gpt2_small", "bf16", "GPT-2 small bf16: FusedEMA.update speedup vs cast + "
     "_foreach_lerp_", "foreach_lerp", "fused_ema", "time"),
    ("cpu", "many_empty", "fp32", "10,000 empty tensors: _foreach_lerp_ host cost per tensor",
     "foreach_lerp", None, "ns_per_tensor"),
    ("cpu", "gpt2_small", "fp32", "GPT-2 small fp32: FusedEMA.update time / bandwidth ref time",
     "fused_ema", "bw_add", "time"),
    ("cpu", "gpt2_small", "fp32", "GPT-2 small fp32: EMAPlan.update_ time / a.add_(b) on the "
     "EMA's own tensors", "plan", "bw_add_tensors", "time"),
    ("cpu", "gpt2_small", "fp32x2", "GPT-2 small, two decays: FusedEMA(decays=2) speedup vs "
     "2 x EMAPlan.update_", "plan_x2", "fused_ema", "time"),
    # The 2000 x 1024 gap to the flat reference, split: per-tensor work (views of one flat
    # buffer, the reference's memory) and the layout of separately allocated tensors.
    ("cpu", "many_small", "fp32", "2000 x 1024: EMAPlan.update_ on views of one flat buffer / "
     "bandwidth ref time", "plan_flat", "bw_add", "time"),
    ("cpu", "many_small", "fp32", "2000 x 1024: EMAPlan.update_ time / the same on views of one "
     "flat buffer", "plan", "plan_flat", "time"),
    ("cpu", "many_tiny", "fp32", "10,000 x 0..5: EMAPlan.update_ on views of one flat buffer / "
     "bandwidth ref time", "plan_flat", "bw_add", "time"),
    # The host cost with tensors that have elements (their storage is read too).
    ("cpu", "many_tiny", "fp32", "10,000 x 0..5: EMAPlan.update_ host cost per tensor, skip=True "
     "(the check, no kernel)", "plan_skip", None, "ns_per_tensor"),
    ("cuda", "gpt2_small", "fp32", "GPT-2 small fp32: FusedEMA.update GB/s / D2D copy GB/s",
     "fused_ema", "bw_copy", "gbps"),
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
    for device, model, kind, desc, num, den, goal, sense, unit in TARGETS:
        t = {"device": device, "target": desc, "goal": f"{sense} {goal:g}", "measured": None,
             "met": None, "note": ""}
        case = _find(cases, device, model, kind)
        if case is None:
            t["note"] = "not run" + (" (no CUDA device)" if device == "cuda"
                                     and not torch.cuda.is_available() else "")
        else:
            v, why = _value(case, num, den, unit)
            t["measured"], t["note"] = v, why
            if v is not None:
                if sense == "<=":
                    t["met"] = v <= goal
                    t["by"] = "" if t["met"] else f"{(v / goal - 1) * 100:.1f}% over"
                elif sense == ">=":
                    t["met"] = v >= goal
                    t["by"] = "" if t["met"] else f"{(1 - v / goal) * 100:.1f}% short"
                else:
                    t["met"] = abs(v - goal) < 1e-9
                    t["by"] = "" if t["met"] else f"{v:g} launches"
        out.append(t)
    for device, model, kind, desc, num, den, unit in INFO:
        case = _find(cases, device, model, kind)
        if case is None:
            continue
        v, why = _value(case, num, den, unit)
        out.append({"device": device, "target": desc, "goal": "(info)", "measured": v,
                    "met": None, "note": why})
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
    out = [["device", "target", "goal", "measured", "met?"]]
    for t in targets:
        v = t["measured"]
        measured = "-" if v is None else (f"{v:g}" if t["goal"].startswith("==") else f"{v:.2f}")
        if t["met"] is None:
            met = "" if t["goal"] == "(info)" else (t["note"] or "not run")
        else:
            met = "yes" if t["met"] else f"NO ({t.get('by', '')})"
        if t["goal"] == "(info)" and t["note"]:
            met = t["note"]
        out.append([t["device"], t["target"], t["goal"], measured, met])
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
        markdown_table(target_rows(result["targets"]), left=2),
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
