"""The console's copy in ``logs/``: the console at once, the file when its volume answers.

``python -m prefix.run.tee PATH [--pipe IN:OUT ...] [--buffer BYTES] [--deadline SECONDS]`` copies each
input fd (default ``0:1``, stdin) to its console fd at once and appends its lines to ``PATH`` from a
thread of their own: a network volume that hangs holds that thread only, never the console and never
the process that prints (``tee`` would stop reading, its pipe would fill, and every print would block).
While the file does not answer, lines queue in memory up to ``BYTES``; beyond, the oldest are dropped
and one line in the file says how many. The copy ignores SIGTERM, SIGINT and SIGPIPE (a stop's last
lines, a launcher killed), flushes what it was given when its inputs close (its writer SIGKILLed
included), and gives up ``SECONDS`` after that if the file still does not answer, so that it never
keeps a pod alive. Imports the standard library only: it starts once per rank, and once in a pod.
"""

from __future__ import annotations

import io
import os
import select
import signal
import sys
import threading
import time
from collections import deque

BUFFER_BYTES = 4 << 20  # what waits for a hung volume; beyond, the oldest lines are dropped
DEADLINE_S = 10.0  # how long the file may still take once the inputs have closed
RETRY_S = 1.0  # between tries of a file that failed
_CHUNK = 1 << 16
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
USAGE = 'usage: python -m prefix.run.tee PATH [--pipe IN:OUT ...] [--buffer BYTES] [--deadline SECONDS]'


def _ignore_signals() -> None:
    # From before the exec: a SIGTERM/SIGINT to the process group during the interpreter's start-up.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)


def tee_output(path: str | os.PathLike[str]) -> str | os.PathLike[str]:
    """Copy this process's stdout and stderr into ``path`` (``logs/rank{rank}.log``) as well.

    The ``composer`` launcher discards the output of ranks other than 0, so each rank keeps its own
    copy. A child (not a thread) flushes what it was given even if we are SIGKILLed; one child takes
    both streams, so their lines reach the file whole and in the order they came.
    """
    import subprocess

    sys.stdout.flush()
    sys.stderr.flush()
    out_read, out_write = os.pipe()
    err_read, err_write = os.pipe()
    subprocess.Popen(
        [sys.executable, '-m', 'prefix.run.tee', os.path.abspath(path), '--pipe', '0:1', '--pipe', f'{err_read}:2',
         '--buffer', str(BUFFER_BYTES), '--deadline', str(DEADLINE_S)],
        stdin=out_read,
        pass_fds=(err_read,),
        preexec_fn=_ignore_signals,
        close_fds=True,
        cwd=_ROOT,  # where this prefix was imported from, whatever the working directory
    )
    for read, write, fd in ((out_read, out_write, 1), (err_read, err_write, 2)):
        os.close(read)
        os.dup2(write, fd)
        os.close(write)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    sys.stderr.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    return path


def _count(data: bytes) -> int:
    """Lines in ``data``: a piece of a line (too long to wait for its end, or the last) counts as one."""
    return data.count(b'\n') + (not data.endswith(b'\n')) if data else 0


def _lines(n: int) -> str:
    return f'{n} line' if n == 1 else f'{n} lines'


class FileCopy:
    """Lines queued for ``path`` and the thread that appends them, so that only that thread waits on its volume."""

    def __init__(self, path: str, bound: int) -> None:
        self.path = path
        self.bound = bound
        self.failed = False  # a write failed: said on the console
        self._cond = threading.Condition()
        self._queue: deque[bytes] = deque()
        self._queued = 0  # bytes in _queue
        self._writing = 0  # lines the thread is writing now
        self._dropped = 0  # lines not copied, not yet said in the file
        self._error = ''  # why, when a write failed rather than waited
        self._closed = False
        self._file: io.FileIO | None = None
        self._unwritten = memoryview(b'')
        self._line_start = True
        self.thread = threading.Thread(target=self._run, name='file-copy', daemon=True)

    def put(self, data: bytes) -> None:
        with self._cond:
            self._queue.append(data)
            self._queued += len(data)
            while self._queued > self.bound:  # the oldest lines go, whole
                head = self._queue[0]
                cut = head.find(b'\n', self._queued - self.bound - 1) + 1 or len(head)
                self._dropped += _count(head[:cut])
                self._queued -= cut
                if cut == len(head):
                    self._queue.popleft()
                else:
                    self._queue[0] = head[cut:]
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    def not_copied(self) -> int:
        with self._cond:
            return self._dropped + self._writing + sum(map(_count, self._queue))

    def _run(self) -> None:
        try:  # at once, as tee does: the file is there before the first line (readers wait for it to appear)
            self._file = open(self.path, 'ab', buffering=0)  # noqa: SIM115  (open until the process ends)
        except OSError:
            pass  # tried again with the first line
        while True:
            with self._cond:
                while not (self._queue or self._dropped or self._closed):
                    self._cond.wait()
                if not (self._queue or self._dropped):
                    return
                data, self._queue, self._queued = b''.join(self._queue), deque(), 0
                dropped, self._dropped, error, self._error = self._dropped, 0, self._error, ''
                self._writing = dropped + _count(data)
            marker = b''
            if dropped:
                why = f': {error}' if error else ' while its volume did not answer'
                marker = (b'' if self._line_start else b'\n') + \
                    f'[prefix: {_lines(dropped)} not copied to this file{why}]\n'.encode()
            try:
                if self._file is None:
                    self._file = open(self.path, 'ab', buffering=0)  # noqa: SIM115  (open until the process ends)
                if marker:
                    self._append(marker)
                    dropped = 0
                self._append(data)
            except OSError as e:
                lost = _count(data) if dropped or self._file is None else _count(self._unwritten.tobytes())
                self._reopen()
                with self._cond:
                    self._dropped, self._writing = self._dropped + dropped + lost, 0
                    self._error = f'{type(e).__name__}: {e.strerror or e}'
                if not self.failed:
                    self.failed = True
                    _say(f'prefix: cannot copy the console into {self.path} ({self._error}): '
                         f'the console goes on, the file gets its lines when it can')
                time.sleep(RETRY_S)
            finally:
                with self._cond:
                    self._writing = 0

    def _reopen(self) -> None:
        # At the next try: a file handle that failed may stay failed (a stale NFS handle).
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None

    def _append(self, data: bytes) -> None:
        assert self._file is not None
        self._unwritten = view = memoryview(data)
        while view:
            written = os.write(self._file.fileno(), view)
            self._line_start = view[written - 1] == ord('\n')
            self._unwritten = view = view[written:]


def _say(line: str) -> None:
    try:
        os.write(2, (line + '\n').encode())
    except OSError:
        pass


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:  # a console that another process made non-blocking: wait as a blocking one would
            select.select([], [fd], [])


def relay(pipes: dict[int, int], copy: FileCopy) -> None:
    """Each input to its console as it comes, its whole lines to ``copy``, until every input has closed."""
    consoles: dict[int, int | None] = dict(pipes)
    partial = {fd: b'' for fd in pipes}
    poll = select.poll()
    for fd in pipes:
        poll.register(fd, select.POLLIN)
    while consoles:
        for fd, _ in poll.poll():
            try:
                data = os.read(fd, _CHUNK)
            except OSError:
                data = b''
            if not data:
                poll.unregister(fd)
                del consoles[fd]
                if partial[fd]:
                    copy.put(partial[fd])
                continue
            out = consoles[fd]
            if out is not None:
                try:
                    _write_all(out, data)
                except OSError:  # the console went away (its reader killed): the file goes on
                    consoles[fd] = None
            data = partial[fd] + data
            end = data.rfind(b'\n') + 1
            if len(data) - end >= _CHUNK:  # a line too long to wait for its end
                end = len(data)
            partial[fd] = data[end:]
            if end:
                copy.put(data[:end])


def main(argv: list[str]) -> int:
    _ignore_signals()
    path, pipes, bound, deadline = argv[0], {}, BUFFER_BYTES, DEADLINE_S
    options = iter(argv[1:])
    for option in options:
        value = next(options, '')
        if not value:
            raise SystemExit(f'prefix.run.tee: {option} needs a value')
        if option == '--pipe':
            read, write = map(int, value.split(':'))
            pipes[read] = write
        elif option == '--buffer':
            bound = int(value)
        elif option == '--deadline':
            deadline = float(value)
        else:
            raise SystemExit(f'prefix.run.tee: unknown option {option}')
    copy = FileCopy(path, bound)
    copy.thread.start()
    relay(pipes or {0: 1}, copy)
    copy.close()
    copy.thread.join(deadline)
    if copy.thread.is_alive():
        _say(f'prefix: {path} did not answer for {deadline:g} s after the output ended: '
             f'{_lines(copy.not_copied())} not copied to it')
        os._exit(1)  # the thread may be in a write that never returns
    return 1 if copy.failed else 0


if __name__ == '__main__':
    if len(sys.argv) < 2 or sys.argv[1].startswith('-'):
        raise SystemExit(USAGE)
    sys.exit(main(sys.argv[1:]))
