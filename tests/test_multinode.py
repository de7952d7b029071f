"""Several nodes on one shared volume: two loopback "nodes" of two ranks each, as pods on a PVC.

Each node is a ``composer`` launcher with ``--world_size 4 --node_rank N --master_addr 127.0.0.1``,
in a mount namespace of its own with its own ``/dev/shm`` (a tmpfs, as a container has) and its own
temporary folder; ``runs_root`` is shared, like the PVC. Needs root for ``unshare --mount``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, assert_same_training, committed_step, faults, free_port, run_env, smoke_args, starts, wait_for

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which('unshare') is None, reason='needs root and unshare'),
]

NODE = 'mount -t tmpfs -o size=256m tmpfs /dev/shm && exec "$@"'


def start_nodes(args: list[str], tmp: Path, env: dict[str, str] | None = None) -> list[subprocess.Popen]:
    port = str(free_port())
    launcher = str(Path(sys.executable).parent / 'composer')
    nodes = []
    for node in (0, 1):
        tmpdir = tmp / f'node{node}-tmp'
        tmpdir.mkdir(exist_ok=True)
        cmd = ['unshare', '--mount', 'sh', '-c', NODE, 'node', launcher, '-n', '2', '--world_size', '4',
               '--node_rank', str(node), '--master_addr', '127.0.0.1', '--master_port', port, '-m', 'prefix.train', *args]
        console = (tmp / f'node{node}.log').open('a')
        nodes.append(subprocess.Popen(cmd, env=run_env(TMPDIR=str(tmpdir), **(env or {})), cwd=REPO,
                                      start_new_session=True, stdout=console, stderr=subprocess.STDOUT))
    return nodes


def finish(nodes: list[subprocess.Popen], tmp: Path) -> None:
    codes = [node.wait(timeout=600) for node in nodes]
    assert codes == [0, 0], (tmp / 'node0.log').read_text()[-3000:] + (tmp / 'node1.log').read_text()[-3000:]


def test_two_nodes_on_one_shared_folder_start_and_resume_after_sigkill_bit_exact(tmp_path: Path, dataset: Path) -> None:
    """Which samples a rank gets depends on the number of nodes, so the reference is an uninterrupted 2-node run."""
    finish(start_nodes(smoke_args(tmp_path / 'reference', dataset, 'max_duration=16ba'), tmp_path), tmp_path)
    args = smoke_args(tmp_path / 'runs', dataset, 'max_duration=16ba')
    run = tmp_path / 'runs' / 'smoke'
    held = tmp_path / 'held'
    # The checkpoint of step 10 is committed at the agreement after step 12 (a phase a step: write, rank files, latest.pt).
    nodes = start_nodes(args, tmp_path, faults({'op': 'step', 'step': 13, 'marker': str(held), 'block': True}))
    wait_for(lambda: held.exists() and len(held.read_text().splitlines()) == 4 and committed_step(run) == 10,
             nodes[0], 'step 13 on every rank, with the checkpoint of step 10')
    for node in nodes:
        os.killpg(node.pid, signal.SIGKILL)
        node.wait()

    finish(start_nodes(args, tmp_path), tmp_path)
    assert [(s['world_size'], s['start_step']) for s in starts(run)] == [(4, 0), (4, 10)]
    assert {p.name for p in (run / 'checkpoints').iterdir()} == {'latest.pt', *(f'latest_rank{r}.pt' for r in range(4))}
    assert_same_training(tmp_path / 'reference' / 'smoke', run)
