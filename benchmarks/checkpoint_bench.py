"""What a checkpoint costs: ``make bench`` (CPU, this machine). Prints ratios measured side by side in one run.

For each model size, in one process and with the same model, data and interval, the variants are
trained in turn, ``--reps`` times (the median is reported):

- ``none``: Composer's Trainer alone, no checkpointing;
- ``prefix-idle``: prefix's callbacks and logger attached, no checkpoint due (their cost per step);
- ``composer``: Composer's own synchronous checkpointing;
- ``prefix-sync`` / ``prefix-async``: prefix's Checkpointer, ``checkpoint.async_write`` false / true.

The timed window runs from the end of step 2K-1 to the end of step (c+2)K-1: it holds c
checkpoints (steps 2K..(c+1)K), skips the first one (buffers are allocated there), and ends K-1
steps after the last one so that its background write is inside the window. A checkpoint's cost
is the time the window grew over ``none``, divided by c. Then, in subprocesses, with 1 and 2 ranks:
the time from process start to the first training step, fresh and resumed with a cold page cache,
next to the disk's sequential bandwidth measured on the same folder; and what the resume read beyond
the fresh start, summed over every process: bytes through read(), and bytes from storage.
``--parts`` picks the measurements, ``--variants`` the timed variants.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import sizing
import torch
from composer import Trainer
from composer.core import Callback
from composer.devices import DeviceCPU, DeviceGPU
from composer.utils import dist

import prefix.distributed.composer_fixes  # noqa: F401  (applied on import)
from prefix import config as config_lib
from prefix.checkpoint.checkpointer import Checkpointer
from prefix.config.config import CheckpointConfig, load_config
from prefix.config.duration import Duration
from prefix.data.loader import build_dataloader
from prefix.distributed.agreement import RankFailures
from prefix.distributed.preemption import PreemptionSignal
from prefix.files import jsonl
from prefix.models.gpt import GPT
from prefix.run.journal import Journal
from prefix.run.logs import MetricsLogger
from prefix.run.rundir import RunDir
from prefix.train import training_args

REPO = Path(__file__).resolve().parent.parent
SIZES: dict[str, tuple[str, list[str], int, int]] = {
    # name: (config, overrides, K = checkpoint interval in steps, c = checkpoints timed)
    'smoke': ('yamls/smoke.yaml', [], 10, 5),
    'gpt-57m': ('yamls/base.yaml', ['model.d_model=768', 'model.n_heads=12', 'model.n_layers=8', 'model.dropout=0.0',
                                     'global_batch_size=2'], 3, 2),
    # 1.0 B parameters (a 12 GB checkpoint with AdamW), for a machine with a GPU: --sizes gpt-1b
    'gpt-1b': ('yamls/base.yaml', ['model.d_model=2048', 'model.n_heads=16', 'model.n_layers=20', 'model.dropout=0.0',
                                    'global_batch_size=4'], 3, 2),
}
VARIANTS = ('none', 'prefix-idle', 'composer', 'prefix-sync', 'prefix-async')


def device() -> DeviceCPU | DeviceGPU:
    return DeviceGPU() if torch.cuda.is_available() else DeviceCPU()


def load(size: str, data: Path, root: Path) -> Any:
    config, overrides, k, c = SIZES[size]
    return load_config(str(REPO / config), [*overrides, f'data.local={data}', f'runs_root={root}', f'run_name=bench-{size}',
                                            f'max_duration={(c + 2) * k}ba', 'eval_interval=100000ba'])


def drop_cache(path: Path) -> None:
    """Evict a file's pages from the page cache, so the next read comes from the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def disk_bandwidth(folder: Path, size: int = 512 << 20) -> tuple[float, float]:
    """Sequential write (with fsync) and cold read bandwidth in bytes/s of the disk under ``folder``."""
    path = folder / 'bandwidth.bin'
    block = os.urandom(16 << 20)
    start = time.perf_counter()
    with open(path, 'wb', buffering=0) as f:
        for _ in range(size // len(block)):
            f.write(block)
        os.fsync(f.fileno())
    write = size / (time.perf_counter() - start)
    drop_cache(path)
    start = time.perf_counter()
    with open(path, 'rb', buffering=0) as f:
        while f.read(16 << 20):
            pass
    read = size / (time.perf_counter() - start)
    path.unlink()
    return write, read


def time_variant(size: str, variant: str, data: Path, root: Path, loaders: dict[str, Any]) -> dict[str, Any]:
    """Train one variant in this process; returns the timed window and what its checkpoints cost."""
    _, _, k, c = SIZES[size]
    cfg = load(size, data, root)
    folder = root / f'{size}-{variant}'
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    marks: dict[int, float] = {}

    class Window(Callback):
        def batch_end(self, state: Any, logger: Any) -> None:
            step = int(state.timestamp.batch)
            if step in (2 * k - 1, (c + 2) * k - 1):
                marks[step] = time.perf_counter()

    kwargs: dict[str, Any] = {'callbacks': [Window()]}
    checkpointer = None
    if variant == 'composer':
        kwargs.update(save_folder=str(folder), save_interval=f'{k}ba', save_overwrite=True, save_num_checkpoints_to_keep=1)
    elif variant.startswith('prefix'):
        interval = '1h' if variant == 'prefix-idle' else f'{k}ba'
        failures = RankFailures()
        checkpointer = Checkpointer(folder, CheckpointConfig(interval, None, variant == 'prefix-async'),
                                    config_lib.to_dict(cfg), None, PreemptionSignal(), failures)
        kwargs['callbacks'] += [checkpointer, Journal(folder / 'starts.jsonl', None, None, (None, None), failures)]
        kwargs['loggers'] = [MetricsLogger(folder / 'metrics.jsonl', failures)]
    args = training_args(cfg, loaders['train'], loaders['val'], device())
    args.update(progress_bar=False, log_to_console=False)
    trainer = Trainer(**args, **kwargs)
    trainer.fit()
    trainer.close()
    window = marks[(c + 2) * k - 1] - marks[2 * k - 1]
    result: dict[str, Any] = {'window_s': window, 'steps': c * k}
    if checkpointer is not None and variant != 'prefix-idle':
        timed = [r for r in checkpointer.saves if 2 * k <= r.step <= (c + 1) * k]
        result.update(blocked_s=statistics.median(r.blocked_s for r in timed),
                      write_s=statistics.median(r.write_s for r in timed), bytes=timed[-1].bytes)
    if variant == 'composer':
        result['bytes'] = sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and not p.is_symlink())
    shutil.rmtree(folder, ignore_errors=True)
    return result


PR_SET_CHILD_SUBREAPER = 36


def io_of_descendants(cmd: list[str]) -> dict[str, int]:
    """What ``cmd`` and every process it starts read: bytes through read() (``rchar``) and from storage (``read_bytes``).

    This process is a subreaper (``main``), so every descendant, an orphaned one too, is reaped here,
    and Linux adds a reaped child's I/O counters to its parent's: ``/proc/self/io`` then sums them.
    Memory-mapped reads count in ``read_bytes`` when they reach the disk, never in ``rchar``.

    ``rchar_per_process`` is the other way of summing "over every process of the run": each process's own
    ``/proc/<pid>/io`` as last seen while it ran (polled every 50 ms). Those counters include what the
    process's reaped children read, so a launcher that outlives its ranks counts their reads a second time:
    any byte a rank reads through read() counts twice that way.
    """
    def counters(pid: object = 'self') -> dict[str, int]:
        lines = Path(f'/proc/{pid}/io').read_text().splitlines()
        return {key: int(value) for key, value in (line.split(': ') for line in lines)}

    ours = {child.pid for child in psutil.Process().children()}  # e.g. multiprocessing's resource tracker
    seen: dict[int, int] = {}  # pid: rchar as last polled
    done = threading.Event()

    def poll() -> None:
        while not done.wait(0.05):
            for child in psutil.Process().children(recursive=True):
                if child.pid not in ours:
                    with contextlib.suppress(OSError):
                        seen[child.pid] = counters(child.pid)['rchar']

    poller = threading.Thread(target=poll, daemon=True)
    before = counters()
    poller.start()
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while orphans := [child.pid for child in psutil.Process().children() if child.pid not in ours]:
        for pid in orphans:
            os.waitpid(pid, 0)
    done.set()
    poller.join()
    after = counters()
    return {**{key: after[key] - before[key] for key in ('rchar', 'read_bytes')},
            'rchar_per_process': sum(seen.values())}


def startup(size: str, data: Path, root: Path, nproc: int) -> dict[str, float]:
    """A fresh start, then a resume from its checkpoint with a cold page cache: start to first step, and reads.

    The resume's reads minus the fresh start's are what resuming costs: the checkpoint, and any reading twice.
    """
    _, overrides, _, _ = SIZES[size]
    config = str(REPO / SIZES[size][0])
    name = f'start-{size}-{nproc}'
    args = [*overrides, f'data.local={data}', f'runs_root={root}', f'run_name={name}', 'eval_interval=100000ba',
            'checkpoint.interval=1h', 'checkpoint.periodic_interval=null']
    run = RunDir(root / name)
    shutil.rmtree(run.root, ignore_errors=True)

    def start(max_duration: str) -> tuple[float, dict[str, int]]:
        launcher = [str(Path(sys.executable).parent / 'composer'), '-n', str(nproc)] if nproc > 1 else [sys.executable]
        begun = time.time()
        reads = io_of_descendants([*launcher, '-m', 'prefix.train', config, *args, f'max_duration={max_duration}'])
        times = [r['time'] for r in jsonl.read(run.metrics) if 'loss/train/total' in r and r['time'] > begun]
        return min(times) - begun, reads

    fresh, fresh_reads = start('2ba')
    files = list(run.checkpoints.glob('latest*.pt'))
    size_bytes = sum(p.stat().st_size for p in files)
    for path in files:
        drop_cache(path)
    resumed, resumed_reads = start('4ba')
    shutil.rmtree(run.root, ignore_errors=True)
    return {'fresh_s': fresh, 'resumed_s': resumed, 'checkpoint_bytes': size_bytes,
            **{f'extra_{key}': resumed_reads[key] - fresh_reads[key] for key in fresh_reads}}


# A volume whose writes are throttled (a network volume at its dirty-page limit), simulated by the tests' fault
# injector: every write call of a checkpoint file waits 50 ms, so a write outlasts the step after it.
THROTTLED = [{'op': 'call', 'target': 'prefix.files.atomic:CheckedWriter.write', 'sleep': 0.05}]


def preemption(size: str, data: Path, root: Path, throttled: bool) -> dict[str, float]:
    """SIGTERM while a checkpoint write is in flight, to the process's exit, next to one write and one step.

    One rank, asynchronous checkpoints every K steps: the signal is sent as soon as the second write
    has begun (its first temporary file exists). The exit is what a pod's grace period must cover.
    On this machine's disk the write ends within the step the signal waits for (the write and the step
    share 2 cores); ``throttled`` writes through a slow volume instead, where the write outlasts the step.
    """
    _, overrides, every, _ = SIZES[size]
    name = f'preempt-{size}'
    run = RunDir(root / name)
    shutil.rmtree(run.root, ignore_errors=True)
    cmd = [sys.executable, '-m', 'prefix.train', str(REPO / SIZES[size][0]), *overrides, f'data.local={data}',
           f'runs_root={root}', f'run_name={name}', 'eval_interval=100000ba', f'checkpoint.interval={every}ba',
           'checkpoint.periodic_interval=null', 'max_duration=1000ba']
    env = dict(os.environ)
    if throttled:
        env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(REPO / 'tests' / 'faults'), env.get('PYTHONPATH')])),
                   PREFIX_TEST_FAULTS=json.dumps(THROTTLED))
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    summary = run.root / 'meta' / 'checkpoint.json'
    while not summary.exists() or not list(run.checkpoints.glob('*.tmp')):  # the first committed, the second begun
        if proc.poll() is not None:
            raise RuntimeError(f'{name} exited with {proc.returncode} before its second checkpoint')
        time.sleep(0.005)
    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait()
    exit_s = time.monotonic() - signalled
    records = list(jsonl.read(run.metrics))
    writes = [r['checkpoint/write_s'] for r in records if r.get('checkpoint/write_s')]
    times = sorted(r['time'] for r in records if 'loss/train/total' in r)
    shutil.rmtree(run.root, ignore_errors=True)
    if code != 143:
        raise RuntimeError(f'{name} exited with {code} after SIGTERM, not 143')
    return {'exit_s': exit_s, 'write_s': statistics.median(writes), 'step_s': statistics.median(
        b - a for a, b in zip(times, times[1:], strict=False))}


def peak_rss(cmd: list[str]) -> int:
    """Bytes: the largest resident set of any process of ``cmd``, measured by a fresh parent that waits for all."""
    probe = ('import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL, '
             'stderr=subprocess.DEVNULL); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)')
    out = subprocess.run([sys.executable, '-c', probe, *cmd], check=True, cwd=REPO, capture_output=True, text=True)
    return int(out.stdout.split()[-1]) * 1024


def memory(size: str, data: Path, root: Path, params: int) -> None:
    """Peak host memory per rank (2 ranks) that checkpoints add, full (DDP) and sharded (FSDP), next to the formulas.

    Three runs each: no checkpoint but the last (the baseline), asynchronous checkpoints (save), and a
    resume of that run; the save's and the resume's peaks minus the baseline's, the largest rank's.
    """
    _, overrides, _, _ = SIZES[size]
    config = str(REPO / SIZES[size][0])
    launcher = [str(Path(sys.executable).parent / 'composer'), '-n', '2', '-m', 'prefix.train', config, *overrides,
                f'data.local={data}', f'runs_root={root}', 'eval_interval=100000ba', 'checkpoint.periodic_interval=null']
    print(f'\n{size}: host memory per rank that checkpoints add, 2 ranks (peak resident set of the largest rank)')
    print('| format | checkpoint MB (formula) | written per rank MB (formula) | save: +MB (formula) | resume: +MB (formula) |')
    print('| --- | --- | --- | --- | --- |')
    for sharded in (False, True):
        extra = ['fsdp={}'] if sharded else []
        name = f'memory-{size}-{"sharded" if sharded else "full"}'
        shutil.rmtree(root / name, ignore_errors=True)
        base = peak_rss([*launcher, *extra, f'run_name={name}-base', 'max_duration=4ba', 'checkpoint.interval=1h'])
        save = peak_rss([*launcher, *extra, f'run_name={name}', 'max_duration=4ba', 'checkpoint.interval=1ba'])
        folder = RunDir(root / name).checkpoints
        files = [p for p in folder.rglob('*') if p.is_file()]
        total = sum(p.stat().st_size for p in files)
        per_rank = (max(sum(p.stat().st_size for p in files if p.name.startswith(f'__{r}_')) for r in (0, 1))
                    if sharded else (folder / 'latest.pt').stat().st_size)
        resume = peak_rss([*launcher, *extra, f'run_name={name}', 'max_duration=5ba', 'checkpoint.interval=1h'])
        shutil.rmtree(root / name, ignore_errors=True)
        shutil.rmtree(root / f'{name}-base', ignore_errors=True)
        mb = 1e6
        print(f'| {"sharded" if sharded else "full"} | {total / mb:.0f} ({sizing.checkpoint_bytes(params) / mb:.0f}) '
              f'| {per_rank / mb:.0f} ({sizing.written_per_rank(params, 2, sharded) / mb:.0f}) '
              f'| {(save - base) / mb:.0f} ({sizing.host_memory_at_save(params, 2, sharded, fsdp=sharded) / mb:.0f}) '
              f'| {(resume - base) / mb:.0f} ({sizing.host_memory_at_resume(params, 2, 2, sharded) / mb:.0f}) |', flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--data', type=Path, default=REPO / 'data' / 'stdlib')
    parser.add_argument('--folder', type=Path, default=None, help='where checkpoints are written (default: a temp dir)')
    parser.add_argument('--reps', type=int, default=3)
    parser.add_argument('--sizes', default=','.join(SIZES))
    parser.add_argument('--parts', default='timing,preemption,memory,resume',
                        help='timing (what a checkpoint costs), preemption (SIGTERM to exit), memory (2 ranks), resume (1 and '
                             '2 ranks); default: all')
    parser.add_argument('--variants', default=','.join(VARIANTS), help='the timed variants (default: all)')
    opts = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    dist.initialize_dist(device())
    root = Path(tempfile.mkdtemp(prefix='prefix-bench-', dir=opts.folder))
    write_bw, read_bw = disk_bandwidth(root)
    print(f'disk under {root}: sequential write {write_bw / 1e6:.0f} MB/s (fsynced), cold read {read_bw / 1e6:.0f} MB/s')
    base_interval = load_config(str(REPO / 'yamls/base.yaml'), []).checkpoint.interval
    interval_s = Duration.parse(base_interval).seconds
    for size in opts.sizes.split(','):
        cfg = load(size, opts.data, root)
        batch = cfg.global_batch_size
        loaders = {split: build_dataloader(cfg.data, getattr(cfg.data, f'{split}_split'), batch_size=batch, seed=cfg.seed,
                                           train=split == 'train', max_seq_len=cfg.model.max_seq_len)
                   for split in ('train', 'val')}
        params = sum(p.numel() for p in GPT(cfg.model).parameters())
        if 'timing' in opts.parts:
            runs: dict[str, list[dict[str, Any]]] = {v: [] for v in opts.variants.split(',')}
            for rep in range(opts.reps):
                for variant in runs:  # interleaved, so drift of the machine hits every variant alike
                    runs[variant].append(time_variant(size, variant, opts.data, root, loaders))
                print(f'  {size}: repetition {rep + 1}/{opts.reps} done', flush=True)
            report(size, params, runs, interval_s, base_interval)
        if 'preemption' in opts.parts:
            print(f'\n{size}: SIGTERM with a checkpoint write in flight, 1 rank')
            print('| volume | SIGTERM to exit | one write | one step | (exit - step) / write | formula: step + write |')
            print('| --- | --- | --- | --- | --- | --- |')
            for throttled in (False, True):
                p = preemption(size, opts.data, root, throttled)
                print(f'| {"throttled (50 ms a write call)" if throttled else "this disk"} | {p["exit_s"]:.2f} s '
                      f'| {p["write_s"]:.2f} s | {p["step_s"]:.2f} s | {(p["exit_s"] - p["step_s"]) / p["write_s"]:.2f} '
                      f'| {sizing.preemption_seconds(p["step_s"], p["write_s"]):.2f} s |', flush=True)
        if 'memory' in opts.parts:
            memory(size, opts.data, root, params)
        if 'resume' not in opts.parts:
            continue
        print(f'\n{size}: resume, with the checkpoint evicted from the page cache (reads summed over every process)')
        print('| ranks | checkpoint MB | first step: fresh | resumed | resumed / (fresh + read at bandwidth) '
              '| extra read() bytes / checkpoint | the same, each process\'s counters summed | '
              'extra storage reads / checkpoint |')
        print('| --- | --- | --- | --- | --- | --- | --- | --- |')
        for nproc in (1, 2):
            s = startup(size, opts.data, root, nproc)
            at_bw = s['checkpoint_bytes'] / read_bw
            print(f'| {nproc} | {s["checkpoint_bytes"] / 1e6:.1f} | {s["fresh_s"]:.2f} s | {s["resumed_s"]:.2f} s '
                  f'| {s["resumed_s"] / (s["fresh_s"] + at_bw):.2f} | {s["extra_rchar"] / s["checkpoint_bytes"]:.2f} '
                  f'| {s["extra_rchar_per_process"] / s["checkpoint_bytes"]:.2f} '
                  f'| {s["extra_read_bytes"] / s["checkpoint_bytes"]:.2f} |', flush=True)


def report(size: str, params: int, runs: dict[str, list[dict[str, Any]]], interval_s: float, interval: str) -> None:
    med = {v: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for v, rs in runs.items()}
    none = med['none']
    steps = none['steps']
    c = steps // SIZES[size][2]
    step = none['window_s'] / steps
    sync_total = med['prefix-sync']['blocked_s']
    print(f'\n{size}: {params / 1e6:.1f} M parameters, step {step * 1e3:.1f} ms with no checkpointing, '
          f'{c} checkpoints timed, median of {len(runs["none"])} repetitions')
    print(f'| variant | step time / none | per checkpoint: cost | blocked | blocked / prefix-sync save | write | MB '
          f'| overhead at {interval} |')
    print('| --- | --- | --- | --- | --- | --- | --- | --- |')
    for variant, m in med.items():
        cost = (m['window_s'] - none['window_s']) / c
        row = [variant, f'{m["window_s"] / none["window_s"]:.3f}']
        if variant in ('none', 'prefix-idle'):
            row += ['-'] * 6
        else:
            blocked = m.get('blocked_s')
            row += [f'{cost:.3f} s', f'{blocked:.3f} s' if blocked is not None else '(all)',
                    f'{blocked / sync_total:.2f}' if blocked is not None else '-',
                    f'{m["write_s"]:.3f} s' if 'write_s' in m else '-', f'{m["bytes"] / 1e6:.1f}',
                    f'{100 * max(cost, 0) / interval_s:.3f} %' if interval_s else '-']
        print('| ' + ' | '.join(row) + ' |')


if __name__ == '__main__':
    main()
