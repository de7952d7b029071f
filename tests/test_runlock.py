import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from prefix.runlock import RunLock, RunLockedError, _start_time


def test_a_live_holder_on_this_host_is_refused_at_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    lock = RunLock(tmp_path / 'lock.json').acquire()
    try:
        with pytest.raises(RunLockedError, match=r'in use by pid \d+ on host'):
            RunLock(tmp_path / 'lock.json', window=60).acquire()
        assert 'watching' not in caplog.text, 'decided from the pid, without watching the file'
    finally:
        lock.release()
    assert not (tmp_path / 'lock.json').exists()
    RunLock(tmp_path / 'lock.json').acquire().release()


def test_a_dead_holder_on_this_host_is_taken_over_at_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    dead = subprocess.Popen([sys.executable, '-c', 'pass'])
    dead.wait()
    (tmp_path / 'lock.json').write_text(json.dumps({
        'token': 'old', 'host': RunLock(tmp_path / 'x').info['host'], 'pid': dead.pid, 'pid_start': '123', 'beat': 7}))
    lock = RunLock(tmp_path / 'lock.json', window=60).acquire()
    assert 'watching' not in caplog.text, 'decided from the pid, without watching the file'
    assert json.loads((tmp_path / 'lock.json').read_text())['token'] == lock.token
    lock.release()


def test_a_reused_pid_is_not_mistaken_for_the_holder(tmp_path: Path) -> None:
    import os

    me = RunLock(tmp_path / 'x').info
    (tmp_path / 'lock.json').write_text(json.dumps({'token': 'old', 'host': me['host'], 'pid': os.getpid(),
                                                    'pid_start': str(int(_start_time(os.getpid())) - 1)}))
    RunLock(tmp_path / 'lock.json').acquire().release()


def test_a_silent_holder_on_another_host_is_taken_over_after_the_window(tmp_path: Path) -> None:
    (tmp_path / 'lock.json').write_text(json.dumps({'token': 'old', 'host': 'other-pod', 'pid': 1, 'beat': 3}))
    started = time.monotonic()
    lock = RunLock(tmp_path / 'lock.json', window=1.0).acquire()
    assert time.monotonic() - started >= 1.0, 'a holder elsewhere is given the whole window to beat'
    lock.release()


def test_a_beating_holder_on_another_host_is_refused(tmp_path: Path) -> None:
    path = tmp_path / 'lock.json'
    path.write_text(json.dumps({'token': 'other', 'host': 'other-pod', 'pid': 1, 'beat': 0}))
    stop = threading.Event()

    def beat() -> None:
        n = 0
        while not stop.wait(0.2):
            n += 1
            path.write_text(json.dumps({'token': 'other', 'host': 'other-pod', 'pid': 1, 'beat': n}))

    thread = threading.Thread(target=beat)
    thread.start()
    try:
        with pytest.raises(RunLockedError, match='in use by pid 1 on host other-pod'):
            RunLock(path, window=3600).acquire()  # returns as soon as it sees a beat
    finally:
        stop.set()
        thread.join()


def test_the_holder_keeps_beating(tmp_path: Path) -> None:
    lock = RunLock(tmp_path / 'lock.json', beat_seconds=0.1).acquire()
    while json.loads((tmp_path / 'lock.json').read_text())['beat'] < 2:
        time.sleep(0.05)
    lock.release()
