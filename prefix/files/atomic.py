"""Crash-safe file replacement: write a temporary file, fsync it, rename it over the target, fsync the folder.

A reader (or a restart after SIGKILL) sees either the old file or the new one, never a torn one.
A temporary file is named for its writer, ``<target>.<tag>.tmp``: two processes that write the same
target at once (a stalled holder of a run and its successor) each write and rename only their own file.
The tag is this process's own (``WRITER``) unless the caller names one: checkpoints carry the run
lock's generation, so that a newcomer can tell which leftovers belong to writers it has fenced.
"""

from __future__ import annotations

import errno
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, Optional

TMP_SUFFIX = '.tmp'
SYNC_EVERY = 1 << 30  # bytes written between two flushes to the disk: a stopped write stops within this much
WRITER = f'p{os.getpid()}-{uuid.uuid4().hex[:8]}'  # this process's tag, unique across machines and restarts
# What os.link raises where a filesystem has no hard links (or no more for this file): copy instead.
NO_HARD_LINKS = (errno.EPERM, errno.EXDEV, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckedWriter:
    """Writes every byte or raises, and remembers the error: torch.save turns it into a vague RuntimeError.

    ``check`` runs before every write: it raises to stop a write that is no longer wanted. Every
    ``SYNC_EVERY`` bytes the data is flushed to the disk, so that little is ever waiting in the page
    cache: a stopped write stops within one chunk, and the final fsync is short. Anything else is
    the wrapped file's.
    """

    def __init__(self, f: BinaryIO, check: Optional[Callable[[], None]]) -> None:
        self.f = f
        self.check = check
        self.error: Optional[Exception] = None
        self._unsynced = 0

    def write(self, data: bytes) -> int:
        view = memoryview(data).cast('B')
        try:
            if self.check is not None:
                self.check()
            while view:
                view = view[self.f.write(view):]
            self._unsynced += len(data)
            if self._unsynced >= SYNC_EVERY:
                self.f.flush()
                os.fdatasync(self.f.fileno())
                self._unsynced = 0
        except Exception as e:
            self.error = e
            raise
        return len(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.f, name)


def temp_path(path: Path, tag: str = WRITER) -> Path:
    return path.with_name(f'{path.name}.{tag}{TMP_SUFFIX}')


def tag_of(name: str) -> Optional[str]:
    """The writer's tag in a temporary file's name (``latest.pt.7.tmp``: ``7``); None for other names."""
    if not name.endswith(TMP_SUFFIX):
        return None
    stem = name[:-len(TMP_SUFFIX)]
    return stem.rsplit('.', 1)[1] if '.' in stem else ''


def write_temp(path: Path, write: Callable[[BinaryIO], None], tag: str = WRITER,
               check: Optional[Callable[[], None]] = None) -> Path:
    """Write ``path``'s temporary file with ``write`` and fsync it; ``commit`` then makes it ``path``.

    A failed write (full disk, file-size limit, ``check`` raising) raises the error that caused it and
    leaves no temporary file.
    """
    tmp = temp_path(path, tag)
    try:
        with open(tmp, 'wb', buffering=0) as f:
            writer = CheckedWriter(f, check)
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


def atomic_write(path: Path, write: Callable[[BinaryIO], None], tag: str = WRITER) -> None:
    """Replace ``path`` with what ``write`` puts into a fresh file; on error the old file is untouched."""
    commit(write_temp(path, write, tag), path)


def atomic_write_text(path: Path, text: str, tag: str = WRITER) -> None:
    atomic_write(path, lambda f: f.write(text.encode()), tag)


def link_temp(src: Path, dst: Path, tag: str = WRITER) -> Path:
    """A temporary file for ``dst`` with ``src``'s bytes (a hard link, or a copy where links are not supported);
    ``commit`` then makes it ``dst``."""
    tmp = temp_path(dst, tag)
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
    return tmp
