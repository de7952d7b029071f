"""Where a run lives: ``<runs_root>/<run_name>/``. The default runs_root, and what a run name may be (it names
the run's folder on a shared volume and its workload on the cluster)."""

from __future__ import annotations

import os
import re

from prefix.errors import ConfigError


def default_runs_root() -> str:
    """runs_root where none is given: ``$PREFIX_RUNS_ROOT``, else ``./runs``."""
    return os.environ.get('PREFIX_RUNS_ROOT') or './runs'


# A safe path component and a valid Kubernetes name fragment.
RUN_NAME_PATTERN = re.compile(r'^[a-z0-9][a-z0-9._-]*$')
RUN_NAME_MAX_LEN = 63


def validate_run_name(name: str) -> str:
    """Refuse anything that is not a safe path component and a k8s-friendly name."""
    if not name:
        raise ConfigError('run_name is empty: set run_name=<name> (lowercase letters, digits, -, _, .)')
    if len(name) > RUN_NAME_MAX_LEN:
        raise ConfigError(f'run_name {name!r} is {len(name)} characters long; at most {RUN_NAME_MAX_LEN} are allowed')
    if not RUN_NAME_PATTERN.match(name):
        raise ConfigError(
            f'run_name {name!r} is not allowed: use lowercase letters, digits, -, _ and ., starting with a letter or digit',
        )
    return name
