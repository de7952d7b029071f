"""The run's journal: ``meta/starts.jsonl`` and ``meta/checkpoint.json``, what ``prefix runs``/``show`` read.

One ``Journal`` per start owns that start's records: a ``start`` record at FIT_START (after any
resume) and an ``end`` record when the start ends on its own (completed, preempted, failed); a start
without an end record was killed. A start that fails before training (building the model, reading
the checkpoint) leaves one ``setup_failed`` record with its error instead (``record_failed_setup``).
``checkpoint.json`` summarizes the last committed checkpoint, so that listing runs never opens a
checkpoint. Rank 0 writes; a failed write is held in ``failures`` so that every rank stops together.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Optional

from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

from prefix.distributed import RankFailures, describe, started_at
from prefix.files import WRITER, atomic_write_text, jsonl
from prefix.run.runinfo import SETUP_FAILED
from prefix.run.runlock import LockLostError

log = logging.getLogger(__name__)


def _now() -> dict[str, object]:
    return {'time': time.strftime('%Y-%m-%dT%H:%M:%S%z'), 'unix': round(time.time(), 3)}


class Journal(Callback):
    """This start's records in ``starts.jsonl``.

    ``previous`` is how the previous start ended and the step it had reached (``runinfo.previous_start``):
    the steps between that and this start's step are redone, the work a preemption cost.
    """

    def __init__(self, path: Path, resumed_from: Optional[str], commit: Optional[str],
                 previous: tuple[Optional[str], Optional[int]], failures: RankFailures) -> None:
        self.path = path
        self.resumed_from = resumed_from
        self.commit = commit
        self.previous = previous
        self.failures = failures
        self._started = False  # an end record belongs only to a start that was recorded
        self.outcome: Optional[str] = None  # how this start ended, once it says so: what the trackers report

    def fit_start(self, state: State, logger: Logger) -> None:
        if dist.get_global_rank() != 0:
            return
        process_start = started_at()
        step = int(state.timestamp.batch)
        previous_end, reached = self.previous
        record = {
            'event': 'start', **_now(),
            'process_start': round(process_start, 3),
            'startup_s': round(time.time() - process_start, 3),
            'host': socket.gethostname(),
            'pid': os.getpid(),
            'world_size': dist.get_world_size(),
            'start_step': step,
            'tokens_seen': int(state.timestamp.token),
            'resumed_from': self.resumed_from,
            'previous_end': previous_end,
            'redone_steps': max(0, reached - step) if reached is not None else 0,
            'git_commit': self.commit,
            'writer': WRITER,  # this process: record_failed_setup leaves a start recorded here to its end record
        }
        with self.failures.guard(f'recording this start in {self.path}'):
            jsonl.append(self.path, record)
            self._started = True

    def end(self, reason: str, step: int, error: Optional[BaseException] = None) -> None:
        """How this start ended (``completed``, ``preempted`` or ``failed``), on rank 0 recorded; a SIGKILL leaves none."""
        self.outcome = reason
        if not self._started:
            return
        record = {'event': 'end', 'reason': reason, **_now(), 'step': step,
                  **({'error': describe(error)} if error else {})}
        with self.failures.guard('recording the end of this start'):
            jsonl.append(self.path, record)


def record_failed_setup(path: Path, error: BaseException) -> None:
    """Rank 0, still holding the run lock, when this start fails before its journal recorded it: a ``setup_failed``
    record with the error, so that ``prefix runs`` shows the run failed, and why, instead of new.

    A start the journal recorded has its end record already; a start that lost the lock may write nothing more.
    A failed write is only logged: the error being raised is the one the user needs.
    """
    if isinstance(error, LockLostError):
        return
    try:
        if any(e.get('writer') == WRITER for e in jsonl.read(path)):
            return
        jsonl.append(path, {
            'event': SETUP_FAILED, **_now(), 'process_start': round(started_at(), 3), 'host': socket.gethostname(),
            'pid': os.getpid(), 'world_size': dist.get_world_size(), 'writer': WRITER, 'error': describe(error),
        })
    except Exception as e:
        log.warning('could not record the failed start in %s: %s', path, describe(e))


def record_checkpoint(path: Path, step: int, tokens_seen: int, nbytes: int) -> None:
    """Rank 0, after a commit: the summary ``prefix runs`` reads (may lag by one checkpoint after a kill)."""
    atomic_write_text(path, json.dumps({
        'step': step, 'tokens_seen': tokens_seen, 'bytes': nbytes, 'unix': round(time.time(), 3),
    }) + '\n')
