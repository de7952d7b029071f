"""``make gpu-check``: what one GPU shows of prefix's CUDA paths, at most 8 minutes on one H100; one table.

    python3 benchmarks/gpu_check.py [--out DIR] [--device cuda|cpu] [--data DIR] [--deadline SECONDS]

It needs no repo venv: any Python with torch, Composer and Streaming importable runs it (a GPU host's image plus
``benchmarks/gpu_wheels.sh``'s wheels on ``PYTHONPATH``: benchmarks/README.md, "gpu-check"). Every subprocess runs
on this same interpreter (``sys.executable``) with the checkout put first on ``PYTHONPATH``.

1. an asynchronous snapshot of FSDP2 shards (a 43 M-parameter GPT and its AdamW state on one GPU, in a process of
   its own as 6 and 7 are): a. the GPU
   memory it adds (none: not the shards' size); b. the host memory it keeps against the state's bytes (one
   exact-size page-locked slab; per-tensor ``pin_memory`` would round each tensor up to a power of two); c. a
   bit-exact round trip: the copy equals the GPU state, and a ``torch.save`` of it loads back equal, for those
   shards and for a state of mixed dtypes (bf16, fp16, int64, bool, empty, a non-contiguous view, a tied pair);
2. the writer thread: a. DCP writes the shards through a ``WriteJob`` while a profiler counts every call that
   thread makes into ``torch.cuda`` (none); b. a GPU tensor handed to a job is refused; c. the process of checks
   1 and 2 imports neither Composer, Streaming nor OmegaConf (they run where Composer does not);
3. real runs of the trainer (``yamls/smoke.yaml``): a. SIGKILL at step 14 (its checkpoint of step 10 committed)
   and resume, against an uninterrupted run: every step's loss and the final weights, bf16 and dropout,
   ``deterministic: true``; b. the same under FSDP2 with sharded checkpoints; c. two uninterrupted runs with
   ``deterministic: false``, to show whether determinism is needed (with 3a, true against false);
4. the checkpoints of 3a and 3b open in a process that sees no GPU (``CUDA_VISIBLE_DEVICES=``);
5. the cost of ``deterministic: true``: the median step time of the same run (25 M parameters) with it and without;
6. a fork after a kept snapshot slab was pinned (1 GB): the fork's time, and that the slab is not mapped in the child
   (``HostSnapshot.mapping``, one ``MADV_DONTFORK`` mapping);
7. ``cudaHostRegister`` refused (a wrapper passes CUDA an invalid pointer, so CUDA returns a real error): the snapshot
   falls back to pageable memory with one warning, copies bit-exactly, and the next unrelated CUDA work succeeds.

Every check has a deadline, and so has the whole script (``--deadline``, 480 s); every subprocess has a timeout and
every wait a bound. A check that fails, raises or runs out of time is a FAILED row with its reason, and the other
checks still run; the table is always printed. Checks that need Composer's trainer say ``not run`` with the reason
(the import error) where it does not import on this torch; 1, 2, 6 and 7 need torch alone. ``--device cpu`` runs every
code path at tiny sizes and reports the CUDA-only measurements as ``skipped (no GPU)``: the test suite runs it
(tests/test_gpu_check.py). Runs are shared: 5's timed run with ``deterministic: true`` is 3a's uninterrupted run,
the one with ``false`` 3c's first. On a GPU the timed runs run alone, then three lanes side by side (the workers of
1, 2, 6 and 7; 3a then 3c; 3b), then 4; on CPU, where times mean nothing, everything but 4 in four lanes.

Out folder: ``table.md``, ``results.json`` (torch, CUDA, GPU, every row and every run), ``logs/<run>.log`` (each
subprocess's stdout and stderr), ``runs.log`` (those logs in one file), ``work/`` (the runs' folders) and ``data/``.
Exit status 0 when no row FAILED, 1 otherwise (2 with ``--device cuda`` where no GPU is visible).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import logging
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import sysconfig
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

REPO = Path(__file__).resolve().parent.parent
FAULTS = REPO / 'tests' / 'faults'
SMOKE = REPO / 'yamls' / 'smoke.yaml'
if str(REPO) not in sys.path:  # prefix is used from this checkout, installed or not
    sys.path.insert(0, str(REPO))

DEADLINE_S = 480  # the whole script: one H100's lease is minutes, once
# Each check's own deadline (seconds, bounded by what is left of the whole); a check's runs share it.
CHECK_S = {'host': 150, 'fork': 90, 'register': 60, 'data': 120, 'timed': 120, '5': 10, '3a': 180, '3b': 210, '3c': 120,
           '4': 60}
HOLD_AT, COMMITTED = 14, 10  # 3a/3b: SIGKILL while held at step 14, once the checkpoint of step 10 is committed
# The tests' small dataset (tests/conftest.py): 8 files of the interpreter's standard library, byte-tokenized.
DATA_FILES = ['bisect.py', 'colorsys.py', 'abc.py', 'fnmatch.py', 'genericpath.py', 'stat.py', 'keyword.py', 'sched.py']
NO_CHECKPOINTS = ('checkpoint.interval=1h', 'checkpoint.periodic_interval=null')  # the uninterrupted runs: none but the last
OK, FAILED, SKIPPED, NOT_RUN = 'ok', 'FAILED', 'skipped (no GPU)', 'not run'
# torch.cuda's functions that create a context or use the calling thread's current device or stream
CUDA_USE = {'_lazy_init', 'init', 'current_device', 'set_device', 'current_stream', 'default_stream', 'set_stream', 'stream',
            'synchronize', 'memory_allocated', 'get_rng_state', 'set_rng_state'}
CUDA_ASK = {'_cuda_getDeviceCount', '_cuda_isInBadFork'}  # torch._C's CUDA calls that only ask (is_available)
# id: (what, expected); the table's rows in this order
CHECKS = {
    '1a': ('GPU memory growth of an async sharded snapshot', "~0, not the shards' size"),
    '1b': ('host memory kept / state bytes', '~1.00, page-locked'),
    '1c': ('bit-exact: snapshot = GPU state, torch.save + load = snapshot (FSDP2 shards; mixed dtypes)', 'yes'),
    '2a': ('calls into torch.cuda from the writer thread (DCP write)', '0, written'),
    '2b': ('a GPU tensor handed to a writer', 'refused'),
    '2c': ('Composer, Streaming, OmegaConf imported by checks 1 and 2', 'none'),
    '3a': (f'SIGKILL at step {HOLD_AT} + resume vs uninterrupted, bf16, dropout, deterministic', 'bit-exact'),
    '3b': ('the same under FSDP2, sharded checkpoint', 'bit-exact'),
    '3c': ('two uninterrupted runs, deterministic=false', 'informative'),
    '4': ('checkpoints of 3a and 3b open where no GPU is visible', 'yes'),
    '5': ('step time, deterministic true / false', 'informative'),
    '6': ('fork after the slab is pinned: fork + exit; slab mapped in the child', 'not mapped'),
    '7': ('cudaHostRegister refused: pageable fallback, one warning, bit-exact, next CUDA op fine', 'yes'),
}


@dataclass(frozen=True)
class Sizes:
    """How big each check is: GPU sizes that fit the 8 minutes, tiny CPU ones that only run the code paths."""

    gpt: dict[str, int]  # the in-process FSDP2 GPT of checks 1 and 2
    batch: int  # its one training step's batch
    fork_bytes: int  # check 6's state
    train: tuple[str, ...]  # the runs' overrides of smoke.yaml (model, batch)
    steps: int  # every run's max_duration
    skip: int  # the first steps left out of the step-time median


GPU_SIZES = Sizes(gpt={'d_model': 768, 'n_heads': 12, 'n_layers': 6}, batch=4, fork_bytes=1 << 30,
                  train=('model.d_model=512', 'model.n_heads=8', 'model.n_layers=8', 'global_batch_size=32'), steps=60, skip=10)
CPU_SIZES = Sizes(gpt={'d_model': 64, 'n_heads': 2, 'n_layers': 2}, batch=2, fork_bytes=4 << 20, train=(), steps=20, skip=10)


class CheckFailed(Exception):
    """A check's own failure, with its reason (the row's measured cell)."""


class NotRun(Exception):
    """What a check needs is missing here (Composer does not import): its rows say ``not run``."""


_PRINT = threading.Lock()


def say(text: str) -> None:
    """One line of progress, whole, whichever lane says it."""
    with _PRINT:
        sys.stdout.write(text + '\n')
        sys.stdout.flush()


def one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f'{type(error).__name__}: {text[0] if text else ""}'[:300]


@dataclass
class Row:
    id: str
    check: str
    expected: str
    measured: str = ''
    verdict: str = ''
    seconds: float = 0.0


@dataclass
class Run:
    """One subprocess: its command, log, exit status and time."""

    name: str
    cmd: list[str]
    log: Path
    started: float = field(default_factory=time.monotonic)
    seconds: Optional[float] = None
    rc: Optional[int] = None
    note: str = ''


class Budget:
    """What is left of a check's deadline and of the whole script's, the smaller."""

    def __init__(self, seconds: float, whole_end: float) -> None:
        self.end = min(time.monotonic() + seconds, whole_end)

    def left(self) -> float:
        return self.end - time.monotonic()


def last_error(log: Path) -> str:
    """The line of a log that says why a run failed: prefix's error line, else the last exception line, else the last."""
    try:
        lines = [line.strip() for line in log.read_text(errors='replace').splitlines() if line.strip()]
    except OSError:
        return ''
    for pattern in (r'^prefix: error:', r'^\w+(\.\w+)*(Error|Exception|Interrupt)\b'):
        found = [line for line in lines if re.match(pattern, line)]
        if found:
            return found[-1][:300]
    return lines[-1][:300] if lines else '(empty log)'


class Runner:
    """Starts every subprocess (output to ``logs/<name>.log``), bounds each by a budget, and kills what is left."""

    def __init__(self, out: Path, device: str) -> None:
        self.out = out
        self.logs = out / 'logs'
        self.device = device
        self.runs: list[Run] = []
        self._live: dict[int, tuple[subprocess.Popen, Run]] = {}
        self._lock = threading.Lock()

    def env(self, faults: Optional[list[dict]] = None, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.pop('PREFIX_RUNS_ROOT', None)
        paths = [str(FAULTS)] if faults else []
        env['PYTHONPATH'] = os.pathsep.join([*paths, str(REPO), *filter(None, [os.environ.get('PYTHONPATH')])])
        env['PYTHONUNBUFFERED'] = '1'  # a killed run's log holds everything it printed
        if faults:
            env['PREFIX_TEST_FAULTS'] = json.dumps(faults)
        if self.device == 'cpu':
            env['CUDA_VISIBLE_DEVICES'] = ''
        env.update(extra)
        return env

    def start(self, name: str, cmd: list[str], faults: Optional[list[dict]] = None, **extra: str) -> tuple[subprocess.Popen, Run]:
        run = Run(name, cmd, self.logs / f'{name}.log')
        with run.log.open('w') as log:
            log.write(f'$ {shlex.join(cmd)}\n')
            log.flush()
            proc = subprocess.Popen(cmd, cwd=REPO, env=self.env(faults, **extra), stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        with self._lock:
            self.runs.append(run)
            self._live[proc.pid] = (proc, run)
        say(f'  started {name}')
        return proc, run

    def finish(self, proc: subprocess.Popen, run: Run, budget: Budget) -> None:
        """Wait within the budget; a timeout or a non-zero exit raises ``CheckFailed`` naming the log."""
        try:
            proc.wait(timeout=max(budget.left(), 0.1))
        except subprocess.TimeoutExpired:
            self.kill(proc, run, f'timed out after {time.monotonic() - run.started:.0f} s')
            raise CheckFailed(f'{run.name} timed out after {run.seconds:.0f} s (logs/{run.name}.log)') from None
        self._ended(proc, run)
        if proc.returncode != 0:
            raise CheckFailed(f'{run.name} exited with {proc.returncode}: {last_error(run.log)} (logs/{run.name}.log)')

    def run(self, name: str, cmd: list[str], budget: Budget, **kwargs: Any) -> Run:
        if budget.left() <= 0:
            raise CheckFailed(f'no time left to start {name}')
        proc, run = self.start(name, cmd, **kwargs)
        self.finish(proc, run, budget)
        return run

    def kill(self, proc: subprocess.Popen, run: Run, note: str) -> None:
        """SIGKILL the run's whole process group (the trainer's tees and workers too) and reap it."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
        run.note = note
        self._ended(proc, run)

    def _ended(self, proc: subprocess.Popen, run: Run) -> None:
        run.rc = proc.returncode
        run.seconds = time.monotonic() - run.started
        with self._lock:
            self._live.pop(proc.pid, None)
        say(f'  ended {run.name}: exit {run.rc}{f" ({run.note})" if run.note else ""}, {run.seconds:.1f} s')

    def kill_all(self) -> None:
        with self._lock:
            live = list(self._live.values())
        for proc, run in live:
            self.kill(proc, run, 'killed: the whole deadline was reached')

    def combined_log(self) -> Path:
        """Every log in one file, in the order the runs started: what comes back from a GPU host."""
        path = self.out / 'runs.log'
        with path.open('w') as out:
            for run in self.runs:
                seconds = f'{run.seconds:.1f} s' if run.seconds is not None else 'still running'
                out.write(f'===== logs/{run.log.name}: exit {run.rc}{f" ({run.note})" if run.note else ""}, {seconds} =====\n')
                try:
                    out.write(run.log.read_text(errors='replace'))
                except OSError as e:
                    out.write(f'(unreadable: {e})\n')
                out.write('\n')
        return path


# --- checks 1, 2, 6, 7: in worker processes of this script, on torch alone --------------------------------------

def _leaves(obj: Any, path: str = '') -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from _leaves(value, f'{path}/{key}')
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from _leaves(value, f'{path}/{i}')


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, 'to_local') else t


def _distinct_bytes(obj: Any) -> int:
    """Bytes of the distinct local tensors (a tied weight once), as a snapshot holds them."""
    seen = {(t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype): t.numel() * t.element_size()
            for t in (_local(t) for _, t in _leaves(obj))}
    return sum(seen.values())


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def sharded_state(device: str, sizes: Sizes) -> tuple[dict, Any]:
    """A GPT under FSDP2 after one AdamW step, as prefix shards it: its shards and optimizer state (and the model)."""
    import torch.distributed as tdist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from prefix.config.model import ModelConfig
    from prefix.models.gpt import GPT, Block

    tdist.init_process_group('nccl' if device == 'cuda' else 'gloo', init_method=f'tcp://127.0.0.1:{_free_port()}',
                             rank=0, world_size=1)
    mesh = init_device_mesh(device, (1,))
    with torch.device('meta'):
        model = GPT(ModelConfig(max_seq_len=128, **sizes.gpt), seed=1)
    for module in model.modules():
        if isinstance(module, Block):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device=device)
    for module in model.modules():
        model.param_init_fn(module)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randint(0, 257, (sizes.batch, 128), device=device)).float().pow(2).mean().backward()
    opt.step()
    options = StateDictOptions(full_state_dict=False, cpu_offload=False)
    return {'model': get_model_state_dict(model, options=options),
            'optimizers': {'AdamW': get_optimizer_state_dict(model, opt, options=options)}}, model


def mixed_state(device: str) -> dict[str, torch.Tensor]:
    """Every kind of tensor a state dict holds: dtypes of 1, 2 and 8 bytes, bool, empty, a strided view, a tied pair."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 48, generator=g)
    state = {'bf16': torch.randn(1001, generator=g).bfloat16(), 'fp16': torch.randn(333, generator=g).half(),
             'int64': torch.arange(-50, 77), 'bool': torch.rand(101, generator=g) > 0.5,
             'uint8': torch.arange(255, dtype=torch.uint8), 'fp64': torch.randn(7, generator=g, dtype=torch.float64),
             'empty': torch.empty(0, 7), 'scalar': torch.tensor(2.5)}
    state = {k: v.to(device) for k, v in state.items()}
    w = w.to(device)
    state.update({'view': w.t()[3:40:2], 'tied_a': w, 'tied_b': w})  # non-contiguous, offset into w; w twice
    return state


def _round_trip(host: Any, work: Path, name: str) -> tuple[bool, Any]:
    """``torch.save`` of a host copy's tensors, loaded back (weights only): equal to the copy? and what was loaded."""
    flat = {path: _local(t) for path, t in _leaves(host)}
    path = work / f'{name}.pt'
    torch.save(flat, path)
    try:
        loaded = torch.load(path, weights_only=True)
    finally:
        path.unlink(missing_ok=True)
    equal = loaded.keys() == flat.keys() and all(
        loaded[k].dtype == flat[k].dtype and torch.equal(loaded[k], flat[k]) for k in flat)
    return equal, loaded


class Emitter:
    """A worker's rows, appended to its result file as each is known (a worker killed later keeps them)."""

    def __init__(self, result: Path) -> None:
        self.result = result

    def __call__(self, row_id: str, measured: str, verdict: str, expected: Optional[str] = None) -> None:
        with self.result.open('a') as f:
            f.write(json.dumps({'id': row_id, 'measured': measured, 'verdict': verdict, 'expected': expected}) + '\n')
        say(f'{row_id}. {CHECKS[row_id][0]}: {measured} -> {verdict}')

    @contextlib.contextmanager
    def guard(self, row_id: str) -> Iterator[None]:
        """A check inside a worker: an exception is its FAILED row, and the worker goes on to the next."""
        try:
            yield
        except Exception as e:
            traceback.print_exc()
            self(row_id, f'raised {one_line(e)}', FAILED)


def worker_host(device: str, sizes: Sizes, emit: Emitter, work: Path) -> None:
    """Checks 1 and 2 (and 2c) in one process: they share the FSDP2 state, which takes a while to build."""
    import torch.distributed as tdist

    from prefix.checkpoint import shards
    from prefix.checkpoint.snapshot import HostSnapshot
    from prefix.checkpoint.writer import WriteJob

    cuda = device == 'cuda'
    state, _model = sharded_state(device, sizes)
    sources = [_local(t) for _, t in _leaves(state)]
    state_bytes = _distinct_bytes(state)
    say(f'FSDP2 state: {len(sources)} tensors, {state_bytes / 1e6:.1f} MB')
    if cuda:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    snapshot = HostSnapshot(keep=True)
    host = snapshot.copy(state)
    if cuda:
        grown, peak = torch.cuda.memory_allocated() - before, torch.cuda.max_memory_allocated() - before
        small = grown < state_bytes / 100 and peak < state_bytes / 100
        emit('1a', f'{grown / 1e6:.1f} MB (peak +{peak / 1e6:.1f} MB)', OK if small else FAILED,
             f"~0, not the shards' {state_bytes / 1e6:.0f} MB")
    else:
        emit('1a', '-', SKIPPED)
    host_locals = [_local(t) for _, t in _leaves(host)]
    with emit.guard('1b'):
        ratio = snapshot.nbytes / state_bytes
        per_tensor = sum(1 << max(t.numel() * t.element_size() - 1, 0).bit_length() for t in sources) / state_bytes
        if cuda:
            pinned = snapshot.is_pinned and all(t.is_pinned() for t in host_locals if t.numel())
            emit('1b', f'{ratio:.3f}, {"page-locked" if pinned else "NOT page-locked"}',
                 OK if ratio < 1.01 and pinned else FAILED, f'~1.00 page-locked (per-tensor pin_memory: {per_tensor:.2f})')
        else:
            emit('1b', f'{ratio:.3f} (page-locking: no GPU)', OK if ratio < 1.01 else FAILED, '~1.00')
    with emit.guard('1c'):
        wrong = []
        if not all(t.device.type == 'cpu' for t in host_locals):
            wrong.append('the copy is not in host memory')
        if not all(a.dtype == b.dtype and torch.equal(a.cpu(), b) for a, b in zip(sources, host_locals, strict=True)):
            wrong.append('the FSDP2 copy differs from the state')
        if not _round_trip(host, work, 'fsdp')[0]:
            wrong.append('torch.save + load of the FSDP2 copy differs')
        mixed = mixed_state(device)
        mixed_host = HostSnapshot(keep=True).copy(mixed)
        differing = [k for k in mixed
                     if mixed_host[k].dtype != mixed[k].dtype or not torch.equal(mixed_host[k].cpu(), mixed[k].cpu())]
        if differing:
            wrong.append(f'the mixed-dtype copy differs ({", ".join(differing)})')
        if mixed_host['tied_a'].data_ptr() != mixed_host['tied_b'].data_ptr():
            wrong.append('the tied pair was copied twice')
        equal, loaded = _round_trip(mixed_host, work, 'mixed')
        if not equal:
            wrong.append('torch.save + load of the mixed-dtype copy differs')
        elif loaded['/tied_a'].data_ptr() != loaded['/tied_b'].data_ptr():
            wrong.append('the tied pair loads as two tensors')
        emit('1c', f'NO: {"; ".join(wrong)}' if wrong else 'yes', FAILED if wrong else OK)
    with emit.guard('2a'):
        calls: list[str] = []

        def profile(frame: Any, event: str, arg: Any) -> None:  # what uses a GPU (is_available and device_count only ask)
            module = str(frame.f_globals.get('__name__', ''))
            name = frame.f_code.co_name
            if event == 'call' and (module == 'torch.cuda.streams' or module == 'torch.cuda' and name in CUDA_USE):
                calls.append(f'{module}.{name}')
            elif event == 'c_call' and getattr(arg, '__name__', '').startswith('_cuda') and arg.__name__ not in CUDA_ASK:
                calls.append(f'torch._C.{arg.__name__}')

        folder = work / 'shards-check'
        threading.setprofile(profile)  # threads started from now on: the WriteJob's
        try:
            job = WriteJob(0, [lambda: shards.write(host, folder, None, 'check', 120), lambda: shards.publish(folder, 'check')],
                           1, host)
        finally:
            threading.setprofile(None)
        job.join(120)
        status = job.status()
        written = status.done and (folder / '.metadata').is_file()
        named = f' ({", ".join(sorted(set(calls))[:3])})' if calls else ''
        failure = '' if written else f', write failed: {one_line(job.error) if job.error else "not finished in 120 s"}'
        emit('2a', f'{len(calls)}{named}{failure}', OK if not calls and written else FAILED)
    with emit.guard('2b'):
        refused = False
        try:
            WriteJob(1, [lambda: None], 1, {'w': torch.ones(1, device='cuda' if cuda else 'meta')})
        except AssertionError:
            refused = True
        what = 'refused' if refused else 'ACCEPTED'
        emit('2b', what if cuda else f'{what} (a meta tensor: no GPU)', OK if refused else FAILED)
    tdist.destroy_process_group()
    loaded = sorted(m for m in ('composer', 'streaming', 'omegaconf', 'mcli') if m in sys.modules)
    emit('2c', ', '.join(loaded) or 'none', FAILED if loaded else OK)


def _slab_mapped(start: int, length: int) -> bool:
    """Does any mapping of this process (``/proc/self/smaps``) overlap [start, start + length)?"""
    with open('/proc/self/smaps', 'rb') as f:
        text = f.read()
    for lo, hi in re.findall(rb'^([0-9a-f]+)-([0-9a-f]+) ', text, re.MULTILINE):
        if int(lo, 16) < start + length and int(hi, 16) > start:
            return True
    return False


def _fork_s() -> float:
    """Median time of ``os.fork()`` and the child's exit, as the parent sees it (3 forks)."""
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def worker_fork(device: str, sizes: Sizes, emit: Emitter, work: Path) -> None:
    """Check 6: a process whose kept snapshot slab is pinned forks (a dataloader worker, a tee): the slab is not
    copied into nor mapped in the child (``MADV_DONTFORK``), so the fork costs what it did before the slab."""
    from prefix.checkpoint.snapshot import HostSnapshot

    n = sizes.fork_bytes // 4 // 4
    state = {f'w{i}': torch.randn(n, device=device) for i in range(4)}
    before = _fork_s()
    snapshot = HostSnapshot(keep=True)
    snapshot.copy(state)
    after = _fork_s()
    timing = f'fork + exit {before * 1e3:.1f} ms before the slab, {after * 1e3:.1f} ms after ({snapshot.nbytes / 1e6:.0f} MB)'
    mapping = getattr(snapshot, 'mapping', AttributeError)
    if mapping is AttributeError:
        emit('6', f'HostSnapshot has no .mapping (the slab is not one MADV_DONTFORK mapping yet); {timing}', FAILED)
        return
    if mapping is None:
        emit('6', f'HostSnapshot.mapping is None after a kept copy; {timing}', FAILED)
        return
    start, length = mapping
    if not _slab_mapped(start, length):
        emit('6', f'the slab {start:#x}+{length} is not in this process\'s smaps either; {timing}', FAILED)
        return
    pid = os.fork()
    if pid == 0:  # the child reads its own maps and exits: no CUDA, no locks of other threads
        try:
            code = 1 if _slab_mapped(start, length) else 0
        except BaseException:
            code = 2
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    seen = {0: 'not mapped in the child', 1: 'MAPPED in the child'}.get(code, f'child failed ({code})')
    emit('6', f'{seen}; {timing}', OK if code == 0 else FAILED, 'not mapped; fork time as before the slab')


class _RefusingCudart:
    """``torch.cuda.cudart()`` whose ``cudaHostRegister`` passes CUDA a null pointer: a real error, set as the thread's
    last error, as when the driver refuses to pin (locked-memory limit, no memory)."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.codes: list[int] = []

    def cudaHostRegister(self, ptr: int, nbytes: int, flags: int) -> Any:  # noqa: N802 (CUDA's name)
        code = self.real.cudaHostRegister(0, nbytes, flags)
        self.codes.append(int(code))
        return code

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def worker_register(device: str, sizes: Sizes, emit: Emitter, work: Path) -> None:
    """Check 7: pinning refused. The snapshot must fall back to pageable memory (one warning), copy bit-exactly, and
    leave no CUDA error behind for the next, unrelated CUDA call to raise."""
    from prefix.checkpoint.snapshot import HostSnapshot

    warnings: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = warnings.append  # type: ignore[method-assign]
    logger = logging.getLogger('prefix.checkpoint.snapshot')
    logger.addHandler(handler)
    state = mixed_state(device)
    state['big'] = torch.randn(1 << 20, device=device)
    real_cudart = torch.cuda.cudart
    refusing = _RefusingCudart(real_cudart())
    torch.cuda.cudart = lambda: refusing
    wrong = []
    try:
        snapshot = HostSnapshot(keep=True)
        try:
            host = snapshot.copy(state)
            host = snapshot.copy(state)  # a second copy reuses the slab: no second attempt, no second warning
        except Exception as e:
            traceback.print_exc()
            wrong.append(f'the snapshot raised {one_line(e)}')
            host = None
    finally:
        torch.cuda.cudart = real_cudart
        logger.removeHandler(handler)
    if not refusing.codes or refusing.codes[0] == 0:
        wrong.append(f'the simulated refusal did not happen (codes {refusing.codes})')
    if host is not None:
        if snapshot.is_pinned:
            wrong.append('the snapshot says it is pinned')
        if not all(host[k].dtype == state[k].dtype and torch.equal(host[k], state[k].cpu()) for k in state):
            wrong.append('the copy differs')
    if len(warnings) != 1:
        wrong.append(f'{len(warnings)} warnings logged')
    try:
        a = torch.randn(256, 256, device=device)
        float((a @ a).sum())
        torch.cuda.synchronize()
    except Exception as e:
        wrong.append(f'the next CUDA op raised {one_line(e)}')
    said = f'; warned: {warnings[0].getMessage()[:120]}' if warnings else ''
    emit('7', (f'NO: {"; ".join(wrong)}' if wrong else f'yes (CUDA error {refusing.codes[0]})') + said, FAILED if wrong else OK)


WORKERS: dict[str, tuple[Callable[[str, Sizes, Emitter, Path], None], list[str]]] = {
    'host': (worker_host, ['1a', '1b', '1c', '2a', '2b', '2c']),
    'fork': (worker_fork, ['6']),
    'register': (worker_register, ['7']),
}


def worker_main(name: str, device: str, result: Path, work: Path) -> int:
    work.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(name)s %(levelname)s: %(message)s')
    say(f'worker {name}: torch {torch.__version__} on {device}')
    WORKERS[name][0](device, GPU_SIZES if device == 'cuda' else CPU_SIZES, Emitter(result), work)
    return 0


# --- checks 3 to 5: real runs of the trainer -----------------------------------------------------------------------

class Context:
    """What the checks share: options, sizes, the runner, the runs finished so far."""

    def __init__(self, args: argparse.Namespace, runner: Runner, start: float) -> None:
        self.args = args
        self.device: str = args.device
        self.sizes = GPU_SIZES if self.device == 'cuda' else CPU_SIZES
        self.runner = runner
        self.out: Path = args.out
        self.work: Path = args.work
        self.data: Optional[Path] = args.data
        self.whole_end = start + args.deadline
        self.trainer_missing: Optional[str] = None  # why Composer's trainer cannot run here
        self.data_failed: Optional[str] = None  # why the runs have no dataset
        self.done: dict[str, Path] = {}  # run name -> its run folder, for runs that finished well
        self.failed: dict[str, str] = {}  # run name -> why it did not

    def train_cmd(self, root: Path, *overrides: str) -> list[str]:
        return [sys.executable, '-m', 'prefix.train', str(SMOKE), f'runs_root={root}', f'data.local={self.data}',
                f'max_duration={self.sizes.steps}ba', 'eval_interval=1000ba', *self.sizes.train, *overrides]

    def train(self, name: str, budget: Budget, *overrides: str) -> Path:
        """An uninterrupted run (or a resume, when its folder holds one) to its end; its run folder."""
        root = self.work / name
        try:
            self.runner.run(name, self.train_cmd(root, *overrides), budget)
        except CheckFailed as e:
            self.failed[name] = str(e)
            raise
        self.done[name] = root / 'smoke'
        return root / 'smoke'

    def needs(self, name: str) -> Path:
        """The folder of a run another check made; raises with that run's failure if it has none."""
        if name not in self.done:
            raise CheckFailed(self.failed.get(name, f'{name} did not run'))
        return self.done[name]


def _committed(run: Path) -> Optional[int]:
    try:
        return json.loads((run / 'meta' / 'checkpoint.json').read_text())['step']
    except (OSError, ValueError, KeyError):
        return None


def same(reference: Path, run: Path) -> str:
    from prefix.chaos import compare

    try:
        compare(reference, run)
    except AssertionError as e:
        return f'DIFFERS: {e}'
    return 'bit-exact'


def killed_and_resumed(ctx: Context, budget: Budget, name: str, reference: Path, *overrides: str) -> str:
    """Held at step 14 once the checkpoint of step 10 is committed, SIGKILLed (the whole group), resumed to the end."""
    root = ctx.work / name
    run_dir = root / 'smoke'
    marker = root / 'held'
    root.mkdir(parents=True, exist_ok=True)
    proc, run = ctx.runner.start(f'{name}-killed', ctx.train_cmd(root, *overrides),
                                 faults=[{'op': 'step', 'step': HOLD_AT, 'marker': str(marker), 'block': True}])
    try:
        while not (marker.exists() and _committed(run_dir) == COMMITTED):
            if proc.poll() is not None:
                ctx.runner.finish(proc, run, budget)  # raises: it exited before the kill
                raise CheckFailed(f'{run.name} ended before it was held at step {HOLD_AT} (logs/{run.name}.log)')
            if budget.left() <= 0:
                raise CheckFailed(f'{run.name} was not held at step {HOLD_AT} with step {COMMITTED} committed in time '
                                  f'(held: {marker.exists()}, committed: {_committed(run_dir)}; logs/{run.name}.log)')
            time.sleep(0.05)
    finally:
        if proc.returncode is None:
            ctx.runner.kill(proc, run, f'SIGKILL at step {HOLD_AT}, on purpose')
    ctx.runner.run(f'{name}-resumed', ctx.train_cmd(root, *overrides), budget)
    ctx.done[name] = run_dir
    return same(reference, run_dir)


def median_step_s(run: Path, skip: int) -> float:
    """The median time between consecutive steps' log records, from step ``skip`` on."""
    times = {}
    for line in (run / 'logs' / 'metrics.jsonl').read_text().splitlines():
        record = json.loads(line)
        if 'loss/train/total' in record:
            times[record['step']] = record['time']
    steps = sorted(s for s in times if s >= skip)
    if len(steps) < 3:
        raise CheckFailed(f'{run}: only {len(steps)} steps logged from step {skip}')
    return statistics.median(times[b] - times[a] for a, b in zip(steps, steps[1:], strict=False))


def check_data(ctx: Context, budget: Budget, rows: dict[str, Row]) -> None:
    """The tests' small dataset, from this interpreter's standard library (no ``make data``, no venv)."""
    if ctx.data is not None:
        return
    stdlib = Path(sysconfig.get_paths()['stdlib'])
    ctx.data = ctx.out / 'data'
    ctx.runner.run('data', [sys.executable, '-m', 'prefix.data', str(ctx.data), *(str(stdlib / f) for f in DATA_FILES),
                            '--val-fraction', '0.25', '--overwrite'], budget)


def timed(flag: str) -> Callable[[Context, Budget, dict[str, Row]], None]:
    """A timed run of check 5, ``deterministic: flag``; also 3a's uninterrupted run (true) and 3c's first (false)."""
    def check(ctx: Context, budget: Budget, rows: dict[str, Row]) -> None:
        ctx.train(f'timed-det-{flag}', budget, f'deterministic={flag}', *NO_CHECKPOINTS)
    return check


def check_5(ctx: Context, budget: Budget, rows: dict[str, Row]) -> None:
    """The median step of the timed runs (on a GPU they ran alone; on CPU their times mean nothing)."""
    step_s = {flag: median_step_s(ctx.needs(f'timed-det-{flag}'), ctx.sizes.skip) for flag in ('true', 'false')}
    params = '25 M params, batch 32 x 128' if ctx.device == 'cuda' else 'smoke model, batch 8 x 128'
    true, false = step_s['true'], step_s['false']
    rows['5'].measured = (f'{true * 1e3:.1f} / {false * 1e3:.1f} ms = {true / false:.2f}x '
                          f'({params}, median of steps {ctx.sizes.skip}-{ctx.sizes.steps})')
    rows['5'].verdict = OK


def check_3a(ctx: Context, budget: Budget, rows: dict[str, Row]) -> None:
    result = killed_and_resumed(ctx, budget, '3a', ctx.needs('timed-det-true'), 'deterministic=true')
    rows['3a'].measured, rows['3a'].verdict = result, OK if result == 'bit-exact' else FAILED


def check_3b(ctx: Context, budget: Budget, rows: dict[str, Row]) -> None:
    reference = ctx.train('3b-reference', budget, 'deterministic=true', 'fsdp={}', *NO_CHECKPOINTS)
    result = killed_and_resumed(ctx, budget, '3b', reference, 'deterministic=true', 'fsdp={}')
    sharded = any(p.name.startswith('shards-') for p in (ctx.work / '3b' / 'smoke' / 'checkpoints').iterdir())
    if not sharded:
        result += ', but no shard folder was written'
    rows['3b'].measured, rows['3b'].verdict = result, OK if result == 'bit-exact' else FAILED


def check_3c(ctx: Context, budget: Budget, rows: dict[str, Row]) -> None:
    first = ctx.needs('timed-det-false')
    second = ctx.train('3c-second', budget, 'deterministic=false', *NO_CHECKPOINTS)
    against = f' (deterministic=true vs false: {same(ctx.done["timed-det-true"], first)})' if 'timed-det-true' in ctx.done else ''
    rows['3c'].measured = same(first, second) + against
    rows['3c'].verdict = OK


OPEN_CODE = '''import sys, pathlib, torch
from prefix.checkpoint.shards import read_whole
assert not torch.cuda.is_available(), 'a GPU is visible'
plain, sharded = (pathlib.Path(a) / 'checkpoints' for a in sys.argv[1:3])
n = len(torch.load(plain / 'latest.pt', weights_only=True))
torch.load(plain / 'latest_rank0.pt', weights_only=True)
whole = read_whole(sharded / torch.load(sharded / 'latest.pt', weights_only=True)['shards'])
print('opened:', n, 'entries of latest.pt;', len(whole), 'of the shard folder')
'''


def check_4(ctx: Context, budget: Budget, rows: dict[str, Row]) -> None:
    plain, sharded = ctx.needs('3a'), ctx.needs('3b')
    ctx.runner.run('4-opens', [sys.executable, '-c', OPEN_CODE, str(plain), str(sharded)], budget, CUDA_VISIBLE_DEVICES='')
    rows['4'].measured, rows['4'].verdict = 'yes', OK


def worker_check(name: str) -> Callable[[Context, Budget, dict[str, Row]], None]:
    """Run worker ``name`` (checks 1, 2, 6 or 7) as a subprocess of its own: bounded, logged, its CUDA state its own."""
    def check(ctx: Context, budget: Budget, rows: dict[str, Row]) -> None:
        result = ctx.out / 'logs' / f'worker-{name}.jsonl'
        result.unlink(missing_ok=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), '--worker', name, '--device', ctx.device, '--result', str(result),
               '--work', str(ctx.work / f'worker-{name}')]
        try:
            ctx.runner.run(f'worker-{name}', cmd, budget)
        finally:
            if result.exists():
                for line in result.read_text().splitlines():
                    got = json.loads(line)
                    row = rows[got['id']]
                    row.measured, row.verdict = got['measured'], got['verdict']
                    row.expected = got['expected'] or row.expected
    return check


def skipped(ctx: Context, budget: Budget, rows: dict[str, Row]) -> None:
    rows['7'].measured, rows['7'].verdict = '-', SKIPPED


# (check function, its rows, its deadline key, needs Composer's trainer)
Task = tuple[Callable[[Context, Budget, dict[str, Row]], None], list[str], str, bool]


def run_task(ctx: Context, rows: dict[str, Row], task: Task) -> None:
    """One check, wrapped: whatever it raises becomes the reason of its rows that are still open; the others run on."""
    fn, ids, key, trainer = task
    start = time.monotonic()
    # On a GPU each check has its share of the lease; on CPU the checks only run the code paths, bounded by the whole
    # deadline alone, so that a loaded machine (the test suite's) cannot fail a check by the clock.
    budget = Budget(CHECK_S[key] if ctx.device == 'cuda' else ctx.args.deadline, ctx.whole_end)
    say(f'check {key} ({", ".join(ids) or "-"})')
    try:
        if trainer and ctx.trainer_missing:
            raise NotRun(ctx.trainer_missing)
        if trainer and ctx.data_failed:
            raise CheckFailed(ctx.data_failed)
        if budget.left() <= 0:
            raise CheckFailed(f'not started: the whole deadline of {ctx.args.deadline:.0f} s was spent')
        fn(ctx, budget, rows)
    except NotRun as e:
        for i in ids:
            rows[i].measured, rows[i].verdict = f'not run: {e}', NOT_RUN
    except Exception as e:
        traceback.print_exc()
        reason = str(e) if isinstance(e, CheckFailed) else f'raised {one_line(e)}'
        for i in ids:
            if not rows[i].verdict:
                rows[i].measured, rows[i].verdict = reason, FAILED
        if key == 'data':
            ctx.data_failed = f'the dataset could not be built: {reason}'
    for i in ids:
        if not rows[i].verdict:
            rows[i].measured, rows[i].verdict = rows[i].measured or 'the check reported nothing', FAILED
        rows[i].seconds = round(time.monotonic() - start, 1)


def run_lanes(ctx: Context, rows: dict[str, Row], lanes: list[list[Task]]) -> None:
    """Each lane's checks one after the other, the lanes at the same time (daemon threads: a hung one cannot hold the
    exit); waits until all end or the whole deadline (plus the time to kill what is left) has passed."""
    threads = [threading.Thread(target=lambda lane=lane: [run_task(ctx, rows, t) for t in lane], daemon=True) for lane in lanes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(ctx.whole_end - time.monotonic(), 0) + 60)
    for lane, thread in zip(lanes, threads, strict=True):
        if thread.is_alive():
            for _, ids, _, _ in lane:
                for i in ids:
                    if not rows[i].verdict:
                        rows[i].measured, rows[i].verdict = 'not finished by the whole deadline', FAILED


def environment(device: str) -> dict[str, str]:
    """Python, torch, CUDA, the GPU and Composer, for the table's head and results.json."""
    info = {'python': platform.python_version(), 'torch': torch.__version__, 'cuda': str(torch.version.cuda),
            'device': device, 'host': platform.node()}
    try:
        info['gpu'] = torch.cuda.get_device_name(0) if device == 'cuda' else 'none (--device cpu)'
    except Exception as e:
        info['gpu'] = f'unknown: {one_line(e)}'
    for name, dist in (('composer', 'mosaicml'), ('streaming', 'mosaicml-streaming')):
        try:
            info[name] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            info[name] = 'not installed'
    return info


def trainer_missing() -> Optional[str]:
    """Why Composer's trainer cannot run on this torch, in one line (None: it imports)."""
    try:
        import composer  # noqa: F401
        import omegaconf  # noqa: F401
        import streaming  # noqa: F401

        import prefix.chaos  # noqa: F401  (compares the runs; prefix's checkpoint and model modules)
    except Exception as e:
        traceback.print_exc()
        return one_line(e)
    return None


def table(rows: list[Row], info: dict[str, str], elapsed: float, deadline: float) -> str:
    head = (f'gpu-check with torch {info["torch"]} (CUDA {info["cuda"]}) on {info["gpu"]}, Python {info["python"]}, '
            f'Composer {info["composer"]}, Streaming {info["streaming"]}: {elapsed:.0f} s of {deadline:.0f} s')
    cells = [('#', 'check', 'measured', 'expected', 'verdict')]
    cells += [(r.id, r.check, r.measured, r.expected, r.verdict) for r in rows]
    lines = [f'| {" | ".join(c.replace("|", "/") for c in r)} |' for r in cells]
    lines.insert(1, '| --- | --- | --- | --- | --- |')
    return '\n'.join([head, '', *lines]) + '\n'


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', type=Path, default=Path('gpu-check-out'), help='out folder (default gpu-check-out)')
    parser.add_argument('--device', choices=('cuda', 'cpu'), default='cuda',
                        help='cuda (default): the GPU sizes; cpu: every code path at tiny sizes, CUDA-only rows skipped')
    parser.add_argument('--data', type=Path, help="a prepared dataset (default: the tests' small one, built in OUT/data)")
    parser.add_argument('--work', type=Path, help='where the runs go (default OUT/work)')
    parser.add_argument('--deadline', type=float, default=DEADLINE_S, help=f'seconds for the whole script (default {DEADLINE_S})')
    parser.add_argument('--worker', choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument('--result', type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker_main(args.worker, args.device, args.result, args.work)
    start = time.monotonic()
    no_gpu = args.device == 'cuda' and not torch.cuda.is_available()
    args.out = args.out.resolve()
    args.work = (args.work or args.out / 'work').resolve()
    args.data = args.data.resolve() if args.data else None
    for stale in (args.work, args.out / 'logs'):
        shutil.rmtree(stale, ignore_errors=True)  # a run folder left from before would be resumed
    (args.out / 'logs').mkdir(parents=True)
    args.work.mkdir(parents=True)
    runner = Runner(args.out, args.device)
    ctx = Context(args, runner, start)
    info = environment(args.device)
    say(f'gpu-check: torch {info["torch"]}, CUDA {info["cuda"]}, {info["gpu"]}; out {args.out}')
    rows = {i: Row(i, what, expected) for i, (what, expected) in CHECKS.items()}
    cuda = args.device == 'cuda'
    try:
        if no_gpu:  # nothing measured, but the table and results.json say so
            for row in rows.values():
                row.measured, row.verdict = 'not run: no CUDA device here (--device cpu: the code paths on CPU)', FAILED
            return 2
        ctx.trainer_missing = trainer_missing()
        if ctx.trainer_missing:
            say(f"Composer's trainer cannot run here: {ctx.trainer_missing}")
        run_task(ctx, rows, (check_data, [], 'data', True))
        timed_true, timed_false = (timed('true'), [], 'timed', True), (timed('false'), [], 'timed', True)
        workers = [(worker_check('host'), WORKERS['host'][1], 'host', False), (worker_check('fork'), ['6'], 'fork', False),
                   (worker_check('register') if cuda else skipped, ['7'], 'register', False)]
        if cuda:  # the timed runs alone on the GPU, then three lanes
            run_task(ctx, rows, timed_true)
            run_task(ctx, rows, timed_false)
            run_lanes(ctx, rows, [workers, [(check_3a, ['3a'], '3a', True), (check_3c, ['3c'], '3c', True)],
                                  [(check_3b, ['3b'], '3b', True)]])
        else:  # on CPU the times mean nothing: everything in four lanes, to keep the test suite's run short
            run_lanes(ctx, rows, [workers, [timed_true, (check_3a, ['3a'], '3a', True)],
                                  [timed_false, (check_3c, ['3c'], '3c', True)], [(check_3b, ['3b'], '3b', True)]])
        run_task(ctx, rows, (check_5, ['5'], '5', True))
        run_task(ctx, rows, (check_4, ['4'], '4', True))
    finally:
        runner.kill_all()
        elapsed = time.monotonic() - start
        ordered = list(rows.values())
        text = table(ordered, info, elapsed, args.deadline)
        (args.out / 'table.md').write_text(text)
        (args.out / 'results.json').write_text(json.dumps({
            **info, 'deadline_s': args.deadline, 'elapsed_s': round(elapsed, 1), 'rows': [asdict(r) for r in ordered],
            'runs': [{'name': r.name, 'cmd': r.cmd, 'log': str(r.log.relative_to(args.out)), 'rc': r.rc, 'note': r.note,
                      'seconds': None if r.seconds is None else round(r.seconds, 1)} for r in runner.runs]}, indent=1) + '\n')
        runner.combined_log()
        say('\n' + text)
    return 1 if any(r.verdict == FAILED for r in ordered) else 0


if __name__ == '__main__':
    sys.exit(main())
