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

from prefix.distributed.process import boot_id, pid_namespace, start_ticks
from prefix.run.runlock import LockLostError, RunLock, RunLockedError


def record(**fields) -> str:
    me = RunLock(Path('/nonexistent/lock.json')).info
    return json.dumps({**me, 'token': 'other', 'generation': 1, **fields})


def held(folder: Path, generation: int = 1, **fields) -> None:
    """A holder's files as another process left them: its claim and its record."""
    (folder / f'lock.claim-{generation}').write_text('other')
    (folder / 'lock.json').write_text(record(generation=generation, **fields))


def test_a_live_holder_in_this_pid_namespace_is_refused_at_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    lock = RunLock(tmp_path / 'lock.json').acquire()
    try:
        with pytest.raises(RunLockedError, match=r'in use by pid \d+ on host'):
            RunLock(tmp_path / 'lock.json', window=60).acquire()
        assert 'watching' not in caplog.text, 'decided from the pid, without watching the file'
    finally:
        lock.release()
    assert sorted(p.name for p in tmp_path.iterdir()) == ['lock.claim-1', 'lock.json']
    assert json.loads((tmp_path / 'lock.json').read_text())['state'] == 'released'
    again = RunLock(tmp_path / 'lock.json', window=60).acquire()  # released: taken at once, the next generation
    assert again.generation == 2 and 'watching' not in caplog.text
    again.release()


def test_a_dead_holder_in_this_pid_namespace_is_taken_over_at_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    dead = subprocess.Popen([sys.executable, '-c', 'pass'])
    dead.wait()
    held(tmp_path, pid=dead.pid, pid_start=123)
    (tmp_path / 'lock.json.p1-0ldwr1te.tmp').write_text('{"tok')  # a killed holder's half-written beat
    lock = RunLock(tmp_path / 'lock.json', window=60).acquire()
    assert 'watching' not in caplog.text, 'decided from the pid, without watching the file'
    record_now = json.loads((tmp_path / 'lock.json').read_text())
    assert record_now['token'] == lock.token and record_now['generation'] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ['lock.claim-2', 'lock.json'], 'older claims and leftovers go'
    lock.release()


def test_a_reused_pid_is_not_mistaken_for_the_holder(tmp_path: Path) -> None:
    held(tmp_path, pid=os.getpid(), pid_start=start_ticks(os.getpid()) - 1)
    RunLock(tmp_path / 'lock.json', window=60).acquire().release()


def test_the_same_hostname_elsewhere_is_watched_not_trusted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A container with this hostname but another boot or PID namespace: its pid means nothing here. Nor does an
    identity fact that could not be read, on either side: two empty boot ids are no proof of one machine."""
    for other in ({'boot_id': 'another-boot'}, {'pid_ns': 'pid:[1]'}, {'boot_id': ''}):
        held(tmp_path, pid=os.getpid(), pid_start=start_ticks(os.getpid()), **other)
        started = time.monotonic()
        RunLock(tmp_path / 'lock.json', window=1.0).acquire().release()
        assert time.monotonic() - started >= 2.0, 'silent for the whole window, taken over, then a window of quarantine'
        for claim in tmp_path.glob('lock.claim-*'):
            claim.unlink()
    monkeypatch.setattr('prefix.run.runlock.boot_id', lambda: '')  # /proc unreadable here and there
    held(tmp_path, pid=os.getpid(), pid_start=start_ticks(os.getpid()), boot_id='')
    started = time.monotonic()
    RunLock(tmp_path / 'lock.json', window=1.0).acquire().release()
    assert time.monotonic() - started >= 1.0


@pytest.mark.parametrize(('content', 'claim'), [(b'{"token": "other", "generation": 1}{"tok', b'other'),
                                                (b'', b'other'), (b'\x00\x00garbage', b'other'),
                                                (None, b'\xff\xfe\x00 not a token'), (None, b'')])
def test_an_unreadable_lock_is_an_unknown_holder_watched_then_taken_over(
        tmp_path: Path, content: bytes | None, claim: bytes, caplog: pytest.LogCaptureFixture) -> None:
    """Torn (two writes landed in one file), empty or garbage, a claim of bytes that are no token or of none:
    never a traceback, never a run bricked."""
    (tmp_path / 'lock.claim-1').write_bytes(claim)
    if content is not None:
        (tmp_path / 'lock.json').write_bytes(content)
    lock = RunLock(tmp_path / 'lock.json', window=1.0).acquire()
    assert lock.generation == 2 and 'no readable record of its holder (generation 1)' in caplog.text
    lock.release()


HOLDER = '''
import sys, time
from pathlib import Path
from prefix.run.runlock import RunLock
lock = RunLock(Path(sys.argv[1]), beat_seconds=0.2).acquire()
Path(sys.argv[2]).write_text(str(lock.info['pid']))
while True:
    time.sleep(1)
'''


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which('unshare') is None, reason='needs root and unshare')
def test_a_beating_holder_in_another_pid_namespace_is_not_taken_over(tmp_path: Path) -> None:
    """Its pid (1 or 2 in its namespace) may be any process here; only its beats tell that it is alive."""
    ready = tmp_path / 'ready'
    holder = subprocess.Popen(['unshare', '--pid', '--fork', '--kill-child', '--mount-proc', sys.executable, '-c', HOLDER,
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


def test_a_holder_whose_lock_was_taken_knows_it_and_its_fence_refuses(tmp_path: Path) -> None:
    lock = RunLock(tmp_path / 'lock.json', beat_seconds=0.05).acquire()
    lock.fence()
    held(tmp_path, generation=2, pid=1, host='other-pod')
    with pytest.raises(LockLostError, match=r'taken over \(generation 2\) by pid 1 on host other-pod'):
        lock.fence()
    wait_for(lambda: lock.lost is not None)
    lock.release()
    assert json.loads((tmp_path / 'lock.json').read_text())['host'] == 'other-pod', 'the new holder keeps it'


def test_a_newer_holders_record_alone_tells_the_holder_it_lost(tmp_path: Path) -> None:
    """On a network volume a folder listing can come from the client's cache; a file's content is fresh on open."""
    lock = RunLock(tmp_path / 'lock.json', beat_seconds=3600).acquire()
    (tmp_path / 'lock.json').write_text(record(generation=2, pid=7, host='other-pod'))
    with pytest.raises(LockLostError, match=r'taken over \(generation 2\) by pid 7 on host other-pod'):
        lock.fence()
    lock.release()


def test_of_two_newcomers_racing_for_a_dead_holders_lock_exactly_one_wins(tmp_path: Path) -> None:
    for round_ in range(20):
        folder = tmp_path / str(round_)
        folder.mkdir()
        held(folder, pid=os.getpid(), pid_start=-1)  # dead: another start time
        start = threading.Barrier(2)
        won: list[RunLock] = []
        refused: list[Exception] = []

        def newcomer(start: threading.Barrier, path: Path, won: list, refused: list) -> None:
            start.wait()
            try:
                won.append(RunLock(path, beat_seconds=0.4).acquire())
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
    claims = RunLock._claims

    def flaky(self: RunLock):
        error = next(failures, None)
        if error is not None:
            raise error
        return claims(self)

    monkeypatch.setattr(RunLock, '_claims', flaky)
    beat = json.loads((tmp_path / 'lock.json').read_text())['beat']
    wait_for(lambda: json.loads((tmp_path / 'lock.json').read_text())['beat'] > beat + 2)
    assert lock.lost is None
    lock.fence()
    lock.release()


def elsewhere(lock: RunLock) -> RunLock:
    """``lock`` as if in another pod: the holder's pid means nothing to it, it watches the beats."""
    lock.info['pid_ns'] = 'pid:[4026599999]'
    return lock


def test_a_stalled_beat_stops_the_commits_before_a_newcomer_takes_over_and_its_late_write_changes_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The volume holds the holder's beat (after its check, before its write lands) for longer than the window."""
    import prefix.run.runlock as runlock

    path = tmp_path / 'lock.json'
    timing = {'beat_seconds': 0.1, 'window': 1.0, 'margin': 0.4}
    old = RunLock(path, **timing).acquire()
    frozen, thawed, stalled = threading.Event(), threading.Event(), threading.Event()
    write = runlock.atomic_write_text

    def stalling(target: Path, text: str, tag: str) -> None:
        if tag == old._tag and frozen.is_set():
            stalled.set()
            thawed.wait()
        write(target, text, tag)

    monkeypatch.setattr(runlock, 'atomic_write_text', stalling)
    frozen.set()
    wait_for(stalled.is_set)
    wait_for(lambda: not old.current())  # WINDOW - MARGIN after the last renewal began
    lost: list[BaseException] = []
    fence = threading.Thread(target=lambda: lost.append(pytest.raises(LockLostError, old.fence).value))
    fence.start()  # a commit of the old holder, from now on
    taken: list[tuple[RunLock, bool]] = []
    newcomer = threading.Thread(target=lambda: taken.append((elsewhere(RunLock(path, **timing)).acquire(), old.current())))
    newcomer.start()
    fence.join()
    assert 'taken over (generation 2)' in str(lost[0]), 'the commit waited, then learned the lock is gone'
    newcomer.join()
    new, old_current_when_new_returned = taken[0]
    assert not old_current_when_new_returned

    thawed.set()  # the stalled beat lands now, over the new holder's record
    wait_for(lambda: old.lost is not None)
    with pytest.raises(LockLostError):
        old.fence()
    new.fence()  # the claims decide, not whichever record landed last
    with pytest.raises(RunLockedError, match=r'in use by pid \d+'):
        elsewhere(RunLock(path, **{**timing, 'window': 10.0})).acquire()  # watches, sees the new holder beat
    old.release()
    new.release()
    assert json.loads(path.read_text())['token'] == new.token and sorted(p.name for p in tmp_path.iterdir()) == [
        'lock.claim-2', 'lock.json']


def test_the_holder_keeps_beating_and_marks_itself_stopping(tmp_path: Path) -> None:
    stopping = threading.Event()
    lock = RunLock(tmp_path / 'lock.json', beat_seconds=0.05, stopping=stopping.is_set).acquire()
    wait_for(lambda: json.loads((tmp_path / 'lock.json').read_text())['beat'] >= 2)
    stopping.set()
    wait_for(lambda: json.loads((tmp_path / 'lock.json').read_text())['state'] == 'stopping')
    lock.release()


def test_a_claimer_that_stalled_while_a_newer_claim_was_taken_does_not_hold(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Between creating its claim and writing its token, this start stalls; meanwhile another start watched the
    ownerless claim, took the next generation and holds the run. This one must write nothing and see that holder."""
    import prefix.run.runlock as runlock

    real_fsync = runlock.os.fsync

    def stall_then_go_on(fd: int) -> None:
        if not (tmp_path / 'lock.claim-2').exists():  # what happened while this start was stalled
            held(tmp_path, generation=2, pid=os.getpid(), pid_start=start_ticks(os.getpid()))
        real_fsync(fd)

    monkeypatch.setattr(runlock.os, 'fsync', stall_then_go_on)
    before = (tmp_path / 'lock.json').read_text() if (tmp_path / 'lock.json').exists() else None
    with pytest.raises(RunLockedError, match=r'in use by pid'):
        RunLock(tmp_path / 'lock.json').acquire()
    assert before is None and json.loads((tmp_path / 'lock.json').read_text())['token'] == 'other', 'nothing written'
    assert (tmp_path / 'lock.claim-2').read_text() == 'other'


def test_a_stop_is_published_at_once_not_at_the_next_beat(tmp_path: Path) -> None:
    stopping = threading.Event()
    lock = RunLock(tmp_path / 'lock.json', beat_seconds=3600, stopping=stopping.is_set).acquire()
    stopping.set()
    lock.beat_now()  # what a stop signal's watcher does: the next beat is an hour away
    wait_for(lambda: json.loads((tmp_path / 'lock.json').read_text())['state'] == 'stopping')
    lock.release()


@pytest.mark.parametrize('failing', ['the claim', 'the record'])
def test_a_lock_that_cannot_be_written_is_one_line_and_slows_no_later_start(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str) -> None:
    """A full (or read-only, or failing) meta/: the claim's token or the first record cannot be written."""
    import errno

    import prefix.run.runlock as runlock
    from prefix.run.runlock import LockIOError

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, 'No space left on device', str(tmp_path / 'lock.json'))

    if failing == 'the claim':
        real_fsync = os.fsync
        monkeypatch.setattr(runlock.os, 'fsync', full)
    else:
        monkeypatch.setattr(runlock, 'atomic_write_text', full)
    with pytest.raises(LockIOError, match=r'^cannot take the run lock .*lock.json: No space left on device \(.*\): '
                                          r'its volume is full, read-only or failing; fix it, then run the same'):
        RunLock(tmp_path / 'lock.json').acquire()
    monkeypatch.undo()
    if failing == 'the claim':
        assert os.fsync is real_fsync
        assert not list(tmp_path.iterdir()), 'the claim without its token is gone'
    later = RunLock(tmp_path / 'lock.json', window=3600).acquire()  # would watch an hour if the failure slowed it
    later.release()


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
def test_a_restart_right_after_sigterm_waits_for_the_old_process_to_save_then_resumes_from_its_checkpoint(
        tmp_path: Path, dataset: Path, reference) -> None:
    from conftest import assert_same_training, faults, run_env, smoke_args, starts, train_cmd

    args = smoke_args(tmp_path, dataset, 'max_duration=16ba', 'checkpoint.periodic_interval=null')
    run = tmp_path / 'smoke'
    held, saving = tmp_path / 'held', tmp_path / 'saving'
    go_on, finish_saving = tmp_path / 'go-on', tmp_path / 'finish-saving'
    old = subprocess.Popen(train_cmd(*args), cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, env=run_env(**faults(
                               # No periodic beat in this test's time: "stopping" can only come from the stop itself.
                               {'op': 'set', 'target': 'prefix.run.runlock:BEAT_S', 'value': 3600},
                               {'op': 'step', 'step': 7, 'marker': str(held), 'block': True, 'release': str(go_on)},
                               # the final save's write of latest.pt (the second) hangs until released
                               {'op': 'fsync', 'path': 'latest.pt.*.tmp', 'skip': 1, 'marker': str(saving), 'block': True,
                                'release': str(finish_saving)})))
    wait_for(held.exists, old, 'step 7')
    old.send_signal(signal.SIGTERM)
    wait_for(lambda: json.loads((run / 'meta' / 'lock.json').read_text())['state'] == 'stopping', old)
    go_on.touch()
    wait_for(saving.exists, old, 'the old process saves')

    # Not in a pod: a live holder would be refused at once, a stopping one is waited for.
    console = tmp_path / 'replacement.log'
    with console.open('w') as out:
        replacement = subprocess.Popen(train_cmd(*args), cwd=REPO, env=run_env(), stdout=out, stderr=subprocess.STDOUT)
    wait_for(lambda: 'saving after SIGTERM); waiting up to' in console.read_text(), replacement, 'the replacement waits')
    assert old.poll() is None
    finish_saving.touch()  # the old process finishes its save and exits
    assert old.wait(timeout=180) == 143
    assert replacement.wait(timeout=300) == 0, console.read_text()[-3000:]
    assert [s['start_step'] for s in starts(run)] == [0, 7]
    assert_same_training(reference(0, 'max_duration=16ba'), run)


POD = 'mount -t tmpfs -o size=256m tmpfs /dev/shm && exec "$@"'
# The production lease (4 s beats, 13 s window, 4 s margin) scaled down, as the fault injector sets it.
SHORT_LEASE = [{'op': 'set', 'target': 'prefix.run.runlock:BEAT_S', 'value': 0.5},
               {'op': 'set', 'target': 'prefix.run.runlock:WINDOW_S', 'value': 3.0},
               {'op': 'set', 'target': 'prefix.run.runlock:MARGIN_S', 'value': 1.0}]


def stall(where: str, moment: Path, stalled: Path, thaw: Path) -> list[dict]:
    """From ``moment`` on, the old holder's volume holds the beat's write of lock.json, and ``where`` also."""
    held = {'marker': str(stalled), 'block': True, 'release': str(thaw)}
    beat = {'op': 'replace', 'path': 'lock.json', 'block': True, 'release': str(thaw)}
    if where == 'beat':  # only the beat: the holder trains on (a slow step: past its lease), its commits must wait
        return [{**beat, 'after': str(moment), 'marker': str(stalled)}, {'op': 'step', 'step': 8, 'sleep': 3.0}]
    if where == 'rename':  # between the fence and the rename of latest.pt
        return [{'op': 'replace', 'path': 'latest.pt', 'after': str(moment), **held}, {**beat, 'after': str(stalled)}]
    # in the middle of writing latest.pt's temporary file
    return [{'op': 'fsync', 'path': 'latest.pt.*.tmp', 'after': str(moment), **held}, {**beat, 'after': str(stalled)}]


def pod(args: list[str], tmp: Path, name: str, rules: list[dict], nproc: int = 0) -> subprocess.Popen:
    """A trainer in a pod of its own: its PID namespace, its /dev/shm and temporary folder; the run folder shared."""
    from conftest import faults, run_env, train_cmd

    (tmp / f'{name}-tmp').mkdir()
    console = (tmp / f'{name}.log').open('w')
    return subprocess.Popen(['unshare', '--pid', '--fork', '--kill-child', '--mount-proc', 'sh', '-c', POD, name,
                             *train_cmd(*args, nproc=nproc)], cwd=REPO, start_new_session=True, stdout=console,
                            stderr=subprocess.STDOUT,
                            env=run_env(TMPDIR=str(tmp / f'{name}-tmp'), **faults(*SHORT_LEASE, *rules)))


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which('unshare') is None, reason='needs root and unshare')
@pytest.mark.parametrize('where', ['beat', 'rename', 'temp-write'])
def test_a_holder_stalled_past_the_window_is_fenced_and_its_successor_resumes_bit_exact(
        tmp_path: Path, dataset: Path, reference, where: str) -> None:
    """The old holder's volume freezes past the window at step 6; a newcomer in another pod takes the run over,
    resumes from the old holder's last commit and finishes it; then the old holder thaws. Nothing it does after
    the takeover is published, and nothing of it is left."""
    import torch
    from conftest import assert_same_training, smoke_args

    args = smoke_args(tmp_path, dataset, 'max_duration=16ba', 'checkpoint.interval=2ba', 'checkpoint.periodic_interval=null')
    run = tmp_path / 'smoke'
    at6, stalled, thaw, events = tmp_path / 'at6', tmp_path / 'stalled', tmp_path / 'thaw', tmp_path / 'events'
    old = pod(args, tmp_path, 'old', [{'op': 'replace', 'path': 'latest.pt', 'marker': str(events)},  # as it begins
                                      {'op': 'step', 'step': 6, 'marker': str(at6)}, *stall(where, at6, stalled, thaw)])
    try:
        waiting = 'a commit waits for the run lock'  # the beat stalled: its lease ran out, its commit waits
        wait_for(lambda: stalled.exists() and (where != 'beat' or waiting in (tmp_path / 'old.log').read_text()),
                 old, 'the old holder stalls')
        new = pod(args, tmp_path, 'new', [{'op': 'call', 'target': 'prefix.run.runlock:RunLock._claim', 'when': 'after',
                                           'marker': str(events)}])
        assert new.wait(timeout=300) == 0, (tmp_path / 'new.log').read_text()[-3000:]
        # Stalled in a write, the old holder is alive all along; with only its beat stalled, its commit's fence sees
        # the takeover and it exits (never joining the stuck beat).
        assert where == 'beat' or old.poll() is None, 'the old holder is alive, stalled, all along'
    finally:
        thaw.touch()
    assert old.wait(timeout=120) == 1, (tmp_path / 'old.log').read_text()[-3000:]
    error = [line for line in (tmp_path / 'old.log').read_text().splitlines() if line.startswith('prefix: error: ')][-1]
    assert 'taken over (generation 2)' in error and 'without publishing anything more' in error, error

    lines = events.read_text().splitlines()
    claim = next(i for i, line in enumerate(lines) if not line.split(' ', 1)[1])
    assert all(not line.split(' ', 1)[1] for line in lines[claim:]), f'the old holder renamed latest.pt after the claim: {lines}'
    latest = torch.load(run / 'checkpoints' / 'latest.pt', weights_only=True, mmap=True)
    rank0 = torch.load(run / 'checkpoints' / 'latest_rank0.pt', weights_only=True)
    assert (latest['generation'], latest['global_step']) == (2, 16) and rank0['generations'][16] == 2

    assert sorted(p.name for p in (run / 'checkpoints').iterdir()) == ['latest.pt', 'latest_rank0.pt'], \
        'the newcomer removed what the old holder had written; the thawed holder wrote nothing more'
    assert not [p.name for p in (run / 'meta').iterdir() if p.name.endswith('.tmp')]
    assert_same_training(reference(0, 'max_duration=16ba'), run)


# Where the old rank 1 stalls: renaming its rank file into place (phase 2), or making the temporary of its periodic
# copy (which, made after the takeover and renamed without a fence, once replaced the successor's periodic_rank1.pt).
RANK1_STALLS = {'rename': ({'op': 'replace', 'path': 'latest_rank1.pt'}, 'checkpoint.periodic_interval=null'),
                'periodic link': ({'op': 'link', 'path': 'periodic_rank1.pt.*.tmp'}, 'checkpoint.periodic_interval=6ba')}


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which('unshare') is None, reason='needs root and unshare')
@pytest.mark.parametrize('where', list(RANK1_STALLS))
def test_a_takeover_that_a_rank_other_than_0_meets_first_is_named_as_a_takeover_on_every_rank(
        tmp_path: Path, dataset: Path, reference, where: str) -> None:
    """A 2-rank holder's volume freezes at step 6 for its beat and for one file operation of rank 1; a newcomer
    takes the run over, removes the old temporaries and finishes it. When the old rank 1 thaws, nothing it does is
    published (a rename of a removed temporary fails): every old rank then says the run was taken over, not that a
    disk failed, and leaves nothing behind."""
    import torch
    from conftest import assert_same_training, error_line, smoke_args

    stall_rule, periodic = RANK1_STALLS[where]
    args = smoke_args(tmp_path, dataset, 'max_duration=16ba', 'checkpoint.interval=2ba', periodic, 'dist_timeout=1h')
    run = tmp_path / 'smoke'
    at6, stalled, thaw = tmp_path / 'at6', tmp_path / 'stalled', tmp_path / 'thaw'
    old = pod(args, tmp_path, 'old', [
        {'op': 'step', 'step': 6, 'marker': str(at6)},
        {'op': 'replace', 'path': 'lock.json', 'after': str(at6), 'block': True, 'release': str(thaw)},
        {**stall_rule, 'rank': 1, 'after': str(at6), 'block': True, 'release': str(thaw), 'marker': str(stalled)}], nproc=2)
    try:
        wait_for(stalled.exists, old, "the old rank 1's rename stalls")
        new = pod(args, tmp_path, 'new', [], nproc=2)
        assert new.wait(timeout=300) == 0, (tmp_path / 'new.log').read_text()[-3000:]
        assert old.poll() is None, 'the old holder is alive, stalled, all along'
    finally:
        thaw.touch()
    assert old.wait(timeout=120) == 1, (tmp_path / 'old.log').read_text()[-3000:]
    lines = {error_line(tmp_path / 'old.log'), error_line(run / 'logs' / 'rank1.log')}
    assert len(lines) == 1, lines
    line = lines.pop()
    assert line.startswith('prefix: error: the run lock ') and 'was taken over (generation 2)' in line and \
        line.endswith('that start continues the run from the newest checkpoint; this one stopped without publishing '
                      'anything more'), line
    assert not [p.name for p in (run / 'checkpoints').iterdir() if p.name.endswith('.tmp')]
    for kind in ('latest', 'periodic') if 'periodic' in where else ('latest',):
        step = torch.load(run / 'checkpoints' / f'{kind}.pt', weights_only=True, mmap=True)['global_step']
        generations = torch.load(run / 'checkpoints' / f'{kind}_rank1.pt', weights_only=True)['generations']
        assert (max(generations), generations[max(generations)]) == (step, 2), f'{kind}_rank1.pt: the successor\'s'
    assert_same_training(reference(2, 'max_duration=16ba'), run)
