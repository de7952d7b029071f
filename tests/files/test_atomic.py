from pathlib import Path

import pytest

from prefix.files.atomic import atomic_write, atomic_write_text, commit, link_temp


def test_replaces_whole_file(tmp_path: Path) -> None:
    target = tmp_path / 'f'
    atomic_write_text(target, 'old')
    atomic_write_text(target, 'new')
    assert target.read_text() == 'new' and [p.name for p in tmp_path.iterdir()] == ['f']


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / 'f'
    atomic_write_text(target, 'old')

    def fail_halfway(f) -> None:
        f.write(b'partial')
        raise OSError(28, 'No space left on device')

    with pytest.raises(OSError, match='No space left'):
        atomic_write(target, fail_halfway)
    assert target.read_text() == 'old' and [p.name for p in tmp_path.iterdir()] == ['f']


def test_link_keeps_the_bytes_when_the_source_is_replaced(tmp_path: Path) -> None:
    src, dst = tmp_path / 'latest', tmp_path / 'periodic'
    atomic_write_text(src, 'step 10')
    commit(link_temp(src, dst), dst)
    atomic_write_text(src, 'step 20')
    assert dst.read_text() == 'step 10' and src.read_text() == 'step 20'
