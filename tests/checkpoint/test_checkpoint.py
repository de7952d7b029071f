"""The checkpoint contract's pieces: plain-data files, RNG states, safe loading, choosing what to resume."""

import logging
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, copy_run

from prefix.checkpoint.checkpoint import (
    CheckpointError,
    adopt_rescue,
    capture_rng,
    find_resume_point,
    is_complete,
    plain,
    remove_leftovers,
    restore_rng,
    safe_load,
    verify_crc,
)


def draws() -> tuple:
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path: Path) -> None:
    np.random.randn()  # leaves a cached gaussian in NumPy's state
    rng = capture_rng()
    expected = draws()
    torch.save(rng, tmp_path / 'rng.pt')
    draws()
    restore_rng(torch.load(tmp_path / 'rng.pt', weights_only=True))
    assert draws() == expected


def test_plain_turns_str_subclasses_into_str_and_names_anything_else() -> None:
    assert type(plain({'v': torch.__version__})['v']) is str
    with pytest.raises(CheckpointError, match=r'state/a/0 \(object\)'):
        plain({'a': [object()]})


class _Exploit:
    def __reduce__(self):
        return (os.system, (f'touch {self.marker}',))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path: Path) -> None:
    exploit = _Exploit()
    exploit.marker = tmp_path / 'pwned'
    torch.save({'schema_version': 1, 'global_step': 1, 'payload': exploit}, tmp_path / 'latest.pt')
    with pytest.raises(CheckpointError, match='could run code'):
        safe_load(tmp_path / 'latest.pt')
    with pytest.raises(CheckpointError, match='could run code'):
        find_resume_point(tmp_path)
    assert not exploit.marker.exists()


PLAIN_TORCH = '''
import sys
for name in ("composer", "streaming", "omegaconf", "numpy"):
    sys.modules[name] = None  # any import of these now fails
import torch
from prefix.config import ModelConfig
from prefix.models.gpt import GPT
ckpt = torch.load(sys.argv[1], weights_only=True)
model = GPT(ModelConfig(**ckpt["config"]["model"]))
model.load_state_dict({k.removeprefix("model."): v for k, v in ckpt["state"]["model"].items()}, strict=True)
logits = model.eval()(torch.zeros(1, 8, dtype=torch.long))
assert torch.isfinite(logits).all()
rank = torch.load(sys.argv[2], weights_only=True)
assert rank["global_step"] == ckpt["global_step"]
assert set(rank["rng"][ckpt["global_step"]]) == {"torch", "cuda", "numpy", "python"}
print("rebuilt at step", ckpt["global_step"], "tokens", ckpt["tokens_seen"])
'''


def test_latest_opens_with_plain_torch_and_rebuilds_the_model(finished_run: Path) -> None:
    ckpts = finished_run / 'checkpoints'
    result = subprocess.run([sys.executable, '-c', PLAIN_TORCH, str(ckpts / 'latest.pt'), str(ckpts / 'latest_rank0.pt')],
                            capture_output=True, text=True, env={**os.environ, 'PYTHONPATH': str(REPO)})
    assert result.returncode == 0, result.stderr
    assert 'rebuilt at step 22 tokens 22528' in result.stdout


def test_contract_files_and_their_ties(finished_run: Path) -> None:
    ckpts = finished_run / 'checkpoints'
    latest = safe_load(ckpts / 'latest.pt')
    assert set(latest) == {'schema_version', 'generation', 'global_step', 'tokens_seen', 'config', 'wall_clock', 'state'}
    assert latest['generation'] == 1, 'the first start of the run holds the run lock\'s first generation'
    assert {'model', 'optimizers', 'schedulers', 'timestamp', 'dataset_state'} <= set(latest['state'])
    assert latest['state']['dataset_state']['train']['sample_in_epoch'] == 22 * 8
    rank = safe_load(ckpts / 'latest_rank0.pt')
    assert rank['rank'] == 0 and rank['world_size'] == 1 and rank['global_step'] == 22
    assert sorted(rank['rng']) == [20, 22], 'the previous checkpoint RNG states are kept'
    assert rank['generations'] == {20: 1, 22: 1}, 'with the generation that wrote each'
    assert safe_load(ckpts / 'periodic.pt')['global_step'] == 20
    assert sorted(safe_load(ckpts / 'periodic_rank0.pt')['rng']) == [15, 20]


def test_periodic_files_are_hard_links_not_copies(finished_run: Path, tmp_path: Path) -> None:
    from prefix.files.atomic import commit, link_temp

    ckpts = copy_run(finished_run, tmp_path) / 'checkpoints'
    commit(link_temp(ckpts / 'latest.pt', ckpts / 'periodic.pt'), ckpts / 'periodic.pt')
    assert os.path.samefile(ckpts / 'latest.pt', ckpts / 'periodic.pt'), 'the bytes of one checkpoint exist once'


def test_resume_point_prefers_latest(finished_run: Path) -> None:
    point = find_resume_point(finished_run / 'checkpoints')
    assert point is not None and point.kind == 'latest' and point.global_step == 22 and point.rng is not None
    assert point.lr == 3.0e-3, "the scheduler's base learning rate (yamls/smoke.yaml's optimizer.lr)"
    assert is_complete(point.timestamp, '22ba') and not is_complete(point.timestamp, '23ba')
    assert is_complete(point.timestamp, f'{22 * 8}sp') and not is_complete(point.timestamp, '1ep')


def test_truncated_latest_falls_back_to_periodic_loudly(finished_run: Path, tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    ckpts = copy_run(finished_run, tmp_path) / 'checkpoints'
    data = (ckpts / 'latest.pt').read_bytes()
    (ckpts / 'latest.pt').write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING):
        point = find_resume_point(ckpts)
    assert point is not None and point.kind == 'periodic' and point.global_step == 20 and point.rng is not None
    assert 'CHECKPOINT UNUSABLE' in caplog.text and 'latest.pt' in caplog.text


def flip_a_weight_byte(path: Path) -> None:
    import zipfile

    with zipfile.ZipFile(path) as archive:
        info = max(archive.infolist(), key=lambda i: i.file_size)  # the largest tensor
    data = bytearray(path.read_bytes())
    data[info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + info.file_size // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_flipped_bit_is_caught_by_the_crc_and_falls_back(finished_run: Path, tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    ckpts = copy_run(finished_run, tmp_path) / 'checkpoints'
    flip_a_weight_byte(ckpts / 'latest.pt')
    torch.load(ckpts / 'latest.pt', weights_only=True)  # torch itself does not notice
    with caplog.at_level(logging.WARNING):
        point = find_resume_point(ckpts)
    assert point is not None and point.kind == 'periodic' and 'fails its CRC-32 check' in caplog.text


def _rchar() -> int:
    return int(next(line for line in Path('/proc/self/io').read_text().splitlines() if line.startswith('rchar:')).split()[1])


def test_the_crc_check_maps_the_records_and_reads_none_of_them(tmp_path: Path) -> None:
    """The node leader's CRC pass fills the page cache for the ranks' mapped loads without a copy through read():
    a resume passes the checkpoint through read() nowhere (benchmarks/README.md: what a resume reads)."""
    path = tmp_path / 'big.pt'
    torch.save({'w': torch.arange(8 << 20, dtype=torch.int32)}, path)  # 32 MB
    before = _rchar()
    verify_crc(path)
    assert _rchar() - before < (1 << 20)
    flip_a_weight_byte(path)
    with pytest.raises(ValueError, match='record big/data/0 fails its CRC-32 check'):
        verify_crc(path)


def test_the_crc_check_of_compressed_records_and_of_a_renamed_header(tmp_path: Path) -> None:
    """What zipfile.testzip catches: a compressed record that fails its CRC, a local header naming another record."""
    import zipfile

    path = tmp_path / 'deflated.zip'
    with zipfile.ZipFile(path, 'w', compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr('a', b'x' * 1000)
        archive.writestr('b', os.urandom(100000))  # deflate keeps random bytes as they are: a flip stays a flip
        info = archive.getinfo('b')
    verify_crc(path)
    data = bytearray(path.read_bytes())
    data[info.header_offset + 30 + 1 + info.compress_size // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match='record b fails'):
        verify_crc(path)
    stored = tmp_path / 'stored.zip'
    with zipfile.ZipFile(stored, 'w') as archive:
        archive.writestr('a', b'1' * 100)
    data = bytearray(stored.read_bytes())
    data[30] = ord('z')  # the name in a's local header
    stored.write_bytes(bytes(data))
    with pytest.raises(ValueError, match='record a fails'):
        verify_crc(stored)


def test_a_damaged_rank_file_costs_only_its_rng_state(finished_run: Path, tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    ckpts = copy_run(finished_run, tmp_path) / 'checkpoints'
    flip_a_weight_byte(ckpts / 'latest_rank0.pt')
    with caplog.at_level(logging.WARNING):
        point = find_resume_point(ckpts)
    assert point is not None and point.kind == 'latest' and point.rng is None and 'cannot be read' in caplog.text


def test_no_readable_checkpoint_is_an_error_not_a_fresh_start(finished_run: Path, tmp_path: Path) -> None:
    ckpts = copy_run(finished_run, tmp_path) / 'checkpoints'
    for name in ('latest.pt', 'periodic.pt'):
        (ckpts / name).unlink()
        (ckpts / name).write_bytes(b'garbage')
    with pytest.raises(CheckpointError, match='no usable checkpoint'):
        find_resume_point(ckpts)


def test_empty_folder_starts_fresh(tmp_path: Path) -> None:
    assert find_resume_point(tmp_path) is None


def test_leftovers_of_earlier_generations_are_removed_and_a_newer_ones_kept(finished_run: Path, tmp_path: Path) -> None:
    """Generation 3 starts: what 1 and 2 (and an older prefix) left goes; 4's files are a newer holder's, in flight."""
    ckpts = copy_run(finished_run, tmp_path) / 'checkpoints'
    older = ['latest.pt.tmp', 'latest.pt.2.tmp', 'latest_rank0.pt.1.tmp', 'shards-000000020-g2-0badcafe.2.tmp',
             'shards-000000010-g1-00c0ffee', '._signal_file_node0_abc123']
    newer = ['latest.pt.4.tmp', 'latest_rank0.pt.4.tmp', 'shards-000000030-g4-feedbeef.4.tmp', 'shards-000000030-g4-deadbeef']
    # A user's files: whatever their names, prefix deletes only what it writes.
    users = ['notes.tmp', 'best.pt.1.tmp', 'latest_best.pt', 'latest_rankX.pt', 'shards-backup', 'shards-backup.1.tmp']
    for name in older + newer + users:
        if name.startswith('shards-'):
            (ckpts / name).mkdir()
            (ckpts / name / '__0_0.distcp').write_bytes(b'half')
        else:
            (ckpts / name).write_bytes(b'half')
    assert {p.name for p in remove_leftovers(ckpts, 3)} == set(older) - {'shards-000000010-g1-00c0ffee'}
    assert sorted(p.name for p in ckpts.iterdir()) == sorted(
        ['latest.pt', 'latest_rank0.pt', 'periodic.pt', 'periodic_rank0.pt', *newer, *users])


RESCUES = {  # what rank 1 left after rank 0 was lost: (generation, steps after latest.pt's, rank file) -> adopted?
    'continues latest.pt': (1, 2, True, True),
    'a start committed since': (7, 2, True, False),
    'not newer': (1, 0, True, False),
    'a rank file missing': (1, 2, False, False),
}


@pytest.mark.parametrize('case', list(RESCUES))
def test_a_rescue_is_adopted_only_when_it_continues_latest(finished_run: Path, tmp_path: Path, case: str) -> None:
    """rescue.pt (and rescue_rank{r}.pt) becomes latest.pt when written under latest.pt's generation at a later
    step with every rank's file; otherwise it is removed and latest.pt stays. Either way no rescue file is left."""
    generation, ahead, with_rank_file, adopted = RESCUES[case]
    ckpts = copy_run(finished_run, tmp_path) / 'checkpoints'
    latest = safe_load(ckpts / 'latest.pt')
    step = latest['global_step'] + ahead
    torch.save({**latest, 'global_step': step, 'generation': generation}, ckpts / 'rescue.pt')
    if with_rank_file:
        torch.save({**safe_load(ckpts / 'latest_rank0.pt'), 'global_step': step}, ckpts / 'rescue_rank0.pt')
    header = adopt_rescue(ckpts)
    assert (header is not None) == adopted
    assert safe_load(ckpts / 'latest.pt')['global_step'] == (step if adopted else latest['global_step'])
    assert safe_load(ckpts / 'latest_rank0.pt')['global_step'] == (step if adopted else latest['global_step'])
    assert not list(ckpts.glob('rescue*'))


def test_a_rank_file_of_another_generation_is_not_used(finished_run: Path, tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    """A stalled former holder renamed its rank file late: its RNG states belong to another checkpoint."""
    ckpts = copy_run(finished_run, tmp_path) / 'checkpoints'
    rank = safe_load(ckpts / 'latest_rank0.pt')
    torch.save({**rank, 'generations': {22: 7, 20: 1}}, ckpts / 'latest_rank0.pt')
    with caplog.at_level(logging.WARNING):
        point = find_resume_point(ckpts)
    assert point is not None and point.generation == 1 and point.rng is None
    assert 'written by generation 7, not by generation 1 which wrote latest.pt' in caplog.text


def test_cuda_rng_is_this_gpus_only_and_a_state_that_does_not_fit_is_skipped(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A fake CUDA: this rank uses GPU 2; files of older prefix versions hold every visible GPU's state."""
    restored: list[torch.Tensor] = []
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'current_device', lambda: 2)
    monkeypatch.setattr(torch.cuda, 'get_rng_state', lambda device='cuda': torch.full((16,), 2, dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, 'set_rng_state', lambda state, device='cuda': restored.append(state))
    rng = capture_rng()
    assert torch.equal(rng['cuda'], torch.full((16,), 2, dtype=torch.uint8)), 'one GPU, not every visible one'
    restore_rng(rng)
    every_gpu = [torch.full((16,), g, dtype=torch.uint8) for g in range(4)]
    restore_rng({**rng, 'cuda': every_gpu})  # an older file from a pod with 4 GPUs: GPU 2's is taken
    assert [int(s[0]) for s in restored] == [2, 2]
    with caplog.at_level(logging.WARNING):
        restore_rng({**rng, 'cuda': every_gpu[:2]})  # from a pod with 2 GPUs: none is this GPU's
    assert len(restored) == 2 and 'cover 2 GPUs and this rank uses GPU 2' in caplog.text
