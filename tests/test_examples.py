"""The examples run end to end (``--quick``) and write their plot and table.

Each runs in a subprocess, as a user would run it, into a temporary output folder.
Skipped when the optional ``examples`` extra (gymnasium, scikit-learn, matplotlib,
tqdm) is not installed.
"""
import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")


def _need(*modules):
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"needs the examples extra (pip install -e .[examples]): missing {missing}")


def _run(script, out_dir, *extra):
    cmd = [sys.executable, os.path.join(EXAMPLES, script), "--quick", "--out", str(out_dir),
           *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _check_outputs(out_dir, stem, must_mention):
    png = out_dir / f"{stem}.png"
    md = out_dir / f"{stem}.md"
    assert png.is_file() and png.stat().st_size > 1000
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    text = md.read_text()
    assert text.startswith("# ")
    for word in must_mention:
        assert word in text, f"{md} does not mention {word!r}:\n{text}"


def test_dqn_cartpole_quick(tmp_path):
    _need("gymnasium", "matplotlib", "tqdm")
    _run("dqn_cartpole.py", tmp_path)
    _check_outputs(tmp_path, "dqn_cartpole",
                   ["cleanrl settings", "no target network", "hard copy every 500 steps (50 updates)",
                    "soft update tau=", "training return", "CleanRL's dqn.py", "seed 0", "seed 1"])


def test_dqn_cartpole_aggressive_quick(tmp_path):
    _need("gymnasium", "matplotlib", "tqdm")
    _run("dqn_cartpole.py", tmp_path, "--settings", "aggressive", "--seeds", "0")
    _check_outputs(tmp_path, "dqn_cartpole_aggressive",
                   ["aggressive settings", "no target network", "hard copy every 500 steps |",
                    "soft update tau=", "seed 0"])


def test_sb3_pendulum_quick(tmp_path):
    _need("gymnasium", "stable_baselines3", "matplotlib", "tqdm")
    _run("sb3_pendulum.py", tmp_path)
    _check_outputs(tmp_path, "sb3_pendulum",
                   [f"| {algo} | {tau} |" for algo in ("DDPG", "TD3", "SAC")
                    for tau in ("1", "0.1", "0.005", "0.001")] + ["zoo", "volatility", "seed 0"])


def test_byol_digits_quick(tmp_path):
    _need("sklearn", "matplotlib", "tqdm")
    _run("byol_digits.py", tmp_path)
    _check_outputs(tmp_path, "byol_digits",
                   ["raw pixels", "untrained encoder", "decay 0, predictor",
                    "decay 0.9, predictor", "decay 0.999, no predictor",
                    "decay cosine 0.996->1, no predictor", "decay 1 (random teacher), predictor"])


def test_moco_digits_quick(tmp_path):
    _need("sklearn", "matplotlib", "tqdm")
    _run("moco_digits.py", tmp_path)
    _check_outputs(tmp_path, "moco_digits",
                   ["raw pixels", "untrained encoder", "| 0 |", "| 0.9 |", "| 0.99 |", "| 0.999 |",
                    "| 0.9999 |", "oscillation", "seed 0"])
