"""Streaming dataloaders over the MDS shards written by ``prefix.data.prepare``.

Each loader has its own torch generator so that creating an iterator never draws from the
global RNG: the global RNG then belongs to the model alone (dropout), which is what lets a
resumed run replay the exact random numbers of an uninterrupted one.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import streaming.base.shared.prefix as streaming_prefix
import torch
from streaming import StreamingDataLoader, StreamingDataset

from prefix.config import DataConfig
from prefix.data.prepare import META_FILE
from prefix.distributed import gather, rank, together
from prefix.errors import DataError


def count_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens trained on: every position but the last predicts one (what ``tokens_seen`` counts)."""
    return batch['input_ids'][:, 1:].numel()


# Shared by every prefix job on this machine (its own /dev/shm: a pod's, when each pod has one).
MACHINE_LOCK = (Path('/dev/shm') if Path('/dev/shm').is_dir() else Path(tempfile.gettempdir())) / 'prefix-streaming.lock'


def ignore_stop_signals(worker_id: int) -> None:
    """Workers leave SIGTERM/SIGINT to the main process, which saves and then shuts them down."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextmanager
def streaming_registration() -> Iterator[None]:
    """Create StreamingDatasets so that the ranks of a node agree on their shared memory, next to other jobs.

    Streaming 0.13.0's ``streaming.base.shared.prefix.get_shm_prefix`` has every rank search for the
    first free shared-memory prefix on its own, before the node's leader registers it. A job that
    registers or releases a prefix in between (two jobs starting on one machine) makes the ranks
    disagree: one fails with "shared memory registered does not match", or attaches to the other
    job's memory. Within this block only the local leader (LOCAL_RANK 0) searches, holding a
    machine-wide lock until it has registered (released by the kernel if it dies), and the node's
    other ranks take its answer. The leader waits for the lock while its ranks poll, not in a collective.
    """
    search = streaming_prefix._check_and_find_retrying
    local_rank = int(os.environ.get('LOCAL_RANK', '0'))

    def leaders_answer(*args: Any, **kwargs: Any) -> int:
        found: Any = None
        if local_rank == 0:
            try:
                found = search(*args, **kwargs)
            except Exception as e:  # e.g. a reused local directory: every rank of the node raises it
                found = e
        found = gather(found)[rank() - local_rank]
        if isinstance(found, Exception):
            raise found
        return found

    with ExitStack() as held:
        lock = held.enter_context(open(MACHINE_LOCK, 'a')) if local_rank == 0 else None
        together((lambda: fcntl.flock(lock, fcntl.LOCK_EX)) if lock is not None else None)
        streaming_prefix._check_and_find_retrying = leaders_answer
        try:
            yield
        finally:
            streaming_prefix._check_and_find_retrying = search


def collate(samples: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    return {'input_ids': torch.from_numpy(np.stack([s['input_ids'] for s in samples]).astype(np.int64))}


def dataset_info(cfg: DataConfig) -> dict[str, Any]:
    """What ``prefix.data.prepare`` recorded of the dataset (tokenizer, vocab_size, ...): {} where the local folder has no record
    (data prepared otherwise, or a remote dataset's cache)."""
    try:
        info = json.loads((Path(cfg.local) / META_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def build_dataloader(
    cfg: DataConfig,
    split: str,
    *,
    batch_size: int,
    seed: int,
    train: bool,
    max_seq_len: int,
) -> StreamingDataLoader:
    """A loader of ``{'input_ids': (batch_size, L+1)}`` batches for this rank."""
    if cfg.remote is None and not (Path(cfg.local) / split / 'index.json').is_file():
        raise DataError(
            f'dataset split not found: {Path(cfg.local) / split / "index.json"} is missing '
            f'(prepare it with python -m prefix.data {cfg.local} <text files>)',
        )
    try:
        with streaming_registration():
            dataset = StreamingDataset(
                remote=cfg.remote,
                local=cfg.local,
                split=split,
                shuffle=cfg.shuffle and train,
                shuffle_seed=seed,
                batch_size=batch_size,
                num_canonical_nodes=cfg.num_canonical_nodes,
            )
        sample_len = len(dataset[0]['input_ids'])
    except DataError:
        raise
    except Exception as e:  # Streaming raises many kinds for an unreachable or broken remote
        where = cfg.remote or cfg.local
        raise DataError(f'cannot read the {split} split of {where}: {type(e).__name__}: {e}'.split('\n')[0]) from None
    if sample_len - 1 > max_seq_len:
        raise DataError(
            f'samples in {cfg.remote or cfg.local} have {sample_len - 1} input tokens but model.max_seq_len is '
            f'{max_seq_len}: set model.max_seq_len={sample_len - 1} or prepare the data with --seq-len {max_seq_len}',
        )
    return StreamingDataLoader(
        dataset,
        batch_size=batch_size,
        collate_fn=collate,
        num_workers=cfg.num_workers,
        drop_last=train,
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=False,
        worker_init_fn=ignore_stop_signals,
    )
