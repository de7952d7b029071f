"""What the ranks decide together: slow work never waits inside a collective, a failure on one rank stops all.

The end-to-end tests run 2 ranks on gloo with the fault injector: a disk slower than the collective
timeout, and failures on one rank only. A run that waited in a collective would fail on the short
``dist_timeout``; a run that hung would be stopped by the test's hang detector.
"""

from __future__ import annotations

import signal
import subprocess
import threading
from pathlib import Path

import pytest
import torch
from conftest import (
    HANG,
    REPO,
    assert_same_training,
    committed_step,
    error_line,
    faults,
    group_gone,
    run_env,
    run_train,
    signal_ranks,
    smoke_args,
    train_cmd,
    wait_for,
)

from prefix.distributed.agreement import Outcome, RankFailedError, RankFailures, from_rank_zero, together
from prefix.distributed.preemption import PREEMPTED_EXIT_CODE


def test_together_gives_every_outcome_and_from_rank_zero_raises_its_error() -> None:
    assert [o.value for o in together(lambda: 7)] == [7] and together(None)[0].value is None
    with pytest.raises(KeyError):
        from_rank_zero(lambda: {}['missing'])
    assert Outcome(error=OSError(5, 'Input/output error')).error.errno == 5


def test_rank_failures_keep_the_first_and_stop_with_one_line() -> None:
    failures = RankFailures()
    with failures.guard('writing x'):
        raise OSError(28, 'No space left on device', '/runs/a/x')
    with failures.guard('writing y'):
        raise ValueError('later')
    with pytest.raises(RankFailedError, match=r'^rank 0 failed writing x: No space left on device \(/runs/a/x\); '
                                              r'the checkpoint of step 5 is intact$'):
        failures.stop('the checkpoint of step 5 is intact')


def start(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    """Two ranks through the ``composer`` launcher; each rank's output is in its ``logs/rank{r}.log``."""
    return subprocess.Popen(train_cmd(*args, nproc=2), env=run_env(**env), cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


# Each fault fails on one rank only, at a chosen checkpoint, in the start that resumes from the one before
# (checkpoints every 5 steps, periodic every 20); ``intact`` is the step the message must name. (A failed rank
# file of rank 1: tests/checkpoint/test_checkpointer.py.)
ONE_RANK_FAILURES = {
    'snapshot of rank 0': ({'op': 'call', 'target': 'prefix.checkpoint.snapshot:HostSnapshot.copy', 'rank': 0,
                            'error': 'MemoryError', 'skip': 1},
                           'rank 0 failed taking the checkpoint of step 10: MemoryError: injected MemoryError', 5),
    'periodic link of rank 0': ({'op': 'link', 'path': 'periodic.pt.*.tmp', 'rank': 0, 'error': 'ENOSPC'},
                                'rank 0 failed writing the checkpoint of step 20: No space left on device', 15),
}


@pytest.mark.slow
def test_a_failure_on_one_rank_stops_every_rank_and_the_run_resumes_bit_exact(
        tmp_path: Path, dataset: Path, reference) -> None:
    """Two failures, the second in the start that resumes from the first (so it also cleans up after a failed
    one), then a start that completes the run as if nothing had happened."""
    args = smoke_args(tmp_path, dataset, 'max_duration=24ba', 'dist_timeout=1h')  # a hang would not time out
    run = tmp_path / 'smoke'
    for name, (rule, message, intact) in ONE_RANK_FAILURES.items():
        proc = start(args, faults(rule))
        assert proc.wait(timeout=HANG) != 0 and group_gone(proc.pid, timeout=HANG), name
        for rank in (0, 1):
            error = error_line(run / 'logs' / f'rank{rank}.log')
            assert error.startswith(f'prefix: error: {message}'), (name, error)
            assert error.endswith(f'the checkpoint of step {intact} is intact. Fix the cause, then run the same command '
                                  'again to resume'), (name, error)
        assert torch.load(run / 'checkpoints' / 'latest.pt', weights_only=True)['global_step'] == intact, name
        assert committed_step(run) == intact, name

    resumed = run_train(*args, nproc=2)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert_same_training(reference(2, 'max_duration=24ba'), run)


@pytest.mark.slow
def test_a_failed_start_record_on_rank_0_stops_every_rank_before_any_checkpoint(
        tmp_path: Path, dataset: Path, reference) -> None:
    args = smoke_args(tmp_path, dataset, 'max_duration=24ba', 'dist_timeout=1h', 'checkpoint.interval=1h',
                      'checkpoint.periodic_interval=null')
    run = tmp_path / 'smoke'
    held, release = tmp_path / 'held', tmp_path / 'release'
    proc = start(args, faults({'op': 'step', 'step': 8, 'marker': str(held), 'block': True, 'release': str(release)}))
    wait_for(lambda: held.exists() and len(held.read_text().splitlines()) == 2, proc, 'step 8')
    signal_ranks(proc, signal.SIGTERM)
    wait_for(lambda: all('SIGTERM received' in (run / 'logs' / f'rank{r}.log').read_text() for r in (0, 1)), proc)
    release.touch()
    # Signalled at the end of step 8: the ranks agree on it while step 9 computes, and save step 9.
    assert proc.wait(timeout=HANG) != 0 and committed_step(run) == 9

    failing = start(args, faults({'op': 'open', 'path': 'starts.jsonl', 'rank': 0, 'error': 'ENOSPC'}))
    assert failing.wait(timeout=HANG) != 0
    error = error_line(run / 'logs' / 'rank1.log')
    assert error.startswith('prefix: error: rank 0 failed recording this start in ') and 'No space left' in error
    assert 'the checkpoint of step 9 is intact' in error and committed_step(run) == 9

    resumed = run_train(*args, nproc=2)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert_same_training(reference(2, 'max_duration=24ba'), run)


@pytest.mark.slow
@pytest.mark.parametrize('async_write', ['true', 'false'])
def test_checkpoints_slower_than_the_collective_timeout(tmp_path: Path, dataset: Path, reference, async_write: str) -> None:
    """Every write of latest.pt and the resume's read of it take longer than ``dist_timeout``: a periodic
    checkpoint, one on SIGTERM, then (asynchronous writes; the resume is the same either way) the resume and the
    final checkpoint. The run completes and matches bit for bit."""
    slow = [{'op': 'fsync', 'path': 'latest.pt.*.tmp', 'rank': 0, 'sleep': 14},
            {'op': 'open', 'mode': 'read', 'path': 'latest.pt', 'rank': 0, 'sleep': 14, 'times': 1}]
    args = smoke_args(tmp_path, dataset, 'max_duration=16ba', 'dist_timeout=10s', 'checkpoint.interval=8ba',
                      'checkpoint.periodic_interval=8ba', f'checkpoint.async_write={async_write}')
    run = tmp_path / 'smoke'
    held, release = tmp_path / 'held', tmp_path / 'release'
    hold = {'op': 'step', 'step': 12, 'marker': str(held), 'block': True, 'release': str(release)}
    proc = start(args, faults(*slow, hold))
    wait_for(lambda: held.exists() and len(held.read_text().splitlines()) == 2, proc, 'step 12')
    signal_ranks(proc, signal.SIGTERM)
    wait_for(lambda: all('SIGTERM received' in (run / 'logs' / f'rank{r}.log').read_text() for r in (0, 1)), proc)
    release.touch()
    assert proc.wait(timeout=HANG) == PREEMPTED_EXIT_CODE
    # Signalled at the end of step 12. With the write of step 8 still in flight (async) the ranks agree at
    # that step's end and save step 12; with none, they agree while step 13 computes and save step 13.
    assert committed_step(run) == (12 if async_write == 'true' else 13)
    assert 'Timed out' not in (run / 'logs' / 'rank1.log').read_text()
    if async_write == 'false':
        return
    resumed = subprocess.run(train_cmd(*args, nproc=2), env=run_env(**faults(*slow)), cwd=REPO, capture_output=True,
                             text=True, timeout=HANG)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert 'Timed out' not in (run / 'logs' / 'rank1.log').read_text()
    assert_same_training(reference(2, 'max_duration=16ba'), run)
    assert sorted(p.name for p in (run / 'checkpoints').iterdir()) == [
        'latest.pt', 'latest_rank0.pt', 'latest_rank1.pt', 'periodic.pt', 'periodic_rank0.pt', 'periodic_rank1.pt']


def test_work_past_its_deadline_stops_with_one_line_naming_the_rank() -> None:
    never = threading.Event()  # the work waits for it, as a read from a hung volume does
    with pytest.raises(RankFailedError, match=r'^rank 0 failed reading x: still at it after 0 s '
                                              r'\(checkpoint.write_timeout\): its volume is hung or too slow'):
        together(never.wait, deadline_s=0.2, doing='reading x')
    assert together(lambda: 7, deadline_s=0.2, doing='reading y')[0].value == 7


@pytest.mark.slow
def test_a_resume_read_hung_on_one_rank_stops_every_rank_at_its_deadline(tmp_path: Path, dataset: Path) -> None:
    """Rank 1's read of its shards never returns: rank 0, which waits for it inside DCP's collective, is not
    the one named; every rank exits 1 with the same line, and nothing of the checkpoint changes."""
    args = smoke_args(tmp_path, dataset, 'fsdp={}', 'dist_timeout=1h', 'checkpoint.write_timeout=6s')
    run = tmp_path / 'smoke'
    assert run_train(*args, 'max_duration=8ba', nproc=2).returncode == 0
    before = sorted((p.name, p.stat().st_mtime_ns) for p in (run / 'checkpoints').iterdir())
    hung = {'op': 'call', 'target': 'torch.distributed.checkpoint.filesystem:FileSystemReader.read_data', 'rank': 1,
            'block': True}
    proc = start([*args, 'max_duration=12ba'], faults(hung))
    assert proc.wait(timeout=HANG) != 0 and group_gone(proc.pid, timeout=HANG)
    errors = {error_line(run / 'logs' / f'rank{r}.log') for r in (0, 1)}
    assert len(errors) == 1, errors
    error = errors.pop()
    assert error.startswith('prefix: error: rank 1 failed reading shards-000000008-') and \
        'still at it after 6 s (checkpoint.write_timeout)' in error, error
    for r in (0, 1):
        assert 'terminate called' not in (run / 'logs' / f'rank{r}.log').read_text()
    assert sorted((p.name, p.stat().st_mtime_ns) for p in (run / 'checkpoints').iterdir()) == before
