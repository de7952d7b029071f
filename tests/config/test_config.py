from pathlib import Path

import pytest
from conftest import REPO

from prefix.config.config import ConfigError, load_config
from prefix.config.location import validate_run_name


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / 'c.yaml'
    path.write_text(text)
    return str(path)


def test_base_and_smoke_load(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv('PREFIX_RUNS_ROOT', raising=False)
    base = load_config(str(REPO / 'yamls/base.yaml'), [])
    assert base.run_name == 'base' and base.runs_root == './runs' and base.max_duration == '500ba'
    smoke = load_config(str(REPO / 'yamls/smoke.yaml'), ['model.dropout=0.2', 'checkpoint.interval=3ba'])
    assert smoke.model.dropout == 0.2 and smoke.checkpoint.interval == '3ba'


def test_runs_root_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv('PREFIX_RUNS_ROOT', '/pvc/runs')
    assert load_config(str(REPO / 'yamls/smoke.yaml'), []).runs_root == '/pvc/runs'
    assert load_config(str(REPO / 'yamls/smoke.yaml'), ['runs_root=/x']).runs_root == '/x'


@pytest.mark.parametrize(('text', 'overrides', 'message'), [
    ('run_name: a\nmax_duration: 10ba\ndata: {local: d}\nbogus: 1\n', [], "unknown config key 'bogus'"),
    ('run_name: a\nmax_duration: 10ba\ndata: {local: d}\n', ['model.widht=3'], "unknown config key 'model.widht'"),
    ('run_name: a\nmax_duration: 10ba\ndata: {local: d}\n', ['seed=abc'], "config key 'seed'"),
    ('run_name: a\nmax_duration: 10ba\ndata: {local: d}\nmodel: {dropout: high}\n', [], "config key 'model.dropout'"),
    ('run_name: a\ndata: {local: d}\n', [], "missing required config key 'max_duration'"),
    ('max_duration: 10ba\ndata: {local: d}\n', [], "missing required config key 'run_name'"),
    ('run_name: a\nmax_duration: 10ba\n', [], "missing required config key 'data.local'"),
    ('run_name: a\nmax_duration: ten\ndata: {local: d}\n', [], "config key 'max_duration': 'ten' is not a duration"),
    ('run_name: a\nmax_duration: 4096tok\ndata: {local: d}\n', [], "config key 'max_duration': '4096tok'"),
    ('run_name: a\nmax_duration: 10ba\ndata: {local: d}\n', ['checkpoint.interval=5weeks'], "'checkpoint.interval'"),
    ('run_name: a\nmax_duration: 10ba\ndata: {local: d}\n', ['model.n_heads=3'], 'not divisible by model.n_heads'),
    ('run_name: a\nmax_duration: 10ba\ndata: {local: d}\n', ['seed'], "override 'seed' is not of the form key=value"),
    ('run_name: a\nmax_duration: 10ba\ndata: {local: d}\n', ['run_name='], "config key 'run_name' is empty"),
    ('run_name: [unclosed\n', [], 'is not valid YAML'),
    ('run_name: a\nmax_duration: 10ba\ndata: {local: d}\n', ['model.d_model=[1'],
     "override 'model.d_model=[1' is not valid YAML"),
    ('run_name: a\nmax_duration: 10ba\ndata: {local: d}\n', ['loggers={tensorboard:{}}'],
     "override 'loggers={tensorboard:{}}' is not valid YAML: found unexpected ':'"),
    ('- a list\n', [], 'must hold a mapping'),
    ('run_name: a\nmax_duration: 10ba\ndata: {local: d}\nseed: 1\nseed: 2\n', [],
     "c.yaml:5:1 is not valid YAML: key 'seed' is given twice"),
    # values no run can train with: a traceback, or silently accepted, before they were checked
    *(('run_name: a\nmax_duration: 10ba\ndata: {local: d}\n', [override], message) for override, message in [
        ('optimizer.lr=-1', 'config key optimizer.lr: -1.0 is not in (0, inf)'),
        ('optimizer.lr=0', 'config key optimizer.lr: 0.0 is not in (0, inf)'),
        ('optimizer.weight_decay=-1', 'config key optimizer.weight_decay: -1.0 is not in [0, inf)'),
        ('optimizer.betas=[0.9]', 'config key optimizer.betas: [0.9] holds 1 numbers, not 2'),
        ('optimizer.betas=[0.9,1.5]', 'config key optimizer.betas: 1.5 is not in [0, 1)'),
        ('optimizer.min_lr_ratio=2', 'config key optimizer.min_lr_ratio: 2.0 is not in [0, 1]'),
        ('device_microbatch_size=0', 'config key device_microbatch_size: 0 is not in (0, inf)'),
        ('device_microbatch_size=-2', 'config key device_microbatch_size: -2 is not in (0, inf)'),
        ('data.num_workers=-1', 'config key data.num_workers: -1 is not in [0, inf)'),
        ('eval_batches=-1', 'config key eval_batches: -1 is not in [0, inf)'),
        ('max_duration=0ba', "config key 'max_duration': '0ba' must be at least 1ba"),
        ('checkpoint.interval=0ba', "config key 'checkpoint.interval': '0ba' must be at least 1ba"),
        ('optimizer.warmup=20ba', 'config key optimizer.warmup: 20ba is longer than max_duration=10ba'),
        ('loggers.tensorboard=true', "config key 'loggers.tensorboard' is a section, not a value (True): turn it on "
                                     'with loggers.tensorboard={}'),
    ]),
])
def test_config_errors_are_one_line_and_name_the_key(tmp_path: Path, text: str, overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text), overrides)
    assert message in str(err.value)
    assert '\n' not in str(err.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match='does not exist'):
        load_config(str(tmp_path / 'nope.yaml'), [])
    with pytest.raises(ConfigError, match='is a folder: name a YAML file'):
        load_config(str(tmp_path), [])


def test_zero_eval_batches_is_no_evaluation_and_warmup_in_epochs_is_not_compared() -> None:
    assert load_config(str(REPO / 'yamls/smoke.yaml'), ['eval_batches=0']).eval_batches == 0
    assert load_config(str(REPO / 'yamls/smoke.yaml'), ['max_duration=1ep', 'optimizer.warmup=100ba'])


@pytest.mark.parametrize('name', ['base', 'run-1', 'a.b_c', '0x', 'a' * 63])
def test_good_run_names(name: str) -> None:
    assert validate_run_name(name) == name


@pytest.mark.parametrize('name', ['', '../x', 'a/b', '..', '.hidden', 'has space', 'UPPER', 'a' * 64, '-lead', 'é'])
def test_bad_run_names(name: str) -> None:
    with pytest.raises(ConfigError):
        validate_run_name(name)


def test_the_readme_tracker_overrides_parse() -> None:
    import shlex

    readme = (REPO / 'README.md').read_text()
    block = readme.split('<!-- tracker overrides')[1].split('```bash\n')[1].split('```')[0]
    seen = set()
    for line in block.splitlines():
        overrides = shlex.split(line)[4:]  # after: composer -m prefix.train yamls/base.yaml
        cfg = load_config(str(REPO / 'yamls' / 'base.yaml'), overrides)
        configured = {name for name in ('tensorboard', 'mlflow', 'wandb') if getattr(cfg.loggers, name) is not None}
        assert configured, f'{line!r} configures no tracker'
        seen |= configured
    assert seen == {'tensorboard', 'mlflow', 'wandb'}
