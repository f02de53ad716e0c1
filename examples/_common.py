"""What the examples share: one BLAS/OpenMP thread per process and the processes they run
on (``run_jobs``, ``--workers``), how a run was started, its CPU time, and the load it ran
under (the examples' timings are taken on a shared 2-core machine, so each table says how
busy it was). The --out / --update-results convention lives in benchmarks/outputs.py.

An example imports this module before numpy or torch: the thread counts are read when those
load."""
import multiprocessing as mp
import os
import resource
import sys
import threading
import time

# These models are small: the 2 cores are better used by two single-threaded processes side
# by side (the spawned workers inherit the setting).
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

# --out / --update-results, shared with benchmarks/ (a user's run never rewrites the record)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))
from outputs import add_output_args  # noqa: E402,F401  (re-exported for the examples)


def command_line(script: str) -> str:
    """How this run was started, without --out (a local path)."""
    args, skip = [], False
    for a in sys.argv[1:]:
        if skip:
            skip = False
        elif a == "--out":
            skip = True
        elif not a.startswith("--out="):
            args.append(a)
    return " ".join(["python", f"examples/{script}"] + args)


def add_workers_arg(parser) -> None:
    """``--workers``: the processes ``run_jobs`` runs the jobs in (one thread each)."""
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                        help="processes (one thread each)")


def run_jobs(worker, jobs, workers: int, desc: str):
    """Yields ``worker(job)`` for every job, in completion order, with a progress bar: in
    ``workers`` spawned processes (each runs one thread) when more than one, else here."""
    from tqdm import tqdm

    with tqdm(total=len(jobs), desc=desc, unit="run", file=sys.stdout) as bar:
        if workers > 1:
            with mp.get_context("spawn").Pool(workers) as pool:
                for result in pool.imap_unordered(worker, jobs):
                    bar.update()
                    yield result
        else:
            for job in jobs:
                result = worker(job)
                bar.update()
                yield result


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children."""
    return sum(getattr(resource.getrusage(who), f) for who in
               (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN) for f in ("ru_utime", "ru_stime"))


class RunClock:
    """Wall time, CPU time and the machine's 1-minute load average (sampled every
    ``every`` seconds in a daemon thread) over a run."""

    def __init__(self, every: float = 10.0):
        self.start = time.time()
        self.loads = [os.getloadavg()[0]]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, args=(every,), daemon=True)
        self._thread.start()

    def _sample(self, every: float) -> None:
        while not self._stop.wait(every):
            self.loads.append(os.getloadavg()[0])

    def stop(self) -> "RunClock":
        self._stop.set()
        self.loads.append(os.getloadavg()[0])
        self.elapsed = time.time() - self.start
        self.cpu = cpu_seconds()
        return self

    def summary(self) -> str:
        """'12.3 min wall clock, 20.1 min CPU time, load average 2.4 (1.9..3.1) on N cores'"""
        return (f"{self.elapsed / 60:.1f} min wall clock, {self.cpu / 60:.1f} min CPU time; "
                f"machine load (1-min average) {sum(self.loads) / len(self.loads):.1f} mean, "
                f"{min(self.loads):.1f}..{max(self.loads):.1f}, on {os.cpu_count()} cores")
