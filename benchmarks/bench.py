#!/usr/bin/env python
"""fused_ema against naive loops, foreach and the EMA libraries people use, with the
memory-bandwidth limit measured beside them in the same run.

    python benchmarks/bench.py                      # the default run (< 3 min on 2 CPU cores)
    python benchmarks/bench.py --models gpt2_small --dtypes fp32,bf16 --decays 1,2
    python benchmarks/bench.py --large              # adds TinyLlama-1.1B (about 4.4 GB per copy)
    python benchmarks/bench.py --device cuda        # device time, host time, launches, CUDA graph
    python benchmarks/bench.py --host-cost          # only the per-step host cost (about 30 s)
    python benchmarks/bench.py --update-results --update-readme   # rewrite the record (below)
                                                    # (docs/benchmarks.md, the README summary)

Outputs go to --out (default runs/ at the repository root, ignored by git). The committed
reference results in benchmarks/results/ change only with --update-results, and the
README's results block only with --update-readme (which goes with --update-results: the
block links the committed chart).

Every method first runs two updates from a known start and is checked against a
float64 reference; it is then timed with ``torch.utils.benchmark`` (warm-up,
``blocked_autorange``), in rounds that interleave all methods of a case so that
drifting machine load hits them alike, and summarised by the median. The targets
at the end are ratios of medians from this same run, each with the reason a user pays
it; rows without a goal are shown for information. ``torch.compile`` of
``_foreach_lerp_`` is compiled and warmed up before it is timed, and runs on cases of
at most 1000 tensors unless named in --methods (compiling 2000 takes minutes).
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import torch  # noqa: E402

import methods as M  # noqa: E402
import models  # noqa: E402
from outputs import add_output_args, results_dir  # noqa: E402
# (the tests reach the parts through this module too)
from report import (README_BEGIN, README_END, TARGETS, case_rows,  # noqa: E402,F401
                    case_title, compute_targets, footnotes, format_table, machine_line,
                    render_markdown, render_summary, RESULTS_PAGE, target_rows, update_readme,
                    write_csv, write_png)
from runner import (CHECK_TOL, Budget, _cpu_counters, _loadavg, case_weight,  # noqa: E402,F401
                    choose_rounds, load_warning, machine_info, other_load, run_case)

DEFAULT_MODELS = ("resnet50", "gpt2_small", "vit_b16", "many_small")
# The default run (under 3 minutes on 2 cores): fp32 on ResNet-50, GPT-2 small and
# 2000 x 1024, the bf16 and two-decay cases on GPT-2 small. ViT-B/16 and the rest of
# the matrix: --models/--dtypes/--decays; TinyLlama-1.1B: --large.
DEFAULT_PLAN = (
    ("resnet50", "fp32"),
    ("gpt2_small", "fp32"),
    ("gpt2_small", "bf16"),
    ("gpt2_small", "fp32x2"),
    ("many_small", "fp32"),
    ("many_tiny", "fp32"),
    ("many_empty", "fp32"),
)
# --host-cost: only the per-step host cost rows (a quick run).
HOST_COST_PLAN = (("many_empty", "fp32"), ("many_tiny", "fp32"), ("many_small", "fp32"))
HOST_COST_METHODS = ("plan", "plan_flat", "plan_skip", "fused_ema", "foreach_lerp")


# --------------------------------------------------------------------------------------
# Command line

def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="models: " + ", ".join(m for m in models.MODELS)
        + "\nmethods: " + ", ".join(M.EMA_METHOD_KEYS))
    p.add_argument("--models", help="comma list of parameter sets (default: "
                   + ",".join(DEFAULT_MODELS) + "); with --models, --dtypes or --decays every "
                   "combination is run, otherwise the default plan (bf16 and two decays on "
                   "GPT-2 small only)")
    p.add_argument("--dtypes", help="comma list of param dtypes: fp32, bf16 (bf16 params keep "
                   "an fp32 EMA)")
    p.add_argument("--decays", help="comma list of decays per update: 1, 2 (2: fp32 only)")
    p.add_argument("--host-cost", action="store_true",
                   help="only the per-step host cost cases (10,000 empty, 10,000 x 0..5, "
                   "2000 x 1024) and methods (EMAPlan, FusedEMA, _foreach_lerp_): a quick run")
    p.add_argument("--large", action="store_true",
                   help="add TinyLlama-1.1B (1.1B params, about 4.4 GB per fp32 copy)")
    p.add_argument("--methods", help="comma list of methods (the bandwidth references always run)")
    p.add_argument("--device", default="auto",
                   help="cpu, cuda or cpu,cuda (default auto: cpu, plus cuda when present)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--min-run-time", type=float, default=0.6,
                   help="seconds of blocked_autorange per method and case, split over the "
                   "rounds (default 0.6)")
    p.add_argument("--rounds", type=int, default=3,
                   help="interleaved rounds per case (default 3)")
    p.add_argument("--time-budget", type=float, default=150.0,
                   help="seconds the whole run aims at (default 150): on a slow or busy "
                   "machine cases get shorter rounds, then fewer (at least 2); 0: no limit")
    p.add_argument("--decay", type=float, default=0.999)
    p.add_argument("--decay2", type=float, default=0.9999, help="second decay of two-decay cases")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sequential", action="store_true",
                   help="time one method at a time (less memory; automatic when the case "
                   "would not fit)")
    add_output_args(p, __file__)
    p.add_argument("--tag", help="file name stem of the outputs (default bench_<devices>)")
    p.add_argument("--profile", action="store_true",
                   help="also write torch.profiler tables of the methods the targets compare "
                   "(<tag>_profile.txt)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--update-readme", action="store_true",
                   help="rewrite the blocks between the BENCHMARK_RESULTS markers: the full "
                   "tables in docs/benchmarks.md, their summary in README.md (with "
                   "--update-results)")
    p.add_argument("--readme", default=str(REPO / "README.md"), help=argparse.SUPPRESS)
    p.add_argument("--results-page", default=str(RESULTS_PAGE), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if (args.update_readme and Path(args.out).resolve() != Path(results_dir(__file__))
            and Path(args.readme).resolve() == (REPO / "README.md").resolve()):
        p.error("--update-readme goes with --update-results: the README block links the "
                "committed results in benchmarks/results/")
    return args


def _split(s: Optional[str]) -> Optional[List[str]]:
    return None if s is None else [x.strip() for x in s.split(",") if x.strip()]


def plan_cases(args) -> List[tuple]:
    selected = _split(args.models)
    dtypes = _split(args.dtypes)
    decays = _split(args.decays)
    for m in selected or []:
        models.spec(m)  # raises on an unknown name
    for d in dtypes or []:
        if d not in ("fp32", "bf16"):
            raise SystemExit(f"--dtypes: unknown dtype {d!r} (fp32, bf16)")
    for k in decays or []:
        if k not in ("1", "2"):
            raise SystemExit(f"--decays: unknown value {k!r} (1, 2)")
    if selected is None and dtypes is None and decays is None:
        if getattr(args, "host_cost", False):
            return list(HOST_COST_PLAN)
        plan = list(DEFAULT_PLAN)
        if args.large:
            plan.append(("llama_1b", "fp32"))
        return plan
    selected = list(selected or DEFAULT_MODELS)
    if args.large and "llama_1b" not in selected:
        selected.append("llama_1b")
    dtypes = dtypes or ["fp32"]
    decays = decays or ["1"]
    plan = []
    for m in selected:
        for d in dtypes:
            if "1" in decays:
                plan.append((m, d))
            if "2" in decays and d == "fp32":
                plan.append((m, "fp32x2"))
    return plan


def devices(arg: str) -> List[str]:
    if arg == "auto":
        return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    out = _split(arg)
    for d in out:
        if d not in ("cpu", "cuda"):
            raise SystemExit(f"--device: unknown device {d!r}")
        if d == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is available")
    return out


# --------------------------------------------------------------------------------------

def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    devs = devices(args.device)
    plan = plan_cases(args)
    keys = _split(args.methods)
    if keys is None and args.host_cost:
        keys = list(HOST_COST_METHODS)
    for k in keys or []:
        if k not in M.METHOD_BY_KEY:
            raise SystemExit(f"--methods: unknown method {k!r}; choose from "
                             + ", ".join(M.EMA_METHOD_KEYS))
    meta = machine_info(args.threads)
    command = "python benchmarks/bench.py" + ("" if argv is None and len(sys.argv) <= 1 else
                                              " " + " ".join(sys.argv[1:] if argv is None
                                                             else argv))
    print(f"fused_ema benchmark · {machine_line(meta)}", flush=True)
    print(f"torch.set_num_threads({args.threads}); {len(plan) * len(devs)} cases; "
          f"{args.rounds} interleaved rounds of blocked_autorange per case "
          f"({args.min_run_time:g} s per method); FusedEMA "
          f"{'available' if M.FusedEMA is not None else 'NOT available in this checkout'}",
          flush=True)

    work = [(m, k, d) for d in devs for (m, k) in plan]
    total = sum(len(M.methods_for(k, d, keys)) * (1 + max(1, args.rounds)) for m, k, d in work)
    pbar = None
    if not args.no_progress:
        try:
            from tqdm import tqdm

            tty = sys.stderr.isatty()
            pbar = tqdm(total=total, desc="benchmark", unit="step", dynamic_ncols=True,
                        file=sys.stderr, mininterval=0.2 if tty else 15.0)
        except ImportError:
            pbar = None
    t0 = time.perf_counter()
    counters = _cpu_counters()
    cases = []
    budget = Budget(args.time_budget, [case_weight(m, k, d, keys) for m, k, d in work])
    for index, (model, kind, device) in enumerate(work):
        c = run_case(model, kind, device, args, keys, pbar, budget, index)
        cases.append(c)
        text = "\n".join(["", case_title(c), format_table(case_rows(c, markdown=False))]
                         + footnotes(c) + [""])
        if pbar is not None:
            pbar.write(text)
        else:
            print(text, flush=True)
    if pbar is not None:
        pbar.close()
    elapsed = time.perf_counter() - t0
    meta["load_average_at_end"] = _loadavg()
    meta["other_processes_cpus"] = other_load(counters, _cpu_counters())
    targets = compute_targets(cases)
    result = {"meta": meta, "command": command, "args": vars(args), "elapsed_s": elapsed,
              "cases": cases, "targets": targets}

    print(f"\nTargets (ratios of medians measured side by side in this run; {elapsed:.0f} s):")
    print(format_table(target_rows(targets), left=3))
    if load_warning(meta):
        print("WARNING: " + load_warning(meta))

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = args.tag or "bench_" + "_".join(devs)
    paths = {"json": out_dir / f"{tag}.json", "csv": out_dir / f"{tag}.csv",
             "md": out_dir / f"{tag}.md"}
    if args.profile:
        paths["profile"] = out_dir / f"{tag}_profile.txt"
        with open(paths["profile"], "w") as f:
            for c in cases:
                for k, table in c.pop("profiles", {}).items():
                    f.write(f"== {c['model']} / {c['kind']} / {c['device']} / {k}\n{table}\n\n")
    with open(paths["json"], "w") as f:
        json.dump(result, f, indent=1, default=str)
    write_csv(paths["csv"], result)
    png_rel = None
    if not args.no_plot:
        paths["png"] = out_dir / f"{tag}.png"
        try:
            write_png(paths["png"], result)
            try:
                png_rel = paths["png"].resolve().relative_to(REPO).as_posix()
            except ValueError:
                png_rel = paths["png"].name
        except Exception as exc:
            print(f"plot not written: {type(exc).__name__}: {exc}", file=sys.stderr)
            del paths["png"]
    block = render_markdown(result, png_rel)
    paths["md"].write_text(block)
    print("\nwritten: " + ", ".join(str(p) for p in paths.values()))
    if args.update_readme:
        readme, page = Path(args.readme), Path(args.results_page)
        png = paths.get("png")  # links relative to the file that shows them
        png_rel = png and Path(os.path.relpath(png, page.parent)).as_posix()
        page_rel = Path(os.path.relpath(page, readme.parent)).as_posix()
        if (update_readme(page, render_markdown(result, png_rel), tag)
                and update_readme(readme, render_summary(result, page_rel), tag)):
            print(f"results updated: {page}, summary in {readme}")
    else:
        print(f"README block: {paths['md']} (or rerun with --update-results --update-readme)")
    return result


if __name__ == "__main__":
    main()
