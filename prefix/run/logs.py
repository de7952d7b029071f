"""What a run writes to ``logs/``: the per-step metrics as JSON lines (each rank's console: ``prefix.run.tee``)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Optional

from composer.core import State
from composer.loggers import Logger, LoggerDestination

from prefix.distributed import RankFailures


def _plain(value: Any) -> Any:
    if hasattr(value, 'item'):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsLogger(LoggerDestination):
    """Append every metric Composer logs, with its step, to ``logs/metrics.jsonl`` (rank 0 only).

    Lines are buffered and written once a step, at the step's end and after an evaluation: everything
    logged before a checkpoint is committed is in the file by then (the commit follows at
    ``batch_checkpoint``), so a killed run never resumes past a step whose lines it lost. Only what is
    logged after that (a checkpoint's own report) waits for the next step's write, or the close.
    A failed write (a full disk) is held in ``failures``, so that every rank stops together.
    """

    def __init__(self, path: Path, failures: RankFailures) -> None:
        super().__init__()
        self.path = path
        self.failures = failures
        self._file: Optional[Any] = None

    def init(self, state: State, logger: Logger) -> None:
        from composer.utils import dist

        if dist.get_global_rank() == 0:
            with self.failures.guard(f'opening {self.path}'):
                self._file = self.path.open('a', buffering=1 << 20)

    def log_metrics(self, metrics: dict[str, Any], step: Optional[int] = None) -> None:
        if self._file is None or not metrics or self.failures.failed:
            return
        record = {'step': step, 'time': round(time.time(), 3)}
        record.update({k: _plain(v) for k, v in metrics.items()})
        with self.failures.guard(f'writing {self.path}'):
            self._file.write(json.dumps(record) + '\n')

    def batch_end(self, state: State, logger: Logger) -> None:
        self._write()

    def eval_end(self, state: State, logger: Logger) -> None:
        self._write()

    def _write(self) -> None:
        if self._file is not None and not self.failures.failed:
            with self.failures.guard(f'writing {self.path}'):
                self._file.flush()

    def close(self, state: State, logger: Logger) -> None:
        if self._file is not None:
            with self.failures.guard(f'writing {self.path}'):
                self._file.close()
            self._file = None
