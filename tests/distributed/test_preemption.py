"""Graceful preemption with real signals: SIGTERM saves the current step and exits non-zero."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import (
    REPO,
    assert_same_training,
    copy_run,
    faults,
    group_gone,
    run_env,
    run_train,
    smoke_args,
    starts,
    step_losses,
    train_cmd,
    two_epochs,
    wait_for,
)

from prefix.distributed.preemption import PREEMPTED_EXIT_CODE

pytestmark = pytest.mark.slow


def start(args: list[str], nproc: int = 0, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(train_cmd(*args, nproc=nproc), env=run_env(**(env or {})), cwd=REPO, start_new_session=True,
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
    os.killpg(proc.pid, signal.SIGTERM)
    os.killpg(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT_CODE, out[-3000:]
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
    held, release = tmp_path / 'held', tmp_path / 'release'
    hold = {'op': 'step', 'step': 7, 'marker': str(held), 'block': True, 'release': str(release)}
    proc = start(args, nproc=2, env=faults(hold))
    wait_for(lambda: held.exists() and len(held.read_text().splitlines()) == 2, proc, 'both ranks reach step 7')
    # The launcher alone: it passes SIGTERM on to the ranks (and kills them 30 s later); were it killed
    # outright instead, the ranks' death signal (PR_SET_PDEATHSIG) would bring them the same SIGTERM.
    proc.send_signal(signal.SIGTERM)
    logs = [run / 'logs' / f'rank{rank}.log' for rank in (0, 1)]
    wait_for(lambda: all('SIGTERM received' in log.read_text() for log in logs), what='each rank has the signal')
    release.touch()
    proc.communicate(timeout=120)
    assert group_gone(proc.pid, timeout=120), 'the ranks exit after saving'
    # The signal came at the end of step 7: the ranks agree on it while step 8 computes, and save step 8.
    assert saved_step(run) == 8
    for rank in (0, 1):  # each rank's output is kept, though the launcher drops rank 1's console
        rank_state = torch.load(run / 'checkpoints' / f'latest_rank{rank}.pt', weights_only=True)
        assert rank_state['global_step'] == 8 and rank_state['world_size'] == 2
        assert f'[rank{rank}]' in logs[rank].read_text()
    assert 'preempted at step 8' in logs[0].read_text()
    resumed = run_train(*args, nproc=2)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert sorted(step_losses(run)) == list(range(20))
    assert [s['world_size'] for s in starts(run)] == [2, 2]


def test_a_launcher_killed_during_start_up_leaves_no_orphans(tmp_path: Path, dataset: Path) -> None:
    held = tmp_path / 'held'
    # Each rank is held just after it asked for the launcher's death signal, before its slow imports.
    hold = {'op': 'call', 'target': 'prefix.distributed.preemption:die_with_launcher', 'when': 'after', 'marker': str(held),
            'block': True}
    proc = start(smoke_args(tmp_path, dataset, 'max_duration=200ba'), nproc=2, env=faults(hold))
    wait_for(lambda: held.exists() and len(held.read_text().splitlines()) == 2, proc, 'both ranks start')
    proc.kill()  # no chance to pass anything on: only the ranks' death signal can end them
    proc.communicate(timeout=60)
    assert group_gone(proc.pid, timeout=120), 'ranks do not go on without their launcher'
    assert not (tmp_path / 'smoke').exists()


def test_ctrl_c_during_the_imports_ends_the_process_quietly(tmp_path: Path, dataset: Path) -> None:
    held = tmp_path / 'held'
    # Held just before the slow imports (torch, Composer), where Python would raise KeyboardInterrupt.
    hold = {'op': 'call', 'target': 'prefix.distributed.preemption:die_with_launcher', 'when': 'after', 'marker': str(held),
            'block': True}
    proc = start(smoke_args(tmp_path, dataset, 'max_duration=4ba'), env=faults(hold))
    wait_for(held.exists, proc, 'the imports begin')
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGINT, 'ended by the signal itself, as a shell expects of Ctrl-C (it reports 130)'
    assert 'Traceback' not in out and 'KeyboardInterrupt' not in out, out[-3000:]
    assert not (tmp_path / 'smoke').exists()


def test_sigterm_before_the_first_step_of_a_resume_ends_it_at_once_without_writing(
        finished_run: Path, tmp_path: Path, dataset: Path) -> None:
    run = copy_run(finished_run, tmp_path)
    before = {p.name: p.read_bytes() for p in (run / 'checkpoints').iterdir()}
    held = tmp_path / 'held'
    # Held after it chose the checkpoint to resume from, before Composer loads it and trains.
    hold = {'op': 'call', 'target': 'prefix.checkpoint.checkpoint:find_resume_point', 'when': 'after', 'marker': str(held),
            'block': True}
    proc = start(smoke_args(tmp_path, dataset, 'max_duration=40ba'), env=faults(hold))
    wait_for(held.exists, proc, 'the resume point is chosen')
    proc.send_signal(signal.SIGTERM)  # while the main thread is held: the stop watcher acts all the same
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT_CODE, out[-3000:]
    assert ('run smoke stopped by SIGTERM before its first step: nothing new to save; run the same command to resume'
            in out.splitlines()), out[-3000:]
    assert {p.name: p.read_bytes() for p in (run / 'checkpoints').iterdir()} == before, 'nothing written'
    assert len(starts(run)) == 1
    assert json.loads((run / 'meta' / 'lock.json').read_text())['state'] == 'released', 'the next start takes it at once'


def test_ctrl_c_saves_like_sigterm_and_exits_130_without_a_traceback(tmp_path: Path, dataset: Path) -> None:
    args = smoke_args(tmp_path, dataset, 'max_duration=20ba', 'checkpoint.interval=1h', 'checkpoint.periodic_interval=null')
    held, release = tmp_path / 'held', tmp_path / 'release'
    proc = start(args, env=faults({'op': 'step', 'step': 5, 'marker': str(held), 'block': True, 'release': str(release)}))
    wait_for(held.exists, proc, 'step 5')
    proc.send_signal(signal.SIGINT)
    release.touch()
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, out[-3000:]
    step = saved_step(tmp_path / 'smoke')
    assert f'run smoke preempted at step {step}; the checkpoint of that step is saved; run the same command to resume' in out
    assert 'Traceback' not in out and 'KeyboardInterrupt' not in out


def test_a_second_ctrl_c_exits_at_once_while_sigterm_repeats_wait_for_the_save(tmp_path: Path, dataset: Path) -> None:
    run = tmp_path / 'smoke'
    blocked = tmp_path / 'blocked'
    # The first write of latest.pt never finishes: the save that Ctrl-C asks for waits for it forever.
    hold = {'op': 'fsync', 'path': 'latest.pt.*.tmp', 'marker': str(blocked), 'block': True}
    proc = start(smoke_args(tmp_path, dataset, 'max_duration=40ba', 'checkpoint.periodic_interval=null'), env=faults(hold))
    wait_for(blocked.exists, proc, 'the first checkpoint write')
    log = run / 'logs' / 'rank0.log'
    proc.send_signal(signal.SIGINT)
    wait_for(lambda: 'SIGINT received: saving' in log.read_text(), proc)
    proc.send_signal(signal.SIGTERM)
    wait_for(lambda: 'SIGTERM received again: already stopping' in log.read_text(), proc)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT and 'SIGINT received again: exiting now' in log.read_text()


def test_sigterm_abandons_the_write_in_flight_and_writes_the_final_checkpoint_once(
        tmp_path: Path, dataset: Path, reference) -> None:
    """The write of step 8 is in flight (its rank file's fsync held) when SIGTERM comes: it stops at its next write,
    uncommitted, and only the step the signal stopped at is written; the resume is bit-exact."""
    args = smoke_args(tmp_path, dataset, 'max_duration=24ba', 'checkpoint.interval=4ba', 'checkpoint.periodic_interval=null')
    run = tmp_path / 'smoke'
    held, release = tmp_path / 'held', tmp_path / 'release'
    proc = start(args, env=faults({'op': 'fsync', 'path': 'latest_rank0.pt.*.tmp', 'skip': 1, 'times': 1,
                                   'marker': str(held), 'block': True, 'release': str(release)}))
    wait_for(held.exists, proc, 'the write of step 8')
    os.kill(proc.pid, signal.SIGTERM)
    # Released once the write is told to stop: released sooner, it could commit before the next batch ends.
    wait_for(lambda: 'stopping the checkpoint write of step 8' in (run / 'logs' / 'rank0.log').read_text(), proc)
    release.touch()
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT_CODE, out[-3000:]
    step = saved_step(run)
    assert step > 8 and 'the checkpoint write of step 8 in flight was abandoned uncommitted' in out
    assert 'checkpoint saved at step 8' not in out and f'checkpoint saved at step {step}' in out
    assert not list((run / 'checkpoints').glob('*.tmp')), 'the abandoned write left its temporary files behind'

    resumed = run_train(*args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert starts(run)[-1]['start_step'] == step
    assert_same_training(reference(0, 'max_duration=24ba'), run)
