"""One live writer per run directory, on a local disk or a network volume shared by several pods.

The holder (global rank 0) records itself in ``meta/lock.json`` and rewrites it with a fresh beat
counter every few seconds. A newcomer that finds the file decides whether its holder is alive without
trusting clocks across machines:

- the same boot of the same machine and the same PID namespace: the holder's pid, with its start
  time (a reused pid is another process), is alive or not, at once;
- anywhere else (another pod, another container on the host, a reboot): it watches the file for
  ``window`` seconds; a live holder beats in that time, a dead one does not.

Taking over is decided by an exclusive create of ``lock.claim-<generation>``: of two newcomers that
found the same dead holder, exactly one creates the next generation's claim. The generation is a
fencing token: the holder re-reads the file before every commit (``verify``) and on every beat, and
a holder that finds another's token there has lost the lock and must stop (``lost``).

A holder asked to stop (SIGTERM) marks the lock ``stopping`` while it saves. A newcomer waits for a
stopping holder, and for a live one too when a cluster started it (``wait_for_live``: a replacement
pod can start while the old one is still in its grace period), up to ``wait`` seconds, logging every
few seconds; then it takes over a lock that stopped beating, or fails naming the holder.

Files are re-opened on every read, so NFS close-to-open consistency shows the newest content; a
read that fails is tried again before anything is concluded from it.
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

from prefix.atomic import atomic_write_text
from prefix.errors import PrefixError
from prefix.process import boot_id, pid_namespace, start_ticks

log = logging.getLogger(__name__)

CLAIM = re.compile(r'^lock\.claim-(\d+)$')
READ_TRIES = 3


class RunLockedError(PrefixError):
    """Another live process is training this run."""


class LockLostError(RuntimeError):
    """This process held the run's lock and another has taken it: it must write nothing more."""


class RunLock:
    def __init__(self, path: Path, beat_seconds: float = 4.0, window: float = 13.0, wait: float = 0.0,
                 wait_for_live: bool = False, stopping: Callable[[], bool] = lambda: False) -> None:
        self.path = path
        self.beat_seconds = beat_seconds
        self.window = window
        self.wait = wait
        self.wait_for_live = wait_for_live
        self.stopping = stopping
        self.token = uuid.uuid4().hex
        self.info: dict[str, Any] = {
            'token': self.token, 'generation': 0, 'host': socket.gethostname(), 'boot_id': boot_id(),
            'pid_ns': pid_namespace(), 'pid': os.getpid(), 'pid_start': start_ticks(os.getpid()),
            'since': time.strftime('%Y-%m-%dT%H:%M:%S%z'), 'beat': 0, 'state': 'running',
        }
        self.lost: Optional[str] = None  # why this process no longer holds the lock
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # --- reading --------------------------------------------------------------------------------

    def _read_once(self) -> Optional[dict[str, Any]]:
        try:
            with open(self.path) as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None

    def _read(self) -> Optional[dict[str, Any]]:
        """The holder's record (None: no lock); a failed read or a torn record is tried again, then raised."""
        for attempt in range(READ_TRIES):
            try:
                record = self._read_once()
                if record is None or isinstance(record, dict):
                    return record
                raise ValueError(f'{self.path} does not hold a record')
            except (OSError, ValueError) as e:
                if attempt == READ_TRIES - 1:
                    raise
                log.warning('reading %s failed (%s); trying again', self.path, e)
                time.sleep(0.2 * (attempt + 1))
        raise AssertionError('unreachable')

    def _holder_alive(self, holder: dict[str, Any]) -> bool:
        """Certain on the holder's own boot and PID namespace; elsewhere the file must go quiet for ``window`` seconds."""
        if holder.get('boot_id') == self.info['boot_id'] and holder.get('pid_ns') == self.info['pid_ns'] \
                and holder.get('pid'):
            return start_ticks(int(holder['pid'])) == holder.get('pid_start')
        deadline = time.monotonic() + self.window
        log.warning('%s is held by pid %s on %s; watching it for up to %.0fs to see whether that process is alive',
                    self.path, holder.get('pid'), holder.get('host'), self.window)
        while time.monotonic() < deadline:
            time.sleep(min(1.0, self.beat_seconds / 4))
            try:
                if self._read() != holder:
                    return True
            except (OSError, ValueError):
                return True  # being rewritten: someone is there
        return False

    # --- taking it ------------------------------------------------------------------------------

    def _claims(self) -> dict[int, Path]:
        return {int(m.group(1)): p for p in self.path.parent.iterdir() if (m := CLAIM.match(p.name))}

    def _claim(self, generation: int) -> bool:
        """Exclusive: of all newcomers, one creates this generation's claim."""
        try:
            fd = os.open(self.path.parent / f'lock.claim-{generation}', os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, 'w') as f:
            f.write(self.token)
            f.flush()
            os.fsync(f.fileno())
        return True

    def acquire(self) -> RunLock:
        waited_since: Optional[float] = None
        logged = 0.0
        pending_since: Optional[float] = None  # a newer claim seen without its lock.json yet
        while True:
            holder = self._read()
            current = int(holder.get('generation', 0)) if holder else 0
            newer = {g: p for g, p in self._claims().items() if g > current}
            if newer:  # another newcomer is taking it: it writes lock.json next, unless it died in between
                pending_since = pending_since or time.monotonic()
                if time.monotonic() - pending_since > self.window:
                    for claim in newer.values():
                        claim.unlink(missing_ok=True)
                    pending_since = None
                time.sleep(0.2)
                continue
            pending_since = None
            if holder and self._holder_alive(holder):
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
                continue
            if holder:
                log.warning('taking over the lock of pid %s on %s, which is gone', holder.get('pid'), holder.get('host'))
            if not self._claim(current + 1):
                continue  # another newcomer won this generation
            self.info['generation'] = current + 1
            atomic_write_text(self.path, json.dumps(self.info))
            for generation, claim in self._claims().items():
                if generation <= current:
                    claim.unlink(missing_ok=True)
            self._thread = threading.Thread(target=self._beat, name='prefix-run-lock', daemon=True)
            self._thread.start()
            return self

    def _claim_path(self, generation: int) -> Path:
        return self.path.parent / f'lock.claim-{generation}'

    def _in_use(self, holder: dict[str, Any]) -> str:
        return (f'run directory {self.path.parent.parent} is in use by pid {holder.get("pid")} on host '
                f'{holder.get("host")} (since {holder.get("since")}); stop that run first, or use another run_name')

    # --- holding it -----------------------------------------------------------------------------

    def _beat(self) -> None:
        while not self._stop.wait(self.beat_seconds):
            try:
                holder = self._read()
            except (OSError, ValueError) as e:
                log.warning('cannot read %s (%s); trying again at the next beat', self.path, e)
                continue
            if not holder or holder.get('token') != self.token:
                self.lost = (f'the run lock {self.path} was taken over by pid {(holder or {}).get("pid")} on host '
                             f'{(holder or {}).get("host")}')
                log.error('%s: this process must write nothing more', self.lost)
                return
            self.info['beat'] += 1
            self.info['state'] = 'stopping' if self.stopping() else 'running'
            try:
                atomic_write_text(self.path, json.dumps(self.info))
            except OSError as e:
                log.warning('cannot refresh %s: %s', self.path, e)

    def verify(self) -> None:
        """Raise LockLostError unless the lock is still this process's (called before every commit)."""
        if self.lost is None:
            holder = self._read()
            if not holder or holder.get('token') != self.token:
                self.lost = (f'the run lock {self.path} was taken over by pid {(holder or {}).get("pid")} on host '
                             f'{(holder or {}).get("host")}')
        if self.lost is not None:
            raise LockLostError(self.lost)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.lost is None:
            holder = self._read_once()
            if holder and holder.get('token') == self.token:
                self.path.unlink(missing_ok=True)
                self._claim_path(self.info['generation']).unlink(missing_ok=True)
