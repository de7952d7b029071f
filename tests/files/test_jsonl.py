"""JSON-lines logs read incrementally: from an offset on, and from the end back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prefix.files import jsonl
from prefix.trackers.loggers import values_at


@pytest.mark.parametrize('chunk', [7, 64, 1 << 22])
def test_read_from_and_read_backward_agree_with_read(tmp_path: Path, chunk: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jsonl, 'CHUNK_BYTES', chunk)
    path = tmp_path / 'log.jsonl'
    records = [{'step': i, 'pad': 'x' * (i % 13)} for i in range(500)]
    path.write_text(''.join(json.dumps(r) + '\n' for r in records) + '{"step": 50')  # the last line is cut
    lines = list(jsonl.read_from(path, 0))
    assert [r for r, _ in lines] == records
    assert lines[-1][1] == path.stat().st_size - len('{"step": 50')
    assert [r for r, _ in jsonl.read_from(path, lines[199][1])] == records[200:]
    assert list(jsonl.read_backward(path)) == records[::-1]
    assert list(jsonl.read_from(tmp_path / 'none', 0)) == [] and list(jsonl.read_backward(tmp_path / 'none')) == []


def test_values_at_a_step_come_from_the_last_start_that_logged_it(tmp_path: Path) -> None:
    path = tmp_path / 'metrics.jsonl'
    lines = [{'step': s, 'time': 1.0, 'loss': s} for s in range(8)]  # the first start, killed after step 7
    lines += [{'step': 5, 'time': 2.0, 'loss': 5, 'val': 0.5}]  # the second start logs step 5 again, and more
    lines += [{'step': s, 'time': 2.0, 'loss': s} for s in range(6, 9)]
    path.write_text(''.join(json.dumps(r) + '\n' for r in lines))
    assert values_at(path, 5) == {'loss': (5.0, 2.0), 'val': (0.5, 2.0)}
    assert values_at(path, 0) == {'loss': (0.0, 1.0)}
    assert values_at(path, 42) == {}
