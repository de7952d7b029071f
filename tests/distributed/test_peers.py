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


def start(args: list[str], tmp_path: Path, *rules: dict) -> subprocess.Popen:
    return subprocess.Popen(train_cmd(*args, nproc=2), env=run_env(**faults(*FAST, *rules)), cwd=REPO,
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


@pytest.mark.slow
def test_a_killed_rank_0_is_named_by_the_survivor_and_the_run_resumes_bit_exact(
        tmp_path: Path, dataset: Path, reference) -> None:
    """SIGKILL of rank 0's process (it hosts the rendezvous store and holds the run lock): rank 1 prints one line
    naming it and the checkpoint that is intact, no traceback, and exits 1; a restart finishes bit-exact. (Rank 1
    lost, rank 0 saves: the next test.)"""
    lost = 0
    args = smoke_args(tmp_path, dataset, 'max_duration=48ba', 'checkpoint.interval=4ba', 'dist_timeout=1h',
                      'checkpoint.async_write=false')  # step 8 is committed on every rank before step 10
    run = tmp_path / 'smoke'
    held = tmp_path / 'held'  # the victim at step 10, its peer waiting for it in a collective
    launcher = start(args, tmp_path, {'op': 'step', 'step': 10, 'rank': lost, 'block': True, 'marker': str(held)})
    wait_for(held.exists, launcher, 'the victim at step 10')
    victim = rank_process(launcher, lost)
    survivor = 1 - lost
    victim.send_signal(signal.SIGKILL)
    line = the_line(run / 'logs' / f'rank{survivor}.log', launcher)
    assert line.startswith('prefix: error: lost rank 0 (node 0, host ') and \
        line.endswith('; the checkpoint of step 8 is intact; run the same command to resume'), line
    assert committed_step(run) == 8, 'nobody writes in place of rank 0'
    assert launcher.wait(timeout=HANG) != 0 and group_gone(launcher.pid, timeout=HANG)
    assert 'Traceback' not in (run / 'logs' / f'rank{survivor}.log').read_text()
    result = run_train(*args, nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_training(reference(2, 'max_duration=48ba'), run)


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


# Where the lost rank is held when it is SIGKILLed (rank 0 waits for it in a collective), and what rank 0 then saves.
MID_STEP = {
    # before its backward of step 11: rank 0 waits in DDP's gradient all-reduce, its optimizer untouched
    'before the gradients are reduced': ('before_backward', 10),
    # after its backward: rank 0 has applied step 11's update and waits in the loss's all-reduce; half-way, not saved
    'after the optimizer step': ('after_train_batch', 8),
}


@pytest.mark.slow
@pytest.mark.parametrize('moment', list(MID_STEP))
def test_a_rank_lost_mid_step_costs_one_partial_step_and_the_run_ends_bit_exact(
        tmp_path: Path, dataset: Path, reference, moment: str) -> None:
    """Rank 1 dies in the middle of step 11 (checkpoints every 4 steps): rank 0 saves step 10, the last it completed,
    with a rank file for rank 1 too, or keeps step 8 when its state was half-way; a restart finishes bit-exact."""
    import torch

    event, saved = MID_STEP[moment]
    args = smoke_args(tmp_path, dataset, 'max_duration=48ba', 'checkpoint.interval=4ba', 'dist_timeout=1h',
                      'checkpoint.async_write=false')  # step 8 is committed on every rank before step 10
    run, held = tmp_path / 'smoke', tmp_path / 'held'
    launcher = start(args, tmp_path, {'op': 'step', 'step': 10, 'event': event, 'rank': 1, 'block': True,
                                      'marker': str(held)})
    wait_for(held.exists, launcher, f'rank 1 at {event} of step 11')
    rank_process(launcher, 1).send_signal(signal.SIGKILL)
    line = the_line(run / 'logs' / 'rank0.log', launcher)
    where = 'rank 0 saved step 10, the last it completed' if saved == 10 else 'the checkpoint of step 8 is intact'
    assert line.startswith('prefix: error: lost rank 1 (node 0, host ') and ' at step 10: ' in line and \
        line.endswith(f'; {where}; run the same command to resume'), line
    assert launcher.wait(timeout=HANG) != 0 and group_gone(launcher.pid, timeout=HANG)
    assert committed_step(run) == saved
    rank1 = torch.load(run / 'checkpoints' / 'latest_rank1.pt', weights_only=True)
    assert (rank1['rank'], rank1['global_step']) == (1, saved)
    result = run_train(*args, nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_training(reference(2, 'max_duration=48ba'), run)
