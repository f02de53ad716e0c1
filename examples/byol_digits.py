"""BYOL on scikit-learn's digits: what the momentum teacher and the predictor do.

BYOL trains a student (encoder -> projector -> predictor) to predict, from one
augmented view of an image, a teacher's projection of another view. The teacher
(encoder -> projector) is a moving average of the student, kept by fused_ema and
updated by the optimizer hook (``ema.attach(optimizer)``). Nothing in the loss
forbids the trivial solution where every image maps to the same vector; the slow
teacher and the predictor are the two things said to prevent it. This example
crosses them:

  teacher decay  0 (teacher = student), 0.9, 0.99, 0.999 (the constant decays of BYOL's
                 Table 5a), cosine 0.996 -> 1 (BYOL's schedule), 1.0 (teacher frozen at
                 its random initialisation)
  predictor      with / without (without: the student's projection is compared
                 to the teacher's directly)

and measures, per variant and seed: linear-probe accuracy on frozen encoder
features (all labels and 5 labels per class, beside the same probes on raw
pixels and on an untrained encoder), and a collapse indicator: the per-dimension
standard deviation of the L2-normalised projector outputs across a batch, times
sqrt(dim) (about 1 for spread-out embeddings, near 0 for collapse).

    pip install -e .[examples]
    python examples/byol_digits.py             # full run (see examples/README.md for its time)
    python examples/byol_digits.py --quick     # smoke test (under a minute)

Writes byol_digits.png and byol_digits.md under --out (default runs/ at the repository root,
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

from fused_ema import FusedEMA, schedules


@dataclasses.dataclass
class Config:
    steps: int = 1_500           # optimizer steps per run
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-5
    hidden: int = 256
    rep_dim: int = 128           # encoder output (what the probes see)
    proj_dim: int = 32           # projector / predictor output
    max_shift: int = 1           # pixels, each direction
    noise: float = 0.1           # std of additive Gaussian noise (pixels are in [0, 1])
    mask: int = 3                # side of the square zeroed at a random place in each view
    log_every: int = 50          # collapse indicator every this many steps
    test_fraction: float = 0.3
    few_shot: int = 5            # labels per class for the low-label probe ...
    few_shot_draws: int = 20     # ... averaged over this many random draws


def variants(cfg: Config) -> Dict[str, dict]:
    """Name -> settings. ``decay`` is what FusedEMA gets (a float or a schedule)."""
    decays = {
        "0": 0.0,
        "0.9": 0.9,
        "0.99": 0.99,
        "0.999": 0.999,
        "cosine 0.996->1": schedules.Cosine(0.996, 1.0, total_steps=cfg.steps),
        "1 (random teacher)": 1.0,
    }
    out = {}
    for predictor in (True, False):
        for dname, decay in decays.items():
            out[f"decay {dname}, {'predictor' if predictor else 'no predictor'}"] = dict(
                decay=decay, predictor=predictor, decay_name=dname)
    return out


# ----------------------------------------------------------------------------- data

def load_data(test_fraction: float):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    # One fixed split for every seed: the seeds vary the model and the augmentations.
    return train_test_split(x, y, test_size=test_fraction, stratify=y, random_state=0)


def augment(x: torch.Tensor, cfg: Config, gen: torch.Generator) -> torch.Tensor:
    """A random view of each 8x8 image in x [B, 64]: shift, masked square, noise."""
    b = x.shape[0]
    img = x.view(b, 8, 8)
    s = cfg.max_shift
    if s:
        padded = F.pad(img, (s, s, s, s))
        dy = torch.randint(0, 2 * s + 1, (b,), generator=gen)
        dx = torch.randint(0, 2 * s + 1, (b,), generator=gen)
        ar = torch.arange(8)
        rows = (dy[:, None] + ar)[:, :, None]
        cols = (dx[:, None] + ar)[:, None, :]
        img = padded[torch.arange(b)[:, None, None], rows, cols]
    if cfg.mask:
        m = cfg.mask
        top = torch.randint(0, 8 - m + 1, (b,), generator=gen)
        left = torch.randint(0, 8 - m + 1, (b,), generator=gen)
        ar = torch.arange(8)
        in_rows = (ar[None] >= top[:, None]) & (ar[None] < top[:, None] + m)
        in_cols = (ar[None] >= left[:, None]) & (ar[None] < left[:, None] + m)
        img = img * ~(in_rows[:, :, None] & in_cols[:, None, :])
    img = img + cfg.noise * torch.randn(img.shape, generator=gen)
    return img.reshape(b, 64)


# ----------------------------------------------------------------------------- model

def mlp(dims: List[int], last_relu: bool) -> nn.Sequential:
    """Linear-BatchNorm-ReLU blocks (BYOL's MLP heads); the last Linear is plain unless
    last_relu."""
    layers = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2 or last_relu:
            layers += [nn.BatchNorm1d(dims[i + 1]), nn.ReLU()]
    return nn.Sequential(*layers)


class Online(nn.Module):
    """Encoder + projector: the part the teacher copies."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.encoder = mlp([64, cfg.hidden, cfg.rep_dim], last_relu=True)
        self.projector = mlp([cfg.rep_dim, cfg.hidden, cfg.proj_dim], last_relu=False)

    def forward(self, x):
        return self.projector(self.encoder(x))


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """2 - 2 cos(p, z), averaged over the batch; z is the (stop-gradient) target."""
    return (2 - 2 * F.cosine_similarity(p, z.detach(), dim=-1)).mean()


def spread(z: torch.Tensor) -> float:
    """Collapse indicator: mean over dimensions of the std over the batch of the
    L2-normalised embeddings, times sqrt(dim). ~1 when spread out, ~0 when collapsed."""
    zn = F.normalize(z.detach(), dim=1)
    return float(zn.std(0).mean() * math.sqrt(z.shape[1]))


@torch.no_grad()
def features(encoder: nn.Module, x: np.ndarray) -> np.ndarray:
    was_training = encoder.training
    encoder.eval()
    f = encoder(torch.from_numpy(x)).numpy()
    encoder.train(was_training)
    return f


# ----------------------------------------------------------------------------- probes

def probe(f_train, y_train, f_test, y_test, cfg: Config, seed: int) -> Dict[str, float]:
    """Logistic regression on standardised frozen features: all training labels, and
    cfg.few_shot labels per class (mean over cfg.few_shot_draws random draws)."""
    import warnings
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def fit_score(idx):
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf.fit(f_train[idx], y_train[idx])
        return clf.score(f_test, y_test)

    rng = np.random.default_rng(seed)
    full = fit_score(np.arange(len(y_train)))
    few = []
    for _ in range(cfg.few_shot_draws):
        idx = np.concatenate([rng.choice(np.nonzero(y_train == c)[0], cfg.few_shot, replace=False)
                              for c in np.unique(y_train)])
        few.append(fit_score(idx))
    return dict(full=float(full), few=float(np.mean(few)))


# ----------------------------------------------------------------------------- training

def train(name: str, variant: dict, seed: int, cfg: Config) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_train, x_test, y_train, y_test = load_data(cfg.test_fraction)
    data = torch.from_numpy(x_train)

    online = Online(cfg)         # built first after seeding: the same init as in baselines()
    predictor = (mlp([cfg.proj_dim, cfg.hidden, cfg.proj_dim], last_relu=False)
                 if variant["predictor"] else nn.Identity())
    params = list(online.parameters()) + list(predictor.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema = FusedEMA(online, decay=variant["decay"])   # the teacher ...
    ema.attach(optimizer)                            # ... updated after every optimizer.step()
    teacher = ema.module
    teacher.train()   # BYOL runs the teacher's BatchNorm on batch statistics, like the student's

    log_steps, log_spread, log_loss = [], [], []
    acc_spread, acc_loss = [], []
    # Logged at a few early steps too (collapse can take only tens of steps), then every
    # log_every; each point averages the steps since the previous one.
    log_at = ({s for s in (1, 2, 5, 10, 20) if s < cfg.log_every}
              | set(range(cfg.log_every, cfg.steps + 1, cfg.log_every)))
    for step in range(1, cfg.steps + 1):
        idx = torch.randint(0, len(data), (cfg.batch_size,), generator=gen)
        x = data[idx]
        v1, v2 = augment(x, cfg, gen), augment(x, cfg, gen)
        z1, z2 = online(v1), online(v2)
        with torch.no_grad():
            t1, t2 = teacher(v1), teacher(v2)
        loss = byol_loss(predictor(z1), t2) + byol_loss(predictor(z2), t1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()                             # the teacher update happens here
        acc_spread.append(spread(z1))
        acc_loss.append(float(loss.detach()))
        if step in log_at:
            log_steps.append(step)
            log_spread.append(float(np.mean(acc_spread)))
            log_loss.append(float(np.mean(acc_loss)))
            acc_spread, acc_loss = [], []

    trained = probe(features(online.encoder, x_train), y_train,
                    features(online.encoder, x_test), y_test, cfg, seed)
    with torch.no_grad():
        online.eval()
        final_spread = spread(online(torch.from_numpy(x_test)))
    return dict(variant=name, seed=seed, steps=log_steps, spread=log_spread, loss=log_loss,
                probe=trained, final_spread=final_spread)


def baseline_probes(untrained: nn.Module, cfg, seed: int) -> Dict[str, Dict[str, float]]:
    """The probes on raw pixels and on the `untrained` encoder (also moco_digits.py's)."""
    x_train, x_test, y_train, y_test = load_data(cfg.test_fraction)
    return dict(pixels=probe(x_train, y_train, x_test, y_test, cfg, seed),
                untrained=probe(features(untrained, x_train), y_train,
                                features(untrained, x_test), y_test, cfg, seed))


def baselines(cfg: Config, seed: int) -> Dict[str, Dict[str, float]]:
    """The same probes on raw pixels and on the untrained encoder (the initialisation every
    variant of this seed starts from)."""
    torch.manual_seed(seed)
    return baseline_probes(Online(cfg).encoder, cfg, seed)


# ----------------------------------------------------------------------------- outputs

def write_outputs(runs: List[dict], base: Dict[int, dict], cfg: Config, seeds: List[int],
                  out: str, clock: RunClock) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out, exist_ok=True)
    names = list(variants(cfg))
    by_name = {n: sorted((r for r in runs if r["variant"] == n), key=lambda r: r["seed"])
               for n in names}

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.3))
    cmap = plt.get_cmap("viridis")
    decay_names = list(dict.fromkeys(v["decay_name"] for v in variants(cfg).values()))
    for name, v in variants(cfg).items():
        mine = by_name[name]
        steps = np.asarray(mine[0]["steps"])
        curve = np.stack([r["spread"] for r in mine])
        color = cmap(decay_names.index(v["decay_name"]) / max(1, len(decay_names) - 1) * 0.9)
        ax = axes[0] if v["predictor"] else axes[1]
        ax.plot(steps, curve.mean(0), color=color, lw=2, label=f"decay {v['decay_name']}")
        ax.fill_between(steps, curve.min(0), curve.max(0), color=color, alpha=0.15)
    for ax, title in zip(axes[:2], ("with predictor", "without predictor")):
        ax.set_title(f"collapse indicator, {title}")
        ax.set_xscale("log")
        ax.set_xlabel("optimizer step (log scale)")
        ax.set_ylabel("std of L2-normalised projections × sqrt(dim)")
        ax.set_ylim(0, 1.1)
        ax.legend(fontsize=8)
    ax = axes[2]
    width = 0.38
    xs = np.arange(len(decay_names))
    all_means = []
    for j, predictor in enumerate((True, False)):
        means, errs = [], []
        for dname in decay_names:
            name = next(n for n, v in variants(cfg).items()
                        if v["decay_name"] == dname and v["predictor"] == predictor)
            acc = np.array([r["probe"]["few"] for r in by_name[name]]) * 100
            means.append(acc.mean())
            errs.append(acc.std())
        all_means += means
        ax.bar(xs + (j - 0.5) * width, means, width, yerr=errs, capsize=2,
               label="predictor" if predictor else "no predictor")
    pix_few = np.mean([base[s]["pixels"]["few"] for s in seeds]) * 100
    rnd_few = np.mean([base[s]["untrained"]["few"] for s in seeds]) * 100
    ax.axhline(pix_few, color="k", ls="--", lw=1, label=f"raw pixels ({pix_few:.1f})")
    ax.axhline(rnd_few, color="gray", ls=":", lw=1, label=f"untrained encoder ({rnd_few:.1f})")
    ax.set_xticks(xs, [d.replace(" (random teacher)", "\n(random)") for d in decay_names],
                  fontsize=8)
    ax.set_xlabel("teacher decay")
    ax.set_ylabel(f"test accuracy, {cfg.few_shot} labels per class (%)")
    ax.set_title(f"linear probe, {cfg.few_shot} labels/class (mean ± std over seeds)")
    low = min(min(all_means), pix_few, rnd_few)
    ax.set_ylim(max(0, 10 * math.floor(low / 10) - 10), 100)
    ax.legend(fontsize=8, loc="upper right")
    fig.suptitle(f"BYOL on sklearn digits, {len(seeds)} seeds, {cfg.steps} steps "
                 "(collapse curves: mean, band = min..max over seeds)")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "byol_digits.png"), dpi=110)
    plt.close(fig)

    def pm(values, scale=100.0, fmt="{:.1f}"):
        a = np.asarray(values) * scale
        return f"{fmt.format(a.mean())} ± {fmt.format(a.std())}"

    lines = [
        "# BYOL on sklearn digits: teacher decay × predictor",
        "",
        f"Command: `{command_line('byol_digits.py')}` ({clock.summary()}). "
        f"{len(seeds)} seeds per variant, {cfg.steps} AdamW steps of batch {cfg.batch_size} on "
        f"{round((1 - cfg.test_fraction) * 1797)} training images; probes tested on the other "
        f"{round(cfg.test_fraction * 1797)}.",
        "",
        "Settings: " + ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(cfg).items()),
        "",
        "- probe: logistic regression on standardised frozen encoder features "
        f"({cfg.rep_dim}-d); `all` uses every training label, `{cfg.few_shot}/class` "
        f"{cfg.few_shot} labels per class (mean of {cfg.few_shot_draws} draws); test accuracy in %,"
        " mean ± std over seeds",
        "- spread: std over the batch of the L2-normalised projector outputs, mean over "
        f"dimensions, × sqrt({cfg.proj_dim}); ~1 spread out, ~0 collapsed. `train` = mean over "
        f"the last {cfg.log_every} steps (augmented batches, training mode), `test` = the "
        "test images after training (eval mode)",
        "",
        f"| variant | probe all | probe {cfg.few_shot}/class | spread (train) | spread (test) |",
        "|---|---|---|---|---|",
        f"| raw pixels | {pm([base[s]['pixels']['full'] for s in seeds])} "
        f"| {pm([base[s]['pixels']['few'] for s in seeds])} | | |",
        f"| untrained encoder | {pm([base[s]['untrained']['full'] for s in seeds])} "
        f"| {pm([base[s]['untrained']['few'] for s in seeds])} | | |",
    ]
    for name in names:
        mine = by_name[name]
        lines.append(
            f"| {name} | {pm([r['probe']['full'] for r in mine])} "
            f"| {pm([r['probe']['few'] for r in mine])} "
            f"| {pm([r['spread'][-1] for r in mine], 1.0, '{:.2f}')} "
            f"| {pm([r['final_spread'] for r in mine], 1.0, '{:.2f}')} |")
    lines += ["", "Per seed: probe all / probe "
              f"{cfg.few_shot}/class / spread (train)", "",
              "| variant | " + " | ".join(f"seed {s}" for s in seeds) + " |",
              "|---|" + "---|" * len(seeds)]
    for key, label in (("pixels", "raw pixels"), ("untrained", "untrained encoder")):
        lines.append(f"| {label} | " + " | ".join(
            f"{base[s][key]['full'] * 100:.1f} / {base[s][key]['few'] * 100:.1f} / -"
            for s in seeds) + " |")
    for name in names:
        lines.append(f"| {name} | " + " | ".join(
            f"{r['probe']['full'] * 100:.1f} / {r['probe']['few'] * 100:.1f} / "
            f"{r['spread'][-1]:.2f}" for r in by_name[name]) + " |")
    with open(os.path.join(out, "byol_digits.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def _worker(job):
    torch.set_num_threads(1)          # small MLPs are fastest on one thread
    kind, name, variant, seed, cfg = job
    if kind == "baselines":
        return kind, seed, baselines(cfg, seed)
    return kind, seed, train(name, variant, seed, cfg)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="seeds to run for every variant (default 0 1 2; --quick: 0)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run")
    p.add_argument("--quick", action="store_true", help="a short smoke run (< 1 minute)")
    add_workers_arg(p)
    add_output_args(p, __file__)
    args = p.parse_args(argv)

    cfg = Config()
    if args.quick:
        cfg = dataclasses.replace(cfg, steps=50, log_every=10, few_shot_draws=2)
    if args.steps:
        cfg = dataclasses.replace(cfg, steps=args.steps)
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    jobs = [("byol", name, v, s, cfg) for s in seeds for name, v in variants(cfg).items()]
    jobs = [("baselines", None, None, s, cfg) for s in seeds] + jobs

    clock = RunClock()
    runs, base = [], {}
    for kind, seed, value in run_jobs(_worker, jobs, args.workers, "BYOL runs"):
        if kind == "baselines":
            base[seed] = value
        else:
            runs.append(value)
    clock.stop()
    write_outputs(runs, base, cfg, seeds, args.out, clock)
    print(open(os.path.join(args.out, "byol_digits.md")).read())
    print(f"wrote {args.out}/byol_digits.png and byol_digits.md in {clock.elapsed:.0f} s")


if __name__ == "__main__":
    main()
