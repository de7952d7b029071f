"""Graceful preemption with real signals: SIGTERM saves the current step and exits non-zero."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, group_gone, run_env, run_train, smoke_args, starts, step_losses, train_cmd, two_epochs

from prefix.preemption import PREEMPTED_EXIT_CODE

pytestmark = pytest.mark.slow


def start(args: list[str], nproc: int = 0) -> subprocess.Popen:
    return subprocess.Popen(train_cmd(*args, nproc=nproc), env=run_env(), cwd=REPO, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_step(proc: subprocess.Popen, run: Path, step: int) -> None:
    while max(step_losses(run), default=-1) < step if (run / 'logs' / 'metrics.jsonl').exists() else True:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.02)


def saved_step(run: Path) -> int:
    return torch.load(run / 'checkpoints' / 'latest.pt', weights_only=True)['global_step']


def test_sigterm_to_the_whole_group_saves_the_current_step(tmp_path: Path, dataset: Path, reference) -> None:
    # A dataloader worker is in the group too, and a second SIGTERM follows the first: neither may spoil the save.
    args = smoke_args(tmp_path / 'pre', dataset, two_epochs(dataset), 'data.num_workers=1', 'checkpoint.interval=1h',
                      'checkpoint.periodic_interval=null')
    run = tmp_path / 'pre' / 'smoke'
    proc = start(args)
    wait_for_step(proc, run, 7)
    sent = time.monotonic()
    os.killpg(proc.pid, signal.SIGTERM)
    time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    elapsed = time.monotonic() - sent
    assert proc.returncode == PREEMPTED_EXIT_CODE, out[-3000:]
    assert elapsed < 30, 'within the Kubernetes grace period'
    step = saved_step(run)
    trained = max(step_losses(run)) + 1
    assert step == trained and step >= 8, 'the checkpoint holds every step trained: nothing is lost'
    assert f'preempted at step {step}' in out and 'SIGTERM received' in out

    resumed = run_train(*args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert starts(run)[-1]['start_step'] == step

    ref = reference(0, two_epochs(dataset))
    assert step_losses(ref) == step_losses(run)
    a = torch.load(ref / 'checkpoints' / 'latest.pt', weights_only=True)['state']['model']
    b = torch.load(run / 'checkpoints' / 'latest.pt', weights_only=True)['state']['model']
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_to_the_composer_launcher_reaches_every_rank(tmp_path: Path, dataset: Path) -> None:
    args = smoke_args(tmp_path, dataset, 'max_duration=20ba', 'checkpoint.interval=1h', 'checkpoint.periodic_interval=null')
    run = tmp_path / 'smoke'
    proc = start(args, nproc=2)
    wait_for_step(proc, run, 6)
    proc.send_signal(signal.SIGTERM)  # the launcher alone; it does not forward signals
    proc.communicate(timeout=60)
    assert group_gone(proc.pid, timeout=60), 'the ranks exit after saving'
    step = saved_step(run)
    assert 6 < step < 20
    for rank in (0, 1):  # each rank's output is kept, though the launcher drops rank 1's console
        rank_state = torch.load(run / 'checkpoints' / f'latest_rank{rank}.pt', weights_only=True)
        assert rank_state['global_step'] == step and rank_state['world_size'] == 2
        log = (run / 'logs' / f'rank{rank}.log').read_text()
        assert 'SIGTERM received' in log and f'[rank{rank}]' in log
    assert 'preempted at step' in (run / 'logs' / 'rank0.log').read_text()
    resumed = run_train(*args, nproc=2)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert sorted(step_losses(run)) == list(range(20))
    assert [s['world_size'] for s in starts(run)] == [2, 2]


def test_a_launcher_killed_during_start_up_leaves_no_orphans(tmp_path: Path, dataset: Path) -> None:
    proc = start(smoke_args(tmp_path, dataset, 'max_duration=200ba'), nproc=2)
    time.sleep(2)  # the ranks are still importing
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert group_gone(proc.pid, timeout=60), 'ranks do not go on training without their launcher'
    assert max(step_losses(tmp_path / 'smoke'), default=-1) < 2
