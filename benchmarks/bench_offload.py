"""A CUDA model's host-memory EMA with ``non_blocking=True`` (issue 18): what crosses PCIe
and what is pinned per update, counted on the fake CUDA runtime.

There is no GPU here, so this counts, it does not time: the model's "device" tensors are
host tensors, tests/fake_cuda's queued runtime stands for CUDA (its streams are queues that
run work once what it waits on is done; a device-to-host copy is a memcpy it counts, pinned
memory an allocation it tracks) and ``binding.host_offload`` is pointed at the fake's
``HostOffload``. The rest is FusedEMA's own path: each step's values are written through
the fake's training stream (as an optimizer's kernels are queued), then ``update()`` queues
the chunked copies and the worker consumes them. Goals: bytes copied per update = the
averaged params once (not the EMA); pinned memory at most the cap (plus a word per slot).
Each update is checked bit for bit against a synchronous FusedEMA given the same values.

    python benchmarks/bench_offload.py            # ResNet-50, GPT-2 small, ViT-B/16

Builds the fake runtime's module first (about a minute, once). Writes bench_offload.md /
.json under --out (default runs/ at the repository root, ignored by git); --update-results
writes them to benchmarks/results/.
"""
import argparse
import os
import platform
import sys

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

import models  # noqa: E402
from outputs import add_output_args, write_results  # noqa: E402

import fused_ema  # noqa: E402
from fused_ema import FusedEMA, backend, binding  # noqa: E402

TRAIN = 1  # the fake's current stream: the training stream
MIB = 1 << 20


def fake_runtime():
    """The fake CUDA runtime's module, from the tests of the fused_ema checkout in use
    (built on first use)."""
    tests = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(fused_ema.__file__))),
                         "tests")
    if not os.path.isdir(os.path.join(tests, "fake_cuda")):
        raise SystemExit("bench_offload.py needs fused_ema installed from a checkout "
                         "(pip install -e .): it builds tests/fake_cuda")
    sys.path.insert(0, tests)
    import fake_cuda

    return fake_cuda.load()


def measure(fake, name: str, steps: int, cap: int, chunk: int) -> dict:
    fake.q_install()  # a fresh runtime per model
    made = []

    def offload(*args):
        made.append(fake.HostOffload(*args, cap_bytes=cap, chunk_bytes=chunk))
        return made[-1]

    host_offload, binding.host_offload = binding.host_offload, lambda *_: offload
    try:
        g = torch.Generator().manual_seed(0)
        model = nn.ParameterList(nn.Parameter(torch.randn(tuple(s), generator=g))
                                 for _, s in models.spec(name))
        ema = FusedEMA(model, decay=0.999, non_blocking=True)
        values = [p.detach().clone() for p in model]  # the synchronous EMA's model
        ref = FusedEMA(values, decay=0.999)
        counts, same = [], True
        for t in range(1, steps + 1):
            fake.q_reset_counters()
            for p, r in zip(model, values):
                new = r.add(float(t))  # this step's values: through the training stream
                fake.q_write(TRAIN, p.detach(), new)
                r.copy_(new)
            ema.update()
            ref.update()
            ema.synchronize()
            counts.append(fake.q_counters())
            same = same and all(torch.equal(a, b) for (_, a, _), (_, b, _)
                                in zip(ema.named_pairs(), ref.named_pairs()))
        errors = fake.q_errors()
        fake.q_drain()
    finally:
        binding.host_offload = host_offload
        fake.q_uninstall()
    off = made[0]
    param_bytes = sum(p.numel() * p.element_size() for p in model)
    return {"model": name, "tensors": len(model), "param_bytes": param_bytes,
            "ema_bytes": sum(e.numel() * e.element_size() for e in ema.parameters()),
            "d2h_bytes_per_update": max(c["d2h_bytes"] for c in counts),
            "d2h_copies_per_update": max(c["d2h_copies"] for c in counts),
            "pinned_peak": max(c["pinned_peak"] for c in counts),
            "training_thread_host_waits": sum(c["training_host_waits"] for c in counts),
            "chunks": off.num_chunks, "slots": off.num_slots, "slot_bytes": off.slot_bytes,
            "same_bits": same, "fake_errors": errors}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet50", "gpt2_small", "vit_b16"],
                   choices=sorted(models.MODELS))
    p.add_argument("--steps", type=int, default=2, help="updates per model")
    p.add_argument("--cap-mib", type=int, default=None,
                   help="pinned staging cap (default: the offload's, 256 MiB)")
    p.add_argument("--chunk-mib", type=int, default=None,
                   help="chunk size (default: the offload's, 32 MiB)")
    add_output_args(p, __file__)
    args = p.parse_args(argv)
    fake = fake_runtime()
    cap = args.cap_mib * MIB if args.cap_mib else fake.OFFLOAD_CAP_BYTES
    chunk = args.chunk_mib * MIB if args.chunk_mib else fake.OFFLOAD_CHUNK_BYTES
    rows = [measure(fake, name, args.steps, cap, chunk) for name in args.models]
    flags = max(4 * r["slots"] + 8 for r in rows)
    goals = {"d2h_over_params": max(r["d2h_bytes_per_update"] / r["param_bytes"] for r in rows),
             "pinned_peak_over_cap": max(r["pinned_peak"] / cap for r in rows),
             "all_same_bits": all(r["same_bits"] for r in rows),
             "no_training_thread_host_wait": all(r["training_thread_host_waits"] == 0
                                                 for r in rows),
             "no_hazard": all(not r["fake_errors"] for r in rows)}
    cmd = "python benchmarks/bench_offload.py " + " ".join(
        argv if argv is not None else sys.argv[1:])
    meta = {"command": cmd.strip(), "torch": torch.__version__, "backend": backend("cpu"),
            "machine": platform.machine(), "cap_bytes": cap, "chunk_bytes": chunk,
            "steps": args.steps}
    lines = ["# non_blocking=True, a CUDA model, the EMA in host memory: PCIe bytes and "
             "pinned memory per update (fake CUDA runtime)", "",
             f"Command: `{meta['command']}`; torch {meta['torch']}, {meta['backend']} CPU "
             f"kernels; staging cap {cap / MIB:.0f} MiB, chunks of {chunk / MIB:.0f} MiB; "
             f"{args.steps} updates per model, fp32 params and EMA. Counted on the fake "
             "runtime of tests/fake_cuda (no GPU here): counts, not times.", "",
             "| model | tensors | params MiB | EMA MiB | copied per update MiB | copies per "
             "update | chunks | slots | pinned peak MiB | same bits |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {models.label(r['model'])} | {r['tensors']} | {r['param_bytes'] / MIB:.1f} | "
            f"{r['ema_bytes'] / MIB:.1f} | {r['d2h_bytes_per_update'] / MIB:.1f} | "
            f"{r['d2h_copies_per_update']} | {r['chunks']} | {r['slots']} x "
            f"{r['slot_bytes'] / MIB:.1f} MiB | {r['pinned_peak'] / MIB:.2f} | "
            f"{'yes' if r['same_bits'] else 'NO'} |")
    lines += ["", f"Goals (issue 18): bytes copied per update / param bytes: "
              f"{goals['d2h_over_params']:.3f} at most (the params once: 1); pinned peak / cap: "
              f"{goals['pinned_peak_over_cap']:.4f} at most (at most 1, plus {flags} bytes of "
              "slot flags); host waits on the training thread: "
              f"{'none' if goals['no_training_thread_host_wait'] else 'SOME'}; hazards the "
              f"fake saw (a copy before the optimizer's write, a write before a copy): "
              f"{'none' if goals['no_hazard'] else 'SOME'}.", "",
              "A model smaller than the cap pins one slot per chunk (ResNet-50: 4 slots of "
              "32 MiB for 97.5 MiB). Copies are per run of adjacent device memory: tensors "
              "allocated apart are copied apart (ParameterList tensors here, each its own "
              "allocation)."]
    write_results(args.out, "bench_offload", {"meta": meta, "rows": rows, "goals": goals},
                  "\n".join(lines) + "\n")
    return 0 if all(goals[k] for k in ("all_same_bits", "no_training_thread_host_wait",
                                          "no_hazard")) else 1


if __name__ == "__main__":
    sys.exit(main())
