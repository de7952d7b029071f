"""The run directory contract: ``<runs_root>/<run_name>/{checkpoints,logs,meta}``, stable for a run name.

``RunDir`` knows every path of a run: the trainer writes and ``prefix runs``/``show``/``plot``,
the chaos tool and the benchmarks read through it. Torch-free.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from prefix.config import validate_run_name
from prefix.errors import PrefixError


@dataclass(frozen=True)
class RunDir:
    root: Path

    @classmethod
    def for_run(cls, runs_root: str, run_name: str) -> RunDir:
        return cls(Path(runs_root).expanduser().resolve() / validate_run_name(run_name))

    def create(self) -> RunDir:
        """Make the run's folders (a resume finds them there); a runs_root that cannot hold them is one line."""
        for folder in (self.checkpoints, self.logs, self.meta):
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise PrefixError(f'cannot create the run directory {folder}: {e.strerror} ({e.filename}); give '
                                  'runs_root (or $PREFIX_RUNS_ROOT) a folder you can write to') from None
            if not os.access(folder, os.W_OK):  # a run found on a volume mounted read-only: nothing could be saved
                raise PrefixError(f'cannot write to the run directory {folder} (a read-only mount, or not yours): mount '
                                  'it writable, or give runs_root (or $PREFIX_RUNS_ROOT) a folder you can write to')
        return self

    @property
    def name(self) -> str:
        return self.root.name

    # --- checkpoints/: the checkpoint contract (prefix.checkpoint.checkpoint names the files in it) ---
    @property
    def checkpoints(self) -> Path:
        return self.root / 'checkpoints'

    # --- logs/ ---
    @property
    def logs(self) -> Path:
        return self.root / 'logs'

    def console(self, rank: int) -> Path:
        """Everything rank ``rank`` printed."""
        return self.logs / f'rank{rank}.log'

    @property
    def metrics(self) -> Path:
        """Every metric Composer logs, with its step and time (JSON lines)."""
        return self.logs / 'metrics.jsonl'

    @property
    def plot(self) -> Path:
        """Written by ``prefix plot``."""
        return self.logs / 'loss.png'

    @property
    def tensorboard(self) -> Path:
        """TensorBoard's log dir: ``tensorboard --logdir`` on it shows the run."""
        return self.logs / 'tensorboard'

    @property
    def mlruns(self) -> Path:
        """MLflow's file store when no tracking server is configured."""
        return self.logs / 'mlruns'

    # --- meta/ ---
    @property
    def meta(self) -> Path:
        return self.root / 'meta'

    @property
    def config(self) -> Path:
        """The fully resolved config of the latest start."""
        return self.meta / 'config.yaml'

    @property
    def git(self) -> Path:
        return self.meta / 'git.json'

    @property
    def env(self) -> Path:
        return self.meta / 'env.json'

    @property
    def starts(self) -> Path:
        """A start record per start, an end record per start that ended on its own (JSON lines)."""
        return self.meta / 'starts.jsonl'

    @property
    def checkpoint_summary(self) -> Path:
        """The last committed checkpoint, summarized, so that ``prefix runs`` need not open checkpoints."""
        return self.meta / 'checkpoint.json'

    @property
    def config_changes(self) -> Path:
        """Every accepted config change on resume (JSON lines)."""
        return self.meta / 'config_changes.jsonl'

    @property
    def lock(self) -> Path:
        """The run lock; its claims live next to it (prefix.run.runlock)."""
        return self.meta / 'lock.json'

    @property
    def trackers(self) -> Path:
        """The tracker runs (MLflow, W&B) this run continues at every start."""
        return self.meta / 'trackers.json'

    @property
    def mlflow_ledger(self) -> Path:
        """How much of ``logs/metrics.jsonl`` the MLflow run is known to hold (prefix.trackers.mlflow_run)."""
        return self.meta / 'mlflow.json'
