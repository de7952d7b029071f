"""The run directory contract: ``<runs_root>/<run_name>/{checkpoints,logs,meta}``, stable for a run name."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# The files in meta/ and logs/ that the trainer writes and ``prefix runs``/``show``/``plot`` read.
STARTS_FILE = 'starts.jsonl'        # meta/: a start record per start, an end record per start that ended on its own
CHECKPOINT_FILE = 'checkpoint.json'  # meta/: the last committed checkpoint, summarized
METRICS_FILE = 'metrics.jsonl'      # logs/: every metric Composer logs, with its step and time
TRACKERS_FILE = 'trackers.json'     # meta/: the tracker runs (MLflow, W&B) this run continues at every start


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def checkpoints(self) -> Path:
        return self.root / 'checkpoints'

    @property
    def logs(self) -> Path:
        return self.root / 'logs'

    @property
    def meta(self) -> Path:
        return self.root / 'meta'

    @property
    def metrics(self) -> Path:
        return self.logs / METRICS_FILE

    @property
    def trackers(self) -> Path:
        return self.meta / TRACKERS_FILE

    @property
    def tensorboard(self) -> Path:
        """TensorBoard's log dir: ``tensorboard --logdir`` on it shows the run."""
        return self.logs / 'tensorboard'

    @property
    def mlruns(self) -> Path:
        """MLflow's file store when no tracking server is configured."""
        return self.logs / 'mlruns'

    @classmethod
    def for_run(cls, runs_root: str, run_name: str) -> RunDir:
        from prefix.config import validate_run_name  # here: `prefix runs` reads run directories without torch

        return cls(Path(runs_root).expanduser().resolve() / validate_run_name(run_name))

    def create(self) -> RunDir:
        for folder in (self.checkpoints, self.logs, self.meta):
            folder.mkdir(parents=True, exist_ok=True)
        return self
