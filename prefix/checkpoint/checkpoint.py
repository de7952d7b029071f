"""The checkpoint contract, written by a Composer callback and resumed through Composer's autoresume.

Files in ``<run>/checkpoints/`` (schema in docs/checkpoints.md):

- ``latest.pt`` (rank 0): ``{'schema_version', 'generation', 'global_step', 'tokens_seen', 'config',
  'wall_clock', 'state'}`` where ``state`` is Composer's own state dict (model, optimizers, schedulers, timestamp,
  dataset_state, ...), so Composer's autoresume loads it as it is. Plain data only: it opens with
  ``torch.load(path, weights_only=True)`` and nothing else installed.
- ``latest_rank{rank}.pt`` (every rank): ``{'schema_version', 'rank', 'world_size', 'global_step',
  'rng', 'generations'}`` where ``rng`` maps a step to that rank's torch/CUDA/NumPy/Python RNG
  states, for this checkpoint's step and the previous one, and ``generations`` maps the same steps
  to the generation of the run lock whose holder wrote that checkpoint. Rank files are written
  before ``latest.pt``; a kill between the two leaves ``latest.pt`` at the previous step, whose RNG
  the rank files still hold. A resume uses a rank file's RNG only for the step and generation of the
  ``latest.pt`` it loads: a rank file a stalled former holder renamed late belongs to no checkpoint.
- ``periodic.pt`` / ``periodic_rank{rank}.pt``: at most one older checkpoint, hard links to the
  latest files at the step they were taken (no second copy of the bytes).

Every file is replaced atomically (``prefix.files.atomic``), through a temporary file named for the writer's
generation (``latest.pt.<generation>.tmp``); ``prefix.checkpoint.checkpointer`` decides when, and writes them in
the background. Composer's own saver is left idle.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import mmap
import pickle
import random
import re
import shutil
import struct
import time
import zipfile
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional, TypeVar

import numpy as np
import torch
from composer.core import State
from composer.utils import dist

from prefix.checkpoint import shards
from prefix.config import Duration
from prefix.distributed import together
from prefix.errors import PrefixError
from prefix.files import TMP_SUFFIX, commit, tag_of

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
SLOWEST_BANDWIDTH = 25e6  # bytes/s: the default write_timeout lets the whole checkpoint take this long ...
MIN_WRITE_TIMEOUT_S = 600  # ... and at least this
READ_RETRY_S = (1.0, 2.0, 4.0, 8.0)  # waits before the next try of a read that failed with an OSError
CRC_CHUNK = 16 << 20  # bytes of a record checked at a time
CRC_THREADS = 8  # records checked at once (a record is a tensor): CPU cores and the volume's parallel reads
MADV_POPULATE_READ = getattr(mmap, 'MADV_POPULATE_READ', 22)  # Linux 5.14; Python 3.11's mmap does not name it
T = TypeVar('T')
LATEST = 'latest'
PERIODIC = 'periodic'
RESCUE = 'rescue'  # what a survivor other than rank 0 saved after a loss, for the next start to adopt (adopt_rescue)


class CheckpointError(PrefixError):
    """A checkpoint cannot be used; the message says which file and what to do."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (full disk, file-size limit, ...); the previous one is intact."""


def global_file(folder: Path, kind: str = LATEST) -> Path:
    return folder / f'{kind}.pt'


def rank_file(folder: Path, rank: int, kind: str = LATEST) -> Path:
    return folder / f'{kind}_rank{rank}.pt'


RANK_FILE = re.compile(rf'^({LATEST}|{PERIODIC}|{RESCUE})_rank(\d+)\.pt$')
OWN_NAME = re.compile(rf'^(({LATEST}|{PERIODIC}|{RESCUE})(_rank\d+)?\.pt|{shards.NAME.pattern[1:]}.*)$')


def written_by_prefix(name: str) -> bool:
    """A checkpoint file or shard folder, or the temporary name of one: all that prefix may delete in checkpoints/
    (a file of the user's there stays, whatever its name)."""
    tag = tag_of(name)
    if tag is None:
        return OWN_NAME.match(name) is not None
    stem = name[:-len(TMP_SUFFIX)]  # latest.pt.7 (a writer's tag), or latest.pt (an older prefix's fixed name)
    return any(OWN_NAME.match(n) for n in (stem, stem.removesuffix(f'.{tag}')))


# --- RNG states as plain tensors and numbers (loadable with weights_only=True) -------------------

def capture_rng() -> dict[str, Any]:
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss_next = random.getstate()
    return {
        'torch': torch.get_rng_state(),
        # This rank's own GPU only: a resume on a pod with fewer GPUs visible must still fit.
        'cuda': torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        'numpy': {'keys': torch.from_numpy(keys.astype(np.int64)), 'pos': int(pos),
                  'has_gauss': int(has_gauss), 'cached_gaussian': float(cached)},
        'python': {'version': version, 'state': torch.tensor(py_state, dtype=torch.int64), 'gauss_next': gauss_next},
    }


def step_seed(seed: int, rank: int, step: int) -> int:
    """The seed of one rank's step: a function of what every rank knows, so that any rank can name another's state."""
    return int.from_bytes(hashlib.blake2b(f'{seed}/{rank}/{step}'.encode(), digest_size=8).digest(), 'little') >> 1


def seed_step(seed: int, rank: int, step: int) -> None:
    """Seed torch (CPU and CUDA), NumPy and Python for the step that starts after ``step`` batches, on the training
    thread: a rank's random numbers then depend on the seed, its rank and the step alone, never on earlier steps."""
    value = step_seed(seed, rank, step)
    torch.manual_seed(value)
    np.random.seed(value % 2**32)
    random.seed(value)


def step_rng(seed: int, rank: int, step: int) -> dict[str, Any]:
    """The RNG states ``seed_step`` gives (what a rank file holds for ``step``), computed without changing this
    rank's own: a survivor writes a lost rank's file with them."""
    own = capture_rng()
    try:
        seed_step(seed, rank, step)
        return capture_rng()
    finally:
        restore_rng(own)


def restore_rng(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng['torch'])
    _restore_cuda_rng(rng.get('cuda'))
    n = rng['numpy']
    np.random.set_state(('MT19937', n['keys'].numpy().astype(np.uint32), n['pos'], n['has_gauss'], n['cached_gaussian']))
    p = rng['python']
    random.setstate((p['version'], tuple(int(x) for x in p['state'].tolist()), p['gauss_next']))


def _restore_cuda_rng(state: Any) -> None:
    """The current GPU's generator; a state that does not fit (saved elsewhere, or every GPU's by older files) is skipped."""
    if not torch.cuda.is_available() or state is None or (isinstance(state, list) and not state):
        return
    device = torch.cuda.current_device()
    if isinstance(state, list):  # files written before one GPU's state was kept: every visible GPU's
        if device >= len(state):
            log.warning('the saved CUDA RNG states cover %d GPUs and this rank uses GPU %d: dropout continues from '
                        'a fresh CUDA RNG state', len(state), device)
            return
        state = state[device]
    try:
        torch.cuda.set_rng_state(state)
    except (RuntimeError, TypeError, ValueError) as e:
        log.warning('the saved CUDA RNG state does not fit this GPU (%s): dropout continues from a fresh one', e)


# --- reading ----------------------------------------------------------------------------------

def safe_load(path: Path, mmap: bool = False) -> dict[str, Any]:
    """``torch.load`` restricted to plain data; a file that would run code is refused."""
    try:
        obj = torch.load(path, map_location='cpu', weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        if 'Weights only load failed' in str(e):
            raise CheckpointError(
                f'{path} holds objects other than plain data and could run code when loaded: refusing it. '
                'Move it away if you trust its origin, or delete it to fall back to an older checkpoint',
            ) from None
        raise
    if not isinstance(obj, dict) or obj.get('schema_version') != SCHEMA_VERSION:
        raise ValueError(f'not a prefix checkpoint of schema version {SCHEMA_VERSION}')
    return obj


@dataclass
class ResumePoint:
    """The checkpoint a start resumes from, as agreed by every rank."""

    kind: str
    global_step: int
    timestamp: dict[str, int]
    wall_clock: dict[str, float]
    config: dict[str, Any]
    shards: Optional[str] = None  # the folder of the model's and optimizer's shards (sharded format)
    generation: Optional[int] = None  # of the run lock whose holder wrote it (None: written before prefix kept it)
    lr: Optional[float] = None  # the learning rate the schedule multiplies (Composer's base_lrs: the first start's)
    rng: Optional[dict[str, Any]] = field(default=None, repr=False)

    @property
    def filename(self) -> str:
        return f'{self.kind}.pt'


def write_timeout_s(setting: Optional[str], checkpoint_bytes: float) -> float:
    """``checkpoint.write_timeout``, or the default: a volume 10x slower than a slow PVC still finishes, a hung one is
    noticed. ``checkpoint_bytes``: the whole checkpoint, as the ranks share the volume's bandwidth. It bounds every
    wait on a checkpoint's files: its write, and a resume's reads."""
    if setting is not None:
        return Duration.parse(setting).seconds
    return max(MIN_WRITE_TIMEOUT_S, checkpoint_bytes / SLOWEST_BANDWIDTH)


def verify_crc(path: Path) -> None:
    """Check every record against the CRC-32 torch's writer stored in the zip (torch.load does not), records in
    parallel: the check runs at the speed of the volume's reads, not of one core's CRC.

    The records are read through a memory map of the file, not read(): the pages land in the page cache, where
    every rank's memory-mapped load finds them, and are never copied into this process (``zipfile.testzip``
    would copy the whole checkpoint through read() once more). The zip's directory is read as usual.
    """
    with open(path, 'rb') as f, zipfile.ZipFile(f) as archive:
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped, ThreadPoolExecutor(CRC_THREADS) as pool:
            records = archive.infolist()
            intact = pool.map(lambda info: _record_intact(archive, mapped, info), records)  # zlib lets go of the GIL
            bad = next((info.filename for info, ok in zip(records, intact, strict=True) if not ok), None)
    if bad is not None:
        raise ValueError(f'record {bad} fails its CRC-32 check (the file is corrupt)')


def _record_intact(archive: zipfile.ZipFile, mapped: mmap.mmap, info: zipfile.ZipInfo) -> bool:
    """Whether a record's local header names it and its bytes match the CRC-32 the directory holds (what
    ``testzip`` checks); compressed records (torch writes none) go through zipfile."""
    if info.compress_type != zipfile.ZIP_STORED:
        try:
            with archive.open(info) as record:  # zipfile checks the CRC at the end of the record
                while record.read(CRC_CHUNK):
                    pass
        except zipfile.BadZipFile:
            return False
        return True
    header = mapped[info.header_offset:info.header_offset + zipfile.sizeFileHeader]
    if len(header) < zipfile.sizeFileHeader:
        return False
    fields = struct.unpack(zipfile.structFileHeader, header)
    name_start = info.header_offset + zipfile.sizeFileHeader
    name_end = name_start + fields[zipfile._FH_FILENAME_LENGTH]
    name = info.orig_filename.encode('utf-8' if info.flag_bits & 0x800 else 'cp437')
    if fields[zipfile._FH_SIGNATURE] != zipfile.stringFileHeader or mapped[name_start:name_end] != name:
        return False
    start = name_end + fields[zipfile._FH_EXTRA_FIELD_LENGTH]
    end = start + info.compress_size
    if end > len(mapped):
        return False  # truncated
    crc = 0
    with memoryview(mapped) as view:
        for offset in range(start, end, CRC_CHUNK):
            chunk_end = min(offset + CRC_CHUNK, end)
            _populate(mapped, offset, chunk_end)
            crc = zlib.crc32(view[offset:chunk_end], crc)
    return crc == info.CRC


def _populate(mapped: mmap.mmap, start: int, end: int) -> None:
    """Fault ``mapped[start:end]`` in with madvise(MADV_POPULATE_READ): a disk or network-volume error is then an
    OSError here (which ``_retrying`` retries) and not a SIGBUS on first touch. Kernels before 5.14 lack it."""
    aligned = start - start % mmap.PAGESIZE
    try:
        mapped.madvise(MADV_POPULATE_READ, aligned, end - aligned)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise


def _retrying(what: Path, read: Callable[[], T]) -> T:
    """``read()``, tried again after an OSError (EIO or ESTALE on a network volume can pass); the last one is raised."""
    for delay in (*READ_RETRY_S, None):
        try:
            return read()
        except OSError as e:
            if delay is None:
                raise
            log.warning('reading %s failed (%s); trying again in %.0f s', what, e, delay)
            time.sleep(delay)
    raise AssertionError('unreachable')


def _read_header(path: Path) -> dict[str, Any]:
    ckpt = safe_load(path, mmap=True)  # the tensors are not read: only the small records below
    return {
        'global_step': int(ckpt['global_step']),
        'timestamp': dict(ckpt['state']['timestamp']['Timestamp']),
        'wall_clock': dict(ckpt.get('wall_clock', {})),
        'config': ckpt['config'],
        'shards': ckpt.get('shards'),
        'generation': ckpt.get('generation'),
        'lr': _base_lr(ckpt['state']),
    }


def _base_lr(state: dict[str, Any]) -> Optional[float]:
    """The learning rate the scheduler multiplies; Composer restores it with the scheduler, so it is the first start's."""
    schedulers = list(state.get('schedulers', {}).values())
    return float(schedulers[0]['base_lrs'][0]) if schedulers else None


def _check(path: Path) -> Optional[dict[str, Any]]:
    """A node's leader reads ``path`` whole, once: the CRC check (through a memory map), which leaves it in the
    node's page cache for every rank's memory-mapped load; then its header, and that every shard it names is whole.
    None when the file does not exist."""
    if not path.exists():
        return None
    _retrying(path, lambda: verify_crc(path))
    header = _retrying(path, lambda: _read_header(path))
    if header['shards'] is not None:
        folder = path.parent / header['shards']
        try:
            _retrying(path, lambda: shards.check(folder))
        except pickle.UnpicklingError as e:
            raise CheckpointError(f'{folder}: {e}: refusing it. Move the folder away if you trust its origin, or '
                                  f'delete {path.name} to fall back to an older checkpoint') from None
    return header


def _choose_global(folder: Path, write_timeout: Optional[str]) -> Optional[dict[str, Any]]:
    """Every rank: the newest global checkpoint every node can read, falling back loudly from latest to periodic.

    The check runs on each node's local leader, on a thread, while every rank polls it (``agreement.together``):
    no collective waits for the read, whatever the checkpoint's size and the disk's speed.
    """
    problems = []
    leader = dist.get_local_rank() == 0
    for kind in (LATEST, PERIODIC):
        path = global_file(folder, kind)
        size = path.stat().st_size if path.exists() else 0
        outcomes = together((lambda p=path: _check(p)) if leader else None, write_timeout_s(write_timeout, size),
                            f'checking {path.name}')
        refused = next((o.error for o in outcomes if isinstance(o.error, CheckpointError)), None)
        if refused is not None:
            raise refused
        if outcomes[0].error is None and outcomes[0].value is None:
            continue  # rank 0 finds no such file
        errors = [(r, o.error) for r, o in enumerate(outcomes) if o.error is not None]
        if not errors:
            return {'kind': kind, **outcomes[0].value}
        r, error = errors[0]
        problems.append(f'{path.name}: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ""}'
                        + (f' (on rank {r})' if r else ''))
        log.warning(f'CHECKPOINT UNUSABLE: {path} cannot be read ({problems[-1]}); trying an older checkpoint')
    if problems:
        raise CheckpointError(
            f'no usable checkpoint in {folder} ({"; ".join(problems)}). Refusing to start from step 0 over them: '
            'move the folder away to start the run afresh',
        )
    return None


def generation_of(name: str) -> int:
    """The generation of the writer of a temporary file (``latest.pt.7.tmp``) or shard folder; -1 when it names
    none (a process's own tag, or an older prefix's fixed temporary name)."""
    tag = tag_of(name)
    if tag is None:
        return shards.generation_of(name)
    return int(tag) if tag.isdigit() else -1


def remove_leftovers(folder: Path, generation: int) -> list[Path]:
    """Delete what writers before ``generation`` left behind: temporary files and folders, shard folders no
    checkpoint names, Composer's autoresume signal files. Never a newer generation's.

    The temporary files go first: once a stalled former holder's temporary file is unlinked, its rename
    can no longer publish it, so what is read next (the checkpoints and the shards they name) is final.
    """
    leftovers = [p for p in folder.iterdir() if p.name.startswith('._signal_file')
                 or (tag_of(p.name) is not None and written_by_prefix(p.name) and generation_of(p.name) < generation)]
    for path in leftovers:
        log.warning('removing %s, left by an earlier start', path)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    keep = referenced_shards(folder)
    if keep is not None:
        for path in shards.remove_unreferenced(folder, keep, generation):
            log.warning('removed %s, which no checkpoint names', path)
    return leftovers


def adopt_rescue(folder: Path) -> Optional[dict[str, Any]]:
    """Rank 0 of a start that holds the run lock, after ``remove_leftovers`` (a former holder's temporary files are
    gone, so what is left is final): the checkpoint a survivor other than rank 0 saved after a loss (rank 0 lost,
    or a step behind it) becomes ``latest.pt``.

    Only if it continues ``latest.pt``: written under the same generation (no start has committed since the one
    that lost the rank) at a later step, with every rank's file. Its rank files go first, ``latest.pt`` last (each
    rank file holds the states of both steps, so a stop in between leaves a valid pair). Anything else of it is
    removed. Returns the adopted checkpoint's header."""
    rescue, latest = global_file(folder, RESCUE), global_file(folder, LATEST)
    files = {int(m.group(2)): p for p in folder.glob(f'{RESCUE}_rank*.pt') if (m := RANK_FILE.match(p.name))}
    header = None
    if rescue.exists():
        try:
            header = _read_header(rescue)
            current = _read_header(latest) if latest.exists() else None
            world = safe_load(files[0], mmap=True)['world_size'] if 0 in files else None
        except Exception as e:  # unreadable: it is not adopted
            log.warning('not adopting %s: %s', rescue, e)
            header = None
        else:
            why = ('a start committed since' if current is not None and current['generation'] != header['generation']
                   else 'it is not newer' if current is not None and current['global_step'] >= header['global_step']
                   else 'rank files are missing' if world is None or set(range(world)) - set(files) else None)
            if why is not None:
                log.warning('not adopting %s (step %d): %s', rescue.name, header['global_step'], why)
                header = None
    if header is not None:
        for rank, path in sorted(files.items()):
            commit(path, rank_file(folder, rank))
        commit(rescue, latest)
        log.warning('adopted the checkpoint of step %d that a survivor saved after a rank was lost', header['global_step'])
        return header
    for path in [rescue, *files.values()]:
        path.unlink(missing_ok=True)
    return None


def referenced_shards(folder: Path) -> Optional[set[str]]:
    """The shard folders that latest.pt and periodic.pt name; None if one of them cannot be read now (keep all)."""
    names = set()
    for kind in (LATEST, PERIODIC):
        path = global_file(folder, kind)
        if not path.exists():
            continue
        try:
            names.add(safe_load(path, mmap=True).get('shards'))
        except Exception:
            return None
    return names - {None}


def find_resume_point(folder: Path, write_timeout: Optional[str] = None) -> Optional[ResumePoint]:
    """Agree on one checkpoint across ranks and load this rank's RNG states for its step; ``write_timeout`` (the
    config's ``checkpoint.write_timeout``) bounds the wait for each node's check of the global file."""
    chosen = _choose_global(folder, write_timeout)
    if chosen is None:
        return None
    point = ResumePoint(**chosen)
    rank = dist.get_global_rank()
    path = rank_file(folder, rank, point.kind)
    try:
        saved = _retrying(path, lambda: (verify_crc(path), safe_load(path))[1])
        written_by = saved.get('generations', {}).get(point.global_step)
        if point.generation is not None and written_by != point.generation:
            log.warning('%s was written by generation %s, not by generation %s which wrote %s: it belongs to another '
                        'checkpoint (a stalled former holder renamed it late); rank %d draws from the seed, its rank '
                        'and the step all the same',
                        path, written_by, point.generation, point.filename, rank)
        else:
            point.rng = saved['rng'].get(point.global_step)
        if saved['world_size'] != dist.get_world_size():
            log.warning('the run had %d ranks and now has %d: the model, optimizer and data position carry over; '
                        'rank %d draws its random numbers from the seed, its rank and the step',
                        saved['world_size'], dist.get_world_size(), rank)
        if point.rng is None and written_by == point.generation:
            log.warning('%s has no RNG state for step %d (the seed, the rank and the step give it)', path, point.global_step)
    except FileNotFoundError:
        log.warning('%s is missing (the run had fewer ranks before?); rank %d draws from the seed, its rank and the step',
                    path, rank)
    except CheckpointError:
        raise
    except Exception as e:  # a damaged rank file costs only bit-exactness, never the run
        log.warning('%s cannot be read (%s: %s); rank %d continues with fresh RNG state', path, type(e).__name__, e, rank)
    return point


def is_complete(timestamp: dict[str, int], max_duration: str) -> bool:
    """Whether a checkpoint's timestamp has reached ``max_duration`` (``200ba``, ``1ep``)."""
    return Duration.parse(max_duration).reached(timestamp)


# --- writing: the payloads (prefix.checkpoint.checkpointer decides when and writes them) ---------------------

def plain(obj: Any, where: str = 'state') -> Any:
    """``obj`` as the types ``weights_only=True`` loads without an allowlist; anything else is a bug, named."""
    if isinstance(obj, torch.Tensor) or obj is None or type(obj) in (bool, int, float, str):
        return obj
    if isinstance(obj, dict):
        return {plain(k, where): plain(v, f'{where}/{k}') for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):  # named tuples and other subclasses become lists
        items = [plain(v, f'{where}/{i}') for i, v in enumerate(obj)]
        return tuple(items) if type(obj) is tuple else items
    for base in (str, int, float):  # e.g. torch's TorchVersion, a str subclass
        if isinstance(obj, base):
            return base(obj)
    raise CheckpointError(f'cannot store {where} ({type(obj).__qualname__}) as plain data in a checkpoint')


def global_state(state: State, config: dict[str, Any], generation: int,
                 shards_folder: Optional[str] = None) -> dict[str, Any]:
    """The contents of latest.pt: Composer's state dict made plain, plus our header.

    With ``shards_folder`` the model and optimizer are left out: they are in that folder (``prefix.checkpoint.shards``).
    """
    composer_state = state.state_dict() if shards_folder is None else shards.state_dict_without_tensors(state)
    ts = composer_state['timestamp']['Timestamp']
    wall_clock = {k: ts.pop(k).total_seconds() for k in list(ts) if isinstance(ts[k], timedelta)}
    return {
        'schema_version': SCHEMA_VERSION,
        'generation': generation,
        'global_step': int(state.timestamp.batch),
        'tokens_seen': int(state.timestamp.token),
        'config': config,
        'wall_clock': wall_clock,
        'state': plain(composer_state),
        **({'shards': shards_folder} if shards_folder is not None else {}),
    }


def rank_state(rng_history: dict[int, tuple[Optional[int], dict[str, Any]]], step: int,
               rank: Optional[int] = None) -> dict[str, Any]:
    """The contents of latest_rank{rank}.pt: a rank's RNG states by step (this rank's unless ``rank``), with the
    generation that wrote each step's checkpoint (``rng_history``: step -> (generation, states))."""
    return {
        'schema_version': SCHEMA_VERSION, 'rank': dist.get_global_rank() if rank is None else rank,
        'world_size': dist.get_world_size(),
        'global_step': step, 'rng': {s: rng for s, (_, rng) in rng_history.items()},
        'generations': {s: generation for s, (generation, _) in rng_history.items()},
    }
