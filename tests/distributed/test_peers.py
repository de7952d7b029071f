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


def the_line(log: Path) -> str:
    """The one ``prefix: error:`` line a rank printed (waited for: its console copy may lag its exit)."""
    wait_for(lambda: 'prefix: error:' in log.read_text(), what=f'the line in {log.name}')
    lines = [x for x in log.read_text().splitlines() if x.startswith('prefix: error:')]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.slow
@pytest.mark.parametrize('lost', [1, 0])
def test_a_killed_rank_is_named_by_the_survivor_and_the_run_resumes_bit_exact(
        tmp_path: Path, dataset: Path, reference, lost: int) -> None:
    """SIGKILL of one rank's process (rank 0 hosts the rendezvous store): the other prints one line naming it and
    the checkpoint that is intact, no traceback, and exits 1; a restart finishes bit-exact."""
    args = smoke_args(tmp_path, dataset, 'max_duration=48ba', 'checkpoint.interval=4ba', 'dist_timeout=1h')
    run = tmp_path / 'smoke'
    held = tmp_path / 'held'  # the victim at step 10, its peer waiting for it in a collective
    launcher = start(args, tmp_path, {'op': 'step', 'step': 10, 'rank': lost, 'block': True, 'marker': str(held)})
    wait_for(held.exists, launcher, 'the victim at step 10')
    victim = rank_process(launcher, lost)
    survivor = 1 - lost
    victim.send_signal(signal.SIGKILL)
    line = the_line(run / 'logs' / f'rank{survivor}.log')
    assert line.startswith(f'prefix: error: lost rank {lost} (node 0, host ') and \
        line.endswith('is intact; run the same command to resume'), line
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
        line = the_line(run / 'logs' / f'rank{1 - hung}.log')
        what = f'rank {hung} (node 0, host ' if hung else 'rank 0 ('
        assert line.startswith(f'prefix: error: {what}') and 'stopped answering' in line and \
            line.endswith('run the same command to resume'), line
    finally:
        os.killpg(launcher.pid, signal.SIGKILL)
    launcher.wait()
