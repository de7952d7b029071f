"""When a process started, from the kernel's boot clock: never before the moment it was spawned."""

import os
import subprocess
import sys
import time

import pytest

from prefix.distributed.process import CLOCK_TICKS, start_ticks, started_at


def test_a_child_started_after_a_moment_is_never_placed_before_it() -> None:
    before = time.time()
    child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
    try:
        # psutil's create_time can be up to a second early here (it adds ticks to a boot time cut to whole seconds)
        assert started_at(child.pid) >= before - 1 / CLOCK_TICKS
        assert started_at(child.pid) <= time.time()
    finally:
        child.kill()
        child.wait()


def test_a_gone_process_has_no_start() -> None:
    child = subprocess.Popen([sys.executable, '-c', 'pass'])
    child.wait()
    assert start_ticks(child.pid) is None
    with pytest.raises(ProcessLookupError):
        started_at(child.pid)
    assert start_ticks(os.getpid()) is not None
