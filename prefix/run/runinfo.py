"""Read what a run directory says about the run: its state, its starts, its checkpoints, its goodput.

Read-only and tolerant: a run is read while it trains (never taking its lock), and a half-written
or damaged file is reported in ``problems``, never raised. ``prefix runs`` reads only small files
and the tail of the metrics log, so that hundreds of runs list in well under a second.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from prefix.config import Duration
from prefix.files import jsonl
from prefix.run.rundir import RunDir

LOSS = 'loss/train/total'
EVAL_LOSS = 'metrics/val/LanguageCrossEntropy'
YAML_LOADER = getattr(yaml, 'CSafeLoader', yaml.SafeLoader)  # libyaml when present: hundreds of runs stay fast
LOCK_FRESH_S = 15  # the holder rewrites lock.json every 4 s (prefix.run.runlock)
SETUP_FAILED = 'setup_failed'  # the record of a start that failed before training (prefix.run.journal)
GLOBAL_CHECKPOINTS = ('latest.pt', 'periodic.pt')  # what a resume reads (prefix.checkpoint.checkpoint)
ZIP_HEAD, ZIP_END, ZIP_END_BYTES = b'PK\x03\x04', b'PK\x05\x06', 22  # torch.save's zip: its end record is its last bytes


def last_step_after(run: RunDir, since: float) -> Optional[int]:
    """Batches completed by the latest start (from the metrics log's tail), or None if it logged none."""
    steps = [r['step'] + 1 for r in jsonl.tail(run.metrics) if LOSS in r and r.get('time', 0) >= since]
    return max(steps) if steps else None


def start_count(run: RunDir) -> int:
    """How many times the run has started so far."""
    return len(start_steps(run))


def start_steps(run: RunDir) -> list[int]:
    """The step each start so far began from, in order (start ``n`` is item ``n - 1``)."""
    return [e.get('start_step', 0) for e in jsonl.read(run.starts) if e.get('event') == 'start']


def previous_start(run: RunDir) -> tuple[Optional[str], Optional[int]]:
    """How the last start that trained ended (``completed``, ``preempted``, ``failed`` or ``killed``) and the step it
    reached. A start that failed before training is passed over: the steps the next start redoes are its predecessor's."""
    events = [e for e in jsonl.read(run.starts) if e.get('event', 'start') in ('start', 'end')]
    if not events:
        return None, None
    last = events[-1]
    if last.get('event') == 'end':
        return last.get('reason'), last.get('step')
    reached = last_step_after(run, last.get('unix', 0))
    return 'killed', reached if reached is not None else last.get('start_step')


def lock_state(run: RunDir) -> Optional[float]:
    """Seconds since the run's lock was last rewritten by its holder, or None when no process holds it."""
    try:
        age = max(0.0, time.time() - run.lock.stat().st_mtime)
        released = json.loads(run.lock.read_text()).get('state') == 'released'
    except FileNotFoundError:
        return None
    except (OSError, ValueError, AttributeError):
        released = False  # being rewritten, or torn: its age still tells
    return None if released else age


@dataclass
class RunSummary:
    """One line of ``prefix runs``."""

    name: str
    state: str
    step: Optional[int] = None
    max_duration: Optional[str] = None
    tokens_seen: Optional[int] = None
    checkpoint_step: Optional[int] = None
    checkpoint_age_s: Optional[float] = None
    starts: int = 0
    redone_steps: int = 0
    last_loss: Optional[float] = None
    error: Optional[str] = None  # how the last start failed, when it did: where, and its error line
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _max_batches(max_duration: Optional[str]) -> Optional[int]:
    try:
        return Duration.parse(max_duration).batches if max_duration else None
    except ValueError:  # a damaged config.yaml is a problem of its row, reported elsewhere
        return None


def read_config(run: RunDir) -> dict[str, Any]:
    """The resolved config of the run's latest start; OSError or yaml.YAMLError when there is none to read."""
    return yaml.load(run.config.read_text(), Loader=YAML_LOADER) or {}


def checkpoint_damage(path: Path) -> Optional[str]:
    """Why ``path`` cannot be a whole checkpoint, from its first and last bytes; None if it may be one (or is absent).

    torch.save writes a zip archive that ends with its directory's end record: random bytes lack the zip's
    head, a file cut short its end. Two small reads: ``prefix runs`` never loads a checkpoint.
    """
    try:
        with path.open('rb') as f:
            head = f.read(len(ZIP_HEAD))
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - ZIP_END_BYTES))
            end = f.read(len(ZIP_END))
    except FileNotFoundError:
        return None
    except OSError as e:
        return e.strerror or type(e).__name__
    if size == 0:
        return 'empty file'
    if head != ZIP_HEAD:
        return 'not a torch checkpoint (no zip header)'
    if end != ZIP_END:
        return 'truncated (its zip directory is missing)'
    return None


def failure(record: Optional[dict[str, Any]]) -> Optional[str]:
    """The line that says how a start failed, from its ``setup_failed`` or failed ``end`` record; None if it did not."""
    if record is None:
        return None
    error = record.get('error') or 'no error recorded'
    if record.get('event') == SETUP_FAILED:
        return f'failed before training: {error}'
    if record.get('event') == 'end' and record.get('reason') == 'failed':
        step = record.get('step')
        return f'failed at step {step if step is not None else "?"}: {error}'
    return None


def summarize(run: RunDir, check_checkpoints: bool = True) -> RunSummary:
    """The state and progress of one run from its small files; never raises for a damaged run.

    ``check_checkpoints``: look at the first and last bytes of latest.pt and periodic.pt (``show`` loads them instead).
    """
    summary = RunSummary(run.name, 'unknown')
    try:
        _fill(run, summary, check_checkpoints)
    except Exception as e:  # a damaged run is a row with its problem, never a crash of the listing
        summary.state = 'unreadable'
        summary.problems.append(f'{type(e).__name__}: {e}')
    return summary


def _fill(run: RunDir, s: RunSummary, check_checkpoints: bool) -> None:
    events = jsonl.read(run.starts, s.problems)
    starts = [e for e in events if e.get('event', 'start') == 'start']
    s.starts = len(starts) + sum(e.get('event') == SETUP_FAILED for e in events)
    s.redone_steps = sum(int(e.get('redone_steps') or 0) for e in starts)
    try:
        config = read_config(run)
        s.max_duration = config.get('max_duration')
    except FileNotFoundError:
        pass
    except yaml.YAMLError:
        s.problems.append('config.yaml is not valid YAML')
    try:
        ckpt = json.loads(run.checkpoint_summary.read_text())
        s.checkpoint_step, s.tokens_seen = ckpt['step'], ckpt.get('tokens_seen')
        s.checkpoint_age_s = max(0.0, time.time() - ckpt['unix'])
    except FileNotFoundError:
        pass
    except (ValueError, KeyError, TypeError):
        s.problems.append(f'{run.checkpoint_summary.name} is damaged')
    for name in GLOBAL_CHECKPOINTS if check_checkpoints else ():
        if (damage := checkpoint_damage(run.checkpoints / name)) is not None:
            s.problems.append(f'checkpoint {name} unreadable: {damage}')

    tail = jsonl.tail(run.metrics)
    since = starts[-1].get('unix', 0) if starts else 0
    losses = [r for r in tail if LOSS in r]
    if losses:
        s.last_loss = losses[-1][LOSS]
    current = [r['step'] + 1 for r in losses if r.get('time', 0) >= since]
    s.step = max(current) if current else (starts[-1].get('start_step') if starts else s.checkpoint_step)

    lock_age = lock_state(run)
    last = events[-1] if events else None
    setup_failed = last is not None and last.get('event') == SETUP_FAILED
    if lock_age is not None and lock_age < LOCK_FRESH_S:
        s.state = 'running'
    elif last is None:
        s.state = 'new'
    elif setup_failed:
        s.state = 'failed'
    elif last.get('event') == 'end' and last.get('reason') in ('completed', 'failed', 'preempted'):
        s.state = last['reason']
    else:
        s.state = 'preempted'  # started and gone without an end record: killed (SIGKILL, OOM, lost node)
    if s.state != 'running':
        s.error = failure(last)
    total = _max_batches(s.max_duration)
    trained_nothing = s.state == 'preempted' or (s.state == 'failed' and setup_failed)
    if trained_nothing and total is not None and s.checkpoint_step is not None and s.checkpoint_step >= total:
        s.state = 'completed'  # a later start that trained nothing (killed, refused) leaves a finished run finished


def list_runs(root: Path) -> list[RunSummary]:
    """Every run directory under ``root`` (a folder with ``meta/``), sorted by name."""
    if not root.is_dir():
        return []
    runs = (RunDir(p) for p in sorted(root.iterdir(), key=lambda p: p.name))
    return [summarize(run) for run in runs if run.meta.is_dir()]


# --- one run in detail (``prefix show``): reads the whole metrics log and the checkpoint headers ---

def pair_starts(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each start with how it ended: its end record's reason, or ``killed`` when a later start follows without one.

    A start that failed before training is one record (``setup_failed``), its own end.
    """
    starts: list[dict[str, Any]] = []
    for event in events:
        if event.get('event', 'start') == 'start':
            starts.append({**event, 'end': None})
        elif event.get('event') == SETUP_FAILED:
            starts.append({**event, 'end': {'event': 'end', 'reason': 'failed', 'unix': event.get('unix'),
                                            'step': None, 'error': event.get('error')}})
        elif event.get('event') == 'end' and starts and starts[-1]['end'] is None:
            starts[-1]['end'] = event
    return starts


def goodput(starts: list[dict[str, Any]], metrics: list[dict[str, Any]], running: bool) -> dict[str, float]:
    """Where the wall-clock time of every start went: start-up, checkpointing, steps kept, steps redone.

    A start runs from its process start to its end record (or, if killed, its last logged metric).
    Steps past the step the next start resumed from were lost to the preemption and trained again.
    Time between starts (waiting for the cluster to reschedule) is reported apart from goodput.
    A start's metrics are those logged before the next start began training (its ``unix``): the next
    process cannot log before that, and this one logged nothing after it was killed. A start that failed
    before training is all start-up, and resumed nothing: the start after it tells what a kill before it cost.
    """
    totals = {'total_s': 0.0, 'startup_s': 0.0, 'checkpoint_s': 0.0, 'lost_s': 0.0, 'kept_s': 0.0, 'waiting_s': 0.0}
    previous_end: Optional[float] = None
    for index, start in enumerate(starts):
        begun, launched = start.get('unix'), start.get('process_start')
        if begun is None or launched is None:
            continue  # written by an older prefix: no timings
        following = next((s for s in starts[index + 1:] if s.get('event', 'start') == 'start'), None)
        limit = following.get('unix', float('inf')) if following else float('inf')
        mine = [r for r in metrics if begun <= r.get('time', -1) < limit]
        if start['end'] is not None:
            ended = start['end']['unix']
        elif following is None and running:
            ended = time.time()
        else:
            ended = max((r['time'] for r in mine), default=begun)
        checkpointing = sum(r.get('checkpoint/blocked_s') or 0.0 for r in mine)
        lost = 0.0
        if following is not None:
            resumed_at = following.get('start_step', 0)
            kept_until = [r['time'] for r in mine if LOSS in r and r['step'] + 1 == resumed_at]
            reached = max((r['step'] + 1 for r in mine if LOSS in r), default=start.get('start_step', 0))
            if reached > resumed_at:
                lost = ended - (kept_until[-1] if kept_until else begun)
        if previous_end is not None:
            totals['waiting_s'] += max(0.0, launched - previous_end)
        previous_end = ended
        totals['total_s'] += ended - launched
        totals['startup_s'] += begun - launched
        totals['checkpoint_s'] += checkpointing
        totals['lost_s'] += lost
        totals['kept_s'] += max(0.0, ended - begun - checkpointing - lost)
    totals['goodput'] = totals['kept_s'] / totals['total_s'] if totals['total_s'] > 0 else 0.0
    return totals


def checkpoint_files(folder: Path, problems: list[str]) -> list[dict[str, Any]]:
    """Every checkpoint file with its step (read from the file), size and age; an unreadable one in ``problems``."""
    import torch  # only here: listing runs must stay fast

    files = []
    for path in sorted(folder.glob('*.pt')):
        try:
            stat = path.stat()
        except FileNotFoundError:
            continue  # removed since the listing (a checkpoint being written)
        entry: dict[str, Any] = {'file': path.name, 'bytes': stat.st_size,
                                 'age_s': max(0.0, time.time() - stat.st_mtime), 'step': None}
        damage = checkpoint_damage(path)  # says more than torch's error on a file that is not a whole zip
        try:
            if damage is None:
                entry['step'] = int(torch.load(path, map_location='cpu', weights_only=True, mmap=True)['global_step'])
        except Exception as e:  # whatever the bytes are, the run is shown
            text = str(e).strip().splitlines()[0] if str(e).strip() else ''
            damage = f'{type(e).__name__}: {text}' if text else type(e).__name__
        if damage is not None:
            problems.append(f'checkpoint {path.name} unreadable: {damage}')
        files.append(entry)
    return files


def details(run: RunDir) -> dict[str, Any]:
    """Everything ``prefix show`` prints, as plain data (also its ``--json``)."""
    summary = summarize(run, check_checkpoints=False)  # checkpoint_files loads them instead
    problems = summary.problems
    events = jsonl.read(run.starts)
    starts = pair_starts(events)
    for index, start in enumerate(starts):
        if start['end'] is None:
            start['ended'] = 'running' if index == len(starts) - 1 and summary.state == 'running' else 'killed'
        else:
            start['ended'] = start['end'].get('reason')
    info: dict[str, Any] = {'summary': {}, 'config': {}, 'git': {}, 'starts': starts, 'checkpoints': []}
    try:
        info['config'] = read_config(run)
    except (OSError, yaml.YAMLError):
        pass
    try:
        info['git'] = json.loads(run.git.read_text())
    except (OSError, ValueError):
        pass
    if run.checkpoints.is_dir():
        info['checkpoints'] = checkpoint_files(run.checkpoints, problems)
    metrics = jsonl.read(run.metrics, problems)
    info['goodput'] = goodput(starts, metrics, summary.state == 'running')
    info['summary'] = summary.as_dict()  # last: with the problems found above (as_dict copies the list)
    return info
