"""WriteJob: phases in order on a background thread, barriers the ranks pass together, failures reported."""

import threading

import pytest
import torch

from prefix.checkpoint.writer import WriteJob


def ended(job: WriteJob) -> None:
    """Its thread has run every phase it will (one rank, or aborted: no barrier to pass)."""
    while job.running():
        job.join(0.05)


def test_one_rank_runs_every_phase_without_waiting_for_anyone() -> None:
    order: list[str] = []
    job = WriteJob(5, [lambda: order.append('write'), lambda: order.append('commit')], world_size=1)
    ended(job)
    assert order == ['write', 'commit'] and job.status().done and job.error is None and job.ended is not None


def test_several_ranks_pass_each_barrier_only_when_released() -> None:
    gate = threading.Event()
    order: list[str] = []
    job = WriteJob(5, [lambda: (gate.wait(), order.append('write')), lambda: order.append('commit')], world_size=2)
    assert job.status().busy and not job.status().done
    job.release()  # ignored: the first phase is still running on this rank
    gate.set()
    job.wait()  # until it waits at the barrier
    assert order == ['write'] and not job.status().busy and not job.status().done
    job.release()
    job.wait()
    assert order == ['write', 'commit'] and job.status().done


def test_a_failed_phase_stops_the_job_and_keeps_the_error() -> None:
    ran: list[str] = []

    def fail() -> None:
        raise OSError(28, 'No space left on device')

    job = WriteJob(5, [fail, lambda: ran.append('commit')], world_size=1)
    ended(job)
    status = job.status()
    assert isinstance(job.error, OSError) and ran == []
    assert status.failed and not status.busy and not status.done, 'a failed job is never done'


def test_an_aborted_job_commits_nothing_and_does_not_wait_for_the_running_phase() -> None:
    ran: list[str] = []
    gate = threading.Event()
    job = WriteJob(5, [lambda: (gate.wait(), ran.append('write')), lambda: ran.append('commit')], world_size=2)
    job.abort()  # returns although the write is still running
    gate.set()
    ended(job)
    assert ran == ['write'] and not job.status().done


def test_a_job_refuses_gpu_memory_before_its_thread_starts() -> None:
    """Everything a writer thread gets is host memory: checked, not a convention ('meta' stands for a GPU here)."""
    ran: list[str] = []
    with pytest.raises(AssertionError, match='the checkpoint of step 5/1/w: a meta tensor'):
        WriteJob(5, [lambda: ran.append('write')], world_size=1, data=({}, {'w': torch.empty(3, device='meta')}))
    assert ran == []
