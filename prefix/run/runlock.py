"""One live writer per run directory, on a local disk or a network volume shared by several pods,
even when the volume or the holder stalls.

Who holds the lock is decided by claims: ``lock.claim-<generation>``, created exclusively and holding
the creator's token. Of two newcomers, exactly one creates a generation's claim; the highest claim's
owner holds the run, and every generation is owned by one process only. ``lock.json`` is the holder's
heartbeat: its record (who, where, ``beat``, ``state``), rewritten every ``BEAT_S`` seconds.

A newcomer decides whether the holder is alive without trusting clocks across machines:

- a record that is the highest claim's own, from the same boot of the same machine and the same PID
  namespace (all three known): the holder's pid, with its start time, is alive or not, at once;
- anything else (another pod, another container, a record that cannot be read or is not the
  highest claim's): it watches ``lock.json`` and the claims for ``WINDOW_S`` seconds; a live holder
  beats in that time, a dead one does not. Having taken over a holder that may be alive only
  stalled, it waits one more window before it returns (the quarantine, below).

The lease. The holder counts a renewal from the moment it started it (before it checked its claim
and wrote the beat), on its own monotonic clock, and publishes nothing (``fence``) once
``WINDOW_S - MARGIN_S`` seconds have passed without a successful one. A newcomer claims only after
``WINDOW_S`` seconds in which no beat landed, so every renewal the holder can count started before
that watch began or is seen by it; and a renewal that lands after the watch ended started before
the claim, so the holder's lease ends less than ``WINDOW_S - MARGIN_S`` seconds after the claim. The
quarantine makes the newcomer return only ``WINDOW_S`` seconds after its claim: by then the old
holder cannot pass a fence, with ``MARGIN_S`` seconds to spare for a rename that passed one just in
time. The beat runs on its own thread and does no checkpoint I/O: a stalled checkpoint write never
stalls it, and a stalled beat stops the commits.

A holder asked to stop (SIGTERM) marks the lock ``stopping`` while it saves, and ``released`` when
it exits. A newcomer waits for a stopping holder, and for a live one too when a cluster started it
(``wait_for_live``: a replacement pod can start while the old one is still in its grace period), up
to ``wait`` seconds, logging every few seconds; then it takes over a lock that stopped beating, or
fails naming the holder.

Files are re-opened on every read, so NFS close-to-open consistency shows the newest content.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

from prefix.distributed import Deadline, boot_id, describe, pid_namespace, start_ticks
from prefix.errors import PrefixError
from prefix.files import TMP_SUFFIX, WRITER, atomic_write_text, tag_of

log = logging.getLogger(__name__)

BEAT_S = 4.0  # how often the holder renews its lease
WINDOW_S = 13.0  # how long a newcomer watches a silent lock before it takes it over
MARGIN_S = 4.0  # the holder stops publishing this much sooner than a newcomer may take over
REPORT_S = 10.0  # how often a commit waiting for a renewal says so
CLAIM = re.compile(r'^lock\.claim-(\d+)$')


class RunLockedError(PrefixError):
    """Another live process is training this run."""


class LockIOError(PrefixError):
    """The run lock's own files cannot be read or written: the volume is full, read-only or failing."""


class LockLostError(RuntimeError):
    """This process held the run's lock and another has taken it: it must publish nothing more."""


class RunLock:
    def __init__(self, path: Path, wait: float = 0.0, wait_for_live: bool = False,
                 stopping: Callable[[], bool] = lambda: False, beat_seconds: Optional[float] = None,
                 window: Optional[float] = None, margin: Optional[float] = None) -> None:
        """Timings default to the module's (read now, not at import: a test may shorten them)."""
        self.path = path
        self.beat_seconds = BEAT_S if beat_seconds is None else beat_seconds
        self.window = WINDOW_S if window is None else window
        self.margin = MARGIN_S if margin is None else margin
        self.wait = wait
        self.wait_for_live = wait_for_live
        self.stopping = stopping
        self.token = uuid.uuid4().hex
        self.generation = 0
        self.info: dict[str, Any] = {
            'token': self.token, 'generation': 0, 'host': socket.gethostname(), 'boot_id': boot_id(),
            'pid_ns': pid_namespace(), 'pid': os.getpid(), 'pid_start': start_ticks(os.getpid()),
            'since': time.strftime('%Y-%m-%dT%H:%M:%S%z'), 'beat': 0, 'state': 'running',
        }
        self.lost: Optional[str] = None  # why this process no longer holds the lock
        self.renewed = float('-inf')  # monotonic start of the last successful renewal
        self.problem: Optional[str] = None  # the error of the last beat, while the beats fail
        self._renewal = threading.Condition()  # notified at each renewal
        self.fencing = False  # a commit waits in fence() for a renewal
        self._stop = threading.Event()
        self._wake = threading.Event()  # a beat now, not at the next period: a stop was asked for, a commit waits
        self._thread: Optional[threading.Thread] = None
        self._waiting_logged = 0.0

    # --- reading --------------------------------------------------------------------------------

    def _raw(self) -> Optional[bytes]:
        """``lock.json``'s bytes (None: no such file); a read that fails counts as unreadable, not as absent."""
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            log.warning('reading %s failed (%s)', self.path, e)
            return b''

    @staticmethod
    def _record(raw: Optional[bytes]) -> Optional[dict[str, Any]]:
        """The record in ``raw``; None when absent, torn, empty or not a record."""
        try:
            record = json.loads(raw) if raw else None
        except ValueError:
            return None
        return record if isinstance(record, dict) else None

    def _claims(self) -> dict[int, Path]:
        return {int(m.group(1)): p for p in self.path.parent.iterdir() if (m := CLAIM.match(p.name))}

    @staticmethod
    def _owner(claim: Path) -> Optional[str]:
        """The token in a claim; None once it is gone (a failed read raises). Bytes that are no token (a torn or
        garbage claim) are nobody's: the claim is then one whose holder writes no beat, and is taken over."""
        try:
            return claim.read_bytes().decode('ascii', errors='replace')
        except FileNotFoundError:
            return None

    def _view(self) -> tuple[Optional[bytes], int, Optional[dict[str, Any]]]:
        """``lock.json``'s bytes, the highest claimed generation, and the record when it is that claim's own."""
        raw = self._raw()
        claims = self._claims()
        top = max(claims, default=0)
        record = self._record(raw)
        try:
            owner = self._owner(claims[top]) if top else None
        except OSError:
            owner = None
        if record is not None and not (owner and record.get('generation') == top and record.get('token') == owner):
            record = None  # not the highest claim's: a stale or half-made record says nothing of the holder
        return raw, top, record

    def _same_process_space(self, record: dict[str, Any]) -> bool:
        """Whether the record's pid means a process here: the same boot and PID namespace, all known."""
        mine = (self.info['boot_id'], self.info['pid_ns'])
        return all(mine) and (record.get('boot_id'), record.get('pid_ns')) == mine and bool(record.get('pid'))

    def _silent(self, raw: Optional[bytes], top: int, who: str) -> bool:
        """Watch ``lock.json`` and the claims for ``window`` seconds: whether nothing changed (the holder is gone)."""
        log.warning('%s: watching %s for up to %.0fs to see whether it is alive', who, self.path, self.window)
        window = Deadline(self.window, f'watching {self.path}')
        while True:
            time.sleep(min(1.0, self.beat_seconds / 4))
            if self._raw() != raw or max(self._claims(), default=0) != top:
                return False
            if window.passed:  # the last read came after the whole window
                return True

    # --- taking it ------------------------------------------------------------------------------

    def _claim(self, generation: int) -> bool:
        """Exclusive: of all newcomers, one creates this generation's claim. A claim whose token could not be
        written is removed again: left empty, it would make the next start watch it for a whole window."""
        path = self.path.parent / f'lock.claim-{generation}'
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            with os.fdopen(fd, 'w') as f:
                f.write(self.token)
                f.flush()
                os.fsync(f.fileno())
        except OSError:
            path.unlink(missing_ok=True)
            raise
        return True

    def acquire(self) -> RunLock:
        """Take the lock (waiting as the class says); a file of the lock that cannot be read or written is one
        ``LockIOError`` line naming it, and a half-taken lock is marked released so the next start is not slowed."""
        try:
            return self._acquire()
        except OSError as e:
            if self.generation:
                self._abandon()
            raise LockIOError(f'cannot take the run lock {self.path}: {e.strerror or e} ({e.filename or self.path}): '
                              'its volume is full, read-only or failing; fix it, then run the same command again') from None

    def _abandon(self) -> None:
        """A claim taken, then a failure: the record published is marked released; with none published, the claim
        goes (nothing was written under its generation), so the next start need not watch it."""
        try:
            published = (self._record(self._raw()) or {}).get('token') == self.token
        except OSError:
            published = True
        if published:
            self.release()
            return
        self._stop.set()
        self._wake.set()
        try:
            (self.path.parent / f'lock.claim-{self.generation}').unlink(missing_ok=True)
        except OSError as e:
            log.warning('cannot remove the run lock claim %d (%s): the next start watches it first', self.generation, e)

    def _acquire(self) -> RunLock:
        waited_since: Optional[float] = None
        logged = 0.0
        while True:
            raw, top, record = self._view()
            fenced = False  # whether the previous holder may be alive: then it is waited out after the claim
            if record is not None and record.get('state') == 'released':
                pass  # the last holder exited cleanly
            elif raw is None and not top:
                pass  # a new run
            elif record is not None and self._same_process_space(record):
                if start_ticks(int(record['pid'])) == record.get('pid_start'):
                    waited_since, logged = self._refuse_or_wait(record, waited_since, logged)
                    continue
                log.warning('taking over the lock of pid %s, which is gone', record.get('pid'))
            else:
                who = (f'{self.path} is held by pid {record.get("pid")} on {record.get("host")}' if record is not None
                       else f'{self.path} has no readable record of its holder (generation {top})')
                if not self._silent(raw, top, who):
                    if record is not None and record.get('state') != 'released':
                        fresh = self._view()[2] or record
                        waited_since, logged = self._refuse_or_wait(fresh, waited_since, logged)
                    continue
                log.warning('%s and did not beat for %.0fs: taking it over', who, self.window)
                fenced = True
            if not self._claim(top + 1):
                continue  # another newcomer won this generation
            if max(self._claims(), default=0) != top + 1:
                # This start stalled while making its claim, and another took a newer one meanwhile (watching an
                # ownerless claim): it is that start's run now; look again before writing anything.
                log.warning('a newer claim than this start\'s (generation %d) appeared while it was made', top + 1)
                continue
            self._hold(top + 1)
            if fenced:
                log.warning('waiting %.0fs before using the run, so that the previous holder, if it is only stalled, '
                            'can no longer commit', self.window)
                time.sleep(self.window)
            if self.lost is not None:
                raise RunLockedError(f'{self.lost} while this start was taking it')
            return self

    def _hold(self, generation: int) -> None:
        self.generation = self.info['generation'] = generation
        self.renewed = time.monotonic()
        atomic_write_text(self.path, json.dumps(self.info), self._tag)
        for older, claim in self._claims().items():
            if older < generation:
                claim.unlink(missing_ok=True)
        for leftover in self.path.parent.glob(f'*{TMP_SUFFIX}'):
            if tag_of(leftover.name) not in (self._tag, WRITER):
                leftover.unlink(missing_ok=True)  # what earlier holders' writes left in this folder
        self._thread = threading.Thread(target=self._beat, name='prefix-run-lock', daemon=True)
        self._thread.start()

    @property
    def _tag(self) -> str:
        return self.token[:12]

    def _refuse_or_wait(self, holder: dict[str, Any], waited_since: Optional[float],
                        logged: float) -> tuple[Optional[float], float]:
        """A live holder: refuse at once, or wait for it (a stopping one, or any in a pod) up to ``wait`` seconds."""
        if not (holder.get('state') == 'stopping' or self.wait_for_live) or self.wait <= 0:
            raise RunLockedError(self._in_use(holder))
        now = time.monotonic()
        waited_since = waited_since or now
        if now - waited_since > self.wait:
            raise RunLockedError(f'{self._in_use(holder)}; waited {self.wait:.0f}s for it to stop')
        if now - logged >= 5:
            what = 'saving after SIGTERM' if holder.get('state') == 'stopping' else 'still running'
            log.warning('run directory %s is held by pid %s on host %s (%s); waiting up to %.0fs more for it '
                        'to stop', self.path.parent.parent, holder.get('pid'), holder.get('host'), what,
                        self.wait - (now - waited_since))
            logged = now
        time.sleep(1.0)
        return waited_since, logged

    def _in_use(self, holder: dict[str, Any]) -> str:
        return (f'run directory {self.path.parent.parent} is in use by pid {holder.get("pid")} on host '
                f'{holder.get("host")} (since {holder.get("since")}); stop that run first, or use another run_name')

    # --- holding it -----------------------------------------------------------------------------

    def _check(self) -> None:
        """Set ``lost`` if a newer claim exists, this generation's claim is not this process's, or ``lock.json`` holds a
        newer generation's record (raises OSError). The record is a second, independent sign: a file's content is
        fresh on open (close-to-open), where a network volume's client may list a folder from its cache."""
        claims = self._claims()
        record = self._record(self._raw()) or {}
        newer = record.get('generation') if isinstance(record.get('generation'), int) else 0
        top = max(max(claims, default=0), newer)
        mine = claims.get(self.generation)
        if top > self.generation or mine is None or self._owner(mine) != self.token:
            self.lost = (f'the run lock {self.path} was taken over (generation {top}) by pid {record.get("pid")} on '
                         f'host {record.get("host")}')
            log.error('%s: this process must publish nothing more', self.lost)

    def beat_now(self) -> None:
        """Renew the lease now (any thread): a stop just asked for is published as ``stopping`` at once, so that a
        restart on this machine waits for the save instead of being refused, and a waiting commit goes on."""
        self._wake.set()

    def _beat(self) -> None:
        while self.lost is None:
            self._wake.wait(self.beat_seconds)
            self._wake.clear()
            if self._stop.is_set():
                return
            started = time.monotonic()
            try:
                self._check()
                if self.lost is not None:
                    return
                self.info['beat'] += 1
                self.info['state'] = 'stopping' if self.stopping() else 'running'
                atomic_write_text(self.path, json.dumps(self.info), self._tag)
            except OSError as e:
                self.problem = describe(e)
                log.warning('cannot renew the run lock %s (%s); trying again at the next beat', self.path, e)
                continue
            with self._renewal:
                self.renewed = started
                self.problem = None
                self._renewal.notify_all()

    def holds(self) -> bool:
        """Whether no other process has taken the lock, read now (a read that fails says nothing: True)."""
        if self.lost is None:
            try:
                self._check()
            except OSError:
                pass
        return self.lost is None

    def current(self) -> bool:
        """Whether the lease is provably this process's now (no I/O: the training thread asks it every step)."""
        return self.lost is None and time.monotonic() < self.renewed + self.window - self.margin

    def wait_current(self, seconds: float) -> bool:
        """Ask for a beat now and wait at most ``seconds`` for a renewal: whether the lease is current (any thread).
        Logs every ``REPORT_S`` seconds while it is not, naming why."""
        self.beat_now()
        with self._renewal:
            self._renewal.wait_for(lambda: self.current() or self.lost is not None, seconds)
        if self.current():
            return True
        now = time.monotonic()
        if now - self._waiting_logged >= REPORT_S:
            log.warning('a commit waits for the run lock to be renewed: %s', self.stall())
            self._waiting_logged = now
        return False

    def stall(self) -> str:
        """Why the lease is not current: how long since the last renewal, and the last error of the beats."""
        since = time.monotonic() - self.renewed
        return (f'the run lock {self.path} has not been renewed for {since:.0f} s '
                f'({self.problem or "its volume does not answer"})')

    def fence(self, give_up: Callable[[], None] = lambda: None) -> None:
        """Before every rename that publishes: wait while the lease is not current; raise LockLostError once lost.
        ``give_up`` is asked between two looks (it raises to stop waiting: the write was abandoned)."""
        try:
            while True:
                try:
                    self._check()  # also while waiting: a holder whose lease lapsed learns of a takeover
                except OSError as e:
                    log.warning('cannot read the run lock %s before a commit (%s); trying again', self.path, e)
                if self.lost is not None:
                    raise LockLostError(self.lost)
                if self.current():
                    return
                self.fencing = True
                give_up()
                self.wait_current(self.beat_seconds / 4)
        finally:
            self.fencing = False

    def release(self) -> None:
        """Mark the lock released (the next start takes it at once); its claim stays, so generations only grow."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(self.beat_seconds)  # a beat stuck in the volume is left to the process's exit
        if self.lost is None and self.generation:
            try:
                self._check()
                if self.lost is None:
                    self.info['state'] = 'released'
                    atomic_write_text(self.path, json.dumps(self.info), self._tag)
            except OSError as e:
                log.warning('cannot mark the run lock %s released (%s): the next start watches it first', self.path, e)
