"""Frozen parameters (issue 17): EMA-owned bytes and update time of a LoRA layout.

A model of ``--layers`` layers, each a frozen bf16 base (``--base-mult`` square
``--width`` x ``--width`` weights) and trainable bf16 adapters A (r x width) and B
(width x r). The goal: with ``frozen="share"`` (the default) the EMA owns at most 1.05x the
adapters' fp32 bytes, and its update with a 4x larger frozen base takes at most 1.2x the
time. ``frozen="copy"`` (the behaviour before) is measured beside them. Times are medians
of ``torch.utils.benchmark`` ``blocked_autorange`` over interleaved rounds whose order
alternates.

    python benchmarks/bench_frozen.py            # 16 layers, base 128 MiB, adapters 1 MiB

Writes bench_frozen.md / .json under --out (default runs/ at the repository root, ignored
by git); --update-results writes them to benchmarks/results/.
"""
import argparse
import os
import platform
import sys

import torch
import torch.utils.benchmark as benchmark
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from outputs import add_output_args, write_results  # noqa: E402

from fused_ema import FusedEMA, backend  # noqa: E402


class Layer(nn.Module):
    def __init__(self, width: int, base_mult: int, r: int):
        super().__init__()
        self.base = nn.ParameterList(
            nn.Parameter(torch.randn(width, width, dtype=torch.bfloat16), requires_grad=False)
            for _ in range(base_mult))
        self.A = nn.Parameter(torch.randn(r, width, dtype=torch.bfloat16))
        self.B = nn.Parameter(torch.randn(width, r, dtype=torch.bfloat16))


def lora(layers: int, width: int, base_mult: int, r: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[Layer(width, base_mult, r) for _ in range(layers)])


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--width", type=int, default=2048)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--seconds", type=float, default=0.3, help="per measurement")
    p.add_argument("--rounds", type=int, default=15)
    add_output_args(p, __file__)
    args = p.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    cases = {}
    for mult, frozen in ((1, "share"), (4, "share"), (1, "copy")):
        model = lora(args.layers, args.width, mult, args.rank)
        ema = FusedEMA(model, decay=0.999, frozen=frozen)
        adapters = [p for p in model.parameters() if p.requires_grad]
        cases[f"base x{mult}, frozen={frozen!r}"] = dict(
            ema=ema, base_MiB=nbytes(p for p in model.parameters() if not p.requires_grad) / 2**20,
            adapters_fp32_MiB=sum(p.numel() * 4 for p in adapters) / 2**20,
            ema_owned_MiB=nbytes(ema.state_dict()["emas"][0].values()) / 2**20, times=[])
    names = list(cases)
    for rnd in range(args.rounds):
        for name in names if rnd % 2 == 0 else names[::-1]:  # no position bias
            t = benchmark.Timer("ema.update()", globals={"ema": cases[name]["ema"]})
            cases[name]["times"].append(t.blocked_autorange(min_run_time=args.seconds).median)
    rows = {}
    for name, c in cases.items():
        ts = sorted(c.pop("times"))
        c.pop("ema")
        rows[name] = dict(c, update_ms=ts[len(ts) // 2] * 1e3, min_ms=ts[0] * 1e3,
                          owned_vs_adapters=c["ema_owned_MiB"] / c["adapters_fp32_MiB"])
    one, four = (rows[f"base x{m}, frozen='share'"]["update_ms"] for m in (1, 4))
    goals = {"ema_owned_vs_adapters_fp32": rows[names[0]]["owned_vs_adapters"],
             "update_4x_base_vs_1x": four / one}
    cmd = "python benchmarks/bench_frozen.py " + " ".join(argv if argv is not None
                                                          else sys.argv[1:])
    meta = {"command": cmd.strip(), "torch": torch.__version__, "backend": backend("cpu"),
            "machine": platform.machine(), "threads": torch.get_num_threads(),
            "loadavg_end": os.getloadavg()[0]}
    lines = [f"# Frozen parameters: a LoRA layout (CPU, {meta['backend']} backend)", "",
             f"Command: `{meta['command']}`; torch {meta['torch']}, {meta['threads']} threads, "
             f"load average at the end {meta['loadavg_end']:.1f}. {args.layers} layers, bf16 "
             f"base and adapters (r={args.rank}), fp32 EMA; medians of {args.rounds} "
             "interleaved rounds.", "",
             "| case | frozen base MiB | adapters fp32 MiB | EMA-owned MiB | owned / adapters "
             "| update ms (median) | min ms |", "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['base_MiB']:.1f} | {r['adapters_fp32_MiB']:.3f} | "
                     f"{r['ema_owned_MiB']:.3f} | {r['owned_vs_adapters']:.3f}x | "
                     f"{r['update_ms']:.4f} | {r['min_ms']:.4f} |")
    lines += ["", f"Goals (issue 17): EMA-owned bytes {goals['ema_owned_vs_adapters_fp32']:.3f}x "
              "the adapters' fp32 bytes (at most 1.05x); update time with a 4x frozen base "
              f"{goals['update_4x_base_vs_1x']:.3f}x (at most 1.2x)."]
    write_results(args.out, "bench_frozen", {"meta": meta, "rows": rows, "goals": goals},
                  "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
