"""A user's run never rewrites the record: every script of benchmarks/ and examples/, run
with its defaults (at its cheapest settings) in a fresh git checkout of those folders,
leaves ``git status`` clean and writes its outputs to the git-ignored ``runs/``
(bench_offload.py, which builds the fake CUDA runtime, is checked in test_offload_fake.py
with ``check_default_run``)."""
import importlib.util
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# script, cheapest arguments (no --out), an output it must write under runs/, modules it needs
SCRIPTS = [
    ("benchmarks/bench.py", ["--models", "tiny", "--methods", "plan", "--min-run-time", "0.01",
                             "--rounds", "2", "--time-budget", "0", "--no-progress"],
     "bench_cpu.md", ["matplotlib"]),
    ("benchmarks/bench_posthoc.py", ["--models", "tiny", "--synth", "tiny:3", "--quick"],
     "bench_posthoc_quick.md", []),
    ("benchmarks/bench_dropins.py", ["--models", "tiny", "--seconds", "0.02", "--rounds", "1",
                                     "--only", "torch_ema"], "bench_dropins.md", []),
    ("benchmarks/bench_frozen.py", ["--layers", "2", "--width", "64", "--rounds", "1",
                                    "--seconds", "0.01"], "bench_frozen.md", []),
    ("benchmarks/bench_memory.py", ["--quick"], "bench_memory.md", []),
    ("benchmarks/bench_rounding.py", ["--quick"], "bench_rounding.md", []),
    ("benchmarks/bench_nonblocking.py", ["--model", "tiny", "--rounds", "1", "--calls", "1",
                                         "--steps", "1"], "bench_nonblocking.md", []),
    ("examples/dqn_cartpole.py", ["--quick", "--seeds", "0", "--steps", "600", "--workers", "1"],
     "dqn_cartpole.md", ["gymnasium", "matplotlib", "tqdm"]),
    ("examples/byol_digits.py", ["--quick", "--steps", "10", "--workers", "1"],
     "byol_digits.md", ["sklearn", "matplotlib", "tqdm"]),
    ("examples/moco_digits.py", ["--quick", "--steps", "10", "--workers", "1"],
     "moco_digits.md", ["sklearn", "matplotlib", "tqdm"]),
    ("examples/sb3_pendulum.py", ["--quick", "--steps", "300", "--workers", "1"],
     "sb3_pendulum.md", ["gymnasium", "stable_baselines3", "matplotlib", "tqdm"]),
    ("examples/posthoc_digits.py", ["--quick", "--steps", "60"], "posthoc_digits.md",
     ["sklearn", "matplotlib"]),
]


def _git(cwd, *args):
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd,
                          capture_output=True, text=True, check=True).stdout


@pytest.mark.parametrize("script, args, output, needs", SCRIPTS,
                         ids=[os.path.basename(s[0]) for s in SCRIPTS])
def test_a_default_run_leaves_git_status_clean(tmp_path, script, args, output, needs):
    missing = [m for m in needs if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"needs {missing}")
    check_default_run(tmp_path, script, args, output)


def check_default_run(tmp_path, script, args, output):
    """Runs ``script`` with ``args`` (no --out) in a fresh git checkout of benchmarks/ and
    examples/: it must leave ``git status`` clean and write ``runs/<output>``."""
    if shutil.which("git") is None:
        pytest.skip("needs git")
    # A checkout of the scripts, their committed results and the repository's .gitignore;
    # fused_ema itself comes from this checkout through PYTHONPATH.
    repo = tmp_path / "repo"
    for d in ("benchmarks", "examples"):
        shutil.copytree(os.path.join(ROOT, d), repo / d,
                        ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(os.path.join(ROOT, ".gitignore"), repo / ".gitignore")
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "record")
    assert _git(repo, "ls-files", "benchmarks/results", "examples/results").split()

    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, str(repo / script), *args]
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"

    assert _git(repo, "status", "--porcelain", "--untracked-files=all") == "", (
        f"{script} with its defaults changed the checkout")
    assert (repo / "runs" / output).is_file(), sorted(os.listdir(repo))
