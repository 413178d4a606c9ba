"""Stopping a sweep cleanly on a signal.

SIGINT (Ctrl-C) and SIGTERM (what a scheduler sends before it kills a job: Slurm at a time
limit or preemption, then SIGKILL after its KillWait; Kubernetes likewise) are deferred, while
a sweep trains in this process, to the end of the epoch being trained: there the sweep writes
its checkpoint and stops with :class:`Stopped`, so no trained epoch is lost and rerunning the
same command resumes bit for bit. A second signal stops at once (KeyboardInterrupt), losing
what the last checkpoint does not hold, as the first would without this.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopped(KeyboardInterrupt):
    """A sweep stopped on ``signum`` after checkpointing its trained work (``where``: how far
    it got, for the message; ``trained``: whether it trained anything before)."""

    def __init__(self, signum: int, where: str = "", trained: bool = True):
        super().__init__(signum, where)
        self.signum, self.where, self.trained = signum, where, trained

    def __str__(self) -> str:
        name = signal.Signals(self.signum).name
        said = "the checkpoint holds the work so far" if self.trained else "nothing was trained in this session"
        where = f" {self.where}" if self.where else ""
        return f"stopped by {name}{where}; {said}: rerun the same command to resume"


class StopRequest:
    """Whether a stopping signal has arrived (truthy), and which (``signum``)."""

    def __init__(self):
        self.signum: int | None = None

    def __bool__(self) -> bool:
        return self.signum is not None

    def stop(self, where: str = "", trained: bool = True) -> None:
        """Raise :class:`Stopped` if a signal has arrived (call it where the work is saved;
        ``trained``: whether this session trained any)."""
        if self.signum is not None:
            raise Stopped(self.signum, where, trained)


@contextmanager
def deferred_stop():
    """Within: SIGINT and SIGTERM set the yielded :class:`StopRequest` instead of interrupting;
    a second one raises KeyboardInterrupt at once. Signal handlers belong to the main thread,
    so elsewhere (a Ray worker's thread, a test's thread) the request is never set and the
    signals keep their behaviour; so too where a handler was installed from outside Python
    (``signal.getsignal`` gives None), which could not be put back afterwards."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread() \
            or any(signal.getsignal(s) is None for s in SIGNALS):
        yield request
        return

    def defer(signum, frame):
        if request.signum is not None:
            raise KeyboardInterrupt
        request.signum = signum

    previous = {s: signal.signal(s, defer) for s in SIGNALS}
    try:
        yield request
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
