"""A rank lost without warning is named once by the survivors, within seconds, whatever ``dist_timeout`` is."""

import os
import signal
import subprocess
from pathlib import Path

import psutil
import pytest
from conftest import (
    HANG,
    REPO,
    assert_same_training,
    committed_step,
    faults,
    group_gone,
    run_env,
    run_train,
    smoke_args,
    train_cmd,
    wait_for,
)

FAST = [{'op': 'set', 'target': 'prefix.distributed.peers:SILENT_S', 'value': 3.0}]


def start(args: list[str], tmp_path: Path, *rules: dict, nproc: int = 2) -> subprocess.Popen:
    return subprocess.Popen(train_cmd(*args, nproc=nproc), env=run_env(**faults(*FAST, *rules)), cwd=REPO,
                            start_new_session=True, stdout=(tmp_path / 'console').open('w'), stderr=subprocess.STDOUT)


def rank_process(launcher: subprocess.Popen, rank: int) -> psutil.Process:
    return next(p for p in psutil.Process(launcher.pid).children() if p.environ().get('RANK') == str(rank))


def gone(launcher: subprocess.Popen) -> bool:
    """The launcher has exited (and is reaped: a zombie would keep its group alive) and its whole group with it."""
    if launcher.poll() is None:
        return False
    try:
        os.killpg(launcher.pid, 0)
    except ProcessLookupError:
        return True
    return False


def the_line(log: Path, launcher: subprocess.Popen) -> str:
    """The one ``prefix: error:`` line a rank printed (waited for: its console copy may lag its exit, so until the
    launcher's whole process group, the copies included, is gone)."""
    wait_for(lambda: 'prefix: error:' in log.read_text() or gone(launcher), what=f'the line in {log.name}')
    lines = [x for x in log.read_text().splitlines() if x.startswith('prefix: error:')]
    assert len(lines) == 1, lines
    return lines[0]


def test_the_lost_are_the_ranks_whose_count_stopped_and_rank_0_says_what_it_saves(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Three watchers on a real rendezvous store, in this process: one stops counting (its process died); the
    others, after their collectives failed, name it and only it; what rank 0 tells, rank 1 hears."""
    from datetime import timedelta

    import torch.distributed as tdist

    from prefix.distributed.peers import PeerWatch

    store = tdist.TCPStore('127.0.0.1', 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=10))
    monkeypatch.setenv('MASTER_ADDR', '127.0.0.1')
    monkeypatch.setenv('MASTER_PORT', str(store.port))
    watches = [PeerWatch(r, 3) for r in range(3)]
    for w in watches:
        w.beat_s = 0.05
        w.start()
    try:
        wait_for(lambda: all(w._rounds > 3 and len(w._seen) == 2 for w in watches), what='a few rounds')
        watches[2]._ended.set()  # its count stops where it is, unmarked: as a SIGKILL leaves it
        assert watches[0].lost() == [2] and watches[1].lost() == [2]
        watches[0].tell('rank 0 saves step 10, the last it completed')
        assert watches[1].heard() == 'rank 0 saves step 10, the last it completed'
    finally:
        for w in watches[:2]:
            w.done()


@pytest.mark.slow
def test_a_killed_rank_0_is_named_and_rank_1_saves_for_the_next_start_to_adopt(
        tmp_path: Path, dataset: Path, reference) -> None:
    """SIGKILL of rank 0's process after step 10 (it hosts the rendezvous store, holds the run lock and alone writes
    latest.pt): rank 1 prints one line naming it, no traceback, and exits 1, having saved step 10 as rescue.pt and
    rescue_rank{r}.pt, never latest.pt; the restart adopts it and finishes bit-exact."""
    args = smoke_args(tmp_path, dataset, 'max_duration=24ba', 'checkpoint.interval=4ba', 'dist_timeout=1h',
                      'checkpoint.async_write=false')  # step 8 is committed on every rank before step 10
    run = tmp_path / 'smoke'
    held = tmp_path / 'held'  # the victim after step 10, its peer waiting for it in a collective of step 11
    launcher = start(args, tmp_path, {'op': 'step', 'step': 10, 'rank': 0, 'block': True, 'marker': str(held)})
    wait_for(held.exists, launcher, 'rank 0 after step 10')
    rank_process(launcher, 0).send_signal(signal.SIGKILL)
    line = the_line(run / 'logs' / 'rank1.log', launcher)
    assert line.startswith('prefix: error: lost rank 0 (node 0, host ') and line.endswith(
        '; rank 1 saved step 10, the last it completed, for the next start to adopt; run the same command to '
        'resume'), line
    assert launcher.wait(timeout=HANG) != 0 and group_gone(launcher.pid, timeout=HANG)
    assert 'Traceback' not in (run / 'logs' / 'rank1.log').read_text()
    assert committed_step(run) == 8, 'nobody writes latest.pt in place of rank 0'
    assert {p.name for p in (run / 'checkpoints').glob('rescue*')} == {'rescue.pt', 'rescue_rank0.pt',
                                                                       'rescue_rank1.pt'}
    result = run_train(*args, nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'adopted the checkpoint of step 10 that rank 1 saved' in (run / 'logs' / 'rank0.log').read_text()
    assert not list((run / 'checkpoints').glob('rescue*'))
    assert_same_training(reference(2, 'max_duration=24ba'), run)


@pytest.mark.slow
@pytest.mark.parametrize('hung', [1, 0])
def test_a_hung_rank_is_named_within_seconds_not_after_dist_timeout(tmp_path: Path, dataset: Path, hung: int) -> None:
    """SIGSTOP of one rank's process (a frozen node), with ``dist_timeout=1h``: the other rank, waiting for it in a
    collective, prints one line naming it after ``SILENT_S`` (3 s here) and exits 1."""
    args = smoke_args(tmp_path, dataset, 'max_duration=100000ba', 'checkpoint.interval=4ba', 'dist_timeout=1h')
    run = tmp_path / 'smoke'
    launcher = start(args, tmp_path)
    try:
        wait_for(lambda: (committed_step(run) or 0) >= 8, launcher, 'a checkpoint at step 8')
        victim, survivor = rank_process(launcher, hung), rank_process(launcher, 1 - hung)
        victim.send_signal(signal.SIGSTOP)
        survivor.wait(timeout=HANG)
        line = the_line(run / 'logs' / f'rank{1 - hung}.log', launcher)
        what = f'rank {hung} (node 0, host ' if hung else 'rank 0 ('
        assert line.startswith(f'prefix: error: {what}') and 'stopped answering' in line and \
            line.endswith('run the same command to resume'), line
    finally:
        os.killpg(launcher.pid, signal.SIGKILL)
    launcher.wait()


# Where the lost rank (the last) is held when it is SIGKILLed, the others waiting for it in a collective, what rank 0
# then saves, and the world: the write of step 8 is still in flight then, so the newest committed checkpoint is 4.
MID_STEP = {
    # before its backward of step 11: the others wait in DDP's gradient all-reduce, their optimizers untouched
    'before the gradients are reduced': ('before_backward', 10, 3),
    # after its backward: rank 0 has applied step 11's update and waits in the loss's all-reduce; half-way. (With 3
    # ranks, ranks 0 and 1 then wait in a collective on each other, which fails only when the watcher ends them.)
    'after the optimizer step': ('after_train_batch', 4, 2),
}
WORLD = {2: ('max_duration=24ba',), 3: ('max_duration=24ba', 'global_batch_size=12')}  # 3 ranks of 4 samples


@pytest.mark.slow
@pytest.mark.parametrize('moment', list(MID_STEP))
def test_a_rank_lost_mid_step_and_mid_write_costs_one_partial_step_and_the_run_ends_bit_exact(
        tmp_path: Path, dataset: Path, reference, moment: str) -> None:
    """The last rank dies in the middle of step 11 while rank 0's write of step 8 is held in flight (checkpoints
    every 4 steps): rank 0 abandons that write and saves step 10, the last it completed, with a rank file for the
    lost rank too (then rank 1's line says so, as rank 0 told it, and a restart with the full world finishes
    bit-exact), or keeps step 4 when its state was half-way."""
    import torch

    event, saved, nproc = MID_STEP[moment]
    lost = nproc - 1
    args = smoke_args(tmp_path, dataset, *WORLD[nproc], 'checkpoint.interval=4ba', 'dist_timeout=1h',
                      'checkpoint.async_write=true')
    run, held, writing, release = (tmp_path / x for x in ('smoke', 'held', 'writing', 'release'))
    launcher = start(args, tmp_path, {'op': 'step', 'step': 10, 'event': event, 'rank': lost, 'block': True,
                                      'marker': str(held)},
                     {'op': 'fsync', 'path': 'latest.pt.*.tmp', 'rank': 0, 'skip': 1, 'times': 1, 'block': True,
                      'release': str(release), 'marker': str(writing)}, nproc=nproc)
    wait_for(lambda: held.exists() and writing.exists(), launcher, f'rank {lost} at {event} of step 11, step 8 '
                                                                    'in flight')
    rank_process(launcher, lost).send_signal(signal.SIGKILL)
    release.touch()
    told = [f'rank 0 saved step {saved}, the last it completed', f'rank 0 saves step {saved}, the last it completed'] \
        if saved == 10 else [f'the checkpoint of step {saved} is intact']
    for survivor, where in zip(range(lost), told, strict=True):
        line = the_line(run / 'logs' / f'rank{survivor}.log', launcher)
        assert line.startswith(f'prefix: error: lost rank {lost} (node 0, host ') and ' at step 10: ' in line and \
            line.endswith(f'; {where}; run the same command to resume'), (survivor, line)
    assert launcher.wait(timeout=HANG) != 0 and group_gone(launcher.pid, timeout=HANG)
    assert committed_step(run) == saved
    rank_file = torch.load(run / 'checkpoints' / f'latest_rank{lost}.pt', weights_only=True)
    assert (rank_file['rank'], rank_file['global_step']) == (lost, saved)
    if saved == 10:
        result = run_train(*args, nproc=nproc)
        assert result.returncode == 0, result.stderr[-3000:]
        assert_same_training(reference(nproc, *WORLD[nproc]), run)


@pytest.mark.slow
def test_a_rank_lost_under_fsdp_keeps_the_last_checkpoint_and_says_why(tmp_path: Path, dataset: Path) -> None:
    """FSDP: rank 1 dies before its backward of step 11; rank 0 does not hold its shards, so it saves nothing and
    its one line says so and names the checkpoint of step 8, which stays as it was."""
    args = smoke_args(tmp_path, dataset, 'fsdp={}', 'max_duration=24ba', 'checkpoint.interval=4ba',
                      'dist_timeout=1h', 'checkpoint.async_write=false')
    run, held = tmp_path / 'smoke', tmp_path / 'held'
    launcher = start(args, tmp_path, {'op': 'step', 'step': 10, 'event': 'before_backward', 'rank': 1,
                                      'block': True, 'marker': str(held)})
    wait_for(held.exists, launcher, 'rank 1 at before_backward of step 11')
    before = sorted((p.name, p.stat().st_mtime_ns) for p in (run / 'checkpoints').rglob('*'))
    rank_process(launcher, 1).send_signal(signal.SIGKILL)
    line = the_line(run / 'logs' / 'rank0.log', launcher)
    assert line.startswith('prefix: error: lost rank 1 (node 0, host ') and line.endswith(
        '; the survivors do not hold the shards of rank 1 (FSDP): the checkpoint of step 8 is intact; run the same '
        'command to resume'), line
    assert launcher.wait(timeout=HANG) != 0 and group_gone(launcher.pid, timeout=HANG)
    assert sorted((p.name, p.stat().st_mtime_ns) for p in (run / 'checkpoints').rglob('*')) == before
