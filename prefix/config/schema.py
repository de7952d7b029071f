"""What the config schema knows of each key, on the key's own field (as torchtitan's fields carry it).

``setting(default, units=..., choices=..., fixed=...)`` declares a dataclass field with its
metadata: the duration units it takes, the values it may have, and whether it is fixed for the life
of a run (a change on resume makes the resumed run another run: ``prefix.config.drift`` refuses it). The
validation and the drift check read these fields, so renaming or adding a key cannot leave a second
list behind.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Iterator
from typing import Any, Optional

from prefix.config.duration import Duration
from prefix.errors import ConfigError

REQUIRED = '???'  # OmegaConf's MISSING, spelled out: prefix.config.model imports this module where only torch is installed


def setting(default: Any = REQUIRED, *, factory: Optional[Callable[[], Any]] = None, units: str = '',
            zero_ok: bool = False, choices: tuple[Any, ...] = (), fixed: bool = False,
            bounds: Optional[str] = None, length: Optional[int] = None) -> Any:
    """A config field. ``units``: the duration units it takes (``'ba,ep'``); ``choices``: its allowed
    values; ``fixed``: it may not change when a run resumes (a nested config: none of its keys may);
    ``bounds``: the interval a number (each number of a list) lies in, as written in maths: ``'(0, inf)'``,
    ``'[0, 1)'``; ``length``: how many numbers a list holds."""
    metadata = {'units': tuple(units.split(',')) if units else (), 'zero_ok': zero_ok, 'choices': choices,
                'fixed': fixed, 'bounds': bounds, 'length': length}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _fields(cfg: Any, prefix: str = '') -> Iterator[tuple[str, dataclasses.Field, Any]]:
    """(dotted key, field, value) of every key under ``cfg``, nested configs included."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        yield prefix + f.name, f, value
        if dataclasses.is_dataclass(value):
            yield from _fields(value, f'{prefix}{f.name}.')


def check(cfg: Any) -> None:
    """ConfigError for a duration of a unit its key does not take, or a value outside its key's choices."""
    for key, f, value in _fields(cfg):
        units, choices = f.metadata.get('units'), f.metadata.get('choices')
        if units and value is not None:
            try:
                duration = Duration.parse(value)
            except ValueError:
                duration = None
            if duration is None or duration.unit not in units:
                raise ConfigError(f"config key {key!r}: {value!r} is not a duration like {' or '.join('10' + u for u in units)}")
            if duration.number < (0 if f.metadata['zero_ok'] else 1):
                raise ConfigError(f'config key {key!r}: {value!r} must be at least 1{duration.unit}')
        if choices and value not in choices:
            listed = ', '.join('null' if c is None else str(c) for c in choices)
            raise ConfigError(f'config key {key}: {value!r} is not one of {listed}')
        length, bounds = f.metadata.get('length'), f.metadata.get('bounds')
        if length is not None and value is not None and len(value) != length:
            raise ConfigError(f'config key {key}: {list(value)} holds {len(value)} numbers, not {length}')
        if bounds and value is not None:
            for number in (value if isinstance(value, (list, tuple)) else [value]):
                if not _within(number, bounds):
                    raise ConfigError(f'config key {key}: {number} is not in {bounds}')


def _within(number: float, bounds: str) -> bool:
    low, high = (float(x) for x in bounds[1:-1].split(','))
    above = number > low if bounds[0] == '(' else number >= low
    below = number < high if bounds[-1] == ')' else number <= high
    return above and below


def fixed_keys(schema: type) -> tuple[str, ...]:
    """The dotted keys (a nested config as ``name.``) that may not change when a run resumes."""
    keys: list[str] = []

    def walk(cls: type, prefix: str) -> None:
        for f in dataclasses.fields(cls):
            nested = _nested(cls, f.name)
            if f.metadata.get('fixed'):
                keys.append(f'{prefix}{f.name}.' if nested else prefix + f.name)
            elif nested is not None:
                walk(nested, f'{prefix}{f.name}.')

    walk(schema, '')
    return tuple(keys)


def key_of(schema: type, section: str) -> Optional[str]:
    """The dotted key of the nested config named ``section`` (a class name), for messages."""
    for f in dataclasses.fields(schema):
        nested = _nested(schema, f.name)
        if nested is None:
            continue
        if nested.__name__ == section:
            return f.name
        inner = key_of(nested, section)
        if inner is not None:
            return f'{f.name}.{inner}'
    return None


def _nested(cls: type, name: str) -> Optional[type]:
    """The config class of field ``name``, if it is a nested config (Optional or not)."""
    hint = typing.get_type_hints(cls)[name]
    for candidate in (hint, *typing.get_args(hint)):
        if dataclasses.is_dataclass(candidate):
            return candidate  # type: ignore[return-value]
    return None


def listing(cls: type, prefix: str = '', fixed: bool = False) -> list[str]:
    """One line per key of ``cls`` (nested configs expanded): its default and what it takes, for ``--help``."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        nested = _nested(cls, f.name)
        if nested is not None and dataclasses.fields(nested):
            lines += listing(nested, f'{prefix}{f.name}.', fixed or f.metadata.get('fixed', False))
            continue
        if f.default is not dataclasses.MISSING:
            default = 'required' if f.default == REQUIRED else ('null' if f.default is None else str(f.default))
        else:
            default = str(f.default_factory()) if f.default_factory is not dataclasses.MISSING else ''  # type: ignore[misc]
        kind = 'section' if nested is not None else _type_name(hints[f.name])
        meta = f.metadata
        takes = [f'durations in {",".join(meta["units"])}' if meta.get('units') else '',
                 'one of ' + ', '.join('null' if c is None else str(c) for c in meta['choices']) if meta.get('choices') else '',
                 f'in {meta["bounds"]}' if meta.get('bounds') else '',
                 'fixed for the run' if fixed or meta.get('fixed') else '']
        lines.append(f'  {prefix + f.name:40} {kind:10} {default:12} {"; ".join(t for t in takes if t)}'.rstrip())
    return lines


def _type_name(hint: Any) -> str:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is typing.Union and len(args) == 1:
        hint = args[0]
    if typing.get_origin(hint) is not None:
        return typing.get_origin(hint).__name__
    return getattr(hint, '__name__', str(hint))
