"""A rank lost without warning is named once by the survivors, within seconds, whatever ``dist_timeout`` is."""

import contextlib
import os
import random
import signal
import subprocess
from pathlib import Path

import psutil
import pytest
from conftest import (
    HANG,
    REPO,
    assert_same_training,
    committed_step,
    faults,
    group_gone,
    named_lost,
    run_env,
    run_train,
    saved_after_loss,
    smoke_args,
    starts,
    the_line,
    train_cmd,
    unlogged_after_loss,
    wait_for,
)

FAST = [{'op': 'set', 'target': 'prefix.distributed.peers:SILENT_S', 'value': 3.0}]


def start(args: list[str], tmp_path: Path, *rules: dict, nproc: int = 2) -> subprocess.Popen:
    return subprocess.Popen(train_cmd(*args, nproc=nproc), env=run_env(**faults(*FAST, *rules)), cwd=REPO,
                            start_new_session=True, stdout=(tmp_path / 'console').open('w'), stderr=subprocess.STDOUT)


def rank_process(launcher: subprocess.Popen, rank: int) -> psutil.Process:
    return next(p for p in psutil.Process(launcher.pid).children() if p.environ().get('RANK') == str(rank))


def test_the_lost_are_the_ranks_whose_count_stopped_and_the_survivor_a_step_further_saves(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Three watchers on a real rendezvous store, in this process: one stops counting (its process died); the
    others, after their collectives failed, name it and only it, and agree that the one a step further saves; what
    it tells, rank 0 hears."""
    from datetime import timedelta

    import torch.distributed as tdist

    from prefix.distributed.peers import PeerWatch

    store = tdist.TCPStore('127.0.0.1', 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=10))
    monkeypatch.setenv('MASTER_ADDR', '127.0.0.1')
    monkeypatch.setenv('MASTER_PORT', str(store.port))
    watches = [PeerWatch(r, 3) for r in range(3)]
    for w in watches:
        w.beat_s = 0.05
        w.start()
    try:
        wait_for(lambda: all(w._rounds > 3 and len(w._seen) == 2 for w in watches), what='a few rounds')
        watches[2]._ended.set()  # its count stops where it is, unmarked: as a SIGKILL leaves it
        # rank 1's all-reduce of step 11 finished before rank 2 died, rank 0's did not
        assert watches[0].lost(10) == [2] and watches[1].lost(11) == [2]
        assert watches[0].writer([2]) == watches[1].writer([2]) == (1, 11), 'the highest step, by the lowest rank'
        assert watches[2]._saving_elsewhere() == ('rank 1 saves step 11 for the next start to adopt if it can, else '
                                                  'the last committed checkpoint is intact'), 'a rank that ends unmarked'
        watches[1].tell('rank 1 saves step 11, the last it completed, for the next start to adopt')
        assert watches[0].heard() == 'rank 1 saves step 11, the last it completed, for the next start to adopt'
    finally:
        for w in watches[:2]:
            w.done()


# Where the lost rank (the last) is held when it is SIGKILLed, the others waiting for it in a collective; the world;
# a fault on rank 0's own save after the loss; and what each survivor's line says: the write of step 8 is still in
# flight then, so the newest committed checkpoint is 4.
SAVED_10 = 'rank 0 saved step 10, the last it completed'
TOLD_10 = 'rank 0 saves step 10, the last it completed'  # rank 0's word before it writes
MID_STEP = {
    # before its backward of step 11: the others wait in DDP's gradient all-reduce, their optimizers untouched
    'before the gradients are reduced': ('before_backward', 3, None, [SAVED_10, TOLD_10]),
    # after its backward: rank 0 has applied step 11's update and waits in the loss's all-reduce; half-way. (With 3
    # ranks, ranks 0 and 1 then wait in a collective on each other, which fails only when the watcher ends them.)
    'after the optimizer step': ('after_train_batch', 2, None, ['the checkpoint of step 4 is intact']),
    # rank 0's save of step 10 cannot be written: it says so, and the checkpoint of step 4 stays
    'before the gradients are reduced, the save failing': (
        'before_backward', 2, 'ENOSPC', ['rank 0 failed saving step 10: the checkpoint of step 4 is intact']),
}
WORLD = {2: ('max_duration=24ba',), 3: ('max_duration=24ba', 'global_batch_size=12')}  # 3 ranks of 4 samples


@pytest.mark.slow
@pytest.mark.parametrize('moment', list(MID_STEP))
def test_a_rank_lost_mid_step_and_mid_write_costs_one_partial_step_and_the_run_ends_bit_exact(
        tmp_path: Path, dataset: Path, reference, moment: str) -> None:
    """The last rank dies in the middle of step 11 while rank 0's write of step 8 is held in flight (checkpoints
    every 4 steps): rank 0 abandons that write and saves step 10, the last it completed, with a rank file for the
    lost rank too (then rank 1's line says so, as rank 0 told it, and a restart with the full world finishes
    bit-exact), or keeps step 4 when its state was half-way, or when that save fails (and says so)."""
    import torch

    event, nproc, error, told = MID_STEP[moment]
    lost, saved = nproc - 1, 10 if told[0] == SAVED_10 else 4
    args = smoke_args(tmp_path, dataset, *WORLD[nproc], 'checkpoint.interval=4ba', 'dist_timeout=1h',
                      'checkpoint.async_write=true')
    run, held, writing, release = (tmp_path / x for x in ('smoke', 'held', 'writing', 'release'))
    failing = [{'op': 'open', 'path': 'latest.pt.*.tmp', 'rank': 0, 'after': str(release), 'error': error}] \
        if error else []
    launcher = start(args, tmp_path, {'op': 'step', 'step': 10, 'event': event, 'rank': lost, 'block': True,
                                      'marker': str(held)},
                     {'op': 'fsync', 'path': 'latest.pt.*.tmp', 'rank': 0, 'skip': 1, 'times': 1, 'block': True,
                      'release': str(release), 'marker': str(writing)}, *failing, nproc=nproc)
    wait_for(lambda: held.exists() and writing.exists(), launcher, f'rank {lost} at {event} of step 11, step 8 '
                                                                    'in flight')
    rank_process(launcher, lost).send_signal(signal.SIGKILL)
    release.touch()
    for survivor, where in zip(range(lost), told, strict=True):
        line = the_line(run / 'logs' / f'rank{survivor}.log', launcher)
        assert line.startswith(f'prefix: error: lost rank {lost} (node 0, host ') and ' at step 10: ' in line and \
            line.endswith(f'; {where}; run the same command to resume'), (survivor, line)
    assert launcher.wait(timeout=HANG) != 0 and group_gone(launcher.pid, timeout=HANG)
    assert committed_step(run) == saved
    rank_file = torch.load(run / 'checkpoints' / f'latest_rank{lost}.pt', weights_only=True)
    assert (rank_file['rank'], rank_file['global_step']) == (lost, saved)
    if error:
        assert not [p.name for p in (run / 'checkpoints').iterdir() if p.name.endswith('.tmp')], 'it leaves nothing'
    if saved == 10:
        result = run_train(*args, nproc=nproc)
        assert result.returncode == 0, result.stderr[-3000:]
        assert_same_training(reference(nproc, *WORLD[nproc]), run)


def draw(seed: int) -> tuple[str, list[int], int, float]:
    """A seeded trial of 3 ranks: the signal, its victims (one rank or two, rank 0 among the candidates), the step the
    first victim completes before it, and the instant within the next step (seconds after that)."""
    rng = random.Random(seed)
    how = rng.choice(['SIGKILL', 'SIGSTOP'])
    victims = sorted(rng.sample(range(3), rng.choice([1, 2])))
    return how, victims, rng.randint(5, 18), rng.uniform(0, 0.25)


@pytest.mark.slow
@pytest.mark.parametrize('seed', [2, 20, 5, 16], ids=lambda seed: '{} {} at step {} + {:.2f} s'.format(*draw(seed)))
def test_ranks_lost_at_a_random_instant_cost_at_most_a_step_and_the_run_ends_bit_exact(
        tmp_path: Path, dataset: Path, reference, seed: int) -> None:
    """Seeded trials with ``dist_timeout=1h``: one or two of 3 ranks SIGKILLed (dead) or SIGSTOPped (hung) at a
    random instant of a random step, rank 0 among the candidates. Every survivor prints one line naming the lost
    ranks (all of them, unless rank 0 is among them: its store went with it) and exits non-zero within seconds; after
    a death a survivor saves the last step it completed (rank 1, when rank 0 is lost, for the next start to adopt),
    else the last committed checkpoint stays, as the line says; the restart with the full world resumes from that
    step and finishes bit-exact."""
    import time

    how, victims, step, delay = draw(seed)
    args = smoke_args(tmp_path, dataset, *WORLD[3], 'checkpoint.interval=4ba', 'dist_timeout=1h')
    run, at = tmp_path / 'smoke', tmp_path / 'at'
    launcher = start(args, tmp_path, {'op': 'step', 'step': step, 'rank': victims[0], 'marker': str(at)}, nproc=3)
    survivors = [r for r in range(3) if r not in victims]
    try:
        wait_for(at.exists, launcher, f'rank {victims[0]} after step {step}')
        ranks = [rank_process(launcher, r) for r in range(3)]
        time.sleep(delay)  # a random instant: the victims are somewhere in the next step (or its checkpoint)
        for v in victims:
            ranks[v].send_signal(getattr(signal, how))
        lines = [the_line(run / 'logs' / f'rank{r}.log', launcher) for r in survivors]
        for r in survivors:
            ranks[r].wait(timeout=HANG)  # each survivor ends by itself, hung victims or not
    finally:
        with contextlib.suppress(ProcessLookupError):  # what is left once the survivors said their line: the hung
            os.killpg(launcher.pid, signal.SIGKILL)
    launcher.wait()
    for line in lines:
        named = named_lost(line)
        assert named == set(victims) or (0 in victims and named == {0}), (victims, line)
        assert line.endswith('; run the same command to resume'), line
        assert ('stopped answering' in line) == (how == 'SIGSTOP'), line
    assert 'Traceback' not in ''.join((run / 'logs' / f'rank{r}.log').read_text() for r in survivors)
    saved = saved_after_loss(lines)
    if how == 'SIGSTOP':
        assert saved is None, 'gloo cannot abort a collective: a hung peer leaves the last committed checkpoint'
    assert saved is None or saved >= step, 'at most one step behind the last step completed'
    assert saved is not None or all('is intact' in line for line in lines), 'else the line names what stays'
    resumes_from = saved if saved is not None else committed_step(run)
    result = run_train(*args, nproc=3)
    assert result.returncode == 0, result.stderr[-3000:]
    assert starts(run)[1]['start_step'] == resumes_from
    if any('for the next start to adopt' in line for line in lines) and saved is not None:
        assert f'adopted the checkpoint of step {saved} ' in (run / 'logs' / 'rank0.log').read_text()
    assert not list((run / 'checkpoints').glob('rescue*'))
    assert_same_training(reference(3, *WORLD[3]), run, unlogged_after_loss(lines))


@pytest.mark.slow
def test_a_rank_lost_under_fsdp_keeps_the_last_checkpoint_and_says_why(tmp_path: Path, dataset: Path) -> None:
    """FSDP: rank 1 dies before its backward of step 11; rank 0 does not hold its shards, so it saves nothing and
    its one line says so and names the checkpoint of step 8, which stays as it was."""
    args = smoke_args(tmp_path, dataset, 'fsdp={}', 'max_duration=24ba', 'checkpoint.interval=4ba',
                      'dist_timeout=1h', 'checkpoint.async_write=false')
    run, held = tmp_path / 'smoke', tmp_path / 'held'
    launcher = start(args, tmp_path, {'op': 'step', 'step': 10, 'event': 'before_backward', 'rank': 1,
                                      'block': True, 'marker': str(held)})
    wait_for(held.exists, launcher, 'rank 1 at before_backward of step 11')
    before = sorted((p.name, p.stat().st_mtime_ns) for p in (run / 'checkpoints').rglob('*'))
    rank_process(launcher, 1).send_signal(signal.SIGKILL)
    line = the_line(run / 'logs' / 'rank0.log', launcher)
    assert line.startswith('prefix: error: lost rank 1 (node 0, host ') and line.endswith(
        '; the survivors do not hold the shards of rank 1 (FSDP): the checkpoint of step 8 is intact; run the same '
        'command to resume'), line
    assert launcher.wait(timeout=HANG) != 0 and group_gone(launcher.pid, timeout=HANG)
    assert sorted((p.name, p.stat().st_mtime_ns) for p in (run / 'checkpoints').rglob('*')) == before
