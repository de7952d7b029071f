"""prefix against what a user would run instead (``benchmarks/plain_composer.py``): ``make bench-goodput``.

Both sides train the same experiment (``yamls/base.yaml``: prefix's GPT, d_model 128, 4 layers, global
batch 16) with the same ranks (the ``composer`` launcher, CPU ranks on gloo, ``OMP_NUM_THREADS=1``),
data and checkpoint interval. Every number comes from outside the trainers: the tests' probe
(``tests/faults``, ``record``) writes when each step ended and how long chosen calls took, on rank 0.

- ``throughput``: seconds per step over steps 30-150 with no checkpoint due, the sides interleaved,
  ``--reps`` times; the median of the per-repetition ratios.
- ``watcher``: what watching for lost ranks costs a step: prefix as it runs against prefix with its
  watcher's threads asleep (their first beat an hour away), interleaved, ``--reps`` times.
- ``startup``: from process start to the end of the first new step, part by part, for a fresh
  start and for a resume whose checkpoint was evicted from the page cache, next to the disk's read
  bandwidth (``--startup-model``: the 57 M model, whose checkpoint is 684 MB); the sides interleaved,
  ``--startup-reps`` times, the median of each part.
- ``goodput``: a seeded preemption trace (graceful: SIGTERM to the ranks, as a pod's first process
  forwards it, SIGKILL to every process after ``--grace`` seconds; hard: SIGKILL at once; lost: SIGKILL of
  the last rank's process alone, a node lost without warning, the others left to notice and exit on their
  own; hung: SIGSTOP of the last rank's process alone, a frozen node, the others left to notice it or not;
  after a lost or hung rank every process is SIGKILLed once the other ranks have exited, as a cluster
  restarts the job when a pod fails, or after ``--grace`` seconds), each kill at a seeded instant after
  the first new step and followed by an immediate restart of the same command, replayed against each side,
  next to the same run uninterrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch
from checkpoint_bench import disk_bandwidth, drop_cache

REPO = Path(__file__).resolve().parent.parent
PROBE = REPO / 'tests' / 'faults'
BIN = Path(sys.executable).parent
CONFIG = str(REPO / 'yamls' / 'base.yaml')
COMMON = ['eval_interval=100000ba', 'checkpoint.periodic_interval=null']
MODEL_57M = ['model.d_model=768', 'model.n_heads=12', 'model.n_layers=8', 'global_batch_size=2']
# What start-up is made of: the probe times these calls (the same on both sides but the last).
PARTS = {
    'process group': 'composer.utils.dist:initialize_dist',
    'data': 'streaming.base.dataset:StreamingDataset.__init__',
    'model build': 'prefix.models.composer_model:ComposerGPT.__init__',
    'checkpoint read': 'composer.utils.checkpoint:load_checkpoint',
    'resume point (prefix)': 'prefix.checkpoint.checkpoint:find_resume_point',
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def command(side: str, nproc: int, args: list[str], log: Path) -> list[str]:
    """The side's command; the launcher keeps the other ranks' output next to ``log`` (prefix's ranks keep theirs too)."""
    keep = [arg for out in ('stdout', 'stderr') for arg in (f'--{out}', f'{log.with_suffix("")}-rank{{rank}}.{out}')]
    launcher = [str(BIN / 'composer'), '-n', str(nproc), '--master_port', str(free_port()), *keep]
    entry = ['-m', 'prefix.train'] if side == 'prefix' else [str(REPO / 'benchmarks' / 'plain_composer.py')]
    return [*launcher, *entry, CONFIG, *COMMON, *args]


def checkpoint_args(side: str, every: str) -> list[str]:
    """The checkpoint interval, as each side is given it; '' for none due."""
    if side == 'prefix':
        return [f'checkpoint.interval={every or "10h"}']
    return [f'checkpoint.interval={every or "1000000ba"}']


def checkpoint_files(side: str, run: Path) -> list[Path]:
    folder = run / ('checkpoints' if side == 'prefix' else 'composer')
    return [p for p in folder.rglob('*') if p.is_file() and not p.is_symlink()]


@dataclass
class Start:
    """One process start of a run: when it began and ended, and what the probe saw of it (rank 0)."""

    began: float
    records: list[dict[str, Any]] = field(default_factory=list)
    signalled: float | None = None
    kind: str = ''  # how it was preempted
    ended: float | None = None
    code: int | None = None

    @property
    def steps(self) -> dict[int, float]:
        return {r['step']: r['end'] for r in self.records if r['what'] == 'batch_end'}

    def spent(self, target: str) -> float:
        return sum(r['end'] - r['start'] for r in self.records if r['what'] == target)


class Probe:
    """The probe's records of a run's processes, read as they are appended."""

    def __init__(self, path: Path, extra: list[str] = (), sets: dict[str, Any] | None = None) -> None:
        self.path, self.offset = path, 0
        rules = [{'op': 'step', 'event': 'batch_end', 'record': str(path), 'rank': 0},
                 {'op': 'step', 'event': 'fit_start', 'record': str(path), 'rank': 0},
                 *({'op': 'call', 'target': t, 'record': str(path), 'rank': 0} for t in extra),
                 *({'op': 'set', 'target': t, 'value': v} for t, v in (sets or {}).items())]
        self.env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': str(PROBE), 'PREFIX_TEST_FAULTS': json.dumps(rules)}
        self.env.pop('PREFIX_RUNS_ROOT', None)

    def new(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with self.path.open() as f:
            f.seek(self.offset)
            text = f.read()
        complete = text[:text.rfind('\n') + 1]
        self.offset += len(complete)
        return [json.loads(line) for line in complete.splitlines()]


def start(cmd: list[str], probe: Probe, log: Path) -> tuple[subprocess.Popen, Start]:
    began = time.time()
    with log.open('a') as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=probe.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, Start(began)


def finish(proc: subprocess.Popen, s: Start, probe: Probe) -> Start:
    s.code = proc.wait()
    gone(proc)
    s.ended = time.time()
    s.records += probe.new()
    return s


def gone(proc: subprocess.Popen) -> None:
    """Wait until every process of the start's session has exited (a pod is gone only then)."""
    while any(p.info['pid'] != proc.pid for p in psutil.process_iter(['pid']) if _session(p) == proc.pid):
        time.sleep(0.01)


def _session(p: psutil.Process) -> int | None:
    try:
        return os.getsid(p.pid)
    except OSError:
        return None


RETRIES = 2  # a start that fails on its own is run again, as a cluster restarts a failed pod, and reported


def run_once(side: str, nproc: int, args: list[str], probe: Probe, log: Path) -> Start:
    for _ in range(RETRIES + 1):
        proc, s = start(command(side, nproc, args, log), probe, log)
        s = finish(proc, s, probe)
        if s.code == 0:
            return s
        failed(side, s, log)
    raise RuntimeError(f'{side} exited with {s.code} {RETRIES + 1} times: see {log}')


def failed(side: str, s: Start, log: Path) -> None:
    print(f'  {side}: a start failed on its own (exit {s.code}), started again; its output: {log}, '
          f'{log.with_suffix("")}-rank*', flush=True)


# --- throughput -----------------------------------------------------------------------------------

# prefix's own work in a step, timed by the probe in a run of its own (its records would slow the timed runs).
PER_STEP = ['prefix.checkpoint.checkpointer:Checkpointer.batch_start',
            'prefix.checkpoint.checkpointer:Checkpointer.batch_checkpoint',
            'prefix.run.logs:MetricsLogger.log_metrics', 'prefix.run.logs:MetricsLogger.batch_end']


def step_times(s: Start, first: int, last: int) -> list[float]:
    steps = s.steps
    return [steps[i + 1] - steps[i] for i in range(first, last)]


def throughput(root: Path, reps: int, nproc: int) -> None:
    """Per-step time of each side: the median step of steps 30-150 (a step the machine interrupted counts once)."""
    first, last = 30, 150
    per_step: dict[str, list[float]] = {'prefix': [], 'composer': []}
    for rep in range(reps):
        for side in per_step:  # interleaved: a drift of the machine hits both sides alike
            name = f'tput-{side}-{rep}'
            s = run_once(side, nproc, [f'runs_root={root}', f'run_name={name}', f'max_duration={last + 2}ba',
                                       *checkpoint_args(side, '')], Probe(root / f'{name}.jsonl'), root / f'{name}.log')
            per_step[side].append(statistics.median(step_times(s, first, last)))
        print(f'  throughput: repetition {rep + 1}/{reps}: prefix {per_step["prefix"][-1] * 1e3:.2f} ms/step, composer '
              f'{per_step["composer"][-1] * 1e3:.2f} ms/step', flush=True)
    ratios = [p / c for p, c in zip(per_step['prefix'], per_step['composer'], strict=True)]
    s = run_once('prefix', nproc, [f'runs_root={root}', 'run_name=tput-parts', f'max_duration={last + 2}ba',
                                   *checkpoint_args('prefix', '')], Probe(root / 'tput-parts.jsonl', PER_STEP),
                 root / 'tput-parts.log')
    t0, t1 = s.steps[first], s.steps[last]  # a step's batch_checkpoint comes after its batch_end
    parts = {t: sum(r['end'] - r['start'] for r in s.records if r['what'] == t and t0 < r['end'] <= t1) / (last - first)
             for t in PER_STEP}
    step = statistics.median(step_times(s, first, last))
    print(f'\nthroughput, {nproc} ranks, median step of steps {first}-{last}, no checkpoint due, {reps} repetitions:')
    medians = {side: statistics.median(times) for side, times in per_step.items()}
    print('| s/step prefix | s/step plain Composer | ratio of the two | each repetition\'s ratio | their median |')
    print('| --- | --- | --- | --- | --- |')
    print(f'| {medians["prefix"]:.4f} | {medians["composer"]:.4f} | {medians["prefix"] / medians["composer"]:.3f} '
          f'| {", ".join(f"{r:.3f}" for r in ratios)} | **{statistics.median(ratios):.3f}** |')
    print(f'\nprefix\'s own work per step on rank 0 (a run of its own, {step * 1e3:.1f} ms a step):')
    print('| call | ms per step | % of a step |')
    print('| --- | --- | --- |')
    for target, spent in parts.items():
        print(f'| `{target.split(":")[1]}` | {spent * 1e3:.3f} | {100 * spent / step:.2f} % |')
    total = sum(parts.values())
    print(f'| all | {total * 1e3:.3f} | **{100 * total / step:.2f} %** |', flush=True)


def watcher(root: Path, reps: int, nproc: int) -> None:
    """The lost-rank watcher's cost: prefix's median step (steps 30-150) with its watcher beating once a second,
    against the same run with the watcher's threads asleep (``BEAT_S`` an hour), interleaved."""
    first, last = 30, 150
    sides = {'watching': {}, 'asleep': {'prefix.distributed.peers:BEAT_S': 3600.0}}
    per_step: dict[str, list[float]] = {side: [] for side in sides}
    for rep in range(reps):
        for side, sets in sides.items():
            name = f'watch-{side}-{rep}'
            s = run_once('prefix', nproc, [f'runs_root={root}', f'run_name={name}', f'max_duration={last + 2}ba',
                                           *checkpoint_args('prefix', '')], Probe(root / f'{name}.jsonl', sets=sets),
                         root / f'{name}.log')
            per_step[side].append(statistics.median(step_times(s, first, last)))
        print(f'  watcher: repetition {rep + 1}/{reps}: watching {per_step["watching"][-1] * 1e3:.2f} ms/step, asleep '
              f'{per_step["asleep"][-1] * 1e3:.2f} ms/step', flush=True)
    ratios = [w / a for w, a in zip(per_step['watching'], per_step['asleep'], strict=True)]
    print(f'\nthe watcher, {nproc} ranks, median step of steps {first}-{last}, {reps} repetitions:')
    print(f'its threads\' own CPU time: {cpu_of_watching(nproc) * 1e3:.3f} ms per second of each rank')
    print('| s/step watching | s/step asleep | each repetition\'s ratio | their median |')
    print('| --- | --- | --- | --- |')
    print(f'| {statistics.median(per_step["watching"]):.4f} | {statistics.median(per_step["asleep"]):.4f} '
          f'| {", ".join(f"{r:.3f}" for r in ratios)} | **{statistics.median(ratios):.3f}** |', flush=True)


def watcher_cpu(nproc: int, seconds: float = 20.0) -> float:
    """CPU seconds per second that one rank's watching takes (its threads' beats, reads and judging, and the store's
    answers), measured by the kernel for ``nproc`` watchers on a real store in this process, over ``nproc``."""
    from datetime import timedelta

    import torch.distributed as tdist

    from prefix.distributed.peers import PeerWatch

    store = tdist.TCPStore('127.0.0.1', 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=10))
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(store.port))
    watches = [PeerWatch(r, nproc).start() for r in range(nproc)]
    main = threading.main_thread().native_id

    def on_cpu() -> int:  # nanoseconds every thread but this one (asleep) ran: the watchers' and the store's
        return sum(int((task / 'schedstat').read_text().split()[0]) for task in Path('/proc/self/task').iterdir()
                   if int(task.name) != main)

    start, began = on_cpu(), time.monotonic()
    time.sleep(seconds)
    spent = (on_cpu() - start) / 1e9
    wall = time.monotonic() - began
    for w in watches:
        w.done()
    return spent / wall / nproc


def cpu_of_watching(nproc: int) -> float:
    """``watcher_cpu`` in a process of its own, which ends without waiting for the watchers' threads."""
    code = (f'import os, sys; sys.path.insert(0, {str(REPO / "benchmarks")!r}); import goodput_bench as g; '
            f'print(g.watcher_cpu({nproc}), flush=True); os._exit(0)')
    return float(subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True,
                                check=True).stdout)


# --- start-up, part by part -----------------------------------------------------------------------

def startup_parts(s: Start) -> list[float]:
    """A start's total to the end of its first new step, then its parts: launcher + imports, PARTS, other, first step."""
    fit = min(r['end'] for r in s.records if r['what'] == 'fit_start')
    first_step = min(r['end'] for r in s.records if r['what'] == 'batch_end')
    work = min(r['start'] for r in s.records if r['what'] in PARTS.values())  # the first piece of it
    parts = [s.spent(t) for t in PARTS.values()]
    imports = work - s.began
    return [first_step - s.began, imports, *parts, fit - s.began - imports - sum(parts), first_step - fit]


def startup(root: Path, nproc: int, model: list[str], reps: int) -> None:
    """Each side's fresh start and resume, the sides interleaved, ``reps`` times: the median of each column."""
    _, read_bw = disk_bandwidth(root)
    columns: dict[tuple[str, str], list[list[float]]] = {}
    for rep in range(reps):
        for side in ('prefix', 'composer'):
            name = f'startup-{side}-{rep}'
            args = [*model, f'runs_root={root}', f'run_name={name}', *checkpoint_args(side, '')]
            probe = Probe(root / f'{name}.jsonl', list(PARTS.values()))
            fresh = run_once(side, nproc, [*args, 'max_duration=2ba'], probe, root / f'{name}.log')
            files = checkpoint_files(side, root / name)
            size = sum(p.stat().st_size for p in files)
            for path in files:
                drop_cache(path)
            resumed = run_once(side, nproc, [*args, 'max_duration=4ba'], probe, root / f'{name}.log')
            columns.setdefault((side, 'fresh'), []).append(startup_parts(fresh))
            columns.setdefault((side, 'resume'), []).append(startup_parts(resumed))
        print(f'  start-up: repetition {rep + 1}/{reps}: ' + ', '.join(f'{side} {kind} {rows[-1][0]:.2f} s'
                                                                   for (side, kind), rows in columns.items()), flush=True)
    print(f'\nstart to the end of the first new step, {nproc} ranks, rank 0, seconds, median of {reps}; checkpoint '
          f'({size / 1e6:.0f} MB) evicted from the page cache before a resume; disk read {read_bw / 1e6:.0f} MB/s')
    print(f'| side | start | total | launcher + imports | {" | ".join(PARTS)} | other | first step |')
    print('| --- ' * (len(PARTS) + 6) + '|')
    medians = {key: [statistics.median(column) for column in zip(*rows, strict=True)] for key, rows in columns.items()}
    for (side, kind), values in medians.items():
        print(f'| {side} | {kind} | ' + ' | '.join(f'{v:.2f}' for v in values) + ' |', flush=True)
    total = {key: values[0] for key, values in medians.items()}
    at_bw = size / read_bw
    print(f'\nprefix: resume / (fresh + checkpoint read at the disk\'s bandwidth, {at_bw:.2f} s) = '
          f'**{total["prefix", "resume"] / (total["prefix", "fresh"] + at_bw):.3f}** (goal <= 1.10); fresh start - '
          f'Composer\'s = **{total["prefix", "fresh"] - total["composer", "fresh"]:+.2f} s** (goal <= +1 s)', flush=True)


# --- goodput under a preemption trace -------------------------------------------------------------

@dataclass
class Event:
    kind: str  # graceful | hard | lost | hung
    after_s: float  # after the end of the start's first new step


def trace(seed: int, events: int, lo: float, hi: float, kinds: list[str]) -> list[Event]:
    """``events`` of ``kinds`` in turn, in a seeded order, each at a seeded instant."""
    rng = random.Random(seed)
    kinds = [kinds[i % len(kinds)] for i in range(events)]
    rng.shuffle(kinds)
    return [Event(kind, round(rng.uniform(lo, hi), 2)) for kind in kinds]


def preempt(proc: subprocess.Popen, s: Start, kind: str, grace: float) -> None:
    s.signalled, s.kind = time.time(), kind
    ranks = psutil.Process(proc.pid).children()
    if kind in ('graceful', 'lost', 'hung'):
        if kind == 'graceful':
            for rank in ranks:  # as runai/pod_train.sh forwards the pod's SIGTERM
                rank.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(grace)
        else:  # the last rank's node is gone (lost) or frozen (hung): the others notice it, or not
            last = max(ranks, key=lambda p: int(p.environ().get('RANK', '0')))
            last.send_signal(signal.SIGKILL if kind == 'lost' else signal.SIGSTOP)
            # On a cluster the lost node is another pod: the job restarts once the survivors have exited (the
            # launcher here would also wait 30 s for its frozen child), or when the grace period ends.
            psutil.wait_procs([r for r in ranks if r.pid != last.pid], timeout=grace)
    with contextlib.suppress(ProcessLookupError):  # what is left when the grace period ends: every process of the pod
        os.killpg(proc.pid, signal.SIGKILL)


class Replay:
    """One side's run under the trace, a start at a time, so that the two sides' starts can be interleaved."""

    def __init__(self, side: str, nproc: int, args: list[str], events: list[Event], probe: Probe, log: Path,
                 grace: float) -> None:
        self.side, self.nproc, self.args, self.probe, self.log, self.grace = side, nproc, args, probe, log, grace
        self.pending = list(events)
        self.starts: list[Start] = []
        self.unsignalled = 0  # failures in a row of starts nobody killed
        self.done = False

    def next_start(self) -> None:
        """Start the command; kill it at the next event's instant, or let it end; a start ending 0 is the last."""
        proc, s = start(command(self.side, self.nproc, self.args, self.log), self.probe, self.log)
        self.starts.append(s)
        if self.pending:
            event = self.pending[0]
            first = None
            while proc.poll() is None:
                s.records += self.probe.new()
                steps = s.steps
                if first is None and steps:
                    first = min(steps.values())
                if first is not None and time.time() >= first + event.after_s:
                    self.pending.pop(0)
                    preempt(proc, s, event.kind, self.grace)
                    break
                time.sleep(0.01)
        finish(proc, s, self.probe)
        self.done = s.code == 0
        if self.done:
            return
        self.unsignalled = self.unsignalled + 1 if s.signalled is None else 0
        if self.unsignalled > RETRIES:
            raise RuntimeError(f'{self.side} exited with {s.code} {self.unsignalled} times in a row unsignalled: '
                               f'see {self.log}')
        if self.unsignalled:
            failed(self.side, s, self.log)

    @property
    def wall(self) -> float:
        """The run's wall time under the trace: its starts back to back (each restart is immediate)."""
        return sum(s.ended - s.began for s in self.starts)


def weights(side: str, run: Path) -> dict[str, torch.Tensor]:
    if side == 'prefix':
        path = run / 'checkpoints' / 'latest.pt'
    else:
        path = run / 'composer' / 'latest-rank0.pt'
    # Composer's own checkpoint pickles more than tensors (timedelta, TorchVersion, ...); both were written here.
    return torch.load(path, map_location='cpu', weights_only=side == 'prefix', mmap=True)['state']['model']


def goodput(root: Path, nproc: int, steps: int, every: int, events: list[Event], grace: float) -> None:
    print(f'\ngoodput: {steps} steps, a checkpoint every {every} steps, {nproc} ranks; trace: '
          + ', '.join(f'{e.kind} at +{e.after_s:.1f} s' for e in events), flush=True)
    args = {side: [f'max_duration={steps}ba', *checkpoint_args(side, f'{every}ba'), f'runs_root={root}']
            for side in ('prefix', 'composer')}
    plain = {side: run_once(side, nproc, [*args[side], f'run_name=plain-{side}'], Probe(root / f'plain-{side}.jsonl'),
                            root / f'plain-{side}.log') for side in args}
    replays = [Replay(side, nproc, [*args[side], f'run_name=trace-{side}'], events, Probe(root / f'trace-{side}.jsonl'),
                      root / f'trace-{side}.log', grace) for side in args]
    while not all(r.done for r in replays):  # start by start, interleaved: a drift of the machine hits both sides alike
        for r in replays:
            if not r.done:
                r.next_start()
    rows = []
    for r in replays:
        times = sorted(plain[r.side].steps.values())
        step_s = statistics.median(b - a for a, b in zip(times, times[1:], strict=False))
        equal = all(torch.equal(a, b) for a, b in zip(weights(r.side, root / f'plain-{r.side}').values(),
                                                      weights(r.side, root / f'trace-{r.side}').values(), strict=True))
        rows.append((r, plain[r.side], step_s, equal))
        print(f'  {r.side}: {len(r.starts)} starts, exits {[s.code for s in r.starts]}', flush=True)
    print('\n| side | preemption | at step | stop: signal (or loss) to exit | start-up: start to its first new step '
          '| steps redone | their time |')
    print('| --- ' * 7 + '|')
    summary = []
    for r, plain, step_s, equal in rows:
        side, starts = r.side, r.starts
        lost_parts = {'stop': 0.0, 'start-up': 0.0, 'redone': 0.0}
        again = 0
        for before, after in zip(starts, starts[1:], strict=False):
            reached = max(before.steps, default=0)
            redone = max(reached - (min(after.steps) - 1), 0)
            stop = before.ended - before.signalled
            startup = min(after.steps.values()) - step_s - after.began  # to the start of its first step
            again += redone
            lost_parts['stop'] += stop
            lost_parts['start-up'] += startup
            lost_parts['redone'] += redone * step_s
            print(f'| {side} | {before.kind} | {reached} | {stop:.2f} s | {startup:.2f} s | {redone} '
                  f'| {redone * step_s:.2f} s |')
        wall_plain = plain.ended - plain.began
        summary.append((side, wall_plain, r.wall, lost_parts, again, equal, step_s))
    print('\n| side | step | wall, uninterrupted | wall, under the trace | time lost | of it: stops | start-ups '
          '| redone steps | other | steps trained again | goodput (uninterrupted / under the trace) '
          '| final weights = uninterrupted |')
    print('| --- ' * 12 + '|')
    for side, wall_plain, wall, parts, again, equal, step_s in summary:
        lost = wall - wall_plain
        print(f'| {side} | {step_s * 1e3:.0f} ms | {wall_plain:.1f} s | {wall:.1f} s | {lost:.1f} s '
              f'| {parts["stop"]:.1f} s | {parts["start-up"]:.1f} s | {parts["redone"]:.1f} s '
              f'| {lost - sum(parts.values()):+.1f} s | {again} | **{wall_plain / wall:.3f}** | {"yes" if equal else "no"} |',
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--parts', default='throughput,watcher,startup,goodput')
    parser.add_argument('--nproc', type=int, default=2)
    parser.add_argument('--reps', type=int, default=5)
    parser.add_argument('--startup-model', choices=('57m', 'base'), default='57m')
    parser.add_argument('--startup-reps', type=int, default=3)
    parser.add_argument('--steps', type=int, default=500, help='goodput: max_duration in batches')
    parser.add_argument('--every', type=int, default=50, help='goodput: the checkpoint interval in batches')
    parser.add_argument('--seed', type=int, default=0, help='goodput: the trace')
    parser.add_argument('--events', type=int, default=6)
    parser.add_argument('--kinds', default='graceful,hard,lost', help='goodput: the kinds of events, in turn '
                        '(graceful, hard, lost, hung)')
    parser.add_argument('--after', default='4,14', help='goodput: each kill this many seconds (uniform) after the '
                                                        'first new step')
    parser.add_argument('--grace', type=float, default=30.0, help='seconds from SIGTERM to SIGKILL')
    parser.add_argument('--folder', type=Path, default=None, help='where runs are written (default: a temp dir)')
    opts = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix='prefix-goodput-', dir=opts.folder))
    print(f'runs under {root}; {os.cpu_count()} CPU cores, torch {torch.__version__}', flush=True)
    if 'throughput' in opts.parts:
        throughput(root, opts.reps, opts.nproc)
    if 'watcher' in opts.parts:
        watcher(root, opts.reps, opts.nproc)
    if 'startup' in opts.parts:
        startup(root, opts.nproc, MODEL_57M if opts.startup_model == '57m' else [], opts.startup_reps)
    if 'goodput' in opts.parts:
        lo, hi = (float(x) for x in opts.after.split(','))
        events = trace(opts.seed, opts.events, lo, hi, opts.kinds.split(','))
        goodput(root, opts.nproc, opts.steps, opts.every, events, opts.grace)


if __name__ == '__main__':
    main()
