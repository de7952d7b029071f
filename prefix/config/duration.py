"""Durations, parsed once: ``200ba``, ``2ep``, ``5000tok``, ``64sp`` (training time) or ``90s``, ``10min``, ``1h``.

A config key's field says which units it takes (``config.units``); everything that measures or
compares a duration (checkpoint intervals, timeouts, whether a checkpoint reached ``max_duration``,
``prefix runs``) works on this one type. Torch-free: ``prefix runs`` imports it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

SECONDS = {'s': 1, 'min': 60, 'h': 3600}  # wall-clock units
PROGRESS = {'ba': 'batch', 'ep': 'epoch', 'tok': 'token', 'sp': 'sample'}  # units of training time: Composer's timestamp keys


@dataclass(frozen=True)
class Duration:
    number: int
    unit: str

    @classmethod
    def parse(cls, text: str) -> Duration:
        """ValueError unless ``text`` is a whole number followed by a known unit."""
        match = re.fullmatch(r'(\d+)([a-z]+)', str(text).strip())
        if not match or match.group(2) not in (*SECONDS, *PROGRESS):
            raise ValueError(f'{text!r} is not a duration')
        return cls(int(match.group(1)), match.group(2))

    def __str__(self) -> str:
        return f'{self.number}{self.unit}'

    @property
    def is_wall_clock(self) -> bool:
        return self.unit in SECONDS

    @property
    def seconds(self) -> float:
        if not self.is_wall_clock:
            raise ValueError(f'{self} is training time, not wall-clock time')
        return float(self.number * SECONDS[self.unit])

    @property
    def batches(self) -> Optional[int]:
        """The number of batches, for a duration in batches; None otherwise."""
        return self.number if self.unit == 'ba' else None

    def reached(self, timestamp: dict[str, int]) -> bool:
        """Whether a Composer timestamp (``{'batch': ..., 'epoch': ..., ...}``) has reached this training time."""
        return timestamp[PROGRESS[self.unit]] >= self.number
