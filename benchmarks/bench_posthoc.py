"""Post-hoc EMA benchmark: per-step cost, snapshot cost, synthesis time and peak memory.

Per step (two tracked profiles, sigma_rel 0.05 and 0.10), timed side by side in
interleaved rounds of ``torch.utils.benchmark.Timer.blocked_autorange``:

* ``fused_ema.PostHocEMA.update()``: both profiles in one fused pass;
* ``ema_pytorch.PostHocEMA.update()`` (0.8.3, ``update_every=1``): tensor by tensor, per
  profile, with a ``.item()`` per profile;
* two separate ``FusedEMA``s with ``PowerFunction`` schedules (two fused passes).

Snapshot: the time the training thread is held by ``PostHocEMA.snapshot()`` (the fused copy
into the staging buffer) and the writer's total (copy + CRC + ``torch.save`` + fsync),
against ``ema_pytorch.PostHocEMA.checkpoint()`` (fp16, synchronous).

Synthesis: wall time and peak resident memory above the process's baseline (the model and
its live EMAs), for 10 and 100 snapshots, each in a fresh subprocess (Linux: the peak is
reset through /proc/self/clear_refs), ours (fp32 snapshots, streamed) and ema-pytorch's
(fp16 snapshots).

    python benchmarks/bench_posthoc.py                       # resnet50 + many_small
    python benchmarks/bench_posthoc.py --models tiny --synth tiny:3,tiny:10 --quick  # smoke

Writes bench_posthoc.md / .json (``--quick``: bench_posthoc_quick.*) under --out (default
runs/ at the repository root, ignored by git); --update-results writes them to
benchmarks/results/, the committed reference results.
"""
import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Dict, List

import torch
import torch.utils.benchmark as benchmark
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from models import label, numel, spec  # noqa: E402
from outputs import add_output_args, write_results  # noqa: E402

from fused_ema import FusedEMA, PostHocEMA, backend, schedules  # noqa: E402

try:
    import ema_pytorch
except ImportError:  # optional benchmark extra
    ema_pytorch = None

SIGMA_RELS = (0.05, 0.10)


class Params(nn.Module):
    """A parameter set from models.py as a module (names made attribute-safe)."""

    def __init__(self, model: str, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.params = nn.ParameterList(
            nn.Parameter(torch.randn(shape, generator=g) * 0.02) for _, shape in spec(model))


def _perturb(module: nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.mul_(0.999).add_(0.001)


def per_step(model: str, seconds: float, rounds: int, workdir: str) -> Dict[str, dict]:
    net = Params(model)
    runners = {}
    ph = PostHocEMA(net, sigma_rels=SIGMA_RELS, snapshot_every=10**9,
                    directory=os.path.join(workdir, model, "step_ours"))
    runners["fused_ema PostHocEMA (one fused pass)"] = ph.update
    two = [FusedEMA(net, decay=schedules.PowerFunction.from_sigma_rel(s)) for s in SIGMA_RELS]
    runners["two FusedEMA (two fused passes)"] = lambda: [e.update() for e in two]
    if ema_pytorch is not None:
        ref = ema_pytorch.PostHocEMA(net, sigma_rels=SIGMA_RELS, update_every=1,
                                     checkpoint_every_num_steps="manual",
                                     checkpoint_folder=os.path.join(workdir, model, "step_ref"))
        runners["ema-pytorch PostHocEMA"] = ref.update
    for fn in runners.values():  # warm-up (first update copies, plans are built)
        fn()
        fn()
    samples: Dict[str, List[float]] = {k: [] for k in runners}
    for _ in range(rounds):  # interleaved: machine noise hits all methods alike
        for k, fn in runners.items():
            m = benchmark.Timer("fn()", globals={"fn": fn}).blocked_autorange(
                min_run_time=seconds / rounds)
            samples[k] += [t for t in m.times]
    out = {}
    for k, ts in samples.items():
        ts = sorted(ts)
        out[k] = {"median_ms": ts[len(ts) // 2] * 1e3, "min_ms": ts[0] * 1e3, "n": len(ts)}
    ph.close()
    return out


def snapshot_cost(model: str, repeats: int, workdir: str) -> Dict[str, dict]:
    net = Params(model)
    d = os.path.join(workdir, model, "snap_ours")
    ph = PostHocEMA(net, sigma_rels=SIGMA_RELS, snapshot_every=10**9, directory=d)
    ph.update()
    held, total = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        ph.snapshot()
        t1 = time.perf_counter()
        ph.flush()
        t2 = time.perf_counter()
        held.append(t1 - t0)
        total.append(t2 - t0)
        ph.update()
    ph.close()
    out = {"fused_ema snapshot(): training thread held": _stats(held),
           "fused_ema snapshot(): until on disk (writer thread)": _stats(total)}
    if ema_pytorch is not None:
        ref = ema_pytorch.PostHocEMA(net, sigma_rels=SIGMA_RELS, update_every=1,
                                     checkpoint_every_num_steps="manual",
                                     checkpoint_folder=os.path.join(workdir, model, "snap_ref"))
        ref.update()
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            ref.checkpoint()
            ts.append(time.perf_counter() - t0)
            ref.update()
        out["ema-pytorch checkpoint() (fp16, synchronous)"] = _stats(ts)
    shutil.rmtree(d, ignore_errors=True)
    return out


def _stats(ts: List[float]) -> dict:
    ts = sorted(ts)
    return {"median_ms": ts[len(ts) // 2] * 1e3, "min_ms": ts[0] * 1e3, "n": len(ts)}


def make_snapshots(model: str, count: int, workdir: str) -> Dict[str, str]:
    """Trains nothing: perturbs the weights between snapshots, into both libraries' folders."""
    net = Params(model)
    ours = os.path.join(workdir, f"ours_{count}")
    theirs = os.path.join(workdir, f"ref_{count}")
    ph = PostHocEMA(net, sigma_rels=SIGMA_RELS, snapshot_every=10, directory=ours)
    ref = None
    if ema_pytorch is not None:
        ref = ema_pytorch.PostHocEMA(net, sigma_rels=SIGMA_RELS, update_every=1,
                                     checkpoint_every_num_steps=10, checkpoint_folder=theirs)
    for _ in range(10 * count):
        _perturb(net)
        ph.update()
        if ref is not None:
            ref.update()
    ph.close()
    return {"ours": ours, "theirs": theirs if ref is not None else None}


def synth_child(which: str, model: str, directory: str) -> None:
    """Runs in a fresh process: prints the synthesis time and the peak RSS above baseline."""
    net = Params(model)
    if which == "ours":
        ph = PostHocEMA(net, sigma_rels=SIGMA_RELS, snapshot_every=10, directory=directory)
        run = lambda: ph.synthesize(sigma_rel=0.07)  # noqa: E731
    else:
        ref = ema_pytorch.PostHocEMA(net, sigma_rels=SIGMA_RELS, update_every=1,
                                     checkpoint_every_num_steps=10, checkpoint_folder=directory)
        run = lambda: ref.synthesize_ema_model(sigma_rel=0.07)  # noqa: E731
    # The baseline holds the model and the live EMAs (the state of a training process).
    # Linux: writing 5 to clear_refs resets the peak (VmHWM) to the current RSS, so the peak
    # read afterwards is the synthesis's own (file pages mapped by mmap count too).
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_kb("VmRSS") * 1024
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = run()
    dt = time.perf_counter() - t0
    peak = _status_kb("VmHWM") * 1024
    del result
    print(json.dumps({"seconds": dt, "peak_above_baseline_bytes": peak - base}))


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def synthesis(runs: List[tuple], workdir: str) -> Dict[str, dict]:
    out = {}
    for model, count in runs:
        model_bytes = sum(numel(s) for _, s in spec(model)) * 4
        dirs = make_snapshots(model, count, workdir)
        for which in ("ours", "theirs"):
            if dirs[which] is None:
                continue
            cmd = [sys.executable, os.path.abspath(__file__), "--synth-child", which, model,
                   dirs[which]]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
            if proc.returncode != 0:
                raise RuntimeError(proc.stderr[-2000:])
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            name = "fused_ema (fp32 snapshots, streamed)" if which == "ours" else \
                "ema-pytorch (fp16 snapshots)"
            out[f"{label(model)} | {name}, {count} snapshots"] = {
                "seconds": r["seconds"],
                "peak_MB": r["peak_above_baseline_bytes"] / 2**20,
                "peak_model_copies": r["peak_above_baseline_bytes"] / model_bytes,
            }
        for d in dirs.values():
            if d:
                shutil.rmtree(d, ignore_errors=True)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="resnet50,many_small")
    p.add_argument("--synth", default="resnet50:10,many_small:10,many_small:100",
                   help="synthesis runs, model:snapshots (each snapshot = 2 fp32 copies on disk)")
    p.add_argument("--seconds", type=float, default=6.0, help="timing per method and model")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--synth-child", nargs=3, metavar=("WHICH", "MODEL", "DIR"),
                   help=argparse.SUPPRESS)
    add_output_args(p, __file__)
    args = p.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    if args.synth_child:
        return synth_child(*args.synth_child)
    runs = [(m, int(c)) for m, c in (x.split(":") for x in args.synth.split(","))]
    if args.quick:
        args.seconds, args.rounds = 0.3, 1
    workdir = tempfile.mkdtemp(prefix="bench_posthoc_")
    t_start = time.perf_counter()
    results = {"per_step": {}, "snapshot": {}, "synthesis": {}}
    try:
        for model in args.models.split(","):
            print(f"[per step] {model}", flush=True)
            results["per_step"][model] = per_step(model, args.seconds, args.rounds, workdir)
            print(f"[snapshot] {model}", flush=True)
            results["snapshot"][model] = snapshot_cost(model, 3 if args.quick else 5, workdir)
        print(f"[synthesis] {args.synth}", flush=True)
        results["synthesis"] = synthesis(runs, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    meta = {"command": "python benchmarks/bench_posthoc.py " + " ".join(argv or sys.argv[1:]),
            "torch": torch.__version__, "backend": backend("cpu"), "machine": platform.machine(),
            "threads": torch.get_num_threads(), "loadavg_end": os.getloadavg()[0],
            "wall_s": time.perf_counter() - t_start,
            "ema_pytorch": getattr(ema_pytorch, "__version__", "installed") if ema_pytorch
            else None}
    write(results, meta, args.out, quick=args.quick)


def write(results: dict, meta: dict, out: str, quick: bool) -> None:
    stem = "bench_posthoc_quick" if quick else "bench_posthoc"
    lines = [f"# Post-hoc EMA benchmark (CPU, {meta['backend']} backend)", "",
             f"Command: `{meta['command']}`; torch {meta['torch']}, {meta['threads']} threads, "
             f"load average at the end {meta['loadavg_end']:.1f} (a shared machine: compare "
             "rows of one table, measured side by side, not across runs).", "",
             "## Per step: two tracked profiles (sigma_rel 0.05, 0.10)", "",
             "| parameter set | method | median ms | min ms | vs fused_ema PostHocEMA |",
             "|---|---|---|---|---|"]
    for model, rows in results["per_step"].items():
        base = rows["fused_ema PostHocEMA (one fused pass)"]["median_ms"]
        for k, r in rows.items():
            lines.append(f"| {label(model)} | {k} | {r['median_ms']:.3f} | {r['min_ms']:.3f} | "
                         f"{r['median_ms'] / base:.2f}x |")
    lines += ["", "## Snapshot of both profiles", "", "| parameter set | what | median ms |",
              "|---|---|---|"]
    for model, rows in results["snapshot"].items():
        for k, r in rows.items():
            lines.append(f"| {label(model)} | {k} | {r['median_ms']:.1f} |")
    lines += ["", "## Synthesis (sigma_rel 0.07), each in a fresh process", "",
              "| parameter set | method, snapshots | seconds | peak MB above baseline | "
              "= fp32 model copies |", "|---|---|---|---|---|"]
    for k, r in results["synthesis"].items():
        lines.append(f"| {k} | {r['seconds']:.2f} | {r['peak_MB']:.0f} | "
                     f"{r['peak_model_copies']:.2f} |")
    write_results(out, stem, {"meta": meta, "results": results}, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
