"""The measuring side of the benchmark: the machine it runs on (and how busy it is), and
``run_case``, which checks every method of one case against the closed form and times it
with ``torch.utils.benchmark`` in interleaved rounds within a time budget."""
import datetime
import gc
import os
import platform
import statistics
import subprocess
import time
import timeit
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch.utils import benchmark

import fused_ema
import cases
import methods as M
import models

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CHECK_TOL = 1e-5  # max |EMA - float64 reference| after two updates (values are O(1))


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


def _clock(device: str, host_cost: bool = False):
    """The clock of torch.utils.benchmark.Timer: synchronizes first on CUDA. For a
    host-cost case, the calling thread's CPU time: what the update costs the host, without
    the time slices other processes of a busy machine take in between (no kernel runs)."""
    if host_cost:
        return time.thread_time
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
PROFILED = ("bw_add", "bw_add_tensors", "bw_copy", "foreach_lerp", "compiled_foreach_lerp",
            "naive_mul_add", "plan", "fused_ema", "plan_x2", "plan_multi")


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


def estimate_bytes(case: cases.Case, ms: List[M.Method]) -> int:
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
        case = cases.build_case(model, kind, device, decays=(args.decay, args.decay2),
                            seed=args.seed)
    ms = M.methods_for(kind, device, keys)
    info = {
        "model": model, "model_label": models.label(model), "kind": kind,
        "kind_label": cases.KIND_LABELS[kind], "device": device, "tensors": len(case.params),
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
        clock = _clock(device, host_cost=model in models.HOST_COST_MODELS)
        timers = {k: benchmark.Timer("step()", globals={"step": runners[k].step},
                                     num_threads=args.threads, label=model, sub_label=kind,
                                     description=k, timer=clock)
                  for k in keys_to_time}
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
            if m.max_tensors is not None and len(case.params) > m.max_tensors and (
                    keys is None or m.key not in keys):
                raise M.Unsupported(f"over {m.max_tensors} tensors: {m.limited} (name it in "
                                    "--methods to run it)")
            runner = m.build(case)
            row["note"] = runner.note
            if m.reference or not m.writes:
                t = time.perf_counter()
                runner.step()
                sync(device)
                call_s[m.key] = time.perf_counter() - t
            else:  # two updates from a known start, against the closed form
                with harness_threads():
                    case.reset(runner.emas)
                sync(device)
                t = time.perf_counter()
                for _ in range(cases.CHECK_STEPS):
                    runner.step()
                sync(device)
                call_s[m.key] = (time.perf_counter() - t) / cases.CHECK_STEPS
                with harness_threads():
                    err = cases.max_error(case, runner.emas)
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
            row["share_of_reference"] = (row["gbps"] / ref_gbps
                                         if ref_gbps and ref_gbps == ref_gbps else None)
            writes = M.METHOD_BY_KEY[row["method"]].writes  # else no update to compare
            row["speedup_vs_naive"] = base_naive / med if base_naive and writes else None
            row["speedup_vs_foreach_lerp"] = (base_foreach / med if base_foreach and writes
                                              else None)
        info["rows"].append(row)
    del runners, case
    gc.collect()
    info["seconds"] = time.perf_counter() - t_case
    info["timing_seconds"] = t_timing
    if budget:
        budget.done(index, info["seconds"] - t_timing)
    return info
