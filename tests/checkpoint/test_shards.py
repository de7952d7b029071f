"""Shard folders: DCP's index and objects are read as plain data only; anything that could run code is refused."""

import os
import pickle
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from prefix.checkpoint import shards
from prefix.checkpoint.checkpoint import CheckpointError, find_resume_point
from prefix.models import export


class RunsCode:
    """Unpickling this runs a command: it creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f'touch {self.marker}',))


def shard_folder(folder: Path, **extra) -> Path:
    dcp.save({'model': {'w': torch.randn(3, 4)}, 'optimizers': {'AdamW': {'param_groups': [{'lr': 0.1}]}}, **extra},
             storage_writer=dcp.FileSystemWriter(folder), no_dist=True)
    return folder


def latest_naming(checkpoints: Path, folder: str) -> None:
    torch.save({'schema_version': 1, 'generation': 1, 'global_step': 1, 'tokens_seen': 0, 'config': {}, 'wall_clock': {},
                'state': {'timestamp': {'Timestamp': {'batch': 1}}}, 'shards': folder}, checkpoints / 'latest.pt')


def test_a_metadata_that_would_run_code_is_refused_at_resume(tmp_path: Path) -> None:
    checkpoints = tmp_path / 'checkpoints'
    folder = shard_folder(checkpoints / 'shards-000000001-g1-00c0ffee')
    shards.check(folder)  # DCP's own index reads
    assert sorted(shards.read_whole(folder)) == ['model', 'optimizers']
    (folder / '.metadata').write_bytes(pickle.dumps(RunsCode(tmp_path / 'ran')))
    with pytest.raises(pickle.UnpicklingError, match='names posix.system'):
        shards.check(folder)
    latest_naming(checkpoints, folder.name)
    with pytest.raises(CheckpointError, match='could run code when loaded: refusing it'):
        find_resume_point(checkpoints)
    assert not (tmp_path / 'ran').exists(), 'nothing in the file ran'


@pytest.mark.parametrize('where', ['.metadata', 'an object in the shards'])
def test_export_refuses_a_shard_folder_that_would_run_code(tmp_path: Path, where: str, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv('TORCH_FORCE_WEIGHTS_ONLY_LOAD', '0')  # export sets it; restored after the test
    checkpoints = tmp_path / 'runs' / 'r' / 'checkpoints'
    folder = checkpoints / 'shards-000000001-g1-00c0ffee'
    if where == '.metadata':
        shard_folder(folder)
        (folder / '.metadata').write_bytes(pickle.dumps(RunsCode(tmp_path / 'ran')))
    else:
        shard_folder(folder, extra=RunsCode(tmp_path / 'ran'))
    latest_naming(checkpoints, folder.name)
    assert export.main(['r', str(tmp_path / 'out.pt'), '--root', str(tmp_path / 'runs')]) == 1
    error = capsys.readouterr().err
    assert error.startswith('prefix: error: cannot export') and 'could run code when loaded' in error
    assert error.count('\n') == 1 and not (tmp_path / 'ran').exists() and not (tmp_path / 'out.pt').exists()
