"""The Run:ai side: shell scripts pass shellcheck; the pod command preempts and resumes for real;
submit_train.sh issues the right runai commands (a stand-in runai records them)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, faults, group_gone, starts, step_losses, wait_for

SCRIPTS = sorted(REPO.glob('runai/*.sh')) + [REPO / '.ci' / 'run']


def test_shellcheck() -> None:
    shellcheck = Path(sys.executable).parent / 'shellcheck'
    result = subprocess.run([str(shellcheck), *map(str, SCRIPTS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def pod_env(runs_root: Path) -> dict[str, str]:
    env = dict(os.environ, PREFIX_RUNS_ROOT=str(runs_root), PREFIX_GPUS='1')
    env['PATH'] = f'{Path(sys.executable).parent}:{env["PATH"]}'
    return env


@pytest.mark.slow
def test_pod_command_forwards_sigterm_and_resumes(tmp_path: Path, dataset: Path) -> None:
    cmd = ['bash', str(REPO / 'runai' / 'pod_train.sh'), 'pod-run', str(REPO / 'yamls' / 'smoke.yaml'),
           f'data.local={dataset}', 'max_duration=30ba', 'checkpoint.interval=1h', 'checkpoint.periodic_interval=null']
    run = tmp_path / 'pod-run'
    held, release = tmp_path / 'held', tmp_path / 'release'
    hold = {'op': 'step', 'step': 6, 'marker': str(held), 'block': True, 'release': str(release)}
    pod = subprocess.Popen(cmd, env={**pod_env(tmp_path), **faults(hold)}, cwd=REPO, start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(held.exists, pod, 'step 6')
    pod.send_signal(signal.SIGTERM)  # what Kubernetes does: the first process only
    wait_for(lambda: 'SIGTERM received: saving' in (run / 'logs' / 'rank0.log').read_text(), pod, 'the signal is forwarded')
    release.touch()
    assert pod.wait(timeout=120) != 0
    assert group_gone(pod.pid, timeout=120), 'nothing of the run is left running'
    step = torch.load(run / 'checkpoints' / 'latest.pt', weights_only=True)['global_step']
    assert step == max(step_losses(run)) + 1 == 6
    log = (run / 'logs' / 'pod-0.log').read_text()
    assert 'SIGTERM received, forwarding it' in log and 'preempted at step 6' in log

    again = subprocess.run(cmd, env=pod_env(tmp_path), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:]
    assert [s['start_step'] for s in starts(run)] == [0, step]
    assert sorted(step_losses(run)) == list(range(30))


FAKE_RUNAI = '''#!{python}
import json, os, sys
args = sys.argv[1:]
with open(os.environ['RUNAI_LOG'], 'a') as log:
    log.write(json.dumps(args) + '\\n')
if os.environ.get('FAKE_GEN') == 'old' and args[:1] == ['training']:
    sys.exit(1)
if 'describe' in args:
    status = os.environ.get('FAKE_STATUS')
    if not status:
        print('workload not found', file=sys.stderr)
        sys.exit(1)
    print(json.dumps({{'name': args[-3], 'status': status}}))
'''


def submit(tmp_path: Path, *args: str, runai: bool = True, **env: str) -> tuple[subprocess.CompletedProcess, list]:
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir(exist_ok=True)
    if runai:
        fake = bin_dir / 'runai'
        fake.write_text(FAKE_RUNAI.format(python=sys.executable))
        fake.chmod(0o755)
    log = tmp_path / 'runai.log'
    log.write_text('')
    full_env = {'PATH': f'{bin_dir}:/usr/bin:/bin', 'RUNAI_LOG': str(log), 'HOME': str(tmp_path), **env}
    result = subprocess.run(['bash', str(REPO / 'runai' / 'submit_train.sh'), *args], cwd=REPO, env=full_env,
                            capture_output=True, text=True, timeout=30)
    return result, [json.loads(line) for line in log.read_text().splitlines()]


def value(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def test_single_node_current_cli(tmp_path: Path) -> None:
    result, calls = submit(tmp_path, '--project', 'team', 'exp1', 'yamls/smoke.yaml', 'optimizer.lr=1e-3',
                           'model.dropout=0.2')
    assert result.returncode == 0, result.stderr
    assert calls[0] == ['training', '--help'] and calls[1][:3] == ['training', 'describe', 'exp1']
    sub = calls[-1]
    assert sub[:3] == ['training', 'submit', 'exp1'] and len(calls) == 3
    assert value(sub, '-p') == 'team' and value(sub, '-i') == 'prefix:latest' and value(sub, '-g') == '1'
    assert value(sub, '--existing-pvc') == 'claimname=home-apluser,path=/home/apluser'
    assert value(sub, '--working-dir') == '/home/apluser/prefix'
    assert 'PREFIX_RUNS_ROOT=/home/apluser/runs' in sub and 'PREFIX_NNODES=1' in sub
    assert sub[sub.index('--command'):] == ['--command', '--', 'bash', 'runai/pod_train.sh', 'exp1', 'yamls/smoke.yaml',
                                            'optimizer.lr=1e-3', 'model.dropout=0.2']


def test_several_nodes_current_cli(tmp_path: Path) -> None:
    result, calls = submit(tmp_path, '--nodes', '3', '--gpus', '8', '--node-pool', 'h100', '--env', 'WANDB_MODE=offline',
                           'big-run', PREFIX_IMAGE='registry/prefix:1.2')
    assert result.returncode == 0, result.stderr
    sub = calls[-1]
    assert sub[:4] == ['training', 'pytorch', 'submit', 'big-run']
    assert value(sub, '--workers') == '2' and value(sub, '--master-gpu-devices-request') == '8' and value(sub, '-g') == '8'
    assert value(sub, '--node-pools') == 'h100' and value(sub, '-i') == 'registry/prefix:1.2'
    assert {'PREFIX_NNODES=3', 'PREFIX_GPUS=8', 'WANDB_MODE=offline'} <= set(sub)
    assert sub[-3:] == ['runai/pod_train.sh', 'big-run', 'yamls/base.yaml']


@pytest.mark.parametrize(('nodes', 'head'), [('1', ['submit', 'r1']), ('2', ['submit-dist', 'pytorch', 'r1'])])
def test_older_cli(tmp_path: Path, nodes: str, head: list[str]) -> None:
    result, calls = submit(tmp_path, '--nodes', nodes, 'r1', 'x.y=1', FAKE_GEN='old')
    assert result.returncode == 0, result.stderr
    assert calls[1][:3] == ['describe', 'job', 'r1']
    sub = calls[-1]
    assert sub[:len(head)] == head and '--preemptible' in sub and value(sub, '--cpu') == '8'
    assert sub[-2:] == ['yamls/base.yaml', 'x.y=1']


def test_a_finished_workload_is_replaced(tmp_path: Path) -> None:
    result, calls = submit(tmp_path, 'exp1', FAKE_STATUS='Completed')
    assert result.returncode == 0, result.stderr
    assert [c[:2] for c in calls[1:]] == [['training', 'describe'], ['training', 'delete'], ['training', 'submit']]
    result, calls = submit(tmp_path, 'exp1', FAKE_STATUS='Failed')
    assert result.returncode == 0 and calls[-1][:2] == ['training', 'submit']


def test_an_active_workload_is_left_alone(tmp_path: Path) -> None:
    result, calls = submit(tmp_path, 'exp1', FAKE_STATUS='Running')
    assert result.returncode == 1 and 'still active' in result.stderr
    assert not any(c[1] in ('delete', 'submit') for c in calls[1:])


def test_workload_names_are_valid_and_stable(tmp_path: Path) -> None:
    import re

    names = set()
    for run_name in ('my_run.1', 'my_run.1', 'my-run-1', 'a' * 63):
        result, calls = submit(tmp_path, run_name)
        assert result.returncode == 0, result.stderr
        name = calls[-1][2]
        assert re.fullmatch(r'[a-z0-9]([a-z0-9-]*[a-z0-9])?', name) and len(name) <= 40
        names.add(name)
    assert len(names) == 3, 'same run name, same workload; different run names, different workloads'


def test_dry_run_submits_nothing(tmp_path: Path) -> None:
    result, calls = submit(tmp_path, '--dry-run', 'exp1', 'yamls/smoke.yaml', 'a.b=1')
    assert result.returncode == 0
    assert 'runai training submit exp1' in result.stdout and 'runai/pod_train.sh exp1 yamls/smoke.yaml a.b=1' in result.stdout
    assert all(c[0] != 'submit' and c[1:2] != ['submit'] and 'describe' not in c for c in calls)


@pytest.mark.parametrize(('args', 'message'), [
    ((), 'a run name is required'),
    (('../x',), "run name '../x' is not allowed"),
    (('Bad Name',), 'is not allowed'),
    (('exp1', 'yamls/missing.yaml'), 'config file yamls/missing.yaml does not exist'),
    (('exp1', 'yamls/base.yaml', 'oops'), "'oops' is not of the form key=value"),
    (('exp1', 'runs_root=/tmp'), 'cannot be overridden'),
    (('--gpus', 'two', 'exp1'), '--gpus must be a positive whole number'),
    (('--env', 'novalue', 'exp1'), 'is not of the form KEY=VALUE'),
    (('--bogus', 'exp1'), 'unknown option --bogus'),
])
def test_bad_input_never_reaches_runai(tmp_path: Path, args: tuple, message: str) -> None:
    result, calls = submit(tmp_path, *args)
    assert result.returncode == 2 and message in result.stderr
    assert calls == []


def test_no_runai_on_path(tmp_path: Path) -> None:
    result, calls = submit(tmp_path, 'exp1', runai=False)
    assert result.returncode == 1 and 'runai CLI is not on PATH' in result.stderr
