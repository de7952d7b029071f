"""A consistent copy of the training state in host memory, so the write can happen while training goes on.

Sharded tensors (FSDP's DTensors) are copied as this rank's shard: the copy takes one copy of what
the rank holds, never of the whole model.

The copy goes into buffers kept from one checkpoint to the next (pinned memory for GPU tensors):
after the first checkpoint a snapshot is a plain memory copy, with no allocation and no page faults,
and the host holds one extra copy of the state at most. A buffer is reused only once the write
that read it has finished; the Checkpointer guarantees that by keeping one write in flight.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.tensor import DTensor


class HostSnapshot:
    """``copy(obj)``: ``obj`` with every tensor replaced by a host copy; tensors sharing memory stay shared."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def copy(self, obj: Any) -> Any:
        seen: dict[tuple, torch.Tensor] = {}
        result = self._copy(obj, '', seen)
        if any(key[-1].type == 'cuda' for key in seen):
            torch.cuda.synchronize()  # the non-blocking device-to-host copies have landed
        return result

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def _copy(self, obj: Any, path: str, seen: dict[tuple, torch.Tensor]) -> Any:
        if isinstance(obj, torch.Tensor):
            return self._tensor(obj, path, seen)
        if isinstance(obj, dict):
            return {k: self._copy(v, f'{path}/{k}', seen) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(self._copy(v, f'{path}/{i}', seen) for i, v in enumerate(obj))
        return obj

    def _tensor(self, t: torch.Tensor, path: str, seen: dict[tuple, torch.Tensor]) -> torch.Tensor:
        if isinstance(t, DTensor):  # a shard: copy this rank's part, keep where it sits in the whole
            local = self._tensor(t.to_local(), path, seen)
            return DTensor.from_local(local, t.device_mesh, t.placements, shape=t.shape, stride=t.stride(), run_check=False)
        # Tied weights appear under two names with one storage: copy once, so the file stores them once.
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype, t.device)
        if key in seen:
            return seen[key]
        buffer = self._buffers.get(path)
        if buffer is None or buffer.shape != t.shape or buffer.dtype != t.dtype:
            buffer = torch.empty(t.shape, dtype=t.dtype, device='cpu', pin_memory=t.is_cuda)
            self._buffers[path] = buffer
        buffer.copy_(t.detach(), non_blocking=t.is_cuda)
        seen[key] = buffer
        return buffer


def on_cpu(obj: Any) -> Any:
    """``obj`` with its GPU tensors copied to the CPU (CPU tensors as they are): what a synchronous save writes."""
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: on_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(on_cpu(v) for v in obj)
    return obj
