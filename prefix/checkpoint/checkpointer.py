"""When to checkpoint, and how one checkpoint is written: a Composer callback.

Every step the ranks agree, in one small all-reduce, on a preemption request, a checkpoint interval
due by the clock, and whether some rank has failed (anything in prefix's callbacks, not only the
write): with several ranks issued as the step begins and read at its end, so no rank waits for it
(a signal that arrives during a step is acted on at the end of the next). While a write is in flight the
all-reduce runs at the step's end instead, with its state: is some rank still busy with a phase, is
some rank not done. An interval in batches is due at the same step everywhere. A
checkpoint takes a snapshot of the state (in async mode the only moment training waits: tensors
are copied to host memory, RNG and dataloader state captured) and hands it to a ``WriteJob``:

1. every rank writes the temporary files of ``latest_rank{r}.pt`` (and of its shards); rank 0 that of
   ``latest.pt``;
2. once every rank has finished 1, every rank renames its rank file into place (rank 0 the shard folder);
3. once every rank has finished 2, rank 0 renames ``latest.pt`` into place: the checkpoint is committed;
4. once committed, the periodic links, when one is due.

Temporary names carry the run lock's generation, and every rename is fenced by the lock's lease:
rank 0 checks it (``RunLock.fence``) before each of its renames, and releases phases 2 to 4 to the
other ranks only while its lease is current, so no rank publishes after its run was taken over.

At most one write is in flight. A checkpoint that falls due while the previous write is still
running waits for it (never skips: the interval bounds the work a kill can cost) and logs the
wait. A preemption and the end of training abandon the write in flight unless it committed (it stops
at its next write), then write the final checkpoint synchronously: the last state is written once.
``checkpoint.async_write=false`` makes every checkpoint synchronous.

Waiting is never a collective: a rank waits for its own write in short local waits, each followed
by the agreement all-reduce (``prefix.distributed.agreement``), so no collective waits on a disk however slow.
A failure on any rank is agreed the same way and stops every rank with one line naming it.

Every write has a deadline (``checkpoint.write_timeout``, by default from the checkpoint's size):
while it runs, every minute rank 0 logs the ranks still writing and what they have on disk, and a
rank still writing its own part past the deadline fails, which stops every rank with one line
naming it. The sharded part (DCP, whose collectives wait for the slowest rank) is written first,
so a rank that fails later in the phase never leaves the others inside DCP; a stopping rank waits
until its thread is out of DCP's collectives before it exits.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as tdist
from composer.core import Callback, Event, State
from composer.core.precision import get_precision_context
from composer.loggers import Logger
from torch.nn.parallel import DistributedDataParallel

from prefix.checkpoint import shards
from prefix.checkpoint.checkpoint import (
    LATEST,
    PERIODIC,
    RANK_FILE,
    RESCUE,
    CheckpointError,
    ResumePoint,
    global_file,
    global_state,
    rank_file,
    rank_state,
    referenced_shards,
    safe_load,
    seed_step,
    step_rng,
    write_timeout_s,
)
from prefix.checkpoint.snapshot import HostSnapshot, copy_into, host_only
from prefix.checkpoint.writer import WriteJob, raise_if_abandoned
from prefix.config import CheckpointConfig, Duration
from prefix.distributed import (
    BOUNDED_S,
    POLL_S,
    Deadline,
    Preempted,
    PreemptionSignal,
    RankFailures,
    agreement,
    any_rank,
    any_rank_later,
    bounded,
    together,
)
from prefix.distributed.agreement import RankFailedError
from prefix.errors import PrefixError
from prefix.files import commit, link_temp, temp_path, write_temp
from prefix.run import LockIOError, LockLostError, RunLock, record_checkpoint

log = logging.getLogger(__name__)

REPORT_S = 60  # how often a write that is still running is logged
class WriteTimeoutError(PrefixError):
    """A rank did not finish writing its part of a checkpoint in time: its volume is hung or too slow."""


class Interval:
    """``200ba`` (every 200 batches) or ``90s`` / ``10min`` / ``1h`` of wall-clock time."""

    def __init__(self, spec: str) -> None:
        duration = Duration.parse(spec)
        self.batches = duration.batches
        self.seconds = duration.seconds if duration.is_wall_clock else None
        self.last = time.monotonic()

    def due_at(self, step: int) -> bool:
        """Due by the step count: the same on every rank."""
        return self.batches is not None and step % self.batches == 0

    def due_by_clock(self) -> bool:
        """Due by this rank's clock; clocks differ, so the ranks agree on it (``any_rank``)."""
        return self.seconds is not None and time.monotonic() - self.last >= self.seconds

    def reset(self) -> None:
        self.last = time.monotonic()


@dataclass
class SaveRecord:
    """What one checkpoint cost this rank: the time training waited, the time the write took, its bytes."""

    step: int
    periodic: bool
    asynchronous: bool
    blocked_s: Optional[float] = None
    write_s: Optional[float] = None
    bytes: int = 0
    committed: bool = False  # rank 0: latest.pt names this checkpoint now


@dataclass
class PendingSave:
    """A checkpoint handed to its write, until every rank agrees the write is done."""

    job: WriteJob
    record: SaveRecord
    rng: dict[str, Any]  # this rank's RNG states for the step (prefix.checkpoint.checkpoint.step_rng)
    deadline: Deadline  # by when this rank's part must be written (checkpoint.write_timeout)
    on_disk: Callable[[], int]  # bytes of this rank's files of the write so far
    shards_name: Optional[str] = None  # its shard folder (sharded format)

    @property
    def writing(self) -> bool:
        """This rank is busy with its own part (not waiting for the others inside a collective, nor at a barrier)."""
        return self.job.status().busy and not self.job.waiting_for_peers


@dataclass
class Committed:
    """The newest checkpoint every rank knows ``latest.pt`` holds."""

    step: int
    generation: Optional[int]  # of the run lock whose holder wrote it
    rng: Optional[dict[str, Any]]


def _unmap_optimizer_state(state: State) -> None:
    """Give CPU optimizer state memory of its own after a resume.

    Checkpoints load memory-mapped (``train.main``), so the ranks of a node share one copy in the page
    cache. The model copies its weights out, but an optimizer keeps the loaded tensors as they are
    when they already have the parameter's device and dtype (CPU training): it would map the old
    ``latest.pt`` for the whole run, holding its disk space (a ``.nfs`` file on NFS) once replaced.
    """
    for optimizer in state.optimizers:
        for values in optimizer.state.values():
            for key, value in values.items():
                if isinstance(value, torch.Tensor) and value.device.type == 'cpu':
                    values[key] = value.clone()


def settle_ddp_buckets(state: State) -> None:
    """A resumed process, before its first step: give DDP the gradient buckets the uninterrupted run has.

    DDP (``find_unused_parameters=False``, as Composer wraps the model) reduces the first backward of a
    process in one bucket holding every gradient, records the order in which the gradients became ready,
    and from then on reduces in buckets of that order. A resumed process would reduce its first step in
    the one bucket where the uninterrupted run used the ordered buckets, and with 3 or more ranks some
    sums come out in another order (not bit-exact, measured with 4 ranks). So one throwaway forward and
    backward of the batch's first microbatch records the order, which the first step's forward then
    builds the buckets from; its gradients are dropped, and the step is seeded after it. With 2
    ranks every sum has two terms, equal in either order: nothing to settle.
    """
    model = state.model
    if not isinstance(model, DistributedDataParallel) or agreement.world_size() < 3:
        return
    rows = state.device_train_microbatch_size
    batch = {k: v[:rows] if isinstance(v, torch.Tensor) else v for k, v in state.batch.items()}
    with get_precision_context(state.precision, state.precision_config):  # as the step itself runs (its memory)
        loss = model.module.loss(model(batch), batch)
    loss.backward()
    for param in model.parameters():
        param.grad = None


def _position(state: State) -> tuple[int, int]:
    """What a checkpoint must match to be the state's: the batch and the epoch (which ends after the last batch)."""
    return int(state.timestamp.batch), int(state.timestamp.epoch)


class Checkpointer(Callback):
    """Writes the documented checkpoint files on an interval and at the end, and restores RNG on resume."""

    def __init__(
        self,
        folder: Path,
        cfg: CheckpointConfig,
        config: dict[str, Any],
        resume: Optional[ResumePoint],
        preemption: PreemptionSignal,
        failures: RankFailures,
        summary: Optional[Path] = None,
        shards_group: Optional[tdist.ProcessGroup] = None,
        lock: Optional[RunLock] = None,
        generation: int = 0,
    ) -> None:
        self.folder = folder
        self.lock = lock  # rank 0's run lock: a holder that lost it commits nothing more
        self.generation = generation  # the run lock's, on every rank: it names every file this start writes
        self.sharded = cfg.format == 'sharded'
        self.shards_group = shards_group  # DCP's own collectives (prefix.checkpoint.shards)
        self.summary = summary  # where rank 0 summarizes each committed checkpoint (meta/checkpoint.json)
        self._logger: Optional[Logger] = None
        self.preemption = preemption
        self.failures = failures
        self.interval = Interval(cfg.interval)
        self.periodic = Interval(cfg.periodic_interval) if cfg.periodic_interval else None
        self.asynchronous = cfg.async_write
        self.write_timeout = cfg.write_timeout
        self._next_report = 0.0  # when the write in flight is next logged, if still running
        self.config = config
        self.resume = resume
        self.saves: list[SaveRecord] = []
        self._kept = (HostSnapshot(), HostSnapshot())  # asynchronous mode's slabs: this rank's shards, latest.pt's payload
        self._pending: Optional[PendingSave] = None
        self._committed = Committed(resume.global_step, resume.generation, resume.rng) if resume else None
        self.seed = int(config.get('seed', 0))  # with the rank and the step, it makes each step's random numbers
        self._optimizer_steps = 0  # steps the optimizer took in this fit: a state is whole when they match the batches
        self._fit_start: Optional[int] = None
        self._exchange: Optional[Callable[[], list[bool]]] = None  # this step's flags, in flight (before_train_batch)
        self._unsettled = resume is not None  # DDP's buckets, before the first step of a resumed process
        self._saved_position: Optional[tuple[int, int]] = None  # of the last checkpoint this start took

    @property
    def committed_step(self) -> Optional[int]:
        """The step of the newest checkpoint every rank knows is committed (None: none yet)."""
        return self._committed.step if self._committed is not None else None

    # --- events ---------------------------------------------------------------------------------

    def after_load(self, state: State, logger: Logger) -> None:
        if self.resume is None:
            return
        if self.resume.shards is not None:
            self._load_shards(state, logger)
        step = int(state.timestamp.batch)
        if step != self.resume.global_step:
            raise CheckpointError(f'Composer resumed at step {step} but {self.resume.filename} is at {self.resume.global_step}')
        wall = {k: timedelta(seconds=v) for k, v in self.resume.wall_clock.items()}
        if wall:
            state.timestamp = state.timestamp.copy(**wall)
        _unmap_optimizer_state(state)
        self._saved_position = _position(state)
        log.info('resumed from %s at step %d', self.resume.filename, step)

    def _load_shards(self, state: State, logger: Logger) -> None:
        """Load a sharded checkpoint (Composer's autoresume reads only whole ones): every rank reads the
        pieces of the shard folder it holds now, on a thread while the ranks poll it, then Composer
        loads the rest from latest.pt."""
        assert self.resume is not None and self.resume.shards is not None
        live = shards.tensors_of(state)
        # Read into host memory on a thread (the kept slab of the next snapshots, when there is one), then
        # copied into the live tensors here: the reading thread never touches CUDA.
        host = self._host_copies()[0].empty_like(live)
        folder = self.folder / self.resume.shards
        deadline_s = write_timeout_s(self.write_timeout, shards.nbytes(host) * agreement.world_size())
        together(lambda: shards.load(host, folder, self.shards_group, deadline_s), deadline_s,
                 f'reading {self.resume.shards}')[agreement.rank()].get()
        tensors = copy_into(live, host)
        rest = safe_load(global_file(self.folder, self.resume.kind), mmap=True)['state']
        state.load_state_dict({**rest, **tensors}, logger)

    def fit_start(self, state: State, logger: Logger) -> None:
        self._logger = logger
        if self._fit_start is None:
            self._fit_start = int(state.timestamp.batch)
            state.optimizers[0].register_step_post_hook(self._count_optimizer_step)
        self.interval.reset()
        if self.periodic:
            self.periodic.reset()

    def _count_optimizer_step(self, *args: Any) -> None:
        self._optimizer_steps += 1

    def batch_start(self, state: State, logger: Logger) -> None:
        if self._unsettled:
            self._unsettled = False
            settle_ddp_buckets(state)  # every rank (a collective), before the step is seeded
        # Each step's random numbers depend on the seed, the rank and the step alone: a resumed run draws the
        # uninterrupted run's, and a survivor can write a lost rank's states (rescue).
        seed_step(self.seed, agreement.rank(), int(state.timestamp.batch))

    def before_train_batch(self, state: State, logger: Logger) -> None:
        # With no write in flight the ranks agree on this step's flags while it computes: no rank waits for the
        # all-reduce, and a signal that arrives during the step is acted on at the next one. A write in flight
        # is agreed on at the step's end (_agree), where its phases advance.
        if self._pending is None and agreement.world_size() > 1:
            self._check_lock()
            self._exchange = any_rank_later([*self._wanted(), self.failures.failed])

    def batch_checkpoint(self, state: State, logger: Logger) -> None:
        step = int(state.timestamp.batch)
        if self._exchange is not None:
            exchange, self._exchange = self._exchange, None
            preempt, due, periodic, failed = exchange()
            if failed:
                self._stop()
        else:
            preempt, due, periodic = self._agree(*self._wanted())
        # Intervals in batches are due at the same step on every rank: not agreed on.
        due = due or self.interval.due_at(step)
        periodic = periodic or (self.periodic is not None and self.periodic.due_at(step))
        if preempt or due or periodic:
            self.save(state, periodic=periodic, wait=preempt, abandon=preempt)
        if preempt:
            raise Preempted(step, self.preemption.signal_name or 'SIGTERM')
        self.preemption.arm()  # a step exists that a stop signal should save

    def fit_end(self, state: State, logger: Logger) -> None:
        self._drain()
        if self._saved_position != _position(state):
            self.save(state, periodic=False, wait=True)

    def close(self, state: State, logger: Logger) -> None:
        """Training stopped with a write in flight (an error): finish it alone, or drop it uncommitted."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        if agreement.world_size() == 1:
            while pending.job.running() and not pending.deadline.passed:  # a hung write is left behind
                pending.job.join(POLL_S)
        else:
            pending.job.abort()  # the other ranks may be gone: never commit what they may not have written
            self._leave(pending)

    # --- agreeing -------------------------------------------------------------------------------

    def _wanted(self) -> list[bool]:
        """This rank's view of what the ranks must agree on: a stop signal, and checkpoints due by the clock."""
        return [self.preemption.requested, self.interval.due_by_clock(),
                self.periodic is not None and self.periodic.due_by_clock()]

    def _check_lock(self) -> None:
        if self.lock is not None and self.lock.lost is not None:
            self.failures.record('holding the run lock', LockLostError(self.lock.lost))

    def _agree(self, *flags: bool, draining: bool = False) -> list[bool]:
        """OR ``flags`` over the ranks, in the same all-reduce as the state of the write in flight; act on that state.

        ``draining``: every rank waits for the write. Rank 0 then waits up to ``POLL_S`` for its lease rather than
        hold the next phase back at once: the ranks compare notes twice a second, never back to back.
        """
        self._check_lock()
        pending = self._pending
        status = pending.job.status() if pending is not None else None
        if pending is not None and status is not None and status.failed:
            assert pending.job.error is not None
            self.failures.record(f'writing the checkpoint of step {pending.record.step}', pending.job.error)
        # Rank 0 holds the next phase back while its lease is not current: every phase after the first publishes.
        held = self.lock is not None and not self.lock.current()
        if held and draining and status is not None and not status.busy:
            assert self.lock is not None
            held = not self.lock.wait_current(POLL_S)
        # The write waits for the lock (held back at a phase's end, or in a fence): its volume, not the checkpoint's.
        for_lock = held and status is not None and (not status.busy or (self.lock is not None and self.lock.fencing))
        report = False
        if pending is not None and status is not None and (status.busy or held):
            if pending.deadline.passed and for_lock:
                assert self.lock is not None
                self.failures.record('renewing the run lock', LockIOError(
                    f'{self.lock.stall()}: its volume is full, failing or hung, and no checkpoint can be committed '
                    'without it'))
            elif pending.deadline.passed and pending.writing:
                self.failures.record(pending.deadline.what, WriteTimeoutError(pending.deadline.line(
                    f'checkpoint.write_timeout; {pending.on_disk() / 1e6:.1f} MB on disk') + ': its volume is hung or '
                    'too slow (raise checkpoint.write_timeout for a slow one)'))
            report = time.monotonic() >= self._next_report
        *agreed, failed, busy, unfinished, report = any_rank([
            *flags, self.failures.failed, bool(status and (status.busy or held)), bool(status and not status.done),
            report])
        if failed:
            self._stop()
        if report and pending is not None:
            self._report_progress(pending)
        if pending is not None:
            if not busy:
                pending.job.release()  # every rank has finished the phase: all start the next one
            if not unfinished:
                self._finished(pending)
        return agreed

    def _drain(self) -> None:
        """Wait, every rank together, until the write in flight is committed everywhere (short local waits)."""
        while self._pending is not None:  # the same on every rank: saves and their ends are agreed
            self._pending.job.wait(POLL_S)
            self._agree(draining=True)

    def _abandon(self) -> None:
        """Every rank: stop the write in flight (at its next write call) and wait until every rank's thread has ended;
        what it committed before it stopped stays committed (the ranks agree on rank 0's word)."""
        pending = self._pending
        assert pending is not None
        job, started = pending.job, time.monotonic()
        log.info('stopping the checkpoint write of step %d in flight: it is abandoned unless it has committed',
                 pending.record.step)
        job.abort()
        while True:
            if job.running() and pending.deadline.passed and not job.waiting_for_peers:
                self.failures.record(pending.deadline.what, WriteTimeoutError(pending.deadline.line(
                    'checkpoint.write_timeout; abandoned, it did not stop') + ': its volume is hung'))
            running, failed = any_rank([job.running(), self.failures.failed])
            if failed:
                self._stop()
            if not running:
                break
            job.join(POLL_S)
        self._pending = None
        committed = agreement.gather(pending.record.committed)[0]
        if committed:
            self._committed = Committed(pending.record.step, self.generation, pending.rng)
        else:
            self._discard(pending.shards_name)
        log.info('the checkpoint write of step %d in flight was %s, then stopped in %.2f s: the last checkpoint of this '
                 'start replaces it', pending.record.step, 'committed' if committed else 'abandoned uncommitted',
                 time.monotonic() - started)

    def _report_progress(self, pending: PendingSave) -> None:
        """Every rank, once a minute while a write runs: rank 0 logs who is still writing and how far they got."""
        self._next_report = time.monotonic() + REPORT_S
        ranks = agreement.gather((pending.writing, pending.on_disk()))
        if agreement.rank() != 0:
            return
        writing = [f'rank {r} ({written / 1e6:.1f} MB on disk)' for r, (busy, written) in enumerate(ranks) if busy]
        log.warning('the checkpoint of step %d is still being written after %.1f min (checkpoint.write_timeout: %.1f '
                    'min): %s', pending.record.step, (time.monotonic() - pending.job.started) / 60,
                    pending.deadline.seconds / 60, ', '.join(writing) + ' still writing' if writing else
                    'every rank has written its part and waits for the others')

    def _leave(self, pending: PendingSave) -> None:
        """After an abort: wait until this rank's write thread has stopped (at its next write) and is out of DCP's
        collectives, which the other ranks' threads end (or DCP's timeout does), so that no rank exits with its
        thread inside one. A thread stuck on this rank's own disk past its deadline is left behind: nothing
        interrupts it, and no other rank waits for it in a collective."""
        job, started = pending.job, time.monotonic()
        while job.running():
            if pending.deadline.passed and not job.waiting_for_peers:
                log.warning("leaving the checkpoint write of step %d behind: it is stuck on this rank's disk", job.step)
                return
            if time.monotonic() - started > REPORT_S / 6:
                log.warning('waiting for the checkpoint write of step %d to stop before exiting', job.step)
                started = time.monotonic()
            job.join(POLL_S)

    def _finished(self, pending: PendingSave) -> None:
        self._pending = None
        self._committed = Committed(pending.record.step, self.generation, pending.rng)
        record = pending.record
        record.write_s = (pending.job.ended or time.monotonic()) - pending.job.started
        self.saves.append(record)
        if record.asynchronous:
            self._report(record)

    def _stop(self) -> None:
        """Every rank: some rank failed. Write nothing more and raise one line naming it and what is intact; a run
        taken over by another start is named as that on every rank, whichever rank's failure showed it first."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.job.abort()
        committed = False
        try:
            if self.lock is not None and self.lock.lost is None:  # a look now: the takeover may be what failed
                bounded(self.lock.holds, BOUNDED_S, f'reading the run lock {self.lock.path}')
            lost = self.lock.lost if self.lock is not None else None
            committed, lost = agreement.gather((pending is not None and pending.record.committed, lost))[0]
            newest = self._committed.step if self._committed is not None else None
            if committed:
                newest = pending.record.step  # rank 0 renamed it into place before the failure
            if lost:
                raise RankFailedError(f'{lost}: that start continues the run from the newest checkpoint; this one '
                                      'stopped without publishing anything more')
            intact = f'the checkpoint of step {newest} is intact' if newest is not None else 'no checkpoint was written yet'
            self.failures.stop(f'{intact}. Fix the cause, then run the same command again to resume')
        finally:
            if pending is not None:  # after the last collective: the ranks whose threads wait in DCP leave together
                self._leave(pending)
                if not committed:  # this start's own temporaries: a successor's folder keeps none of them
                    bounded(lambda: self._discard(pending.shards_name), BOUNDED_S,
                            f'removing the temporary files of the checkpoint of step {pending.record.step}')

    # --- after a lost rank ---------------------------------------------------------------------

    def savable_step(self, state: State) -> Optional[int]:
        """The step this rank could save alone after a loss (what it tells the other survivors), or None: under
        FSDP (the lost ranks' shards are gone with them), before training started, or when its optimizer already
        applied the next step's update (a collective after it failed: the state is half-way)."""
        step = int(state.timestamp.batch)
        if self.sharded or self._fit_start is None:
            return None
        if self._fit_start + self._optimizer_steps != step:
            log.warning('step %d cannot be saved alone after this failed collective: the optimizer had already '
                        'applied the update of step %d', step, step + 1)
            return None
        return step

    def rescue(self, state: State, lost: list[int], announce: Callable[[str], None], deputy: bool) -> str:
        """The one writer among the survivors after ``lost`` ranks were lost (their collectives fail): save the
        step it completed (``savable_step``; the survivors agreed it is the highest any of them holds).

        Under data parallelism every rank holds the whole training state of the last completed step (a step's
        gradients are all-reduced before its optimizer step), and each rank's random numbers are a function of the
        seed, its rank and the step: the writer writes the global file and a rank file for every rank, the lost
        ones included, with no collective. Rank 0 writes ``latest.pt`` and ``latest_rank{r}.pt`` under its lease.
        Any other writer (a ``deputy``: rank 0 lost, or behind it) holds no lease and never writes ``latest.pt``:
        it writes the same files as ``rescue.pt`` and ``rescue_rank{r}.pt``, under the holder's generation, for the
        next start to adopt (``adopt_rescue``).

        ``announce`` tells the other survivors what is done before it is written (their lines say it); the return
        is what this rank's own line says: where a restart resumes.
        """
        step, who = int(state.timestamp.batch), f'rank {agreement.rank()}'
        known = self.intact(lost)  # before the write in flight is dropped: a deputy does not know if it committed
        self._drop_pending()
        committed, intact = self.committed_step, known if deputy else self.intact(lost)
        if committed == step:
            intact = f'the checkpoint of step {step}, the last completed, is intact'
        else:
            announce(f'{who} saves step {step}, the last it completed' + (', for the next start to adopt'
                                                                          if deputy else ''))
            if self._write_alone_bounded(state, step, RESCUE if deputy else LATEST):
                return f'{who} saved step {step}, the last it completed' + (', for the next start to adopt'
                                                                              if deputy else '')
            return f'{who} failed saving step {step}: {intact}'
        announce(intact)
        return intact

    def stand_by(self, lost: list[int]) -> str:
        """Rank 0 when another survivor saves a later step: its own write in flight is abandoned (what it
        committed stays), so that the rescue continues the newest ``latest.pt``. The checkpoint it leaves."""
        self._drop_pending()
        return self.intact(lost)

    def intact(self, lost: list[int]) -> str:
        """The checkpoint a restart resumes from, as this rank knows it after ``lost`` ranks were lost: a write in
        flight may have been committed by rank 0 (a rank other than 0 does not know it yet); under FSDP, why."""
        committed = self.committed_step
        newest = f'the checkpoint of step {committed}' if committed is not None else None
        if self._pending is not None:
            step = self._pending.record.step
            text = f'{newest or "no checkpoint"}, or that of step {step} if rank 0 committed it, is intact'
        else:
            text = f'{newest} is intact' if newest else 'no checkpoint was written yet'
        if self.sharded:
            return f'the survivors do not hold the shards of rank {", ".join(map(str, lost))} (FSDP): {text}'
        return text

    def _write_alone_bounded(self, state: State, step: int, kind: str) -> bool:
        """This rank's copy of step ``step`` on this thread, written by another within the write's deadline: saved?"""
        world_size = agreement.world_size()
        steps = [step] + ([self.committed_step] if self.committed_step is not None else [])
        files = {r: rank_state({s: (self.generation, step_rng(self.seed, r, s)) for s in steps}, step, r)
                 for r in range(world_size)}
        payload = HostSnapshot(keep=False).copy(global_state(state, self.config, self.generation))  # on this thread
        timeout_s = write_timeout_s(self.write_timeout, shards.nbytes(payload))
        host_only((payload, files), f'the rescue of step {step}')  # the writing thread never touches CUDA
        saved: list[int] = []
        bounded(lambda: saved.append(self._write_alone(step, payload, files, kind)), timeout_s,
                f'saving step {step} after the loss')
        return bool(saved)

    def _drop_pending(self) -> None:
        """The write in flight, abandoned (the other ranks are gone): what it committed stays, its temporaries go."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        pending.job.abort()
        while pending.job.running() and not pending.deadline.passed:
            pending.job.join(POLL_S)
        if pending.record.committed:
            self._committed = Committed(pending.record.step, self.generation, pending.rng)
        else:
            bounded(lambda: self._discard(pending.shards_name), BOUNDED_S, 'removing the abandoned write\'s files')

    def _write_alone(self, step: int, payload: dict[str, Any], files: dict[int, dict[str, Any]], kind: str) -> int:
        tag, top = str(self.generation), global_file(self.folder, kind)
        temps: dict[Path, Path] = {}
        try:
            for r, x in files.items():
                temps[rank_file(self.folder, r, kind)] = write_temp(rank_file(self.folder, r, kind),
                                                                    lambda f, x=x: torch.save(x, f), tag)
            temps[top] = write_temp(top, lambda f: torch.save(payload, f), tag)
            for path, tmp in temps.items():  # the global file last: the commit
                self._fence()
                commit(tmp, path)
        except BaseException:
            for tmp in temps.values():  # a failed save leaves none of its temporaries (the committed ones are gone)
                tmp.unlink(missing_ok=True)
            raise
        log.warning('saved step %d after the loss of a rank: %s and the rank files of all %d ranks', step, top.name,
                    len(files))
        if kind == LATEST:
            self._committed = Committed(step, self.generation, files[0]['rng'][step])
            if self.summary is not None:
                record_checkpoint(self.summary, step, payload['tokens_seen'], sum(p.stat().st_size for p in temps))
        return step

    # --- saving ---------------------------------------------------------------------------------

    def save(self, state: State, periodic: bool, wait: bool, abandon: bool = False) -> None:
        """Snapshot the state and hand it to a background write; ``wait`` (or sync mode) waits for the commit.

        ``abandon`` (a preemption, agreed by every rank): a write still in flight is abandoned unless already
        committed, so that the grace period pays for one write, this one.
        """
        started = time.monotonic()
        if abandon and self._pending is not None:
            self._abandon()
        still_writing = self._pending is not None and not self._pending.job.status().done
        self._drain()
        if still_writing:
            log.warning('checkpoint at step %d waited %.1f s for the previous write to finish; a longer '
                        'checkpoint.interval would avoid the wait', int(state.timestamp.batch), time.monotonic() - started)
        step = int(state.timestamp.batch)
        asynchronous = self.asynchronous and not wait
        pending = None
        with self.failures.guard(f'taking the checkpoint of step {step}'):
            pending = self._submit(state, step, periodic, asynchronous)
        if any_rank([self.failures.failed])[0]:
            self._pending = pending
            self._stop()
        assert pending is not None
        self._pending = pending
        self._saved_position = _position(state)
        self.interval.reset()
        if periodic:
            assert self.periodic is not None
            self.periodic.reset()
        if not asynchronous:
            self._drain()
        pending.record.blocked_s = time.monotonic() - started
        if not asynchronous:
            self._report(pending.record)

    def _submit(self, state: State, step: int, periodic: bool, asynchronous: bool) -> PendingSave:
        rank = agreement.rank()
        rng = step_rng(self.seed, rank, step)
        history: dict[int, Any] = {step: (self.generation, rng)}
        committed = self._committed
        if committed is not None and committed.step != step and committed.rng is not None:
            history[committed.step] = (committed.generation, committed.rng)
        name = (agreement.gather(shards.new_name(step, self.generation) if rank == 0 else None)[0]  # one folder
                if self.sharded else None)
        live = shards.tensors_of(state) if self.sharded else None  # this rank's shards
        # Every rank (a collective under FSDP); rank 0 keeps it.
        payload: Optional[dict[str, Any]] = global_state(state, self.config, self.generation, name)
        if rank != 0:
            payload = None
        # Host copies, made here on the training thread: the writer thread gets no GPU tensor and nothing
        # that training changes.
        shard_copy, state_copy = self._host_copies()
        tensors = shard_copy.copy(live) if live is not None else None
        payload = state_copy.copy(payload) if payload is not None else None
        record = SaveRecord(step, periodic, asynchronous)
        rank_payload = rank_state(history, step)
        # The ranks share the volume: a sharded checkpoint is about world size times this rank's part.
        part = shards.nbytes(tensors) + shards.nbytes(payload)
        timeout_s = write_timeout_s(self.write_timeout, part * agreement.world_size() if self.sharded else part)
        phases = self._phases(record, rank_payload, payload, tensors, name, periodic, timeout_s)
        self._next_report = time.monotonic() + REPORT_S
        job = WriteJob(step, phases, agreement.world_size(), (rank_payload, payload, tensors))
        deadline = Deadline(timeout_s, f'writing the checkpoint of step {step}')
        return PendingSave(job, record, rng, deadline, lambda: self._on_disk(name, payload is not None), name)

    def _host_copies(self) -> tuple[HostSnapshot, HostSnapshot]:
        """Where the shards and latest.pt's payload are copied: in asynchronous mode slabs kept for every
        checkpoint (the final one too, and the resume's read), else one-off slabs freed with the write."""
        return self._kept if self.asynchronous else (HostSnapshot(keep=False), HostSnapshot(keep=False))

    def _discard(self, shards_name: Optional[str]) -> None:
        """Remove this rank's temporary files of an abandoned write, and rank 0 the temporary shard folder (every
        rank is out of DCP by then: it raises on every rank together, and an abandon waits for every rank)."""
        tag, rank = str(self.generation), agreement.rank()
        for kind in (LATEST, PERIODIC):
            temp_path(rank_file(self.folder, rank, kind), tag).unlink(missing_ok=True)
        if rank == 0:
            for kind in (LATEST, PERIODIC):
                temp_path(global_file(self.folder, kind), tag).unlink(missing_ok=True)
            if shards_name is not None:
                shutil.rmtree(temp_path(self.folder / shards_name, tag), ignore_errors=True)

    def _on_disk(self, shards_name: Optional[str], latest: bool) -> int:
        """Bytes of this rank's temporary files of the write in flight (for the progress log)."""
        rank, tag = agreement.rank(), str(self.generation)
        paths = [temp_path(rank_file(self.folder, rank), tag)]
        if latest:
            paths.append(temp_path(global_file(self.folder), tag))
        if shards_name is not None:
            paths.extend(temp_path(self.folder / shards_name, tag).glob(f'__{rank}_*'))
        return sum(p.stat().st_size for p in paths if p.exists())

    def _phases(self, record: SaveRecord, rank_payload: dict[str, Any], payload: Optional[dict[str, Any]],
                tensors: Optional[dict[str, Any]], shards_name: Optional[str], periodic: bool, timeout_s: float) -> list:
        rank, world_size = agreement.rank(), agreement.world_size()
        latest, mine = global_file(self.folder), rank_file(self.folder, rank)
        tag = str(self.generation)
        # The periodic copies are the same files: their temporaries are made with the others', so that a late rename
        # of a rank other than 0 (which renames without a fence) fails once a successor removed them.
        links = [(mine, rank_file(self.folder, rank, PERIODIC))] if periodic else []
        if periodic and payload is not None:
            links.append((latest, global_file(self.folder, PERIODIC)))

        def write() -> None:
            try:
                # DCP first: every rank enters its collectives, whatever fails on a rank later in this phase.
                if tensors is not None and shards_name is not None:  # every rank its shards, whole once all return
                    record.bytes += shards.write(tensors, self.folder / shards_name, self.shards_group, tag, timeout_s)
                record.bytes += write_temp(mine, lambda f: torch.save(rank_payload, f), tag,
                                           raise_if_abandoned).stat().st_size
                if payload is not None:
                    record.bytes += write_temp(latest, lambda f: torch.save(payload, f), tag,
                                               raise_if_abandoned).stat().st_size
                for src, dst in links:
                    link_temp(temp_path(src, tag), dst, tag)
            except BaseException:
                self._discard(shards_name)  # abandoned or failed: its temporary files go
                raise

        def publish_rank_files() -> None:
            self._fence()
            if rank == 0 and shards_name is not None:
                shards.publish(self.folder / shards_name, tag)
            commit(temp_path(mine, tag), mine)

        def commit_latest() -> None:
            if rank == 0:
                self._fence()
                commit(temp_path(latest, tag), latest)
                record.committed = True
                self._fence()  # what follows removes or rewrites files a successor may own
                self._remove_rank_files_beyond(world_size, LATEST)
                self._remove_unreferenced_shards()
                if self.summary is not None and payload is not None:
                    record_checkpoint(self.summary, record.step, payload['tokens_seen'], record.bytes)

        def link_periodic() -> None:
            for _, dst in links:
                self._fence()
                commit(temp_path(dst, tag), dst)
            if periodic and rank == 0:
                self._fence()
                self._remove_rank_files_beyond(world_size, PERIODIC)
                self._remove_unreferenced_shards()

        return [write, publish_rank_files, commit_latest, link_periodic]

    def _fence(self) -> None:
        """Rank 0, before each rename that publishes: its lease must be current (the other ranks rename only
        in phases it released while it was). An abandoned write stops waiting for it."""
        if self.lock is not None:
            self.lock.fence(raise_if_abandoned)

    def _report(self, record: SaveRecord) -> None:
        how = 'in the background' if record.asynchronous else 'synchronously'
        log.info('checkpoint saved at step %d%s: training blocked %.3f s, written %s in %.3f s (%.1f MB)',
                 record.step, ' (and periodic)' if record.periodic else '', record.blocked_s, how,
                 record.write_s or 0.0, record.bytes / 1e6)
        if self._logger is not None:
            self._logger.log_metrics({'checkpoint/step': record.step, 'checkpoint/blocked_s': record.blocked_s,
                                      'checkpoint/write_s': record.write_s, 'checkpoint/bytes': record.bytes},
                                     step=record.step)  # the checkpoint's step, not the one its background write ended at

    def _remove_unreferenced_shards(self) -> None:
        """Rank 0, once latest.pt or periodic.pt moved on: the shard folder neither names any more goes."""
        keep = referenced_shards(self.folder)
        if keep is not None:
            shards.remove_unreferenced(self.folder, keep, self.generation)

    def _remove_rank_files_beyond(self, world_size: int, kind: str) -> None:
        """Rank files of ranks a smaller world no longer has belong to no checkpoint once the global file moved on."""
        for path in self.folder.glob(f'{kind}_rank*.pt'):
            match = RANK_FILE.match(path.name)
            if match is not None and int(match.group(2)) >= world_size:
                log.warning('removing %s: the run now has %d ranks', path.name, world_size)
                path.unlink(missing_ok=True)


def never(state: State, event: Event) -> bool:
    """Save interval for Composer's own CheckpointSaver: prefix's Checkpointer writes the files."""
    return False
