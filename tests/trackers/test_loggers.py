"""Trackers by YAML: one prefix run is one TensorBoard / MLflow / W&B run, whatever the number of kills.

MLflow runs against a real ``mlflow server`` (sqlite store, loopback), as users run it, which the
tests kill and start again. A real run with all three trackers (W&B offline) is SIGKILLed twice at
random batch ends, where TensorBoard's events of that batch are not flushed yet, and finishes on a
third start. Each tracker must then read back as one run with every step once and the starts marked,
the loss and the per-step signals (learning rate, gradient norm, throughput) alike, and the config as
hyperparameters; MLflow's status must be how the last start ended, and what the server missed must reach it.
"""

from __future__ import annotations

import collections
import json
import os
import random
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    REPO,
    faults,
    free_port,
    group_gone,
    run_env,
    run_train,
    smoke_args,
    starts,
    step_losses,
    train_cmd,
    wait_for,
)

from prefix.trackers.mlflow_run import CLOSE_S

pytestmark = pytest.mark.slow

STEPS = 30
TRACKERS = ['loggers.tensorboard={}', 'loggers.wandb={}', f'max_duration={STEPS}ba',
            'checkpoint.interval=4ba', 'checkpoint.periodic_interval=null', 'eval_interval=10ba']
OFFLINE = {'WANDB_MODE': 'offline', 'WANDB_SILENT': 'true'}
LOSS = 'loss/train/total'
LR, GRAD_NORM, THROUGHPUT = 'lr-DecoupledAdamW/group0', 'l2_norm/grad/global', 'throughput/tokens_per_sec'
MLFLOW_SERVER = REPO / '.venv-mlflow' / 'bin' / 'mlflow'  # its own venv (make test installs it: Makefile)


class MLflowServer:
    """``mlflow server`` with a sqlite store on a free loopback port; ``stop`` kills it, ``start`` brings it back."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.uri = folder, f'http://127.0.0.1:{free_port()}'
        self.proc: subprocess.Popen | None = None

    def start(self) -> MLflowServer:
        env = run_env()
        env.pop('PREFIX_TEST_NAME', None)  # the server belongs to its fixture, which stops it, not to a test
        port = self.uri.rsplit(':', 1)[1]
        with (self.folder / 'server.log').open('a') as out:
            self.proc = subprocess.Popen(
                [str(MLFLOW_SERVER), 'server', '--host', '127.0.0.1', '--port', port,
                 '--workers', '1', '--backend-store-uri', f'sqlite:///{self.folder}/mlflow.db',
                 '--default-artifact-root', str(self.folder / 'artifacts')],
                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(self.answers, self.proc, 'the MLflow server answers')
        return self

    def answers(self) -> bool:
        import urllib.request

        try:
            with urllib.request.urlopen(self.uri + '/health', timeout=5):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        assert group_gone(self.proc.pid, timeout=30)

    def freeze(self) -> None:
        """It stops answering without going away, as a hung host does: connections open, requests wait."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGCONT)

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.uri)


@pytest.fixture
def server(tmp_path: Path):
    folder = tmp_path / 'mlflow-server'
    folder.mkdir()
    started = MLflowServer(folder).start()
    yield started
    if started.proc is not None and started.proc.poll() is None:
        started.stop()


def mlflow_run_id(run: Path) -> str | None:
    path = run / 'meta' / 'trackers.json'
    return json.loads(path.read_text()).get('mlflow_run_id') if path.exists() else None


def held_steps(server: MLflowServer, run: Path, key: str = LOSS) -> list[int]:
    """The steps of ``key`` the server holds for the run's MLflow run (each as often as it holds it)."""
    run_id = mlflow_run_id(run)
    return sorted(m.step for m in server.client().get_metric_history(run_id, key)) if run_id else []


def assert_one_run_with_every_step_once(server: MLflowServer, run: Path, status: str) -> None:
    client = server.client()
    runs = client.search_runs([client.get_experiment_by_name('prefix').experiment_id])
    assert [r.info.run_id for r in runs] == [mlflow_run_id(run)]
    assert runs[0].info.status == status
    losses = step_losses(run)
    history = client.get_metric_history(runs[0].info.run_id, LOSS)
    assert sorted(m.step for m in history) == sorted(losses), 'each step the run logged, once'
    assert {m.step: m.value for m in history} == losses


def first_values(run: Path, key: str) -> dict[int, float]:
    """Each step's first value of ``key`` in ``logs/metrics.jsonl``: what MLflow holds (a redone step is sent once)."""
    values: dict[int, float] = {}
    for line in (run / 'logs' / 'metrics.jsonl').read_text().splitlines():
        record = json.loads(line)
        if key in record:
            values.setdefault(record['step'], record[key])
    return values


def assert_signals_at_each_step_once(steps: dict[str, list[int]], run: Path) -> None:
    """The learning rate and gradient norm at every step, as the loss; the throughput at every step but a start's
    first, which pays for its warm-up (a step an earlier start trained has one); each step once."""
    assert sorted(steps[LR]) == sorted(steps[GRAD_NORM]) == list(range(STEPS))
    last_start = starts(run)[-1]['start_step']
    assert set(range(last_start + 1, STEPS)) <= set(steps[THROUGHPUT]) <= set(range(1, STEPS))
    assert len(steps[THROUGHPUT]) == len(set(steps[THROUGHPUT]))


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


@pytest.fixture(scope='session')  # session, not module: under xdist a worker may leave the module and come back
def module_server(tmp_path_factory: pytest.TempPathFactory):
    started = MLflowServer(tmp_path_factory.mktemp('mlflow-server')).start()
    yield started
    started.stop()


@pytest.fixture(scope='session')
def tracked_run(tmp_path_factory: pytest.TempPathFactory, dataset: Path, module_server: MLflowServer) -> Path:
    root = tmp_path_factory.mktemp('tracked')
    args = smoke_args(root, dataset, *TRACKERS, f'loggers.mlflow.tracking_uri={module_server.uri}')
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
    from tensorboard.plugins.hparams.metadata import SESSION_START_INFO_TAG, parse_session_start_info_plugin_data

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
    assert_signals_at_each_step_once({k: [e.step for e in events.Scalars(k)] for k in (LR, GRAD_NORM, THROUGHPUT)},
                                     tracked_run)
    hparams = events.SummaryMetadata(SESSION_START_INFO_TAG).plugin_data.content  # the HParams dashboard's row
    config = parse_session_start_info_plugin_data(hparams).hparams
    assert config['optimizer.lr'].number_value == 3e-3 and config['model.n_layers'].number_value == 2
    assert config['optimizer.warmup'].string_value == '5ba'


def test_mlflow_holds_one_run_every_step_once_and_the_starts(tracked_run: Path, module_server: MLflowServer,
                                                            dataset: Path) -> None:
    assert_one_run_with_every_step_once(module_server, tracked_run, 'FINISHED')
    client = module_server.client()
    run = client.get_run(mlflow_run_id(tracked_run))
    evals = client.get_metric_history(run.info.run_id, 'metrics/val/LanguageCrossEntropy')
    assert sorted(m.step for m in evals) == [10, 20, 30]
    begun = {s['start_step'] for s in starts(tracked_run)}
    assert {k: int(v) for k, v in run.data.tags.items() if k.startswith('prefix.start.')} == {
        f'prefix.start.{n}': s['start_step'] for n, s in enumerate(starts(tracked_run), 1)}
    assert {m.step for m in client.get_metric_history(run.info.run_id, 'prefix/start')} == begun
    assert run.data.params['optimizer.lr'] == '0.003' and run.data.params['model.n_layers'] == '2'
    assert run.data.params['optimizer.betas'] == '[0.9, 0.95]' and run.data.params['data.local'] == str(dataset)
    assert not any(k.startswith('prefix.latest.') for k in run.data.tags), 'no key changed on resume'
    histories = {k: client.get_metric_history(run.info.run_id, k) for k in (LR, GRAD_NORM, THROUGHPUT)}
    assert_signals_at_each_step_once({k: [m.step for m in h] for k, h in histories.items()}, tracked_run)
    for key, history in histories.items():
        assert {m.step: m.value for m in history} == first_values(tracked_run, key)
    assert max(m.value for m in histories[GRAD_NORM]) > 1.0, 'the norm before clipping (optimizer.grad_clip_norm: 1)'


def test_signals_are_one_line_a_step_with_no_monitor_noise_on_a_cpu(tracked_run: Path) -> None:
    """A step's signals share one record of logs/metrics.jsonl, at the loss's step, with only the keys worth keeping;
    on a CPU there is neither peak memory nor MFU, and no warning about them."""
    import torch

    records = [json.loads(line) for line in (tracked_run / 'logs' / 'metrics.jsonl').read_text().splitlines()]
    signals = [r for r in records if LR in r]
    assert all(GRAD_NORM in r and LOSS not in r for r in signals)
    keys = {k for r in signals for k in r} - {'throughput/device/mfu'}  # on a GPU Composer's table knows
    memory = {'memory/peak_allocated_mem', 'memory/peak_reserved_mem', 'memory/alloc_retries'}
    assert keys == {'step', 'time', LR, GRAD_NORM, THROUGHPUT, 'throughput/device/tokens_per_sec'} | (
        memory if torch.cuda.is_available() else set())
    assert not any(k.startswith(('time/train', 'throughput/batches')) for r in records for k in r)
    if not torch.cuda.is_available():
        assert not any('throughput/device/mfu' in r for r in signals)
        console = (tracked_run / 'logs' / 'rank0.log').read_text()
        assert 'memory monitor' not in console.lower() and 'gpu_flop' not in console


def test_wandb_offline_keeps_one_run_id_across_starts(tracked_run: Path) -> None:
    run_id = json.loads((tracked_run / 'meta' / 'trackers.json').read_text())['wandb_run_id']
    offline = sorted((tracked_run / 'logs' / 'wandb').glob('offline-run-*'))
    assert len(offline) == 3, offline
    assert all(folder.name.endswith(f'-{run_id}') for folder in offline)
    config, history = wandb_records(offline[-1])  # the completed start's (a killed one's file can be empty)
    assert config['optimizer.lr'] == 3e-3 and config['model.n_layers'] == 2 and config['optimizer.betas'] == [0.9, 0.95]
    assert all(LR in row and GRAD_NORM in row for row in history if LOSS in row), 'at the step of the loss'


def test_an_unreachable_mlflow_server_never_stops_training(tmp_path: Path, dataset: Path) -> None:
    uri = f'http://127.0.0.1:{free_port()}'  # nothing listens there
    result = run_train(*smoke_args(tmp_path, dataset, f'loggers.mlflow.tracking_uri={uri}', 'max_duration=6ba'))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f'the MLflow server {uri} cannot be reached' in result.stderr
    assert sorted(step_losses(tmp_path / 'smoke')) == list(range(6))


def ends(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / 'meta' / 'starts.jsonl').read_text().splitlines()
            if json.loads(line)['event'] == 'end']


def held_then(proc: subprocess.Popen, marker: Path, ranks: int = 1) -> None:
    wait_for(lambda: marker.exists() and len(marker.read_text().splitlines()) == ranks, proc, 'the ranks are held')


def start_train(args: list[str], nproc: int = 0, **env: str) -> subprocess.Popen:
    return subprocess.Popen(train_cmd(*args, nproc=nproc), env=run_env(**env), cwd=REPO, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def hold(tmp_path: Path, step: int) -> tuple[Path, Path, dict]:
    """A fault that holds every rank at the end of batch ``step`` (its metrics written, before its checkpoint) until the
    test releases it."""
    held, release = tmp_path / f'held-{step}', tmp_path / f'release-{step}'
    return held, release, {'op': 'step', 'step': step, 'block': True, 'marker': str(held), 'release': str(release)}


def wandb_scan(folder: Path) -> Iterator[Any]:
    """The records of a W&B offline run (one start's), in order."""
    from wandb.proto import wandb_internal_pb2
    from wandb.sdk.internal.datastore import DataStore

    store = DataStore()
    store.open_for_scan(str(next(folder.glob('*.wandb'))))
    while (data := store.scan_data()) is not None:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        yield record


def wandb_records(folder: Path) -> tuple[dict, list[dict]]:
    """A W&B offline run's config and its history rows (each a step's metrics)."""
    config, history = {}, []
    for record in wandb_scan(folder):
        if record.HasField('config'):
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
        if record.HasField('history'):
            history.append({item.key: json.loads(item.value_json) for item in record.history.item})
    return config, history


def wandb_endings(run: Path) -> list[tuple[bool, int | None]]:
    """For each W&B offline run (one per start): whether it was marked preempting, and its exit code."""
    endings = []
    for folder in sorted((run / 'logs' / 'wandb').glob('offline-run-*')):
        preempting, code = False, None
        for record in wandb_scan(folder):
            preempting |= record.HasField('preempting')
            code = record.exit.exit_code if record.HasField('exit') else code
        endings.append((preempting, code))
    return endings


def test_sigterm_to_two_ranks_ends_the_mlflow_run_killed_then_finished_after_the_resume(
        tmp_path: Path, dataset: Path, server: MLflowServer) -> None:
    args = smoke_args(tmp_path, dataset, 'max_duration=12ba', 'checkpoint.interval=1h', 'loggers.wandb={}',
                      f'loggers.mlflow.tracking_uri={server.uri}')
    run = tmp_path / 'smoke'
    held, release, rule = hold(tmp_path, 7)
    proc = start_train(args, nproc=2, **faults(rule), **OFFLINE)
    held_then(proc, held, ranks=2)
    proc.send_signal(signal.SIGTERM)  # the launcher passes it on to both ranks
    logs = [run / 'logs' / f'rank{rank}.log' for rank in (0, 1)]
    wait_for(lambda: all('SIGTERM received' in log.read_text() for log in logs), what='each rank has the signal')
    release.touch()
    proc.communicate(timeout=120)
    assert group_gone(proc.pid, timeout=120)
    assert [r['reason'] for r in ends(run)] == ['preempted']
    assert_one_run_with_every_step_once(server, run, 'KILLED')
    assert wandb_endings(run) == [(True, 143)]

    resumed = run_train(*args, nproc=2, **OFFLINE)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert sorted(step_losses(run)) == list(range(12))
    assert_one_run_with_every_step_once(server, run, 'FINISHED')
    assert wandb_endings(run) == [(True, 143), (False, 0)]


def test_mlflow_killed_then_hung_is_caught_up_within_the_start_and_after_the_run_completed_by_the_same_command(
        tmp_path: Path, dataset: Path, server: MLflowServer) -> None:
    args = smoke_args(tmp_path, dataset, 'max_duration=20ba', f'loggers.mlflow.tracking_uri={server.uri}')
    run = tmp_path / 'smoke'
    first, go_on, early = hold(tmp_path, 4)
    held, release, late = hold(tmp_path, 12)
    proc = start_train(args, **faults(early, late))
    held_then(proc, first)
    wait_for(lambda: len(held_steps(server, run)) >= 3, proc, 'the server holds the first steps')
    server.stop()
    go_on.touch()
    # Steps logged while the server is down: the sender fails on them (the state waited for), training goes on.
    log = run / 'logs' / 'rank0.log'
    wait_for(lambda: 'MLflow failed' in log.read_text(), proc, 'the sender finds the server gone')
    held_then(proc, held)
    server.start()
    wait_for(lambda: 'MLflow answers again' in log.read_text(), proc, 'the sender catches up')
    assert held_steps(server, run) == list(range(12))  # the steps trained during the outage, within this start

    server.freeze()  # hung now, through the end of the run: the start waits for it a bounded time
    release.touch()
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-3000:]
    assert f'MLflow did not get the end of this start (no answer within {CLOSE_S:.0f} s)' in err
    assert sorted(step_losses(run)) == list(range(20))

    server.thaw()
    again = run_train(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert 'is already complete' in again.stdout
    assert_one_run_with_every_step_once(server, run, 'FINISHED')
    assert len(starts(run)) == 1  # nothing trained

    quiet = run_train(*args)  # ended now: the ledger says so, nothing is asked of the server
    assert quiet.returncode == 0 and 'MLflow' not in quiet.stderr, quiet.stderr[-3000:]
