"""``make gpu-check``: the CUDA paths, on a machine with one GPU, in a few minutes. Prints one line per check.

1. a run with dropout on the GPU (bf16 autocast), SIGKILLed after a checkpoint and resumed, against an
   uninterrupted run: every step's loss and the final weights (CUDA RNG restored);
2. the asynchronous snapshot (pinned host memory) equals a synchronous copy of the same state;
3. FSDP2 on one GPU with a sharded checkpoint: killed, resumed, against an uninterrupted run;
4. the checkpoint cost of a ~1 B-parameter model: training blocked, write time, overhead at 2 minutes.

Runs use the tests' fault injector to stop a run at a chosen step, as the tests do.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from prefix.rundir import RunDir

REPO = Path(__file__).resolve().parent.parent
FAULTS = REPO / 'tests' / 'faults'


def train(root: Path, data: Path, *overrides: str, hold_at: int | None = None) -> subprocess.Popen:
    env = dict(os.environ)
    if hold_at is not None:
        env.update(PYTHONPATH=str(FAULTS), PREFIX_TEST_FAULTS=json.dumps(
            [{'op': 'step', 'step': hold_at, 'marker': str(root / 'held'), 'block': True}]))
    cmd = [sys.executable, '-m', 'prefix.train', str(REPO / 'yamls' / 'smoke.yaml'), f'runs_root={root}',
           f'data.local={data}', *overrides]
    return subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def killed_and_resumed(work: Path, data: Path, *overrides: str) -> str:
    """An uninterrupted run, and one SIGKILLed at step 14 (checkpoint of 10 committed) then resumed: equal?"""
    from prefix.chaos import compare

    reference, killed = work / 'reference', work / 'killed'
    assert train(reference, data, *overrides).wait() == 0, 'the uninterrupted run failed'
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
    try:
        compare(reference / 'smoke', run.root)
    except AssertionError as e:
        return f'DIFFERS: {e}'
    return 'bit-exact'


def snapshot_equals_sync_copy() -> str:
    from prefix.model import GPT, ModelConfig
    from prefix.snapshot import HostSnapshot, on_cpu

    model = GPT(ModelConfig(d_model=256, n_heads=4, n_layers=4)).cuda()
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randint(0, 257, (4, 64), device='cuda')).float().pow(2).mean().backward()
    opt.step()
    state = {'model': model.state_dict(), 'optimizer': opt.state_dict()}
    snap = HostSnapshot().copy(state)
    sync = on_cpu(state)
    pinned = all(t.is_pinned() for t in snap['model'].values())
    equal = all(torch.equal(a, b) for a, b in zip(snap['model'].values(), sync['model'].values(), strict=True))
    return f'{"equal" if equal else "DIFFERS"}, {"pinned" if pinned else "NOT pinned"}'


def main() -> int:
    if not torch.cuda.is_available():
        print('gpu-check: no CUDA device here', file=sys.stderr)
        return 2
    print(f'gpu-check on {torch.cuda.get_device_name(0)}, torch {torch.__version__}', flush=True)
    data = REPO / 'data' / 'stdlib'
    with tempfile.TemporaryDirectory(prefix='prefix-gpu-check-') as tmp:
        work = Path(tmp)
        print('1. dropout, bf16, SIGKILL + resume:', killed_and_resumed(work / 'plain', data, 'max_duration=20ba'), flush=True)
        print('2. async snapshot vs sync copy:', snapshot_equals_sync_copy(), flush=True)
        print('3. FSDP2, sharded checkpoint, SIGKILL + resume:',
              killed_and_resumed(work / 'fsdp', data, 'max_duration=20ba', 'fsdp={}'), flush=True)
    print('4. checkpoint cost at ~1 B parameters:', flush=True)
    return subprocess.run([sys.executable, str(REPO / 'benchmarks' / 'checkpoint_bench.py'), '--data', str(data),
                           '--sizes', 'gpt-1b', '--reps', '1', '--parts', 'timing',
                           '--variants', 'none,prefix-sync,prefix-async'],
                          cwd=REPO).returncode


if __name__ == '__main__':
    sys.exit(main())
