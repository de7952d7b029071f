"""Streaming dataloaders over the MDS shards written by ``prefix.data``.

Each loader has its own torch generator so that creating an iterator never draws from the
global RNG: the global RNG then belongs to the model alone (dropout), which is what lets a
resumed run replay the exact random numbers of an uninterrupted one.
"""

from __future__ import annotations

import fcntl
import os
import signal
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from streaming import StreamingDataLoader, StreamingDataset

from prefix.config import DataConfig
from prefix.data import DataError


def count_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens trained on: every position but the last predicts one (what ``tokens_seen`` counts)."""
    return batch['input_ids'][:, 1:].numel()


def ignore_stop_signals(worker_id: int) -> None:
    """Workers leave SIGTERM/SIGINT to the main process, which saves and then shuts them down."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextmanager
def streaming_registration() -> Iterator[None]:
    """Local leaders of different jobs on one machine create their StreamingDatasets in turn.

    Streaming picks a shared-memory name by finding a free one and then creating it; two jobs
    starting at the same moment can pick the same name and one fails with FileExistsError. The
    local leader (LOCAL_RANK 0) creates the name, the other ranks only look it up, so only
    leaders take this machine-wide lock (released by the kernel if the process dies).
    """
    if int(os.environ.get('LOCAL_RANK', '0')) != 0:
        yield
        return
    shm = Path('/dev/shm')
    with open((shm if shm.is_dir() else Path(tempfile.gettempdir())) / 'prefix-streaming.lock', 'a') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def collate(samples: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    return {'input_ids': torch.from_numpy(np.stack([s['input_ids'] for s in samples]).astype(np.int64))}


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
