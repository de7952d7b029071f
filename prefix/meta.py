"""``meta/``: what code, config and machine a run used, and a log of every start of the run.

Snapshots (``git.json``, ``config.yaml``, ``env.json``) are rewritten atomically at each start.
``starts.jsonl`` gains a ``start`` record per start and an ``end`` record when a start ends on its
own (completed, preempted, failed); a start without an end record was killed. ``checkpoint.json``
summarizes the last committed checkpoint, so that ``prefix runs`` need not open checkpoints.
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

from prefix.agreement import RankFailures
from prefix.atomic import atomic_write_text
from prefix.process import started_at
from prefix.rundir import CHECKPOINT_FILE, STARTS_FILE

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
    """At FIT_START (after any resume) rank 0 appends this start to ``meta/starts.jsonl``.

    ``previous`` is how the previous start ended and the step it had reached (``runinfo.previous_start``):
    the steps between that and this start's step are redone, the work a preemption cost.
    """

    def __init__(self, meta_dir: Path, resumed_from: Optional[str], commit: Optional[str],
                 previous: tuple[Optional[str], Optional[int]], failures: RankFailures) -> None:
        self.path = meta_dir / STARTS_FILE
        self.resumed_from = resumed_from
        self.commit = commit
        self.previous = previous
        self.failures = failures
        self.recorded = False  # an end record belongs only to a start that was recorded

    def fit_start(self, state: State, logger: Logger) -> None:
        if dist.get_global_rank() != 0:
            return
        with self.failures.guard(f'recording this start in {self.path}'):
            self._record(state)

    def _record(self, state: State) -> None:
        now = time.time()
        process_start = started_at()
        step = int(state.timestamp.batch)
        previous_end, reached = self.previous
        append_record(self.path, {
            'event': 'start',
            'time': time.strftime('%Y-%m-%dT%H:%M:%S%z'),
            'unix': round(now, 3),
            'process_start': round(process_start, 3),
            'startup_s': round(now - process_start, 3),
            'host': socket.gethostname(),
            'pid': os.getpid(),
            'world_size': dist.get_world_size(),
            'start_step': step,
            'tokens_seen': int(state.timestamp.token),
            'resumed_from': self.resumed_from,
            'previous_end': previous_end,
            'redone_steps': max(0, reached - step) if reached is not None else 0,
            'git_commit': self.commit,
        })
        self.recorded = True


def record_end(meta_dir: Path, reason: str, step: int, error: Optional[str] = None) -> None:
    """Rank 0: how this start ended (``completed``, ``preempted`` or ``failed``); a SIGKILL leaves none."""
    append_record(meta_dir / STARTS_FILE, {
        'event': 'end', 'reason': reason, 'time': time.strftime('%Y-%m-%dT%H:%M:%S%z'), 'unix': round(time.time(), 3),
        'step': step, **({'error': error} if error else {}),
    })


def record_checkpoint(meta_dir: Path, step: int, tokens_seen: int, nbytes: int) -> None:
    """Rank 0, after a commit: the summary ``prefix runs`` reads (may lag by one checkpoint after a kill)."""
    atomic_write_text(meta_dir / CHECKPOINT_FILE, json.dumps({
        'step': step, 'tokens_seen': tokens_seen, 'bytes': nbytes, 'unix': round(time.time(), 3),
    }) + '\n')
