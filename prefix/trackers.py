"""Experiment trackers (``loggers:`` in the config): one prefix run is one tracker run, however often it starts.

Each tracker is a Composer ``LoggerDestination`` on rank 0 (Composer's MLflow and W&B loggers, with
their start made rank-local), and continues the tracker run whose id ``meta/trackers.json`` keeps:

- TensorBoard writes to ``logs/tensorboard/``; a start purges the events from the step it resumed
  from on, so that the steps trained again replace, in TensorBoard's view, the ones the kill
  interrupted (the resume step's own values are written again from ``logs/metrics.jsonl``).
- MLflow continues its run and takes each metric only for the steps the run does not hold yet (the
  steps trained again are bit-exact repeats of the ones it holds); the run is tagged with each start.
- W&B continues its run (``resume='allow'``); steps at or below the run's latest are not sent (W&B
  would refuse them), and each start is recorded in the run's config. Offline, each start is a local
  run with the same id, which ``wandb sync`` merges.

Each start shows as a ``prefix.start.<n>`` tag or config entry (value: the step it began from) and,
in TensorBoard and MLflow, a ``prefix/start`` metric at that step. A tracker that fails (a server that
cannot be reached, a full disk) never stops training: it is dropped with one warning, and the metrics
stay in ``logs/metrics.jsonl``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

from composer.core import Event, State
from composer.loggers import Logger, LoggerDestination, MLFlowLogger, WandBLogger

from prefix import jsonl
from prefix.agreement import describe
from prefix.atomic import atomic_write_text
from prefix.config import LoggersConfig, MLflowConfig, WandBConfig
from prefix.preemption import Preempted
from prefix.rundir import RunDir

log = logging.getLogger(__name__)

START_KEY = 'prefix/start'  # the metric that marks a start, at the step it began from
MLFLOW_BATCH = 1000  # metrics per request, MLflow's limit
HTTP_TIMEOUT_S = 10  # an MLflow server that stops answering costs this much, a few times, not minutes


class Guarded(LoggerDestination):
    """A tracker that warns once and is dropped when it fails, instead of failing the run."""

    def __init__(self, name: str, inner: LoggerDestination) -> None:
        super().__init__()
        self.name = name
        self.inner: Optional[LoggerDestination] = inner

    def _call(self, method: Callable[[LoggerDestination], Any]) -> None:
        if self.inner is None:
            return
        try:
            method(self.inner)
        except Exception as e:
            log.warning('%s failed (%s); training goes on without it, the metrics stay in logs/metrics.jsonl',
                        self.name, describe(e))
            self.inner = None

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        self._call(lambda t: t.run_event(event, state, logger))

    def log_metrics(self, metrics: dict[str, Any], step: Optional[int] = None) -> None:
        self._call(lambda t: t.log_metrics(metrics, step))

    def log_hyperparameters(self, hyperparameters: dict[str, Any]) -> None:
        self._call(lambda t: t.log_hyperparameters(hyperparameters))

    def close(self, state: State, logger: Logger) -> None:
        self._call(lambda t: t.close(state, logger))

    def post_close(self) -> None:
        self._call(lambda t: t.post_close())


class TensorBoard(LoggerDestination):
    """Scalars in one event-file folder, each step once across starts.

    A start resuming from step R purges the events from R on: the steps after R are trained again,
    and step R mixes values the kill may have lost (the evaluation logged after batch R, not yet
    flushed) with values trained again (batch R+1's loss, logged at step R). Step R's values are
    written again from ``logs/metrics.jsonl``, and this start's own step-R values that the file
    already holds are dropped (bit-exact repeats). Not Composer's TensorBoardLogger: that one closes
    its event file at every flush (for uploads) and cannot purge. Events are flushed at every batch.
    """

    def __init__(self, folder: Path, start_number: int, metrics_path: Path) -> None:
        super().__init__()
        self.folder, self.start_number, self.metrics_path = folder, start_number, metrics_path
        self._writer: Any = None
        self._step = 0
        self._replayed: set[str] = set()  # step-R metrics written from logs/metrics.jsonl

    def fit_start(self, state: State, logger: Logger) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._step = step = int(state.timestamp.batch)
        self._writer = SummaryWriter(str(self.folder), purge_step=step, flush_secs=3600)
        for (key, _), (value, at) in logged_values(self.metrics_path, lambda key, s: s == step).items():
            self._writer.add_scalar(key, value, step, walltime=at)
            self._replayed.add(key)
        self._writer.add_scalar(START_KEY, self.start_number, step)
        self._writer.flush()

    def log_metrics(self, metrics: dict[str, Any], step: Optional[int] = None) -> None:
        if self._writer is None:
            return
        for key, value in metrics.items():
            if step == self._step and key in self._replayed:
                continue
            if isinstance(value, (int, float)) or getattr(value, 'numel', lambda: 0)() == 1:
                self._writer.add_scalar(key, float(value), step)

    def batch_end(self, state: State, logger: Logger) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self, state: State, logger: Logger) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class MLflow(MLFlowLogger):
    """Composer's MLFlowLogger continuing one MLflow run, each step once, its starts as tags.

    At a start, the steps up to and including the resume point that the run lacks (sent
    asynchronously by a start that was killed, or by one that could not reach the server) are sent
    from ``logs/metrics.jsonl``; then a value is sent only for a step past the latest the run holds.
    """

    def __init__(self, cfg: MLflowConfig, tracking_uri: str, run_id: Optional[str], run_name: str,
                 start_number: int, metrics_path: Path) -> None:
        # Every value sent, even one equal to the step before (Composer's default skips repeats).
        super().__init__(experiment_name=cfg.experiment_name, run_name=run_name, tracking_uri=tracking_uri,
                         log_system_metrics=False, log_duplicated_metric_every_n_steps=1)
        self.known_run_id, self.start_number, self.metrics_path = run_id, start_number, metrics_path
        self._held: dict[str, int] = {}  # per metric, the latest step the run holds

    def init(self, state: State, logger: Logger) -> None:
        # Composer's init also broadcasts the run id to the other ranks; here only rank 0 has a tracker.
        import mlflow

        self.tags['run_name'] = state.run_name
        self._global_exception_occurred = 0
        self._run_id = self.known_run_id
        if self._run_id is not None:
            try:
                run = self._mlflow_client.get_run(self._run_id)
                self._held = {m.key: m.step for m in run.data.to_proto().metrics}
            except mlflow.exceptions.MlflowException as e:
                log.warning('the MLflow run %s this run kept is gone (%s); starting a new one', self._run_id,
                            describe(e))
                self._run_id = None
        if self._run_id is None:
            self._run_id = self._mlflow_client.create_run(self._experiment_id, run_name=self.run_name).info.run_id
        mlflow.start_run(run_id=self._run_id, tags=self.tags, log_system_metrics=False)

    def fit_start(self, state: State, logger: Logger) -> None:
        from mlflow.entities import Metric

        step = int(state.timestamp.batch)
        missing = logged_values(self.metrics_path,
                                lambda key, s: self._held.get(self.rename(key), -1) < s <= step)
        batch = [Metric(self.rename(key), value, int(at * 1000), s) for (key, s), (value, at) in missing.items()]
        for i in range(0, len(batch), MLFLOW_BATCH):
            self._mlflow_client.log_batch(self._run_id, metrics=batch[i:i + MLFLOW_BATCH])
        for metric in batch:
            self._held[metric.key] = max(self._held.get(metric.key, -1), metric.step)
        # Sent now, not queued: the start is not in logs/metrics.jsonl, and a kill loses the queue.
        self._mlflow_client.set_tag(self._run_id, f'prefix.start.{self.start_number}', str(step))
        self._mlflow_client.log_metric(self._run_id, START_KEY, self.start_number, step=step)

    def log_metrics(self, metrics: dict[str, Any], step: Optional[int] = None) -> None:
        step = step or 0
        new = {k: v for k, v in metrics.items() if step > self._held.get(self.rename(k), -1)}
        if new:
            super().log_metrics(new, step)
            self._held.update({self.rename(k): step for k in new})

    def post_close(self) -> None:
        """Flush, and mark the run: FINISHED, KILLED (preempted: a later start continues it) or FAILED."""
        import mlflow

        mlflow.flush_async_logging()
        error = sys.exc_info()[1]
        status = 'FINISHED' if error is None else 'KILLED' if isinstance(error, Preempted) else 'FAILED'
        self._mlflow_client.set_terminated(self._run_id, status=status)
        mlflow.end_run(status)


class WandB(WandBLogger):
    """Composer's WandBLogger continuing one W&B run; steps W&B already holds are not sent again."""

    def __init__(self, cfg: WandBConfig, run_id: str, run_name: str, folder: Path, start_number: int) -> None:
        super().__init__(project=cfg.project, entity=cfg.entity, name=run_name,
                         init_kwargs={'id': run_id, 'resume': 'allow', 'dir': str(folder)})
        self.start_number = start_number
        self._next_step = 0  # W&B refuses steps below the run's current one

    def init(self, state: State, logger: Logger) -> None:
        # Composer's init also broadcasts entity and project to the other ranks; here only rank 0 has a tracker.
        import wandb

        Path(self._init_kwargs['dir']).mkdir(parents=True, exist_ok=True)
        run = wandb.init(**self._init_kwargs)
        self.entity, self.project = run.entity, run.project
        self.run_dir, self.run_url = run.dir, run.get_url()
        self._next_step = run.step

    def fit_start(self, state: State, logger: Logger) -> None:
        import wandb

        wandb.config.update({f'prefix.start.{self.start_number}': int(state.timestamp.batch)}, allow_val_change=True)

    def log_metrics(self, metrics: dict[str, Any], step: Optional[int] = None) -> None:
        if step is None or step >= self._next_step:
            super().log_metrics(metrics, step)
            self._next_step = max(self._next_step, step or 0)


def logged_values(path: Path, wanted: Callable[[str, int], bool]) -> dict[tuple[str, int], tuple[float, float]]:
    """The last value ``logs/metrics.jsonl`` holds for each wanted (metric, step), with its time.

    The file is the run's own record, appended at every step of every start: what a tracker lost
    to a kill or an outage is there.
    """
    values: dict[tuple[str, int], tuple[float, float]] = {}
    for record in jsonl.read(path):
        step = record.get('step')
        if step is None:
            continue
        for key, value in record.items():
            if key not in ('step', 'time') and isinstance(value, (int, float)) and wanted(key, step):
                values[key, step] = (float(value), record['time'])
    return values


def unreachable(uri: str) -> Optional[str]:
    """Why an MLflow server cannot be used now (None if it can); a file store always can."""
    if not uri.startswith(('http://', 'https://')):
        return None
    try:
        with urllib.request.urlopen(uri.rstrip('/') + '/health', timeout=HTTP_TIMEOUT_S):
            return None
    except Exception as e:  # refused, timed out, not a server
        return f'{type(e).__name__}: {e}'


def build(cfg: LoggersConfig, run: RunDir, run_name: str, start_number: int) -> list[LoggerDestination]:
    """Rank 0: the configured trackers, each continuing the tracker run whose id ``run.trackers`` keeps."""
    ids: dict[str, Any] = json.loads(run.trackers.read_text()) if run.trackers.exists() else {}
    trackers: list[LoggerDestination] = []
    if cfg.tensorboard is not None:
        trackers.append(Guarded('TensorBoard', TensorBoard(run.tensorboard, start_number, run.metrics)))
    if cfg.mlflow is not None:
        tracking = _mlflow(cfg.mlflow, ids, run, run_name, start_number)
        if tracking is not None:
            trackers.append(tracking)
    if cfg.wandb is not None:
        ids.setdefault('wandb_run_id', uuid.uuid4().hex[:16])
        trackers.append(Guarded('W&B', WandB(cfg.wandb, ids['wandb_run_id'], run_name, run.logs, start_number)))
    if trackers:
        trackers.append(Guarded('keeping the tracker ids', _IdKeeper(run.trackers, ids, trackers)))
    return trackers


def _mlflow(cfg: MLflowConfig, ids: dict[str, Any], run: RunDir, run_name: str,
            start_number: int) -> Optional[LoggerDestination]:
    uri = cfg.tracking_uri or os.environ.get('MLFLOW_TRACKING_URI') or run.mlruns.as_uri()
    problem = unreachable(uri)
    if problem is not None:
        log.warning('the MLflow server %s cannot be reached (%s); this start logs nothing to MLflow, the metrics '
                    'stay in logs/metrics.jsonl and go to MLflow at a later start that reaches it', uri, problem)
        return None
    os.environ.setdefault('MLFLOW_HTTP_REQUEST_TIMEOUT', str(HTTP_TIMEOUT_S))
    os.environ.setdefault('MLFLOW_HTTP_REQUEST_MAX_RETRIES', '2')
    known = ids.get('mlflow_run_id') if ids.get('mlflow_tracking_uri') == uri else None
    try:
        return Guarded('MLflow', MLflow(cfg, uri, known, run_name, start_number, run.metrics))
    except Exception as e:  # Composer's constructor already talks to the server (the experiment)
        log.warning('MLflow at %s failed (%s); this start logs nothing to MLflow, the metrics stay in '
                    'logs/metrics.jsonl', uri, describe(e))
        return None


class _IdKeeper(LoggerDestination):
    """Once the trackers have started (Event.INIT), keeps their run ids for the next start."""

    def __init__(self, path: Path, ids: dict[str, Any], trackers: list[LoggerDestination]) -> None:
        super().__init__()
        self.path, self.ids, self.trackers = path, ids, trackers

    def init(self, state: State, logger: Logger) -> None:
        for tracker in self.trackers:
            inner = getattr(tracker, 'inner', None)
            if isinstance(inner, MLflow):
                self.ids.update(mlflow_run_id=inner._run_id, mlflow_tracking_uri=inner.tracking_uri)
        atomic_write_text(self.path, json.dumps(self.ids, indent=2) + '\n')
