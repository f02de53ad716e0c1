"""DQN on CartPole-v1: what the target network buys, at CleanRL's settings and at aggressive ones.

A DQN regresses Q(s, a) onto r + gamma * max_a' Q_target(s', a'). Without a
target network the bootstrap target comes from the network being trained: every
gradient step moves the target it is chasing. The two usual cures keep a slowly
moving copy of the network, here kept by fused_ema and updated by the optimizer
hook (``ema.attach(optimizer)``):

  no target    Q_target = Q itself (the target is computed under no_grad)
  hard copy    FusedEMA(q, tau=1.0, update_every=C): copied every C updates (DQN, CleanRL)
  soft update  FusedEMA(q, tau=0.005): target <- 0.995 target + 0.005 Q every update

Two settings (``--settings``):

  cleanrl     (default) CleanRL's dqn.py on CartPole-v1: one Adam step every 10 env steps
              (lr 2.5e-4, batch 128, MSE), buffer 10,000, learning starts at 10,000,
              epsilon 1 -> 0.05 over half the run, MLP 120-84, hard copy every 500 env steps
              (= 50 updates), 500k env steps.
  aggressive  one Adam step per env step (lr 1e-3, batch 64, Huber), buffer 50,000, MLP 64-64,
              epsilon over the first 20%: the setting where the target network is needed.

Everything else is shared: replay buffer, epsilon-greedy, Adam. Every
variant runs with the same seeds, and a run is deterministic given its seeds. The seeds
of a variant train side by side as one batched network (a seed dimension on every
weight, see EnsembleLinear): independent DQNs, with their own environments, buffers,
exploration and initialisations, computed in one call instead of ten.

    pip install -e .[examples]
    python examples/dqn_cartpole.py                          # CleanRL's settings
    python examples/dqn_cartpole.py --settings aggressive    # the divergence demonstration
    python examples/dqn_cartpole.py --quick                  # smoke test (seconds)

Writes dqn_cartpole.png and dqn_cartpole.md (aggressive: dqn_cartpole_aggressive.*) under
--out (default runs/ at the repository root, ignored by git); --update-results writes them to
examples/results/, the committed full-run results.
"""
import os
import sys

# _common first: it sets one BLAS/OpenMP thread per process before numpy/torch load.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import RunClock, add_output_args, add_workers_arg, command_line  # noqa: E402

import argparse
import dataclasses
import multiprocessing as mp
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from fused_ema import FusedEMA


SOLVED = 475.0      # CartPole-v1's "solved" threshold (the maximum return is 500)
COLLAPSED = 200.0   # a run that had reached SOLVED and later scores below this has collapsed
SEEDS_PER_JOB = 5   # seeds trained side by side in one process


@dataclasses.dataclass
class Config:
    steps: int = 40_000          # environment steps per run
    learning_starts: int = 1_000
    train_every: int = 1         # one Adam step every this many env steps
    buffer_size: int = 50_000
    batch_size: int = 64
    lr: float = 1e-3
    gamma: float = 0.99
    hidden: Tuple[int, ...] = (64, 64)
    loss: str = "huber"          # or "mse"
    eps_start: float = 1.0
    eps_end: float = 0.05
    eps_fraction: float = 0.2    # epsilon decays linearly over this fraction of the run
    eval_every: int = 1_000      # greedy evaluation every this many env steps ...
    eval_episodes: int = 5       # ... over this many episodes
    hard_every: int = 500        # the hard copy every this many env steps
    tau: float = 0.005           # tau for the soft update (every Adam step)


SETTINGS = {
    # CleanRL's dqn.py defaults (CartPole-v1); steps and eval_every are set in main()
    "cleanrl": Config(steps=500_000, learning_starts=10_000, train_every=10, buffer_size=10_000,
                      batch_size=128, lr=2.5e-4, hidden=(120, 84), loss="mse", eps_fraction=0.5,
                      eval_every=5_000),
    "aggressive": Config(),
}
STEM = {"cleanrl": "dqn_cartpole", "aggressive": "dqn_cartpole_aggressive"}
CLEANRL = (488.69, 16.11)   # CleanRL's published dqn.py result on CartPole-v1 (mean ± std)


def variants(cfg: Config) -> Dict[str, Optional[dict]]:
    """Name -> FusedEMA keyword arguments (None: no target network). The EMA counts Adam
    steps (it is attached to the optimizer), so the hard copy's period is in updates."""
    updates = cfg.hard_every // cfg.train_every
    hard = f"hard copy every {cfg.hard_every} steps"
    if cfg.train_every > 1:
        hard += f" ({updates} updates)"
    return {
        "no target network": None,
        hard: dict(tau=1.0, update_every=updates),
        f"soft update tau={cfg.tau:g}": dict(tau=cfg.tau),
    }


class EnsembleLinear(nn.Module):
    """``n`` independent Linear layers applied side by side: x [n, batch, in] -> [n, batch, out].

    Member k is initialised like ``nn.Linear`` from its own generator, so it does not
    depend on which other seeds run beside it."""

    def __init__(self, n: int, fan_in: int, fan_out: int, generators: List[torch.Generator]):
        super().__init__()
        bound = fan_in ** -0.5
        self.weight = nn.Parameter(torch.stack([
            torch.empty(fan_in, fan_out).uniform_(-bound, bound, generator=g) for g in generators]))
        self.bias = nn.Parameter(torch.stack([
            torch.empty(1, fan_out).uniform_(-bound, bound, generator=g) for g in generators]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, x, self.weight)


def q_network(seeds: List[int], obs_dim: int, n_actions: int,
              hidden: Tuple[int, ...]) -> nn.Module:
    """One Q-network per seed, all computed in one batched call."""
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    n, dims, layers = len(seeds), [obs_dim, *hidden], []
    for fan_in, fan_out in zip(dims[:-1], dims[1:]):
        layers += [EnsembleLinear(n, fan_in, fan_out, gens), nn.ReLU()]
    return nn.Sequential(*layers, EnsembleLinear(n, dims[-1], n_actions, gens))


class ReplayBuffer:
    """One buffer per seed (the leading dimension); each seed samples with its own rng."""

    def __init__(self, n: int, capacity: int, obs_dim: int, rngs: List[np.random.Generator]):
        self.obs = np.zeros((n, capacity, obs_dim), np.float32)
        self.next_obs = np.zeros((n, capacity, obs_dim), np.float32)
        self.action = np.zeros((n, capacity), np.int64)
        self.reward = np.zeros((n, capacity), np.float32)
        self.terminated = np.zeros((n, capacity), np.float32)
        self.capacity, self.size, self.pos, self.rngs = capacity, 0, 0, rngs

    def add(self, obs, action, reward, next_obs, terminated):
        i = self.pos
        self.obs[:, i], self.action[:, i], self.reward[:, i] = obs, action, reward
        self.next_obs[:, i], self.terminated[:, i] = next_obs, terminated
        self.pos = (self.pos + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, batch: int):
        idx = np.stack([rng.integers(0, self.size, batch) for rng in self.rngs])
        rows = np.arange(len(self.rngs))[:, None]
        return tuple(torch.from_numpy(a[rows, idx]) for a in
                     (self.obs, self.action, self.reward, self.next_obs, self.terminated))

    def sample_obs(self, batch: int, rng: np.random.Generator) -> torch.Tensor:
        """States for monitoring, drawn with a separate rng (training's draws are untouched)."""
        idx = rng.integers(0, self.size, (len(self.rngs), batch))
        return torch.from_numpy(self.obs[np.arange(len(self.rngs))[:, None], idx])


@torch.no_grad()
def evaluate(q: nn.Module, envs: List[list], seeds: List[List[int]]) -> np.ndarray:
    """Mean return of greedy episodes per seed: envs[k][e] runs episode e of seed k."""
    obs = np.stack([np.stack([env.reset(seed=s)[0] for env, s in zip(row, srow)])
                    for row, srow in zip(envs, seeds)])
    returns = np.zeros(obs.shape[:2])
    alive = np.ones(obs.shape[:2], bool)
    while alive.any():
        actions = q(torch.from_numpy(obs)).argmax(-1).numpy()
        for k, e in zip(*np.nonzero(alive)):
            obs[k, e], r, term, trunc, _ = envs[k][e].step(int(actions[k, e]))
            returns[k, e] += r
            alive[k, e] = not (term or trunc)
    return returns.mean(1)


def train(name: str, ema_kwargs: Optional[dict], seeds: List[int], cfg: Config,
          progress=None) -> List[dict]:
    """Trains one DQN per seed with the given target update; the seeds run side by side.

    Each seed has its own network, environment, replay buffer and exploration; the
    loss is the sum of the per-seed losses, so neither gradients nor Adam's
    (elementwise) state mix between seeds."""
    import gymnasium as gym

    n = len(seeds)
    rngs = [np.random.default_rng(s) for s in seeds]
    envs = [gym.make("CartPole-v1") for _ in seeds]
    eval_envs = [[gym.make("CartPole-v1") for _ in range(cfg.eval_episodes)] for _ in seeds]
    eval_seeds = [[10_000 * (s + 1) + e for e in range(cfg.eval_episodes)] for s in seeds]
    obs_dim, n_actions = envs[0].observation_space.shape[0], envs[0].action_space.n

    q = q_network(seeds, obs_dim, n_actions, cfg.hidden)
    optimizer = torch.optim.Adam(q.parameters(), lr=cfg.lr, fused=True)
    if ema_kwargs is None:
        target = q                                   # bootstrap from the online network
    else:
        ema = FusedEMA(q, **ema_kwargs)              # the target network ...
        ema.attach(optimizer)                        # ... updated after every optimizer.step()
        target = ema.module
    buffer = ReplayBuffer(n, cfg.buffer_size, obs_dim, rngs)
    loss_fn = {"huber": F.smooth_l1_loss, "mse": F.mse_loss}[cfg.loss]

    eval_steps, eval_returns, q_values = [], [], []
    episode_return, episodes = np.zeros(n), [[] for _ in seeds]   # training episodes (step, return)
    obs = np.stack([env.reset(seed=s)[0] for env, s in zip(envs, seeds)])
    next_obs = np.empty_like(obs)
    reward, terminated = np.zeros(n, np.float32), np.zeros(n, np.float32)
    eps_steps = max(1, int(cfg.eps_fraction * cfg.steps))
    for step in range(1, cfg.steps + 1):
        eps = cfg.eps_start + (cfg.eps_end - cfg.eps_start) * min(1.0, step / eps_steps)
        with torch.no_grad():
            greedy = q(torch.from_numpy(obs).unsqueeze(1)).argmax(-1).squeeze(1).numpy()
        action = np.array([rng.integers(n_actions) if rng.random() < eps else a
                           for rng, a in zip(rngs, greedy)])
        reset = []
        for k, env in enumerate(envs):
            next_obs[k], reward[k], term, trunc, _ = env.step(int(action[k]))
            terminated[k] = term
            episode_return[k] += reward[k]
            if term or trunc:
                reset.append(k)
                episodes[k].append((step, float(episode_return[k])))
                episode_return[k] = 0.0
        # Bootstrap through time-limit truncations; only a real termination ends the return.
        buffer.add(obs, action, reward, next_obs, terminated)
        obs[:] = next_obs
        for k in reset:
            obs[k] = envs[k].reset()[0]

        if step >= cfg.learning_starts and step % cfg.train_every == 0:
            b_obs, b_act, b_rew, b_next, b_term = buffer.sample(cfg.batch_size)
            with torch.no_grad():
                y = b_rew + cfg.gamma * (1.0 - b_term) * target(b_next).max(-1).values
            q_sa = q(b_obs).gather(-1, b_act.unsqueeze(-1)).squeeze(-1)
            loss = loss_fn(q_sa, y, reduction="none").mean(1).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()                         # the target update happens here

        if step % cfg.eval_every == 0:
            eval_steps.append(step)
            eval_returns.append(evaluate(q, eval_envs, eval_seeds))
            with torch.no_grad():   # the Q-network's value estimate on replayed states
                states = buffer.sample_obs(256, np.random.default_rng(step))
                q_values.append(q(states).max(-1).values.mean(1).numpy())
        if progress is not None and step % 100 == 0:
            with progress.get_lock():
                progress.value += 100 * n
    curves, qs = np.stack(eval_returns, 1), np.stack(q_values, 1)
    return [dict(variant=name, seed=s, steps=eval_steps, returns=curves[k].tolist(),
                 q=qs[k].tolist(), episodes=episodes[k]) for k, s in enumerate(seeds)]


# ----------------------------------------------------------------------------- summary

def summarize(run: dict, final_evals: int, cfg: Config) -> dict:
    r = np.asarray(run["returns"])
    hit = np.nonzero(r >= SOLVED)[0]
    first = int(hit[0]) if len(hit) else None
    collapsed = first is not None and bool((r[first + 1:] < COLLAPSED).any())
    # Training episodes (epsilon-greedy) that ended in the last 10% of the run: CleanRL's
    # reported number is an episodic return of training episodes.
    late = [ret for step, ret in run["episodes"] if step > 0.9 * cfg.steps]
    return dict(final=float(r[-final_evals:].mean()),
                train=float(np.mean(late)) if late else float("nan"),
                first_solved=None if first is None else run["steps"][first],
                reached=first is not None, collapsed=collapsed,
                frac_solved=float((r >= SOLVED).mean()))


def write_outputs(runs: List[dict], cfg: Config, settings: str, seeds: List[int], out: str,
                  clock: RunClock) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out, exist_ok=True)
    names = list(variants(cfg))
    final_evals = max(1, min(5, len(runs[0]["returns"]) // 4))
    colors = ["tab:red", "tab:blue", "tab:green"]

    fig, (ax, axq) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw=dict(width_ratios=[3, 2]))
    for name, color in zip(names, colors):
        mine = [r for r in runs if r["variant"] == name]
        steps = np.asarray(mine[0]["steps"])
        curves = np.stack([r["returns"] for r in mine])
        for c in curves:
            ax.plot(steps, c, color=color, alpha=0.15, lw=0.8)
        ax.plot(steps, curves.mean(0), color=color, lw=2, label=f"{name} (mean of {len(mine)})")
        ax.fill_between(steps, curves.mean(0) - curves.std(0),
                        np.minimum(curves.mean(0) + curves.std(0), 500), color=color, alpha=0.12)
        qs = np.abs(np.stack([r["q"] for r in mine]))
        axq.plot(steps, np.median(qs, 0), color=color, lw=2, label=name)
        axq.fill_between(steps, qs.min(0), qs.max(0), color=color, alpha=0.15)
    ax.axhline(SOLVED, color="k", ls=":", lw=1)
    ax.axhline(COLLAPSED, color="gray", ls=":", lw=1)
    ax.set_xlabel("environment steps" + (" (= gradient steps)" if cfg.train_every == 1 else
                                         f" (one gradient step every {cfg.train_every})"))
    ax.set_ylabel(f"greedy return (mean of {cfg.eval_episodes} episodes)")
    ax.set_title(f"DQN on CartPole-v1, {settings} settings, {len(seeds)} seeds: mean, ±1 std, "
                 "thin lines = seeds", fontsize=10)
    ax.set_ylim(0, 510)
    ax.legend(loc="upper left", fontsize=8)
    q_max = (1 - cfg.gamma ** 500) / (1 - cfg.gamma)
    axq.axhline(q_max, color="k", ls=":", lw=1, label=f"largest true value ({q_max:.0f})")
    axq.set_yscale("log")
    axq.set_xlabel("environment steps")
    axq.set_ylabel("|mean max_a Q(s, a)| on replayed states")
    axq.set_title("value estimates: median, band = min..max over seeds", fontsize=10)
    axq.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, f"{STEM[settings]}.png"), dpi=110)
    plt.close(fig)

    every = ("one Adam step per env step" if cfg.train_every == 1 else
             f"one Adam step every {cfg.train_every} env steps")
    lines = [
        f"# DQN on CartPole-v1 ({settings} settings): no target network vs hard copy vs soft "
        "update",
        "",
        f"Command: `{command_line('dqn_cartpole.py')}` ({clock.summary()}). "
        f"{len(seeds)} seeds per variant, "
        f"{cfg.steps} env steps each, {every} after {cfg.learning_starts}; "
        f"greedy evaluation ({cfg.eval_episodes} episodes) every {cfg.eval_every} steps.",
        "",
        "Settings: " + ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(cfg).items()),
        "",
        f"- final return: mean greedy return over the last {final_evals} evaluations "
        f"(last {final_evals * cfg.eval_every} steps), mean ± std over seeds",
        f"- steps to {SOLVED:.0f}: first evaluation with a mean return >= {SOLVED:.0f}; "
        "median over the seeds that got there",
        f"- collapsed: runs that had reached {SOLVED:.0f} and later had an evaluation "
        f"below {COLLAPSED:.0f}",
        f"- time at >= {SOLVED:.0f}: fraction of all evaluations at or above {SOLVED:.0f}, "
        "mean over seeds",
        f"- training return: mean return of the training episodes (epsilon-greedy, epsilon "
        f"{cfg.eps_end} by then) that ended in the last 10% of the run, mean ± std over seeds "
        "(CleanRL reports the episodic return of training episodes)",
        "- final Q: the Q-network's mean max_a Q(s, a) on 256 replayed states at the end, "
        "median over seeds (the true value of a state is at most "
        f"{(1 - cfg.gamma ** 500) / (1 - cfg.gamma):.1f} with gamma={cfg.gamma})",
        "",
        f"| variant | final return | reached {SOLVED:.0f} | steps to {SOLVED:.0f} (median) "
        f"| collapsed after reaching | time at >= {SOLVED:.0f} | training return | final Q |",
        "|---|---|---|---|---|---|---|---|",
    ]
    per_seed = ["", "Per seed: final return / steps to 475 / collapsed", "",
                "| variant | " + " | ".join(f"seed {s}" for s in seeds) + " |",
                "|---|" + "---|" * len(seeds)]
    for name in names:
        mine = sorted((r for r in runs if r["variant"] == name), key=lambda r: r["seed"])
        sums = [summarize(r, final_evals, cfg) for r in mine]
        trains = np.array([s["train"] for s in sums])
        finals = np.array([s["final"] for s in sums])
        reached = [s for s in sums if s["reached"]]
        first = [s["first_solved"] for s in reached]
        med = f"{int(np.median(first))}" if first else "never"
        n_coll = sum(s["collapsed"] for s in reached)
        lines.append(
            f"| {name} | {finals.mean():.1f} ± {finals.std():.1f} | {len(reached)}/{len(sums)} "
            f"| {med} | {n_coll}/{len(reached)} "
            f"| {np.mean([s['frac_solved'] for s in sums]):.0%} "
            f"| {trains.mean():.1f} ± {trains.std():.1f} "
            f"| {np.median([r['q'][-1] for r in mine]):.3g} |")
        cells = [f"{s['final']:.0f} / {s['first_solved'] if s['reached'] else '-'} / "
                 f"{'yes' if s['collapsed'] else 'no'}" for s in sums]
        per_seed.append(f"| {name} | " + " | ".join(cells) + " |")
    if settings == "cleanrl":
        lines += ["", f"CleanRL's dqn.py on CartPole-v1 (its documentation): {CLEANRL[0]} ± "
                  f"{CLEANRL[1]} episodic return, 3 seeds, 500k steps."]
    with open(os.path.join(out, f"{STEM[settings]}.md"), "w") as f:
        f.write("\n".join(lines + per_seed) + "\n")


_progress = None


def _init_worker(progress):
    global _progress
    _progress = progress
    torch.set_num_threads(1)          # small MLPs are fastest on one thread


def _worker(job):
    name, kwargs, seeds, cfg = job
    return train(name, kwargs, seeds, cfg, _progress)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--settings", choices=sorted(SETTINGS), default="cleanrl",
                   help="CleanRL's dqn.py (default) or one Adam step per env step (aggressive)")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="seeds to run for every variant (default 0..9; --quick: 0 1)")
    p.add_argument("--steps", type=int, default=None, help="env steps per run")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate")
    p.add_argument("--quick", action="store_true", help="a short smoke run (seconds)")
    add_workers_arg(p)
    add_output_args(p, __file__)
    args = p.parse_args(argv)
    from tqdm import tqdm

    cfg = SETTINGS[args.settings]
    if args.quick:
        cfg = dataclasses.replace(cfg, steps=2_000, learning_starts=500, eval_every=500,
                                  eval_episodes=2)
    if args.steps:
        cfg = dataclasses.replace(cfg, steps=args.steps)
    if args.lr:
        cfg = dataclasses.replace(cfg, lr=args.lr)
    seeds = args.seeds if args.seeds is not None else ([0, 1] if args.quick else list(range(10)))
    # Seeds run in groups of SEEDS_PER_JOB inside one process (one batched network).
    groups = [seeds[i:i + SEEDS_PER_JOB] for i in range(0, len(seeds), SEEDS_PER_JOB)]
    jobs = [(name, kw, g, cfg) for g in groups for name, kw in variants(cfg).items()]

    clock = RunClock()
    ctx = mp.get_context("spawn")
    progress = ctx.Value("q", 0)
    bar = tqdm(total=len(seeds) * len(variants(cfg)) * cfg.steps, desc="DQN env steps",
               unit="step", unit_scale=True, file=sys.stdout, mininterval=1.0)
    runs = []
    if args.workers > 1:
        with ctx.Pool(args.workers, _init_worker, (progress,)) as pool:
            result = pool.map_async(_worker, jobs)
            while not result.ready():
                result.wait(1.0)
                bar.update(progress.value - bar.n)
            for group in result.get():
                runs.extend(group)
    else:
        _init_worker(progress)
        for job in jobs:
            runs.extend(_worker(job))
            bar.update(progress.value - bar.n)
    bar.update(bar.total - bar.n)
    bar.close()
    clock.stop()
    write_outputs(runs, cfg, args.settings, seeds, args.out, clock)
    stem = os.path.join(args.out, STEM[args.settings])
    print(open(stem + ".md").read())
    print(f"wrote {stem}.png and {stem}.md in {clock.elapsed:.0f} s")


if __name__ == "__main__":
    main()
