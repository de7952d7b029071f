"""Trackers by YAML: one prefix run is one TensorBoard / MLflow / W&B run, whatever the number of kills.

A real run with all three trackers (MLflow's local file store, W&B offline) is SIGKILLed twice at
random batch ends, where TensorBoard's events of that batch are not flushed yet, and finishes on a
third start. Each tracker must then read back as one run with every step once and the starts marked.
"""

from __future__ import annotations

import collections
import json
import os
import random
import signal
import subprocess
from pathlib import Path

import pytest
from conftest import REPO, faults, free_port, run_env, run_train, smoke_args, starts, step_losses, train_cmd, wait_for

pytestmark = pytest.mark.slow

STEPS = 30
TRACKERS = ['loggers.tensorboard={}', 'loggers.mlflow={}', 'loggers.wandb={}', f'max_duration={STEPS}ba',
            'checkpoint.interval=4ba', 'checkpoint.periodic_interval=null', 'eval_interval=10ba']
OFFLINE = {'WANDB_MODE': 'offline', 'WANDB_SILENT': 'true'}


def kill_at_random_batch_end(root: Path, args: list[str], rng: random.Random, after: int) -> int:
    step = rng.randint(after + 1, min(after + 12, STEPS - 2))
    marker = root / f'held-{step}'
    env = run_env(**OFFLINE, **faults({'op': 'step', 'step': step, 'event': 'batch_end', 'block': True,
                                       'marker': str(marker)}))
    proc = subprocess.Popen(train_cmd(*args), env=env, cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(marker.exists, proc, f'batch {step} ended')
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return step


@pytest.fixture(scope='module')
def tracked_run(tmp_path_factory: pytest.TempPathFactory, dataset: Path) -> Path:
    root = tmp_path_factory.mktemp('tracked')
    args = smoke_args(root, dataset, *TRACKERS)
    seed = int.from_bytes(os.urandom(4), 'little')
    rng = random.Random(seed)
    first = kill_at_random_batch_end(root, args, rng, after=4)
    second = kill_at_random_batch_end(root, args, rng, after=first)
    print(f'killed after batches {first} and {second} (seed {seed})')
    result = run_train(*args, **OFFLINE)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(starts(root / 'smoke')) == 3
    return root / 'smoke'


def test_tensorboard_reads_back_one_run_each_step_once(tracked_run: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tracked_run / 'logs' / 'tensorboard'), size_guidance={'scalars': 0})
    events.Reload()
    for tag in events.Tags()['scalars']:
        steps = collections.Counter(e.step for e in events.Scalars(tag))
        assert max(steps.values()) == 1, f'{tag}: steps logged twice: {[s for s, n in steps.items() if n > 1]}'
    losses = {e.step: e.value for e in events.Scalars('loss/train/total')}
    assert sorted(losses) == list(range(STEPS))
    assert all(abs(losses[s] - v) < 1e-6 for s, v in step_losses(tracked_run).items())  # float32 in the events
    assert sorted(e.step for e in events.Scalars('metrics/val/LanguageCrossEntropy')) == [10, 20, 30]
    assert sorted(e.step for e in events.Scalars('prefix/start')) == sorted({s['start_step'] for s in starts(tracked_run)})


def test_mlflow_holds_one_run_every_step_once_and_the_starts(tracked_run: Path) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(tracked_run / 'logs' / 'mlruns').as_uri())
    experiment = client.get_experiment_by_name('prefix')
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_id == json.loads((tracked_run / 'meta' / 'trackers.json').read_text())['mlflow_run_id']
    assert run.info.status == 'FINISHED'
    history = client.get_metric_history(run.info.run_id, 'loss/train/total')
    assert sorted(m.step for m in history) == list(range(STEPS))
    assert {m.step: m.value for m in history} == step_losses(tracked_run)
    evals = client.get_metric_history(run.info.run_id, 'metrics/val/LanguageCrossEntropy')
    assert sorted(m.step for m in evals) == [10, 20, 30]
    begun = {s['start_step'] for s in starts(tracked_run)}
    assert {k: int(v) for k, v in run.data.tags.items() if k.startswith('prefix.start.')} == {
        f'prefix.start.{n}': s['start_step'] for n, s in enumerate(starts(tracked_run), 1)}
    assert {m.step for m in client.get_metric_history(run.info.run_id, 'prefix/start')} == begun


def test_wandb_offline_keeps_one_run_id_across_starts(tracked_run: Path) -> None:
    run_id = json.loads((tracked_run / 'meta' / 'trackers.json').read_text())['wandb_run_id']
    offline = sorted((tracked_run / 'logs' / 'wandb').glob('offline-run-*'))
    assert len(offline) == 3, offline
    assert all(folder.name.endswith(f'-{run_id}') for folder in offline)


def test_an_unreachable_mlflow_server_never_stops_training(tmp_path: Path, dataset: Path) -> None:
    uri = f'http://127.0.0.1:{free_port()}'  # nothing listens there
    result = run_train(*smoke_args(tmp_path, dataset, f'loggers.mlflow.tracking_uri={uri}', 'max_duration=6ba'))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f'the MLflow server {uri} cannot be reached' in result.stderr
    assert sorted(step_losses(tmp_path / 'smoke')) == list(range(6))
