"""JSON-lines files, the run directory's logs (``starts.jsonl``, ``metrics.jsonl``, ...): written and read here only.

A writer appends whole lines; a kill can leave the last one cut, so readers skip what does not parse
(and report it, unless it is the last line, which may still be being written).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

TAIL_BYTES = 1 << 16


def append(path: Path, record: dict[str, Any]) -> None:
    """One JSON line, flushed and fsynced: on disk before the caller goes on."""
    with path.open('a') as f:
        f.write(json.dumps(record) + '\n')
        f.flush()
        os.fsync(f.fileno())


def read(path: Path, problems: Optional[list[str]] = None) -> list[dict[str, Any]]:
    """Every parseable record of the file ([] if there is none); a damaged line is named in ``problems``."""
    try:
        lines = path.read_text(errors='replace').splitlines()
    except FileNotFoundError:
        return []
    records = []
    for number, line in enumerate(lines, 1):
        record = _parse(line)
        if record is not None:
            records.append(record)
        elif problems is not None and number < len(lines):
            problems.append(f'{path.name}:{number} is not a JSON record')
    return records


def tail(path: Path, nbytes: int = TAIL_BYTES) -> list[dict[str, Any]]:
    """The records in the last ``nbytes`` of the file (the first, partial line dropped): cheap on a long log."""
    try:
        with path.open('rb') as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - nbytes))
            data = f.read().decode(errors='replace')
    except FileNotFoundError:
        return []
    lines = data.splitlines()[1 if size > nbytes else 0:]
    return [r for r in map(_parse, lines) if r is not None]


def _parse(line: str) -> Optional[dict[str, Any]]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None
