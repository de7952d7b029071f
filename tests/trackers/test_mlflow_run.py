"""The MLflow sender: ``logs/metrics.jsonl`` reaches an MLflow run each (metric, step) once, from its ledger on.

A real MLflow client on its local file store (the server's behaviour is in test_trackers.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prefix.trackers.mlflow_run import BATCH, Ledger, Sender, status_of


class Counted:
    """The real client, counting the requests that send metrics."""

    def __init__(self, client) -> None:
        self.client, self.requests = client, 0

    def log_batch(self, run_id, metrics=(), **kwargs):
        self.requests += bool(metrics)
        return self.client.log_batch(run_id, metrics=metrics, **kwargs)


@pytest.fixture
def mlflow_run(tmp_path: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(tmp_path / 'mlruns').as_uri())
    run_id = client.create_run(client.create_experiment('prefix')).info.run_id
    return client, run_id


def write(path: Path, steps: range, text: str = '') -> None:
    with path.open('a') as f:
        for step in steps:
            f.write(json.dumps({'step': step, 'time': 1000.0 + step, 'loss': step / 10, 'lr': 0.5}) + '\n')
        f.write(text)


def history(client, run_id: str, key: str = 'loss') -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_each_metric_and_step_goes_once_and_a_later_start_sends_only_what_follows(tmp_path: Path, mlflow_run) -> None:
    client, run_id = mlflow_run
    metrics, ledger = tmp_path / 'metrics.jsonl', tmp_path / 'mlflow.json'
    write(metrics, range(10))
    write(metrics, range(6, 15), text='{"step": 15, "ti')  # a resume from step 6; a line still being written
    sent = Sender(client, run_id, metrics, ledger, held={}).send_pending()
    assert sent == 2 * 15
    assert history(client, run_id) == [(s, s / 10) for s in range(15)]
    assert Ledger.load(ledger, run_id).offset == metrics.stat().st_size - len('{"step": 15, "ti')

    with metrics.open('r+') as f:  # the line is finished, and more follow
        f.truncate(Ledger.load(ledger, run_id).offset)
    write(metrics, range(15, 20))
    assert Sender(client, run_id, metrics, ledger, held={}).send_pending() == 2 * 5
    assert history(client, run_id) == [(s, s / 10) for s in range(20)]
    assert Ledger.load(ledger, 'another run').offset == 0  # a ledger belongs to one MLflow run


def test_a_kill_between_a_request_and_its_ledger_sends_nothing_twice(tmp_path: Path, mlflow_run) -> None:
    client, run_id = mlflow_run
    metrics, ledger = tmp_path / 'metrics.jsonl', tmp_path / 'mlflow.json'
    write(metrics, range(5))
    Sender(client, run_id, metrics, ledger, held={}).send_pending()
    before = ledger.read_text()
    write(metrics, range(5, 9))
    Sender(client, run_id, metrics, ledger, held={}).send_pending()
    ledger.write_text(before)  # the kill: steps 5-8 reached the run, the ledger still says 0-4
    held = {m.key: m.step for m in client.get_run(run_id).data.to_proto().metrics}  # what a start reads
    write(metrics, range(9, 12))
    assert Sender(client, run_id, metrics, ledger, held).send_pending() == 2 * 3
    assert history(client, run_id) == [(s, s / 10) for s in range(12)]


def test_requests_hold_at_most_mlflows_limit_of_metrics(tmp_path: Path, mlflow_run) -> None:
    client, run_id = mlflow_run
    metrics, ledger = tmp_path / 'metrics.jsonl', tmp_path / 'mlflow.json'
    write(metrics, range(BATCH))  # two metrics a line
    counted = Counted(client)
    assert Sender(counted, run_id, metrics, ledger, held={}).send_pending() == 2 * BATCH
    assert counted.requests == 2
    assert len(history(client, run_id, 'lr')) == BATCH


@pytest.mark.parametrize(('outcome', 'status'), [
    ('completed', 'FINISHED'), ('preempted', 'KILLED'), ('failed', 'FAILED'), (None, 'FAILED')])
def test_status_is_finished_only_for_a_completed_start(outcome: str | None, status: str) -> None:
    assert status_of(outcome) == status


def test_a_start_that_changed_a_key_keeps_the_parameter_and_tags_the_new_value(tmp_path: Path) -> None:
    """MLflow refuses to change a parameter: a resume with another ``optimizer.lr`` must neither fail nor lose it."""
    from types import SimpleNamespace

    from prefix.config import MLflowConfig
    from prefix.run import RunDir
    from prefix.trackers.mlflow_run import MLflow

    run = RunDir.for_run(str(tmp_path), 'smoke').create()
    uri = (tmp_path / 'mlruns').as_uri()
    run_id = None
    for number, lr in enumerate([0.003, 0.001, 0.001, 0.003], 1):
        tracker = MLflow(MLflowConfig(), uri, run_id, run, number, lambda: 'preempted')
        tracker.init(None, None)  # type: ignore[arg-type]
        tracker.log_hyperparameters({'optimizer.lr': lr, 'model.n_layers': 2, 'optimizer.betas': [0.9, 0.95],
                                     'model.kwargs.{bad}': 1, 'model.config.name': 'x' * 600})
        tracker.fit_start(SimpleNamespace(timestamp=SimpleNamespace(batch=10 * number)), None)  # type: ignore[arg-type]
        tracker.post_close()
        run_id = tracker._run_id
        held = tracker._mlflow_client.get_run(run_id).data
        assert held.params == {'optimizer.lr': '0.003', 'model.n_layers': '2', 'optimizer.betas': '[0.9, 0.95]',
                               'model.config.name': 'x' * 500}, 'the first values, a name MLflow refuses left out'
        assert {k: v for k, v in held.tags.items() if k.startswith('prefix.latest.')} == (
            {'prefix.latest.optimizer.lr': str(lr)} if number > 1 else {}), 'the value now, once it changed'
