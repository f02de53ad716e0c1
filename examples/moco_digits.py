"""MoCo on scikit-learn's digits: what the key encoder's momentum m does.

MoCo (He et al. 2020) trains a query encoder with InfoNCE: the query of one augmented view
must pick the key of another view of the same image out of a queue of keys of earlier
batches (the negatives). The keys come from a key encoder that is a moving average of the
query encoder, ``key <- m key + (1 - m) query``, kept by fused_ema and updated by the
optimizer hook (``ema.attach(optimizer)``). The paper's argument: the queue holds keys made
by the key encoders of many earlier steps, and only a slowly moving key encoder keeps them
consistent with each other; m = 0 (the key encoder is the query encoder) failed on ImageNet.

  m  0, 0.9, 0.99, 0.999, 0.9999

Same data, views and probes as byol_digits.py (imported from it): 8x8 digits, views by a
random shift, a zeroed square and noise; logistic-regression probes on the frozen 128-d
encoder features with all labels and with 5 labels per class. Model: MLP encoder
(64-256-128, no BatchNorm, so no batch statistics leak between the query and its key and
MoCo's shuffled BatchNorm is not needed) and MoCo v2's MLP head (128-256-32), L2-normalised;
temperature 0.2, queue of 1,024 keys (8 batches). One deviation: the digits' training set
is only 1,258 images, so most images of a batch have a key of their own in the queue; those
are masked out of the negatives (at ImageNet scale they are rare).

    pip install -e .[examples]
    python examples/moco_digits.py             # full run
    python examples/moco_digits.py --quick     # smoke test

Writes moco_digits.png and moco_digits.md under --out (default runs/ at the repository root,
ignored by git); --update-results writes them to examples/results/, the committed full-run
results.
"""
import os
import sys

# _common first: it sets one BLAS/OpenMP thread per process before numpy/torch load.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import RunClock, add_output_args, add_workers_arg, command_line, run_jobs  # noqa: E402

import argparse
import dataclasses
import math
from typing import Dict, List

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from fused_ema import FusedEMA

from byol_digits import augment, baseline_probes, features, load_data, probe, spread  # noqa: E402

MOMENTA = (0.0, 0.9, 0.99, 0.999, 0.9999)
# MoCo (He et al. 2020), section 4.1: ImageNet linear-classification top-1 (%) against m
# (m = 0: "the training loss oscillates and fails to converge").
PAPER = {0.0: None, 0.9: 55.2, 0.99: 57.8, 0.999: 59.0, 0.9999: 58.9}


@dataclasses.dataclass
class Config:
    steps: int = 3_000           # optimizer steps per run
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-5
    hidden: int = 256
    rep_dim: int = 128           # encoder output (what the probes see)
    proj_dim: int = 32           # head output (the InfoNCE embedding)
    queue: int = 1024            # keys kept as negatives
    temperature: float = 0.2
    max_shift: int = 1           # views: as byol_digits.py
    noise: float = 0.1
    mask: int = 3
    log_every: int = 50          # loss and accuracy curves: one point per this many steps
    test_fraction: float = 0.3
    few_shot: int = 5            # labels per class for the low-label probe ...
    few_shot_draws: int = 20     # ... averaged over this many random draws


class Encoder(nn.Module):
    """Encoder (what the probes see) + MoCo v2's MLP head; outputs L2-normalised."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(64, cfg.hidden), nn.ReLU(),
                                     nn.Linear(cfg.hidden, cfg.rep_dim), nn.ReLU())
        self.head = nn.Sequential(nn.Linear(cfg.rep_dim, cfg.hidden), nn.ReLU(),
                                  nn.Linear(cfg.hidden, cfg.proj_dim))

    def forward(self, x):
        return F.normalize(self.head(self.encoder(x)), dim=1)


def train(m: float, seed: int, cfg: Config) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_train, x_test, y_train, y_test = load_data(cfg.test_fraction)
    data = torch.from_numpy(x_train)

    query_net = Encoder(cfg)     # built first after seeding: the same init as in baselines()
    optimizer = torch.optim.AdamW(query_net.parameters(), lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    ema = FusedEMA(query_net, decay=m)   # the key encoder ...
    ema.attach(optimizer)                # ... updated after every optimizer.step()
    key_net = ema.module

    queue = F.normalize(torch.randn(cfg.queue, cfg.proj_dim, generator=gen), dim=1)
    queue_idx = torch.full((cfg.queue,), -1)    # which training image each key came from
    ptr = 0
    log_steps, log_loss, log_acc, acc_loss, acc_acc = [], [], [], [], []
    for step in range(1, cfg.steps + 1):
        idx = torch.randint(0, len(data), (cfg.batch_size,), generator=gen)
        x = data[idx]
        q = query_net(augment(x, cfg, gen))
        with torch.no_grad():
            k = key_net(augment(x, cfg, gen))
        pos = (q * k).sum(1, keepdim=True)
        neg = q @ queue.T
        neg = neg.masked_fill(idx[:, None] == queue_idx[None, :], float("-inf"))
        logits = torch.cat([pos, neg], 1) / cfg.temperature
        loss = F.cross_entropy(logits, torch.zeros(len(idx), dtype=torch.long))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()                             # the key encoder moves here
        # enqueue the newest keys, dequeue the oldest
        queue[ptr:ptr + len(idx)], queue_idx[ptr:ptr + len(idx)] = k, idx
        ptr = (ptr + len(idx)) % cfg.queue
        acc_loss.append(float(loss.detach()))
        # the positive strictly above every negative (a tie, as when all embeddings are the
        # same vector, does not count)
        acc_acc.append(float((pos.detach()[:, 0] > neg.detach().max(1).values).float().mean()))
        if step % cfg.log_every == 0:
            log_steps.append(step)
            log_loss.append(float(np.mean(acc_loss)))
            log_acc.append(float(np.mean(acc_acc)))
            acc_loss, acc_acc = [], []

    result = probe(features(query_net.encoder, x_train), y_train,
                   features(query_net.encoder, x_test), y_test, cfg, seed)
    with torch.no_grad():
        final_spread = spread(query_net(torch.from_numpy(x_test)))
    return dict(m=m, seed=seed, steps=log_steps, loss=log_loss, acc=log_acc, probe=result,
                final_spread=final_spread)


def baselines(cfg: Config, seed: int) -> Dict[str, Dict[str, float]]:
    """The same probes on raw pixels and on the untrained encoder (the initialisation every
    momentum of this seed starts from)."""
    torch.manual_seed(seed)
    return baseline_probes(Encoder(cfg).encoder, cfg, seed)


# ----------------------------------------------------------------------------- outputs

def oscillation(run: dict) -> float:
    """Mean |change| of the logged loss between consecutive points over the last half."""
    loss = np.asarray(run["loss"])
    half = loss[len(loss) // 2:]
    return float(np.abs(np.diff(half)).mean()) if len(half) > 1 else float("nan")


def write_outputs(runs: List[dict], base: Dict[int, dict], cfg: Config, seeds: List[int],
                  out: str, clock: RunClock) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out, exist_ok=True)
    by_m = {m: sorted((r for r in runs if r["m"] == m), key=lambda r: r["seed"]) for m in MOMENTA}
    cmap = plt.get_cmap("viridis")
    colors = {m: cmap(i / (len(MOMENTA) - 1) * 0.9) for i, m in enumerate(MOMENTA)}

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.3))
    for m in MOMENTA:
        steps = np.asarray(by_m[m][0]["steps"])
        for key, ax in (("loss", axes[0]), ("acc", axes[1])):
            curve = np.stack([r[key] for r in by_m[m]])
            ax.plot(steps, curve.mean(0), color=colors[m], lw=1.5, label=f"m={m:g}")
            ax.fill_between(steps, curve.min(0), curve.max(0), color=colors[m], alpha=0.15)
    axes[0].set_title(f"InfoNCE loss (mean of each {cfg.log_every} steps)")
    axes[0].set_ylabel("loss")
    axes[1].set_title("positive key strictly above every negative (training)")
    axes[1].set_ylabel("instance-discrimination accuracy")
    for ax in axes[:2]:
        ax.set_xlabel("optimizer step")
        ax.legend(fontsize=8)
    ax = axes[2]
    xs = np.arange(len(MOMENTA))
    few = [np.array([r["probe"]["few"] for r in by_m[m]]) * 100 for m in MOMENTA]
    ax.bar(xs, [a.mean() for a in few], 0.6, yerr=[a.std() for a in few], capsize=3,
           color=[colors[m] for m in MOMENTA])
    pix_few = np.mean([base[s]["pixels"]["few"] for s in seeds]) * 100
    rnd_few = np.mean([base[s]["untrained"]["few"] for s in seeds]) * 100
    ax.axhline(pix_few, color="k", ls="--", lw=1, label=f"raw pixels ({pix_few:.1f})")
    ax.axhline(rnd_few, color="gray", ls=":", lw=1, label=f"untrained encoder ({rnd_few:.1f})")
    ax.set_xticks(xs, [f"{m:g}" for m in MOMENTA])
    ax.set_xlabel("key encoder momentum m")
    ax.set_ylabel(f"test accuracy, {cfg.few_shot} labels per class (%)")
    ax.set_title(f"linear probe, {cfg.few_shot} labels/class (mean ± std over seeds)")
    low = min(min(a.mean() for a in few), pix_few, rnd_few)
    ax.set_ylim(max(0, 10 * math.floor(low / 10) - 10), 100)
    ax.legend(fontsize=8, loc="upper right")
    fig.suptitle(f"MoCo on sklearn digits, {len(seeds)} seeds, {cfg.steps} steps, queue "
                 f"{cfg.queue} (curves: mean, band = min..max over seeds)")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "moco_digits.png"), dpi=110)
    plt.close(fig)

    def pm(values, scale=100.0, fmt="{:.1f}"):
        a = np.asarray(values) * scale
        return f"{fmt.format(a.mean())} ± {fmt.format(a.std())}"

    lines = [
        "# MoCo on sklearn digits: key encoder momentum",
        "",
        f"Command: `{command_line('moco_digits.py')}` ({clock.summary()}). "
        f"{len(seeds)} seeds per momentum, {cfg.steps} AdamW steps of batch {cfg.batch_size} "
        f"on {round((1 - cfg.test_fraction) * 1797)} training images; probes tested on the "
        f"other {round(cfg.test_fraction * 1797)}.",
        "",
        "Settings: " + ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(cfg).items()),
        "",
        "- probe: logistic regression on standardised frozen encoder features "
        f"({cfg.rep_dim}-d); `all` uses every training label, `{cfg.few_shot}/class` "
        f"{cfg.few_shot} labels per class (mean of {cfg.few_shot_draws} draws); test accuracy "
        "in %, mean ± std over seeds",
        f"- final loss: InfoNCE loss over the last {cfg.log_every} steps; oscillation: mean "
        f"|change| of the loss between consecutive {cfg.log_every}-step means over the second "
        "half of training; both mean ± std over seeds",
        f"- spread: the collapse indicator of byol_digits.py on the test images' embeddings "
        f"(std over images of the L2-normalised outputs, mean over dimensions, × "
        f"sqrt({cfg.proj_dim})): ~1 spread out, ~0 collapsed",
        "- MoCo (ImageNet, linear top-1): the paper's Table in section 4.1 "
        "(m = 0: the loss oscillates and fails to converge)",
        "",
        f"| m | probe all | probe {cfg.few_shot}/class | final loss | oscillation | spread "
        "| MoCo, ImageNet top-1 |",
        "|---|---|---|---|---|---|---|",
        f"| raw pixels | {pm([base[s]['pixels']['full'] for s in seeds])} "
        f"| {pm([base[s]['pixels']['few'] for s in seeds])} | | | | |",
        f"| untrained encoder | {pm([base[s]['untrained']['full'] for s in seeds])} "
        f"| {pm([base[s]['untrained']['few'] for s in seeds])} | | | | |",
    ]
    for m in MOMENTA:
        rs = by_m[m]
        paper = "fails" if PAPER[m] is None else f"{PAPER[m]}"
        lines.append(
            f"| {m:g} | {pm([r['probe']['full'] for r in rs])} "
            f"| {pm([r['probe']['few'] for r in rs])} "
            f"| {pm([r['loss'][-1] for r in rs], 1.0, '{:.3f}')} "
            f"| {pm([oscillation(r) for r in rs], 1.0, '{:.3f}')} "
            f"| {pm([r['final_spread'] for r in rs], 1.0, '{:.2f}')} | {paper} |")
    lines += ["", f"Per seed: probe all / probe {cfg.few_shot}/class / final loss", "",
              "| m | " + " | ".join(f"seed {s}" for s in seeds) + " |",
              "|---|" + "---|" * len(seeds)]
    for key, label in (("pixels", "raw pixels"), ("untrained", "untrained encoder")):
        lines.append(f"| {label} | " + " | ".join(
            f"{base[s][key]['full'] * 100:.1f} / {base[s][key]['few'] * 100:.1f} / -"
            for s in seeds) + " |")
    for m in MOMENTA:
        lines.append(f"| {m:g} | " + " | ".join(
            f"{r['probe']['full'] * 100:.1f} / {r['probe']['few'] * 100:.1f} / {r['loss'][-1]:.3f}"
            for r in by_m[m]) + " |")
    with open(os.path.join(out, "moco_digits.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def _worker(job):
    torch.set_num_threads(1)          # small MLPs are fastest on one thread
    kind, m, seed, cfg = job
    if kind == "baselines":
        return kind, seed, baselines(cfg, seed)
    return kind, seed, train(m, seed, cfg)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="seeds to run for every momentum (default 0 1 2; --quick: 0)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run")
    p.add_argument("--quick", action="store_true", help="a short smoke run (seconds)")
    add_workers_arg(p)
    add_output_args(p, __file__)
    args = p.parse_args(argv)

    cfg = Config()
    if args.quick:
        cfg = dataclasses.replace(cfg, steps=60, log_every=10, few_shot_draws=2)
    if args.steps:
        cfg = dataclasses.replace(cfg, steps=args.steps)
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    jobs = ([("baselines", None, s, cfg) for s in seeds]
            + [("moco", m, s, cfg) for s in seeds for m in MOMENTA])

    clock = RunClock()
    runs, base = [], {}
    for kind, seed, value in run_jobs(_worker, jobs, args.workers, "MoCo runs"):
        if kind == "baselines":
            base[seed] = value
        else:
            runs.append(value)
    clock.stop()
    write_outputs(runs, base, cfg, seeds, args.out, clock)
    print(open(os.path.join(args.out, "moco_digits.md")).read())
    print(f"wrote {args.out}/moco_digits.png and moco_digits.md in {clock.elapsed:.0f} s")


if __name__ == "__main__":
    main()
