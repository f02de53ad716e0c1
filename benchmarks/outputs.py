"""Where the benchmarks and examples write: ``--out DIR`` (default ``runs/`` at the
repository root, ignored by git), or ``--update-results``: the committed reference results
in the ``results/`` folder beside the script. A user's run never rewrites tracked files."""
import argparse
import json
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = os.path.join(REPO, "runs")


def results_dir(script: str) -> str:
    """The committed reference results of ``script`` (benchmarks/results, examples/results)."""
    return os.path.join(os.path.dirname(os.path.abspath(script)), "results")


def add_output_args(parser: argparse.ArgumentParser, script: str) -> None:
    """``--out DIR`` and ``--update-results`` (exclusive); both set ``args.out``."""
    results = results_dir(script)
    out = parser.add_mutually_exclusive_group()
    out.add_argument("--out", default=RUNS,
                     help="folder for the outputs (default: runs/, ignored by git)")
    out.add_argument("--update-results", dest="out", action="store_const", const=results,
                     help=f"write them to {os.path.relpath(results, REPO)}/ instead: "
                     "the committed reference results")


def write_results(out: str, stem: str, record, text: str) -> None:
    """Writes ``stem``.json (the record) and ``stem``.md (the text) to ``out``, and prints
    the text."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, stem + ".json"), "w") as f:
        json.dump(record, f, indent=1)
    with open(os.path.join(out, stem + ".md"), "w") as f:
        f.write(text)
    print(text)
