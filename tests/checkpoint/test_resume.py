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
import threading
import time
from pathlib import Path

import pytest
from conftest import (
    Moment,
    assert_same_training,
    epoch_length,
    held_at,
    killed_run,
    smoke_args,
    starts,
    two_epochs,
)

pytestmark = pytest.mark.slow

CONTRACT = re.compile(r'^(latest|periodic)(_rank\d+)?\.pt(\.\d+\.tmp)?$')
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


def in_the_write_of_latest() -> Moment:
    """The rank file is written, ``latest.pt``'s temporary file too, and its fsync never returns."""
    return Moment('mid-write', {'op': 'fsync', 'path': 'latest.pt.*.tmp', 'block': True})


@pytest.mark.parametrize('async_write', ['true', 'false'])
def test_sigkill_anywhere_single_process(tmp_path: Path, dataset: Path, reference, async_write: str) -> None:
    """Both write modes: in async mode the mid-write kill lands on a background write while training goes on."""
    epoch = epoch_length(dataset)
    # Checkpoints at every epoch end, so one kill lands right after the checkpoint that closes epoch 0.
    args = smoke_args(tmp_path / 'killed', dataset, two_epochs(dataset), f'checkpoint.interval={epoch}ba',
                      'checkpoint.periodic_interval=null', f'checkpoint.async_write={async_write}')

    sampler = ContractSampler(tmp_path / 'killed' / 'smoke' / 'checkpoints')
    sampler.start()
    killed_run(tmp_path / 'killed', args, [
        # right after the checkpoint that closes epoch 0 is committed
        held_at('epoch-boundary', epoch, event='epoch_start', committed=epoch),
        # between checkpoints, the data position mid-epoch
        held_at('mid-epoch', epoch + 6),
        # in the middle of writing the checkpoint that closes epoch 1
        in_the_write_of_latest(),
    ])
    sampler.stop.set()
    sampler.join()
    print('folder samples:', sampler.samples)
    assert not sampler.violations, f'files outside the contract: {sampler.violations}'
    assert_same_training(reference(0, two_epochs(dataset)), tmp_path / 'killed' / 'smoke')
    assert len(starts(tmp_path / 'killed' / 'smoke')) == 4
