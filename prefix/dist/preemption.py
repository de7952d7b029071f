"""Graceful preemption: SIGTERM (or SIGINT) asks for a checkpoint at the end of the current batch.

On Kubernetes a preemption is SIGTERM to the container's first process, a grace period, then
SIGKILL. Once training has done its first step, the handler only records the request; the
``Checkpointer`` agrees on it across ranks at the end of the batch, saves, and raises ``Preempted``
so the process exits non-zero (a preempted run must not look completed, or it would not be
restarted). Further SIGTERMs are logged and ignored so they cannot interrupt the save; a second
SIGINT (a person at a terminal) ends the process at once; SIGKILL still can, and atomic writes keep
the previous checkpoint whole.

Before the first step of a start there is nothing new to save: a stop signal ends the process at
once, with the kernel's default action, even while it waits in a collective or reads a checkpoint.

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
from types import FrameType
from typing import Optional

log = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM  # what a shell reports for a process ended by SIGTERM
_PR_SET_PDEATHSIG = 1


class Preempted(Exception):
    """Training stopped at a checkpoint because the process was asked to stop."""

    def __init__(self, step: int) -> None:
        super().__init__(f'preempted at step {step}; the checkpoint of that step is saved')
        self.step = step


class PreemptionSignal:
    """SIGTERM/SIGINT: the default action until ``arm``, then recorded; ``requested`` is read once per batch."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested = False
        self.signal_name: Optional[str] = None
        self.armed = False

    def install(self) -> PreemptionSignal:
        """Until ``arm``, a stop signal ends the process at once (replacing Composer's handler)."""
        for sig in self.SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        return self

    def arm(self) -> None:
        """Training has done a step worth saving: from now on a stop signal asks for a checkpoint."""
        if not self.armed:
            for sig in self.SIGNALS:
                signal.signal(sig, self._handle)
            self.armed = True

    def ignore(self) -> None:
        """Training is over: ignore stop signals while the process exits, with the code it exits with.

        The ``composer`` launcher sends SIGTERM to the other ranks as soon as one rank exits, and
        Python puts its own handlers back to the default action while it shuts down: a rank that
        had saved and was exiting could be killed by it (and the run end with 241 instead of 143).
        Ignored signals stay ignored through the shutdown.
        """
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
