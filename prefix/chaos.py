"""Chaos test: kill a run again and again at random moments, then check it ends as if never killed.

    python -m prefix.chaos --data DIR [--nproc 2] [--kills 5] [--seed N] [--work DIR] [CONFIG] [key=value ...]

Runs CONFIG (default ``yamls/smoke.yaml``) once uninterrupted as the reference, then again in a
new folder, killing it ``--kills`` times at random moments (the first inside a step, then a quarter
during start-up, the rest at a random point of a random later step: training, evaluation or a checkpoint write) with SIGKILL to
every process, SIGTERM to every process (a pod's preemption), or SIGTERM to the first process
only (the ``composer`` launcher or ``python``),
restarting it each time with the same command. When it finally completes, every step's loss and
the final weights must equal the reference's, and the run directory must hold exactly the
contract's files. The seed is printed first, so a failure can be replayed with ``--seed``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Collection
from pathlib import Path

import torch

from prefix.checkpoint import referenced_shards
from prefix.files import jsonl
from prefix.models import whole_checkpoint
from prefix.run import LOSS, RunDir

CONTRACT = re.compile(r'^(latest|periodic)(_rank\d+)?\.pt$')
KILLS = ('SIGKILL all', 'SIGTERM all', 'SIGTERM first')


def step_losses(run_dir: Path) -> dict[int, float]:
    """Each step's training loss from ``logs/metrics.jsonl``, the last logged winning (a step replayed after a kill)."""
    return {r['step']: r[LOSS] for r in jsonl.read(RunDir(run_dir).metrics) if LOSS in r}


def command(config: str, overrides: list[str], nproc: int) -> list[str]:
    if nproc > 1:
        launcher = str(Path(sys.executable).parent / 'composer')
        return [launcher, '-n', str(nproc), '-m', 'prefix.train', config, *overrides]
    return [sys.executable, '-m', 'prefix.train', config, *overrides]


def wait_group(pgid: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.killpg(pgid, signal.SIGKILL)
    raise RuntimeError(f'processes of group {pgid} still alive {timeout}s after the signal')


def tail(console: Path, nbytes: int = 3000) -> str:
    return console.read_text(errors='replace')[-nbytes:]


def run_to_end(cmd: list[str], console: Path) -> None:
    """Run ``cmd`` to its end, its console kept in ``console``; raise if it fails."""
    with console.open('w') as out:
        code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise RuntimeError(f'run failed with exit code {code} (console: {console}):\n{tail(console)}')


def check_contract(run_dir: Path, nproc: int) -> None:
    run = RunDir(run_dir)
    names = sorted(p.name for p in run.checkpoints.iterdir())
    named = referenced_shards(run.checkpoints) or set()  # the shard folders latest.pt and periodic.pt name
    stray = [n for n in names if not CONTRACT.match(n) and n not in named]
    expected = {'latest.pt', *(f'latest_rank{r}.pt' for r in range(nproc))}
    if stray or not expected <= set(names) or not named <= set(names):
        raise AssertionError(f'checkpoints/ holds {names}: expected {sorted(expected | named)} (+ periodic), no others')
    if run.lock.exists() and json.loads(run.lock.read_text()).get('state') != 'released':
        raise AssertionError('meta/lock.json is still held after the run completed')


def compare(reference: Path, run: Path, unlogged: Collection[int] = ()) -> None:
    """The run trained as the reference did: the same loss at every logged step, the same final weights.
    ``unlogged``: steps whose loss the run may lack (a step saved after a lost rank by a survivor ahead of rank 0,
    which writes the log and never completed it)."""
    ref, got = step_losses(reference), step_losses(run)
    if not set(got) <= set(ref) or set(ref) - set(got) - set(unlogged):
        raise AssertionError(f'steps differ: reference has {len(ref)}, chaos run has {len(got)}')
    differing = [s for s in got if ref[s] != got[s]]
    if differing:
        raise AssertionError(f'losses differ at steps {differing[:10]}')
    a = whole_checkpoint(RunDir(reference).checkpoints)['state']['model']
    b = whole_checkpoint(RunDir(run).checkpoints)['state']['model']
    if a.keys() != b.keys() or not all(torch.equal(a[k], b[k]) for k in a):
        raise AssertionError('final weights differ from the uninterrupted run')


def _wait(proc: subprocess.Popen, console: Path, ready, timeout: float) -> bool:
    """Wait for ``ready()`` or ``timeout``; True if the run ended by itself first (it must have succeeded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not ready():
        if proc.poll() is not None:
            if proc.returncode != 0:
                raise RuntimeError(f'run exited with {proc.returncode} before it was killed (console: {console}):\n'
                                   f'{tail(console)}')
            return True
        time.sleep(0.01)
    return False


def chaos(config: str, overrides: list[str], work: Path, nproc: int, kills: int, seed: int,
          reference: Path | None, startup: float, max_steps: int) -> list[str]:
    rng = random.Random(seed)
    run_name = 'chaos'
    base = [*overrides, f'run_name={run_name}']
    consoles = work / 'consoles'
    consoles.mkdir(parents=True, exist_ok=True)
    if reference is None:
        run_to_end(command(config, [*base, f'runs_root={work / "reference"}'], nproc), consoles / 'reference.log')
        reference = work / 'reference' / run_name
    cmd = command(config, [*base, f'runs_root={work / "chaos"}'], nproc)
    run = work / 'chaos' / run_name
    history = []
    while len(history) < kills:
        console = consoles / f'start-{len(history) + 1}.log'
        with console.open('w') as out:
            proc = subprocess.Popen(cmd, start_new_session=True, stdout=out, stderr=subprocess.STDOUT)
        how = rng.choice(KILLS)
        if history and rng.random() < 0.25:  # during start-up: resume, lock, data, Composer's autoresume
            moment = f'{rng.uniform(0, startup):.1f}s after start'
            if _wait(proc, console, lambda: False, timeout=float(moment.split('s')[0])):
                break
        else:  # somewhere inside a later step: training, evaluation or a checkpoint write
            target = max(step_losses(run), default=-1) + rng.randint(1, max_steps)
            moment = f'in step {target + 1}'
            if _wait(proc, console, lambda t=target: max(step_losses(run), default=-1) >= t, timeout=300):
                break
            time.sleep(rng.uniform(0, 0.2))
        if how == 'SIGKILL all':
            os.killpg(proc.pid, signal.SIGKILL)
        elif how == 'SIGTERM all':
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.send_signal(signal.SIGTERM)
        proc.wait()
        wait_group(proc.pid)
        history.append(f'{how} {moment}')
        print(f'  kill {len(history)}: {history[-1]}', flush=True)
    run_to_end(cmd, consoles / f'start-{len(history) + 1}.log')
    check_contract(run, nproc)
    compare(reference, run)
    return history


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m prefix.chaos', description=__doc__.split('\n')[0])
    parser.add_argument('config', nargs='?', default='yamls/smoke.yaml')
    parser.add_argument('overrides', nargs='*', help='key=value overrides for every run')
    parser.add_argument('--data', required=True, help='dataset folder (sets data.local)')
    parser.add_argument('--nproc', type=int, default=1, help='ranks (composer -n) (default 1)')
    parser.add_argument('--kills', type=int, default=5, help='how many times to kill the run (default 5)')
    parser.add_argument('--seed', type=int, default=None, help='replay a previous chaos run')
    parser.add_argument('--startup', type=float, default=10.0, help='start-up kills land within this many seconds')
    parser.add_argument('--max-steps', type=int, default=15, help='other kills land within this many steps')
    parser.add_argument('--work', type=Path, default=None, help='folder for the runs (default: a new temporary one)')
    parser.add_argument('--reference', type=Path, default=None, help='an uninterrupted run of the same config to compare with')
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    print(f'chaos seed {seed} (replay with --seed {seed}), {args.kills} kills, {args.nproc} rank(s)', flush=True)
    work = args.work or Path(tempfile.mkdtemp(prefix='prefix-chaos-'))
    try:
        history = chaos(args.config, [*args.overrides, f'data.local={args.data}'], work, args.nproc, args.kills, seed,
                        args.reference, args.startup, args.max_steps)
    except (AssertionError, RuntimeError) as e:
        print(f'chaos FAILED (seed {seed}, runs in {work}): {e}', file=sys.stderr)
        return 1
    print(f'chaos passed: {len(history)} kills, final weights and every loss equal the uninterrupted run ({work})')
    return 0


if __name__ == '__main__':
    sys.exit(main())
