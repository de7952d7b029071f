"""Every wait ends: its deadline, the line that names what did not answer, and the exit.

A network volume's most common failure is not an error but a hang of the whole mount: a file
operation that never returns. No thread can be interrupted inside one, so prefix never joins a
thread that may be stuck in I/O. Three tools, and no wait is written without one of them:

- ``Deadline``: a wait's end and its name. Every polling loop (a checkpoint's phases, the run lock's
  fence and watch, the ranks' agreement on shared work) asks it whether time is up, and it makes the
  one line that names what did not finish.
- ``bounded``: file work whose result is optional (a last journal record, a released lock, a look
  at the lock during a stop) runs on a daemon thread; after its deadline it is left behind.
- ``Exit``: once a rank is ending (a failure, a stop), its clean-up (the journal's end record,
  closing the loggers, releasing the run lock) gets ``EXIT_S`` seconds. Past that, the process
  prints its line, adding what hung, and exits with ``os._exit``: threads stuck in the kernel are
  left to it, and the cluster restarts the pod instead of waiting on a frozen volume.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Optional

log = logging.getLogger(__name__)

EXIT_S = 60.0  # how long a rank that is ending may take to clean up before it exits without it
BOUNDED_S = 10.0  # how long optional file work (a record, a release) may take before it is left behind


def minutes(seconds: float) -> str:
    """A wait's length as the lines say it: seconds under two minutes, else minutes."""
    return f'{seconds:.0f} s' if seconds < 120 else f'{seconds / 60:.1f} min'


class Deadline:
    """When a wait on ``what`` ends; ``line`` names it once it did not finish in time."""

    def __init__(self, seconds: float, what: str) -> None:
        self.seconds = seconds
        self.what = what
        self.at = time.monotonic() + seconds

    @property
    def passed(self) -> bool:
        return time.monotonic() > self.at

    def left(self) -> float:
        return max(0.0, self.at - time.monotonic())

    def line(self, why: str) -> str:
        """What the error says after the rank and ``what``: how long it has been at it, and ``why`` it may not end."""
        return f'still at it after {minutes(self.seconds)} ({why})'


def bounded(work: Callable[[], object], seconds: float, what: str) -> bool:
    """Run ``work`` on a daemon thread and wait at most ``seconds``: whether it finished. One still running is left
    behind (logged, and named by ``Exit`` should the process end while it runs); its exceptions are logged."""
    done = threading.Event()

    def run() -> None:
        try:
            with Exit.doing(what):
                work()
        except Exception as e:
            log.warning('%s failed: %s', what, e)
        finally:
            done.set()

    threading.Thread(target=run, name='prefix-bounded', daemon=True).start()
    if done.wait(seconds):
        return True
    log.error('%s did not finish in %s: its volume does not answer; going on without it', what, minutes(seconds))
    return False


class Exit:
    """The end of a rank: its clean-up is bounded; the process exits even where a thread is stuck in I/O."""

    _doing: list[str] = []  # clean-up steps running now, on any thread: what a forced exit names
    _lock = threading.Lock()
    _armed: Optional[threading.Event] = None

    @classmethod
    @contextmanager
    def doing(cls, what: str) -> Iterator[None]:
        """Name a step that may hang (``recording the end of this start in meta/starts.jsonl``)."""
        with cls._lock:
            cls._doing.append(what)
        try:
            yield
        finally:
            with cls._lock:
                cls._doing.remove(what)

    @classmethod
    def arm(cls, line: str, code: int, seconds: Optional[float] = None) -> None:
        """From now the process has ``seconds`` (``EXIT_S``) to end; past that it prints ``line`` and what still
        hangs, on stderr (the pod's console first), and exits with ``code``. The first arm counts; it stays armed
        to the end, the interpreter's own exit (its atexit work) included."""
        with cls._lock:
            if cls._armed is not None:
                return
            cls._armed = threading.Event()
        limit = EXIT_S if seconds is None else seconds
        armed = cls._armed

        def watch() -> None:
            if armed.wait(limit):
                return
            with cls._lock:
                hung = ', '.join(cls._doing) or 'its clean-up'
            os.write(2, f'{line}; {hung} did not finish in {minutes(limit)} after that: the run directory\'s volume '
                        'does not answer; exiting without it\n'.encode())
            os._exit(code)

        threading.Thread(target=watch, name='prefix-exit', daemon=True).start()
