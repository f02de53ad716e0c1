"""DDPG, TD3 and SAC on Pendulum-v1 (Stable-Baselines3): what the target networks' tau does.

The three actor-critic algorithms regress their critics onto r + gamma * Q_target(s', a'),
with target networks moved by ``target <- (1 - tau) target + tau online`` after every
update (SB3's ``polyak_update``). Here SB3 itself trains them, with
``fused_ema.integrations.sb3.patch()`` in force: every target update of the algorithms is
fused_ema's ``polyak_update`` (one fused call for all tensors), the drop-in a user of SB3
would use. Hyperparameters: rl-baselines3-zoo's for Pendulum-v1 (hyperparams/ddpg.yml,
td3.yml, sac.yml; 20k steps), except tau, which varies:

  tau = 1       no target network: the target is a copy of the online network, refreshed at
                every target update (every gradient step; every 2nd for TD3's delayed update)
  tau = 0.1     a fast target
  tau = 0.005   the zoo's and the papers' setting
  tau = 0.001   a slow target

Measured per run: the deterministic policy's return at the end (20 episodes with fixed
seeds; the zoo reports mean ± std over its evaluation episodes, so the table pools the
episodes of all seeds the same way) and along training, and TD3's measurement (Fujimoto et al.
2018, Figure 3): the critic's estimate Q1(s, pi(s)) averaged over a fixed set of 256 states,
recorded every 100 steps, and its volatility (mean absolute change between consecutive
records over the last quarter of training).

    pip install -e .[examples,integrations]
    python examples/sb3_pendulum.py             # full run (3 algorithms x 4 taus x 3 seeds)
    python examples/sb3_pendulum.py --quick     # smoke test (small networks, 600 steps)

Writes sb3_pendulum.png, sb3_pendulum.md and sb3_pendulum.json under --out (default runs/ at
the repository root, ignored by git); --update-results writes them to examples/results/, the
committed full-run results.
"""
import os
import sys

# _common first: it sets one BLAS/OpenMP thread per process before numpy/torch load.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import RunClock, add_output_args, add_workers_arg, command_line, run_jobs  # noqa: E402

import argparse
import dataclasses
import json
from typing import List

import numpy as np
import torch


ALGOS = ("DDPG", "TD3", "SAC")
TAUS = (1.0, 0.1, 0.005, 0.001)
# rl-baselines3-zoo, benchmark.md (Pendulum-v1, 20k steps; mean ± std over 750 evaluation
# episodes of one trained agent): the published numbers this example reads against.
ZOO = {"DDPG": (-152.099, 94.282), "TD3": (-151.855, 90.227), "SAC": (-156.995, 88.714)}


@dataclasses.dataclass
class Config:
    steps: int = 20_000           # zoo: n_timesteps
    sac_steps: int = 0            # SAC's env steps, if not `steps` (0: `steps`)
    eval_every: int = 2_000       # deterministic evaluation along training ...
    eval_episodes: int = 5        # ... of this many episodes
    final_episodes: int = 20      # episodes of the final evaluation
    measure_every: int = 100      # critic estimate on the fixed states every this many steps
    n_states: int = 256           # the fixed states
    quick: bool = False           # small networks and batches (smoke test only)


def run_steps(algo: str, cfg: Config) -> int:
    return cfg.sac_steps if algo == "SAC" and cfg.sac_steps else cfg.steps


def zoo_kwargs(algo: str, cfg: Config) -> dict:
    """rl-baselines3-zoo's hyperparameters for Pendulum-v1 (SB3 defaults for the rest)."""
    from stable_baselines3.common.noise import NormalActionNoise
    if algo == "SAC":                       # sac.yml: learning_rate 1e-3, the rest default
        kw = dict(learning_rate=1e-3)
    else:                                   # ddpg.yml and td3.yml are the same
        kw = dict(gamma=0.98, buffer_size=200_000, learning_starts=10_000,
                  action_noise=NormalActionNoise(np.zeros(1), 0.1 * np.ones(1)),
                  gradient_steps=1, train_freq=1, learning_rate=1e-3,
                  policy_kwargs=dict(net_arch=[400, 300]))
    if cfg.quick:   # a smoke test of the plumbing, not of the algorithms
        kw.update(learning_starts=cfg.steps // 2, batch_size=32, buffer_size=cfg.steps,
                  policy_kwargs=dict(net_arch=[32, 32]))
    return kw


def fixed_states(n: int) -> np.ndarray:
    """The states the critic is asked about: angle uniform on the circle, angular velocity
    uniform in [-8, 8] (Pendulum's observation is cos, sin, velocity); the same for every run."""
    rng = np.random.default_rng(12345)
    theta = rng.uniform(-np.pi, np.pi, n)
    vel = rng.uniform(-8.0, 8.0, n)
    return np.stack([np.cos(theta), np.sin(theta), vel], 1).astype(np.float32)


def evaluate(model, episodes: int, first_seed: int) -> List[float]:
    """Returns of the deterministic policy on episodes with seeds first_seed, first_seed+1, ..."""
    import gymnasium as gym
    env = gym.make("Pendulum-v1")
    out = []
    for e in range(episodes):
        obs, _ = env.reset(seed=first_seed + e)
        total, done = 0.0, False
        while not done:
            action, _ = model.predict(obs, deterministic=True)
            obs, r, term, trunc, _ = env.step(action)
            total += float(r)
            done = term or trunc
        out.append(total)
    env.close()
    return out


def train(algo: str, tau: float, seed: int, cfg: Config) -> dict:
    import gymnasium as gym
    import stable_baselines3
    from stable_baselines3.common.callbacks import BaseCallback

    from fused_ema.integrations import sb3
    sb3.patch()   # every SB3 algorithm's target update is now fused_ema's polyak_update
    # The module whose train() does the target updates (DDPG's is TD3's).
    algo_module = sys.modules[getattr(stable_baselines3, algo).train.__module__]
    assert algo_module.polyak_update is sb3.polyak_update, "the drop-in is not in force"

    states = torch.from_numpy(fixed_states(cfg.n_states))
    record = dict(measure_steps=[], q=[], eval_steps=[], eval_returns=[])

    class Monitor(BaseCallback):
        def _on_step(self) -> bool:
            step = self.num_timesteps
            if step % cfg.measure_every == 0:
                with torch.no_grad():
                    policy = self.model.policy
                    if algo == "SAC":
                        action = policy.actor(states, deterministic=True)
                    else:
                        action = policy.actor(states)
                    q = policy.critic(states, action)[0]
                record["measure_steps"].append(step)
                record["q"].append(float(q.mean()))
            if step % cfg.eval_every == 0:
                record["eval_steps"].append(step)
                record["eval_returns"].append(
                    float(np.mean(evaluate(self.model, cfg.eval_episodes, 1_000_000 + step))))
            return True

    env = gym.make("Pendulum-v1")
    model = getattr(stable_baselines3, algo)("MlpPolicy", env, tau=tau, seed=seed, device="cpu",
                                             verbose=0, **zoo_kwargs(algo, cfg))
    model.learn(run_steps(algo, cfg), callback=Monitor())
    final = evaluate(model, cfg.final_episodes, 0)
    return dict(algo=algo, tau=tau, seed=seed, final_returns=final, **record)


# ----------------------------------------------------------------------------- summary

def volatility(run: dict, steps: int) -> float:
    """Mean |change| of the fixed-state estimate between consecutive records over the last
    quarter of training (when the returns have mostly settled, so drift from learning is small)."""
    q = np.asarray(run["q"])
    keep = np.asarray(run["measure_steps"]) > 3 * steps // 4
    return float(np.abs(np.diff(q[keep])).mean()) if keep.sum() > 1 else float("nan")


def write_outputs(runs: List[dict], cfg: Config, seeds: List[int], out: str,
                  clock: RunClock) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "sb3_pendulum.json"), "w") as f:
        json.dump(dict(config=dataclasses.asdict(cfg), seeds=seeds, runs=runs), f)

    def mine(algo, tau):
        return sorted((r for r in runs if r["algo"] == algo and r["tau"] == tau),
                      key=lambda r: r["seed"])

    colors = dict(zip(TAUS, ["tab:red", "tab:orange", "tab:green", "tab:blue"]))
    fig, axes = plt.subplots(2, len(ALGOS), figsize=(15, 8), sharex=True)
    for j, algo in enumerate(ALGOS):
        ax, axq = axes[0, j], axes[1, j]
        for tau in TAUS:
            rs = mine(algo, tau)
            steps = np.asarray(rs[0]["eval_steps"])
            curves = np.stack([r["eval_returns"] for r in rs])
            ax.plot(steps, curves.mean(0), color=colors[tau], lw=2, marker="o", ms=3,
                    label=f"tau={tau:g}")
            ax.fill_between(steps, curves.min(0), curves.max(0), color=colors[tau], alpha=0.12)
            ms = np.asarray(rs[0]["measure_steps"])
            for k, r in enumerate(rs):
                axq.plot(ms, r["q"], color=colors[tau], lw=0.9, alpha=0.8,
                         label=f"tau={tau:g}" if k == 0 else None)
        mean, std = ZOO[algo]
        ax.axhline(mean, color="k", ls=":", lw=1, label=f"zoo {mean:.0f} ± {std:.0f}")
        ax.set_title(f"{algo}: return ({cfg.eval_episodes} greedy episodes), "
                     "mean, band min..max", fontsize=9)
        ax.set_ylabel("return")
        ax.legend(fontsize=8, loc="lower right")
        axq.set_title(f"{algo}: Q1(s, pi(s)) on {cfg.n_states} fixed states, "
                      "one line per seed", fontsize=9)
        axq.set_xlabel("environment steps")
        axq.set_ylabel("value estimate")
        axq.set_yscale("symlog", linthresh=10)
        axq.legend(fontsize=8, loc="lower left")
    fig.suptitle(f"SB3 on Pendulum-v1 with fused_ema.integrations.sb3.patch(), "
                 f"{len(seeds)} seeds, zoo hyperparameters, tau varied")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "sb3_pendulum.png"), dpi=100)
    plt.close(fig)

    lines = [
        "# DDPG, TD3 and SAC on Pendulum-v1 (Stable-Baselines3 + fused_ema): tau",
        "",
        f"Command: `{command_line('sb3_pendulum.py')}` ({clock.summary()}). "
        f"{len(seeds)} seeds per cell, {cfg.steps} env steps each "
        f"({run_steps('SAC', cfg)} for SAC), rl-baselines3-zoo's "
        "hyperparameters but tau; every target update went through "
        "`fused_ema.integrations.sb3.patch()`.",
        "",
        "Settings: " + ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(cfg).items()),
        "",
        "- final return: the deterministic policy at the end, "
        f"{cfg.final_episodes} episodes per seed (the same episode seeds for every run); "
        "mean ± std over all episodes of all seeds (as the zoo reports its "
        "750 episodes), then the range of the per-seed means",
        f"- Q(s, pi(s)): the critic's first head on the policy's action, mean over "
        f"{cfg.n_states} fixed states; at the end, mean over seeds",
        f"- volatility: mean |change| of that estimate between records {cfg.measure_every} "
        f"steps apart, over the last quarter of training, mean over seeds",
        "",
        "| algorithm | tau | steps | final return | per-seed means | zoo (20k steps) "
        "| final Q(s, pi(s)) | volatility |",
        "|---|---|---|---|---|---|---|---|",
    ]
    per_seed = ["", "Per seed: final return (mean of the episodes) / volatility", "",
                "| algorithm | tau | " + " | ".join(f"seed {s}" for s in seeds) + " |",
                "|---|---|" + "---|" * len(seeds)]
    for algo in ALGOS:
        for tau in TAUS:
            rs = mine(algo, tau)
            pooled = np.concatenate([r["final_returns"] for r in rs])
            means = [float(np.mean(r["final_returns"])) for r in rs]
            vols = [volatility(r, run_steps(algo, cfg)) for r in rs]
            zoo = f"{ZOO[algo][0]:.1f} ± {ZOO[algo][1]:.1f}" if tau == 0.005 else ""
            lines.append(
                f"| {algo} | {tau:g} | {run_steps(algo, cfg)} "
                f"| {pooled.mean():.1f} ± {pooled.std():.1f} "
                f"| {min(means):.0f} .. {max(means):.0f} | {zoo} "
                f"| {np.mean([r['q'][-1] for r in rs]):.1f} | {np.mean(vols):.2f} |")
            per_seed.append(f"| {algo} | {tau:g} | " + " | ".join(
                f"{m:.0f} / {v:.2f}" for m, v in zip(means, vols)) + " |")
    with open(os.path.join(out, "sb3_pendulum.md"), "w") as f:
        f.write("\n".join(lines + per_seed) + "\n")


def _worker(job):
    torch.set_num_threads(1)          # one thread per process; two processes side by side
    return train(*job)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="seeds to run for every cell (default 0 1 2; --quick: 0)")
    p.add_argument("--steps", type=int, default=None, help="env steps per run")
    p.add_argument("--sac-steps", type=int, default=None,
                   help="SAC's env steps, if not --steps (it trains from step 100, DDPG and "
                   "TD3 from 10,000: the most expensive of the three)")
    p.add_argument("--quick", action="store_true",
                   help="a short smoke run (small networks, 600 steps)")
    add_workers_arg(p)
    add_output_args(p, __file__)
    args = p.parse_args(argv)

    cfg = Config()
    if args.quick:
        cfg = dataclasses.replace(cfg, steps=600, eval_every=300, eval_episodes=1,
                                  final_episodes=2, measure_every=50, quick=True)
    if args.steps:
        cfg = dataclasses.replace(cfg, steps=args.steps)
    if args.sac_steps:
        cfg = dataclasses.replace(cfg, sac_steps=args.sac_steps)
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    # Slowest first (SAC trains from step 100, DDPG and TD3 from 10k), so the pool ends evenly.
    jobs = [(algo, tau, s, cfg) for algo in ("SAC", "TD3", "DDPG") for tau in TAUS
            for s in seeds]

    clock = RunClock()
    runs = list(run_jobs(_worker, jobs, args.workers, "SB3 runs"))
    clock.stop()
    write_outputs(runs, cfg, seeds, args.out, clock)
    print(open(os.path.join(args.out, "sb3_pendulum.md")).read())
    print(f"wrote {args.out}/sb3_pendulum.png, .md and .json in {clock.elapsed:.0f} s")


if __name__ == "__main__":
    main()
