import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import free_port, run_env

from prefix.config.config import DataConfig
from prefix.data.loader import build_dataloader, count_tokens
from prefix.data.prepare import DataError


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


RACE = '''
import os, sys, time
from pathlib import Path
import torch.distributed
import streaming.base.shared.prefix as streaming_prefix
from streaming import StreamingDataset
from streaming.base.constant import LOCALS
from streaming.base.shared import SharedMemory
from prefix.data.loader import streaming_registration

rank, data, searched = int(os.environ['RANK']), sys.argv[1], Path(sys.argv[2])
torch.distributed.init_process_group('gloo')
original = streaming_prefix._check_and_find
foreign = []

def search(streams_local, streams_remote, shm_name):
    if rank == 1 and shm_name == LOCALS and not foreign:
        while not searched.exists():  # rank 0 has looked; now another job registers the prefix it found
            time.sleep(0.01)
        prefix = original(streams_local, streams_remote, shm_name)
        payload = streaming_prefix._pack_locals(['/another/job/train'], prefix)
        foreign.append(SharedMemory(streaming_prefix._get_path(prefix, LOCALS), True, len(payload)))
        foreign[0].buf[:len(payload)] = payload
    found = original(streams_local, streams_remote, shm_name)
    if rank == 0 and shm_name == LOCALS:
        searched.touch()
    return found

streaming_prefix._check_and_find = search
with streaming_registration():
    dataset = StreamingDataset(local=data, split='train', batch_size=4)
print('prefix', dataset._shm_prefix_int)
'''


def test_ranks_of_a_node_agree_on_streamings_shared_memory_while_another_job_registers(
        dataset: Path, tmp_path: Path) -> None:
    """Streaming has every rank look for a free prefix on its own; another job registering one in between
    made rank 1 disagree with its leader. Only the leader looks now; rank 1 never searches."""
    port = free_port()
    procs = [subprocess.Popen([sys.executable, '-c', RACE, str(dataset), str(tmp_path / 'searched')],
                              env=run_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE='2', LOCAL_WORLD_SIZE='2',
                                          MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[1][1][-2000:] + outs[0][1][-2000:]
    prefixes = {out.split()[-1] for out, _ in outs}
    assert len(prefixes) == 1, 'both ranks use the prefix their leader registered'
