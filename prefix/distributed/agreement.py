"""What the ranks decide together, so that no rank waits inside a collective while another does slow work.

A collective waits for its slowest rank, and fails after ``dist_timeout``. File I/O on a network
volume can take minutes, so prefix never enters a collective while some rank does I/O: the slow
work runs on a thread (``together``) and every rank polls it in short local waits, each followed by
one tiny all-reduce, until every rank's work is done; only then are the (small) results exchanged.

Slow work may have a deadline (``together(..., deadline_s)``): a rank still at its own part of the
work when it passes makes every rank stop with one line naming it. A worker thread says which of its
waits are other ranks' (``collective``) and which its own I/O inside them (``own_io``), so that a
rank waiting inside DCP's collective for a slow peer is never taken for the slow one, and no rank
exits while its thread is inside a collective that the others' exit or DCP's timeout will end.

A rank-local failure becomes an agreed stop the same way: ``RankFailures`` holds the first
exception a rank hit in prefix's own callbacks, the ranks learn of it from the flag in their
per-step all-reduce, and every rank then raises one ``RankFailedError`` naming the failing rank.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Optional

import torch
import torch.distributed as tdist

from prefix.distributed.waits import Deadline
from prefix.errors import PrefixError

log = logging.getLogger(__name__)

POLL_S = 0.5  # the longest a rank waits on its own before the ranks compare notes


class RankFailedError(PrefixError):
    """Some rank failed; every rank raises this, with one line naming the rank and what failed."""


class PeerFailed(Exception):
    """Work this rank shared with others (a collective) failed on another rank, which reports its own error."""


def world_size() -> int:
    return tdist.get_world_size() if tdist.is_available() and tdist.is_initialized() else 1


def rank() -> int:
    return tdist.get_rank() if world_size() > 1 else 0


_group: Optional[tdist.ProcessGroup] = None  # the agreement's collectives go here (None: the default group, gloo)


def connect(timeout_s: float) -> None:
    """Every rank, once, right after the process group is set up: where the agreement's collectives go.

    On gloo (CPU training) the default group. On NCCL a gloo group of its own, so that the per-step
    flags are CPU tensors: an all-reduce on NCCL would need them on the GPU, and reading the result
    back would wait for every kernel queued before it (a host-device sync per step).
    """
    global _group
    if world_size() > 1 and tdist.get_backend() != 'gloo':
        _group = tdist.new_group(backend='gloo', timeout=timedelta(seconds=timeout_s))


def any_rank(flags: list[bool]) -> list[bool]:
    """Element-wise OR of ``flags`` over all ranks (one tiny all-reduce on the CPU), so every rank decides alike."""
    if world_size() == 1:
        return flags
    tensor = torch.tensor([int(f) for f in flags], dtype=torch.int32)
    tdist.all_reduce(tensor, op=tdist.ReduceOp.MAX, group=_group)
    return [bool(v) for v in tensor.tolist()]


def any_rank_later(flags: list[bool]) -> Callable[[], list[bool]]:
    """``any_rank``, issued now and read later: the all-reduce runs while this rank works on, and reading it waits
    only if some rank has not issued it yet. Every rank must read it before its next collective of its own."""
    if world_size() == 1:
        return lambda: flags
    tensor = torch.tensor([int(f) for f in flags], dtype=torch.int32)
    work = tdist.all_reduce(tensor, op=tdist.ReduceOp.MAX, group=_group, async_op=True)

    def read() -> list[bool]:
        work.wait()
        return [bool(v) for v in tensor.tolist()]
    return read


def gather(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (small, picklable), on every rank."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    tdist.all_gather_object(out, obj, group=_group)
    return out


class Outcome:
    """What ``work`` returned on one rank, or the exception it raised (None when the rank had no work)."""

    def __init__(self, value: Any = None, error: Optional[BaseException] = None) -> None:
        self.value, self.error = value, error

    def get(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.value


class Activity:
    """What a worker thread is doing inside a collective: waiting for other ranks, or its own I/O."""

    def __init__(self) -> None:
        self.in_collective = False
        self.own_io = False

    @property
    def waiting_for_peers(self) -> bool:
        return self.in_collective and not self.own_io


_local = threading.local()  # .activity: the current worker thread's


def track(activity: Activity) -> None:
    """The current thread reports what it does to ``activity`` (called first thing in a worker thread)."""
    _local.activity = activity


@contextmanager
def collective() -> Iterator[None]:
    """Work that waits for the other ranks (all of it but its ``own_io``), e.g. a DCP save or load."""
    activity = getattr(_local, 'activity', None)
    if activity is None:
        yield
        return
    activity.in_collective, activity.own_io = True, False
    try:
        yield
    finally:
        activity.in_collective = False


@contextmanager
def own_io() -> Iterator[None]:
    """Inside ``collective``: this rank's own reads and writes, which no other rank waits in."""
    activity = getattr(_local, 'activity', None)
    if activity is None:
        yield
        return
    activity.own_io = True
    try:
        yield
    finally:
        activity.own_io = False


def wait_until_done(done: Callable[[float], bool], late: Callable[[], bool] = lambda: False) -> list[int]:
    """Poll ``done(timeout)`` (True once this rank's work is over) with every rank until all are over, or until
    some rank is ``late``: then the late ranks (none when every rank finished).

    Every rank runs the same number of rounds, because whether to go on is agreed too.
    """
    while True:
        running = not done(POLL_S)
        is_late = running and late()
        if world_size() == 1:
            if is_late or not running:
                return [0] if is_late else []
            continue
        running, any_late = any_rank([running, is_late])
        if any_late:
            return [r for r, flag in enumerate(gather(is_late)) if flag]
        if not running:
            return []


_lingering: list[tuple[threading.Thread, Activity]] = []  # threads left inside a collective (leave())


def together(work: Optional[Callable[[], Any]], deadline_s: Optional[float] = None, doing: str = '') -> list[Outcome]:
    """Run ``work`` on the ranks that have some, on a thread, and give every rank every rank's outcome.

    No rank waits in a collective for more than ``POLL_S`` plus the others' lag, however long the work.
    With ``deadline_s``: a rank whose own part of ``doing`` is still running after it makes every rank raise
    one ``RankFailedError`` naming it.
    """
    outcome = Outcome()
    activity = Activity()
    thread = None
    if work is not None:
        def run() -> None:
            track(activity)
            try:
                outcome.value = work()
            except BaseException as e:
                outcome.error = e
        thread = threading.Thread(target=run, name='prefix-together', daemon=True)
        thread.start()

    def done(timeout: float) -> bool:
        if thread is None:
            return True
        thread.join(timeout)
        return not thread.is_alive()

    deadline = Deadline(deadline_s, doing) if deadline_s is not None else None
    late = wait_until_done(done, lambda: deadline is not None and deadline.passed
                           and not activity.waiting_for_peers)
    if late:
        if thread is not None and thread.is_alive() and activity.waiting_for_peers:
            # Inside a collective, which the late rank's exit (or its timeout) ends: waited for by leave(),
            # once this rank has printed its line (a launcher kills the other ranks when one exits).
            _lingering.append((thread, activity))
        assert deadline is not None
        ranks = ', '.join(f'rank {r}' for r in late)
        raise RankFailedError(f'{ranks} failed {doing}: {deadline.line("checkpoint.write_timeout")}: its volume is '
                              'hung or too slow (raise '
                              'checkpoint.write_timeout for a slow one)')
    if world_size() == 1:
        return [outcome]
    return gather(_picklable(outcome))


def leave() -> None:
    """Before the process exits on an error: wait for a thread ``together`` left inside a collective.

    A late rank's exit, or the collective's own timeout, ends it; a thread still inside gloo at
    interpreter exit would abort the process (``terminate called``, exit 134).
    """
    for thread, activity in _lingering:
        while thread.is_alive() and activity.waiting_for_peers:
            thread.join(POLL_S)


def from_rank_zero(work: Callable[[], Any], deadline_s: Optional[float] = None, doing: str = '') -> Any:
    """``work`` runs on rank 0 alone; every rank returns its result, or raises its exception (a failed file
    operation as one ``PrefixError`` line naming the file: the run directory's volume, not a bug)."""
    try:
        return together(work if rank() == 0 else None, deadline_s, doing)[0].get()
    except OSError as e:
        raise PrefixError(f'rank 0 failed {doing or "its work on the run directory"}: {describe(e)}: the volume is full, '
                          'read-only or failing; fix it, then run the same command again') from None


def _picklable(outcome: Outcome) -> Outcome:
    if outcome.error is None:
        return outcome
    try:
        import pickle

        pickle.dumps(outcome.error)
        return outcome
    except Exception:
        return Outcome(error=RuntimeError(describe(outcome.error)))


def describe(error: BaseException) -> str:
    """One line: an OSError's reason and file, a PrefixError's message, else the exception's type and first line."""
    if isinstance(error, OSError) and error.strerror:
        return f'{error.strerror} ({error.filename})' if error.filename else error.strerror
    text = str(error).splitlines()[0] if str(error) else ''
    if isinstance(error, PrefixError) and text:
        return text
    return f'{type(error).__name__}: {text}' if text else type(error).__name__


class RankFailures:
    """The first exception this rank hit in prefix's callbacks, held until the ranks agree to stop on it."""

    def __init__(self) -> None:
        self.what: Optional[str] = None
        self.own = False  # the failure is this rank's own, not only a peer's seen through shared work

    @property
    def failed(self) -> bool:
        return self.what is not None

    def record(self, doing: str, error: BaseException) -> None:
        if self.what is None:
            self.what = f'{doing}: {describe(error)}'
            self.own = not isinstance(error, PeerFailed)
            log.error('rank %d failed %s', rank(), self.what, exc_info=error)

    @contextmanager
    def guard(self, doing: str) -> Iterator[None]:
        """Record an exception raised inside instead of raising it: other ranks must not be left in a collective."""
        try:
            yield
        except Exception as e:
            self.record(doing, e)

    def stop(self, intact: str) -> None:
        """Called by every rank once they agreed that some rank failed: raise one line naming the rank(s) (those that
        failed on their own, when some did, not those that only saw it through shared work)."""
        failed = [(r, what, own) for r, (what, own) in enumerate(gather((self.what, self.own))) if what is not None]
        if any(own for _, _, own in failed):
            failed = [f for f in failed if f[2]]
        ranks = ', '.join(f'rank {r} failed {what}' for r, what, _ in failed)
        raise RankFailedError(f'{ranks}; {intact}')
