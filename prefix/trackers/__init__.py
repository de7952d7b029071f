"""Experiment trackers (``loggers:``): TensorBoard, MLflow and W&B, one tracker run per prefix run; what they show of a
run besides its loss: its config as hyperparameters, and per-step training signals."""

from prefix import exports

__getattr__, __dir__ = exports(
    __name__,
    loggers=['build', 'complete_all'],
    hparams=['Hyperparameters'],
    signals=['Signals'],
)
