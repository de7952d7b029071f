"""One live writer per run directory, on a local disk or a network volume shared by several pods.

The holder (global rank 0) creates ``meta/lock.json`` with ``O_EXCL`` and rewrites it with a
fresh beat counter every few seconds. A newcomer that finds the file decides whether its holder
is alive without trusting clocks across machines:

- same host, and the holder's pid is gone (or is another process, by its start time): dead;
- otherwise it watches the file for ``window`` seconds: a live holder beats in that time, a
  dead one (a pod that was killed) does not, and the stale lock is taken over.

Files are re-opened on every read, so NFS close-to-open consistency shows the newest content.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Optional

from prefix.atomic import atomic_write_text
from prefix.process import start_ticks

log = logging.getLogger(__name__)

LOCK_FILE = 'lock.json'


class RunLockedError(RuntimeError):
    """Another live process is training this run."""


def _start_time(pid: int) -> Optional[str]:
    ticks = start_ticks(pid)
    return None if ticks is None else str(ticks)


class RunLock:
    def __init__(self, path: Path, beat_seconds: float = 4.0, window: float = 13.0) -> None:
        self.path = path
        self.beat_seconds = beat_seconds
        self.window = window
        self.token = uuid.uuid4().hex
        self.info: dict[str, Any] = {
            'token': self.token, 'host': socket.gethostname(), 'pid': os.getpid(),
            'pid_start': _start_time(os.getpid()), 'since': time.strftime('%Y-%m-%dT%H:%M:%S%z'), 'beat': 0,
        }
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _read(self) -> Optional[dict[str, Any]]:
        try:
            with open(self.path) as f:
                return json.loads(f.read() or '{}')
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError):
            return {}

    def _holder_dead(self, holder: dict[str, Any]) -> bool:
        """Certain only on the holder's own host; elsewhere the file must go quiet for ``window`` seconds."""
        if holder.get('host') == self.info['host'] and holder.get('pid'):
            return _start_time(int(holder['pid'])) != holder.get('pid_start')
        deadline = time.monotonic() + self.window
        log.warning('%s is held by pid %s on %s; watching it for up to %.0fs to see whether that process is alive',
                    self.path, holder.get('pid'), holder.get('host'), self.window)
        while time.monotonic() < deadline:
            time.sleep(min(1.0, self.beat_seconds / 4))
            if self._read() != holder:
                return False
        return True

    def acquire(self) -> RunLock:
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read()
                if holder is None:
                    continue
                if not self._holder_dead(holder):
                    raise RunLockedError(
                        f'run directory {self.path.parent.parent} is in use by pid {holder.get("pid")} on host '
                        f'{holder.get("host")} (since {holder.get("since")}); stop that run first, or use another run_name',
                    ) from None
                if self._read() == holder:  # still the same dead holder: move its lock aside
                    log.warning('taking over the lock of dead pid %s on %s', holder.get('pid'), holder.get('host'))
                    try:
                        os.replace(self.path, self.path.with_name(f'{LOCK_FILE}.stale-{self.token}'))
                        os.unlink(self.path.with_name(f'{LOCK_FILE}.stale-{self.token}'))
                    except FileNotFoundError:
                        pass
                continue
            with os.fdopen(fd, 'w') as f:
                f.write(json.dumps(self.info))
                f.flush()
                os.fsync(f.fileno())
            self._thread = threading.Thread(target=self._beat, name='prefix-run-lock', daemon=True)
            self._thread.start()
            return self
        raise RunLockedError(f'could not take {self.path}: other processes keep taking it; is the run started twice?')

    def _beat(self) -> None:
        while not self._stop.wait(self.beat_seconds):
            holder = self._read()
            if not holder or holder.get('token') != self.token:
                log.error('lost %s to pid %s on %s: two processes may now write this run',
                          self.path, (holder or {}).get('pid'), (holder or {}).get('host'))
                return
            self.info['beat'] += 1
            try:
                atomic_write_text(self.path, json.dumps(self.info))
            except OSError as e:
                log.warning('cannot refresh %s: %s', self.path, e)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        holder = self._read()
        if holder and holder.get('token') == self.token:
            self.path.unlink(missing_ok=True)
