"""Experiment trackers (``loggers:``): TensorBoard, MLflow and W&B, one tracker run per prefix run."""

from prefix import exports

__getattr__, __dir__ = exports(
    __name__,
    loggers=['build', 'complete_all'],
)
