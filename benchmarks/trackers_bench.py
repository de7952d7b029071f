"""What the trackers cost a start of a long run: a metrics log of a million steps, a real MLflow server.

    .venv/bin/python benchmarks/trackers_bench.py [--steps 1000000]

Writes ``logs/metrics.jsonl`` as a run of ``--steps`` steps logs it (15 metrics a step, as
``yamls/smoke.yaml`` logs), then times what a start resuming near its end does before training, side
by side with what the previous version did (each of TensorBoard and MLflow parsed the whole log):

- TensorBoard: the resume step's values (``trackers.values_at``, read from the end);
- MLflow: the catch-up from the ledger, 100 steps behind as a kill leaves it, to a real ``mlflow
  server`` (sqlite store, loopback) started here;
- and, for scale, how fast a catch-up sends when there is no ledger (a tracker added to a long run).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from prefix.files import jsonl  # noqa: E402
from prefix.trackers.loggers import values_at  # noqa: E402
from prefix.trackers.mlflow_run import Sender  # noqa: E402

KEYS = ['time/epoch', 'time/batch', 'time/sample', 'time/batch_in_epoch', 'time/sample_in_epoch', 'time/token',
        'time/token_in_epoch', 'trainer/device_train_microbatch_size', 'loss/train/total', 'checkpoint/step',
        'checkpoint/blocked_s', 'checkpoint/write_s', 'checkpoint/bytes', 'throughput/batches_per_sec',
        'lr-DecoupledAdamW/group0']
BEHIND = 100  # steps the MLflow ledger is behind at the kill
CATCH_UP_STEPS = 2000  # lines sent without a ledger, to measure the rate


def write_log(path: Path, steps: int) -> dict[int, int]:
    """The log, and the byte offset at which each of the last ``BEHIND`` + 50 steps' line begins."""
    offsets = {}
    with path.open('w') as f:
        for step in range(steps):
            if step >= steps - BEHIND - 50:
                offsets[step] = f.tell()
            record = {'step': step, 'time': round(1.7e9 + step * 0.25, 3)}
            record.update({k: step * 1e-3 + i for i, k in enumerate(KEYS)})
            f.write(json.dumps(record) + '\n')
    return offsets


def previous_version(path: Path, step: int) -> float:
    """Each of the two trackers parsed every line of the log (``logged_values``), at every start."""
    start = time.perf_counter()
    for _ in ('TensorBoard', 'MLflow'):
        wanted = {}
        for record in jsonl.read(path):
            if record.get('step') == step:
                wanted.update(record)
    return time.perf_counter() - start


def mlflow_server(folder: Path) -> tuple[subprocess.Popen, str]:
    import socket

    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    server = REPO / '.venv-mlflow' / 'bin' / 'mlflow'  # its own venv; make test installs it
    proc = subprocess.Popen([str(server), 'server', '--host', '127.0.0.1', '--port',
                             str(port), '--workers', '1', '--backend-store-uri', f'sqlite:///{folder}/mlflow.db',
                             '--default-artifact-root', str(folder / 'artifacts')],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    uri = f'http://127.0.0.1:{port}'
    while True:
        try:
            urllib.request.urlopen(uri + '/health', timeout=5)
            return proc, uri
        except OSError:
            if proc.poll() is not None:
                raise SystemExit('mlflow server did not start') from None
            time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--steps', type=int, default=1_000_000)
    args = parser.parse_args()
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        log = folder / 'metrics.jsonl'
        offsets = write_log(log, args.steps)
        resume = args.steps - 50
        print(f'metrics.jsonl: {args.steps} lines, {log.stat().st_size / 1e6:.0f} MB; resume at step {resume}, '
              f'MLflow ledger {BEHIND} steps behind it')
        before = previous_version(log, resume)

        start = time.perf_counter()
        values = values_at(log, resume)
        tensorboard = time.perf_counter() - start
        assert len(values) == len(KEYS)

        proc, uri = mlflow_server(folder)
        try:
            client = MlflowClient(uri)
            experiment = client.create_experiment('bench')
            run_id = client.create_run(experiment).info.run_id
            ledger = folder / 'mlflow.json'
            last = {k: resume - BEHIND - 1 for k in KEYS}
            ledger.write_text(json.dumps({'run_id': run_id, 'offset': offsets[resume - BEHIND], 'last': last,
                                          'finished': False}))
            client.log_batch(run_id, metrics=[Metric(k, 0.0, 0, resume - BEHIND - 1) for k in KEYS], synchronous=True)
            start = time.perf_counter()  # what a start asks the server before training (MLflow.open, init)
            run = client.get_run(run_id)
            held = {m.key: m.step for m in run.data.to_proto().metrics}
            client.get_metric_history(run_id, 'prefix/start')
            client.update_run(run_id, status='RUNNING')
            opened = time.perf_counter() - start
            start = time.perf_counter()  # then, on the sender thread
            sent = Sender(client, run_id, log, ledger, held).send_pending()
            mlflow = time.perf_counter() - start

            head = folder / 'head.jsonl'
            with log.open() as src, head.open('w') as dst:
                for _ in range(CATCH_UP_STEPS):
                    dst.write(src.readline())
            fresh = client.create_run(experiment).info.run_id
            start = time.perf_counter()
            full = Sender(client, fresh, head, folder / 'fresh.json', {}).send_pending()
            rate = full / (time.perf_counter() - start)
        finally:
            proc.terminate()
            proc.wait()

    print()
    print('| what a start does | previous version | now |')
    print('| --- | --- | --- |')
    print(f'| TensorBoard, before training: the resume step\'s values | {before / 2:.2f} s (parses the whole log) '
          f'| {tensorboard:.3f} s (reads the end) |')
    print(f'| MLflow, before training | {before / 2:.2f} s (parses the whole log), then sends what the run lacks | '
          f'{opened:.3f} s (the run\'s latest steps) |')
    print(f'| MLflow, on the sender thread: the {BEHIND} steps the run lacks | - | {mlflow:.2f} s ({sent} metrics) |')
    print()
    print(f'catch-up without a ledger: {rate:,.0f} metrics/s to this server ({full} metrics of {CATCH_UP_STEPS} steps); '
          f'a whole log of {args.steps} steps would take {args.steps * len(KEYS) / rate / 60:.0f} min, on the sender '
          f'thread while training goes on')


if __name__ == '__main__':
    main()
