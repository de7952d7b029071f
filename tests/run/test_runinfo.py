"""Goodput from start and metric records: which start a metric belongs to, what a kill cost; how a run shows it failed."""

import io
import json
import os
import random
import time
from pathlib import Path

import pytest
import torch

from prefix.checkpoint import CheckpointError
from prefix.files import WRITER
from prefix.run import LockLostError, RunDir, previous_start, record_failed_setup
from prefix.run.runinfo import LOSS, SETUP_FAILED, details, goodput, summarize
from prefix.run.runs import main as runs_main
from prefix.run.runs import render, runs_command


def metric(step: int, t: float) -> dict:
    return {'step': step, 'time': t, LOSS: 1.0}


def test_steps_trained_after_the_last_checkpoint_of_a_killed_start_are_lost() -> None:
    # Start 1 trains steps 0-13 (0.1 s each from t=105), is killed after step 13; start 2 resumes from
    # step 10, whose process started right after the kill. Its recorded process start may be early:
    # only its start of training (``unix``) separates the two starts' metrics.
    first = {'unix': 105.0, 'process_start': 100.0, 'start_step': 0, 'end': None}
    second = {'unix': 112.0, 'process_start': 106.0, 'start_step': 10,
              'end': {'unix': 113.0, 'reason': 'preempted'}}
    metrics = [metric(s, 105.0 + 0.1 * (s + 1)) for s in range(14)]
    metrics += [metric(s, 112.0 + 0.1 * (s - 9)) for s in range(10, 15)]
    g = goodput([first, second], metrics, running=False)
    assert abs(g['lost_s'] - 0.4) < 1e-9, 'steps 11-14 of the first start were trained again'
    assert abs(g['startup_s'] - 11.0) < 1e-9 and g['waiting_s'] == 0.0
    assert abs(g['startup_s'] + g['lost_s'] + g['kept_s'] + g['checkpoint_s'] - g['total_s']) < 1e-9


# --- how runs show they failed, and damaged checkpoints: run directories built by hand, as the trainer writes them ---

NOW = time.time()


def start(step: int = 0, at: float = NOW - 100, **extra: object) -> dict:
    return {'event': 'start', 'unix': at, 'process_start': at - 5, 'start_step': step, 'host': 'node', 'world_size': 1,
            'writer': 'p1-abc', **extra}


def end(reason: str, step: int, at: float, error: str | None = None) -> dict:
    return {'event': 'end', 'reason': reason, 'unix': at, 'step': step, **({'error': error} if error else {})}


def setup_failed(at: float = NOW - 10, error: str = 'RuntimeError: no GPU memory for the model') -> dict:
    return {'event': SETUP_FAILED, 'unix': at, 'process_start': at - 7, 'host': 'node', 'world_size': 1,
            'writer': 'p2-def', 'error': error}


def make_run(root: Path, name: str, records: list[dict], steps: range = range(0), checkpoint: int | None = None,
             max_duration: str = '60ba', lock_age: float | None = None,
             files: dict[str, bytes] | None = None) -> RunDir:
    """A run directory as the trainer leaves it: its journal, metrics (one loss per step, 1 s apart from the
    first start that trained), checkpoint summary, config and checkpoint files."""
    run = RunDir(root / name)
    run.create()
    run.config.write_text(f'run_name: {name}\nmax_duration: {max_duration}\n')
    run.starts.write_text(''.join(json.dumps(r) + '\n' for r in records))
    first = next((r['unix'] for r in records if r['event'] == 'start'), NOW)
    run.metrics.write_text(''.join(json.dumps(metric(s, first + s + 1)) + '\n' for s in steps))
    if checkpoint is not None:
        run.checkpoint_summary.write_text(json.dumps({'step': checkpoint, 'tokens_seen': checkpoint * 1024, 'bytes': 1,
                                                      'unix': NOW - 50}))
    if lock_age is not None:
        run.lock.write_text(json.dumps({'state': 'held'}))
        os.utime(run.lock, (time.time() - lock_age,) * 2)  # now, not at import: the suite takes minutes
    for file, data in (files or {}).items():
        (run.checkpoints / file).write_bytes(data)
    return run


def whole_checkpoint(step: int) -> bytes:
    buffer = io.BytesIO()
    torch.save({'schema_version': 1, 'global_step': step, 'weights': torch.zeros(1000)}, buffer)
    return buffer.getvalue()


WHOLE = whole_checkpoint(20)
SETUP_ERROR = 'failed before training: RuntimeError: no GPU memory for the model'

# name, journal, steps logged, checkpoint.json step, lock age, checkpoint files -> state, step, starts, error, problems
CASES = [
    ('failed-setup', [setup_failed()], range(0), None, None, {},
     'failed', None, 1, SETUP_ERROR, []),
    ('failed-training', [start(), end('failed', 3, NOW - 90, 'IndexError: index out of range in self')], range(3), None,
     None, {}, 'failed', 3, 1, 'failed at step 3: IndexError: index out of range in self', []),
    ('killed-then-failed-setup', [start(), setup_failed()], range(14), 10, None, {},
     'failed', 14, 2, SETUP_ERROR, []),
    ('complete-then-refused', [start(), end('completed', 60, NOW - 30), setup_failed()], range(60), 60, None, {},
     'completed', 60, 2, SETUP_ERROR, []),  # a refused start (a config change) leaves a finished run finished
    ('failed-setup-then-trained', [setup_failed(NOW - 200), start(at=NOW - 100), end('completed', 60, NOW - 30)],
     range(60), 60, None, {}, 'completed', 60, 2, None, []),
    ('restarting-after-failure', [setup_failed()], range(0), None, 2.0, {},
     'running', None, 1, None, []),
    ('whole-checkpoints', [start(), end('preempted', 20, NOW - 60)], range(20), 20, None,
     {'latest.pt': WHOLE, 'periodic.pt': WHOLE, 'latest_rank0.pt': b'only show loads rank files'},
     'preempted', 20, 1, None, []),
    ('garbage-latest', [start(), end('preempted', 20, NOW - 60)], range(20), 20, None,
     {'latest.pt': bytes(random.Random(0).randrange(256) for _ in range(4096)), 'periodic.pt': WHOLE},
     'preempted', 20, 1, None, ['checkpoint latest.pt unreadable: not a torch checkpoint (no zip header)']),
    ('truncated-both', [start(), end('preempted', 20, NOW - 60)], range(20), 20, None,
     {'latest.pt': WHOLE[:len(WHOLE) // 2], 'periodic.pt': b''},
     'preempted', 20, 1, None, ['checkpoint latest.pt unreadable: truncated (its zip directory is missing)',
                                'checkpoint periodic.pt unreadable: empty file']),
]

# the lines ``prefix show`` prints under its starts table (none for the other cases)
FAILED_STARTS = {
    'failed-setup': [f'start 1 {SETUP_ERROR}'],
    'failed-training': ['start 1 failed at step 3: IndexError: index out of range in self'],
    'killed-then-failed-setup': [f'start 2 {SETUP_ERROR}'],
    'complete-then-refused': [f'start 2 {SETUP_ERROR}'],
    'failed-setup-then-trained': [f'start 1 {SETUP_ERROR}'],
    'restarting-after-failure': [f'start 1 {SETUP_ERROR}'],
}


@pytest.mark.parametrize(('name', 'records', 'steps', 'checkpoint', 'lock_age', 'files',
                          'state', 'step', 'starts', 'error', 'problems'), CASES, ids=[c[0] for c in CASES])
def test_runs_shows_how_each_run_failed_and_which_checkpoint_is_damaged(
        tmp_path: Path, capsys: pytest.CaptureFixture, name: str, records: list[dict], steps: range,
        checkpoint: int | None, lock_age: float | None, files: dict[str, bytes], state: str, step: int | None,
        starts: int, error: str | None, problems: list[str]) -> None:
    make_run(tmp_path, name, records, steps, checkpoint, lock_age=lock_age, files=files)
    summary = summarize(RunDir(tmp_path / name))
    assert (summary.state, summary.step, summary.starts) == (state, step, starts)
    assert (summary.error, summary.problems) == (error, problems)

    assert runs_command(['--root', str(tmp_path)]) == 0
    header, row = capsys.readouterr().out.splitlines()
    assert row.split()[:3] == [name, state, f'{step if step is not None else "-"}/60ba']
    assert row[header.index('PROBLEMS'):] == '; '.join(filter(None, [error, *problems]))


@pytest.mark.parametrize(('name', 'records', 'steps', 'checkpoint', 'lock_age', 'files',
                          'state', 'step', 'starts', 'error', 'problems'), CASES, ids=[c[0] for c in CASES])
def test_show_prints_the_failed_starts_and_the_damaged_checkpoints_never_none(
        tmp_path: Path, name: str, records: list[dict], steps: range, checkpoint: int | None, lock_age: float | None,
        files: dict[str, bytes], state: str, step: int | None, starts: int, error: str | None,
        problems: list[str]) -> None:
    run = make_run(tmp_path, name, records, steps, checkpoint, lock_age=lock_age, files=files)
    info = details(run)
    out = render(run, info)
    assert 'None' not in out
    assert out.splitlines()[0].startswith(f'run {name}: {state}, step {step if step is not None else "-"}/60ba,')
    assert len(info['starts']) == starts
    failed = [line for line in out.splitlines() if line.startswith('start ') and ' failed ' in line]
    assert failed == FAILED_STARTS.get(name, [])
    steps_read = {c['file']: c['step'] for c in info['checkpoints']}
    for file, data in files.items():
        assert steps_read[file] == (20 if data == WHOLE else None)
        assert (f'checkpoint {file} unreadable' in out) == (data != WHOLE)
    assert ('problems:' in out) == any(data != WHOLE for data in files.values())


def test_a_start_that_failed_before_training_is_start_up_and_hides_no_redone_steps(tmp_path: Path) -> None:
    # Killed after step 14 with the checkpoint of step 10; a start fails in setup; the next resumes from step 10.
    records = [start(0, NOW - 100), setup_failed(NOW - 70), start(10, NOW - 50, redone_steps=4)]
    run = make_run(tmp_path, 'resumed', records, range(14), 10)
    assert previous_start(make_run(tmp_path, 'failed', records[:2], range(14), 10)) == ('killed', 14)
    info = details(run)
    assert [s['ended'] for s in info['starts']] == ['killed', 'failed', 'killed']
    g = info['goodput']
    assert abs(g['lost_s'] - 4.0) < 1e-6, 'steps 11-14 of the first start, trained again by the third'
    assert abs(g['startup_s'] - (5 + 7 + 5)) < 1e-6, 'the failed start is all start-up'


@pytest.mark.parametrize('metrics', [None, b'', b'{"step": 0, "time": 1.0, "lr-DecoupledAdamW/group0": 0.1}\n'])
def test_plot_without_a_loss_is_one_line_naming_the_file(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                          metrics: bytes | None) -> None:
    run = make_run(tmp_path, 'empty', [setup_failed()])
    if metrics is None:
        run.metrics.unlink()
    else:
        run.metrics.write_bytes(metrics)
    assert runs_main('plot', ['empty', '--root', str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert out == '' and err.count('\n') == 1 and str(run.metrics.resolve()) in err and err.startswith('prefix: error: ')
    assert not run.plot.exists()


def test_a_failed_setup_is_recorded_once_and_only_by_the_lock_holder(tmp_path: Path) -> None:
    path = tmp_path / 'starts.jsonl'
    record_failed_setup(path, LockLostError('another process took the run'))
    assert not path.exists(), 'a start that lost the lock writes nothing more'
    record_failed_setup(path, CheckpointError('no usable checkpoint in /x (latest.pt: truncated)'))
    (record,) = [json.loads(line) for line in path.read_text().splitlines()]
    assert record['event'] == SETUP_FAILED and record['error'] == 'no usable checkpoint in /x (latest.pt: truncated)'
    assert record['writer'] == WRITER and record['process_start'] <= record['unix']

    path.write_text(json.dumps({'event': 'start', 'writer': WRITER}) + '\n' + json.dumps(end('failed', 3, NOW)) + '\n')
    record_failed_setup(path, RuntimeError('raised again after the journal recorded it'))
    assert len(path.read_text().splitlines()) == 2, "a start the journal recorded is the journal's to end"
