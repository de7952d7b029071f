"""Lost peers: a rank that dies or stops answering is noticed within seconds and named once, not after
``dist_timeout``.

Every rank's watcher thread counts up its own key in the rendezvous store (``MASTER_ADDR:MASTER_PORT``,
the store PyTorch's process group was set up with, hosted by rank 0's process) every ``BEAT_S`` and
reads everyone's in the same round trip. The training thread never waits on it: the store is
touched by the watcher alone, over a connection of its own, and no CUDA is involved.

- A rank that **dies** (SIGKILL, OOM kill, a node gone) closes its connections: the survivors'
  next collective fails at once, and ``lost`` then names the ranks whose count stopped (or rank 0,
  when the store itself is gone: it lived in rank 0's process). A survivor that waits in no collective
  (Streaming's barrier among a node's ranks) is ended by its watcher: a dead rank's count stops (as a
  hung one's), and a store that is gone ends it ``SILENT_S`` later.
- A rank that **hangs** (SIGSTOP, a frozen node, a partition) closes nothing, and a collective would
  wait for it ``dist_timeout``. Its count stops: after ``SILENT_S`` of silence the watcher prints
  one line naming it and ends the process (``os._exit``), whatever the training thread is waiting
  in. On NCCL it first aborts the communicators (``release_collectives``), so that the training
  thread's collective fails and the dead case follows, a save included. A store that stops answering
  (rank 0 hung) ends the process too: a store call can block past its own timeout, so a second
  thread ends it when a round of the watcher has not come back in ``SILENT_S``.
- After a loss, the survivors agree on who saves which step (``writer``: the highest step any of them
  holds), and the writer ``tell``s the others what it saves, and they say it (``heard``).

A rank that ends (its training done, failed or stopped) says so first (``done``): it is then never
taken for a lost one. Ranks that never beat (not yet started) are not judged.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from datetime import timedelta
from typing import Optional

from prefix.distributed.waits import Deadline, bounded, minutes
from prefix.errors import PrefixError

log = logging.getLogger(__name__)

BEAT_S = 1.0  # how often each rank counts up its key and reads the others'
SILENT_S = 10.0  # a rank whose count has not moved for this long is hung: the process ends
LOST_CODE = 1  # the exit code of a rank that ends because a peer was lost
KEY = 'prefix/peer'


class PeerWatch:
    """This rank's beats in the rendezvous store, and its view of the others'."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank = rank
        self.world_size = world_size
        self.silent_s = SILENT_S
        self.beat_s = BEAT_S
        self.store_gone: Optional[str] = None  # why the store could not be reached (rank 0's process died)
        self._seen: dict[int, tuple[int, float]] = {}  # rank: (its count, when this watcher saw it change)
        self._where: dict[int, str] = {}
        self._ended = threading.Event()
        self._failing = False  # the training thread handles a failed collective: it names the lost, not the watcher
        self._released: Optional[float] = None  # when this watcher aborted NCCL's collectives for a lost rank
        self._round = time.monotonic()  # when the watcher's last round with the store came back
        self._rounds = 0  # rounds that came back
        self._store = None

    def start(self) -> PeerWatch:
        """Connect to the store and start watching; a store that cannot be reached now only costs the watch."""
        import torch.distributed as tdist

        try:
            self._store = tdist.TCPStore(os.environ['MASTER_ADDR'], int(os.environ['MASTER_PORT']), is_master=False,
                                         timeout=timedelta(seconds=self.silent_s), wait_for_workers=False)
            node = os.environ.get('NODE_RANK', '0')
            self._store.set(f'{KEY}/where/{self.rank}', json.dumps(f'node {node}, host {socket.gethostname()}'))
        except (KeyError, ValueError, RuntimeError) as e:
            log.warning('not watching for lost ranks: the rendezvous store cannot be reached (%s)', e)
            self._ended.set()
            return self
        self._round = time.monotonic()
        threading.Thread(target=self._watch, name='prefix-peers', daemon=True).start()
        threading.Thread(target=self._store_answers, name='prefix-peers-store', daemon=True).start()
        return self

    def done(self) -> None:
        """This rank is ending: the others must not take its silence for a loss (its count goes to -1)."""
        if self._ended.is_set():
            return
        self._ended.set()
        try:
            if self._store is not None and self.store_gone is None:
                self._store.set(f'{KEY}/count/{self.rank}', '-1')
        except Exception as e:  # the store may be gone with rank 0: nothing to tell then
            log.debug('could not mark rank %d done: %s', self.rank, e)

    def where(self, rank: int) -> str:
        """``node N, host H`` of a rank, as it said when it started (read while the store was there)."""
        return self._where.get(rank, 'where unknown')

    def _watch(self) -> None:
        assert self._store is not None
        count = 0
        keys = [f'{KEY}/count/{r}' for r in range(self.world_size)]
        while not self._ended.wait(self.beat_s):
            count += 1
            try:
                self._store.set(keys[self.rank], str(count))
                counts = [int(v) for v in self._store.multi_get(keys)] if self._store.check(keys) else None
                if len(self._where) < self.world_size:
                    self._learn_where()
            except Exception as e:  # the store is gone: it lived in rank 0's process
                text = first_line(e)
                if 'time' in text.lower():  # no answer, where a dead process refuses or resets at once
                    self._end(self._store_hung())
                self.store_gone = text
                release_collectives()  # NCCL may not notice rank 0's death: its collectives are aborted
                # The training thread names the loss when its next collective fails; one that waits elsewhere (the
                # data loader's barrier among a node's ranks, at an epoch's start) would wait forever.
                if not self._ended.wait(self.silent_s):
                    self._end(f'rank 0 ({self.where(0)}; it hosts the rendezvous) is gone: its store refused this '
                              f'rank ({text}) and nothing else failed in {minutes(self.silent_s)}')
                return
            self._round = time.monotonic()
            if counts is not None:
                self._judge(counts)
            self._rounds += 1

    def _store_answers(self) -> None:
        """A round of the watcher that has not come back in ``silent_s``: the store's host (rank 0) is hung."""
        while not self._ended.wait(self.beat_s):
            if self.store_gone is None and time.monotonic() - self._round > self.silent_s:
                self._end(self._store_hung())

    def _store_hung(self) -> str:
        return (f'rank 0 ({self.where(0)}; it hosts the rendezvous) stopped answering: its store gave no answer for '
                f'{minutes(self.silent_s)} (a frozen process or node, or a network partition)')

    def _learn_where(self) -> None:
        assert self._store is not None
        for r in range(self.world_size):
            if r not in self._where and self._store.check([f'{KEY}/where/{r}']):
                self._where[r] = json.loads(self._store.get(f'{KEY}/where/{r}'))

    def _judge(self, counts: list[int]) -> None:
        now = time.monotonic()
        for r, value in enumerate(counts):
            last = self._seen.get(r)
            if value < 0 or r == self.rank:
                continue  # ended, or this rank
            if last is None or last[0] != value:
                self._seen[r] = (value, now)
        silent = {r: now - since for r, (_, since) in self._seen.items() if counts[r] >= 0}
        if any(s > self.silent_s for s in silent.values()):
            # Ranks frozen together (a node) are named together, not the first alone: on a loaded node their last
            # beats may lie seconds apart, so every rank silent for half the time is named with the one past it.
            hung = sorted(r for r, s in silent.items() if s > self.silent_s / 2)
            names = ', '.join(f'rank {r} ({self.where(r)})' for r in hung)
            self._lost(f'{names} stopped answering: no sign of {"it" if len(hung) == 1 else "them"} for '
                       f'{minutes(self.silent_s)} (a frozen process or node, or a network partition)')

    def lost(self, savable: Optional[int] = None, rounds: int = 2) -> list[int]:
        """After a collective failed: the ranks that show no sign of life since, or [0] when the store is gone.
        Empty: every peer is alive (not a peer's loss).

        This rank first marks itself alive in the store with the step it could save (``savable``; None: none), as
        every survivor whose collective failed does, so the survivors know each other at once and can agree on who
        saves (``writer``); a rank that does not mark itself must count up (its watcher does once
        a ``beat_s``) over ``rounds`` beats and ``rounds`` rounds of this rank's watcher from counts read after
        the failure (a count read before it may hold a dead rank's last beat). Rounds as well as seconds: a
        loaded machine makes them late, never a live rank lost."""
        self._failing = True
        if self._store is None:  # not watching: no rank can be named
            return []
        waited = Deadline(self.silent_s + rounds * self.beat_s, 'looking for the lost ranks')
        try:
            self._store.append(f'{KEY}/failed', f'{self.rank}:{-1 if savable is None else savable},')
            before = self._counts()
            start, since = self._rounds, time.monotonic()
            while True:
                now, marked = self._counts(), self._marked()
                silent = {r for r in before if now[r] == before[r] and now[r] >= 0 and r not in marked}
                enough = time.monotonic() - since > (rounds + 0.5) * self.beat_s and self._rounds >= start + rounds
                if not silent or enough or waited.passed:
                    return sorted(silent)
                time.sleep(self.beat_s / 20)
        except Exception as e:  # the store went with rank 0's process
            self.store_gone = self.store_gone or first_line(e)
            return [0]

    def _counts(self) -> dict[int, int]:
        """The other ranks' counts now, of those this watcher has seen count (read by the caller's thread)."""
        ranks = sorted(self._seen)
        values = self._store.multi_get([f'{KEY}/count/{r}' for r in ranks]) if ranks else []
        return {r: int(v) for r, v in zip(ranks, values, strict=True)}

    def _marked(self) -> dict[int, int]:
        """The ranks that marked themselves alive after a failed collective, with the step each could save (-1:
        none)."""
        text = self._store.get(f'{KEY}/failed').decode() if self._store.check([f'{KEY}/failed']) else ''
        return {int(r): int(s) for r, s in (mark.split(':') for mark in text.split(',') if mark)}

    def writer(self, lost: list[int]) -> tuple[Optional[int], Optional[int]]:
        """The one survivor that saves after ``lost`` ranks were lost, and the step it saves: the highest step any
        survivor can save (a ring all-reduce may finish on some ranks and not on others), by the lowest rank at it.
        Every survivor marks itself (``lost``); this waits ``silent_s`` at most for them all. With the store gone
        (rank 0 lost) they cannot compare: rank 1 saves the step it holds (step None). (None, None): nobody can."""
        if self._store is None or self.store_gone is not None:
            return (1, None) if self.world_size > 1 and 1 not in lost else (None, None)
        waited = Deadline(self.silent_s, 'waiting for the survivors to say which step they hold')
        try:
            marked = self._marked()
            while len(marked.keys() - set(lost)) < self.world_size - len(lost) and not waited.passed:
                time.sleep(self.beat_s / 20)
                marked = self._marked()
            marked = {r: step for r, step in marked.items() if r not in lost}
        except Exception as e:  # the store went with rank 0 meanwhile: as when it was gone before
            self.store_gone = first_line(e)
            return self.writer(lost)
        return first_at_highest(marked)

    def tell(self, text: str) -> None:
        """The writer, after a loss: what it does about it (saves a step, or keeps the last checkpoint), for the other
        survivors' lines. A store that does not take it costs them only the detail."""
        if self._store is not None and self.store_gone is None:
            bounded(lambda: self._store.set(f'{KEY}/rescue', text), self.silent_s, 'telling the survivors')

    def heard(self) -> Optional[str]:
        """What the writer said it does after the loss, waited for ``silent_s`` at most (it looks for the lost ranks
        as this rank did, then says it before writing anything); None without an answer."""
        waited = Deadline(self.silent_s, "waiting for the writer's word")
        while self._store is not None and self.store_gone is None and not waited.passed:
            try:
                if self._store.check([f'{KEY}/rescue']):
                    return self._store.get(f'{KEY}/rescue').decode()
            except Exception as e:  # the store went with rank 0
                log.debug('no word from rank 0: %s', e)
                return None
            time.sleep(self.beat_s / 10)
        return None

    def _lost(self, what: str) -> None:
        """Silent ranks: on NCCL, abort its collectives first, so that the training thread waiting in one gets an
        error and saves what it can (``lost``, then rank 0's rescue); it has ``silent_s`` more to take over before
        this watcher ends the process. On gloo, whose collectives cannot be aborted, end it now."""
        if self._released is None and release_collectives():
            self._released = time.monotonic()
            log.warning('%s: NCCL collectives aborted, so that the survivors save what they can', what)
        if self._released is None or time.monotonic() - self._released > self.silent_s:
            self._end(what, self._saving_elsewhere())

    def _saving_elsewhere(self) -> str:
        """What a restart resumes from when this rank ends without saving, read from the store (it answered this
        round): a survivor whose collective failed marked the step it can save, and saves it unless a lower rank at
        that step does (``writer``; this rank, waiting in a collective, never marks itself)."""
        try:
            writer, best = first_at_highest({r: step for r, step in self._marked().items() if r != self.rank})
        except Exception as e:  # the store went meanwhile: nothing more is known
            log.debug('no marks read: %s', e)
            writer = best = None
        if writer is None:
            return 'the last committed checkpoint is intact'
        adopted = '' if writer == 0 else ' for the next start to adopt'
        return f'rank {writer} saves step {best}{adopted} if it can, else the last committed checkpoint is intact'

    def _end(self, what: str, elsewhere: str = 'the last committed checkpoint is intact') -> None:
        """A hung peer: say so once, and end this process (its training thread may wait in a collective for it)."""
        if self._ended.is_set() or self._failing:
            return
        self._ended.set()
        os.write(2, f'prefix: error: {what}; this rank stops now without saving ({elsewhere}); run the same command '
                    'to resume\n'.encode())
        os._exit(LOST_CODE)


def first_at_highest(marked: dict[int, int]) -> tuple[Optional[int], Optional[int]]:
    """Who saves among marked survivors (rank: the step it can save, -1 for none): the lowest rank at the highest
    step, and that step; (None, None) when none can."""
    best = max(marked.values(), default=-1)
    return (min(r for r, step in marked.items() if step == best), best) if best >= 0 else (None, None)


def first_line(error: BaseException) -> str:
    """A store error's first line (or its type): what a rank says of a store that is gone."""
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def nccl_error_handling() -> None:
    """Before the process group is made: NCCL's own watchdog, on an error or a timeout, aborts the communicators and
    hands the error to Python (``CleanUpOnly``) instead of killing the process, so a rank can still save and say
    why in one line. A value the user set is kept."""
    os.environ.setdefault('TORCH_NCCL_ASYNC_ERROR_HANDLING', '2')


def release_collectives() -> bool:
    """Abort the NCCL communicators: a training thread waiting in a collective on a lost rank gets an error instead
    of waiting for ``dist_timeout`` (PyTorch's own watchdog aborts them from its thread too; nothing is copied or
    allocated on the GPU). False on gloo: it has no abort; its collectives fail when a dead peer's connections
    close, and wait for a hung one."""
    import torch.distributed as tdist

    if not tdist.is_initialized() or tdist.get_backend() != 'nccl':
        return False
    try:
        tdist.distributed_c10d._abort_process_group()
    except Exception as e:  # already aborted by NCCL's watchdog, or destroyed: nothing is waiting then
        log.warning('could not abort the NCCL collectives: %s', e)
    return True


class PeerLostError(PrefixError):
    """A collective failed because a rank was lost: one line naming it, instead of the backend's traceback."""


def is_collective_failure(error: BaseException) -> bool:
    """An error a collective raises when a peer is gone (gloo's connection errors, NCCL's, a store's)."""
    import torch.distributed as tdist

    text = str(error)
    return isinstance(error, tdist.DistError) or (isinstance(error, RuntimeError) and any(
        s in text for s in ('gloo', 'NCCL', 'Connection reset', 'Connection closed', 'Broken pipe')))
