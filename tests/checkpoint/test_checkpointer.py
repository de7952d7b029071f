"""The Checkpointer's decisions: a write is committed only when every rank agreed it is done."""

import errno
import subprocess
import threading
from pathlib import Path

import pytest
from conftest import (
    HANG,
    REPO,
    committed_step,
    error_line,
    faults,
    group_gone,
    run_env,
    smoke_args,
    train_cmd,
)

import prefix.checkpoint.checkpointer as checkpointer_module
from prefix.checkpoint.checkpointer import Checkpointer, Committed, PendingSave, SaveRecord
from prefix.checkpoint.writer import WriteJob
from prefix.config.config import CheckpointConfig
from prefix.distributed.agreement import RankFailedError, RankFailures
from prefix.distributed.preemption import PreemptionSignal
from prefix.distributed.waits import Deadline


def test_a_write_failing_between_the_agreement_and_acting_on_it_is_never_counted_as_committed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    checkpointer = Checkpointer(tmp_path, CheckpointConfig(interval='10ba'), {}, None, PreemptionSignal(), RankFailures())
    checkpointer._committed = Committed(5, 1, None)
    gate = threading.Event()

    def write() -> None:
        gate.wait()
        raise OSError(errno.ENOSPC, 'No space left on device', str(tmp_path / 'latest_rank0.pt.1.tmp'))

    job = WriteJob(10, [write, lambda: None], world_size=2)
    checkpointer._pending = PendingSave(job, SaveRecord(10, periodic=False, asynchronous=True), rng={},
                                       deadline=Deadline(600, 'writing the checkpoint of step 10'),
                                       on_disk=lambda: 0)
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


# A failure on one rank at a phase of a sharded write (2 ranks, FSDP), or a write that never ends: every rank exits 1
# with the same line naming the rank, never an abort inside DCP's collective nor a hang; step 4 stays committed.
SHARD = '__1_*.distcp'
FAILING_WRITES = {
    # rank 1's rank file fails while rank 0 is done with its own part (it used to wait inside DCP: exit 134)
    'rank file of rank 1': ('fsdp={}', {'op': 'open', 'path': 'latest_rank1.pt.*.tmp', 'rank': 1, 'error': 'ENOSPC',
                                        'skip': 1}, 'rank 1 failed writing the checkpoint of step 8: No space left'),
    'shard file of rank 1': ('fsdp={}', {'op': 'fsync', 'path': SHARD, 'rank': 1, 'error': 'EIO', 'skip': 1},
                             'rank 1 failed writing the checkpoint of step 8: Input/output error'),
    # a volume that hangs in fsync until released (never, here): the write's deadline stops every rank
    'hung shard fsync of rank 1': ('fsdp={}', {'op': 'fsync', 'path': SHARD, 'rank': 1, 'block': True, 'skip': 1},
                                   'rank 1 failed writing the checkpoint of step 8: still at it after 6 s '
                                   '(checkpoint.write_timeout;'),
    'hung latest.pt fsync (full format)': ('fsdp=null', {'op': 'fsync', 'path': 'latest.pt.*.tmp', 'rank': 0,
                                                         'block': True, 'skip': 1},
                                           'rank 0 failed writing the checkpoint of step 8: still at it after 6 s '
                                           '(checkpoint.write_timeout;'),
}


@pytest.mark.slow
@pytest.mark.parametrize('name', list(FAILING_WRITES))
def test_a_write_failing_or_hung_on_one_rank_ends_every_rank_with_one_line(name: str, tmp_path: Path, dataset: Path) -> None:
    fsdp, rule, message = FAILING_WRITES[name]
    args = smoke_args(tmp_path, dataset, 'max_duration=24ba', fsdp, 'dist_timeout=1h', 'checkpoint.interval=4ba',
                      'checkpoint.periodic_interval=null', 'checkpoint.write_timeout=6s')
    run = tmp_path / 'smoke'
    often = {'op': 'set', 'target': 'prefix.checkpoint.checkpointer:REPORT_S', 'value': 1}  # the progress line, every second
    proc = subprocess.Popen(train_cmd(*args, nproc=2), env=run_env(**faults(rule, often)), cwd=REPO,
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    console = proc.communicate(timeout=HANG)[0]
    assert proc.returncode == 1 and group_gone(proc.pid, timeout=HANG), console[-3000:]
    logs = [(run / 'logs' / f'rank{r}.log').read_text() for r in (0, 1)]
    errors = {error_line(run / 'logs' / f'rank{r}.log') for r in (0, 1)}
    assert len(errors) == 1, errors
    error = errors.pop()
    assert error.startswith(f'prefix: error: {message}') and error.endswith(
        'the checkpoint of step 4 is intact. Fix the cause, then run the same command again to resume'), error
    for text in (console, *logs):
        assert 'terminate called' not in text and 'Timed out' not in text
    assert committed_step(run) == 4
    if 'hung' in name:
        hung = 1 if 'rank 1' in name else 0
        assert 'the checkpoint of step 8 is still being written after' in logs[0] and f'rank {hung} (' in logs[0]
