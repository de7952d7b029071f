"""Faults a preemptible cluster produces, each with the real trainer: drift, full disks, a second
writer, a changed world size, a corrupt checkpoint, a killed run streaming from a remote."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import (
    REPO,
    committed_step,
    copy_run,
    faults,
    group_gone,
    run_env,
    run_train,
    smoke_args,
    starts,
    step_losses,
    train_cmd,
    wait_for,
)
from test_checkpoint import flip_a_weight_byte

from prefix.checkpoint.checkpoint import verify_crc
from prefix.distributed.preemption import PREEMPTED_EXIT_CODE

pytestmark = pytest.mark.slow


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_config_drift_is_refused_with_a_diff_or_forced(finished_run: Path, tmp_path: Path, dataset: Path) -> None:
    run = copy_run(finished_run, tmp_path)
    before = snapshot(run / 'checkpoints')
    refused = run_train(*smoke_args(tmp_path, dataset, 'max_duration=24ba', 'model.d_model=64', 'seed=3'))
    assert refused.returncode == 2
    assert 'model.d_model: 32 -> 64; seed: 17 -> 3' in refused.stderr and refused.stderr.strip().count('\n') == 0
    assert snapshot(run / 'checkpoints') == before and len(starts(run)) == 1
    assert json.loads((run / 'meta' / 'lock.json').read_text())['state'] == 'released', 'the refused start let go of the run'

    forced = run_train(*smoke_args(tmp_path, dataset, 'max_duration=24ba', 'eval_interval=7ba', 'seed=3',
                                   'allow_config_change=true'))
    assert forced.returncode == 0, forced.stderr[-2000:]
    record = json.loads((run / 'meta' / 'config_changes.jsonl').read_text())
    assert record['step'] == 22 and record['forced']
    assert set(record['changes']) == {'max_duration', 'eval_interval', 'seed', 'runs_root'}  # runs_root: the run moved
    assert starts(run)[-1]['start_step'] == 22


def test_a_corrupt_latest_falls_back_to_periodic(finished_run: Path, tmp_path: Path, dataset: Path) -> None:
    run = copy_run(finished_run, tmp_path)
    flip_a_weight_byte(run / 'checkpoints' / 'latest.pt')
    result = run_train(*smoke_args(tmp_path, dataset, 'max_duration=24ba'))
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'CHECKPOINT UNUSABLE' in result.stderr and 'fails its CRC-32 check' in result.stderr
    assert starts(run)[-1]['resumed_from'] == 'periodic.pt' and starts(run)[-1]['start_step'] == 20
    verify_crc(run / 'checkpoints' / 'latest.pt')


def _limit_file_size(limit: int):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def test_a_failed_checkpoint_write_keeps_the_previous_checkpoint(finished_run: Path, tmp_path: Path, dataset: Path) -> None:
    run = copy_run(finished_run, tmp_path)
    size = (run / 'checkpoints' / 'latest.pt').stat().st_size
    args = smoke_args(tmp_path, dataset, 'max_duration=30ba', 'loggers.mlflow={}')  # MLflow's file store, logs/mlruns
    result = subprocess.run(train_cmd(*args), env=run_env(), cwd=REPO,
                            capture_output=True, text=True, timeout=300, preexec_fn=_limit_file_size(size // 2))
    assert result.returncode == 1, result.stderr[-2000:]
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith('prefix: error: rank 0 failed writing the checkpoint of step 25: File too large')
    assert 'the checkpoint of step 22 is intact' in error
    assert torch.load(run / 'checkpoints' / 'latest.pt', weights_only=True)['global_step'] == 22
    assert not any(p.name.endswith('.tmp') for p in (run / 'checkpoints').iterdir())
    assert mlflow_status(run) == 'FAILED'  # how the start ended, though Composer's exit hook closes MLflow again
    again = run_train(*args)
    assert again.returncode == 0 and starts(run)[-1]['start_step'] == 22
    assert mlflow_status(run) == 'FINISHED'


def mlflow_status(run: Path) -> str:
    from mlflow.tracking import MlflowClient

    run_id = json.loads((run / 'meta' / 'trackers.json').read_text())['mlflow_run_id']
    return MlflowClient(tracking_uri=(run / 'logs' / 'mlruns').as_uri()).get_run(run_id).info.status


def test_a_second_process_on_the_same_run_is_refused(tmp_path: Path, dataset: Path) -> None:
    args = smoke_args(tmp_path, dataset, 'max_duration=40ba')
    held = tmp_path / 'held'
    first = subprocess.Popen(train_cmd(*args), env=run_env(**faults({'op': 'step', 'step': 2, 'marker': str(held),
                                                                      'block': True})),
                             cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(held.exists, first, 'step 2')
        second = run_train(*args)
        assert second.returncode == 1
        assert f'is in use by pid {first.pid} on host' in second.stderr and second.stderr.strip().count('\n') == 0
        assert first.poll() is None, 'the first run goes on'
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    # The dead process's lock does not block the restart.
    assert run_train(*smoke_args(tmp_path, dataset, 'max_duration=8ba')).returncode == 0


def test_world_size_changes_carry_model_optimizer_and_data_position(tmp_path: Path, dataset: Path, reference) -> None:
    """2 ranks -> 1 -> 2, each leg preempted by SIGTERM; without dropout the losses match an uninterrupted 2-rank run."""
    args = smoke_args(tmp_path / 'elastic', dataset, 'max_duration=24ba', 'model.dropout=0.0', 'checkpoint.interval=1h',
                      'checkpoint.periodic_interval=null')
    run = tmp_path / 'elastic' / 'smoke'
    # Signalled at the end of step 8 (2 ranks: agreed on while step 9 computes, step 9 saved) and of step 16 (1 rank).
    for nproc, stop_at, saved in ((2, 8, 9), (1, 16, 16)):
        held, release = tmp_path / f'held-{stop_at}', tmp_path / f'release-{stop_at}'
        hold = {'op': 'step', 'step': stop_at, 'marker': str(held), 'block': True, 'release': str(release)}
        proc = subprocess.Popen(train_cmd(*args, nproc=nproc if nproc > 1 else 0), env=run_env(**faults(hold)), cwd=REPO,
                                start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda h=held, n=nproc: h.exists() and len(h.read_text().splitlines()) == n, proc, f'step {stop_at}')
        os.killpg(proc.pid, signal.SIGTERM)
        release.touch()
        assert proc.wait(timeout=120) in (PREEMPTED_EXIT_CODE, -signal.SIGTERM)
        assert group_gone(proc.pid, timeout=120), 'the ranks save and exit'
        assert torch.load(run / 'checkpoints' / 'latest.pt', weights_only=True)['global_step'] == saved
        ckpts = {p.name for p in (run / 'checkpoints').iterdir()}
        assert ckpts == ({'latest.pt', 'latest_rank0.pt', 'latest_rank1.pt'} if nproc == 2 else
                         {'latest.pt', 'latest_rank0.pt'}), 'rank files of ranks the run no longer has are removed'
    final = run_train(*args, nproc=2)
    assert final.returncode == 0, final.stdout[-2000:] + final.stderr[-2000:]
    assert [s['world_size'] for s in starts(run)] == [2, 1, 2]
    assert 'the run had 2 ranks and now has 1' in (run / 'logs' / 'rank0.log').read_text()

    ref, got = step_losses(reference(2, 'max_duration=24ba', 'model.dropout=0.0')), step_losses(run)
    assert sorted(got) == sorted(ref) == list(range(24))
    worst = max(abs(ref[s] - got[s]) for s in ref)
    assert worst < 1e-4, f'the same samples in the same order give the same losses (worst difference {worst})'


def test_a_killed_run_streaming_from_a_remote_restarts(tmp_path: Path, s3_dataset) -> None:
    remote, env = s3_dataset
    args = smoke_args(tmp_path / 'runs', tmp_path / 'cache', f'data.remote={remote}', 'max_duration=16ba')
    run = tmp_path / 'runs' / 'smoke'
    held = tmp_path / 'held'
    hold = {'op': 'step', 'step': 8, 'marker': str(held), 'block': True}
    proc = subprocess.Popen(train_cmd(*args), env=run_env(**env, **faults(hold)), cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: held.exists() and committed_step(run) == 5, proc, 'step 8')
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    result = run_train(*args, **env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert starts(run)[-1]['start_step'] == 5 and max(step_losses(run)) == 15


def test_a_transient_read_error_is_retried_not_taken_for_corruption(finished_run: Path, tmp_path: Path,
                                                                    dataset: Path) -> None:
    run = copy_run(finished_run, tmp_path)
    flaky = {'op': 'open', 'mode': 'read', 'path': 'latest.pt', 'error': 'EIO', 'times': 2}
    result = run_train(*smoke_args(tmp_path, dataset, 'max_duration=24ba'), **faults(flaky))
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'Input/output error' in result.stderr and 'trying again' in result.stderr
    assert 'CHECKPOINT UNUSABLE' not in result.stderr
    assert starts(run)[-1]['resumed_from'] == 'latest.pt' and starts(run)[-1]['start_step'] == 22


def test_a_resumed_run_does_not_keep_the_checkpoint_it_loaded_mapped(finished_run: Path, tmp_path: Path,
                                                                     dataset: Path) -> None:
    """Checkpoints load memory-mapped (the ranks of a node share the page cache); once the next checkpoint
    replaces latest.pt, no process may still map the old file (on NFS it would linger as a .nfs file)."""
    run = copy_run(finished_run, tmp_path)
    held = tmp_path / 'held'
    proc = subprocess.Popen(train_cmd(*smoke_args(tmp_path, dataset, 'max_duration=40ba')), cwd=REPO,
                            env=run_env(**faults({'op': 'step', 'step': 27, 'marker': str(held), 'block': True})),
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: held.exists() and committed_step(run) == 25, proc, 'step 27')
        maps = Path(f'/proc/{proc.pid}/maps').read_text()
        assert str(run / 'checkpoints') not in maps, [line for line in maps.splitlines() if 'checkpoints' in line]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
