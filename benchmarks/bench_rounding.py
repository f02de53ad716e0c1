"""Stochastic rounding of bf16 EMAs (issue 17): accuracy against float64, and speed.

Accuracy (exact integer-keyed arithmetic: the same numbers on any machine):
  * a trajectory like training (weights ~ N(0, 0.02), each step a random-walk step of
    ``--sigma``), the EMA at decays 0.999 and 0.9999 over ``--steps`` steps kept four ways:
    float64 (the reference), float32, bf16 rounded to nearest and bf16 rounded
    stochastically; the error after the run in bf16 ulps and relative to how far the
    float64 EMA moved;
  * unbiasedness: the bf16 stochastic EMA of one trajectory with ``--seeds`` seeds, the mean
    over seeds against the float64 EMA (its error shrinks as 1/sqrt(seeds); round-to-nearest
    is one number whatever the seed).
Speed (GPT-2 small's shapes, bf16 params, ``EMAPlan.update_``): float32 EMA (10 bytes moved
per element), bf16 EMA to nearest and stochastic (6 bytes), the Python stochastic rounding
timm's ModelEmaV3 does (a float32 copy, the update, ``torch.randint``, a mask, a copy back),
and ``add_`` of flat tensors moving the same bytes as the bandwidth reference, interleaved
rounds of ``torch.utils.benchmark`` medians in one run.

    python benchmarks/bench_rounding.py            # about 2 minutes on 2 CPU cores

Writes bench_rounding.md / .json / .png under --out (default runs/, ignored by git);
--update-results writes them to benchmarks/results/.
"""
import argparse
import os
import platform
import sys
import time

import torch
import torch.utils.benchmark as benchmark

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import models  # noqa: E402
from outputs import add_output_args, write_results  # noqa: E402

from fused_ema import EMAPlan, backend, ema_update_  # noqa: E402

KINDS = ("float64", "float32", "bf16 nearest", "bf16 stochastic")


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """The bf16 ulp at each value (2**-7 of its power of two)."""
    e = torch.frexp(x.double().abs().clamp_min(2.0 ** -126))[1]
    return torch.ldexp(torch.ones_like(x, dtype=torch.float64), e - 8)


def trajectory(n: int, sigma: float, seed: int):
    """Weights like a trained layer's, then one random-walk step of sigma per call."""
    gen = torch.Generator().manual_seed(seed)
    # bf16 values: every EMA starts from the same exact numbers
    p = (torch.randn(n, generator=gen, dtype=torch.float64) * 0.02).bfloat16().double()
    while True:
        yield p
        p = p + sigma * torch.randn(n, generator=gen, dtype=torch.float64)


def run_emas(decay: float, steps: int, n: int, sigma: float, seeds=(0,), traj_seed: int = 0):
    """Each kind's EMA after `steps` updates of one trajectory; the stochastic one per seed."""
    walk = trajectory(n, sigma, traj_seed)
    p0 = next(walk)
    ref = p0.clone()
    f32, rn = p0.float(), p0.bfloat16()
    sr = [p0.bfloat16() for _ in seeds]
    src = p0.float()  # the params the EMAs read (float32, as a float32 master copy)
    plans_sr = [EMAPlan([e], [src], rounding="stochastic", seed=s) for e, s in zip(sr, seeds)]
    plan32, plan_rn = EMAPlan([f32], [src]), EMAPlan([rn], [src])
    for step in range(steps):
        p = next(walk)
        src.copy_(p)
        ref.lerp_(src.double(), 1.0 - decay)  # float64 of the same float32 params
        plan32.update_(decay)
        plan_rn.update_(decay)
        for plan in plans_sr:
            plan.update_(decay, step=step)
    return p0, ref, f32, rn, sr


def rms(x: torch.Tensor) -> float:
    return x.double().pow(2).mean().sqrt().item()


def error_row(p0, ref, e) -> dict:
    """Errors in units of the weights' RMS bf16 ulp, and against the EMA's movement."""
    err = e.double() - ref
    ulp = rms(bf16_ulp(ref))
    return {"rms_error_ulps": rms(err) / ulp, "rms_error_vs_movement": rms(err) / rms(ref - p0),
            "mean_error_ulps": err.mean().item() / ulp}


def accuracy(args) -> dict:
    out = {}
    for decay in (0.999, 0.9999):
        p0, ref, f32, rn, sr = run_emas(decay, args.steps, args.elements, args.sigma)
        out[f"{decay}"] = {"float32": error_row(p0, ref, f32),
                           "bf16 nearest": error_row(p0, ref, rn),
                           "bf16 stochastic": error_row(p0, ref, sr[0]),
                           "nearest_stuck_fraction": (rn.double() == p0.bfloat16().double())
                           .double().mean().item()}
    # unbiasedness: the mean over seeds of the stochastic EMA against float64
    decay = 0.999
    p0, ref, f32, rn, sr = run_emas(decay, args.bias_steps, args.elements, args.sigma,
                                    seeds=range(args.seeds))
    ulp = rms(bf16_ulp(ref))
    per_seed = torch.stack([(e.double() - ref) / ulp for e in sr])
    mean = per_seed.mean(0)
    nearest = (rn.double() - ref) / ulp
    out["bias"] = {"decay": decay, "steps": args.bias_steps, "seeds": args.seeds,
                   "mean_over_seeds_rms_ulps": rms(mean),
                   "one_seed_rms_ulps": rms(per_seed[0]),
                   "expected_if_unbiased_rms_ulps": rms(per_seed.std(0)) / args.seeds ** 0.5,
                   "nearest_rms_ulps": rms(nearest),
                   "mean_signed_ulps": mean.mean().item(),
                   "nearest_mean_signed_ulps": nearest.mean().item()}
    return out


def python_stochastic(emas, params, decay, gen):
    """timm ModelEmaV3's algorithm for a bf16 EMA: float32 copies, the update, random bits
    below the bf16 mantissa, truncation, a copy back."""
    wide = [e.float() for e in emas]
    ema_update_(wide, params, decay)
    for e, w in zip(emas, wide):
        bits = w.view(torch.int32)
        bits.add_(torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, generator=gen))
        bits.bitwise_and_(-(1 << 16))
        e.copy_(w)


def speed(args) -> dict:
    shapes = [s for _, s in models.spec(args.model)]
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen).bfloat16() for s in shapes]
    n = sum(p.numel() for p in params)
    e32 = [p.float() for p in params]
    rn = [p + 0.01 for p in params]
    sr = [p + 0.01 for p in params]
    py = [p + 0.01 for p in params]
    flat = {k: torch.randn(n, generator=gen).to(k) for k in (torch.float32, torch.bfloat16)}
    other16 = torch.randn(n, generator=gen).bfloat16()
    other32 = other16.float()
    plans = {"f32": EMAPlan(e32, params), "rn": EMAPlan(rn, params),
             "sr": EMAPlan(sr, params, rounding="stochastic")}
    step = [0]

    def sr_update():
        plans["sr"].update_(0.999, step=step[0])
        step[0] += 1

    rand = torch.Generator().manual_seed(1)
    methods = {  # name: (callable, bytes per element)
        "float32 EMA (nearest)": (lambda: plans["f32"].update_(0.999), 10),
        "bf16 EMA, nearest": (lambda: plans["rn"].update_(0.999), 6),
        "bf16 EMA, stochastic": (sr_update, 6),
        "bf16 EMA, Python stochastic (timm's algorithm)":
            (lambda: python_stochastic(py, params, 0.999, rand), 6),
        "reference: add_ float32 += float32 (12 B)": (lambda: flat[torch.float32].add_(other32),
                                                      12),
        "reference: add_ bf16 += bf16 (6 B)": (lambda: flat[torch.bfloat16].add_(other16), 6),
    }
    times = {k: [] for k in methods}
    for rnd in range(args.rounds):
        names = list(methods) if rnd % 2 == 0 else list(methods)[::-1]  # no position bias
        for name in names:
            t = benchmark.Timer("f()", globals={"f": methods[name][0]})
            times[name].append(t.blocked_autorange(min_run_time=args.seconds).median)
    rows = {}
    for name, ts in times.items():
        ts = sorted(ts)
        med = ts[len(ts) // 2]
        rows[name] = {"ms": med * 1e3, "min_ms": ts[0] * 1e3, "bytes_per_element":
                      methods[name][1], "GB_per_s": methods[name][1] * n / med / 1e9}
    f32 = rows["float32 EMA (nearest)"]["ms"]
    wall = rows["reference: add_ float32 += float32 (12 B)"]["GB_per_s"]
    for r in rows.values():
        r["vs_float32_ema"] = r["ms"] / f32
        r["vs_bandwidth"] = r["GB_per_s"] / wall
    return {"model": models.label(args.model), "elements": n, "rows": rows}


def plot(path, result, args):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, decay in zip(axes, ("0.999", "0.9999")):
        rows = result["accuracy"][decay]
        names = ["float32", "bf16 nearest", "bf16 stochastic"]
        ax.bar(names, [rows[k]["rms_error_vs_movement"] for k in names],
               color=["#4c72b0", "#c44e52", "#55a868"])
        ax.set_yscale("log")
        ax.set_title(f"decay {decay}, {args.steps:,} steps")
        ax.set_ylabel("RMS error / RMS movement of the float64 EMA")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def render(result, args) -> str:
    meta, acc, sp = result["meta"], result["accuracy"], result["speed"]
    lines = ["# Stochastic rounding of bf16 EMAs", "",
             f"Command: `{meta['command']}`; torch {meta['torch']}, {meta['backend']} backend, "
             f"{meta['threads']} threads, load average {meta['loadavg_start']:.1f} at the "
             f"start, {meta['loadavg_end']:.1f} at the end; {meta['seconds']:.0f} s.", "",
             f"## Accuracy after {args.steps:,} steps ({args.elements:,} weights ~ N(0, 0.02), "
             f"a random-walk step of {args.sigma:g} per update)", "",
             "| decay | EMA | RMS error (bf16 ulps) | RMS error / how far the float64 EMA "
             "moved | mean signed error (ulps) |", "|---|---|---|---|---|"]
    lines.insert(-2, "Errors against the float64 EMA of the same float32 params, in units of "
                 "the weights' RMS bf16 ulp.")
    lines.insert(-2, "")
    for decay in ("0.999", "0.9999"):
        for kind in ("float32", "bf16 nearest", "bf16 stochastic"):
            r = acc[decay][kind]
            lines.append(f"| {decay} | {kind} | {r['rms_error_ulps']:.3g} | "
                         f"{r['rms_error_vs_movement']:.3g} | {r['mean_error_ulps']:+.3g} |")
    lines += ["", "Round-to-nearest bf16 EMAs that never left their starting value: "
              + ", ".join(f"{acc[d]['nearest_stuck_fraction']:.1%} at decay {d}"
                          for d in ("0.999", "0.9999")) + ".", ""]
    b = acc["bias"]
    lines += [f"## Unbiasedness (decay {b['decay']}, {b['steps']:,} steps, {b['seeds']} seeds)",
              "",
              f"- stochastic, one seed: RMS error {b['one_seed_rms_ulps']:.3g} ulps",
              f"- stochastic, mean over {b['seeds']} seeds: RMS error "
              f"{b['mean_over_seeds_rms_ulps']:.3g} ulps (unbiased noise would give "
              f"{b['expected_if_unbiased_rms_ulps']:.3g}); mean signed error "
              f"{b['mean_signed_ulps']:+.3g} ulps",
              f"- round to nearest (any seed): RMS error {b['nearest_rms_ulps']:.3g} ulps, mean "
              f"signed error {b['nearest_mean_signed_ulps']:+.3g} ulps", "",
              f"## Speed: {sp['model']} ({sp['elements']:,} elements), bf16 params, "
              f"medians of {args.rounds} interleaved rounds", "",
              "| update | ms | bytes / element | GB/s | of the float32 add_'s GB/s | x "
              "float32-EMA time |", "|---|---|---|---|---|---|"]
    for name, r in sp["rows"].items():
        lines.append(f"| {name} | {r['ms']:.1f} | {r['bytes_per_element']} | "
                     f"{r['GB_per_s']:.1f} | {r['vs_bandwidth']:.0%} | "
                     f"{r['vs_float32_ema']:.2f}x |")
    g = result["goals"]
    lines += ["", f"Goal (issue 17): the stochastic bf16 update at most 0.7x the float32-EMA "
              f"update's time: {g['stochastic_vs_float32_ema']:.2f}x here; it runs at "
              f"{g['stochastic_vs_same_bytes_reference']:.2f}x the time of a flat add_ moving "
              "the same 6 bytes per element."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=10_000)
    p.add_argument("--bias-steps", type=int, default=1_000)
    p.add_argument("--seeds", type=int, default=32)
    p.add_argument("--elements", type=int, default=16_384)
    p.add_argument("--sigma", type=float, default=1e-4)
    p.add_argument("--model", default="gpt2_small")
    p.add_argument("--seconds", type=float, default=0.3, help="per speed measurement")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--quick", action="store_true", help="a small run (tests)")
    add_output_args(p, __file__)
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.bias_steps, args.seeds, args.elements = 300, 100, 4, 1024
        args.model, args.seconds, args.rounds = "tiny", 0.02, 2
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    start, load0 = time.time(), os.getloadavg()[0]
    result = {"accuracy": accuracy(args), "speed": speed(args)}
    rows = result["speed"]["rows"]
    result["goals"] = {
        "stochastic_vs_float32_ema": rows["bf16 EMA, stochastic"]["vs_float32_ema"],
        "stochastic_vs_same_bytes_reference": rows["bf16 EMA, stochastic"]["ms"]
        / rows["reference: add_ bf16 += bf16 (6 B)"]["ms"]}
    cmd = "python benchmarks/bench_rounding.py " + " ".join(argv if argv is not None
                                                            else sys.argv[1:])
    result["meta"] = {"command": cmd.strip(), "torch": torch.__version__,
                      "backend": backend("cpu"), "machine": platform.machine(),
                      "threads": torch.get_num_threads(), "loadavg_start": load0,
                      "loadavg_end": os.getloadavg()[0], "seconds": time.time() - start}
    os.makedirs(args.out, exist_ok=True)
    text = render(result, args)
    if plot(os.path.join(args.out, "bench_rounding.png"), result, args):
        text += "\n![errors](bench_rounding.png)\n"
    write_results(args.out, "bench_rounding", result, text)


if __name__ == "__main__":
    main()
