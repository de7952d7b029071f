"""What a person watching a run's console reads when it is not a terminal (a pod's log, a file): one line per
``log_interval`` steps and one per evaluation, instead of Composer's block of a dozen lines per interval.

On a terminal Composer's progress bar does this job (``prefix.train``).
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, Optional

from composer.core import State, TimeUnit
from composer.loggers import Logger, LoggerDestination

from prefix.run.runinfo import LOSS
from prefix.run.runs import number

EVAL_PREFIX = 'metrics/val/'


def total_batches(state: State) -> Optional[int]:
    """``max_duration`` in batches (an epoch is the train loader's length); None when it cannot be known."""
    duration = state.max_duration
    if duration is None:
        return None
    if duration.unit == TimeUnit.BATCH:
        return int(duration.value)
    if duration.unit == TimeUnit.EPOCH and state.dataloader_len is not None:
        return int(duration.value) * int(state.dataloader_len)
    return None


def clock(seconds: float) -> str:
    """``1:02:03`` / ``2:03``: a duration as a person reads it."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f'{hours}:{minutes:02d}:{secs:02d}' if hours else f'{minutes}:{secs:02d}'


class ConsoleLine(LoggerDestination):
    """``step 20/60  loss 3.9129  lr 2.9e-03  2.6k tok/s  eta 0:12`` every ``interval`` steps (rank 0)."""

    def __init__(self, interval: int) -> None:
        super().__init__()
        self.interval = max(1, interval)
        self._loss: Optional[float] = None
        self._eval: dict[str, float] = {}
        self._mark: Optional[tuple[float, int, int]] = None  # (time, step, tokens) of the last line

    def fit_start(self, state: State, logger: Logger) -> None:
        self._mark = (time.monotonic(), int(state.timestamp.batch), int(state.timestamp.token))

    def log_metrics(self, metrics: dict[str, Any], step: Optional[int] = None) -> None:
        for key, value in metrics.items():
            if key == LOSS:
                self._loss = float(value)
            elif key.startswith(EVAL_PREFIX):
                self._eval[key[len(EVAL_PREFIX):]] = float(value)

    def batch_end(self, state: State, logger: Logger) -> None:
        step = int(state.timestamp.batch)
        if step % self.interval and step != 1:
            return
        now, tokens = time.monotonic(), int(state.timestamp.token)
        total = total_batches(state)
        parts = [f'step {step}/{total if total is not None else "?"}']
        if self._loss is not None:
            parts.append(f'loss {self._loss:.4f}')
        parts.append(f'lr {state.optimizers[0].param_groups[0]["lr"]:.2e}')
        if self._mark is not None and now > self._mark[0] and step > self._mark[1]:
            seconds, steps = now - self._mark[0], step - self._mark[1]
            parts.append(f'{number(round((tokens - self._mark[2]) / seconds))} tok/s')
            if total is not None:
                parts.append(f'eta {clock(seconds / steps * max(0, total - step))}')
        self._mark = (now, step, tokens)
        self._say('  '.join(parts))

    def eval_end(self, state: State, logger: Logger) -> None:
        shown = '  '.join(f'{name} {value:.4f}' for name, value in sorted(self._eval.items()) if math.isfinite(value))
        if shown:
            self._say(f'eval at step {int(state.timestamp.batch)}: {shown}')
        self._eval = {}

    @staticmethod
    def _say(line: str) -> None:
        print(line, file=sys.stdout, flush=True)
