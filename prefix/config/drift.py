"""Config drift: what changed in the config since the checkpoint being resumed, and whether that is safe.

Changing the model, the data, the seed or the global batch size in the middle of a run makes the
resumed run something else than the run it continues, so such changes (the keys the schema marks
``fixed``) are refused unless ``allow_config_change=true``. Everything else (durations, intervals, optimizer settings, workers,
precision, ...) is allowed. Every change is recorded in ``meta/config_changes.jsonl``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from prefix.config.config import TrainConfig
from prefix.config.schema import fixed_keys
from prefix.errors import ConfigError
from prefix.files import jsonl

FIXED = fixed_keys(TrainConfig)  # the schema's fields marked fixed: ('seed', 'model.', ...)
IGNORED = ('allow_config_change',)


class ConfigDriftError(ConfigError):
    """The config changed in a way that makes resuming wrong."""


def flatten(tree: Any, prefix: str = '') -> dict[str, Any]:
    """``{'optimizer': {'lr': 3e-3}}`` as ``{'optimizer.lr': 3e-3}``: the dotted keys of a config's leaves (lists and
    None are values; an empty mapping has none)."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flatten(value, f'{prefix}{key}.'))
        return out
    return {prefix[:-1]: tree}


def diff(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (old, new)}`` for every leaf that differs."""
    a, b = flatten(old), flatten(new)
    if isinstance(a.get('data.local'), str):  # a run from before paths were made absolute: relative to this folder
        a['data.local'] = os.path.abspath(a['data.local'])
    return {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys())
            if a.get(k) != b.get(k) and k not in IGNORED}


def is_unsafe(key: str, new: dict[str, Any]) -> bool:
    if key == 'data.local':  # the data itself unless it is only the cache of a remote
        return new.get('data', {}).get('remote') is None
    return any(key == k or (k.endswith('.') and key.startswith(k)) for k in FIXED)


def check_and_record(old: dict[str, Any], new: dict[str, Any], step: int, changes_log: Path) -> None:
    """Raise ConfigDriftError for unsafe changes (unless allowed); record the accepted ones."""
    changes = diff(old, new)
    if not changes:
        return
    known = flatten(old)
    unsafe = [k for k in changes if is_unsafe(k, new) and k in known]  # a key newer than the checkpoint is no change
    allowed = bool(new.get('allow_config_change'))
    if unsafe and not allowed:
        listed = '; '.join(f'{k}: {changes[k][0]!r} -> {changes[k][1]!r}' for k in unsafe)
        raise ConfigDriftError(
            f'the config differs from the checkpoint at step {step} in what makes resuming wrong ({listed}): '
            'use a new run_name, restore those values, or pass allow_config_change=true to resume anyway',
        )
    jsonl.append(changes_log, {
        'time': time.strftime('%Y-%m-%dT%H:%M:%S%z'), 'step': step, 'forced': bool(unsafe),
        'changes': {k: {'old': o, 'new': n} for k, (o, n) in changes.items()},
    })
