"""prefix: training on Composer and Streaming whose runs survive preemption.

Each package's ``__init__`` names what the rest of the code may use, and loads each name from its
module on first use (PEP 562): ``prefix runs`` imports the run directory's readers without torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def exports(package: str, **modules: list[str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package``, whose ``modules`` (keyword: module, value: its names) it offers."""
    home = {name: module for module, names in modules.items() for name in names}

    def __getattr__(name: str) -> Any:
        if name not in home:
            raise AttributeError(f'module {package!r} has no attribute {name!r}')
        return getattr(importlib.import_module(f'{package}.{home[name]}'), name)

    def __dir__() -> list[str]:
        return sorted(home)

    return __getattr__, __dir__
