"""The run lock: who holds it, who may take it, and a holder that lost it knowing so."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import REPO, wait_for

from prefix.process import boot_id, pid_namespace, start_ticks
from prefix.runlock import LockLostError, RunLock, RunLockedError


def record(**fields) -> str:
    me = RunLock(Path('/nonexistent/lock.json')).info
    return json.dumps({**me, 'token': 'other', 'generation': 1, **fields})


def test_a_live_holder_in_this_pid_namespace_is_refused_at_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    lock = RunLock(tmp_path / 'lock.json').acquire()
    try:
        with pytest.raises(RunLockedError, match=r'in use by pid \d+ on host'):
            RunLock(tmp_path / 'lock.json', window=60).acquire()
        assert 'watching' not in caplog.text, 'decided from the pid, without watching the file'
    finally:
        lock.release()
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    RunLock(tmp_path / 'lock.json').acquire().release()


def test_a_dead_holder_in_this_pid_namespace_is_taken_over_at_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    dead = subprocess.Popen([sys.executable, '-c', 'pass'])
    dead.wait()
    (tmp_path / 'lock.json').write_text(record(pid=dead.pid, pid_start=123))
    (tmp_path / 'lock.claim-1').write_text('other')
    lock = RunLock(tmp_path / 'lock.json', window=60).acquire()
    assert 'watching' not in caplog.text, 'decided from the pid, without watching the file'
    held = json.loads((tmp_path / 'lock.json').read_text())
    assert held['token'] == lock.token and held['generation'] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ['lock.claim-2', 'lock.json'], 'older claims are removed'
    lock.release()


def test_a_reused_pid_is_not_mistaken_for_the_holder(tmp_path: Path) -> None:
    (tmp_path / 'lock.json').write_text(record(pid=os.getpid(), pid_start=start_ticks(os.getpid()) - 1))
    RunLock(tmp_path / 'lock.json', window=60).acquire().release()


def test_the_same_hostname_elsewhere_is_watched_not_trusted(tmp_path: Path) -> None:
    """A container with this hostname but another boot or PID namespace: its pid means nothing here."""
    for other in ({'boot_id': 'another-boot'}, {'pid_ns': 'pid:[1]'}):
        (tmp_path / 'lock.json').write_text(record(pid=os.getpid(), pid_start=start_ticks(os.getpid()), **other))
        started = time.monotonic()
        RunLock(tmp_path / 'lock.json', window=1.0).acquire().release()
        assert time.monotonic() - started >= 1.0, 'silent for the whole window, then taken over'


HOLDER = '''
import sys, time
from pathlib import Path
from prefix.runlock import RunLock
lock = RunLock(Path(sys.argv[1]), beat_seconds=0.2).acquire()
Path(sys.argv[2]).write_text(str(lock.info['pid']))
while True:
    time.sleep(1)
'''


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which('unshare') is None, reason='needs root and unshare')
def test_a_beating_holder_in_another_pid_namespace_is_not_taken_over(tmp_path: Path) -> None:
    """Its pid (1 or 2 in its namespace) may be any process here; only its beats tell that it is alive."""
    ready = tmp_path / 'ready'
    holder = subprocess.Popen(['unshare', '--pid', '--fork', '--mount-proc', sys.executable, '-c', HOLDER,
                               str(tmp_path / 'lock.json'), str(ready)], cwd=REPO, env={**os.environ, 'PYTHONPATH': str(REPO)})
    try:
        wait_for(ready.exists, holder, 'the holder takes the lock')
        theirs = json.loads((tmp_path / 'lock.json').read_text())
        assert theirs['pid_ns'] != pid_namespace() and theirs['boot_id'] == boot_id() and int(ready.read_text()) < 10
        with pytest.raises(RunLockedError, match='in use by pid'):
            RunLock(tmp_path / 'lock.json', window=3600).acquire()  # returns as soon as it sees a beat
    finally:
        holder.kill()
        holder.wait()


def test_a_holder_whose_lock_was_taken_knows_it_and_verify_refuses(tmp_path: Path) -> None:
    lock = RunLock(tmp_path / 'lock.json', beat_seconds=0.05).acquire()
    lock.verify()
    (tmp_path / 'lock.json').write_text(record(generation=2, pid=1, host='other-pod'))
    with pytest.raises(LockLostError, match='taken over by pid 1 on host other-pod'):
        lock.verify()
    wait_for(lambda: lock.lost is not None)
    lock.release()
    assert json.loads((tmp_path / 'lock.json').read_text())['host'] == 'other-pod', 'the new holder keeps it'


def test_of_two_newcomers_racing_for_a_dead_holders_lock_exactly_one_wins(tmp_path: Path) -> None:
    for round_ in range(20):
        folder = tmp_path / str(round_)
        folder.mkdir()
        (folder / 'lock.json').write_text(record(pid=os.getpid(), pid_start=-1))  # dead: another start time
        start = threading.Barrier(2)
        won: list[RunLock] = []
        refused: list[Exception] = []

        def newcomer(start: threading.Barrier, path: Path, won: list, refused: list) -> None:
            start.wait()
            try:
                won.append(RunLock(path, beat_seconds=60).acquire())
            except RunLockedError as e:
                refused.append(e)

        threads = [threading.Thread(target=newcomer, args=(start, folder / 'lock.json', won, refused)) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(won) == 1 and len(refused) == 1, f'round {round_}: {len(won)} holders'
        assert json.loads((folder / 'lock.json').read_text())['token'] == won[0].token
        won[0].release()


def test_a_transient_read_error_does_not_lose_the_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lock = RunLock(tmp_path / 'lock.json', beat_seconds=0.05).acquire()
    failures = iter([OSError(116, 'Stale file handle')] * 2)
    read_once = RunLock._read_once

    def flaky(self: RunLock):
        error = next(failures, None)
        if error is not None:
            raise error
        return read_once(self)

    monkeypatch.setattr(RunLock, '_read_once', flaky)
    lock.verify()
    beat = json.loads((tmp_path / 'lock.json').read_text())['beat']
    wait_for(lambda: json.loads((tmp_path / 'lock.json').read_text())['beat'] > beat + 2)
    assert lock.lost is None
    lock.release()


def test_the_holder_keeps_beating_and_marks_itself_stopping(tmp_path: Path) -> None:
    stopping = threading.Event()
    lock = RunLock(tmp_path / 'lock.json', beat_seconds=0.05, stopping=stopping.is_set).acquire()
    wait_for(lambda: json.loads((tmp_path / 'lock.json').read_text())['beat'] >= 2)
    stopping.set()
    wait_for(lambda: json.loads((tmp_path / 'lock.json').read_text())['state'] == 'stopping')
    lock.release()


def test_a_newcomer_waits_for_a_stopping_holder_then_takes_the_lock(tmp_path: Path) -> None:
    stopping = threading.Event()
    holder = RunLock(tmp_path / 'lock.json', beat_seconds=0.05, stopping=stopping.is_set).acquire()
    stopping.set()
    wait_for(lambda: json.loads((tmp_path / 'lock.json').read_text())['state'] == 'stopping')
    taken: list[RunLock] = []
    newcomer = threading.Thread(target=lambda: taken.append(RunLock(tmp_path / 'lock.json', wait=3600).acquire()))
    newcomer.start()
    holder.release()  # the old process has saved and exits
    newcomer.join()
    assert json.loads((tmp_path / 'lock.json').read_text())['token'] == taken[0].token
    taken[0].release()
    other = RunLock(tmp_path / 'lock.json').acquire()
    try:
        with pytest.raises(RunLockedError, match=r'in use by pid \d+'):  # running, not stopping: refused at once
            RunLock(tmp_path / 'lock.json', wait=3600).acquire()
        with pytest.raises(RunLockedError, match='waited 1s for it to stop'):  # a replacement pod waits for it too
            RunLock(tmp_path / 'lock.json', wait=1, wait_for_live=True).acquire()
    finally:
        other.release()


@pytest.mark.slow
def test_a_training_run_that_lost_its_lock_commits_nothing_more(tmp_path: Path, dataset: Path) -> None:
    from conftest import committed_step, faults, run_env, smoke_args, train_cmd

    args = smoke_args(tmp_path, dataset, 'max_duration=30ba', 'checkpoint.interval=2ba', 'checkpoint.periodic_interval=null')
    run = tmp_path / 'smoke'
    held, release = tmp_path / 'held', tmp_path / 'release'
    proc = subprocess.Popen(train_cmd(*args), cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL,
                            env=run_env(**faults({'op': 'step', 'step': 5, 'marker': str(held), 'block': True,
                                                  'release': str(release)})))
    wait_for(lambda: held.exists() and committed_step(run) == 4, proc, 'step 5')
    (run / 'meta' / 'lock.json').write_text(record(generation=9, pid=4242, host='new-pod'))  # another start took it
    release.touch()
    assert proc.wait(timeout=180) == 1
    error = [line for line in (run / 'logs' / 'rank0.log').read_text().splitlines() if line.startswith('prefix: error')][-1]
    assert 'rank 0 failed' in error and 'taken over by pid 4242 on host new-pod' in error, error
    assert 'the checkpoint of step 4 is intact' in error and committed_step(run) == 4
    assert json.loads((run / 'meta' / 'lock.json').read_text())['host'] == 'new-pod', 'the new holder keeps its lock'


@pytest.mark.slow
def test_a_replacement_waits_for_the_old_process_to_save_then_resumes_from_its_checkpoint(
        tmp_path: Path, dataset: Path, reference) -> None:
    from conftest import assert_same_training, faults, run_env, smoke_args, starts, train_cmd

    args = smoke_args(tmp_path, dataset, 'max_duration=16ba', 'checkpoint.periodic_interval=null')
    run = tmp_path / 'smoke'
    held, saving = tmp_path / 'held', tmp_path / 'saving'
    go_on, finish_saving = tmp_path / 'go-on', tmp_path / 'finish-saving'
    old = subprocess.Popen(train_cmd(*args), cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, env=run_env(**faults(
                               {'op': 'step', 'step': 7, 'marker': str(held), 'block': True, 'release': str(go_on)},
                               # the final save's write of latest.pt (the second) hangs until released
                               {'op': 'fsync', 'path': 'latest.pt.tmp', 'skip': 1, 'marker': str(saving), 'block': True,
                                'release': str(finish_saving)})))
    wait_for(held.exists, old, 'step 7')
    old.send_signal(signal.SIGTERM)
    wait_for(lambda: 'SIGTERM received' in (run / 'logs' / 'rank0.log').read_text(), old)
    go_on.touch()
    wait_for(saving.exists, old, 'the old process saves')
    wait_for(lambda: json.loads((run / 'meta' / 'lock.json').read_text())['state'] == 'stopping', old)

    console = tmp_path / 'replacement.log'
    with console.open('w') as out:
        replacement = subprocess.Popen(train_cmd(*args), cwd=REPO, env=run_env(PREFIX_POD='pod-2'),
                                       stdout=out, stderr=subprocess.STDOUT)
    wait_for(lambda: 'saving after SIGTERM); waiting up to' in console.read_text(), replacement, 'the replacement waits')
    assert old.poll() is None
    finish_saving.touch()  # the old process finishes its save and exits
    assert old.wait(timeout=180) == 143
    assert replacement.wait(timeout=300) == 0, console.read_text()[-3000:]
    assert [s['start_step'] for s in starts(run)] == [0, 7]
    assert_same_training(reference(0, 'max_duration=16ba'), run)
