"""FSDP2 with sharded checkpoints, 2 ranks on gloo through the real launcher: kills, preemption, world-size
changes, torn shard folders, and ``prefix export`` against the same run trained without FSDP."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    REPO,
    Moment,
    assert_same_training,
    committed_step,
    copy_run,
    faults,
    held_at,
    killed_run,
    run_env,
    run_train,
    signal_ranks,
    smoke_args,
    starts,
    step_losses,
    train_cmd,
    wait_for,
)

from prefix.chaos import main as chaos
from prefix.checkpoint.shards import check
from prefix.distributed.preemption import PREEMPTED_EXIT_CODE
from prefix.models.export import whole_checkpoint

pytestmark = pytest.mark.slow

FSDP = 'fsdp={}'
RUN = ('max_duration=24ba', FSDP)


def shard_folders(run: Path) -> list[str]:
    return sorted(p.name for p in (run / 'checkpoints').iterdir() if p.name.startswith('shards-'))


GPU_HOST_THREADS = {'op': 'gpu_threads'}  # any CUDA call off the main thread fails, as it would misbehave on a GPU


def test_sigkill_anywhere_and_sigterm_resume_bit_exact_and_no_thread_touches_cuda(
        tmp_path: Path, dataset: Path, reference) -> None:
    """One run through every way a sharded run stops: SIGKILL between checkpoints and in the middle of a shard
    write, then SIGTERM (which saves that step), each start resumed from the last; asynchronous writes, the
    synchronous one after SIGTERM and the sharded resumes all with background threads that would fail on any
    CUDA call (DCP's writer and reader take the thread's CUDA stream on a GPU host)."""
    args = smoke_args(tmp_path, dataset, *RUN, 'checkpoint.interval=4ba', 'checkpoint.periodic_interval=12ba')
    run = tmp_path / 'smoke'
    killed_run(tmp_path, args, [
        held_at('between checkpoints', 14),  # the checkpoint of step 12 may or may not be committed yet
        # rank 1 has written its shard file and its fsync never returns: the folder is never complete
        Moment('mid-shard-write', {'op': 'fsync', 'path': '__1_*.distcp', 'rank': 1, 'block': True}),
    ], nproc=2, finish=False, rules=(GPU_HOST_THREADS,))
    held, release = tmp_path / 'held', tmp_path / 'release'
    proc = subprocess.Popen(train_cmd(*args, nproc=2), cwd=REPO, start_new_session=True,
                            env=run_env(**faults(GPU_HOST_THREADS, {'op': 'step', 'step': 21, 'marker': str(held),
                                                                    'block': True, 'release': str(release)})),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: held.exists() and len(held.read_text().splitlines()) == 2, proc, 'step 21')
    signal_ranks(proc, signal.SIGTERM)
    wait_for(lambda: all('SIGTERM received' in (run / 'logs' / f'rank{r}.log').read_text() for r in (0, 1)), proc)
    release.touch()
    # Signalled at the end of step 21 with the write of step 20 in flight: the ranks agree at that step's end.
    assert proc.wait(timeout=180) == PREEMPTED_EXIT_CODE and committed_step(run) == 21
    resumed = run_train(*args, nproc=2, **faults(GPU_HOST_THREADS))
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert [s['start_step'] for s in starts(run)][-1] == 21
    assert_same_training(reference(2, *RUN), run)
    latest = torch.load(run / 'checkpoints' / 'latest.pt', weights_only=True)
    assert 'model' not in latest['state'] and latest['shards'] in shard_folders(run)
    periodic = torch.load(run / 'checkpoints' / 'periodic.pt', weights_only=True)
    assert shard_folders(run) == sorted({latest['shards'], periodic['shards']}), 'latest and periodic only'
    for name in shard_folders(run):
        check(run / 'checkpoints' / name)


def test_a_background_write_holds_the_state_of_its_step_while_training_goes_on(tmp_path: Path, dataset: Path) -> None:
    """Full format under FSDP: the write of step 4 is held before it opens its file while training takes steps 5 and 6;
    what it commits is step 4's state (FSDP's gathered state holds the optimizer's live step counters)."""
    args = smoke_args(tmp_path, dataset, 'max_duration=12ba', FSDP, 'checkpoint.format=full', 'checkpoint.interval=4ba',
                      'checkpoint.periodic_interval=null')
    run = tmp_path / 'smoke'
    write_held, release_write, at_7, release_7 = (tmp_path / n for n in ('write-held', 'release-write', 'at-7', 'release-7'))
    proc = subprocess.Popen(train_cmd(*args), cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=run_env(**faults(
                                {'op': 'open', 'path': 'latest.pt.*.tmp', 'times': 1, 'marker': str(write_held),
                                 'block': True, 'release': str(release_write)},
                                {'op': 'step', 'step': 7, 'marker': str(at_7), 'block': True, 'release': str(release_7)})))
    wait_for(lambda: write_held.exists() and at_7.exists(), proc, 'the write of step 4 held, training at step 7')
    release_write.touch()
    wait_for(lambda: committed_step(run) == 4, proc, 'the checkpoint of step 4 committed')
    saved = torch.load(run / 'checkpoints' / 'latest.pt', weights_only=True)
    release_7.touch()
    assert proc.wait(timeout=300) == 0
    steps = [s['step'] for s in saved['state']['optimizers']['DecoupledAdamW']['state'].values()]
    assert steps and all(float(step) == 4.0 for step in steps), steps


def test_chaos_with_sharded_checkpoints(tmp_path: Path, dataset: Path, reference, capsys: pytest.CaptureFixture) -> None:
    code = chaos([str(REPO / 'yamls' / 'smoke.yaml'), *RUN, 'checkpoint.interval=3ba', '--data', str(dataset),
                  '--nproc', '2', '--kills', '2', '--startup', '15', '--max-steps', '8', '--work', str(tmp_path),
                  '--reference', str(reference(2, *RUN))])
    out = capsys.readouterr()
    print(out.out, out.err)
    assert code == 0, out.err


def test_world_size_2_1_2_carries_the_shards_over(tmp_path: Path, dataset: Path, reference) -> None:
    """Without dropout, losses match an uninterrupted FSDP run and a DDP run within 1e-4."""
    args = smoke_args(tmp_path, dataset, *RUN, 'model.dropout=0.0', 'checkpoint.interval=1h',
                      'checkpoint.periodic_interval=null')
    run = tmp_path / 'smoke'
    # Signalled at the end of step 8 (2 ranks: agreed on while step 9 computes, step 9 saved) and of step 16 (1 rank).
    for nproc, stop_at, saved in ((2, 8, 9), (1, 16, 16)):
        held, release = tmp_path / f'held-{stop_at}', tmp_path / f'release-{stop_at}'
        proc = subprocess.Popen(train_cmd(*args, nproc=nproc if nproc > 1 else 0), cwd=REPO, start_new_session=True,
                                env=run_env(**faults({'op': 'step', 'step': stop_at, 'marker': str(held), 'block': True,
                                                      'release': str(release)})),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda h=held, n=nproc: h.exists() and len(h.read_text().splitlines()) == n, proc, f'step {stop_at}')
        logs = [run / 'logs' / f'rank{r}.log' for r in range(nproc)]
        seen = [log.read_text().count('SIGTERM received') for log in logs]  # rank0.log holds the earlier start's too
        if nproc > 1:
            signal_ranks(proc, signal.SIGTERM)
        else:
            proc.send_signal(signal.SIGTERM)
        wait_for(lambda ls=logs, n=seen: all(log.read_text().count('SIGTERM received') > k for log, k in zip(ls, n, strict=True)),
                 proc)
        release.touch()
        assert proc.wait(timeout=180) == PREEMPTED_EXIT_CODE and committed_step(run) == saved
    final = run_train(*args, nproc=2)
    assert final.returncode == 0, final.stdout[-3000:]
    assert [s['world_size'] for s in starts(run)] == [2, 1, 2]
    got = step_losses(run)
    for ref in (reference(2, *RUN, 'model.dropout=0.0'), reference(2, 'max_duration=24ba', 'model.dropout=0.0')):
        expected = step_losses(ref)
        assert sorted(got) == sorted(expected) == list(range(24))
        worst = max(abs(expected[s] - got[s]) for s in expected)
        assert worst < 1e-4, f'the same samples in the same order give the same losses (worst difference {worst})'


def test_a_torn_shard_folder_is_never_resumed_from(tmp_path: Path, dataset: Path, reference) -> None:
    args = smoke_args(tmp_path, dataset, 'max_duration=22ba', FSDP)
    assert run_train(*args, nproc=2).returncode == 0
    run = tmp_path / 'smoke'
    torn = copy_run(run, tmp_path / 'torn')
    latest = torch.load(torn / 'checkpoints' / 'latest.pt', weights_only=True)['shards']
    shard = torn / 'checkpoints' / latest / '__1_0.distcp'
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(ValueError, match='truncated'):
        check(torn / 'checkpoints' / latest)
    result = run_train(*smoke_args(tmp_path / 'torn', dataset, 'max_duration=24ba', FSDP), nproc=2)
    assert result.returncode == 0, result.stdout[-3000:]
    assert 'CHECKPOINT UNUSABLE' in (torn / 'logs' / 'rank0.log').read_text()
    assert starts(torn)[-1]['resumed_from'] == 'periodic.pt' and starts(torn)[-1]['start_step'] == 20


def test_export_of_a_sharded_run_equals_the_same_run_without_fsdp(tmp_path: Path, dataset: Path, reference) -> None:
    """Bit for bit without gradient clipping: clipping's norm is summed over shards in another order (about 1e-6)."""
    sharded = reference(2, *RUN, 'optimizer.grad_clip_norm=0')
    plain = reference(2, 'max_duration=24ba', 'optimizer.grad_clip_norm=0')
    out = tmp_path / 'export.pt'
    exported = subprocess.run([sys.executable, '-m', 'prefix.cli', 'export', 'smoke', str(out), '--root', str(sharded.parent)],
                              cwd=REPO, env=run_env(), capture_output=True, text=True)
    assert exported.returncode == 0, exported.stderr[-3000:]
    whole = torch.load(out, weights_only=True)
    full = torch.load(plain / 'checkpoints' / 'latest.pt', weights_only=True)
    assert set(whole) == set(full) and whole['global_step'] == full['global_step'] == 24
    for part in ('model', 'optimizers'):
        a, b = whole['state'][part], full['state'][part]
        flat_a, flat_b = _flatten(a), _flatten(b)
        assert flat_a.keys() == flat_b.keys(), part
        differing = [k for k in flat_a if not _equal(flat_a[k], flat_b[k])]
        assert not differing, f'{part} differs at {differing[:5]}'
    assert whole_checkpoint(sharded / 'checkpoints')['global_step'] == 24


def _flatten(tree: object, prefix: str = '') -> dict[str, object]:
    if isinstance(tree, dict):
        out: dict[str, object] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f'{prefix}{key}/'))
        return out
    if isinstance(tree, (list, tuple)):
        return _flatten(dict(enumerate(tree)), prefix)
    return {prefix: tree}


def _equal(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and torch.equal(a, b)
    return a == b
