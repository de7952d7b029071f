"""``prefix export RUN OUT.pt``: a run's newest checkpoint as one whole ``latest.pt``-format file.

A sharded checkpoint's model and optimizer are gathered from its shard folder into ``state``, so
the file is what a run without FSDP writes: it opens with ``torch.load(OUT.pt, weights_only=True)``
where only torch is installed, for evaluation and sharing. It is built in one process, in host
memory: the whole model and optimizer state (about 12 bytes per parameter with AdamW in fp32).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from prefix.atomic import atomic_write
from prefix.checkpoint import LATEST, CheckpointError, global_file, safe_load
from prefix.rundir import RunDir
from prefix.shards import read_whole


def whole_checkpoint(checkpoints: Path, kind: str = LATEST) -> dict[str, Any]:
    """The checkpoint ``kind``.pt of a run, with the tensors of its shard folder in ``state``."""
    ckpt = safe_load(global_file(checkpoints, kind), mmap=True)
    name = ckpt.pop('shards', None)
    if name is not None:
        ckpt['state'].update(read_whole(checkpoints / name))
    return ckpt


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog='prefix export', description=__doc__.splitlines()[0])
    parser.add_argument('run_name')
    parser.add_argument('out', type=Path, help='the file to write (replaced atomically)')
    parser.add_argument('--root', default=None, help='runs_root (default: $PREFIX_RUNS_ROOT or ./runs)')
    opts = parser.parse_args(argv)
    from prefix.runs import default_root

    run = RunDir.for_run(str(opts.root or default_root()), opts.run_name)
    if not global_file(run.checkpoints).exists():
        print(f'prefix: error: run {opts.run_name} has no checkpoint ({global_file(run.checkpoints)})', file=sys.stderr)
        return 1
    try:
        ckpt = whole_checkpoint(run.checkpoints)
    except (CheckpointError, OSError, ValueError) as e:
        print(f'prefix: error: cannot export {run.checkpoints}: {e}', file=sys.stderr)
        return 1
    atomic_write(opts.out, lambda f: torch.save(ckpt, f))
    print(f'wrote {opts.out}: step {ckpt["global_step"]} of run {opts.run_name}')
    return 0
