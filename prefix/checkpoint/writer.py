"""One checkpoint's writes, run phase by phase on a background thread while training goes on.

A checkpoint is written in phases (rank files, then the commit of ``latest.pt``, then the periodic
links). Between two phases every rank must have finished the first: the training thread learns
that from its per-step all-reduce and then ``release``s the next phase on every rank at once, so
the ranks pass each barrier together. With one rank there is nobody to wait for and the phases
run straight through.

A job is handed host memory only (``prefix.checkpoint.snapshot.host_only`` checks it before the thread starts):
the thread never touches CUDA, whose current device on a new thread is GPU 0, not the rank's.

An aborted job stops at its next write call (``raise_if_abandoned``, called by every stream a phase writes
through) rather than after its phase: an abandoned checkpoint costs no more disk time. Where a phase
waits inside a collective (DCP's), it says so (``agreement.collective``), so that the ranks can tell a
rank that is slow on its disk from one that waits for it, and never exit while their thread is inside
a collective.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple, Optional

from prefix.checkpoint.snapshot import host_only
from prefix.distributed import Activity, track

_local = threading.local()  # .job: the WriteJob whose thread this is


class Abandoned(Exception):
    """Raised in an aborted job's thread at its next write: nothing more of its checkpoint is written."""


def raise_if_abandoned() -> None:
    """Raise ``Abandoned`` if this thread's job was aborted (a no-op outside a job's thread)."""
    job = getattr(_local, 'job', None)
    if job is not None and job._aborted:
        raise Abandoned(f'the checkpoint of step {job.step} was abandoned')


class JobStatus(NamedTuple):
    """One consistent look at a job: ``failed``, ``busy`` (working on a phase the ranks have released) and ``done``."""

    failed: bool
    busy: bool
    done: bool


class WriteJob:
    """The phases of one checkpoint on a daemon thread; ``status`` drives the barriers between them.

    ``data`` is what the phases write: checked to be host memory before the thread starts.
    """

    def __init__(self, step: int, phases: list[Callable[[], None]], world_size: int, data: Any = None) -> None:
        host_only(data, f'the checkpoint of step {step}')
        self.step = step
        self.error: Optional[BaseException] = None
        self.started = time.monotonic()
        self.ended: Optional[float] = None
        self._phases = phases
        self._allowed = len(phases) if world_size == 1 else 1  # phases the ranks agreed may run
        self._done = 0
        self._aborted = False
        self.activity = Activity()
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=f'checkpoint-step-{step}', daemon=True)
        self._thread.start()

    def _run(self) -> None:
        _local.job = self
        track(self.activity)
        for index, phase in enumerate(self._phases):
            with self._cond:
                self._cond.wait_for(lambda i=index: self._allowed > i or self._aborted)
                if self._aborted:
                    return
            try:
                phase()
            except BaseException as e:  # reported on the training thread, which decides for every rank
                with self._cond:
                    self.error = e
                    self.ended = time.monotonic()
                    self._cond.notify_all()
                return
            with self._cond:
                self._done = index + 1
                if self._done == len(self._phases):
                    self.ended = time.monotonic()
                self._cond.notify_all()

    def status(self) -> JobStatus:
        """Read once, under the lock: deciding from two separate reads could miss an error that lands in between."""
        with self._cond:
            failed = self.error is not None
            return JobStatus(failed=failed, busy=not failed and not self._aborted and self._done < self._allowed,
                             done=not failed and self._done == len(self._phases))

    def release(self) -> None:
        """Every rank has finished the current phase: start the next one (called on all ranks together)."""
        with self._cond:
            if self._done == self._allowed < len(self._phases):
                self._allowed += 1
                self._cond.notify_all()

    def wait(self, timeout: Optional[float] = None) -> None:
        """Wait, at most ``timeout`` seconds, until this rank is finished or waits at a barrier."""
        with self._cond:
            self._cond.wait_for(lambda: self.error is not None or self._aborted or self._done == self._allowed, timeout)

    @property
    def waiting_for_peers(self) -> bool:
        """Its thread waits inside a collective for other ranks, not on this rank's disk."""
        return self.activity.waiting_for_peers

    def running(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def abort(self) -> None:
        """Run no further phase (another rank failed, or a preemption drops this write): nothing more is
        committed, and the phase running stops at its next write (``raise_if_abandoned``) with its temporary files removed.
        """
        with self._cond:
            self._aborted = True
            self._cond.notify_all()
