"""The zoo: models as teams bring them, each through every path its checkpoints take.

A model whose state is not all one dtype (BatchNorm's int64 counter, a bf16 weight, bool and empty
buffers, tied weights: ``zoo.mixed``) and a Hugging Face model in bf16. Trainer starts cost seconds,
so each model is killed once per checkpoint format and every property is checked on that run:
- full format, one rank: written asynchronously, SIGKILLed after a commit, resumed with synchronous
  writes; losses and weights bit-exact with the uninterrupted run, every dtype kept, ``prefix export``
  equal to the checkpoint;
- sharded (FSDP2), two ranks writing synchronously, SIGKILLed after a commit, resumed on one rank
  writing asynchronously (DCP reshards): the run completes, every dtype kept.
prefix's own GPT takes the same paths in tests/checkpoint and tests/models/test_fsdp.py.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    REPO,
    assert_same_training,
    committed_step,
    faults,
    run_env,
    run_train,
    starts,
    step_losses,
    train_cmd,
    wait_for,
)

from prefix.models.export import whole_checkpoint

HF_TINY = REPO / 'yamls' / 'hf-gpt2-tiny.yaml'
STEPS = 16
ZOO_PATH = str(Path(__file__).resolve().parent)
LLAMA_BF16 = ('model.config={model_type: llama, vocab_size: 257, hidden_size: 32, intermediate_size: 64, '
              'num_hidden_layers: 2, num_attention_heads: 2, num_key_value_heads: 1, max_position_embeddings: 128, '
              'torch_dtype: bfloat16}')
ZOO = {
    'mixed': (['model.config=null', 'model.name=import', 'model.factory=zoo:mixed', 'model.kwargs={vocab_size: 257, dim: 16}'],
              {'net.gate.scale': torch.bfloat16, 'net.norm.num_batches_tracked': torch.int64, 'net.seen': torch.bool,
               'net.emb.weight': torch.float32, 'net.nothing': torch.float32}),
    'hf-bf16': ([LLAMA_BF16], {'model.model.embed_tokens.weight': torch.bfloat16, 'model.lm_head.weight': torch.bfloat16}),
}


def zoo_args(root: Path, dataset: Path, model: str, *overrides: str) -> list[str]:
    return [str(HF_TINY), f'runs_root={root}', f'data.local={dataset}', f'max_duration={STEPS}ba', 'checkpoint.interval=4ba',
            'checkpoint.periodic_interval=null', 'eval_interval=8ba', *ZOO[model][0], *overrides]


def zoo_pythonpath() -> str:
    return os.pathsep.join(filter(None, [ZOO_PATH, os.environ.get('PYTHONPATH')]))


def kill_after_a_commit(root: Path, args: list[str], step: int, nproc: int = 0) -> None:
    """Run until every rank has ended batch ``step`` with a checkpoint committed, then SIGKILL every process."""
    marker, run = root / 'held', root / 'hf-gpt2-tiny'
    hold = faults({'op': 'step', 'step': step, 'event': 'batch_end', 'block': True, 'marker': str(marker)})
    env = run_env(**{**hold, 'PYTHONPATH': os.pathsep.join([hold['PYTHONPATH'], ZOO_PATH])})
    proc = subprocess.Popen(train_cmd(*args, nproc=nproc), env=env, cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: marker.exists() and len(marker.read_text().splitlines()) == max(nproc, 1)
             and committed_step(run) is not None, proc, f'batch {step} ended after a commit')
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def resume(*args: str, nproc: int = 0) -> None:
    result = run_train(*args, nproc=nproc, PYTHONPATH=zoo_pythonpath())
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]


def assert_dtypes(model: str, state: dict[str, torch.Tensor]) -> None:
    for key, dtype in ZOO[model][1].items():
        assert state[key].dtype == dtype, f'{key}: {state[key].dtype}, trained as {dtype}'


def export(run: Path, out: Path) -> None:
    result = subprocess.run([sys.executable, '-m', 'prefix', 'export', run.name, str(out), '--root', str(run.parent)],
                            env=run_env(), capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
@pytest.mark.parametrize('model', ZOO)
def test_killed_and_resumed_bit_exact_with_every_dtype_kept_and_exported(model: str, tmp_path: Path, dataset: Path) -> None:
    reference = tmp_path / 'reference'
    resume(*zoo_args(reference, dataset, model))
    seed = int.from_bytes(os.urandom(4), 'little')
    step = random.Random(seed).randint(6, STEPS - 2)
    print(f'killing {model} after batch {step} (seed {seed})')
    killed = tmp_path / 'killed'
    kill_after_a_commit(killed, zoo_args(killed, dataset, model), step)
    resume(*zoo_args(killed, dataset, model, 'checkpoint.async_write=false'))
    run = killed / 'hf-gpt2-tiny'
    assert len(starts(run)) == 2
    assert_same_training(reference / 'hf-gpt2-tiny', run)
    checkpoint = whole_checkpoint(run / 'checkpoints')
    assert_dtypes(model, checkpoint['state']['model'])
    export(run, tmp_path / 'out.pt')
    exported = torch.load(tmp_path / 'out.pt', weights_only=True)['state']['model']
    assert exported.keys() == checkpoint['state']['model'].keys()
    assert all(v.dtype == checkpoint['state']['model'][k].dtype and torch.equal(v, checkpoint['state']['model'][k])
               for k, v in exported.items())


@pytest.mark.slow
@pytest.mark.parametrize('model', ZOO)
def test_sharded_checkpoints_of_every_dtype_resume_on_fewer_ranks(model: str, tmp_path: Path, dataset: Path) -> None:
    args = zoo_args(tmp_path, dataset, model, 'fsdp={}')
    kill_after_a_commit(tmp_path, [*args, 'checkpoint.async_write=false'], 6, nproc=2)
    assert committed_step(tmp_path / 'hf-gpt2-tiny') == 4
    resume(*args)  # one rank reads the two ranks' shards
    run = tmp_path / 'hf-gpt2-tiny'
    assert sorted(step_losses(run)) == list(range(STEPS))
    export(run, tmp_path / 'out.pt')
    assert_dtypes(model, torch.load(tmp_path / 'out.pt', weights_only=True)['state']['model'])
