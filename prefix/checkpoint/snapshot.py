"""Copies of the training state in host memory, made on the training thread, for a writer thread to write.

Everything a writer thread receives is CPU memory that no training step can change (``host_only``
checks it), so no background thread ever touches CUDA: a new thread's current GPU is GPU 0, not
the rank's, and CUDA work queued there would race the rank's own stream.

A copy lives in one slab of host memory, one tensor per distinct tensor of the state:
- the slab is one anonymous mapping, allocated once and (``keep=True`` on a GPU host) page-locked
  once at its exact size (``cudaHostRegister``): the caching host allocator behind ``pin_memory``
  would round every tensor up to a power of two and keep it (1.3x to 1.6x the state). Should the
  driver refuse, the slab stays pageable (one warning): slower copies, same checkpoints;
- every copy is a tensor with a storage of its own over its exact bytes of the slab (64-byte
  aligned), so ``torch.save`` and DCP write each once, whatever the dtypes: views of one storage
  as several dtypes are refused by ``torch.save``, and DCP clones a tensor smaller than its storage;
- the mapping is not inherited by ``fork()`` (``MADV_DONTFORK``): a DataLoader forks its workers
  at each epoch and evaluation, and a child of a process with page-locked memory gets a copy of
  those pages at once (pinned pages cannot be shared copy-on-write), the slab's size per worker;
- the GPU-to-host copies run on a side stream of the tensor's GPU, and the training thread waits
  for an event on that stream before it hands the copy over;
- sharded tensors (FSDP's DTensors) are copied as this rank's shard and wrapped again with the
  same spec: the copy stays in host memory (``DTensor.from_local`` would move it back to the GPU);
- tensors sharing memory (tied weights) are copied once and stay one tensor, so the file stores
  them once.

A kept slab is reused only once the write that read it has finished; the Checkpointer guarantees
that by keeping one write in flight.
"""

from __future__ import annotations

import ctypes
import logging
import math
import mmap
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch.distributed.tensor import DTensor

ALIGN = 64  # bytes: every copy starts at a multiple of this, so every dtype is aligned
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Item:
    """One distinct tensor of a structure: where its copy sits in the slab."""

    offset: int
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class HostSnapshot:
    """``copy(obj)``: ``obj`` with every tensor replaced by a host copy in one slab.

    ``keep=True`` keeps the slab (page-locked where the state is on a GPU) from one copy to the next
    while the structure's tensors keep their shapes; ``keep=False`` makes a new pageable slab per copy,
    freed with the copy (synchronous writes, which hold it only while training waits).
    """

    def __init__(self, keep: bool = True) -> None:
        self.keep = keep
        self._layout: Optional[tuple] = None
        self._slab: Optional[mmap.mmap] = None
        self._registered: Optional[int] = None  # data pointer of a slab page-locked with cudaHostRegister
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    @property
    def nbytes(self) -> int:
        """Host memory this snapshot keeps (the slab)."""
        return len(self._slab) if self._slab is not None else 0

    @property
    def is_pinned(self) -> bool:
        return self._registered is not None

    def copy(self, obj: Any) -> Any:
        """A host copy of ``obj``'s tensors, complete when this returns (safe to hand to another thread)."""
        sources: list[torch.Tensor] = []
        shaped = _index(obj, sources, {})
        views = self._views(sources)
        self._copy_into(views, sources)
        return _rebuild(shaped, views)

    def empty_like(self, obj: Any) -> Any:
        """``obj``'s structure with host tensors of the same shapes, uninitialized: somewhere to read a checkpoint into."""
        sources: list[torch.Tensor] = []
        shaped = _index(obj, sources, {})
        return _rebuild(shaped, self._views(sources))

    # --- the slab ---------------------------------------------------------------------------------

    def _views(self, sources: list[torch.Tensor]) -> list[torch.Tensor]:
        items, end = [], 0
        for t in sources:
            items.append(_Item(-(-end // ALIGN) * ALIGN, tuple(t.shape), t.dtype))
            end = items[-1].offset + items[-1].nbytes
        layout = tuple(items)
        if not self.keep or layout != self._layout or self._slab is None:
            self._allocate(end, pin=self.keep and any(t.is_cuda for t in sources))
            self._layout = layout
        assert self._slab is not None
        return [_cut(self._slab, i) for i in items]

    def _allocate(self, nbytes: int, pin: bool) -> None:
        self._release()
        self._slab = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._slab.madvise(mmap.MADV_DONTFORK)
        if pin:
            address = self.mapping[0]
            code = int(torch.cuda.cudart().cudaHostRegister(address, len(self._slab), 0))
            if code == 0:
                self._registered = address
            else:
                _clear_cuda_error()  # else the next kernel launch check on this thread reports it as its own
                log.warning('page-locking %.1f GB of host memory for checkpoint copies failed (CUDA error %d): '
                            'they use pageable memory, slower to copy from the GPU', nbytes / 1e9, code)

    @property
    def mapping(self) -> Optional[tuple[int, int]]:
        """The slab's mapping: its address and length (``/proc/self/smaps`` names it so)."""
        if self._slab is None:
            return None
        return ctypes.addressof(ctypes.c_char.from_buffer(self._slab)), len(self._slab)

    def _release(self) -> None:
        """Drop the slab; a registered one is unregistered first (no copy of it is in flight: one write at a time).

        The mapping itself goes when the last copy cut from it does.
        """
        if self._registered is not None:
            torch.cuda.cudart().cudaHostUnregister(self._registered)
            self._registered = None
        self._slab = None
        self._layout = None

    def _copy_into(self, views: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
        """CPU tensors copied here; GPU tensors on a side stream per GPU, then wait for its event."""
        on_gpu: dict[torch.device, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for view, t in zip(views, sources, strict=True):
            if t.is_cuda:
                on_gpu.setdefault(t.device, []).append((view, t))
            else:
                view.copy_(t.detach())
        for device, pairs in on_gpu.items():
            stream = self._streams.get(device)
            if stream is None:
                stream = self._streams[device] = torch.cuda.Stream(device=device)
            stream.wait_stream(torch.cuda.current_stream(device))  # after the step that produced the values
            with torch.cuda.stream(stream):
                for view, t in pairs:
                    view.copy_(t.detach(), non_blocking=self.is_pinned)
            done = torch.cuda.Event()
            done.record(stream)
            done.synchronize()


def _cut(slab: mmap.mmap, item: _Item) -> torch.Tensor:
    """``item``'s copy: a tensor whose storage is exactly its bytes of ``slab`` (an empty one needs no bytes)."""
    if item.nbytes == 0:
        return torch.empty(item.shape, dtype=item.dtype)
    flat = torch.frombuffer(slab, dtype=item.dtype, count=math.prod(item.shape), offset=item.offset)
    return flat.view(item.shape)


def _clear_cuda_error() -> None:
    """Reset this thread's last CUDA runtime error (``cudaGetLastError``), through the runtime torch loaded.

    torch's bindings return an API call's error without clearing it; PyTorch checks every kernel launch
    with ``cudaGetLastError``, so a refused ``cudaHostRegister`` would surface as an unrelated kernel's failure.
    """
    try:
        with open('/proc/self/maps') as maps:
            paths = {line.split()[-1] for line in maps if 'libcudart' in line}
    except OSError:
        return
    for path in paths:
        try:
            ctypes.CDLL(path).cudaGetLastError()
        except (OSError, AttributeError):
            continue


def host_only(obj: Any, what: str) -> Any:
    """``obj``, after checking that every tensor in it is in host memory: what a writer thread may be handed.

    A GPU tensor here is a bug (a background thread would touch CUDA on the wrong GPU): raise, never write it.
    """
    if isinstance(obj, torch.Tensor):
        if obj.device.type != 'cpu':
            raise AssertionError(f'{what}: a {obj.device} tensor was handed to a writer thread; only host memory may be')
    elif isinstance(obj, dict):
        for key, value in obj.items():
            host_only(value, f'{what}/{key}')
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            host_only(value, f'{what}/{i}')
    return obj


def copy_into(live: Any, host: Any) -> Any:
    """Copy ``host``'s tensors into ``live``'s (the same structure) on this thread: a checkpoint read into host memory.

    Returns ``host``'s structure holding ``live``'s tensors and ``host``'s other values (those the read replaced).
    """
    if isinstance(host, torch.Tensor):
        target = live.to_local() if isinstance(live, DTensor) else live
        with torch.no_grad():
            target.copy_(host.to_local() if isinstance(host, DTensor) else host)
        return live
    if isinstance(host, dict):
        return {key: copy_into(live[key], value) for key, value in host.items()}
    if isinstance(host, (list, tuple)):
        return type(host)(copy_into(a, b) for a, b in zip(live, host, strict=True))
    return host


# --- structures -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Slot:
    """Where a tensor stood: its index among the distinct tensors, and a DTensor's spec to wrap it in again."""

    index: int
    spec: Any = None


def _index(obj: Any, sources: list[torch.Tensor], seen: dict[tuple, int]) -> Any:
    """``obj`` with each tensor replaced by a ``_Slot``; distinct tensors (local shards for DTensors) appended to ``sources``."""
    if isinstance(obj, DTensor):
        return _Slot(_index(obj.to_local(), sources, seen).index, obj._spec)
    if isinstance(obj, torch.Tensor):
        key = (obj.untyped_storage().data_ptr(), obj.storage_offset(), tuple(obj.shape), tuple(obj.stride()), obj.dtype,
               obj.device)
        if key not in seen:
            seen[key] = len(sources)
            sources.append(obj)
        return _Slot(seen[key])
    if isinstance(obj, dict):
        return {k: _index(v, sources, seen) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_index(v, sources, seen) for v in obj)
    return obj


def _rebuild(shaped: Any, views: list[torch.Tensor]) -> Any:
    if isinstance(shaped, _Slot):
        view = views[shaped.index]
        # DTensor's own constructor, as torch's staging does: from_local would move a host tensor to the mesh's GPU.
        return DTensor(view, shaped.spec, requires_grad=False) if shaped.spec is not None else view
    if isinstance(shaped, dict):
        return {k: _rebuild(v, views) for k, v in shaped.items()}
    if isinstance(shaped, (list, tuple)):
        return type(shaped)(_rebuild(v, views) for v in shaped)
    return shaped


