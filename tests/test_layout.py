"""The code's layout: packages import only downward, each ``__init__`` names what it offers, ``prefix runs`` is torch-free."""

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

# Bottom to top: a package imports only from those before it (and from itself); prefix's top-level modules
# (train, cli, chaos, schedule) may import any of them.
LAYERS = ['errors', 'files', 'config', 'distributed', 'run', 'checkpoint', 'data', 'models', 'trackers']
PACKAGE = REPO / 'prefix'


def imported(path: Path) -> set[str]:
    """The prefix modules ``path`` imports, wherever in the file (a function's lazy import counts)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith('prefix.'):
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith('prefix.'))
    return names


def test_packages_import_only_downward() -> None:
    wrong = []
    for path in PACKAGE.rglob('*.py'):
        parts = path.relative_to(PACKAGE).with_suffix('').parts
        own = parts[0]
        if own not in LAYERS:
            continue  # a top-level module: the story (train) and the commands built on the packages
        for name in imported(path):
            other = name.split('.')[1]
            if other in LAYERS and LAYERS.index(other) > LAYERS.index(own):
                wrong.append(f'{path.relative_to(REPO)} imports {name}')
    assert not wrong
    assert {p.name for p in PACKAGE.iterdir() if (p / '__init__.py').exists()} == set(LAYERS[1:])


@pytest.mark.parametrize('package', LAYERS[1:])
def test_every_name_a_package_offers_is_there(package: str) -> None:
    module = importlib.import_module(f'prefix.{package}')
    offered = dir(module)
    assert offered, f'prefix.{package} offers nothing'
    for name in offered:
        assert getattr(module, name) is not None
    with pytest.raises(AttributeError, match='no attribute'):
        module.not_a_name  # noqa: B018


def test_listing_runs_imports_neither_torch_nor_omegaconf() -> None:
    """``prefix runs`` reads hundreds of runs in well under a second: it must not pay for torch's import."""
    code = 'import sys, prefix.run.runs; print(sorted(m for m in ("torch", "composer", "omegaconf") if m in sys.modules))'
    out = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == '[]'
