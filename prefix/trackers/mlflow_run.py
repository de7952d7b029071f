"""MLflow: one MLflow run per prefix run, kept equal to ``logs/metrics.jsonl``, and ended with the truth.

Metrics do not go through MLflow's asynchronous queue, whose failures stay on its own thread and
leave holes. A ``Sender`` thread reads ``logs/metrics.jsonl`` from where the MLflow run is known to
hold everything before, and sends what follows in file order, ``BATCH`` metrics per request, each
request answered before the next. ``meta/mlflow.json`` (the ledger) keeps how far that is: a byte
offset into the file and, for each metric, the last step before it. Only the first value the file
holds for a (metric, step) is sent: steps trained again after a resume are bit-exact repeats. So a
run holds, for each metric, every step the file holds up to a point, and nothing past it: a start
reads that point from the server (the run's latest step of each metric), which settles the one
request a kill may leave between its answer and the ledger.

A server that goes away is tried again every ``RETRY_S`` (one warning), and what it missed is sent
when it answers again, within the same start or at a later one; a run that completed meanwhile is
caught up by the next ``composer -m prefix.train`` of the same command (``complete``). The thread
reads a file and sends floats: it never touches CUDA.

Each start ends the run once, with the truth: FINISHED only when training completed, KILLED when it
was preempted, FAILED otherwise, whatever Composer's exit hooks call afterwards.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from composer.core import State
from composer.loggers import Logger, MLFlowLogger

from prefix.config import MLflowConfig
from prefix.distributed import describe
from prefix.files import atomic_write_text, jsonl
from prefix.run import RunDir, start_steps

log = logging.getLogger(__name__)

START_KEY = 'prefix/start'  # the metric that marks a start (in MLflow and TensorBoard), at the step it began from
BATCH = 1000  # metrics per request, MLflow's limit
FLUSH_S = 5.0  # how often the sender looks for new lines
RETRY_S = 10.0  # how often a server that failed is tried again
CLOSE_S = 15.0  # at the end of a start, the longest the sender is waited for; what it has not sent goes later
PARAM_CHARS = 500  # the longest parameter value every MLflow server accepts (6000 from MLflow 2.x's newer stores)
NAME = re.compile(r'[\w./\- :]{1,250}')  # the parameter and tag names MLflow accepts (one it refuses fails its request)
LATEST = 'prefix.latest.'  # the tag of a parameter a later start changed: its value now (MLflow never changes a parameter)
PARAMS_BATCH = 100  # parameters (or tags) per request, MLflow's limit
STATUS = {'completed': 'FINISHED', 'preempted': 'KILLED'}  # how a start ended, as MLflow says it; else FAILED


def status_of(outcome: Optional[str]) -> str:
    """MLflow's status for a start that ended ``outcome`` (``Journal.outcome``; None: it never said)."""
    return STATUS.get(outcome or '', 'FAILED')


@dataclass
class Ledger:
    """How far the MLflow run ``run_id`` holds ``logs/metrics.jsonl``: every first (metric, step) before ``offset``.

    ``last``: for each metric, the last step the file holds before ``offset`` (a later line at or below
    it is a repeat). ``finished``: the run was ended FINISHED with the file sent to ``offset``.
    """

    run_id: str
    offset: int = 0
    last: dict[str, int] = field(default_factory=dict)
    finished: bool = False

    @classmethod
    def load(cls, path: Path, run_id: str) -> Ledger:
        """The ledger of ``run_id``; an empty one for another run, or none."""
        try:
            data = json.loads(path.read_text())
            if data.get('run_id') == run_id:
                return cls(run_id, int(data['offset']), {k: int(v) for k, v in data['last'].items()},
                           bool(data['finished']))
        except (FileNotFoundError, ValueError, KeyError, TypeError, AttributeError):
            pass
        return cls(run_id)

    def save(self, path: Path) -> None:
        atomic_write_text(path, json.dumps(asdict(self)) + '\n')


def _number(value: Any) -> Optional[float]:
    """A metric's value as ``logs/metrics.jsonl`` holds it, as a float (non-finite ones are strings there)."""
    if isinstance(value, (int, float)):
        return float(value)
    if value in ('nan', 'inf', '-inf'):
        return float(value)
    return None


class Sender:
    """Sends ``logs/metrics.jsonl`` past the ledger to one MLflow run: on a thread during a start, or at once."""

    def __init__(self, client: Any, run_id: str, metrics: Path, ledger_path: Path, held: dict[str, int],
                 rename: Callable[[str], str] = str) -> None:
        self.client, self.run_id, self.metrics, self.ledger_path = client, run_id, metrics, ledger_path
        self.ledger = Ledger.load(ledger_path, run_id)
        self.held = held  # the run's latest step of each metric when this start began
        self.rename = rename
        self.first: dict[str, Any] = {}  # what is sent before the metrics: the starts the run lacks
        self.params: dict[str, str] = {}  # parameters to send once (those the run lacks)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._status: Optional[str] = None
        self.unsent: Optional[str] = None  # why the end of the start did not reach MLflow

    def send_pending(self) -> int:
        """Send the start's first records and parameters, then every line the file holds past the ledger.

        Returns the number of metrics sent; raises at the first request that fails (what it held stays
        unsent, and the ledger says so).
        """
        if self.first:  # the starts the run lacks: tags, and their metric
            metrics, tags = self.first['metrics'], self.first['tags']
            for i in range(0, max(len(metrics), len(tags)), PARAMS_BATCH):
                self.client.log_batch(self.run_id, metrics=metrics[i:i + PARAMS_BATCH], tags=tags[i:i + PARAMS_BATCH],
                                      synchronous=True)
            self.first = {}
        if self.params:  # best effort: a server that refuses them does not hold up the metrics
            from mlflow.entities import Param

            params, self.params = [Param(k, v) for k, v in self.params.items()], {}
            try:
                for i in range(0, len(params), PARAMS_BATCH):
                    self.client.log_batch(self.run_id, params=params[i:i + PARAMS_BATCH], synchronous=True)
            except Exception as e:
                log.warning('MLflow did not take the run\'s parameters (%s); a later start sends them again', describe(e))
        sent, batch, last, end = 0, [], dict(self.ledger.last), self.ledger.offset
        for record, line_end in jsonl.read_from(self.metrics, self.ledger.offset):
            firsts, seen = self._firsts(record, last) if record is not None else ([], {})
            if batch and len(batch) + len(firsts) > BATCH:
                sent += self._commit(batch, end, last)  # the ledger never counts a line it has not sent
                batch = []
            batch.extend(firsts)
            last.update(seen)
            end = line_end
        if end != self.ledger.offset or batch:
            sent += self._commit(batch, end, last)
        return sent

    def _firsts(self, record: dict[str, Any], last: dict[str, int]) -> tuple[list[Any], dict[str, int]]:
        """The record's (metric, step) pairs the file holds for the first time: those the run lacks, as MLflow
        metrics, and the new last step of each."""
        from mlflow.entities import Metric

        step, at = record.get('step'), record.get('time')
        if not isinstance(step, int) or not isinstance(at, (int, float)):
            return [], {}
        firsts, seen = [], {}
        for key, value in record.items():
            number = _number(value)
            if key in ('step', 'time') or number is None or step <= last.get(key, -1):
                continue
            seen[key] = step
            name = self.rename(key)
            if step > self.held.get(name, -1):
                firsts.append(Metric(name, number, int(at * 1000), step))
        return firsts, seen

    def _commit(self, batch: list[Any], end: int, last: dict[str, int]) -> int:
        if batch:
            self.client.log_batch(self.run_id, metrics=batch, synchronous=True)
        self.ledger = Ledger(self.run_id, end, dict(last))
        self.ledger.save(self.ledger_path)
        return len(batch)

    def end(self, status: str) -> int:
        """Everything left, then the run's status; FINISHED is noted in the ledger (a later ``complete`` has
        nothing to do). Returns the number of metrics sent."""
        sent = self.send_pending()
        self.client.set_terminated(self.run_id, status=status)
        if status == 'FINISHED':
            self.ledger.finished = True
            self.ledger.save(self.ledger_path)
        return sent

    # --- during a start ---
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name='prefix-mlflow', daemon=True)
        self._thread.start()

    def _run(self) -> None:
        failing: Optional[str] = None
        stopping = False  # the first pass at once: a start killed in its first seconds still shows
        while True:
            try:
                sent = self.send_pending()
                if stopping:
                    assert self._status is not None
                    self.end(self._status)
            except Exception as e:
                if stopping:
                    self.unsent = describe(e)
                    return
                if failing is None:
                    log.warning('MLflow failed (%s); training goes on, the metrics stay in logs/metrics.jsonl and go '
                                'to MLflow when it answers again (tried every %.0f s)', describe(e), RETRY_S)
                failing = describe(e)
            else:
                if failing is not None:
                    log.warning('MLflow answers again: sent the %d metrics it missed', sent)
                    failing = None
                if stopping:
                    return
            stopping = self._stop.wait(RETRY_S if failing else FLUSH_S)

    def close(self, status: str) -> None:
        """Send what is left and end the run ``status``, waiting at most ``CLOSE_S``; what fails goes at a later start."""
        self._status = status
        self._stop.set()
        if self._thread is not None:
            self._thread.join(CLOSE_S)
            if self._thread.is_alive():
                self.unsent = f'no answer within {CLOSE_S:.0f} s'
        if self.unsent is not None:
            log.warning('MLflow did not get the end of this start (%s): its run stays RUNNING until the same command '
                        'runs again, which sends the rest and its status', self.unsent)


class MLflow(MLFlowLogger):
    """Composer's MLFlowLogger continuing one MLflow run: metrics from ``logs/metrics.jsonl`` by a ``Sender``,
    its starts as tags, its status set once by ``outcome``."""

    def __init__(self, cfg: MLflowConfig, tracking_uri: str, run_id: Optional[str], run: RunDir,
                 start_number: int, outcome: Callable[[], Optional[str]]) -> None:
        super().__init__(experiment_name=cfg.experiment_name, run_name=run.name, tracking_uri=tracking_uri,
                         log_system_metrics=False)
        self.known_run_id, self.run, self.start_number, self.outcome = run_id, run, start_number, outcome
        self.sender: Optional[Sender] = None
        self._params: dict[str, str] = {}  # the hyperparameters (the config, Composer's), sent once by the sender
        self._held_params: dict[str, str] = {}  # the parameters the run holds (MLflow refuses to change one)
        self._held_tags: dict[str, str] = {}
        self._held_starts: set[int] = set()  # the starts the run's START_KEY metric holds
        self._ended = False

    def open(self) -> Sender:
        """Continue the kept run (a new one, with a warning, if the server lost it); a sender for it."""
        import mlflow

        run = None
        if self.known_run_id is not None:
            try:
                run = self._mlflow_client.get_run(self.known_run_id)
            except mlflow.exceptions.MlflowException as e:
                log.warning('the MLflow run %s this run kept is gone (%s); starting a new one', self.known_run_id,
                            describe(e))
        if run is None:
            run = self._mlflow_client.create_run(self._experiment_id, run_name=self.run_name)
        self._run_id = run.info.run_id
        held = {m.key: m.step for m in run.data.to_proto().metrics}
        self._held_params, self._held_tags = dict(run.data.params), dict(run.data.tags)
        self._held_starts = {int(m.value) for m in self._mlflow_client.get_metric_history(self._run_id, START_KEY)}
        return Sender(self._mlflow_client, self._run_id, self.run.metrics, self.run.mlflow_ledger, held, self.rename)

    def starts(self, step: Optional[int] = None) -> dict[str, list[Any]]:
        """What the run lacks of the starts so far (this one began at ``step``): each start's tag and metric.

        Earlier starts too: one killed before its sender's first request still shows.
        """
        from mlflow.entities import Metric, RunTag

        steps = dict(enumerate(start_steps(self.run), 1))
        if step is not None:
            steps[self.start_number] = step
        now = int(time.time() * 1000)
        return {'tags': [RunTag(f'prefix.start.{n}', str(s)) for n, s in steps.items()
                         if self._held_tags.get(f'prefix.start.{n}') != str(s)],
                'metrics': [Metric(START_KEY, n, now, s) for n, s in steps.items() if n not in self._held_starts]}

    def init(self, state: State, logger: Logger) -> None:
        # Composer's init starts MLflow's fluent run (whose exit hook ends it FINISHED) and broadcasts its
        # id; here only rank 0 has a tracker, and the client alone talks to the server.
        self.sender = self.open()
        self._mlflow_client.update_run(self._run_id, status='RUNNING')

    def fit_start(self, state: State, logger: Logger) -> None:
        assert self.sender is not None
        self.sender.first = self.starts(int(state.timestamp.batch))
        self.sender.first['tags'].extend(self.changed())
        self.sender.params = {k: v for k, v in self._params.items() if k not in self._held_params}
        self.sender.start()

    def changed(self) -> list[Any]:
        """A ``prefix.latest.<key>`` tag for each parameter whose value this start changed (a config key changed on
        resume, as ``logs/config_changes.jsonl`` records): the run keeps the value first logged as its parameter."""
        from mlflow.entities import RunTag

        return [RunTag(LATEST + k, v) for k, v in self._params.items()
                if k in self._held_params and NAME.fullmatch(LATEST + k)
                and self._held_tags.get(LATEST + k, self._held_params[k]) != v]

    def log_metrics(self, metrics: dict[str, Any], step: Optional[int] = None) -> None:
        """Nothing: the sender sends what ``logs/metrics.jsonl`` holds (``MetricsLogger`` writes every metric there)."""

    def log_hyperparameters(self, hyperparameters: dict[str, Any]) -> None:
        """Kept for the sender, each value cut to ``PARAM_CHARS``; a name MLflow would refuse is left out."""
        self._params.update({k: str(v)[:PARAM_CHARS] for k, v in hyperparameters.items() if NAME.fullmatch(k)})

    def post_close(self) -> None:
        """End the run once, with how this start ended; Composer's exit hook calling again changes nothing."""
        if self._ended or self.sender is None:
            return
        self._ended = True
        self.sender.close(status_of(self.outcome()))


def ended(run_id: str, run: RunDir) -> bool:
    """Whether the MLflow run ``run_id`` was ended FINISHED with all of ``logs/metrics.jsonl`` (the ledger says so)."""
    done = Ledger.load(run.mlflow_ledger, run_id)
    return done.finished and done.offset == (run.metrics.stat().st_size if run.metrics.exists() else 0)


def complete(cfg: MLflowConfig, tracking_uri: str, run_id: Optional[str], run: RunDir) -> str:
    """For a run already complete: send what its MLflow run lacks and end it FINISHED. Returns the run's id."""
    tracker = MLflow(cfg, tracking_uri, run_id, run, 0, lambda: 'completed')
    sender = tracker.open()
    sender.first = tracker.starts()
    sent = sender.end('FINISHED')
    log.warning('the MLflow run %s was not ended when this run completed: sent the %d metrics it lacked, and '
                'ended it FINISHED', sender.run_id, sent)
    return sender.run_id
