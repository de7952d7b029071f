"""The Run:ai side: shell scripts pass shellcheck; the pod command preempts and resumes for real;
submit_train.sh issues the right runai commands (a stand-in runai records them)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, group_gone, step_losses

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
    pod = subprocess.Popen(cmd, env=pod_env(tmp_path), cwd=REPO, start_new_session=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    while max(step_losses(run), default=-1) < 5:
        assert pod.poll() is None, pod.stdout.read()[-3000:]
        time.sleep(0.05)
    pod.send_signal(signal.SIGTERM)  # what Kubernetes does: the first process only
    out, _ = pod.communicate(timeout=90)
    assert pod.returncode != 0, out[-3000:]
    assert group_gone(pod.pid, timeout=30), 'nothing of the run is left running'
    step = torch.load(run / 'checkpoints' / 'latest.pt', weights_only=True)['global_step']
    assert step == max(step_losses(run)) + 1 >= 6
    log = (run / 'logs' / 'pod-0.log').read_text()
    assert 'SIGTERM received, forwarding it' in log and f'preempted at step {step}' in log

    again = subprocess.run(cmd, env=pod_env(tmp_path), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:]
    starts = [json.loads(line) for line in (run / 'meta' / 'starts.jsonl').read_text().splitlines()]
    assert [s['start_step'] for s in starts] == [0, step]
    assert sorted(step_losses(run)) == list(range(30))
