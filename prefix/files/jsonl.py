"""JSON-lines files, the run directory's logs (``starts.jsonl``, ``metrics.jsonl``, ...): written and read here only.

A writer appends whole lines; a kill can leave the last one cut, so readers skip what does not parse
(and report it, unless it is the last line, which may still be being written).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

TAIL_BYTES = 1 << 16
CHUNK_BYTES = 1 << 22  # what the incremental readers read at a time: a long log is never held whole


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


def read_from(path: Path, offset: int) -> Iterator[tuple[Optional[dict[str, Any]], int]]:
    """Each complete line from byte ``offset`` on: its record (None if it does not parse) and the offset past it.

    A last line without its newline (still being written) is left for a later call.
    """
    try:
        f = path.open('rb')
    except FileNotFoundError:
        return
    with f:
        f.seek(offset)
        rest = b''
        while data := f.read(CHUNK_BYTES):
            data, start = rest + data, 0
            while (end := data.find(b'\n', start)) >= 0:
                yield _parse(data[start:end].decode(errors='replace')), offset + end + 1
                start = end + 1
            offset, rest = offset + start, data[start:]


def read_backward(path: Path) -> Iterator[dict[str, Any]]:
    """The file's records from the last to the first: reading the recent end of a long log costs only that end."""
    try:
        f = path.open('rb')
    except FileNotFoundError:
        return
    with f:
        position, rest = f.seek(0, os.SEEK_END), b''
        while position > 0:
            size = min(CHUNK_BYTES, position)
            position -= size
            f.seek(position)
            lines = (f.read(size) + rest).split(b'\n')
            rest = lines[0]  # may begin in the chunk before
            for line in reversed(lines[1:]):
                if (record := _parse(line.decode(errors='replace'))) is not None:
                    yield record
        if (record := _parse(rest.decode(errors='replace'))) is not None:
            yield record


def _parse(line: str) -> Optional[dict[str, Any]]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None
