"""``meta/``: what code, config and machine a run used, and a log of every start of the run.

Snapshots (``git.json``, ``config.yaml``, ``env.json``) are rewritten atomically at each start;
``starts.jsonl`` gains one line per start so the history of preemptions can be read later.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

from prefix.atomic import atomic_write_text

STARTS_FILE = 'starts.jsonl'
SCHEDULER_ENV_PREFIXES = (
    'RUNAI_', 'KUBERNETES_', 'POD_', 'JOB_', 'NODE_', 'MASTER_', 'PET_', 'SLURM_',
    'WORLD_SIZE', 'RANK', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE', 'NODE_RANK', 'HOSTNAME',
)


def _git(repo: Path, *args: str) -> Optional[str]:
    try:
        out = subprocess.run(['git', '-C', str(repo), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_info() -> dict[str, Any]:
    """The code's git ref and commit; from ``PREFIX_GIT_*`` when the code is not a checkout (an image)."""
    repo = Path(__file__).resolve().parent.parent
    commit = _git(repo, 'rev-parse', 'HEAD')
    if commit is None:
        return {
            'ref': os.environ.get('PREFIX_GIT_REF'),
            'commit': os.environ.get('PREFIX_GIT_COMMIT'),
            'dirty': None,
            'source': 'environment',
        }
    status = _git(repo, 'status', '--porcelain', '--untracked-files=no')
    return {
        'ref': _git(repo, 'rev-parse', '--abbrev-ref', 'HEAD'),
        'commit': commit,
        'dirty': bool(status),
        'source': str(repo),
    }


def env_snapshot() -> dict[str, Any]:
    packages = sorted(
        (d.metadata['Name'], d.version) for d in importlib.metadata.distributions() if d.metadata['Name']
    )
    return {
        'python': sys.version.split()[0],
        'platform': platform.platform(),
        'hostname': socket.gethostname(),
        'world_size': dist.get_world_size(),
        'versions': {name: importlib.metadata.version(name) for name in ('torch', 'mosaicml', 'mosaicml-streaming')},
        'cuda': torch.version.cuda,
        'gpus': [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        'scheduler_env': {k: v for k, v in sorted(os.environ.items()) if k.startswith(SCHEDULER_ENV_PREFIXES)},
        'packages': dict(packages),
    }


def write_snapshots(meta_dir: Path, config_yaml: str) -> dict[str, Any]:
    """Rank 0 writes git.json, config.yaml and env.json; returns the git info for the starts log."""
    git = git_info()
    atomic_write_text(meta_dir / 'git.json', json.dumps(git, indent=2) + '\n')
    atomic_write_text(meta_dir / 'config.yaml', config_yaml)
    atomic_write_text(meta_dir / 'env.json', json.dumps(env_snapshot(), indent=2) + '\n')
    return git


def append_record(path: Path, record: dict[str, Any]) -> None:
    """One JSON line, flushed and fsynced: a start is on disk before training begins."""
    with path.open('a') as f:
        f.write(json.dumps(record) + '\n')
        f.flush()
        os.fsync(f.fileno())


class StartRecorder(Callback):
    """At FIT_START (after any resume) rank 0 appends this start to ``meta/starts.jsonl``."""

    def __init__(self, meta_dir: Path, resumed_from: Optional[str], commit: Optional[str]) -> None:
        self.path = meta_dir / STARTS_FILE
        self.resumed_from = resumed_from
        self.commit = commit

    def fit_start(self, state: State, logger: Logger) -> None:
        if dist.get_global_rank() != 0:
            return
        append_record(self.path, {
            'time': time.strftime('%Y-%m-%dT%H:%M:%S%z'),
            'host': socket.gethostname(),
            'pid': os.getpid(),
            'world_size': dist.get_world_size(),
            'start_step': int(state.timestamp.batch),
            'tokens_seen': int(state.timestamp.token),
            'resumed_from': self.resumed_from,
            'git_commit': self.commit,
        })
