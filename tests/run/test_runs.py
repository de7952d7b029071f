"""``prefix runs``, ``show`` and ``plot`` on runs made by the real trainer: completed, killed, preempted, failed, damaged."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, committed_step, copy_run, faults, run_env, run_train, smoke_args, train_cmd, wait_for

from prefix.distributed.preemption import PREEMPTED_EXIT_CODE

pytestmark = pytest.mark.slow


def prefix(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, '-m', 'prefix.cli', *args], capture_output=True, text=True, cwd=REPO,
                          env=run_env(), timeout=120)


def runs_json(root: Path) -> dict[str, dict]:
    result = prefix('runs', '--root', str(root), '--json')
    assert result.returncode == 0, result.stderr
    return {r['name']: r for r in json.loads(result.stdout)}


@pytest.fixture(scope='session')  # session, not module: under xdist a worker may leave the module and come back
def runs(tmp_path_factory: pytest.TempPathFactory, dataset: Path, finished_run: Path) -> tuple[Path, dict]:
    """A runs_root with: done (completed), twice (SIGKILLed, restarted, then SIGTERMed), broken (failed on bad data),
    unbuilt (failed building its model, before training), halfway (a damaged run directory); and what
    ``prefix runs`` said while ``twice`` was training.

    Each start of ``twice`` is held at a chosen step by the fault injector, so the kills land at known steps."""
    root = tmp_path_factory.mktemp('runs')
    copy_run(finished_run, root).rename(root / 'done')

    args = smoke_args(root, dataset, 'run_name=twice', 'max_duration=60ba', 'checkpoint.interval=10ba',
                      'checkpoint.periodic_interval=null')
    twice = root / 'twice'
    held, release = root.parent / 'held', root.parent / 'release'
    # First start: held after 14 steps, once the checkpoint of step 10 is committed; SIGKILL loses steps 11-14.
    hold = {'op': 'step', 'step': 14, 'marker': str(held), 'block': True}
    proc = subprocess.Popen(train_cmd(*args), env=run_env(**faults(hold)), cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: held.exists() and committed_step(twice) == 10, proc, 'step 14')
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # Second start: resumes at step 10, is listed while held after 23 steps, then preempted there.
    held.unlink()
    hold = {'op': 'step', 'step': 23, 'marker': str(held), 'block': True, 'release': str(release)}
    proc = subprocess.Popen(train_cmd(*args), env=run_env(**faults(hold)), cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(held.exists, proc, 'step 23')
    live = runs_json(root)
    os.killpg(proc.pid, signal.SIGTERM)
    release.touch()
    assert proc.wait() == PREEMPTED_EXIT_CODE

    # Bad data: a shard overwritten with garbage (token ids far beyond the vocabulary) fails inside training.
    bad = root.parent / 'bad-data'
    shutil.copytree(dataset, bad)
    shard = bad / 'train' / 'shard.00000.mds'
    data = bytearray(shard.read_bytes())
    data[len(data) // 10:] = b'\xff' * (len(data) - len(data) // 10)
    shard.write_bytes(bytes(data))
    failed = run_train(*smoke_args(root, bad, 'run_name=broken', 'max_duration=20ba'))
    assert failed.returncode != 0
    # Out of memory building the model: after the run lock and the run's meta/, before the journal's start record.
    oom = {'op': 'call', 'target': 'prefix.models:build', 'when': 'before', 'error': 'MemoryError'}
    unbuilt = run_train(*smoke_args(root, dataset, 'run_name=unbuilt', 'max_duration=20ba'), **faults(oom))
    assert unbuilt.returncode != 0 and 'injected MemoryError' in unbuilt.stderr

    halfway = root / 'halfway'
    (halfway / 'meta').mkdir(parents=True)
    (halfway / 'checkpoints').mkdir()
    (halfway / 'meta' / 'starts.jsonl').write_text('{"event": "start", "start_step": 0, "unix": 1}\n{"event": "en')
    (halfway / 'meta' / 'checkpoint.json').write_text('{"step": ')
    (halfway / 'meta' / 'config.yaml').write_text('max_duration: [unclosed\n')
    (halfway / 'checkpoints' / 'latest.pt').write_bytes(b'PK\x03\x04 not a checkpoint')
    return root, live


def test_runs_lists_every_state_without_taking_locks(runs: tuple[Path, dict]) -> None:
    root, live = runs
    assert live['twice']['state'] == 'running' and live['twice']['step'] == 23 and live['twice']['starts'] == 2
    listed = runs_json(root)
    assert listed['done']['state'] == 'completed' and listed['done']['step'] == 22
    assert listed['done']['checkpoint_step'] == 22 and listed['done']['tokens_seen'] == 22 * 8 * 128

    twice = listed['twice']
    assert twice['state'] == 'preempted' and twice['starts'] == 2 and twice['max_duration'] == '60ba'
    assert twice['redone_steps'] == 4  # killed after step 14, resumed from the checkpoint of step 10
    assert twice['checkpoint_step'] == twice['step'] == 23 and isinstance(twice['last_loss'], float)

    assert listed['broken']['state'] == 'failed' and listed['broken']['error'].startswith('failed at step ')
    unbuilt = listed['unbuilt']
    assert (unbuilt['state'], unbuilt['step'], unbuilt['starts'], unbuilt['max_duration']) == ('failed', None, 1, '20ba')
    assert unbuilt['error'] == 'failed before training: MemoryError: injected MemoryError'
    assert listed['halfway']['problems'] and listed['halfway']['state'] in ('preempted', 'unreadable')
    assert 'checkpoint latest.pt unreadable: truncated (its zip directory is missing)' in listed['halfway']['problems']

    table = prefix('runs', '--root', str(root))
    assert table.returncode == 0 and table.stdout.splitlines()[0].split()[:3] == ['RUN', 'STATE', 'STEP']
    rows = {line.split()[0]: line for line in table.stdout.splitlines()[1:]}
    assert rows['twice'].split()[:2] == ['twice', 'preempted']
    assert rows['unbuilt'].split()[:3] == ['unbuilt', 'failed', '-/20ba'] and rows['unbuilt'].endswith(unbuilt['error'])


def test_show_tells_the_history_checkpoints_and_goodput(runs: tuple[Path, dict]) -> None:
    root, _ = runs
    result = prefix('show', 'twice', '--root', str(root), '--json')
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    first, second = info['starts']
    assert first['ended'] == 'killed' and second['previous_end'] == 'killed' and second['ended'] == 'preempted'
    assert second['start_step'] == 10 and second['redone_steps'] == info['summary']['redone_steps']
    assert info['git']['commit'] and info['config']['model']['d_model'] == 32
    files = {c['file']: c for c in info['checkpoints']}
    assert files['latest.pt']['step'] == info['summary']['step'] and files['latest.pt']['bytes'] > 0
    g = info['goodput']
    assert 0 < g['goodput'] < 1 and g['lost_s'] > 0 and g['startup_s'] > 0 and g['checkpoint_s'] > 0
    parts = g['startup_s'] + g['checkpoint_s'] + g['lost_s'] + g['kept_s']
    assert abs(parts - g['total_s']) < 0.05 * g['total_s']

    text = prefix('show', 'twice', '--root', str(root))
    assert text.returncode == 0 and 'goodput:' in text.stdout and 'killed' in text.stdout

    damaged = prefix('show', 'halfway', '--root', str(root))
    assert damaged.returncode == 0 and 'unreadable' in damaged.stdout and 'problems:' in damaged.stdout
    assert 'checkpoint latest.pt unreadable: truncated' in damaged.stdout
    unbuilt = prefix('show', 'unbuilt', '--root', str(root))
    assert unbuilt.returncode == 0 and 'None' not in unbuilt.stdout
    assert unbuilt.stdout.startswith('run unbuilt: failed, step -/20ba,')
    assert 'start 1 failed before training: MemoryError: injected MemoryError' in unbuilt.stdout.splitlines()
    missing = prefix('show', 'nosuchrun', '--root', str(root))
    assert missing.returncode == 1 and missing.stderr.count('\n') == 1 and 'nosuchrun' in missing.stderr


def test_plot_writes_a_png_with_the_resumes(runs: tuple[Path, dict]) -> None:
    root, _ = runs
    result = prefix('plot', 'twice', '--root', str(root))
    assert result.returncode == 0, result.stderr
    png = root / 'twice' / 'logs' / 'loss.png'
    assert result.stdout.strip() == str(png)
    assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n' and png.stat().st_size > 20_000
    for name in ('halfway', 'unbuilt'):  # nothing to draw: one line naming the file, no blank picture
        empty = prefix('plot', name, '--root', str(root))
        assert empty.returncode == 1 and empty.stderr.count('\n') == 1
        assert str(root / name / 'logs' / 'metrics.jsonl') in empty.stderr and not (root / name / 'logs' / 'loss.png').exists()
