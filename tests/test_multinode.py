"""Several nodes on one shared volume: two loopback "nodes" of two ranks each, as pods on a PVC, one of them lost.

Each node is a ``composer`` launcher with ``--world_size 4 --node_rank N --master_addr 127.0.0.1``,
in a mount namespace of its own with its own ``/dev/shm`` (a tmpfs, as a container has) and its own
temporary folder; ``runs_root`` is shared, like the PVC. Needs root for ``unshare --mount``.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import (
    HANG,
    REPO,
    assert_same_training,
    committed_step,
    faults,
    free_port,
    group_gone,
    named_lost,
    run_env,
    saved_after_loss,
    smoke_args,
    starts,
    the_line,
    unlogged_after_loss,
    wait_for,
)

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


def test_a_node_lost_at_a_random_instant_costs_at_most_a_step_and_both_nodes_resume_bit_exact(
        tmp_path: Path, dataset: Path) -> None:
    """Node 1 is lost at a seeded instant (every process of it SIGKILLed: its launcher and ranks 2 and 3, as a node
    that dies): each rank of node 0 prints one line naming ranks 2 and 3 on node 1; rank 0 saves the last step it
    completed, or, with its optimizer already past it, says which checkpoint stays; both nodes started again resume
    from that step and finish bit-exact. Which samples a rank gets depends on the number of nodes, so the reference
    is an uninterrupted 2-node run."""
    rng = random.Random(38)  # step 11
    step, delay = rng.randint(5, 12), rng.uniform(0, 0.25)
    finish(start_nodes(smoke_args(tmp_path / 'reference', dataset, 'max_duration=16ba'), tmp_path), tmp_path)
    args = smoke_args(tmp_path / 'runs', dataset, 'max_duration=16ba', 'checkpoint.interval=4ba', 'dist_timeout=1h')
    run, at = tmp_path / 'runs' / 'smoke', tmp_path / 'at'
    nodes = start_nodes(args, tmp_path, faults({'op': 'step', 'step': step, 'rank': 2, 'marker': str(at)}))
    wait_for(at.exists, nodes[1], f'rank 2 after step {step}')
    time.sleep(delay)  # a random instant: node 1 is somewhere in the next step (or its checkpoint)
    os.killpg(nodes[1].pid, signal.SIGKILL)
    nodes[1].wait()
    lines = [the_line(run / 'logs' / f'rank{r}.log', nodes[0]) for r in (0, 1)]
    assert nodes[0].wait(timeout=HANG) != 0 and group_gone(nodes[0].pid, timeout=HANG)
    for line in lines:
        assert named_lost(line) == {2, 3} and line.count('(node 1, host ') == 2, line
        assert line.endswith('; run the same command to resume') and 'Traceback' not in line, line
    saved = saved_after_loss(lines)
    assert saved is None or saved >= step, 'at most one step behind the last step completed'
    assert saved is not None or all('is intact' in line for line in lines), 'else the line names what stays'
    resumes_from = saved if saved is not None else committed_step(run)
    assert resumes_from is not None and resumes_from >= 4, lines

    finish(start_nodes(args, tmp_path), tmp_path)
    assert [(s['world_size'], s['start_step']) for s in starts(run)] == [(4, 0), (4, resumes_from)]
    assert {p.name for p in (run / 'checkpoints').iterdir()} == {'latest.pt', *(f'latest_rank{r}.pt' for r in range(4))}
    assert_same_training(tmp_path / 'reference' / 'smoke', run, unlogged_after_loss(lines))
