"""When to checkpoint, and how one checkpoint is written: a Composer callback.

After every step the ranks agree, in one small all-reduce, on four things: a preemption request,
a checkpoint interval that is due, and whether a background write failed or is still busy. A
checkpoint takes a snapshot of the state (in async mode the only moment training waits: tensors
are copied to host memory, RNG and dataloader state captured) and hands it to a ``WriteJob``:

1. every rank writes ``latest_rank{r}.pt``; rank 0 writes ``latest.pt``'s temporary file;
2. once every rank has finished 1, rank 0 renames it to ``latest.pt``: the checkpoint is committed;
3. once committed, the periodic links, when one is due.

At most one write is in flight. A checkpoint that falls due while the previous write is still
running waits for it (never skips: the interval bounds the work a kill can cost) and logs the
wait. A preemption and the end of training wait for the write in flight, then write the final
checkpoint synchronously. ``checkpoint.async_write=false`` makes every checkpoint synchronous.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional

import composer.core.state
import torch
from composer.core import Callback, Event, State
from composer.loggers import Logger
from composer.utils import dist

from prefix.atomic import atomic_link, atomic_write, commit, temp_path, write_temp
from prefix.checkpoint import (
    LATEST,
    PERIODIC,
    CheckpointError,
    CheckpointWriteError,
    ResumePoint,
    capture_rng,
    global_file,
    global_state,
    rank_file,
    rank_state,
    restore_rng,
)
from prefix.config import CheckpointConfig, parse_duration
from prefix.meta import record_checkpoint
from prefix.preemption import Preempted, PreemptionSignal
from prefix.snapshot import HostSnapshot
from prefix.writer import WriteJob

log = logging.getLogger(__name__)

# Composer's State.state_dict() rescans its package's installed files for checkpoint metadata (about
# 45 ms, which would be most of a small model's checkpoint) although the answer cannot change within
# a process: ask once.
composer.core.state.get_composer_env_dict = functools.cache(composer.core.state.get_composer_env_dict)


class Interval:
    """``200ba`` (every 200 batches) or ``90s`` / ``10min`` / ``1h`` of wall-clock time."""

    SECONDS = {'s': 1, 'min': 60, 'h': 3600}

    def __init__(self, spec: str) -> None:
        number, unit = parse_duration(spec)
        self.batches = number if unit == 'ba' else None
        self.seconds = number * self.SECONDS[unit] if unit != 'ba' else None
        self.last = time.monotonic()

    def due(self, step: int) -> bool:
        """This rank's view; clocks differ, so callers agree across ranks (``any_rank``)."""
        if self.batches is not None:
            return step % self.batches == 0
        return time.monotonic() - self.last >= self.seconds

    def reset(self) -> None:
        self.last = time.monotonic()


def any_rank(state: State, flags: list[bool]) -> list[bool]:
    """Element-wise OR of ``flags`` over all ranks (one tiny all-reduce), so every rank decides alike."""
    if dist.get_world_size() == 1:
        return flags
    tensor = state.device.tensor_to_device(torch.tensor([int(f) for f in flags], dtype=torch.int32))
    dist.all_reduce(tensor, reduce_operation='MAX')
    return [bool(v) for v in tensor.cpu().tolist()]


@dataclass
class SaveRecord:
    """What one checkpoint cost this rank: the time training waited, the time the write took, its bytes."""

    step: int
    periodic: bool
    asynchronous: bool
    blocked_s: Optional[float] = None
    write_s: Optional[float] = None
    bytes: int = 0


class Checkpointer(Callback):
    """Writes the documented checkpoint files on an interval and at the end, and restores RNG on resume."""

    def __init__(
        self,
        folder: Path,
        cfg: CheckpointConfig,
        config: dict[str, Any],
        resume: Optional[ResumePoint],
        preemption: PreemptionSignal,
        meta_dir: Optional[Path] = None,
    ) -> None:
        self.folder = folder
        self.meta_dir = meta_dir  # where rank 0 summarizes each committed checkpoint (meta/checkpoint.json)
        self._logger: Optional[Logger] = None
        self.preemption = preemption
        self.interval = Interval(cfg.interval)
        self.periodic = Interval(cfg.periodic_interval) if cfg.periodic_interval else None
        self.asynchronous = cfg.async_write
        self.config = config
        self.resume = resume
        self.saves: list[SaveRecord] = []
        self._snapshot = HostSnapshot()
        self._job: Optional[WriteJob] = None
        self._record: Optional[SaveRecord] = None
        self._pending_rng = resume.rng if resume else None
        # (step, rng) of the last committed checkpoint: its RNG is kept in the next rank file too.
        self._committed: Optional[tuple[int, Optional[dict[str, Any]]]] = (resume.global_step, resume.rng) if resume else None
        self._commit_rng = self._committed  # becomes _committed when the write in flight is committed
        self._submitted_step: Optional[int] = resume.global_step if resume else None

    # --- events ---------------------------------------------------------------------------------

    def after_load(self, state: State, logger: Logger) -> None:
        if self.resume is None:
            return
        step = int(state.timestamp.batch)
        if step != self.resume.global_step:
            raise CheckpointError(f'Composer resumed at step {step} but {self.resume.filename} is at {self.resume.global_step}')
        wall = {k: timedelta(seconds=v) for k, v in self.resume.wall_clock.items()}
        if wall:
            state.timestamp = state.timestamp.copy(**wall)
        log.info('resumed from %s at step %d', self.resume.filename, step)

    def fit_start(self, state: State, logger: Logger) -> None:
        self._logger = logger
        self.interval.reset()
        if self.periodic:
            self.periodic.reset()

    def batch_start(self, state: State, logger: Logger) -> None:
        # The first batch after a resume draws exactly the random numbers the uninterrupted run drew.
        if self._pending_rng is not None:
            restore_rng(self._pending_rng)
            self._pending_rng = None

    def batch_checkpoint(self, state: State, logger: Logger) -> None:
        step = int(state.timestamp.batch)
        job = self._job
        preempt, due, periodic, failed, busy = any_rank(state, [
            self.preemption.requested,
            self.interval.due(step),
            self.periodic is not None and self.periodic.due(step),
            job is not None and job.error is not None,
            job is not None and job.busy,
        ])
        self._advance(failed, busy)
        if preempt or due or periodic:
            self.save(state, periodic=periodic, wait=preempt)
        if preempt:
            raise Preempted(step)
        self.preemption.arm()  # a step exists that a stop signal should save

    def fit_end(self, state: State, logger: Logger) -> None:
        self._drain(state)
        if self._submitted_step != int(state.timestamp.batch):
            self.save(state, periodic=False, wait=True)

    def close(self, state: State, logger: Logger) -> None:
        """Training stopped with a write in flight (an error): finish it alone, or drop it uncommitted."""
        job, self._job = self._job, None
        if job is None:
            return
        if dist.get_world_size() == 1:
            job.wait()
        else:
            job.abort()  # the other ranks may be gone: never commit what they may not have written

    # --- saving ---------------------------------------------------------------------------------

    def save(self, state: State, periodic: bool, wait: bool) -> None:
        """Snapshot the state and hand it to a background write; ``wait`` (or sync mode) waits for the commit."""
        started = time.monotonic()
        still_writing = self._job is not None and not self._job.finished
        self._drain(state)
        if still_writing:
            log.warning('checkpoint at step %d waited %.1f s for the previous write to finish; a longer '
                        'checkpoint.interval would avoid the wait', int(state.timestamp.batch), time.monotonic() - started)
        wait = wait or not self.asynchronous
        step = int(state.timestamp.batch)
        rank = dist.get_global_rank()
        rng = capture_rng()
        history: dict[int, Any] = {step: rng}
        if self._committed is not None and self._committed[0] != step and self._committed[1] is not None:
            history[self._committed[0]] = self._committed[1]
        rank_payload = rank_state(step, history)
        payload = global_state(state, self.config)  # every rank: gathering may be collective (FSDP)
        if rank != 0:
            payload = None
        elif not wait:
            payload = self._snapshot.copy(payload)  # training may change the live tensors from now on

        record = SaveRecord(step, periodic, asynchronous=not wait)
        self._record = record
        self._job = WriteJob(step, self._phases(record, rank_payload, payload, periodic), dist.get_world_size())
        self._submitted_step = step
        self._commit_rng = (step, rng)
        self.interval.reset()
        if periodic:
            assert self.periodic is not None
            self.periodic.reset()
        if wait:
            self._drain(state)
        record.blocked_s = time.monotonic() - started
        if wait:
            self._report(record)

    def _phases(self, record: SaveRecord, rank_payload: dict[str, Any], payload: Optional[dict[str, Any]],
                periodic: bool) -> list:
        rank, world_size = dist.get_global_rank(), dist.get_world_size()
        latest = global_file(self.folder)

        def write() -> None:
            path = rank_file(self.folder, rank)
            atomic_write(path, lambda f: torch.save(rank_payload, f))
            record.bytes += path.stat().st_size
            if payload is not None:
                record.bytes += write_temp(latest, lambda f: torch.save(payload, f)).stat().st_size

        def commit_latest() -> None:
            if rank == 0:
                commit(temp_path(latest), latest)
                self._remove_rank_files_beyond(world_size, LATEST)
                if self.meta_dir is not None and payload is not None:
                    record_checkpoint(self.meta_dir, record.step, payload['tokens_seen'], record.bytes)

        def link_periodic() -> None:
            if periodic:
                atomic_link(rank_file(self.folder, rank), rank_file(self.folder, rank, PERIODIC))
                if rank == 0:
                    atomic_link(latest, global_file(self.folder, PERIODIC))
                    self._remove_rank_files_beyond(world_size, PERIODIC)

        return [write, commit_latest, link_periodic]

    def _advance(self, failed: bool, busy: bool) -> None:
        """Act on what the ranks agreed: stop all on a failure, pass a barrier when nobody is busy."""
        job = self._job
        if job is None:
            return
        if failed:
            self._fail()
        if not busy:
            job.release()
        if job.finished:
            self._job = None
            self._committed = self._commit_rng
            assert self._record is not None
            self._record.write_s = (job.ended or time.monotonic()) - job.started
            self.saves.append(self._record)
            if self._record.blocked_s is not None:  # known: this write ran in the background
                self._report(self._record)

    def _drain(self, state: State) -> None:
        """Wait, every rank together, until the write in flight is committed everywhere.

        Collective: every rank runs the same number of rounds, because whether to go on is agreed too.
        """
        while True:
            job = self._job
            if job is not None:
                job.wait()  # until this rank has finished or waits at a barrier
            failed, busy, unfinished = any_rank(state, [
                job is not None and job.error is not None, job is not None and job.busy, job is not None and not job.finished,
            ])
            self._advance(failed, busy)
            if not unfinished:
                return

    def _fail(self) -> None:
        job, self._job = self._job, None
        assert job is not None
        if job.error is None:
            job.abort()
        elif not isinstance(job.error, OSError):
            raise job.error
        error = job.error
        kept = (f'the checkpoint of step {self._committed[0]} is intact' if self._committed is not None
                else 'no earlier checkpoint exists')
        reason = (f'{error.strerror or error} ({error.filename or self.folder})' if isinstance(error, OSError)
                  else 'another rank failed, see its log')
        raise CheckpointWriteError(f'could not write the checkpoint of step {job.step}: {reason}; {kept}. '
                                   'Free space or fix the folder, then run the same command again')

    def _report(self, record: SaveRecord) -> None:
        how = 'in the background' if record.asynchronous else 'synchronously'
        log.info('checkpoint saved at step %d%s: training blocked %.3f s, written %s in %.3f s (%.1f MB)',
                 record.step, ' (and periodic)' if record.periodic else '', record.blocked_s, how,
                 record.write_s or 0.0, record.bytes / 1e6)
        if self._logger is not None:
            self._logger.log_metrics({'checkpoint/step': record.step, 'checkpoint/blocked_s': record.blocked_s,
                                      'checkpoint/write_s': record.write_s, 'checkpoint/bytes': record.bytes})

    def _remove_rank_files_beyond(self, world_size: int, kind: str) -> None:
        """Rank files of ranks a smaller world no longer has belong to no checkpoint once the global file moved on."""
        for path in self.folder.glob(f'{kind}_rank*.pt'):
            if int(path.stem.removeprefix(f'{kind}_rank')) >= world_size:
                log.warning('removing %s: the run now has %d ranks', path.name, world_size)
                path.unlink(missing_ok=True)


def never(state: State, event: Event) -> bool:
    """Save interval for Composer's own CheckpointSaver: prefix's Checkpointer writes the files."""
    return False
