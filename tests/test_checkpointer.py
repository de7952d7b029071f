"""The Checkpointer's decisions: a write is committed only when every rank agreed it is done."""

import errno
import threading
from pathlib import Path

import pytest

import prefix.checkpointer as checkpointer_module
from prefix.agreement import RankFailedError, RankFailures
from prefix.checkpointer import Checkpointer, Committed, PendingSave, SaveRecord
from prefix.config import CheckpointConfig
from prefix.preemption import PreemptionSignal
from prefix.writer import WriteJob


def test_a_write_failing_between_the_agreement_and_acting_on_it_is_never_counted_as_committed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    checkpointer = Checkpointer(tmp_path, CheckpointConfig(interval='10ba'), {}, None, PreemptionSignal(), RankFailures())
    checkpointer._committed = Committed(5, 1, None)
    gate = threading.Event()

    def write() -> None:
        gate.wait()
        raise OSError(errno.ENOSPC, 'No space left on device', str(tmp_path / 'latest_rank0.pt.1.tmp'))

    job = WriteJob(10, [write, lambda: None], world_size=2)
    checkpointer._pending = PendingSave(job, SaveRecord(10, periodic=False, asynchronous=True), rng={})
    agree = checkpointer_module.any_rank

    def agree_then_fail(flags: list[bool]) -> list[bool]:
        agreed = agree(flags)
        gate.set()  # the write fails after the ranks compared notes, before they act on them
        job.wait()
        return agreed

    monkeypatch.setattr(checkpointer_module, 'any_rank', agree_then_fail)
    checkpointer._agree()
    assert checkpointer._pending is not None and checkpointer._committed.step == 5, 'still busy as agreed: not done'
    monkeypatch.setattr(checkpointer_module, 'any_rank', agree)
    with pytest.raises(RankFailedError, match=r'^rank 0 failed writing the checkpoint of step 10: No space left on device '
                                              r'\(.*latest_rank0.pt.1.tmp\); the checkpoint of step 5 is intact'):
        checkpointer._agree()
    assert checkpointer._committed.step == 5 and checkpointer.saves == []
