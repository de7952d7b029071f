"""Bit-exact resume: real runs SIGKILLed at chosen moments and restarted with the same command.

(Two ranks with dataloader workers, killed at random moments: test_chaos.)

Each killed run is compared with an uninterrupted run of the same config: every step's loss and
the final weights must be identical (dropout is on, so the RNG states must be restored exactly).
While runs are going, a sampler lists the checkpoint folder every few milliseconds and checks that
it only ever holds the contract's files.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import REPO, epoch_length, run_env, run_train, smoke_args, starts, step_losses, train_cmd, two_epochs

pytestmark = pytest.mark.slow

CONTRACT = re.compile(r'^(latest|periodic)(_rank\d+)?\.pt(\.tmp)?$')
COMPOSER_SIGNAL = re.compile(r'^\._signal_file_node\d+_\w+$')  # Composer's autoresume barrier, gone within a second


class ContractSampler(threading.Thread):
    def __init__(self, folder: Path) -> None:
        super().__init__(daemon=True)
        self.folder, self.stop, self.samples, self.violations = folder, threading.Event(), 0, set()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                names = os.listdir(self.folder)
            except FileNotFoundError:
                names = []
            self.samples += 1
            self.violations.update(n for n in names if not (CONTRACT.match(n) or COMPOSER_SIGNAL.match(n)))
            time.sleep(0.002)


def last_step(run: Path) -> int:
    try:
        return max(step_losses(run), default=-1)
    except (FileNotFoundError, ValueError):
        return -1


def after_step(n: int) -> Callable[[Path], bool]:
    return lambda run: last_step(run) >= n


def after_save(n: int) -> Callable[[Path], bool]:
    def ready(run: Path) -> bool:
        log = run / 'logs' / 'rank0.log'
        return log.exists() and f'checkpoint saved at step {n}' in log.read_text()
    return ready


def during_write(run: Path) -> bool:
    folder = run / 'checkpoints'
    return folder.is_dir() and any(name.endswith('.tmp') for name in os.listdir(folder))


def killed_run(root: Path, args: list[str], moments: list[Callable[[Path], bool]], nproc: int = 0) -> list[str]:
    """Start the run, SIGKILL its whole process group at each moment, then let it finish; returns what was hit."""
    run = root / 'smoke'
    hits = []
    for moment in moments:
        proc = subprocess.Popen(train_cmd(*args, nproc=nproc), env=run_env(), cwd=REPO, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while proc.poll() is None and not moment(run):
            pass  # poll as fast as possible: a checkpoint write lasts milliseconds
        assert proc.poll() is None, 'the run finished before the kill moment'
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        folder = run / 'checkpoints'
        hits.append(f'step {last_step(run)}' + (' mid-write' if folder.is_dir() and any(
            n.endswith('.tmp') for n in os.listdir(folder)) else ''))
    result = run_train(*args, nproc=nproc)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return hits


def assert_same_training(reference: Path, resumed: Path) -> None:
    ref_losses, losses = step_losses(reference), step_losses(resumed)
    assert sorted(losses) == sorted(ref_losses)
    differing = [s for s in ref_losses if ref_losses[s] != losses[s]]
    assert not differing, f'losses differ at steps {differing[:10]}'
    a = torch.load(reference / 'checkpoints' / 'latest.pt', weights_only=True)['state']['model']
    b = torch.load(resumed / 'checkpoints' / 'latest.pt', weights_only=True)['state']['model']
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize('async_write', ['true', 'false'])
def test_sigkill_anywhere_single_process(tmp_path: Path, dataset: Path, reference, async_write: str) -> None:
    """Both write modes: in async mode the mid-write kill lands on a background write while training goes on."""
    epoch = epoch_length(dataset)
    # Checkpoints at every epoch end, so one kill lands right after the checkpoint that closes epoch 0.
    args = smoke_args(tmp_path / 'killed', dataset, two_epochs(dataset), f'checkpoint.interval={epoch}ba',
                      'checkpoint.periodic_interval=null', f'checkpoint.async_write={async_write}')

    sampler = ContractSampler(tmp_path / 'killed' / 'smoke' / 'checkpoints')
    sampler.start()
    hits = killed_run(tmp_path / 'killed', args, [
        after_save(epoch),        # right after a checkpoint, at an epoch boundary
        after_step(epoch + 5),    # between checkpoints, the data position mid-epoch
        during_write,             # in the middle of writing the checkpoint that closes epoch 1
    ])
    sampler.stop.set()
    sampler.join()
    print('kills:', hits, 'folder samples:', sampler.samples)
    assert not sampler.violations, f'files outside the contract: {sampler.violations}'
    assert_same_training(reference(0, two_epochs(dataset)), tmp_path / 'killed' / 'smoke')
    assert len(starts(tmp_path / 'killed' / 'smoke')) == 4
