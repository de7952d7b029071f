"""A stand-in for the ``runai`` CLI: each version knows only the subcommands and flags its reference documents.

It refuses any other flag as cobra does (``Error: unknown flag: --x``, exit 1), and a value its flag
does not take as the CLI does (``Error: invalid argument "two" for "--gpu-devices-request" flag``:
numbers, Kubernetes quantities, Go durations, ``KEY=VALUE``, a non-negative worker count), answers ``--help``
with the flags it knows, and keeps workloads between calls in a state file: a submission exists
from then on, a delete leaves the name in ``Deleting`` for a few more calls, ``describe -o json``
prints the workload with a top-level status and its pods' own statuses nested.

A workload has a kind, the command group that submitted it (``training``, ``training pytorch``,
``distributed``; ``training`` for one in the state file without a ``kind``): the current CLI's
describe, delete and logs of one kind do not find a workload of another, while its name is taken for
all kinds; an ``output`` there is what its describe prints instead of JSON. The older CLI's
``describe job``, ``delete job`` and ``logs`` take a job of any kind. A workload that is not there:
the older CLI prints ``The job NAME does not exist in project P. ...`` on
stdout, exit 1 (run-ai/runai-cli ``cmd/util/util.go``, ``GetJobDoesNotExistsInNamespaceError``, which
``runai describe job`` prints with ``fmt.Println``); the current CLI's reference documents no message,
so this one prints ``Error: workload NAME not found`` on stderr, exit 1 (an assumption).

Environment: ``FAKE_RUNAI_VERSION`` (below), ``FAKE_RUNAI_STATE`` (the state file), ``RUNAI_LOG``
(every call's arguments, one JSON list a line), ``FAKE_RUNAI_ERRORS`` (a JSON object from a command,
``"training pytorch describe"``, to the error it fails with instead, exit 1: not logged in, the API
down; on stderr as ``Error: ...``, on stdout for the older CLI). A submission's workload in the state
file holds its ``spec`` as the cluster would store it: each pod environment variable with its
``value``, or with the ``secret`` and ``key`` it is read from.

Where each flag list comes from (the Run:ai CLI reference):
- 2.22: docs.nvidia.com/run-ai self-hosted CLI reference (``runai training pytorch submit``; its
  master flags as on the same release's xgboost page: ``--master-environment-variable``,
  ``--master-cpu-core-request``, ``--master-cpu-memory-request``, ``--preemptibility``), and
  ``runai training submit``, ``describe``, ``delete``, ``logs``. ``--env-secret`` ("Set an environment
  variable from a Kubernetes secret. Format: ENV_VARIABLE=secret-name,key=secret-key") as on the same
  reference's ``runai training xgboost submit`` and ``runai inference standard submit`` pages; the
  reference has no master-pod form of it.
- 2.20: github.com/run-ai/docs ``docs/Researcher/cli-reference/new-cli/runai_pytorch_submit.md`` and
  ``runai_training_submit.md`` (commit 090b17d): ``--master-environment``, ``--master-command``,
  no master CPU or memory flags, ``-e`` is ``--environment``.
- 2.18: the same repository's ``runai_distributed_submit.md`` (commit 990c712): distributed
  workloads are ``runai distributed submit --framework PyTorch``, with ``runai distributed describe``
  (commit b20d043), ``delete`` and ``logs``; ``runai training submit`` has no
  ``--termination-grace-period`` (commit 7b38f49).
- 2.16: the same repository's ``runai-submit.md`` and ``runai-submit-dist-pytorch.md`` (2.10 and
  later): ``--name``, ``--pvc-exists``, ``--cpu``, ``--memory``, ``--preemptible`` (submit only),
  ``runai describe job NAME -o json``, ``runai delete job``, ``runai logs``. A secret passes as
  ``-e <ENV-VARIABLE>=SECRET:<secret-name>,<secret-key>`` (the same repository's
  ``docs/Researcher/best-practices/secrets-as-env-var-in-cli.md`` and ``docs/admin/workloads/secrets.md``).
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

BOOL = object()  # a flag that takes no value

COMMON_NEW = {'-p': '--project', '-i': '--image', '-g': '--gpu-devices-request', '--cpu-core-request': 1,
              '--cpu-memory-request': 1, '--node-pools': 1, '--existing-pvc': 1, '--working-dir': 1,
              '--large-shm': BOOL, '--command': BOOL, '--project': 1, '--image': 1, '--gpu-devices-request': 1}
NEW_22 = {
    ('training', 'submit'): {**COMMON_NEW, '-e': '--environment-variable', '--environment-variable': 1,
                             '--env-secret': 1, '--termination-grace-period': 1, '--preemptibility': 1},
    ('training', 'pytorch', 'submit'): {**COMMON_NEW, '-e': '--environment-variable', '--environment-variable': 1,
                                        '--env-secret': 1, '--termination-grace-period': 1, '--workers': 1,
                                        '--no-master': BOOL,
                                        '--master-command': 1, '--master-args': 1, '--master-gpu-devices-request': 1,
                                        '--master-cpu-core-request': 1, '--master-cpu-memory-request': 1,
                                        '--master-environment-variable': 1},
}
NEW_20 = {
    ('training', 'submit'): {**COMMON_NEW, '-e': '--environment', '--environment': 1, '--termination-grace-period': 1},
    ('training', 'pytorch', 'submit'): {**COMMON_NEW, '-e': '--environment', '--environment': 1,
                                        '--termination-grace-period': 1, '--workers': 1, '--no-master': BOOL,
                                        '--master-command': 1, '--master-args': 1, '--master-gpu-devices-request': 1,
                                        '--master-environment': 1},
}
NEW_18 = {
    ('training', 'submit'): {**COMMON_NEW, '-e': '--environment', '--environment': 1},
    ('distributed', 'submit'): {**COMMON_NEW, '-e': '--environment', '--environment': 1, '-f': '--framework',
                                '--framework': 1, '--workers': 1, '--master-args': 1, '--master-gpu-devices-request': 1},
}
QUERIES_NEW = {
    ('training', 'describe'): {'-p': '--project', '--project': 1, '-o': '--output', '--output': 1},
    ('training', 'pytorch', 'describe'): {'-p': '--project', '--project': 1, '-o': '--output', '--output': 1},
    ('training', 'delete'): {'-p': '--project', '--project': 1},
    ('training', 'pytorch', 'delete'): {'-p': '--project', '--project': 1},
    ('training', 'logs'): {'-p': '--project', '--project': 1, '-f': '--follow', '--follow': BOOL},
    ('training', 'pytorch', 'logs'): {'-p': '--project', '--project': 1, '-f': '--follow', '--follow': BOOL},
}
COMMON_OLD = {'--name': 1, '-p': '--project', '--project': 1, '-i': '--image', '--image': 1, '-g': '--gpu', '--gpu': 1,
              '--cpu': 1, '--memory': 1, '--node-pools': 1, '--pvc-exists': 1, '-e': '--environment', '--environment': 1,
              '--working-dir': 1, '--large-shm': BOOL, '--command': BOOL}
OLD_16 = {
    ('submit',): {**COMMON_OLD, '--interactive': BOOL, '--preemptible': BOOL},
    ('submit-dist', 'pytorch'): {**COMMON_OLD, '--workers': 1},
    ('describe', 'job'): {'-p': '--project', '--project': 1, '-o': '--output', '--output': 1},
    ('delete', 'job'): {'-p': '--project', '--project': 1},
    ('logs',): {'--project': 1, '-f': '--follow', '--follow': BOOL},
}
QUERIES_18 = {(('distributed' if path[1] == 'pytorch' else 'training'), path[-1]): flags
              for path, flags in QUERIES_NEW.items()}  # no 'runai training pytorch' yet
VERSIONS = {'2.22': {**NEW_22, **QUERIES_NEW}, '2.20': {**NEW_20, **QUERIES_NEW}, '2.18': {**NEW_18, **QUERIES_18},
            '2.16': OLD_16}
NUMBER = re.compile(r'^\d+(\.\d+)?$')
QUANTITY = re.compile(r'^\d+(\.\d+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$')  # Kubernetes resource quantity
DURATION = re.compile(r'^(\d+(\.\d+)?(ns|us|ms|s|m|h))+$')  # Go's time.ParseDuration
KEY_VALUE = re.compile(r'^[A-Za-z_][A-Za-z0-9_]*=')
SECRET_NAME, SECRET_KEY = r'[a-z0-9]([-a-z0-9.]*[a-z0-9])?', r'[-._a-zA-Z0-9]+'  # a Kubernetes secret's name; a key of its data
ENV_SECRET = re.compile(rf'^(?P<env>[A-Za-z_][A-Za-z0-9_]*)=(?P<secret>{SECRET_NAME}),key=(?P<key>{SECRET_KEY})$')
# The older CLI's -e: KEY=VALUE, where a value that starts with SECRET: must be the documented secret reference.
OLD_SECRET = re.compile(rf'^(?P<env>[A-Za-z_][A-Za-z0-9_]*)=SECRET:(?P<secret>{SECRET_NAME}),(?P<key>{SECRET_KEY})$')
OLD_ENVIRONMENT = re.compile(rf'^[A-Za-z_][A-Za-z0-9_]*=(?!SECRET:)|{OLD_SECRET.pattern}')
PVC = re.compile(r'^claimname=[a-z0-9.-]+,path=/\S*$')
VALUES = {  # what each flag's value must look like, and why the CLI refuses one that does not
    **dict.fromkeys(['--gpu-devices-request', '--gpu', '--master-gpu-devices-request', '--cpu-core-request', '--cpu',
                     '--master-cpu-core-request'], (NUMBER, 'strconv.ParseFloat: invalid syntax')),
    **dict.fromkeys(['--cpu-memory-request', '--memory', '--master-cpu-memory-request'],
                    (QUANTITY, 'quantities must match the regular expression')),
    '--termination-grace-period': (DURATION, 'time: invalid duration'),
    '--workers': (re.compile(r'^\d+$'), 'must be a non-negative whole number'),
    **dict.fromkeys(['--environment-variable', '--master-environment', '--master-environment-variable'],
                    (KEY_VALUE, 'expected KEY=VALUE')),
    '--environment': (OLD_ENVIRONMENT, 'expected KEY=VALUE, or KEY=SECRET:secret-name,secret-key'),
    '--env-secret': (ENV_SECRET, 'expected ENV_VARIABLE=secret-name,key=secret-key'),
    **dict.fromkeys(['--existing-pvc', '--pvc-exists'], (PVC, 'expected claimname=NAME,path=PATH')),
    '--preemptibility': (re.compile(r'^(preemptible|non-preemptible)$'), 'expected preemptible or non-preemptible'),
}
DELETE_TAKES = 1  # describe calls that still see a deleted workload (Deleting) before it is gone: one wait


def parse(flags: dict, args: list[str]) -> tuple[list[str], dict[str, list[str]], list[str]]:
    """Positional arguments, flags (long names) and the command after ``--``; exit 1 on an unknown flag."""
    positional, seen, command = [], {}, []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == '--':
            command = args[i + 1:]
            break
        if arg.startswith('-'):
            name, _, inline = arg.partition('=')
            kind = flags.get(name)
            if isinstance(kind, str):  # a short alias
                name, kind = kind, flags[kind]
            if kind is None:
                print(f'Error: unknown flag: {name}', file=sys.stderr)
                sys.exit(1)
            if kind is BOOL:
                seen.setdefault(name, []).append('true')
            else:
                if not inline:
                    i += 1
                    if i >= len(args):
                        print(f'Error: flag needs an argument: {name}', file=sys.stderr)
                        sys.exit(1)
                    inline = args[i]
                pattern, why = VALUES.get(name, (None, ''))
                if pattern is not None and not pattern.match(inline):
                    print(f'Error: invalid argument "{inline}" for "{name}" flag: {why}', file=sys.stderr)
                    sys.exit(1)
                seen.setdefault(name, []).append(inline)
        else:
            positional.append(arg)
        i += 1
    return positional, seen, command


def spec_of(version: str, seen: dict[str, list[str]]) -> dict[str, list[dict[str, str]]]:
    """The pods' environment as the workload's spec holds it: a value in plain text, or a secret's name and key."""
    def variable(flag: str, text: str) -> dict[str, str]:
        ref = ENV_SECRET.match(text) if flag == '--env-secret' else OLD_SECRET.match(text) if version == '2.16' else None
        if ref:
            return {'name': ref['env'], 'secret': ref['secret'], 'key': ref['key']}
        name, _, value = text.partition('=')
        return {'name': name, 'value': value}

    roles = {'environment': ['--environment', '--environment-variable', '--env-secret'],
             'master_environment': ['--master-environment', '--master-environment-variable']}
    return {role: [variable(flag, text) for flag in flags for text in seen.get(flag, [])] for role, flags in roles.items()}


def not_found(name: str, seen: dict[str, list[str]], old: bool) -> int:
    """No workload of this name (and kind): what the CLI prints, exit 1."""
    if old:
        project = seen.get('--project', ['default'])[-1]
        print(f'The job {name} does not exist in project {project}. If the job exists in a different project, '
              'use -p <project name>.')
    else:
        print(f'Error: workload {name} not found', file=sys.stderr)
    return 1


def main() -> int:
    args = sys.argv[1:]
    with open(os.environ['RUNAI_LOG'], 'a') as log:
        log.write(json.dumps(args) + '\n')
    version = os.environ.get('FAKE_RUNAI_VERSION', '2.22')
    commands = VERSIONS[version]
    path = next((p for p in sorted(commands, key=len, reverse=True) if tuple(args[:len(p)]) == p), None)
    if path is None:
        print(f'Error: unknown command "{" ".join(args[:2])}" for "runai"', file=sys.stderr)
        return 1
    flags = commands[path]
    rest = args[len(path):]
    if '--help' in rest or '-h' in rest:
        print(f'Usage:\n  runai {" ".join(path)} [flags]\n\nFlags:')
        for name, kind in sorted(flags.items()):
            if name.startswith('--'):
                short = next((s for s, long in flags.items() if long == name), None)
                print(f'  {short + ", " if short else "    "}{name}{"" if kind is BOOL else " string"}')
        return 0
    positional, seen, command = parse(flags, rest)
    old = version == '2.16'
    error = json.loads(os.environ.get('FAKE_RUNAI_ERRORS') or '{}').get(' '.join(path))
    if error is not None:
        print(error if old else f'Error: {error}', file=sys.stdout if old else sys.stderr)
        return 1
    state_file = Path(os.environ['FAKE_RUNAI_STATE'])
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    name = seen.get('--name', positional)[0] if (seen.get('--name') or positional) else None
    verb = next(v for v in ('submit', 'describe', 'delete', 'logs') if any(part.startswith(v) for part in path))
    kind = ' '.join(path[:-1])
    workload = state.get(name)
    if verb == 'submit':
        if workload is not None:  # a name is taken whatever the workload's kind
            print(f'Error: workload {name} already exists', file=sys.stderr)
            return 1
        state[name] = {'status': 'Pending', 'kind': kind, 'args': args, 'spec': spec_of(version, seen)}
        state_file.write_text(json.dumps(state))
        return 0
    if workload is not None and not old and workload.get('kind', 'training') != kind:
        workload = None  # another kind's: the current CLI's commands of this kind do not see it
    if verb == 'describe':
        if workload is None or (workload['status'] == 'Deleting' and workload['left'] <= 0):
            if workload is not None:
                del state[name]
                state_file.write_text(json.dumps(state))
            return not_found(name, seen, old)
        if workload['status'] == 'Deleting':
            workload['left'] -= 1
        pods = [{'name': f'{name}-{role}-0', 'status': workload.get('pods', workload['status'])}
                for role in ('master', 'worker')]
        key = 'instances' if version == '2.16' else 'pods'
        print(workload.get('output') or json.dumps({'name': name, 'status': workload['status'], key: pods,
                                                    'conditions': [{'type': 'Running', 'status': 'True'}]}))
    elif verb == 'delete':
        if workload is None:
            return not_found(name, seen, old)
        workload.update(status='Deleting', left=DELETE_TAKES)
    state_file.write_text(json.dumps(state))
    return 0


if __name__ == '__main__':
    sys.exit(main())
