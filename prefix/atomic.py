"""Crash-safe file replacement: write a temporary file, fsync it, rename it over the target, fsync the folder.

A reader (or a restart after SIGKILL) sees either the old file or the new one, never a torn one.
The temporary name is fixed per target, so a leftover from a killed write is simply overwritten.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

TMP_SUFFIX = '.tmp'
# What os.link raises where a filesystem has no hard links (or no more for this file): copy instead.
NO_HARD_LINKS = (errno.EPERM, errno.EXDEV, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Writer:
    """Writes every byte or raises, and remembers the OSError: torch.save turns it into a vague RuntimeError."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        view = memoryview(data).cast('B')
        try:
            while view:
                view = view[self.f.write(view):]
        except OSError as e:
            self.error = e
            raise
        return len(data)

    def flush(self) -> None:
        self.f.flush()


def temp_path(path: Path) -> Path:
    return path.with_name(path.name + TMP_SUFFIX)


def write_temp(path: Path, write: Callable[[BinaryIO], None]) -> Path:
    """Write ``path``'s temporary file with ``write`` and fsync it; ``commit`` then makes it ``path``.

    A failed write (full disk, file-size limit) raises the OSError that caused it and leaves no temporary file.
    """
    tmp = temp_path(path)
    try:
        with open(tmp, 'wb', buffering=0) as f:
            writer = _Writer(f)
            try:
                write(writer)  # type: ignore[arg-type]
            except RuntimeError as e:
                if writer.error is not None:
                    raise writer.error from e
                raise
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def commit(tmp: Path, path: Path) -> None:
    """Rename the fsynced temporary file over ``path`` and fsync the folder: the new bytes are now durable."""
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Replace ``path`` with what ``write`` puts into a fresh file; on error the old file is untouched."""
    commit(write_temp(path, write), path)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def atomic_link(src: Path, dst: Path) -> None:
    """Make ``dst`` name the same bytes as ``src`` (a hard link, or a copy where links are not supported)."""
    tmp = temp_path(dst)
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError as e:
        if e.errno not in NO_HARD_LINKS:
            raise
        with open(src, 'rb') as s, open(tmp, 'wb') as d:
            while chunk := s.read(1 << 24):
                d.write(chunk)
            d.flush()
            os.fsync(d.fileno())
    os.replace(tmp, dst)
    fsync_dir(dst.parent)
