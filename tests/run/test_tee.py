"""The console's copy in logs/ (prefix.run.tee): a hung volume holds neither the console, nor the training,
nor the pod; the file gets its lines when the volume answers, with a line for those it had to drop."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import HANG, REPO, faults, group_gone, run_env, smoke_args, train_cmd, wait_for

GAP = re.compile(r'^\[prefix: (\d+) lines? not copied to this file while its volume did not answer\]$')


def hold_writes(name: str, tmp_path: Path, release: bool = True) -> tuple[dict, Path, Path]:
    """A rule that holds every write to the file ``name`` (until ``release`` exists), and its two files."""
    held, go_on = tmp_path / f'{name}.held', tmp_path / f'{name}.release'
    rule = {'op': 'write', 'path': name, 'block': True, 'marker': str(held)}
    return ({**rule, 'release': str(go_on)} if release else rule), held, go_on


def test_held_writes_queue_the_console_goes_on_and_the_oldest_lines_over_the_bound_are_one_line(tmp_path: Path) -> None:
    out, console = tmp_path / 'out.log', tmp_path / 'console'
    rule, held, release = hold_writes('out.log', tmp_path)
    with console.open('wb') as to_console:
        tee = subprocess.Popen([sys.executable, '-m', 'prefix.run.tee', str(out), '--buffer', '200'],
                               stdin=subprocess.PIPE, stdout=to_console, env=run_env(**faults(rule)), cwd=REPO)
    assert tee.stdin is not None
    tee.stdin.write(b'line 0\n')
    tee.stdin.flush()
    wait_for(held.exists, tee, 'the first write held')
    tee.stdin.write(b''.join(f'line {i}\n'.encode() for i in range(1, 100)))
    tee.stdin.flush()
    wait_for(lambda: console.read_text().count('\n') == 100, tee, 'every line on the console')
    assert out.read_text() == '', 'held'
    release.touch()
    tee.stdin.close()
    assert tee.wait(timeout=HANG) == 0
    first, gap, *tail = out.read_text().splitlines()
    dropped = int(GAP.match(gap)[1])
    assert first == 'line 0' and tail == [f'line {i}' for i in range(1 + dropped, 100)]
    assert sum(len(line) + 1 for line in tail) <= 200 < sum(len(line) + 1 for line in [f'line {dropped}', *tail])
    assert console.read_text() == ''.join(f'line {i}\n' for i in range(100))


def test_a_failed_write_is_said_on_the_console_and_in_the_file_once_it_works_again(tmp_path: Path) -> None:
    out, stderr = tmp_path / 'out.log', tmp_path / 'stderr'
    full = {'op': 'write', 'path': 'out.log', 'error': 'ENOSPC', 'times': 1}
    with stderr.open('wb') as to_stderr:
        tee = subprocess.Popen([sys.executable, '-m', 'prefix.run.tee', str(out)], stdin=subprocess.PIPE,
                               stdout=subprocess.DEVNULL, stderr=to_stderr, env=run_env(**faults(full)), cwd=REPO)
    assert tee.stdin is not None
    tee.stdin.write(b'lost\n')
    tee.stdin.flush()
    wait_for(lambda: 'No space left on device' in stderr.read_text(), tee, 'the failure said')
    assert f'prefix: cannot copy the console into {out} (OSError: No space left on device)' in stderr.read_text()
    tee.stdin.write(b'kept\n')
    tee.stdin.close()
    assert tee.wait(timeout=HANG) == 1
    assert out.read_text() == '[prefix: 1 line not copied to this file: OSError: No space left on device]\nkept\n'


# A rank: copies its console with tee_output, prints, and dies by SIGKILL after a SIGTERM and a SIGINT to its group.
RANK = '''
import os, signal, sys
from prefix.run.tee import tee_output
tee_output(sys.argv[1])
print('to stdout')
print('to stderr', file=sys.stderr)
for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, signal.SIG_IGN)
    os.killpg(0, sig)
os.kill(os.getpid(), signal.SIGKILL)
'''


@pytest.mark.parametrize('hung', [False, True])
def test_a_killed_rank_leaves_its_lines_and_its_copy_never_waits_long_for_a_hung_volume(
        tmp_path: Path, hung: bool) -> None:
    out, stdout, stderr = tmp_path / 'rank0.log', tmp_path / 'stdout', tmp_path / 'stderr'
    rules: list[dict] = [{'op': 'set', 'target': 'prefix.run.tee:DEADLINE_S', 'value': 1}]
    if hung:
        rules.append(hold_writes('rank0.log', tmp_path, release=False)[0])
    with stdout.open('wb') as to_stdout, stderr.open('wb') as to_stderr:
        rank = subprocess.Popen([sys.executable, '-c', RANK, str(out)], stdout=to_stdout, stderr=to_stderr,
                                env=run_env(**faults(*rules)), cwd=REPO, start_new_session=True)
    assert rank.wait(timeout=HANG) == -signal.SIGKILL
    died = time.monotonic()
    assert group_gone(rank.pid, timeout=HANG), 'the copy exits'
    assert time.monotonic() - died < 30, 'a deadline of 1 s, with room for a loaded machine'
    assert stdout.read_text() == 'to stdout\n' and stderr.read_text().startswith('to stderr\n')
    if hung:
        assert out.read_text() == ''
        assert 'rank0.log did not answer for 1 s after the output ended: 2 lines not copied to it' in stderr.read_text()
    else:
        assert sorted(out.read_text().splitlines()) == ['to stderr', 'to stdout']
        assert stderr.read_text() == 'to stderr\n'


def test_the_copy_imports_the_standard_library_only(tmp_path: Path) -> None:
    """It starts once per rank and once per pod: no torch, no Composer."""
    result = subprocess.run([sys.executable, '-X', 'importtime', '-m', 'prefix.run.tee', str(tmp_path / 'out.log')],
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, cwd=REPO, check=True)
    modules = {line.split('|')[-1].strip() for line in result.stderr.splitlines() if line.startswith('import time:')}
    assert 'prefix.run' in modules and not {m.split('.')[0] for m in modules} & {'torch', 'composer', 'numpy'}


@pytest.mark.slow
def test_a_run_whose_console_file_hangs_trains_to_the_end_and_the_file_catches_up(
        tmp_path: Path, dataset: Path) -> None:
    """Every write to logs/rank0.log held from the first: the console and the training go on, the run exits 0;
    released, the file gets the first lines, one line for those over the bound (200 bytes here), and the rest."""
    log, stdout, stderr = tmp_path / 'smoke' / 'logs' / 'rank0.log', tmp_path / 'stdout', tmp_path / 'stderr'
    rule, held, release = hold_writes('rank0.log', tmp_path)
    small = {'op': 'set', 'target': 'prefix.run.tee:BUFFER_BYTES', 'value': 200}
    args = smoke_args(tmp_path, dataset, 'max_duration=6ba', 'log_interval=1ba', 'checkpoint.interval=1h',
                      'checkpoint.periodic_interval=null')
    with stdout.open('wb') as to_stdout, stderr.open('wb') as to_stderr:
        run = subprocess.Popen(train_cmd(*args), stdout=to_stdout, stderr=to_stderr, env=run_env(**faults(rule, small)),
                               cwd=REPO, start_new_session=True)
    assert run.wait(timeout=HANG) == 0, stderr.read_text()[-3000:]
    wait_for(held.exists, what='the first write to the file held')
    done = f'run smoke complete at step 6 ({tmp_path / "smoke"})'
    wait_for(lambda: done in stdout.read_text(), what='the last line on the console')
    assert 'step 6/6' in stdout.read_text() and done not in log.read_text()
    release.touch()
    wait_for(lambda: done in log.read_text(), what='the file catching up')
    assert group_gone(run.pid, timeout=HANG)
    lines = log.read_text().splitlines()
    gaps = [int(m[1]) for m in map(GAP.match, lines) if m]
    console = stdout.read_text().splitlines() + stderr.read_text().splitlines()
    assert len(gaps) == 1 and gaps[0] > 0, lines
    assert all(line in console for line in lines if not GAP.match(line))


FAKE_LAUNCHER = '''#!{python}
"""composer -n 1 -m prefix.train CONFIG run_name=R runs_root=ROOT: a rank that prints, and then its console's
copy stops for good (a process stuck in the kernel looks the same to the pod)."""
import os, sys, time
import psutil
from prefix.run.tee import tee_output
args = dict(a.split('=', 1) for a in sys.argv[1:] if '=' in a)
log = os.path.join(args['runs_root'], args['run_name'], 'logs', 'rank0.log')
tee_output(log)
print('trained', flush=True)
while not (os.path.exists(log) and 'trained' in open(log).read()):
    time.sleep(0.02)
(copy,) = psutil.Process().children()
copy.suspend()
'''


@pytest.mark.slow  # no trainer, but 12 s: the pod's bound on a copy that does not end
def test_the_pod_does_not_wait_for_a_console_copy_that_never_ends(tmp_path: Path) -> None:
    bin_dir, console = tmp_path / 'bin', tmp_path / 'console'
    bin_dir.mkdir()
    (bin_dir / 'composer').write_text(FAKE_LAUNCHER.format(python=sys.executable))
    (bin_dir / 'composer').chmod(0o755)
    env = run_env(PREFIX_RUNS_ROOT=str(tmp_path), PREFIX_GPUS='1')
    env['PATH'] = f'{bin_dir}:{Path(sys.executable).parent}:{env["PATH"]}'
    with console.open('wb') as to_console:
        pod = subprocess.Popen(['bash', str(REPO / 'runai' / 'pod_train.sh'), 'pod-run', 'yamls/smoke.yaml'],
                               stdout=to_console, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
    assert pod.wait(timeout=HANG) == 0, console.read_text()
    assert group_gone(pod.pid, timeout=HANG)
    text = console.read_text()
    assert 'trained' in text and 'did not finish in 12 s' in text and 'training exited with status 0' in text
    log = (tmp_path / 'pod-run' / 'logs' / 'pod-0.log').read_text()
    assert 'node 0 of 1' in log and 'trained' in log and 'training exited with status 0' in log
