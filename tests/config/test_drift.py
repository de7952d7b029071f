import json
from pathlib import Path

import pytest

from prefix.config.config import TrainConfig, to_dict
from prefix.config.drift import ConfigDriftError, check_and_record, diff


def config(**changes) -> dict:
    cfg = to_dict(TrainConfig(run_name='r', max_duration='10ba'))
    cfg['data']['local'] = '/data/x'
    for key, value in changes.items():
        node = cfg
        *parents, leaf = key.split('.')
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return cfg


def test_diff_lists_changed_leaves() -> None:
    assert diff(config(), config(**{'model.d_model': 64, 'max_duration': '20ba'})) == {
        'max_duration': ('10ba', '20ba'), 'model.d_model': (128, 64)}


@pytest.mark.parametrize('change', [{'model.n_layers': 9}, {'seed': 1}, {'global_batch_size': 64},
                                    {'data.local': '/data/y'}, {'data.remote': 's3://b/d'}, {'data.shuffle': False}])
def test_unsafe_changes_are_refused(tmp_path: Path, change: dict) -> None:
    with pytest.raises(ConfigDriftError, match='allow_config_change=true'):
        check_and_record(config(), config(**change), 5, tmp_path / 'config_changes.jsonl')
    assert not (tmp_path / 'config_changes.jsonl').exists()


def test_harmless_changes_are_recorded(tmp_path: Path) -> None:
    new = config(**{'max_duration': '99ba', 'eval_interval': '5ba', 'optimizer.lr': 0.1, 'data.num_workers': 3,
                    'checkpoint.interval': '1min'})
    check_and_record(config(), new, 5, tmp_path / 'config_changes.jsonl')
    record = json.loads((tmp_path / 'config_changes.jsonl').read_text())
    assert record['step'] == 5 and not record['forced'] and len(record['changes']) == 5


def test_a_cache_location_may_move_when_data_is_remote(tmp_path: Path) -> None:
    old = config(**{'data.remote': 's3://b/d'})
    moved = config(**{'data.remote': 's3://b/d', 'data.local': '/cache/elsewhere'})
    check_and_record(old, moved, 5, tmp_path / 'config_changes.jsonl')


def test_allow_config_change_forces_and_is_not_itself_a_change(tmp_path: Path) -> None:
    check_and_record(config(), config(seed=3, allow_config_change=True), 5, tmp_path / 'config_changes.jsonl')
    record = json.loads((tmp_path / 'config_changes.jsonl').read_text())
    assert record['forced'] and set(record['changes']) == {'seed'}


def test_the_checkpoint_format_is_unsafe_fsdp_placement_is_not_and_a_newer_key_is_no_change(tmp_path: Path) -> None:
    old = config(**{'checkpoint.format': 'full'})
    with pytest.raises(ConfigDriftError, match="checkpoint.format: 'full' -> 'sharded'"):
        check_and_record(old, config(**{'checkpoint.format': 'sharded'}), 5, tmp_path / 'config_changes.jsonl')
    sharded, placed_otherwise = config(), config()
    sharded['fsdp'], placed_otherwise['fsdp'] = {'mixed_precision': 'DEFAULT'}, {'mixed_precision': 'PURE'}
    check_and_record(sharded, placed_otherwise, 5, tmp_path / 'config_changes.jsonl')
    older = config()  # written before checkpoint.format existed
    del older['checkpoint']['format']
    check_and_record(older, config(**{'checkpoint.format': 'full'}), 5, tmp_path / 'config_changes.jsonl')


def test_the_dataset_is_compared_as_the_folder_it_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """data.local is made absolute where the run starts: the same folder written two ways is the same data, the same
    relative path from another folder is other data; a run recorded before, with a relative path, resumes as before."""
    from prefix.config.config import load_config

    (tmp_path / 'a' / 'data').mkdir(parents=True)
    (tmp_path / 'b' / 'data').mkdir(parents=True)
    (tmp_path / 'c.yaml').write_text('run_name: r\nmax_duration: 10ba\n')
    changes = tmp_path / 'config_changes.jsonl'

    def loaded(folder: str, local: str) -> dict:
        monkeypatch.chdir(tmp_path / folder)
        return to_dict(load_config(str(tmp_path / 'c.yaml'), [f'data.local={local}']))

    first = loaded('a', 'data')
    assert first['data']['local'] == str(tmp_path / 'a' / 'data')
    check_and_record(first, loaded('b', str(tmp_path / 'a' / 'data')), 5, changes)
    with pytest.raises(ConfigDriftError, match='data.local'):
        check_and_record(first, loaded('b', 'data'), 5, changes)
    recorded_relative = {**first, 'data': {**first['data'], 'local': 'data'}}
    check_and_record(recorded_relative, loaded('a', 'data'), 5, changes)
    assert not changes.exists()
