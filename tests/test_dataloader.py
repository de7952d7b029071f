from pathlib import Path

import pytest
import torch

from prefix.config import DataConfig
from prefix.data import DataError
from prefix.dataloader import build_dataloader, count_tokens


def first_batches(loader, n: int) -> list[torch.Tensor]:
    out = []
    for batch in loader:
        out.append(batch['input_ids'])
        if len(out) == n:
            break
    return out


def test_local_batches_and_global_rng_untouched(dataset: Path) -> None:
    loader = build_dataloader(DataConfig(local=str(dataset)), 'train', batch_size=4, seed=1, train=True, max_seq_len=128)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    batches = first_batches(loader, 3)
    assert torch.equal(before, torch.get_rng_state()), 'creating and iterating a loader must not draw from the global RNG'
    assert batches[0].shape == (4, 129) and batches[0].dtype == torch.int64
    assert count_tokens({'input_ids': batches[0]}) == 4 * 128


def test_val_split_is_not_shuffled(dataset: Path) -> None:
    cfg = DataConfig(local=str(dataset))
    a = first_batches(build_dataloader(cfg, 'val', batch_size=4, seed=1, train=False, max_seq_len=128), 2)
    b = first_batches(build_dataloader(cfg, 'val', batch_size=4, seed=2, train=False, max_seq_len=128), 2)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_missing_dataset_names_the_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r'dataset split not found: .*nowhere/train/index.json'):
        build_dataloader(DataConfig(local=str(tmp_path / 'nowhere')), 'train', batch_size=4, seed=1, train=True, max_seq_len=128)


def test_samples_longer_than_the_model_are_refused(dataset: Path) -> None:
    with pytest.raises(DataError, match='model.max_seq_len is 64'):
        build_dataloader(DataConfig(local=str(dataset)), 'train', batch_size=4, seed=1, train=True, max_seq_len=64)


def test_remote_s3_through_streaming(s3_dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dataset: Path) -> None:
    remote, env = s3_dataset
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    cfg = DataConfig(local=str(tmp_path / 'cache'), remote=remote, shuffle=False)
    remote_batches = first_batches(build_dataloader(cfg, 'train', batch_size=4, seed=1, train=True, max_seq_len=128), 2)
    local_cfg = DataConfig(local=str(dataset), shuffle=False)
    local_batches = first_batches(build_dataloader(local_cfg, 'train', batch_size=4, seed=1, train=True, max_seq_len=128), 2)
    assert all(torch.equal(r, loc) for r, loc in zip(remote_batches, local_batches, strict=True))
    assert any((tmp_path / 'cache' / 'train').glob('shard.*.mds')), 'shards are cached locally'


def test_unreachable_remote_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv('S3_ENDPOINT_URL', 'http://127.0.0.1:9')
    monkeypatch.setenv('AWS_ACCESS_KEY_ID', 'x')
    monkeypatch.setenv('AWS_SECRET_ACCESS_KEY', 'x')
    cfg = DataConfig(local=str(tmp_path / 'cache'), remote='s3://nowhere/ds')
    with pytest.raises(DataError, match='cannot read the train split of s3://nowhere/ds') as err:
        build_dataloader(cfg, 'train', batch_size=4, seed=1, train=True, max_seq_len=128)
    assert '\n' not in str(err.value)
