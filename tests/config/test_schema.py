"""The schema's fields say what they take and what may not change on resume; validation and drift read them."""

import pytest

from prefix.config.config import ConfigError, TrainConfig, load_config
from prefix.config.drift import FIXED
from prefix.config.duration import Duration
from prefix.config.schema import fixed_keys


def test_a_required_setting_is_what_omegaconf_calls_missing() -> None:
    from omegaconf import MISSING

    from prefix.config.schema import REQUIRED

    assert REQUIRED == MISSING


def test_fixed_keys_come_from_the_fields() -> None:
    assert fixed_keys(TrainConfig) == FIXED
    assert set(FIXED) == {'seed', 'global_batch_size', 'model.', 'data.local', 'data.remote', 'data.train_split',
                          'data.shuffle', 'data.num_canonical_nodes', 'checkpoint.format'}


@pytest.mark.parametrize('override, message', [
    ('checkpoint.interval=5ep', "'checkpoint.interval': '5ep' is not a duration like 10ba or 10s or 10min or 10h"),
    ('checkpoint.periodic_interval=0ba', "'checkpoint.periodic_interval': '0ba' must be at least 1ba"),
    ('dist_timeout=30ba', "'dist_timeout': '30ba' is not a duration like 10s or 10min or 10h"),
    ('log_interval=1ep', "'log_interval': '1ep' is not a duration like 10ba"),
    ('precision=fp8', 'config key precision: .fp8. is not one of null, fp32, amp_bf16, amp_fp16'),
    ('fsdp.mixed_precision=HALF', 'config key fsdp.mixed_precision: .HALF. is not one of DEFAULT, PURE, FULL'),
    ('model.name=bert', 'config key model.name: .bert. is not one of gpt, hf_causal_lm, import'),
])
def test_fields_validate_what_they_declare(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config('yamls/smoke.yaml', [override])


def test_zero_is_allowed_only_where_declared() -> None:
    cfg = load_config('yamls/smoke.yaml', ['lock_wait=0s', 'optimizer.warmup=0ba'])
    assert Duration.parse(cfg.lock_wait).seconds == 0.0


def test_duration() -> None:
    assert Duration.parse('10min').seconds == 600.0 and Duration.parse(' 90s ').seconds == 90.0
    assert Duration.parse('200ba').batches == 200 and Duration.parse('2ep').batches is None
    assert Duration.parse('2ep').reached({'epoch': 2, 'batch': 0}) and not Duration.parse('3ba').reached({'batch': 2})
    for bad in ('10', 'ba', '1.5ba', '10days', '-1ba'):
        with pytest.raises(ValueError, match='is not a duration'):
            Duration.parse(bad)
    with pytest.raises(ValueError, match='training time'):
        _ = Duration.parse('5ba').seconds
