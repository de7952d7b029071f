"""The Run:ai side: shell scripts pass shellcheck; the pod command preempts and resumes for real;
submit_train.sh issues the right runai commands (a stand-in runai records them)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, assert_same_training, faults, free_port, group_gone, starts, step_losses, wait_for

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


NODE = 'mount -t tmpfs -o size=256m tmpfs /dev/shm && exec "$@"'


def pods(runs: Path, tmp: Path, args: list[str], env: dict[str, str] | None = None) -> list[subprocess.Popen]:
    """Two pods of a PyTorch workload on loopback, as the operator starts them: each its own /dev/shm."""
    port = str(free_port())
    started = []
    for rank in (0, 1):
        (tmp / f'pod{rank}-tmp').mkdir(exist_ok=True)
        operator = {'RANK': str(rank), 'WORLD_SIZE': '2', 'PET_NNODES': '2', 'MASTER_ADDR': '127.0.0.1',
                    'MASTER_PORT': port, 'HOSTNAME': f'pod-{rank}', 'TMPDIR': str(tmp / f'pod{rank}-tmp')}
        started.append(subprocess.Popen(
            ['unshare', '--mount', 'sh', '-c', NODE, 'pod', 'bash', str(REPO / 'runai' / 'pod_train.sh'), *args],
            env={**pod_env(runs), 'PREFIX_NNODES': '2', **operator, **(env or {})}, cwd=REPO, start_new_session=True,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return started


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which('unshare') is None, reason='needs root and unshare')
def test_two_pods_preempted_by_sigterm_save_and_the_resubmission_resumes_bit_exact(tmp_path: Path, dataset: Path) -> None:
    args = ['two-pods', str(REPO / 'yamls' / 'smoke.yaml'), f'data.local={dataset}', 'max_duration=16ba',
            'checkpoint.interval=1h', 'checkpoint.periodic_interval=null']
    reference = pods(tmp_path / 'reference', tmp_path, args)
    assert [p.wait(timeout=300) for p in reference] == [0, 0]
    run = tmp_path / 'runs' / 'two-pods'
    held, release = tmp_path / 'held', tmp_path / 'release'
    first = pods(tmp_path / 'runs', tmp_path, args,
                 faults({'op': 'step', 'step': 8, 'marker': str(held), 'block': True, 'release': str(release)}))
    wait_for(lambda: held.exists() and len(held.read_text().splitlines()) == 2, first[0], 'both pods at step 8')
    for pod in first:
        pod.send_signal(signal.SIGTERM)  # what Kubernetes does: each pod's first process only
    wait_for(lambda: all('SIGTERM received: saving' in (run / 'logs' / f'rank{r}.log').read_text() for r in (0, 1)))
    release.touch()
    assert all(pod.wait(timeout=180) != 0 for pod in first)
    assert all(group_gone(pod.pid, timeout=120) for pod in first)
    # Signalled at the end of step 8: the ranks agree on it while step 9 computes, and save step 9.
    assert torch.load(run / 'checkpoints' / 'latest.pt', weights_only=True)['global_step'] == 9
    assert all('SIGTERM received, forwarding it' in (run / 'logs' / f'pod-{r}.log').read_text() for r in (0, 1))
    assert all('GLOO_SOCKET_IFNAME=lo (the route to 127.0.0.1)' in (run / 'logs' / f'pod-{r}.log').read_text() for r in (0, 1))

    again = pods(tmp_path / 'runs', tmp_path, args)
    assert [p.wait(timeout=300) for p in again] == [0, 0]
    assert [(s['start_step'], s['world_size']) for s in starts(run)] == [(0, 2), (9, 2)]
    assert_same_training(tmp_path / 'reference' / 'two-pods', run)


def test_a_pod_whose_node_count_disagrees_with_the_operator_refuses_to_start(tmp_path: Path) -> None:
    # The master pod of a workload submitted without PREFIX_NNODES would otherwise train alone.
    env = {**pod_env(tmp_path), 'RANK': '0', 'WORLD_SIZE': '2', 'PET_NNODES': '2'}
    env.pop('PREFIX_NNODES', None)
    result = subprocess.run(['bash', str(REPO / 'runai' / 'pod_train.sh'), 'r', 'yamls/smoke.yaml'], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and 'runs 2 pods' in result.stderr and 'PREFIX_NNODES is 1' in result.stderr


@pytest.mark.parametrize('encoded', ['not base64!', 'WyJhIl0', 'eyJhIjogMX0'])  # garbage; ["a"]; {"a": 1}
def test_overrides_that_do_not_decode_stop_the_pod_before_it_trains(tmp_path: Path, encoded: str) -> None:
    """Training with no overrides, or some of them, would be another experiment, with exit 0."""
    env = {**pod_env(tmp_path), 'PREFIX_OVERRIDES': encoded}
    result = subprocess.run(['bash', str(REPO / 'runai' / 'pod_train.sh'), 'r', 'yamls/smoke.yaml'], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and 'PREFIX_OVERRIDES' in result.stderr and 'refusing to start' in result.stderr
    assert 'Traceback' not in result.stderr and not (tmp_path / 'r').exists(), 'nothing started'


STANDIN = Path(__file__).resolve().parent / 'runai_standin.py'


def overrides_of(environment: list[str]) -> list[str]:
    """The overrides as the pod decodes them; the value itself holds no '=' for a CLI to split at."""
    import base64

    encoded = next(e for e in environment if e.startswith('PREFIX_OVERRIDES='))[17:]
    assert '=' not in encoded
    return json.loads(base64.b64decode(encoded + '=' * (-len(encoded) % 4)))


def submit(tmp_path: Path, *args: str, version: str = '2.22', existing: dict | None = None, runai: bool = True,
           **env: str) -> tuple[subprocess.CompletedProcess, list, dict]:
    """Run submit_train.sh against the stand-in runai of ``version``; its calls and the workloads it holds after."""
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / 'runai').unlink(missing_ok=True)
    if runai:
        (bin_dir / 'runai').write_text(f'#!/bin/sh\nexec {sys.executable} {STANDIN} "$@"\n')
        (bin_dir / 'runai').chmod(0o755)
    log, state = tmp_path / 'runai.log', tmp_path / 'workloads.json'
    log.write_text('')
    state.write_text(json.dumps(existing or {}))
    full_env = {'PATH': f'{bin_dir}:{Path(sys.executable).parent}:/usr/bin:/bin', 'RUNAI_LOG': str(log),
                'FAKE_RUNAI_STATE': str(state), 'FAKE_RUNAI_VERSION': version, 'HOME': str(tmp_path), **env}
    result = subprocess.run(['bash', str(REPO / 'runai' / 'submit_train.sh'), *args], cwd=REPO, env=full_env,
                            capture_output=True, text=True, timeout=120)
    return result, [json.loads(line) for line in log.read_text().splitlines()], json.loads(state.read_text())


def value(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def values(args: list[str], flag: str) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args) if a == flag]


def submitted(calls: list) -> list[str]:
    return next(c for c in reversed(calls) if 'submit' in c and '--help' not in c)


@pytest.mark.parametrize('version', ['2.22', '2.20', '2.18', '2.16'])
@pytest.mark.parametrize('nodes', ['1', '3'])
@pytest.mark.parametrize('existing', ['none', 'finished', 'live'])
def test_every_cli_version_nodes_and_workload_state(tmp_path: Path, version: str, nodes: str, existing: str) -> None:
    """The stand-in refuses every flag its version does not document, so each submission that goes
    through used documented flags only; a CLI that lacks what a run needs is refused with the reason."""
    workload = {'none': {}, 'finished': {'exp1': {'status': 'Completed'}},
                'live': {'exp1': {'status': 'Running'}}}[existing]
    result, calls, workloads = submit(tmp_path, '--nodes', nodes, '--gpus', '8', 'exp1', 'yamls/smoke.yaml',
                                      'optimizer.lr=1e-3', version=version, existing=workload)
    multi = nodes != '1'
    if multi and version in ('2.20', '2.18'):  # no way to give the master the workers' CPU and memory / command
        assert result.returncode == 1, result.stderr
        assert ('Run:ai 2.18' in result.stderr if version == '2.18' else 'has no --master-cpu-core-request'
                in result.stderr)
        assert workloads == workload, 'nothing submitted, nothing deleted'
        return
    if existing == 'live':
        assert result.returncode == 1 and 'exp1 of run exp1 is Running, not finished' in result.stderr
        assert workloads == workload and not any('delete' in c for c in calls)
        return
    assert result.returncode == 0, result.stderr
    sub = workloads['exp1']['args']
    if existing == 'finished':
        assert any('delete' in c for c in calls) and 'waiting for workload exp1 to be deleted' in result.stdout
    assert 'exp1' in sub and value(sub, '-g') == '8' and '--large-shm' in sub
    assert sub[sub.index('--command'):] == ['--command', '--', 'bash', 'runai/pod_train.sh', 'exp1', 'yamls/smoke.yaml']
    environment = values(sub, '-e')
    assert {'PREFIX_NNODES=' + nodes, 'PREFIX_GPUS=8', 'PREFIX_RUNS_ROOT=/home/apluser/runs'} <= set(environment)
    assert overrides_of(environment) == ['lock_wait=600s', 'optimizer.lr=1e-3'], 'the replacement waits out the grace period'
    if version == '2.18':
        assert '--termination-grace-period' not in sub and 'no --termination-grace-period' in result.stderr
    elif version != '2.16':
        assert value(sub, '--termination-grace-period') == '600s'
    if multi:
        assert value(sub, '--workers') == '2'
        if version == '2.22':  # the master trains like the workers
            assert value(sub, '--master-command') == 'bash runai/pod_train.sh exp1 yamls/smoke.yaml'
            assert value(sub, '--master-gpu-devices-request') == '8' and value(sub, '--master-cpu-core-request') == '8'
            assert values(sub, '--master-environment-variable') == environment
    if version == '2.16':
        assert value(sub, '--pvc-exists') == 'claimname=home-apluser,path=/home/apluser'
        assert '--preemptible' not in sub  # only meaningful with --interactive, unknown to submit-dist
    else:
        assert value(sub, '--existing-pvc') == 'claimname=home-apluser,path=/home/apluser'


@pytest.mark.parametrize(('state', 'replaced'), [
    ('Completed', True), ('succeeded', True), ('Failed', True), ('Stopped', True), ('TimedOut', True),
    ('Preempted', True), ('Deleted', True), ('Running', False), ('Pending', False), ('Degraded', False),
    ('Stopping', False), ('Deleting', False), ('Updating', False), ('Initializing', False), ('Error', False),
    ('SomethingNew', False),
])
def test_only_a_workload_in_a_final_state_is_replaced(tmp_path: Path, state: str, replaced: bool) -> None:
    result, calls, workloads = submit(tmp_path, 'exp1', existing={'exp1': {'status': state, 'left': 99}})
    assert (result.returncode == 0) == replaced, result.stderr
    if not replaced:
        assert f'is {state}, not finished' in result.stderr and workloads['exp1']['status'] == state


def test_the_top_level_status_decides_not_a_pods(tmp_path: Path) -> None:
    # A failed workload whose worker pod still runs is finished; a running one whose pod failed is not.
    result, _, _ = submit(tmp_path, 'exp1', existing={'exp1': {'status': 'Failed', 'pods': 'Running'}})
    assert result.returncode == 0, result.stderr
    result, _, _ = submit(tmp_path, 'exp1', existing={'exp1': {'status': 'Running', 'pods': 'Failed'}})
    assert result.returncode == 1


def test_names_are_valid_kubernetes_service_names_and_stable(tmp_path: Path) -> None:
    import re

    names = set()
    for run_name in ('my_run.1', 'my_run.1', 'my-run-1', '7b-run', 'a' * 63):
        result, _, workloads = submit(tmp_path, run_name)
        assert result.returncode == 0, result.stderr
        (name,) = workloads
        assert re.fullmatch(r'[a-z]([a-z0-9-]*[a-z0-9])?', name) and len(name) <= 40, name
        names.add(name)
    assert len(names) == 4, 'same run name, same workload; different run names, different workloads'


def test_overrides_with_spaces_and_quotes_reach_the_trainer_intact(tmp_path: Path) -> None:
    overrides = ['optimizer.lr=1e-3', 'loggers.mlflow.experiment_name=two words', 'loggers.wandb.project=it\'s "quoted"']
    result, calls, _ = submit(tmp_path, 'exp1', 'yamls/smoke.yaml', *overrides)
    assert result.returncode == 0, result.stderr
    assert overrides_of(values(submitted(calls), '-e')) == ['lock_wait=600s', *overrides]


def test_lock_wait_follows_the_grace_period_unless_given(tmp_path: Path) -> None:
    result, calls, _ = submit(tmp_path, '--grace', '20m', 'exp1')
    assert result.returncode == 0 and overrides_of(values(submitted(calls), '-e')) == ['lock_wait=20min']
    result, calls, _ = submit(tmp_path, '--grace', '20m', 'exp2', 'yamls/base.yaml', 'lock_wait=1h')
    assert result.returncode == 0 and overrides_of(values(submitted(calls), '-e')) == ['lock_wait=1h']


@pytest.mark.parametrize(('version', 'state', 'replaced'), [
    ('2.16', 'Fail', True), ('2.16', 'ContainerCannotRun', True), ('2.16', 'Unknown', True), ('2.16', 'Running', False),
    ('2.22', 'Unknown', False),
])
def test_the_older_clis_final_states_are_final(tmp_path: Path, version: str, state: str, replaced: bool) -> None:
    result, _, workloads = submit(tmp_path, 'exp1', version=version, existing={'exp1': {'status': state, 'left': 99}})
    assert (result.returncode == 0) == replaced, result.stderr
    assert (workloads['exp1']['status'] == 'Pending') == replaced


def runai_calls(calls: list, verb: str) -> list[list[str]]:
    """The calls of one verb (describe, delete, submit), help requests left out."""
    return [c for c in calls if verb in c and '--help' not in c and '-h' not in c]


@pytest.mark.parametrize(('version', 'nodes', 'other', 'state', 'replaced'), [
    ('2.22', '3', 'training', 'Running', False),  # a 1-pod run still going, resubmitted on 3 pods
    ('2.22', '1', 'training pytorch', 'Running', False),  # and the other way round
    ('2.22', '1', 'training pytorch', 'Pending', False),
    ('2.20', '1', 'training pytorch', 'Running', False),
    ('2.18', '1', 'distributed', 'Running', False),  # Run:ai 2.18's distributed workloads
    ('2.22', '3', 'training', 'Completed', True),
    ('2.22', '1', 'training pytorch', 'Failed', True),
    ('2.18', '1', 'distributed', 'Succeeded', True),
])
def test_a_workload_of_the_other_kind_holds_the_name_too(tmp_path: Path, version: str, nodes: str, other: str,
                                                         state: str, replaced: bool) -> None:
    """A run resubmitted with another --nodes is another kind of workload, whose describe alone would not see
    the earlier one: a live one of either kind is refused, a finished one is deleted with its own kind's delete."""
    existing = {'exp1': {'status': state, 'kind': other, 'left': 99}}
    result, calls, workloads = submit(tmp_path, '--nodes', nodes, 'exp1', version=version, existing=existing)
    submitted_kind = 'training pytorch' if nodes != '1' else 'training'
    assert [*other.split(), 'describe', 'exp1', '-o', 'json'] in runai_calls(calls, 'describe')
    if not replaced:
        assert result.returncode == 1 and f'exp1 of run exp1 is {state}, not finished' in result.stderr
        assert f"it is a 'runai {other}' workload (another --nodes)" in result.stderr
        assert f'runai {other} logs exp1 -f' in result.stderr and f'runai {other} delete exp1' in result.stderr
        assert workloads == existing and not runai_calls(calls, 'delete') and not runai_calls(calls, 'submit')
        return
    assert result.returncode == 0, result.stderr
    assert [c[:-1] for c in runai_calls(calls, 'delete')] == [[*other.split(), 'delete']]
    assert workloads['exp1']['kind'] == submitted_kind and workloads['exp1']['status'] == 'Pending'
    assert f'runai {submitted_kind} logs exp1 -f' in result.stdout, 'the new workload is followed with its own kind'


@pytest.mark.parametrize(('version', 'nodes', 'command', 'error'), [
    ('2.22', '1', 'training describe', 'unauthorized: run runai login'),
    ('2.22', '1', 'training pytorch describe', 'Get "https://runai.example/api/v1/workloads": connection refused'),
    ('2.22', '3', 'training describe', '403 Forbidden: the user may not view workloads in project p'),
    ('2.22', '3', 'training pytorch describe', 'config file not found, run runai login'),  # "not found", not exp1's
    ('2.18', '1', 'distributed describe', 'context deadline exceeded'),
    ('2.16', '1', 'describe job', 'Unable to connect to the server: dial tcp 10.0.0.1:443: i/o timeout'),
])
def test_a_describe_that_fails_for_another_reason_than_not_found_stops_the_submission(
        tmp_path: Path, version: str, nodes: str, command: str, error: str) -> None:
    """Not logged in, the API down, permission denied: whether a live workload holds the name is unknown,
    so one line names the describe and its error, exit 1, and nothing is deleted or submitted."""
    existing = {'other': {'status': 'Running'}}
    result, calls, workloads = submit(tmp_path, '--nodes', nodes, 'exp1', version=version, existing=existing,
                                      FAKE_RUNAI_ERRORS=json.dumps({command: error}))
    assert result.returncode == 1, result.stderr
    (line,) = [e for e in result.stderr.splitlines() if not e.startswith('submit_train: warning:')]
    assert line.startswith('submit_train: cannot tell whether workload exp1 exists, so nothing was submitted: ')
    assert f'runai {command} exp1 -o json failed (exit 1): ' in line and line.endswith(error)
    assert workloads == existing and not runai_calls(calls, 'delete') and not runai_calls(calls, 'submit')


def test_a_describe_that_prints_no_json_stops_the_submission(tmp_path: Path) -> None:
    existing = {'exp1': {'status': 'Running', 'output': 'NAME: exp1   STATUS: Running'}}
    result, calls, workloads = submit(tmp_path, 'exp1', existing=existing)
    assert result.returncode == 1 and 'runai training describe exp1 -o json printed no JSON description' in result.stderr
    assert workloads == existing and not runai_calls(calls, 'submit')


@pytest.mark.parametrize('version', ['2.22', '2.16'])
def test_the_clis_not_found_is_no_workload(tmp_path: Path, version: str) -> None:
    """The older CLI says so on stdout ("The job exp1 does not exist in project p"), the current one on stderr."""
    result, calls, workloads = submit(tmp_path, '--project', 'p', 'exp1', version=version)
    assert result.returncode == 0, result.stderr
    assert len(runai_calls(calls, 'describe')) == (2 if version == '2.22' else 1) and list(workloads) == ['exp1']


@pytest.mark.parametrize('args', [('-g', 'two'), ('--termination-grace-period', 'forever'), ('-e', 'NOEQUALS'),
                                  ('--workers', '-5'), ('--cpu-memory-request', '32 GB'),
                                  ('--env-secret', 'WANDB_API_KEY=sk-live-value'), ('--env-secret', 'K=wandb:api-key')])
def test_the_standin_refuses_values_the_cli_would(tmp_path: Path, args: tuple) -> None:
    env = {**os.environ, 'RUNAI_LOG': str(tmp_path / 'log'), 'FAKE_RUNAI_STATE': str(tmp_path / 'state')}
    result = subprocess.run([sys.executable, str(STANDIN), 'training', 'pytorch', 'submit', 'w', *args], env=env,
                            capture_output=True, text=True)
    assert result.returncode == 1 and f'invalid argument "{args[1]}"' in result.stderr


def test_dry_run_submits_nothing(tmp_path: Path) -> None:
    result, calls, workloads = submit(tmp_path, '--dry-run', 'exp1', 'yamls/smoke.yaml', 'optimizer.lr=1e-3')
    assert result.returncode == 0, result.stderr
    assert 'runai training submit exp1' in result.stdout and 'runai/pod_train.sh exp1 yamls/smoke.yaml' in result.stdout
    assert workloads == {} and all('--help' in c for c in calls)


@pytest.mark.parametrize(('args', 'message'), [
    ((), 'a run name is required'),
    (('../x',), "run name '../x' is not allowed"),
    (('Bad Name',), 'is not allowed'),
    (('exp1', 'yamls/missing.yaml'), 'config file yamls/missing.yaml does not exist'),
    (('exp1', 'yamls/base.yaml', 'oops'), "'oops' is not of the form key=value"),
    (('exp1', 'runs_root=/tmp'), 'cannot be overridden'),
    (('--gpus', 'two', 'exp1'), '--gpus must be a positive whole number'),
    (('--grace', 'soon', 'exp1'), '--grace must be a duration'),
    (('--env', 'novalue', 'exp1'), 'is not of the form KEY=VALUE'),
    (('--env', 'PREFIX_RUNS_ROOT=/scratch', 'exp1'), '--env PREFIX_RUNS_ROOT is set by this script'),
    (('--env', 'PREFIX_OVERRIDES=x', 'exp1'), '--env PREFIX_OVERRIDES is set by this script'),
    (('--env', 'WANDB_API_KEY=x', 'exp1'), '--env WANDB_API_KEY looks like a secret'),
    (('--secret-env', 'wandb:api-key', 'exp1'), '--secret-env takes NAME=SECRET:KEY'),
    (('--secret-env', 'WANDB_API_KEY=wandb', 'exp1'), '--secret-env WANDB_API_KEY: expected WANDB_API_KEY=SECRET:KEY'),
    (('--secret-env', 'PREFIX_GPUS=wandb:api-key', 'exp1'), '--secret-env PREFIX_GPUS is set by this script'),
    (('--env', 'WANDB_ENTITY=me', '--secret-env', 'WANDB_ENTITY=wandb:entity', 'exp1'),
     'WANDB_ENTITY is given by both --env and --secret-env'),
    (('--secret-env', 'HF_TOKEN=hf:token', '--secret-env', 'HF_TOKEN=hf:other', 'exp1'), '--secret-env HF_TOKEN is given twice'),
    (('--bogus', 'exp1'), 'unknown option --bogus'),
    # the config, checked before anything is submitted (a typo found after the pod waited for GPUs before)
    (('exp1', 'yamls/base.yaml', 'optimizer.lrr=3'), "submit_train: prefix: config error: unknown config key 'optimizer.lrr'"),
    (('exp1', 'yamls/base.yaml', 'optimizer.lr=-1'), 'config key optimizer.lr: -1.0 is not in (0, inf)'),
    (('exp1', '/etc/hostname'), "config path '/etc/hostname' is outside the checkout"),
    (('exp1', 'yamls/../../x.yaml'), 'is outside the checkout'),
])
def test_bad_input_never_reaches_runai(tmp_path: Path, args: tuple, message: str) -> None:
    result, calls, _ = submit(tmp_path, *args)
    assert result.returncode == 2 and message in result.stderr
    assert calls == []


def test_help_is_the_usage_and_exits_0(tmp_path: Path) -> None:
    result, calls, _ = submit(tmp_path, '--help')
    assert result.returncode == 0 and 'usage: runai/submit_train.sh' in result.stdout and calls == []


def test_no_runai_on_path(tmp_path: Path) -> None:
    result, calls, _ = submit(tmp_path, 'exp1', runai=False)
    assert result.returncode == 1 and 'runai CLI is not on PATH' in result.stderr


def test_an_explicit_grace_period_the_cli_cannot_set_is_refused(tmp_path: Path) -> None:
    result, _, workloads = submit(tmp_path, '--grace', '20m', 'exp1', version='2.18')
    assert result.returncode == 1 and 'no --termination-grace-period' in result.stderr and workloads == {}


SECRET = 'sk-live-4f0c2b9e7d1a'  # a W&B key, as a user's shell might export it


def nowhere(secret: str, result: subprocess.CompletedProcess, tmp_path: Path) -> bool:
    """The value is in no runai call (the stand-in logs every argument), no workload's spec and no output."""
    return not any(secret in text for text in (result.stdout, result.stderr, (tmp_path / 'runai.log').read_text(),
                                               (tmp_path / 'workloads.json').read_text()))


@pytest.mark.parametrize(('version', 'nodes'), [('2.22', '1'), ('2.16', '1'), ('2.16', '3')])
def test_a_secret_reaches_the_spec_by_reference_only(tmp_path: Path, version: str, nodes: str) -> None:
    """--secret-env names a Kubernetes secret and key, with the flag (and format) the CLI's reference documents:
    the spec holds that reference, and the value (even one exported in the submitting shell) appears nowhere."""
    result, calls, workloads = submit(tmp_path, '--nodes', nodes, '--secret-env', 'WANDB_API_KEY=wandb:api-key',
                                      '--env', 'WANDB_PROJECT=prefix', 'exp1', version=version, WANDB_API_KEY=SECRET)
    assert result.returncode == 0, result.stderr
    sub, spec = workloads['exp1']['args'], workloads['exp1']['spec']
    if version == '2.22':
        assert values(sub, '--env-secret') == ['WANDB_API_KEY=wandb,key=api-key']
    else:
        assert 'WANDB_API_KEY=SECRET:wandb,api-key' in values(sub, '-e')
    assert {'name': 'WANDB_API_KEY', 'secret': 'wandb', 'key': 'api-key'} in spec['environment']
    assert {'name': 'WANDB_PROJECT', 'value': 'prefix'} in spec['environment']
    assert nowhere(SECRET, result, tmp_path)


@pytest.mark.parametrize(('version', 'nodes', 'message'), [
    ('2.20', '1', "'runai training submit' has no --env-secret"),
    ('2.18', '1', "'runai training submit' has no --env-secret"),
    ('2.22', '3', 'the master pod would start without WANDB_API_KEY: use --nodes 1'),
])
def test_a_secret_the_cli_cannot_pass_by_reference_is_refused(tmp_path: Path, version: str, nodes: str,
                                                              message: str) -> None:
    result, calls, workloads = submit(tmp_path, '--nodes', nodes, '--secret-env', 'WANDB_API_KEY=wandb:api-key', 'exp1',
                                      version=version)
    assert result.returncode == 1 and message in result.stderr
    assert workloads == {} and all('--help' in c for c in calls), 'nothing submitted'


@pytest.mark.parametrize('name', ['WANDB_API_KEY', 'HF_TOKEN', 'aws_secret_access_key', 'DB_PASSWORD', 'GIT_CREDENTIALS'])
@pytest.mark.parametrize('how', ['option', 'variable'])
def test_an_env_that_names_a_secret_is_refused_without_showing_its_value(tmp_path: Path, name: str, how: str) -> None:
    args, env = (('--env', f'{name}={SECRET}', 'exp1'), {}) if how == 'option' else \
        (('exp1',), {'PREFIX_EXTRA_ENV': f'WANDB_PROJECT=prefix {name}={SECRET}'})
    result, calls, _ = submit(tmp_path, *args, **env)
    assert result.returncode == 2 and calls == []
    assert f'--env {name} looks like a secret' in result.stderr and f'--secret-env {name}=SECRET_NAME:KEY' in result.stderr
    assert SECRET not in result.stderr + result.stdout


@pytest.mark.parametrize('arg', [SECRET, f'WANDB_API_KEY={SECRET}'])
def test_a_value_given_where_a_secret_reference_belongs_is_not_shown(tmp_path: Path, arg: str) -> None:
    for option in ('--env', '--secret-env'):
        result, calls, _ = submit(tmp_path, option, arg, 'exp1')
        assert result.returncode == 2 and calls == [] and SECRET not in result.stderr + result.stdout


@pytest.mark.parametrize('runai', [True, False])
def test_dry_run_shows_the_secrets_reference(tmp_path: Path, runai: bool) -> None:
    result, calls, workloads = submit(tmp_path, '--dry-run', '--secret-env', 'WANDB_API_KEY=wandb:api-key', 'exp1',
                                      runai=runai, WANDB_API_KEY=SECRET)
    assert result.returncode == 0, result.stderr
    assert '--env-secret WANDB_API_KEY=wandb\\,key=api-key' in result.stdout, result.stdout
    assert workloads == {} and nowhere(SECRET, result, tmp_path)
