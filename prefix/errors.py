"""The one error type prefix reports to its user: one line, and the exit code that goes with it.

Every entry point (``prefix.train``, ``prefix.data``, ``prefix export``, ...) prints a ``PrefixError``
as ``prefix: <kind>: <message>`` and exits with its ``exit_code``: 2 for a config the user has to
fix, 1 for everything else. Anything that is not a ``PrefixError`` is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager


class PrefixError(Exception):
    """A problem the user can act on; the message is one line that says what to do."""

    exit_code = 1
    kind = 'error'

    def line(self) -> str:
        return f'prefix: {self.kind}: {self}'

    def report(self) -> int:
        """Print the one line on stderr; the exit code."""
        print(self.line(), file=sys.stderr)
        return self.exit_code


class ConfigError(PrefixError):
    """A config key, file or override the user has to fix."""

    exit_code = 2
    kind = 'config error'


class DataError(PrefixError):
    """A dataset that is missing, unreadable, or does not fit the model."""


@contextmanager
def reader_gone_quietly() -> Iterator[None]:
    """Output into a pipe whose reader stopped (``prefix show --json | head``) is no error: the reader has what it wanted."""
    try:
        yield
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's flush at exit would fail again
