"""Every wait ends with a line: a volume that hangs whole, or whose meta/ is full, never hangs the run."""

import re
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from conftest import HANG, REPO, committed_step, error_line, faults, group_gone, run_env, smoke_args, train_cmd

from prefix.distributed.waits import Deadline, Exit, bounded, minutes


def test_a_deadline_names_how_long_it_waited() -> None:
    deadline = Deadline(0.0, 'reading x')
    assert deadline.passed and deadline.left() == 0.0
    assert deadline.line('its volume') == 'still at it after 0 s (its volume)'
    assert minutes(600) == '10.0 min' and not Deadline(60, 'y').passed


def test_bounded_work_is_left_behind_after_its_deadline_and_named_while_it_runs() -> None:
    never = threading.Event()
    assert not bounded(never.wait, 0.1, 'releasing the run lock x')
    assert 'releasing the run lock x' in Exit._doing, 'a forced exit would name it'
    assert bounded(lambda: None, 5, 'quick')
    assert bounded(lambda: 1 / 0, 5, 'failing'), 'an error ends the work: logged, not raised'
    never.set()


def test_an_ending_process_whose_clean_up_hangs_prints_its_line_and_exits() -> None:
    """The main thread stuck in a file operation forever: the process still ends, with the line, what hung and the
    code; Python's own exit (atexit) never runs."""
    code = textwrap.dedent('''
        import atexit, threading
        from prefix.distributed.waits import Exit
        atexit.register(lambda: print('atexit ran'))
        Exit.arm('prefix: error: rank 0 failed x', 3, seconds=0.5)
        with Exit.doing('recording the end of this start in meta/starts.jsonl'):
            threading.Event().wait()
    ''')
    proc = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True, timeout=HANG)
    assert proc.returncode == 3 and 'atexit ran' not in proc.stdout
    assert proc.stderr == ('prefix: error: rank 0 failed x; recording the end of this start in meta/starts.jsonl did '
                           "not finish in 0 s after that: the run directory's volume does not answer; exiting without "
                           'it\n')


# --- the trainer -------------------------------------------------------------------------------

SHORT = [{'op': 'set', 'target': 'prefix.distributed.waits:EXIT_S', 'value': 5},
         {'op': 'set', 'target': 'prefix.distributed.waits:BOUNDED_S', 'value': 2}]
SHORT_LEASE = [{'op': 'set', 'target': 'prefix.run.runlock:BEAT_S', 'value': 0.5},
               {'op': 'set', 'target': 'prefix.run.runlock:WINDOW_S', 'value': 3.0},
               {'op': 'set', 'target': 'prefix.run.runlock:MARGIN_S', 'value': 1.0}]


def frozen(folder: Path, after: Path) -> list[dict]:
    """From ``after`` on, every file operation under ``folder`` blocks forever: a network volume that hangs whole
    (meta/, logs/ and checkpoints/; the console's copy too, which writes logs/)."""
    ops = [('fsync', {}), ('replace', {}), ('link', {}), ('open', {'mode': 'any'}), ('write', {}), ('list', {})]
    return [{'op': op, 'under': str(folder), 'after': str(after), 'block': True, **extra} for op, extra in ops]


@pytest.mark.slow
def test_a_volume_that_hangs_whole_ends_the_run_with_its_line(tmp_path: Path, dataset: Path) -> None:
    """From step 6 the run directory's volume answers nothing: the checkpoint of step 8 passes its deadline; the
    journal's end record and the lock's release then hang too. Each rank prints the line on the console (logs/
    is frozen) and exits 1; the console's copy into logs/ does not keep anything alive; step 4 stays committed.
    (Two ranks: one rank's path is the same, without the agreement.)"""
    nproc = 2
    run, at6 = tmp_path / 'smoke', tmp_path / 'at6'
    # Written synchronously: step 4's checkpoint is whole before step 6 (in the background it could be the one frozen).
    args = smoke_args(tmp_path, dataset, 'max_duration=400ba', 'checkpoint.interval=4ba', 'checkpoint.periodic_interval=null',
                      'checkpoint.write_timeout=6s', 'checkpoint.async_write=false', 'dist_timeout=1h')
    rules = [{'op': 'step', 'step': 6, 'marker': str(at6)}, *frozen(run, at6), *SHORT]
    proc = subprocess.Popen(train_cmd(*args, nproc=nproc), env=run_env(**faults(*rules)), cwd=REPO, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    console = proc.communicate(timeout=HANG)[0]
    assert proc.returncode == 1 and group_gone(proc.pid, timeout=HANG), console[-3000:]
    errors = [line for line in console.splitlines() if line.startswith('prefix: error: ')]
    assert errors, console[-3000:]
    assert re.match(r'prefix: error: rank [01] failed writing the checkpoint of step 8: still at it after 6 s '
                    r'\(checkpoint.write_timeout; [\d.]+ MB on disk\): its volume is hung', errors[0]), errors
    assert 'the checkpoint of step 4 is intact' in errors[0]
    assert any("did not finish in 5 s after that: the run directory's volume does not answer" in e for e in errors), \
        'rank 0 could not record its end nor release the lock, and exited without them'
    assert 'Traceback' not in console
    assert committed_step(run) == 4


@pytest.mark.slow
@pytest.mark.parametrize('nproc', [0, 2])
def test_a_full_meta_folder_stops_the_run_naming_the_lock(tmp_path: Path, dataset: Path, nproc: int) -> None:
    """From step 6 the run lock cannot be renewed (ENOSPC on lock.json's temporary file): the next commit waits for
    the lease, saying so, then stops every rank at the write's deadline with one line naming the lock and the
    error, not the checkpoint volume's speed; the last commit before is intact."""
    run, at6 = tmp_path / 'smoke', tmp_path / 'at6'
    args = smoke_args(tmp_path, dataset, 'max_duration=2000ba', 'checkpoint.interval=2ba',
                      'checkpoint.periodic_interval=null', 'checkpoint.write_timeout=6s', 'dist_timeout=1h')
    rules = [{'op': 'step', 'step': 6, 'marker': str(at6)},
             {'op': 'open', 'path': 'lock.json.*.tmp', 'after': str(at6), 'error': 'ENOSPC'}, *SHORT_LEASE, *SHORT]
    proc = subprocess.Popen(train_cmd(*args, nproc=nproc), env=run_env(**faults(*rules)), cwd=REPO, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    console = proc.communicate(timeout=HANG)[0]
    assert proc.returncode == 1 and group_gone(proc.pid, timeout=HANG), console[-3000:]
    errors = {error_line(run / 'logs' / f'rank{r}.log') for r in range(max(nproc, 1))}
    assert len(errors) == 1, errors
    error = errors.pop()
    match = re.match(r"prefix: error: rank 0 failed renewing the run lock: the run lock \S+/meta/lock.json has not been "
                     r"renewed for \d+ s \(No space left on device \(\S+lock.json.\S+.tmp\)\): its volume is full, "
                     r"failing or hung, and no checkpoint can be committed without it; the checkpoint of step (\d+) is "
                     r"intact\. Fix the cause", error)
    assert match, error
    assert committed_step(run) == int(match.group(1)) >= 4
    assert 'a commit waits for the run lock to be renewed' in (run / 'logs' / 'rank0.log').read_text()
