"""The worker thread of ``FusedEMA(..., non_blocking=True)``: runs one queued update at a
time, at most one deep (the owner waits for the pending update before it queues another).

The thread sees only a small shared record (the job, its outcome, a closed flag), never
the ``FusedEMA``: dropping the ``FusedEMA`` drops its ``Worker``, whose finaliser tells the
thread to end. The thread is a daemon, so a pending update never holds up the interpreter's
exit, and it is started on the first queued update only.
"""
import threading
from typing import Callable, Optional, Tuple

NAME = "fused_ema-worker"


class _Shared:
    """What the owner and the thread share (under ``cv``)."""

    def __init__(self):
        self.cv = threading.Condition()
        self.job: Optional[Callable[[], object]] = None  # queued or running
        self.outcome: Optional[Tuple[object, Optional[BaseException]]] = None
        self.closed = False


def _loop(shared: _Shared) -> None:
    cv = shared.cv
    while True:
        with cv:
            while shared.job is None and not shared.closed:
                cv.wait()
            job = shared.job
            if job is None:  # closed, nothing queued
                return
        try:
            outcome = (job(), None)
        except BaseException as exc:  # noqa: BLE001 - handed to the owner, raised there
            outcome = (None, exc)
        del job  # the job's references (tensors, plans) go with it
        with cv:
            shared.outcome = outcome
            shared.job = None
            cv.notify_all()


class Worker:
    """One thread that runs the jobs ``submit`` gives it, one at a time. Used by one owner
    thread (the training thread): ``pending`` is the owner's own bookkeeping."""

    def __init__(self):
        self._shared = _Shared()
        self._thread: Optional[threading.Thread] = None
        self.pending = False

    @property
    def thread(self) -> Optional[threading.Thread]:
        return self._thread

    def submit(self, job: Callable[[], object]) -> None:
        """Queues ``job`` (call ``wait`` for the pending one first)."""
        if self.pending:
            raise RuntimeError("fused_ema: a non-blocking update is still pending; "
                               "wait for it first")
        s = self._shared
        if self._thread is None:
            self._thread = threading.Thread(target=_loop, args=(s,), name=NAME, daemon=True)
            self._thread.start()
        with s.cv:
            s.job = job
            s.cv.notify_all()
        self.pending = True

    def wait(self) -> Optional[Tuple[object, Optional[BaseException]]]:
        """Waits for the pending job: ``(its result, None)`` or ``(None, its exception)``;
        None when nothing was pending."""
        if not self.pending:
            return None
        s = self._shared
        with s.cv:
            while s.job is not None:
                s.cv.wait()
            outcome, s.outcome = s.outcome, None
        self.pending = False
        return outcome

    def close(self, join: bool = True) -> None:
        """Ends the thread once its job (if any) is done; ``join`` waits for it."""
        s = self._shared
        with s.cv:
            s.closed = True
            s.cv.notify_all()
        t = self._thread
        if join and t is not None and t is not threading.current_thread():
            t.join()

    def __del__(self):
        try:
            self.close(join=False)
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
