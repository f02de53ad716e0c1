#!/usr/bin/env python
"""fused_ema against naive loops, foreach and the EMA libraries people use, with the
memory-bandwidth limit measured beside them in the same run.

    python benchmarks/bench.py                      # the default run (< 3 min on 2 CPU cores)
    python benchmarks/bench.py --models gpt2_small --dtypes fp32,bf16 --decays 1,2
    python benchmarks/bench.py --large              # adds TinyLlama-1.1B (about 4.4 GB per copy)
    python benchmarks/bench.py --device cuda        # device time, host time, launches, CUDA graph
    python benchmarks/bench.py --update-readme      # also rewrites the README's results block

Every method first runs two updates from a known start and is checked against a
float64 reference; it is then timed with ``torch.utils.benchmark`` (warm-up,
``blocked_autorange``), in rounds that interleave all methods of a case so that
drifting machine load hits them alike, and summarised by the median. The targets
at the end are ratios of medians from this same run.
"""
import argparse
import csv
import datetime
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import timeit
from pathlib import Path
from typing import Dict, List, Optional, Sequence

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from torch.utils import benchmark  # noqa: E402

import fused_ema  # noqa: E402
import methods as M  # noqa: E402
import models  # noqa: E402

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
)
CHECK_TOL = 1e-5  # max |EMA - float64 reference| after two updates (values are O(1))
README_BEGIN = "<!-- BENCHMARK_RESULTS:BEGIN (written by benchmarks/bench.py --update-readme) -->"
README_END = "<!-- BENCHMARK_RESULTS:END -->"


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
    p.add_argument("--out-dir", default=str(HERE / "results"))
    p.add_argument("--tag", help="file name stem of the outputs (default bench_<devices>)")
    p.add_argument("--profile", action="store_true",
                   help="also write torch.profiler tables of the methods the targets compare "
                   "(<tag>_profile.txt)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--update-readme", action="store_true",
                   help="rewrite the README block between the BENCHMARK_RESULTS markers")
    p.add_argument("--readme", default=str(REPO / "README.md"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


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
# Machine

def machine_info(threads: int) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gb = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    mem_gb = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    info = {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "memory_gb": mem_gb,
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "fused_ema": getattr(fused_ema, "__version__", "?"),
        "fused_ema_backend_cpu": fused_ema.backend("cpu"),
        "torch_threads": threads,
        "git_commit": commit,
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "load_average_at_start": _loadavg(),
    }
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
        info["fused_ema_backend_cuda"] = fused_ema.backend("cuda")
    return info


def _loadavg() -> Optional[float]:
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def _cpu_counters() -> Optional[tuple]:
    """(busy seconds of all CPUs, this process's CPU seconds, wall time), or None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        hz = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, AttributeError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    t = os.times()
    return (sum(fields[:8]) - idle) / hz, t.user + t.system, time.perf_counter()


def other_load(start: Optional[tuple], end: Optional[tuple]) -> Optional[float]:
    """How many CPUs other processes kept busy, on average, between two ``_cpu_counters``."""
    if start is None or end is None or end[2] <= start[2]:
        return None
    return max(0.0, ((end[0] - start[0]) - (end[1] - start[1])) / (end[2] - start[2]))


def load_warning(meta: dict) -> str:
    """Other processes on the cores make OpenMP-parallel kernels (the bandwidth reference,
    fused_ema) wait for descheduled threads, while single-threaded per-tensor loops do not
    mind: say so when it happened."""
    other = meta.get("other_processes_cpus")
    if other is not None and other > 0.25:
        return (f"other processes kept {other:.1f} of the {meta['logical_cpus']} CPUs busy on "
                "average while this ran, which slows the multi-threaded kernels (bandwidth "
                "reference, fused_ema) far more than the single-threaded per-tensor loops; rerun "
                "on a quiet machine before trusting the ratios")
    return ""


def available_bytes(device: str) -> Optional[int]:
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


# --------------------------------------------------------------------------------------
# Measuring

class harness_threads:
    """The harness's own work (making a case, resetting and checking EMAs) runs on one
    thread: on a machine shared with other processes, a multi-threaded copy waits for
    descheduled threads at every parallel region. The timed updates use --threads."""

    def __init__(self, n: int = 1):
        self.n = n

    def __enter__(self):
        self.saved = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.saved)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _clock(device: str):
    """The clock of torch.utils.benchmark.Timer: synchronizes first on CUDA."""
    if device != "cuda":
        return timeit.default_timer

    def clock() -> float:
        torch.cuda.synchronize()
        return timeit.default_timer()
    return clock


def summarize(times: List[float]) -> dict:
    times = sorted(times)
    if not times:
        return {}
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return {"median_s": statistics.median(times), "iqr_s": q[2] - q[0], "min_s": times[0],
            "samples": len(times)}


def cuda_extras(step, graph_safe: bool) -> dict:
    """Host time (call to return, no sync), device time and launches (profiler), graph replay."""
    out = {}
    host = []
    for _ in range(20):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        host.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    out["host_s"] = statistics.median(host)
    try:
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile

        n = 5
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(n):
                step()
            torch.cuda.synchronize()
        dev = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
        out["launches"] = len(dev) / n
        out["device_s"] = sum(e.time_range.elapsed_us() for e in dev) / n * 1e-6
        out["kernels"] = sorted({e.name[:60] for e in dev})
    except Exception as exc:  # profiler trouble must not lose the timings
        out["profiler_error"] = f"{type(exc).__name__}: {exc}"
    if not graph_safe:
        out["graph_error"] = "syncs with the host in every update"
        return out
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        graph.replay()
        torch.cuda.synchronize()
        m = benchmark.Timer("g.replay()", globals={"g": graph}).blocked_autorange(min_run_time=0.2)
        out["graph_s"] = m.median
    except Exception as exc:
        out["graph_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
        torch.cuda.synchronize()
    return out


# --profile: the methods the targets compare.
PROFILED = ("bw_add", "bw_add_tensors", "bw_copy", "foreach_lerp", "naive_mul_add", "plan",
            "fused_ema", "plan_x2", "plan_multi")


def profile_table(step, device: str, steps: int = 3) -> str:
    """torch.profiler's table of ``steps`` updates: ops, self times, calls (on CUDA the
    kernels and their launches). Each update is a ``record_function`` range, so calls that
    bypass the dispatcher (the EMAPlan binding) still show."""
    from torch.profiler import ProfilerActivity, profile, record_function

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            with record_function("one EMA update"):
                step()
        sync(device)
    sort = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    return f"{steps} updates\n" + prof.key_averages().table(sort_by=sort, row_limit=10)


def estimate_bytes(case: M.Case, ms: List[M.Method]) -> int:
    """Memory of a case with all its methods alive at once (rough)."""
    ema = case.numel * case.ema_dtype.itemsize * case.num_decays
    param = case.numel * case.param_dtype.itemsize
    owning = sum(1 for m in ms
                 if m.group == "library" or m.key in ("fused_ema", "foreach_lerp_buf"))
    refs = sum(1 for m in ms if m.reference)
    return param + 2 * ema + owning * ema + refs * 2 * M.ref_numel(case) * 4


def choose_rounds(call_s: List[float], rounds: int, per_round: float,
                  cap: Optional[float]) -> tuple:
    """``(rounds, slow_rounds, per_round)`` so that timing a case's methods fits in ``cap``
    seconds. A method costs a warm-up call, then per round a block of ``per_round`` seconds
    or, when one call takes longer (a slow method), one call. Cuts, in order: rounds of
    slow methods (down to 2), the length of a round (down to 50 ms), rounds of fast methods
    (down to 2), rounds of slow methods (down to 1)."""
    def cost(rf, rs, b):
        return sum(t + (rf * b if t <= b else rs * t) for t in call_s)
    rf = rs = max(1, rounds)
    b = per_round
    if cap is None:
        return rf, rs, b
    while cost(rf, rs, b) > cap and rs > 2:
        rs -= 1
    while cost(rf, rs, b) > cap and b > 0.05:
        b = max(0.05, b * 0.7)
    while cost(rf, rs, b) > cap and rf > 2:
        rf -= 1
    while cost(rf, rs, b) > cap and rs > 1:
        rs -= 1
    return rf, rs, b


class Budget:
    """Spreads ``seconds`` of wall time over the cases, in proportion to their weight
    (bytes moved by all their methods), after the fixed costs (building a case, checking
    its methods), which are forecast from the cases already run."""

    def __init__(self, seconds: float, weights: List[float]):
        self.seconds, self.weights = seconds, weights
        self.t0 = time.perf_counter()
        self.fixed_spent = self.weight_done = 0.0

    def cap(self, index: int, fixed_now: float) -> Optional[float]:
        if not self.seconds or self.seconds <= 0:
            return None
        w_now, w_future = self.weights[index], sum(self.weights[index + 1:])
        per_weight = (self.fixed_spent + fixed_now) / max(1e-9, self.weight_done + w_now)
        left = self.seconds - (time.perf_counter() - self.t0) - per_weight * w_future
        return max(0.0, left) * w_now / max(1e-9, w_now + w_future)

    def done(self, index: int, fixed: float) -> None:
        self.fixed_spent += fixed
        self.weight_done += self.weights[index]


def case_weight(model: str, kind: str, device: str, keys) -> float:
    spec = models.spec(model)
    n = sum(models.numel(s) for _, s in spec)
    per_element = {"fp32": 12, "bf16": 10, "fp32x2": 20}[kind]
    # bytes moved, plus a constant for each method's fixed costs (building, checking)
    per_method = n * per_element / 1e9 + 0.3 + len(spec) * 1e-4
    return len(M.methods_for(kind, device, keys)) * per_method


def run_case(model: str, kind: str, device: str, args, keys, pbar,
             budget: Optional[Budget] = None, index: int = 0) -> dict:
    t_case = time.perf_counter()
    t_timing = 0.0
    with harness_threads():
        case = M.build_case(model, kind, device, decays=(args.decay, args.decay2),
                            seed=args.seed)
    ms = M.methods_for(kind, device, keys)
    info = {
        "model": model, "model_label": models.label(model), "kind": kind,
        "kind_label": M.KIND_LABELS[kind], "device": device, "tensors": len(case.params),
        "numel": case.numel, "decays": list(case.decays),
        "bytes_per_update": case.bytes_per_update, "rows": [],
    }
    avail = available_bytes(device)
    sequential = args.sequential or (avail is not None and estimate_bytes(case, ms) > 0.6 * avail)
    info["mode"] = "sequential" if sequential else "interleaved"
    rows: Dict[str, dict] = {}
    runners: Dict[str, M.Runner] = {}
    call_s: Dict[str, float] = {}  # one call's time, from the check
    n_rounds = slow_rounds = max(1, args.rounds)
    per_round = args.min_run_time / n_rounds

    def time_methods(keys_to_time: List[str], rounds_of: Dict[str, int], per_round: float) -> None:
        """Round 1: ``blocked_autorange`` per method (warm-up, block size, samples). Later
        rounds: more blocks of the same size from the same clock, without a second warm-up,
        each round visiting the methods in a rotated order."""
        timers = {k: benchmark.Timer("step()", globals={"step": runners[k].step},
                                     num_threads=args.threads, label=model, sub_label=kind,
                                     description=k)
                  for k in keys_to_time}
        clock = _clock(device)
        blocks = {k: timeit.Timer("step()", timer=clock, globals={"step": runners[k].step})
                  for k in keys_to_time}
        number: Dict[str, int] = {}
        samples: Dict[str, List[float]] = {k: [] for k in keys_to_time}
        for rnd in range(max(rounds_of.values())):
            shift = rnd % len(keys_to_time)
            for k in keys_to_time[shift:] + keys_to_time[:shift]:
                if rnd >= rounds_of[k]:
                    continue
                if pbar is not None:
                    pbar.set_postfix_str(f"{model}/{kind}/{device}: {k}", refresh=False)
                try:
                    if rows[k]["status"] != "ok":
                        pass
                    elif rnd == 0:
                        m = timers[k].blocked_autorange(min_run_time=per_round)
                        samples[k] += m.times
                        number[k] = m.number_per_run
                    else:
                        block = statistics.median(samples[k]) * number[k]
                        for _ in range(max(1, int(per_round / block))):
                            samples[k].append(blocks[k].timeit(number[k]) / number[k])
                except Exception as exc:
                    rows[k].update(status="error", note=f"{type(exc).__name__}: {exc}")
                if pbar is not None:
                    pbar.update(1)
        for k in keys_to_time:
            if rows[k]["status"] != "ok":
                continue
            rows[k].update(summarize(samples[k]))
            if device == "cuda" and rows[k]["status"] == "ok":
                rows[k].update(cuda_extras(runners[k].step, M.METHOD_BY_KEY[k].graph_safe))

    for m in ms:
        row = {"method": m.key, "label": m.label, "group": m.group, "reference": m.reference,
               "bytes_per_update": m.bytes_per_update(case), "status": "ok", "note": ""}
        rows[m.key] = row
        if pbar is not None:
            pbar.set_postfix_str(f"{model}/{kind}/{device}: {m.key} (check)", refresh=False)
        try:
            runner = m.build(case)
            row["note"] = runner.note
            if m.reference:
                t = time.perf_counter()
                runner.step()
                sync(device)
                call_s[m.key] = time.perf_counter() - t
            else:  # two updates from a known start, against the closed form
                with harness_threads():
                    case.reset(runner.emas)
                sync(device)
                t = time.perf_counter()
                for _ in range(M.CHECK_STEPS):
                    runner.step()
                sync(device)
                call_s[m.key] = (time.perf_counter() - t) / M.CHECK_STEPS
                with harness_threads():
                    err = M.max_error(case, runner.emas)
                row["max_abs_err"] = err
                row["check"] = "ok" if err <= CHECK_TOL else "FAIL"
            sync(device)
        except M.Unsupported as exc:
            row.update(status="n/a", note=str(exc))
        except Exception as exc:
            row.update(status="error", note=f"{type(exc).__name__}: {str(exc).splitlines()[0]}")
        if pbar is not None:
            pbar.update(1)
        if row["status"] != "ok":
            if pbar is not None:
                pbar.update(max(1, args.rounds))
            continue
        runners[m.key] = runner
        if sequential:
            t = time.perf_counter()
            time_methods([m.key], {m.key: n_rounds}, per_round)
            t_timing += time.perf_counter() - t
            del runners[m.key], runner
            gc.collect()
    if not sequential and runners:
        cap = budget.cap(index, time.perf_counter() - t_case) if budget else None
        n_rounds, slow_rounds, per_round = choose_rounds([call_s[k] for k in runners], n_rounds,
                                                         per_round, cap)
        rounds_of = {k: n_rounds if call_s[k] <= per_round else slow_rounds for k in runners}
        t = time.perf_counter()
        time_methods(list(runners), rounds_of, per_round)
        t_timing += time.perf_counter() - t
        if pbar is not None:  # rounds the budget took away
            pbar.update(sum(max(1, args.rounds) - r for r in rounds_of.values()))
    if args.profile:
        info["profiles"] = {k: profile_table(r.step, device) for k, r in runners.items()
                            if k in PROFILED}
    info["rounds"], info["slow_rounds"], info["per_round_s"] = n_rounds, slow_rounds, per_round
    info["budget_reduced"] = (n_rounds, slow_rounds, per_round) != (
        max(1, args.rounds), max(1, args.rounds), args.min_run_time / max(1, args.rounds))

    ref_keys = ["bw_copy"] if device == "cuda" else ["bw_add", "bw_add_mixed"]
    ref_gbps = max((M.gbps(rows[k]["bytes_per_update"], rows[k]["median_s"]) for k in ref_keys
                    if k in rows and "median_s" in rows[k]), default=float("nan"))
    info["reference_gbps"] = ref_gbps
    base_naive = rows.get("naive_mul_add", {}).get("median_s")
    base_foreach = (rows.get("foreach_lerp") or rows.get("foreach_lerp_x2") or {}).get("median_s")
    for row in rows.values():
        med = row.get("median_s")
        if med:
            row["gbps"] = M.gbps(row["bytes_per_update"], med)
            row["share_of_reference"] = row["gbps"] / ref_gbps if ref_gbps == ref_gbps else None
            row["speedup_vs_naive"] = base_naive / med if base_naive else None
            row["speedup_vs_foreach_lerp"] = base_foreach / med if base_foreach else None
        info["rows"].append(row)
    del runners, case
    gc.collect()
    info["seconds"] = time.perf_counter() - t_case
    info["timing_seconds"] = t_timing
    if budget:
        budget.done(index, info["seconds"] - t_timing)
    return info


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
    ("cpu", "gpt2_small", "fp32", "GPT-2 small fp32: FusedEMA.update time / bandwidth ref time",
     "fused_ema", "bw_add", "time"),
    ("cpu", "gpt2_small", "fp32", "GPT-2 small fp32: EMAPlan.update_ time / a.add_(b) on the "
     "EMA's own tensors", "plan", "bw_add_tensors", "time"),
    ("cpu", "gpt2_small", "fp32x2", "GPT-2 small, two decays: FusedEMA(decays=2) speedup vs "
     "2 x EMAPlan.update_", "plan_x2", "fused_ema", "time"),
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
        check = "-" if r["reference"] else (
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


# --------------------------------------------------------------------------------------

def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    devs = devices(args.device)
    plan = plan_cases(args)
    keys = _split(args.methods)
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
    print(format_table(target_rows(targets), left=2))
    if load_warning(meta):
        print("WARNING: " + load_warning(meta))

    out_dir = Path(args.out_dir)
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
        if update_readme(Path(args.readme), block, tag):
            print(f"README results block updated: {args.readme}")
    else:
        print(f"README block: {paths['md']} (or rerun with --update-readme)")
    return result


if __name__ == "__main__":
    main()
