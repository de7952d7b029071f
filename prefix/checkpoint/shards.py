"""Sharded checkpoints: the model and optimizer of an FSDP run in a folder that every rank writes its shards to.

A checkpoint's tensors go to ``checkpoints/shards-<step>-g<generation>-<token>/`` through PyTorch's
distributed checkpoint (DCP): each rank writes its own files, rank 0 the ``.metadata`` that indexes
them, and a later start with any number of ranks reads back the pieces it holds now (DCP reshards).
The folder is written as ``<name>.<generation>.tmp`` and renamed (``publish``) once every rank has
written it; ``latest.pt`` (written by rank 0, the commit point) names it, so a folder is never named
before it is whole. DCP's own collectives run on a gloo
group of their own, off the training thread, so a slow disk never holds a training collective.
Each write and read sets that group's timeout from the caller's deadline: a little longer, so that
prefix's own deadline (which names the slow rank) always comes first.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.distributed as tdist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

from prefix.checkpoint import writer
from prefix.distributed import PeerFailed, collective, own_io
from prefix.files import CheckedWriter, fsync_dir, tag_of, temp_path

if TYPE_CHECKING:  # a type only: writing and reading shards needs torch alone (benchmarks/gpu_check.py)
    from composer.core import State

PREFIX = 'shards-'
NAME = re.compile(r'^shards-\d+-')  # a shard folder's name (new_name, or an older prefix's without the generation)
GENERATION = re.compile(r'^shards-\d+-g(\d+)-')
METADATA = '.metadata'
MARGIN_S = 60  # DCP's group waits this much longer than its caller's deadline


def new_name(step: int, generation: int) -> str:
    """A folder name no earlier checkpoint has (two can be taken at one step, an epoch's end), naming its writer."""
    return f'{PREFIX}{step:09d}-g{generation}-{uuid.uuid4().hex[:8]}'


def generation_of(name: str) -> int:
    """The generation that wrote a shard folder; -1 for other names and folders of an older prefix."""
    match = GENERATION.match(name)
    return int(match.group(1)) if match else -1


def checkpoint_group() -> Optional[tdist.ProcessGroup]:
    """DCP's own gloo group; every rank calls this together, once. None when not distributed."""
    if not tdist.is_initialized() or tdist.get_world_size() == 1:
        return None
    return tdist.new_group(backend='gloo')


def _set_timeout(group: Optional[tdist.ProcessGroup], seconds: float) -> None:
    """How long DCP's collectives on ``group`` wait for the slowest rank (torch has no public setter)."""
    if group is not None:
        tdist.distributed_c10d._set_pg_timeout(timedelta(seconds=seconds + MARGIN_S), group)


class _FileSystem(FileSystem):
    """DCP's files, written as prefix writes its own (``CheckedWriter``): stopped when abandoned, synced as they grow."""

    @contextmanager
    def create_stream(self, path: Any, mode: str) -> Iterator[Any]:
        with super().create_stream(path, mode) as stream:
            yield CheckedWriter(stream, writer.raise_if_abandoned) if 'w' in mode else stream


class _Writer(dcp.FileSystemWriter):
    """DCP's writer, telling the write job which parts are this rank's own I/O and stopping when it is aborted."""

    def __init__(self, path: Path) -> None:
        # per_thread_copy_ahead=0: the tensors are in host memory already, and DCP's copy-ahead loader would
        # take this thread's current CUDA stream (GPU 0's, on a writer thread) on any host with a GPU.
        super().__init__(path, sync_files=True, per_thread_copy_ahead=0)
        self.fs = _FileSystem()

    def write_data(self, plan: Any, planner: Any) -> Any:
        with own_io():
            return super().write_data(plan, planner)

    def finish(self, metadata: Metadata, results: Any) -> None:
        with own_io():
            super().finish(metadata, results)


def write(tensors: dict[str, Any], folder: Path, group: Optional[tdist.ProcessGroup], tag: str,
          deadline_s: float) -> int:
    """Every rank: write this rank's shards of ``tensors`` (host memory) into ``folder``'s temporary folder; its bytes.

    Returns once every rank has written (DCP gathers on ``group``, for at most ``deadline_s`` plus a
    margin); rank 0 then ``publish``es the folder. Every rank enters and leaves DCP's collectives
    together: a failure on one rank, or an abort, raises on every rank.
    """
    tmp = temp_path(folder, tag)
    _set_timeout(group, deadline_s)
    rank = tdist.get_rank(group) if group is not None else 0
    try:
        with collective():
            metadata = dcp.save(tensors, storage_writer=_Writer(tmp), process_group=group, no_dist=group is None)
    except CheckpointException as e:  # every rank raises it: each reports its own failure, or the failing ranks
        if rank in e.failures:
            raise e.failures[rank][0] from None
        raise PeerFailed(f'rank {", ".join(map(str, sorted(e.failures)))} failed its part of the shard '
                                'folder') from None
    return sum(info.length for info in metadata.storage_data.values() if info.relative_path.startswith(f'__{rank}_'))


def publish(folder: Path, tag: str) -> None:
    """Rank 0, once every rank has written: rename the temporary folder into place, durably."""
    tmp = temp_path(folder, tag)
    fsync_dir(tmp)
    os.replace(tmp, folder)
    fsync_dir(folder.parent)


# What a .metadata written by DCP holds (torch 2.7); unpickling anything else could run code.
METADATA_CLASSES = {
    *(('torch.distributed.checkpoint.metadata', name) for name in (
        'Metadata', 'MetadataIndex', 'TensorStorageMetadata', 'BytesStorageMetadata', 'ChunkStorageMetadata',
        'TensorProperties', 'StorageMeta', '_MEM_FORMAT_ENCODING')),
    ('torch.distributed.checkpoint.filesystem', '_StorageInfo'), ('torch', 'Size'),
    ('torch.serialization', '_get_layout'), ('pathlib', 'PosixPath'),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in METADATA_CLASSES or (module == 'torch' and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f'{METADATA} names {module}.{name}, which a checkpoint index never holds: it could '
                                     'run code when loaded')


class Reader(dcp.FileSystemReader):
    """DCP's reader, but its index is unpickled through an allow-list (DCP's own ``read_metadata`` unpickles freely),
    and its reads are this rank's own I/O inside DCP's collectives (``agreement.own_io``)."""

    def read_data(self, plan: Any, planner: Any) -> Any:
        with own_io():
            return super().read_data(plan, planner)

    def read_metadata(self) -> Metadata:
        with self.fs.create_stream(self.fs.concat_path(self.path, METADATA), 'rb') as f:
            metadata = _MetadataUnpickler(f).load()
        if not isinstance(metadata, Metadata):
            raise pickle.UnpicklingError(f'{METADATA} does not hold a checkpoint index')
        if getattr(metadata, 'storage_meta', None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def check(folder: Path) -> None:
    """Raise ValueError unless ``folder`` holds every byte its metadata indexes (a torn write, a lost file)."""
    if not (folder / METADATA).is_file():
        raise ValueError(f'{folder.name} has no {METADATA}: its write did not finish')
    needed: dict[str, int] = {}
    for info in Reader(folder).read_metadata().storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        path = folder / name
        if not path.is_file():
            raise ValueError(f'{folder.name}/{name} is missing')
        if path.stat().st_size < size:
            raise ValueError(f'{folder.name}/{name} is truncated ({path.stat().st_size} of {size} bytes)')


def load(tensors: dict[str, Any], folder: Path, group: Optional[tdist.ProcessGroup], deadline_s: float) -> None:
    """Every rank: fill ``tensors`` (this rank's shards in host memory, in the current layout) from ``folder``, in place."""
    _set_timeout(group, deadline_s)
    with collective():
        dcp.load(tensors, storage_reader=Reader(folder), process_group=group, no_dist=group is None)


def read_whole(folder: Path) -> dict[str, Any]:
    """The folder's tensors as whole tensors, in one process (``prefix export``).

    As torch's own ``format_utils.dcp_to_torch_save`` does, less its torch.save (2.7 has no public form).
    """
    tensors: dict[str, Any] = {}
    _load_state_dict(tensors, storage_reader=Reader(folder), planner=_EmptyStateDictLoadPlanner(),
                     no_dist=True)
    return tensors


def remove_unreferenced(checkpoints: Path, keep: set[str], generation: int) -> list[Path]:
    """Delete the shard folders of ``generation`` and older that no checkpoint names (older ones, those of killed
    writes); never a newer generation's, which its holder is about to name."""
    gone = [p for p in checkpoints.glob(f'{PREFIX}*') if p.is_dir() and NAME.match(p.name) and p.name not in keep
            and tag_of(p.name) is None and generation_of(p.name) <= generation]
    for path in gone:
        shutil.rmtree(path, ignore_errors=True)
    return gone


TENSORS = ('model', 'optimizers')  # what of Composer's state dict goes to the shard folder


def tensors_of(state: State) -> dict[str, Any]:
    """The model's and optimizer's state as this rank's shards, in the layout of Composer's state dict.

    The live tensors, not copies (no cpu_offload, unlike Composer's own ``State.state_dict``): a save
    copies them once into host memory, a load copies into them what was read into host memory.
    """
    options = StateDictOptions(full_state_dict=False, cpu_offload=False)
    optimizer = state.optimizers[0]
    return {'model': get_model_state_dict(state.model, options=options),
            'optimizers': {type(optimizer).__qualname__: get_optimizer_state_dict(state.model, optimizer, options=options)}}


def state_dict_without_tensors(state: State) -> dict[str, Any]:
    """Composer's ``State.state_dict`` but the model and optimizer (not gathered, not copied)."""
    attributes = state.serialized_attributes
    state.serialized_attributes = [a for a in attributes if a not in TENSORS]
    try:
        return state.state_dict()
    finally:
        state.serialized_attributes = attributes


def nbytes(tensors: Any) -> int:
    """Bytes of the tensors a rank holds (its shards), for the memory and write sizes prefix reports."""
    if isinstance(tensors, torch.Tensor):
        local = tensors.to_local() if hasattr(tensors, 'to_local') else tensors
        return local.numel() * local.element_size()
    if isinstance(tensors, dict):
        return sum(nbytes(v) for v in tensors.values())
    if isinstance(tensors, (list, tuple)):
        return sum(nbytes(v) for v in tensors)
    return 0
