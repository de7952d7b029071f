"""What a step shows besides its loss: learning rate, throughput and MFU, gradient norm, peak GPU memory.

Composer's monitors measure (``LRMonitor``, ``SpeedMonitor``, ``MemoryMonitor``); ``Signals`` runs each where its
reading belongs to the batch just trained and logs the readings as one record at that batch's step, the step
its loss is logged at. So the redone steps of a resumed start are the loss's redone steps, kept once by the
same means (``logs/metrics.jsonl``, TensorBoard's purge, MLflow's sender, W&B's latest step), and a step costs
one more line of ``logs/metrics.jsonl``, not a dozen: the monitors' other keys (per-device copies, wall-clock
totals) are left out.

Logged under Composer's names:

- ``lr-<optimizer>/group<n>``: the learning rate this step trained with (read before the scheduler steps).
- ``throughput/tokens_per_sec``, ``throughput/device/tokens_per_sec``: this step's own (``WINDOW``); a start's
  first step, which pays for warm-up, has none. ``throughput/device/mfu`` where the model knows its FLOPs
  (``flops_per_batch``) and Composer's table the GPU's peak; never on a CPU.
- ``l2_norm/grad/global``: the gradients' global L2 norm before clipping (Composer's ``OptimizerMonitor`` reads
  them after ``GradientClipping``, where the norm sits at the threshold whenever clipping acts, and logs each
  parameter's norm too, one device sync each).
- ``memory/peak_allocated_mem``, ``memory/peak_reserved_mem`` (GB, since the start began),
  ``memory/alloc_retries``: on a GPU only (Composer's ``MemoryMonitor`` warns everywhere else).
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch
from composer.callbacks import LRMonitor, MemoryMonitor, SpeedMonitor
from composer.core import Callback, Precision, State
from composer.devices import DeviceGPU
from composer.loggers import Logger
from torch.distributed.tensor import DTensor

from prefix.distributed import describe

log = logging.getLogger(__name__)

# Each step's own throughput: the trackers smooth, and every start would go its first WINDOW steps without one.
WINDOW = 1
GRAD_NORM = 'l2_norm/grad/global'
KEPT = ('lr-', 'throughput/tokens_per_sec', 'throughput/device/tokens_per_sec', 'throughput/device/mfu', GRAD_NORM,
        'memory/')
MEMORY_KEYS = {  # torch.cuda.memory_stats() key: name (Composer's MemoryMonitor turns bytes into GB)
    'allocated_bytes.all.peak': 'peak_allocated_mem',
    'reserved_bytes.all.peak': 'peak_reserved_mem',
    'num_alloc_retries': 'alloc_retries',
}


class Readings:
    """Stands in for Composer's ``Logger`` before the monitors: keeps what they log, for one record a step."""

    def __init__(self) -> None:
        self.metrics: dict[str, Any] = {}

    def log_metrics(self, metrics: dict[str, Any], step: Optional[int] = None) -> None:
        self.metrics.update(metrics)

    def take(self) -> dict[str, Any]:
        kept = {k: v for k, v in self.metrics.items() if k.startswith(KEPT)}
        self.metrics = {}
        return kept


class Signals(Callback):
    """Logs a step's learning rate, throughput, MFU, gradient norm and peak memory at the step of its loss."""

    def __init__(self) -> None:
        self.lr = LRMonitor()
        self.speed = SpeedMonitor(window_size=WINDOW)
        self.memory: Optional[MemoryMonitor] = None
        self.readings = Readings()
        self._grad_norm: Optional[torch.Tensor] = None
        self._grad_norm_failed = False

    def init(self, state: State, logger: Logger) -> None:
        self.speed.init(state, logger)  # the GPU's peak FLOPs from Composer's table (0 on a CPU: no MFU)
        if isinstance(state.device, DeviceGPU):
            self.memory = MemoryMonitor(memory_keys=MEMORY_KEYS)

    def after_backward(self, state: State, logger: Logger) -> None:
        # Once per microbatch: the last one's gradients are the batch's, reduced across ranks, not yet clipped.
        if not self._grad_norm_failed:
            try:
                self._grad_norm = grad_norm(state)
            except Exception as e:  # an unusual model's gradients: no norm, never a failed run
                self._grad_norm_failed, self._grad_norm = True, None
                log.warning('the gradient norm cannot be computed (%s); it is not logged', describe(e))

    def after_train_batch(self, state: State, logger: Logger) -> None:
        self.lr.batch_end(state, self.readings)  # type: ignore[arg-type]  (the scheduler steps after the optimizer)

    def batch_end(self, state: State, logger: Logger) -> None:
        self.speed.batch_end(state, self.readings)  # type: ignore[arg-type]
        if self.memory is not None:
            self.memory.after_train_batch(state, self.readings)  # type: ignore[arg-type]  (the optimizer step included)
        if self._grad_norm is not None:
            norm, self._grad_norm = self._grad_norm, None
            self.readings.metrics[GRAD_NORM] = (norm.full_tensor() if isinstance(norm, DTensor) else norm).item()
        readings = self.readings.take()
        if readings:
            logger.log_metrics(readings, step=int(state.timestamp.batch) - 1)  # the loss's step


def grad_norm(state: State) -> Optional[torch.Tensor]:
    """The global L2 norm of the model's gradients, as a tensor (no device sync); a DTensor under FSDP."""
    grads = [p.grad for p in state.model.parameters() if p.grad is not None]
    if not grads:
        return None
    norm = torch.nn.utils.get_total_norm(grads)
    if state.precision == Precision.AMP_FP16:  # the gradients are still scaled (unscaled before clipping)
        norm = norm / state.scaler.get_scale()
    return norm
