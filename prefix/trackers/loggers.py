"""Experiment trackers (``loggers:`` in the config): one prefix run is one tracker run, however often it starts.

Each tracker is a Composer ``LoggerDestination`` on rank 0 (Composer's MLflow and W&B loggers, with
their start made rank-local), and continues the tracker run whose id ``meta/trackers.json`` keeps:

- TensorBoard writes to ``logs/tensorboard/``; a start purges the events from the step it resumed
  from on, so that the steps trained again replace, in TensorBoard's view, the ones the kill
  interrupted (the resume step's own values are written again from ``logs/metrics.jsonl``).
- MLflow continues its run, kept equal to ``logs/metrics.jsonl`` by a sender thread that catches up
  whatever the server missed (``prefix.trackers.mlflow_run``); the run is tagged with each start.
- W&B continues its run (``resume='allow'``); steps at or below the run's latest are not sent (W&B
  would refuse them), and each start is recorded in the run's config. Offline, each start is a local
  run with the same id, which ``wandb sync`` merges.

Each gets the run's config as hyperparameters (``prefix.trackers.hparams``): TensorBoard's HParams of the first
start, MLflow's parameters as first logged (a value changed on resume as a ``prefix.latest.<key>`` tag), W&B's
config as of the latest start.

Each start shows as a ``prefix.start.<n>`` tag or config entry (value: the step it began from) and,
in TensorBoard and MLflow, a ``prefix/start`` metric at that step. A tracker that fails (a server that
cannot be reached, a full disk) never stops training: it is dropped with one warning, and the metrics
stay in ``logs/metrics.jsonl``. MLflow's status and W&B's exit code are how the start ended
(``Journal.outcome``), set once: FINISHED / 0 only when training completed.
"""

from __future__ import annotations

import json
import logging
import os
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

from composer.core import Event, State
from composer.loggers import Logger, LoggerDestination, WandBLogger

from prefix.config import LoggersConfig, MLflowConfig, WandBConfig
from prefix.distributed import PREEMPTED_EXIT_CODE, describe
from prefix.files import atomic_write_text, jsonl
from prefix.run import RunDir
from prefix.trackers.mlflow_run import START_KEY, MLflow, complete, ended

log = logging.getLogger(__name__)

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

    The hyperparameters (the config) are written at each start's first step, for the HParams dashboard, which
    shows those of the first start: TensorBoard keeps the first it reads of a run.
    """

    def __init__(self, folder: Path, start_number: int, metrics_path: Path) -> None:
        super().__init__()
        self.folder, self.start_number, self.metrics_path = folder, start_number, metrics_path
        self._writer: Any = None
        self._step = 0
        self._replayed: set[str] = set()  # step-R metrics written from logs/metrics.jsonl
        self._hparams: dict[str, Any] = {}

    def fit_start(self, state: State, logger: Logger) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._step = step = int(state.timestamp.batch)
        self._writer = SummaryWriter(str(self.folder), purge_step=step, flush_secs=3600)
        for key, (value, at) in values_at(self.metrics_path, step).items():
            self._writer.add_scalar(key, value, step, walltime=at)
            self._replayed.add(key)
        self._writer.add_scalar(START_KEY, self.start_number, step)
        if self._hparams:
            self._writer.file_writer.add_summary(hparams_summary(self._hparams), step)
        self._writer.flush()

    def log_hyperparameters(self, hyperparameters: dict[str, Any]) -> None:
        self._hparams.update(hyperparameters)

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


class WandB(WandBLogger):
    """Composer's WandBLogger continuing one W&B run; steps W&B already holds are not sent again."""

    def __init__(self, cfg: WandBConfig, run_id: str, run_name: str, folder: Path, start_number: int,
                 outcome: Callable[[], Optional[str]]) -> None:
        super().__init__(project=cfg.project, entity=cfg.entity, name=run_name,
                         init_kwargs={'id': run_id, 'resume': 'allow', 'dir': str(folder)})
        self.start_number, self.outcome = start_number, outcome
        self._next_step = 0  # W&B refuses steps below the run's current one
        self._ended = False

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

    def log_hyperparameters(self, hyperparameters: dict[str, Any]) -> None:
        """Into the run's config; a value a resumed start changed replaces the old one (W&B refuses it otherwise)."""
        import wandb

        if self._enabled:
            wandb.config.update(hyperparameters, allow_val_change=True)

    def log_metrics(self, metrics: dict[str, Any], step: Optional[int] = None) -> None:
        if step is None or step >= self._next_step:
            super().log_metrics(metrics, step)
            self._next_step = max(self._next_step, step or 0)

    def post_close(self) -> None:
        """Finish the run once, with how this start ended: exit code 0 only when training completed; preempted,
        the run is marked preempting (W&B shows it preempted, and resumable)."""
        import wandb

        if self._ended or wandb.run is None or self._is_in_atexit:  # wandb's own exit hook finished it already
            return
        self._ended = True
        outcome = self.outcome()
        if outcome == 'preempted':
            wandb.run.mark_preempting()
        wandb.finish(exit_code={'completed': 0, 'preempted': PREEMPTED_EXIT_CODE}.get(outcome or '', 1))


def hparams_summary(hyperparameters: dict[str, Any]) -> Any:
    """The summary that makes a TensorBoard run a row of the HParams dashboard (``tensorboard --logdir <runs_root>``
    compares runs): numbers stay numbers, lists and booleans are written as text, None is left out.

    Only the session's start, not the experiment: with none, TensorBoard makes the columns of every run's keys.
    """
    from torch.utils.tensorboard.summary import hparams

    shown = {k: v if isinstance(v, (int, float, str)) and not isinstance(v, bool) else json.dumps(v, default=str)
             for k, v in hyperparameters.items() if v is not None}
    return hparams(shown, {})[1]


def values_at(path: Path, step: int) -> dict[str, tuple[float, float]]:
    """The values ``logs/metrics.jsonl`` holds for ``step``, each with its time: the run's own record of a step.

    Read from the end back to the last start that logged ``step`` (within a start, steps only grow), so
    that a start of a long run does not read the whole log.
    """
    values: dict[str, tuple[float, float]] = {}
    for record in jsonl.read_backward(path):
        at = record.get('step')
        if at == step:
            for key, value in record.items():
                if key not in ('step', 'time') and isinstance(value, (int, float)) and key not in values:
                    values[key] = (float(value), record['time'])
        elif isinstance(at, int) and at < step and values:
            break
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


def build(cfg: LoggersConfig, run: RunDir, run_name: str, start_number: int,
          outcome: Callable[[], Optional[str]]) -> list[LoggerDestination]:
    """Rank 0: the configured trackers, each continuing the tracker run whose id ``run.trackers`` keeps.

    ``outcome`` says how the start ended (``Journal.outcome``) when the trackers close.
    """
    ids = _ids(run)
    trackers: list[LoggerDestination] = []
    if cfg.tensorboard is not None:
        trackers.append(Guarded('TensorBoard', TensorBoard(run.tensorboard, start_number, run.metrics)))
    if cfg.mlflow is not None:
        tracking = _reachable_mlflow(cfg.mlflow, ids, run, 'this start logs nothing to MLflow',
                                     lambda uri, known: MLflow(cfg.mlflow, uri, known, run, start_number, outcome))
        if tracking is not None:
            trackers.append(Guarded('MLflow', tracking))
    if cfg.wandb is not None:
        ids.setdefault('wandb_run_id', uuid.uuid4().hex[:16])
        trackers.append(Guarded('W&B', WandB(cfg.wandb, ids['wandb_run_id'], run_name, run.logs, start_number,
                                             outcome)))
    if trackers:
        trackers.append(Guarded('keeping the tracker ids', _IdKeeper(run.trackers, ids, trackers)))
    return trackers


def complete_all(cfg: LoggersConfig, run: RunDir) -> None:
    """Rank 0, for a run already complete: a tracker that missed its end (MLflow down when it completed) gets it now.

    Costs nothing when the trackers had it: TensorBoard's files are written as training goes, W&B's
    offline runs are synced by ``wandb sync``, and MLflow's ledger says whether its run was ended.
    """
    if cfg.mlflow is None:
        return
    ids = _ids(run)
    known = _kept_mlflow_run(ids, _mlflow_uri(cfg.mlflow, run))
    if known is not None and ended(known, run):
        return
    found = _reachable_mlflow(cfg.mlflow, ids, run, 'its run is completed the next time this command runs',
                              lambda uri, known: (uri, complete(cfg.mlflow, uri, known, run)))
    if found is not None and found[1] != known:
        ids.update(mlflow_run_id=found[1], mlflow_tracking_uri=found[0])
        atomic_write_text(run.trackers, json.dumps(ids, indent=2) + '\n')


def _ids(run: RunDir) -> dict[str, Any]:
    return json.loads(run.trackers.read_text()) if run.trackers.exists() else {}


def _mlflow_uri(cfg: MLflowConfig, run: RunDir) -> str:
    return cfg.tracking_uri or os.environ.get('MLFLOW_TRACKING_URI') or run.mlruns.as_uri()


def _kept_mlflow_run(ids: dict[str, Any], uri: str) -> Optional[str]:
    """The MLflow run earlier starts kept, if they logged to the same server."""
    return ids.get('mlflow_run_id') if ids.get('mlflow_tracking_uri') == uri else None


def _reachable_mlflow(cfg: MLflowConfig, ids: dict[str, Any], run: RunDir, otherwise: str,
                      make: Callable[[str, Optional[str]], Any]) -> Any:
    """``make(uri, kept run id)`` if the MLflow server answers (None, with one warning, if not)."""
    uri = _mlflow_uri(cfg, run)
    problem = unreachable(uri)
    if problem is not None:
        log.warning('the MLflow server %s cannot be reached (%s); %s, the metrics stay in logs/metrics.jsonl and go '
                    'to MLflow when it answers again', uri, problem, otherwise)
        return None
    os.environ.setdefault('MLFLOW_HTTP_REQUEST_TIMEOUT', str(HTTP_TIMEOUT_S))
    os.environ.setdefault('MLFLOW_HTTP_REQUEST_MAX_RETRIES', '2')
    try:
        return make(uri, _kept_mlflow_run(ids, uri))
    except Exception as e:  # Composer's constructor already talks to the server (the experiment)
        log.warning('MLflow at %s failed (%s); %s, the metrics stay in logs/metrics.jsonl', uri, describe(e), otherwise)
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
