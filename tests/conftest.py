"""Shared fixtures: a small real dataset, and helpers that run the real trainer in subprocesses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from prefix.chaos import compare as assert_same_training  # noqa: F401  (re-exported for the tests)
from prefix.chaos import step_losses  # noqa: F401
from prefix.data.prepare import prepare
from prefix.data.tokenizer import ByteTokenizer

# One intra-op thread per training process: the suite runs on two xdist workers on two cores, and
# every run of a test (references, killed and resumed runs) must do its arithmetic alike.
os.environ['OMP_NUM_THREADS'] = '1'

REPO = Path(__file__).resolve().parent.parent
STDLIB = Path(sysconfig.get_paths()['stdlib'])
# ~30 KB of train text (about 29 batches of 8 per epoch) and ~7 KB of val text.
DATA_FILES = ['bisect.py', 'colorsys.py', 'abc.py', 'fnmatch.py', 'genericpath.py', 'stat.py', 'keyword.py', 'sched.py']
SMOKE = REPO / 'yamls' / 'smoke.yaml'


def _started_by(test: str) -> list[int]:
    """Live processes whose environment names ``test`` (every process a test starts inherits it), but
    multiprocessing's resource tracker, which lives as long as the process that started it, by design."""
    mark = f'PREFIX_TEST_NAME={test}'.encode()
    pids = []
    for environ in Path('/proc').glob('[0-9]*/environ'):
        try:
            if mark in environ.read_bytes().split(b'\0') and \
                    b'multiprocessing.resource_tracker' not in (environ.parent / 'cmdline').read_bytes():
                pids.append(int(environ.parent.name))
        except OSError:
            continue
    return pids


@pytest.fixture(autouse=True)
def no_process_outlives_its_test(request: pytest.FixtureRequest):
    """Fail a test, naming it, if a process it started is still alive after it (then kill that process).

    A process exiting as the test ends (a killed group being reaped) is given a few seconds first.
    """
    import signal
    import time

    os.environ['PREFIX_TEST_NAME'] = request.node.nodeid
    yield
    deadline = time.monotonic() + 10
    while (left := _started_by(request.node.nodeid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not left, f'{request.node.nodeid} left processes running: {left} (killed now)'


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook, which reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under ``pytest -n 2 --dist loadgroup``, tests sharing an expensive fixture whose tests are quick run on one
    worker, so the finished run (and the runs listed from it) and the tracked run are trained once, not once per
    worker. Such fixtures are session-scoped: a worker runs a group's tests between others', and a module-scoped
    fixture would be made again each time its module comes back. Not the reference runs: the tests comparing
    against them are half of the suite's time, which one worker alone would take."""
    for item in items:
        for shared in ('finished_run', 'tracked_run'):
            if shared in getattr(item, 'fixturenames', ()):
                item.add_marker(pytest.mark.xdist_group(shared))
                break


@pytest.fixture(scope='session')
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp('data') / 'small'
    prepare(out, [str(STDLIB / f) for f in DATA_FILES], tokenizer=ByteTokenizer(), seq_len=128, val_fraction=0.25)
    return out


def epoch_length(dataset: Path, global_batch: int = 8) -> int:
    import json

    return json.loads((dataset / 'prefix_dataset.json').read_text())['samples']['train'] // global_batch


def two_epochs(dataset: Path) -> str:
    """The max_duration of the single-process kill tests: past two epoch boundaries."""
    return f'max_duration={2 * epoch_length(dataset) + 4}ba'


def train_cmd(*args: str, nproc: int = 0) -> list[str]:
    """``python -m prefix.train`` (nproc=0) or the ``composer`` launcher with ``-n nproc``."""
    if nproc:
        launcher = str(Path(sys.executable).parent / 'composer')
        return [launcher, '-n', str(nproc), '--master_port', str(free_port()), '-m', 'prefix.train', *args]
    return [sys.executable, '-m', 'prefix.train', *args]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def group_gone(pgid: int, timeout: float) -> bool:
    """Wait until every process of the group (launcher, ranks, tees, workers) has exited."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def signal_ranks(launcher: subprocess.Popen, sig: int) -> None:
    """``sig`` to the ranks a ``composer`` launcher started, as a pod's first process forwards a preemption.

    Not to the launcher: on SIGTERM it passes the signal on and kills its ranks 30 s later, however
    long their final checkpoint takes.
    """
    import psutil

    for rank in psutil.Process(launcher.pid).children():
        rank.send_signal(sig)


def run_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop('PREFIX_RUNS_ROOT', None)
    env.update(extra)
    return env


FAULTS = Path(__file__).resolve().parent / 'faults'


def faults(*rules: dict) -> dict[str, str]:
    """Environment that makes the trainer's processes load ``tests/faults/sitecustomize.py`` with ``rules``."""
    import json

    return {'PYTHONPATH': os.pathsep.join(filter(None, [str(FAULTS), os.environ.get('PYTHONPATH')])),
            'PREFIX_TEST_FAULTS': json.dumps(rules)}


def wait_for(ready, proc: subprocess.Popen | None = None, what: str = 'the state the test waits for') -> None:
    """Poll ``ready()`` until it holds; fail at once if ``proc`` exits first. No deadline: states, not times."""
    import time

    while not ready():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f'the run exited with {proc.returncode} before {what}')
        time.sleep(0.02)


def run_train(*args: str, nproc: int = 0, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(train_cmd(*args, nproc=nproc), env=run_env(**env), capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def smoke_args(runs_root: Path, dataset: Path, *overrides: str) -> list[str]:
    return [str(SMOKE), f'runs_root={runs_root}', f'data.local={dataset}', *overrides]


@pytest.fixture(scope='session')
def s3_dataset(dataset: Path):
    """A real S3-compatible server (moto, in server mode on loopback) holding ``dataset`` at s3://prefix-data/small."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address='127.0.0.1', port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        'S3_ENDPOINT_URL': f'http://{host}:{port}',
        'AWS_ACCESS_KEY_ID': 'testing',
        'AWS_SECRET_ACCESS_KEY': 'testing',
        'AWS_DEFAULT_REGION': 'us-east-1',
    }
    s3 = boto3.client('s3', endpoint_url=env['S3_ENDPOINT_URL'], region_name='us-east-1',
                      aws_access_key_id='testing', aws_secret_access_key='testing')
    s3.create_bucket(Bucket='prefix-data')
    for path in dataset.rglob('*'):
        if path.is_file():
            s3.upload_file(str(path), 'prefix-data', f'small/{path.relative_to(dataset)}')
    yield 's3://prefix-data/small', env
    server.stop()


@pytest.fixture(scope='session')
def finished_run(tmp_path_factory: pytest.TempPathFactory, dataset: Path) -> Path:
    """A real smoke run of 22 steps: latest.pt at 22, periodic.pt at 20. Copy it before changing it."""
    root = tmp_path_factory.mktemp('finished')
    result = run_train(*smoke_args(root, dataset, 'max_duration=22ba'))
    assert result.returncode == 0, result.stderr[-3000:]
    return root / 'smoke'


def starts(run: Path) -> list[dict]:
    """The start records of ``meta/starts.jsonl`` (end records left out)."""
    import json

    records = [json.loads(line) for line in (run / 'meta' / 'starts.jsonl').read_text().splitlines()]
    return [r for r in records if r['event'] == 'start']


def committed_step(run: Path) -> int | None:
    """The step of the last committed checkpoint, from ``meta/checkpoint.json`` (None before the first)."""
    import json

    try:
        return json.loads((run / 'meta' / 'checkpoint.json').read_text())['step']
    except (FileNotFoundError, ValueError):
        return None


def copy_run(run: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(run, dest / run.name)
    return dest / run.name


@pytest.fixture(scope='session')
def reference(tmp_path_factory: pytest.TempPathFactory, dataset: Path):
    """``reference(nproc, *overrides)``: an uninterrupted smoke run, made once per configuration for the whole
    session: the xdist workers share them (the first to need one trains it, holding its lock; the other waits).

    Checkpoint intervals and dataloader workers do not change the training math, so the tests
    that kill runs compare against these whatever their checkpoint settings.
    """
    import fcntl
    import hashlib
    import shutil

    # Every worker's base folder lies in the session's one (pytest-N/popen-gwK); without xdist, this session's.
    shared = tmp_path_factory.getbasetemp()
    shared = shared.parent if os.environ.get('PYTEST_XDIST_WORKER') else shared

    def get(nproc: int, *overrides: str) -> Path:
        root = shared / f'reference-{hashlib.sha1(repr((nproc, *overrides)).encode()).hexdigest()[:12]}'
        with open(f'{root}.lock', 'a') as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, by the end of the process at worst
            if not (root / 'trained').exists():
                shutil.rmtree(root, ignore_errors=True)  # a failed attempt's: a reference is never a resumed run
                result = run_train(*smoke_args(root, dataset, *overrides), nproc=nproc)
                assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
                (root / 'trained').touch()
        return root / 'smoke'

    return get


# --- shared by the tests of several packages ----------------------------------------------------

HANG = 180  # seconds after which a run that has not exited is hung: a failure, not a timing goal


def error_line(log: Path) -> str:
    """The one line a failed rank printed."""
    return [line for line in log.read_text().splitlines() if line.startswith('prefix: error:')][-1]


@dataclass
class Moment:
    """Where a start is SIGKILLed: the fault-injector rule that holds it there, and what else must be true first."""

    name: str
    hold: dict
    also: Callable[[Path], bool] = lambda run: True


def held_at(name: str, step: int, event: str = 'batch_checkpoint', committed: int | None = None) -> Moment:
    also = (lambda run: committed_step(run) == committed) if committed is not None else (lambda run: True)
    return Moment(name, {'op': 'step', 'step': step, 'event': event, 'block': True}, also)


def killed_run(root: Path, args: list[str], moments: list[Moment], nproc: int = 0, finish: bool = True,
               rules: tuple[dict, ...] = ()) -> None:
    """Start the run, SIGKILL its whole process group at each moment, then (``finish``) let it finish.

    ``rules``: fault-injector rules for every start (``faults``), besides each moment's own.
    """
    run = root / 'smoke'
    for moment in moments:
        marker = root / f'held-{moment.name}'
        env = run_env(**faults(*rules, {**moment.hold, 'marker': str(marker)}))
        proc = subprocess.Popen(train_cmd(*args, nproc=nproc), env=env, cwd=REPO, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda m=marker, ready=moment.also: m.exists() and ready(run), proc, moment.name)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    if finish:
        result = run_train(*args, nproc=nproc, **(faults(*rules) if rules else {}))
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]


# --- a rank or node lost without warning (tests/distributed/test_peers.py, tests/test_multinode.py) --------------


def gone(launcher: subprocess.Popen) -> bool:
    """The launcher has exited (and is reaped: a zombie would keep its group alive) and its whole group with it."""
    if launcher.poll() is None:
        return False
    try:
        os.killpg(launcher.pid, 0)
    except ProcessLookupError:
        return True
    return False


def the_line(log: Path, launcher: subprocess.Popen) -> str:
    """The one ``prefix: error:`` line a rank printed (waited for: its console copy may lag its exit, so until the
    launcher's whole process group, the copies included, is gone)."""
    wait_for(lambda: 'prefix: error:' in log.read_text() or gone(launcher), what=f'the line in {log.name}')
    lines = [x for x in log.read_text().splitlines() if x.startswith('prefix: error:')]
    assert len(lines) == 1, lines
    return lines[0]


def named_lost(line: str) -> set[int]:
    """The ranks a survivor's line names as lost (dead: ``lost rank 2 (node 1, host h), rank 3 (...) at step 10``;
    hung: ``rank 2 (...) stopped answering``)."""
    import re

    head = re.split(r' at step \d+: | stopped answering: ', line, maxsplit=1)[0]
    return {int(r) for r in re.findall(r'rank (\d+) \(', head)}


def saved_after_loss(lines: list[str]) -> int | None:
    """The step the survivors' lines say one of them saved after the loss (``rank 0 saved step 10, the last it
    completed``), or None: the last committed checkpoint stays, as the lines say."""
    import re

    steps = {int(m.group(1)) for line in lines for m in [re.search(r'rank \d+ saved step (\d+), the last', line)] if m}
    assert len(steps) <= 1, lines
    return steps.pop() if steps else None


def unlogged_after_loss(lines: list[str]) -> set[int]:
    """The logged step (a step's loss is logged at its index, one less) the run may lack after the loss: the one a
    survivor other than rank 0 saved (rank 0 writes the log, and may not have completed that step)."""
    saved = saved_after_loss(lines)
    return {saved - 1} if saved is not None and any('for the next start to adopt' in x for x in lines) else set()
