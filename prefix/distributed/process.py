"""Facts about a process read from ``/proc``: when it started, on which boot, in which PID namespace."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

CLOCK_TICKS = os.sysconf('SC_CLK_TCK')


def start_ticks(pid: int) -> Optional[int]:
    """The process's start time in clock ticks since boot (a reused pid has another), or None if it is gone."""
    try:
        return int(Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def started_at(pid: Optional[int] = None) -> float:
    """When the process started, as a ``time.time()`` timestamp (this process by default).

    Measured against the boot clock now, to the kernel's tick: ``psutil``'s ``create_time`` adds the
    start ticks to the boot time of ``/proc/stat``, which is truncated to whole seconds, so it can
    put a process start up to a second early (before the previous process's last records).
    """
    ticks = start_ticks(os.getpid() if pid is None else pid)
    if ticks is None:
        raise ProcessLookupError(pid)
    return time.time() - (time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / CLOCK_TICKS)


def boot_id() -> str:
    """This machine's boot, told apart from another machine's or a reboot's (a hostname is neither)."""
    try:
        return Path('/proc/sys/kernel/random/boot_id').read_text().strip()
    except OSError:
        return ''


def pid_namespace() -> str:
    """This process's PID namespace: two containers on one host each have theirs, so a pid means nothing across them."""
    try:
        return os.readlink('/proc/self/ns/pid')
    except OSError:
        return ''
