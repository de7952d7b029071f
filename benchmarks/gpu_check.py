"""``make gpu-check``: what one GPU can show of prefix's CUDA paths, in a few minutes; prints one table.

1. an asynchronous snapshot of FSDP2 shards (one GPU, a 43 M-parameter GPT and its AdamW state):
   GPU memory before and after (it must not grow by the shards' size), the host memory it keeps
   against the state's bytes (one exact-size page-locked slab; per-tensor ``pin_memory`` would round
   each up to a power of two), and that the copy equals the GPU state;
2. the writer thread: DCP writes the snapshot through a ``WriteJob`` while a profiler counts every call
   the writer thread makes into ``torch.cuda`` (expected: none), and a GPU tensor handed to a job is refused;
3. SIGKILL after a checkpoint and resume, bf16 and dropout, ``deterministic: true``, against an
   uninterrupted run, every step's loss and the final weights: without FSDP and with FSDP2 (sharded);
   and two uninterrupted runs with ``deterministic: false``, to show whether determinism is needed;
4. the checkpoints open in a process that sees no GPU (``CUDA_VISIBLE_DEVICES=``);
5. the cost of ``deterministic: true``: median step time of the same run with it on and off.

Runs use the tests' fault injector to stop a run at a chosen step, as the tests do.
"""

from __future__ import annotations

import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from prefix.run.rundir import RunDir

REPO = Path(__file__).resolve().parent.parent
FAULTS = REPO / 'tests' / 'faults'
SMOKE = REPO / 'yamls' / 'smoke.yaml'
ROWS: list[tuple[str, str, str, str]] = []  # check, measured, expected, verdict
# torch.cuda's functions that create a context or use the calling thread's current device or stream
CUDA_USE = {'_lazy_init', 'init', 'current_device', 'set_device', 'current_stream', 'default_stream', 'set_stream', 'stream',
            'synchronize', 'memory_allocated', 'get_rng_state', 'set_rng_state'}


def row(check: str, measured: str, expected: str, ok: bool) -> None:
    ROWS.append((check, measured, expected, 'ok' if ok else 'FAILED'))
    print(f'{check}: {measured} (expected {expected})', flush=True)


# --- 1 and 2: snapshot and writer thread, in this process --------------------------------------------

def sharded_state() -> dict:
    """A GPT under FSDP2 on this GPU after one AdamW step, as prefix shards it: its shards and optimizer state."""
    import torch.distributed as tdist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from prefix.config import ModelConfig
    from prefix.models.gpt import GPT, Block

    os.environ.setdefault('MASTER_ADDR', '127.0.0.1')
    os.environ.setdefault('MASTER_PORT', '29531')
    tdist.init_process_group('nccl', rank=0, world_size=1)
    mesh = init_device_mesh('cuda', (1,))
    with torch.device('meta'):
        model = GPT(ModelConfig(d_model=768, n_heads=12, n_layers=6, max_seq_len=128), seed=1)
    for module in model.modules():
        if isinstance(module, Block):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device='cuda')
    for module in model.modules():
        model.param_init_fn(module)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randint(0, 257, (4, 128), device='cuda')).float().pow(2).mean().backward()
    opt.step()
    options = StateDictOptions(full_state_dict=False, cpu_offload=False)
    return {'model': get_model_state_dict(model, options=options),
            'optimizers': {'AdamW': get_optimizer_state_dict(model, opt, options=options)}}


def snapshot_checks(work: Path) -> None:
    from torch.distributed.tensor import DTensor

    from prefix import shards
    from prefix.checkpoint.snapshot import HostSnapshot
    from prefix.checkpoint.writer import WriteJob

    tensors = sharded_state()
    locals_ = [t.to_local() if isinstance(t, DTensor) else t for t in _leaves(tensors)]
    state_bytes = shards.nbytes(tensors)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    snapshot = HostSnapshot()
    host = snapshot.copy(tensors)
    grown, peak = torch.cuda.memory_allocated() - before, torch.cuda.max_memory_allocated() - before
    row('1a. GPU memory growth of an async sharded snapshot', f'{grown / 1e6:.1f} MB (peak +{peak / 1e6:.1f} MB)',
        f'~0, not the shards\' {state_bytes / 1e6:.0f} MB', grown < state_bytes / 100 and peak < state_bytes / 100)
    per_tensor = sum(2 ** math.ceil(math.log2(max(t.numel() * t.element_size(), 1))) for t in locals_)
    host_locals = [t.to_local() if isinstance(t, DTensor) else t for t in _leaves(host)]
    pinned = all(t.is_pinned() for t in host_locals if t.numel())
    locked = 'page-locked' if pinned else 'NOT page-locked'
    row('1b. host memory kept / state bytes', f'{snapshot.nbytes / state_bytes:.3f}, {locked}',
        f'~1.00 page-locked (per-tensor pin_memory: {per_tensor / state_bytes:.2f})',
        snapshot.nbytes < 1.01 * state_bytes and pinned)
    equal = all(torch.equal(a.cpu(), b) for a, b in zip(locals_, host_locals, strict=True))
    on_host = all(t.device.type == 'cpu' for t in host_locals)
    row('1c. snapshot equals the GPU state, in host memory', 'yes' if equal and on_host else 'NO', 'yes', equal and on_host)

    calls: list[str] = []

    def profile(frame, event, arg) -> None:  # calls that use a GPU (is_available and device_count only ask)
        module = str(frame.f_globals.get('__name__', ''))
        if event == 'call' and (module == 'torch.cuda.streams' or module == 'torch.cuda' and frame.f_code.co_name in CUDA_USE):
            calls.append(f'{module}.{frame.f_code.co_name}')

    threading.setprofile(profile)  # threads started from now on: the WriteJob's
    try:
        job = WriteJob(0, [lambda: shards.write(host, work / 'shards-check', None, 'check', 600),
                            lambda: shards.publish(work / 'shards-check', 'check')], 1, host)
        job.finish()
    finally:
        threading.setprofile(None)
    written = job.error is None and (work / 'shards-check' / '.metadata').is_file()
    named = f' ({", ".join(sorted(set(calls))[:3])})' if calls else ''
    row('2a. calls into torch.cuda from the writer thread (DCP write)',
        f'{len(calls)}{named}{"" if written else f", write failed: {job.error}"}',
        '0, written', not calls and written)
    try:
        WriteJob(1, [lambda: None], 1, {'w': torch.ones(1, device='cuda')})
        refused = False
    except AssertionError:
        refused = True
    row('2b. a GPU tensor handed to a writer', 'refused' if refused else 'ACCEPTED', 'refused', refused)
    import torch.distributed as tdist

    tdist.destroy_process_group()


def _leaves(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _leaves(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _leaves(value)


# --- 3 to 5: real runs in subprocesses -------------------------------------------------------------

def train(root: Path, data: Path, *overrides: str, hold_at: int | None = None) -> subprocess.Popen:
    env = dict(os.environ)
    if hold_at is not None:
        env.update(PYTHONPATH=str(FAULTS), PREFIX_TEST_FAULTS=json.dumps(
            [{'op': 'step', 'step': hold_at, 'marker': str(root / 'held'), 'block': True}]))
    cmd = [sys.executable, '-m', 'prefix.train', str(SMOKE), f'runs_root={root}', f'data.local={data}', *overrides]
    return subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def same(reference: Path, run: Path) -> str:
    from prefix.chaos import compare

    try:
        compare(reference, run)
    except AssertionError as e:
        return f'DIFFERS: {e}'
    return 'bit-exact'


def killed_and_resumed(work: Path, data: Path, *overrides: str) -> str:
    """An uninterrupted run, and one SIGKILLed at step 14 (checkpoint of 10 committed) then resumed: equal?"""
    reference, killed = work / 'reference', work / 'killed'
    if train(reference, data, *overrides).wait() != 0:
        return 'FAILED: the uninterrupted run failed'
    proc = train(killed, data, *overrides, hold_at=14)
    run = RunDir(killed / 'smoke')
    while not ((killed / 'held').exists() and run.checkpoint_summary.exists()
               and json.loads(run.checkpoint_summary.read_text())['step'] == 10):
        if proc.poll() is not None:
            return f'FAILED: the run exited with {proc.returncode}'
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    if train(killed, data, *overrides).wait() != 0:
        return 'FAILED: the resume failed'
    return same(reference / 'smoke', run.root)


def opens_without_gpu(plain: Path, sharded: Path) -> str:
    code = ('import sys, torch; from prefix.checkpoint.shards import read_whole; assert not torch.cuda.is_available(); '
            'c = sys.argv[1] + "/checkpoints"; torch.load(c + "/latest.pt", weights_only=True); '
            'torch.load(c + "/latest_rank0.pt", weights_only=True); '
            's = torch.load(sys.argv[2] + "/checkpoints/latest.pt", weights_only=True)["shards"]; '
            'read_whole(__import__("pathlib").Path(sys.argv[2] + "/checkpoints/" + s)); print("ok")')
    result = subprocess.run([sys.executable, '-c', code, str(plain), str(sharded)], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, 'CUDA_VISIBLE_DEVICES': ''})
    return 'yes' if result.stdout.strip() == 'ok' else f'NO: {result.stderr.strip().splitlines()[-1:]}'


def median_step_s(run: Path, skip: int = 10) -> float:
    times = {}
    for line in (run / 'logs' / 'metrics.jsonl').read_text().splitlines():
        record = json.loads(line)
        if 'loss/train/total' in record:
            times[record['step']] = record['time']
    steps = sorted(s for s in times if s >= skip)
    return statistics.median(times[b] - times[a] for a, b in zip(steps, steps[1:], strict=False))


def main() -> int:
    if not torch.cuda.is_available():
        print('gpu-check: no CUDA device here', file=sys.stderr)
        return 2
    print(f'gpu-check on {torch.cuda.get_device_name(0)}, torch {torch.__version__}', flush=True)
    data = REPO / 'data' / 'stdlib'
    with tempfile.TemporaryDirectory(prefix='prefix-gpu-check-') as tmp:
        work = Path(tmp)
        snapshot_checks(work)
        run = ('max_duration=20ba',)
        plain = killed_and_resumed(work / 'plain', data, *run)
        row('3a. SIGKILL + resume, bf16, dropout, deterministic', plain, 'bit-exact', plain == 'bit-exact')
        fsdp = killed_and_resumed(work / 'fsdp', data, *run, 'fsdp={}')
        row('3b. the same under FSDP2, sharded checkpoint', fsdp, 'bit-exact', fsdp == 'bit-exact')
        loose = [work / f'loose-{i}' for i in (1, 2)]
        for root in loose:
            train(root, data, *run, 'deterministic=false').wait()
        repeat = same(loose[0] / 'smoke', loose[1] / 'smoke')
        row('3c. two uninterrupted runs, deterministic=false', repeat, 'informative', True)
        opens = opens_without_gpu(work / 'plain' / 'killed' / 'smoke', work / 'fsdp' / 'killed' / 'smoke')
        row('4. checkpoints open where no GPU is visible', opens, 'yes', opens == 'yes')
        timed = ('max_duration=60ba', 'model.d_model=512', 'model.n_heads=8', 'model.n_layers=8', 'global_batch_size=32',
                 'checkpoint.interval=1h', 'checkpoint.periodic_interval=null', 'eval_interval=1000ba')
        step_s = {}
        for flag in ('true', 'false'):
            root = work / f'timed-{flag}'
            train(root, data, *timed, f'deterministic={flag}').wait()
            step_s[flag] = median_step_s(root / 'smoke')
        row('5. step time, deterministic true / false (25 M params, batch 32 x 128)',
            f'{step_s["true"] * 1e3:.1f} / {step_s["false"] * 1e3:.1f} ms = {step_s["true"] / step_s["false"]:.2f}x',
            'informative', True)
    widths = [max(len(r[i]) for r in [('check', 'measured', 'expected', 'verdict'), *ROWS]) for i in range(4)]
    print()
    for r in [('check', 'measured', 'expected', 'verdict'), tuple('-' * w for w in widths), *ROWS]:
        print(' | '.join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)))
    return 0 if all(r[3] == 'ok' for r in ROWS) else 1


if __name__ == '__main__':
    sys.exit(main())
