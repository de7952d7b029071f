"""WriteJob: phases in order on a background thread, barriers the ranks pass together, failures reported."""

import threading

from prefix.writer import WriteJob


def test_one_rank_runs_every_phase_without_waiting_for_anyone() -> None:
    order: list[str] = []
    job = WriteJob(5, [lambda: order.append('write'), lambda: order.append('commit')], world_size=1)
    assert job.wait(timeout=5)
    assert order == ['write', 'commit'] and job.error is None and job.ended is not None


def test_several_ranks_pass_each_barrier_only_when_released() -> None:
    gate = threading.Event()
    order: list[str] = []
    job = WriteJob(5, [lambda: (gate.wait(), order.append('write')), lambda: order.append('commit')], world_size=2)
    assert job.busy and not job.finished
    job.release()  # ignored: the first phase is still running on this rank
    gate.set()
    assert not job.wait(timeout=5)  # waits at the barrier now
    assert order == ['write'] and not job.busy
    job.release()
    assert job.wait(timeout=5) and order == ['write', 'commit']


def test_a_failed_phase_stops_the_job_and_keeps_the_error() -> None:
    ran: list[str] = []

    def fail() -> None:
        raise OSError(28, 'No space left on device')

    job = WriteJob(5, [fail, lambda: ran.append('commit')], world_size=1)
    assert job.wait(timeout=5)
    assert isinstance(job.error, OSError) and ran == [] and not job.busy


def test_an_aborted_job_commits_nothing() -> None:
    ran: list[str] = []
    job = WriteJob(5, [lambda: ran.append('write'), lambda: ran.append('commit')], world_size=2)
    job.wait(timeout=5)
    job.abort()
    assert ran == ['write'] and job.finished
