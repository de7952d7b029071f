"""``meta/``'s snapshots: what code, config and machine a start used.

``git.json``, ``config.yaml`` and ``env.json`` are rewritten atomically at each start, by rank 0.
(The log of the starts themselves is ``prefix.run.journal``'s.)
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import torch
from composer.utils import dist

from prefix.files import atomic_write_text
from prefix.run.rundir import RunDir

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
    repo = Path(__file__).resolve().parents[2]  # the checkout: prefix/run/meta.py
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


def gpu_names() -> list[str]:
    """The GPUs this process sees. A CUDA call: made on the training thread, never on the thread that writes meta/."""
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def env_snapshot(gpus: list[str]) -> dict[str, Any]:
    # Each distribution's METADATA parsed once (d.metadata parses it anew on every access): a third of the time.
    packages = sorted((md['Name'], md['Version']) for md in (d.metadata for d in importlib.metadata.distributions())
                      if md['Name'])
    return {
        'python': sys.version.split()[0],
        'platform': platform.platform(),
        'hostname': socket.gethostname(),
        'world_size': dist.get_world_size(),
        'versions': {name: importlib.metadata.version(name) for name in ('torch', 'mosaicml', 'mosaicml-streaming')},
        'cuda': torch.version.cuda,
        'gpus': gpus,
        'scheduler_env': {k: v for k, v in sorted(os.environ.items()) if k.startswith(SCHEDULER_ENV_PREFIXES)},
        'packages': dict(packages),
    }


def write_snapshots(run: RunDir, config_yaml: str, gpus: list[str]) -> dict[str, Any]:
    """Rank 0 writes git.json, config.yaml and env.json; returns the git info for the journal."""
    git = git_info()
    atomic_write_text(run.git, json.dumps(git, indent=2) + '\n')
    atomic_write_text(run.config, config_yaml)
    atomic_write_text(run.env, json.dumps(env_snapshot(gpus), indent=2) + '\n')
    return git
