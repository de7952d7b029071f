"""End-to-end: the real trainer in real processes, through both entry points, local and remote data."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, run_train, smoke_args, step_losses

pytestmark = pytest.mark.slow


def test_smoke_run_lays_out_the_run_directory_and_learns(tmp_path: Path, dataset: Path) -> None:
    result = run_train(*smoke_args(tmp_path, dataset))
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / 'smoke'
    assert sorted(p.name for p in (run / 'checkpoints').iterdir()) == [
        'latest.pt', 'latest_rank0.pt', 'periodic.pt', 'periodic_rank0.pt']
    assert {p.name for p in (run / 'logs').iterdir()} == {'metrics.jsonl', 'rank0.log'}
    meta = {'checkpoint.json', 'config.yaml', 'env.json', 'git.json', 'starts.jsonl', 'lock.json', 'lock.claim-1'}
    assert {p.name for p in (run / 'meta').iterdir()} == meta

    losses = step_losses(run)
    assert sorted(losses) == list(range(60))
    assert sum(losses[s] for s in range(50, 60)) < sum(losses[s] for s in range(10)) * 0.7, 'the loss falls clearly'
    records = [json.loads(line) for line in (run / 'logs' / 'metrics.jsonl').read_text().splitlines()]
    assert any('metrics/val/LanguagePerplexity' in r for r in records), 'evaluation on the val split ran'
    assert 'checkpoint saved at step 60' in (run / 'logs' / 'rank0.log').read_text()
    # Not a terminal: one line per log_interval, one per evaluation, and none of Composer's chatter.
    lines = result.stdout.splitlines()
    assert [line.split()[1] for line in lines if line.startswith('step ')] == [f'{s}/60' for s in (1, 10, 20, 30, 40, 50, 60)]
    assert all(' loss ' in line and ' lr ' in line and ' tok/s ' in line and ' eta ' in line
               for line in lines if line.startswith('step ') and not line.startswith('step 1/'))
    assert [line.split(':')[0] for line in lines if line.startswith('eval ')] == ['eval at step 20', 'eval at step 40',
                                                                                  'eval at step 60']
    noise = ('Setting seed', 'Checkpoint not found', '*****', '[batch=', 'composer.')
    assert not [line for line in result.stdout.splitlines() + result.stderr.splitlines() if any(n in line for n in noise)]

    config = yaml.safe_load((run / 'meta' / 'config.yaml').read_text())
    assert config['run_name'] == 'smoke' and config['runs_root'] == str(tmp_path) and config['model']['dropout'] == 0.1
    env = json.loads((run / 'meta' / 'env.json').read_text())
    assert env['versions']['mosaicml'] == '0.32.1' and env['world_size'] == 1
    assert env['packages']['mosaicml'] == '0.32.1' and 'torch' in env['packages']
    git = json.loads((run / 'meta' / 'git.json').read_text())
    assert set(git) >= {'ref', 'commit', 'dirty'} and git['source'] == str(REPO), 'the checkout, not a folder in it'
    records = [json.loads(line) for line in (run / 'meta' / 'starts.jsonl').read_text().splitlines()]
    assert [(r['event'], r.get('reason')) for r in records] == [('start', None), ('end', 'completed')]
    starts = records[:1]
    assert starts[0]['start_step'] == 0 and starts[0]['resumed_from'] is None

    latest = torch.load(run / 'checkpoints' / 'latest.pt', weights_only=True)
    assert latest['global_step'] == 60 and latest['tokens_seen'] == 60 * 8 * 128

    again = run_train(*smoke_args(tmp_path, dataset))
    assert again.returncode == 0 and 'already complete' in again.stdout
    assert len((run / 'meta' / 'starts.jsonl').read_text().splitlines()) == 2, 'a finished run does not train again'

    longer = run_train(*smoke_args(tmp_path, dataset, 'max_duration=65ba'))
    assert longer.returncode == 0, longer.stderr[-3000:]
    starts = [json.loads(line) for line in (run / 'meta' / 'starts.jsonl').read_text().splitlines() if '"start"' in line]
    assert starts[-1]['start_step'] == 60 and starts[-1]['resumed_from'] == 'latest.pt'
    assert max(step_losses(run)) == 64


def test_training_from_an_s3_compatible_remote(tmp_path: Path, s3_dataset) -> None:
    remote, env = s3_dataset
    args = smoke_args(tmp_path / 'runs', tmp_path / 'cache', f'data.remote={remote}', 'max_duration=6ba')
    result = run_train(*args, **env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(step_losses(tmp_path / 'runs' / 'smoke')) == list(range(6))
    assert any((tmp_path / 'cache' / 'train').glob('shard.*.mds'))


@pytest.mark.parametrize(('override', 'code', 'message'), [
    ('model.bogus=1', 2, "unknown config key 'model.bogus'"),
    ('data.local=/nonexistent/data', 1, 'dataset split not found: /nonexistent/data/train/index.json'),
])
def test_bad_input_is_one_line_and_touches_nothing(tmp_path: Path, dataset: Path, override: str, code: int,
                                                    message: str) -> None:
    result = run_train(*smoke_args(tmp_path / 'runs', dataset, override))
    assert result.returncode == code
    assert message in result.stderr and result.stderr.strip().count('\n') == 0, result.stderr[-2000:]
    assert not (tmp_path / 'runs').exists()


def test_help_and_config_errors_come_before_the_slow_imports() -> None:
    """``--help`` lists every key of the schema, and a bad config is refused, before torch or Composer is imported."""
    import subprocess
    import sys

    code = ('import runpy, sys; sys.argv = ["prefix.train", *sys.argv[1:]]\n'
            'try:\n    runpy.run_module("prefix.train", run_name="__main__")\n'
            'except SystemExit as e:\n    assert "torch" not in sys.modules, "torch was imported"; raise')

    def trainer(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, '-c', code, *args], capture_output=True, text=True, cwd=REPO)

    asked = trainer('--help')
    assert asked.returncode == 0 and asked.stdout.startswith('usage: composer'), asked.stderr
    keys = {line.split()[0] for line in asked.stdout.splitlines() if line.startswith('  ')}
    assert {'run_name', 'optimizer.lr', 'model.d_model', 'checkpoint.interval', 'loggers.mlflow.tracking_uri'} <= keys
    assert any(line.startswith('  seed ') and 'fixed for the run' in line for line in asked.stdout.splitlines())
    bare = trainer()
    assert bare.returncode == 2 and bare.stderr.startswith('usage: composer')
    bad = trainer(str(REPO / 'yamls' / 'smoke.yaml'), 'optimizer.lrr=3')
    assert bad.returncode == 2 and bad.stderr.strip() == "prefix: config error: unknown config key 'optimizer.lrr'"


def test_a_run_measured_in_epochs_completes_and_is_not_trained_again(tmp_path: Path, dataset: Path) -> None:
    args = smoke_args(tmp_path, dataset, 'max_duration=1ep', 'eval_interval=1ep')
    first = run_train(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    run = tmp_path / 'smoke'
    latest = torch.load(run / 'checkpoints' / 'latest.pt', weights_only=True)
    assert latest['state']['timestamp']['Timestamp']['epoch'] == 1, 'the final checkpoint is after the epoch ended'
    again = run_train(*args)
    assert again.returncode == 0 and 'already complete' in again.stdout, again.stderr[-3000:]
    records = [json.loads(line) for line in (run / 'meta' / 'starts.jsonl').read_text().splitlines()]
    assert [r['event'] for r in records] == ['start', 'end'], 'no second start, no evaluation redone'


def test_a_terminal_gets_the_progress_bar(finished_run: Path, tmp_path: Path, dataset: Path) -> None:
    """Under a real pseudo-terminal, though every rank's output is also copied into logs/ through a pipe."""
    import os
    import pty
    import subprocess

    from conftest import copy_run, run_env, train_cmd

    copy_run(finished_run, tmp_path)
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(train_cmd(*smoke_args(tmp_path, dataset, 'max_duration=26ba')), env=run_env(), cwd=REPO,
                            stdin=subprocess.DEVNULL, stdout=terminal, stderr=terminal)
    os.close(terminal)
    seen = b''
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # EIO: every writer of the terminal has exited
            break
        if not chunk:
            break
        seen += chunk
    os.close(controller)
    assert proc.wait(timeout=300) == 0, seen.decode(errors='replace')[-3000:]
    text = seen.decode(errors='replace')
    assert 'train' in text and '%|' in text, text[-3000:]
    assert not [line for line in text.splitlines() if line.startswith('step ')], 'the bar, not the lines for a log'


@pytest.mark.slow
def test_zero_eval_batches_trains_without_evaluating(finished_run: Path, tmp_path: Path, dataset: Path) -> None:
    from conftest import copy_run

    run = copy_run(finished_run, tmp_path)  # 22 steps, evaluated at step 20
    result = run_train(*smoke_args(tmp_path, dataset, 'max_duration=26ba', 'eval_batches=0', 'eval_interval=2ba'))
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (run / 'logs' / 'metrics.jsonl').read_text().splitlines()]
    evaluated = {r['step'] for r in records if any(k.startswith('metrics/val/') for k in r)}
    assert evaluated and max(evaluated) <= 22 and max(step_losses(run)) == 25


def test_prefix_check_says_what_the_trainer_would_without_torch() -> None:
    """What runai/submit_train.sh runs before it submits: the config's errors, in well under a second."""
    import subprocess
    import sys

    code = ('import runpy, sys; sys.argv = ["prefix", *sys.argv[1:]]\n'
            'try:\n    runpy.run_module("prefix", run_name="__main__")\n'
            'except SystemExit as e:\n    assert "torch" not in sys.modules, "torch was imported"; raise')
    ok = subprocess.run([sys.executable, '-c', code, 'check', str(REPO / 'yamls' / 'base.yaml'), 'optimizer.lr=1e-3'],
                        capture_output=True, text=True, cwd=REPO)
    assert ok.returncode == 0 and 'yamls/base.yaml: ok (run base, model gpt' in ok.stdout, ok.stderr
    bad = subprocess.run([sys.executable, '-c', code, 'check', str(REPO / 'yamls' / 'base.yaml'), 'optimizer.lrr=3'],
                         capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2 and bad.stderr.strip() == "prefix: config error: unknown config key 'optimizer.lrr'"
    unknown = subprocess.run([sys.executable, '-m', 'prefix', 'bogus'], capture_output=True, text=True, cwd=REPO)
    assert unknown.returncode == 2 and unknown.stderr.startswith("prefix: unknown command 'bogus'\nusage: prefix COMMAND")


@pytest.mark.parametrize('case', ['a file', 'read-only', 'a run on a read-only volume'])
def test_a_runs_root_that_cannot_hold_runs_is_one_line(case: str, tmp_path: Path, dataset: Path,
                                                       finished_run: Path) -> None:
    import os
    import shutil
    import subprocess

    from conftest import copy_run, run_env, train_cmd

    root = tmp_path / 'runs'
    wrap: list[str] = []
    if case == 'a file':
        root.write_text('not a folder')
    else:
        if os.geteuid() != 0 or shutil.which('unshare') is None:
            pytest.skip('a read-only mount needs root and unshare')
        root.mkdir()
        if case == 'a run on a read-only volume':
            copy_run(finished_run, root)
        wrap = ['unshare', '--mount', 'sh', '-c', 'mount --bind "$1" "$1" && mount -o remount,ro,bind "$1" && shift && '
                'exec "$@"', 'sh', str(root)]
    result = subprocess.run([*wrap, *train_cmd(*smoke_args(root, dataset))], env=run_env(), capture_output=True, text=True,
                            cwd=REPO, timeout=300)
    errors = [line for line in result.stderr.splitlines() if line.startswith('prefix:')]
    assert result.returncode == 1 and len(errors) == 1, result.stderr[-3000:]
    what = 'write to' if case == 'a run on a read-only volume' else 'create'
    assert errors[0].startswith(f'prefix: error: cannot {what} the run directory {root}/smoke/') and \
        'give runs_root (or $PREFIX_RUNS_ROOT) a folder you can write to' in errors[0], errors[0]
    assert 'Traceback' not in result.stderr


def test_a_run_directory_that_fails_a_write_during_setup_is_one_line(finished_run: Path, tmp_path: Path,
                                                                     dataset: Path) -> None:
    """meta/ full while rank 0 records a config change at the resume: one line naming the file, no traceback."""
    from conftest import copy_run, faults

    run = copy_run(finished_run, tmp_path)
    full = faults({'op': 'open', 'path': 'config_changes.jsonl', 'error': 'ENOSPC'})
    result = run_train(*smoke_args(tmp_path, dataset, 'max_duration=30ba'), **full)
    errors = [line for line in result.stderr.splitlines() if line.startswith('prefix:')]
    assert result.returncode == 1 and 'Traceback' not in result.stderr, result.stderr[-3000:]
    assert errors == [f'prefix: error: rank 0 failed recording config changes in {run}/meta/config_changes.jsonl: No '
                      f'space left on device ({run}/meta/config_changes.jsonl): the volume is full, read-only or failing; '
                      'fix it, then run the same command again'], result.stderr[-3000:]
    assert json.loads((run / 'meta' / 'lock.json').read_text())['state'] == 'released'


def test_show_into_a_closed_pipe_is_quiet(finished_run: Path) -> None:
    """``prefix show --json | head``: the reader left before the output was written (its end closed at once here)."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, '-m', 'prefix', 'show', 'smoke', '--root', str(finished_run.parent), '--json'],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    assert proc.wait() == 0 and stderr == '', stderr
