"""``benchmarks/gpu_check.py`` on CPU: every check's code path at tiny sizes, so that the one run a lent GPU gets
fails on nothing but what it measures; and a check out of time is a FAILED row while the table is still written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO

pytestmark = pytest.mark.slow

SCRIPT = REPO / 'benchmarks' / 'gpu_check.py'
ROWS = ['1a', '1b', '1c', '2a', '2b', '2c', '3a', '3b', '3c', '4', '5', '6', '7']
CUDA_ONLY = {'1a', '7'}
# every subprocess of a CPU run: the two timed runs (3a's and 3c's first), the kill-and-resume chains, the workers
RUNS = {'timed-det-true', 'timed-det-false', '3a-killed', '3a-resumed', '3b-reference', '3b-killed', '3b-resumed',
        '3c-second', '4-opens', 'worker-host', 'worker-fork'}


def gpu_check(out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), '--out', str(out), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=1100)


def test_cpu_mode_runs_every_check_and_keeps_every_log(tmp_path: Path, dataset: Path) -> None:
    out = tmp_path / 'out'
    # a deadline no loaded machine reaches: the CPU mode checks code paths, not times (1-2 minutes here)
    result = gpu_check(out, '--device', 'cpu', '--data', str(dataset), '--deadline', '1000')
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-3000:]
    table = (out / 'table.md').read_text()
    results = json.loads((out / 'results.json').read_text())
    assert f'torch {torch.__version__}' in table.splitlines()[0] and results['torch'] == torch.__version__
    rows = {row['id']: row for row in results['rows']}
    assert list(rows) == ROWS
    for row_id, row in rows.items():
        assert f'| {row_id} | {row["check"]} |' in table
        assert row['verdict'] == ('skipped (no GPU)' if row_id in CUDA_ONLY else 'ok'), row
    runs = {run['name']: run for run in results['runs']}
    assert set(runs) == RUNS
    combined = (out / 'runs.log').read_text()
    for name, run in runs.items():
        log = out / run['log']
        assert log.parent == out / 'logs' and log.stat().st_size > 0, name
        assert run['rc'] == (-9 if name.endswith('-killed') else 0), run
        assert f'===== logs/{log.name}: exit {run["rc"]}' in combined
    assert (out / 'work' / '3b' / 'smoke' / 'checkpoints').is_dir()


def test_a_check_out_of_time_is_a_failed_row_and_the_table_is_still_written(tmp_path: Path, dataset: Path) -> None:
    out = tmp_path / 'out'
    result = gpu_check(out, '--device', 'cpu', '--data', str(dataset), '--deadline', '0')
    assert result.returncode == 1, result.stdout[-5000:] + result.stderr[-3000:]
    rows = json.loads((out / 'results.json').read_text())['rows']
    assert [row['id'] for row in rows] == ROWS
    assert all(row['verdict'] == 'FAILED' and 'deadline' in row['measured'] for row in rows), rows
    assert '| 3a |' in (out / 'table.md').read_text() and '| 3a |' in result.stdout
    assert (out / 'runs.log').exists()
