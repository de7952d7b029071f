"""The run's resolved config as every tracker's hyperparameters, so that runs can be compared by what they were given.

The config is flattened to dotted keys (``optimizer.lr``, ``model.n_layers``) and logged through Composer's own
path, ``Logger.log_hyperparameters``, once every tracker has started (``Event.INIT``); each tracker keeps them
within its own limits (``prefix.trackers.loggers``, ``prefix.trackers.mlflow_run``).
"""

from __future__ import annotations

from typing import Any

from composer.core import Callback, State
from composer.loggers import Logger

from prefix.config import flatten

LEFT_OUT = ('loggers',)  # the trackers' own settings: nothing runs differ by, and a tracking URI may hold a password


class Hyperparameters(Callback):
    """Logs the resolved config (``config_lib.to_dict``) as hyperparameters at every start: a resumed start's
    changed keys reach the trackers too (what each tracker makes of a changed value: docs/trackers.md)."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.hyperparameters = flatten({k: v for k, v in config.items() if k not in LEFT_OUT})

    def init(self, state: State, logger: Logger) -> None:
        # Composer runs Event.INIT on the loggers first: the trackers have started (W&B's run exists).
        logger.log_hyperparameters(self.hyperparameters)
