"""Graceful preemption: SIGTERM (or SIGINT) asks for a checkpoint at the end of the current batch.

On Kubernetes a preemption is SIGTERM to the container's first process, a grace period, then
SIGKILL. Once training has done its first step, the signal's watcher only records the request; the
``Checkpointer`` agrees on it across ranks at the end of the batch, saves, and raises ``Preempted``
so the process exits non-zero (a preempted run must not look completed, or it would not be
restarted). Further SIGTERMs are logged and ignored so they cannot interrupt the save; a second
SIGINT (a person at a terminal) ends the process at once; SIGKILL still can, and atomic writes keep
the previous checkpoint whole.

Before the first step of a start there is nothing new to save: a stop signal ends the process at
once, even while it waits in a collective or reads a checkpoint. The signal's byte wakes a watcher
thread (``signal.set_wakeup_fd``: written by the C-level handler, whatever the main thread is blocked
in), which runs the start's ``farewell`` (rank 0: one line, the run lock marked released, so a
replacement takes it at once) for at most ``FAREWELL_S`` seconds and exits with 128 + the signal's
number, as the kernel's default action would. The watcher touches files only, never CUDA.

Composer installs a SIGTERM handler at import that exits without saving; ``install`` runs after
that import and replaces it. A rank started by the ``composer`` launcher also asks the kernel for
SIGTERM when the launcher dies: a launcher that gets SIGTERM passes it on to its ranks, but one that
is killed outright passes nothing.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Optional

log = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM  # what a shell reports for a process ended by SIGTERM
FAREWELL_S = 5.0  # the most a stop signal before the first step waits for the farewell (a frozen volume)
_PR_SET_PDEATHSIG = 1


class Preempted(Exception):
    """Training stopped at a checkpoint because the process was asked to stop (``signal_name``)."""

    def __init__(self, step: int, signal_name: Optional[str] = 'SIGTERM') -> None:
        super().__init__(f'preempted at step {step}; the checkpoint of that step is saved')
        self.step = step
        self.exit_code = exit_code(signal_name)


def exit_code(signal_name: Optional[str]) -> int:
    """What a shell reports for a process the signal ended: 130 for SIGINT (Ctrl-C), 143 for SIGTERM."""
    return 128 + signal.Signals[signal_name] if signal_name else PREEMPTED_EXIT_CODE


class PreemptionSignal:
    """SIGTERM/SIGINT: an exit at once until ``arm``, then recorded; ``requested`` is read once per batch.

    Every stop signal is acted on by one watcher thread, woken by the byte the C-level handler writes
    (``signal.set_wakeup_fd``); the Python-level handlers do nothing. One actor for the process's whole life:
    no moment where a handler is swapped and a signal could be lost or handled twice.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested = False
        self.signal_name: Optional[str] = None
        self.armed = False
        self.farewell: Callable[[str], None] = lambda name: None  # what a stop before the first step does first
        self.on_request: Callable[[], None] = lambda: None  # what a stop after it does at once (publish "stopping")

    def install(self) -> PreemptionSignal:
        """Until ``arm``, a stop signal ends the process at once, after ``farewell`` (replacing Composer's handler)."""
        read, write = os.pipe()
        os.set_blocking(write, False)
        signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        for sig in self.SIGNALS:
            signal.signal(sig, lambda signum, frame: None)  # the watcher acts, even while this thread is blocked
        threading.Thread(target=self._watch, args=(read,), name='prefix-stop-watcher', daemon=True).start()
        return self

    def _watch(self, read: int) -> None:
        stops = {int(sig) for sig in self.SIGNALS}
        while True:
            signum = os.read(read, 1)[0]
            if signum not in stops:  # the wakeup byte comes for every signal Python handles (SIGCHLD, ...)
                continue
            if self.armed:
                self._handle(signum, None)
                continue
            name = signal.Signals(signum).name
            done = threading.Thread(target=self.farewell, args=(name,), name='prefix-farewell', daemon=True)
            done.start()
            done.join(FAREWELL_S)
            os._exit(exit_code(name))

    def arm(self) -> None:
        """Training has done a step worth saving: from now on a stop signal asks for a checkpoint."""
        self.armed = True

    def ignore(self) -> None:
        """Training is over: ignore stop signals while the process exits, with the code it exits with.

        The ``composer`` launcher sends SIGTERM to the other ranks as soon as one rank exits, and
        Python puts its own handlers back to the default action while it shuts down: a rank that
        had saved and was exiting could be killed by it (and the run end with 241 instead of 143).
        Ignored signals stay ignored through the shutdown.
        """
        self.armed = True
        for sig in self.SIGNALS:
            signal.signal(sig, signal.SIG_IGN)

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        name = signal.Signals(signum).name
        if self.requested:
            if signum == signal.SIGINT and self.signal_name == 'SIGINT':
                log.warning('SIGINT received again: exiting now without finishing the checkpoint')
                os._exit(128 + signal.SIGINT)
            log.warning('%s received again: already stopping at the end of this batch', name)
            return
        self.requested, self.signal_name = True, name
        log.warning('%s received: saving a checkpoint at the end of this batch, then exiting', name)
        self.on_request()


def die_with_launcher() -> None:
    """A rank started by a launcher asks Linux for SIGTERM when the launcher dies.

    Called first thing, before the slow imports: a launcher killed during start-up then ends its
    ranks at once (nothing to save yet) instead of leaving them to train as orphans.
    """
    if 'LOCAL_RANK' not in os.environ:
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        parent = os.getppid()
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the request took effect
            os.kill(os.getpid(), signal.SIGTERM)
    except (OSError, AttributeError):
        log.warning('cannot ask for SIGTERM on launcher exit; send SIGTERM to every rank to preempt')
