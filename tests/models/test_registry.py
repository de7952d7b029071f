"""Models by YAML: Hugging Face causal LMs (inline configs, a local folder) and a team's own ComposerModel.

Each model trains under the same guarantees as prefix's GPT: SIGKILLed at a random step and started
again, a run ends with the losses and weights of an uninterrupted one, bit for bit.
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
    SMOKE,
    STDLIB,
    assert_same_training,
    faults,
    run_env,
    run_train,
    signal_ranks,
    starts,
    step_losses,
    train_cmd,
    wait_for,
)

from prefix.config.config import ConfigError, load_config
from prefix.distributed.preemption import PREEMPTED_EXIT_CODE
from prefix.models.export import whole_checkpoint

HF_TINY = REPO / 'yamls' / 'hf-gpt2-tiny.yaml'
STEPS = 24
LLAMA = ('model.config={model_type: llama, vocab_size: 257, hidden_size: 32, intermediate_size: 64, '
         'num_hidden_layers: 2, num_attention_heads: 2, num_key_value_heads: 1, max_position_embeddings: 128}')


def hf_args(root: Path, dataset: Path, *overrides: str) -> list[str]:
    return [str(HF_TINY), f'runs_root={root}', f'data.local={dataset}', f'max_duration={STEPS}ba',
            'checkpoint.interval=4ba', 'checkpoint.periodic_interval=null', 'eval_interval=12ba', *overrides]


def killed_and_resumed(root: Path, args: list[str], env: dict[str, str], run_name: str) -> int:
    """SIGKILL the run at a random batch end (seed printed), start it again to the end; the step it was killed at."""
    seed = int.from_bytes(os.urandom(4), 'little')
    step = random.Random(seed).randint(5, STEPS - 3)
    print(f'killing {run_name} after batch {step} (seed {seed})')
    marker = root / 'held'
    hold = faults({'op': 'step', 'step': step, 'event': 'batch_end', 'block': True, 'marker': str(marker)})
    paths = os.pathsep.join(filter(None, [hold['PYTHONPATH'], env.get('PYTHONPATH')]))
    proc = subprocess.Popen(train_cmd(*args), env=run_env(**{**env, **hold, 'PYTHONPATH': paths}), cwd=REPO,
                            start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(marker.exists, proc, f'batch {step} ended')
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    result = run_train(*args, **env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(starts(root / run_name)) == 2
    return step


def trained_twice(tmp_path: Path, dataset: Path, *overrides: str, env: dict[str, str] | None = None,
                  run_name: str = 'hf-gpt2-tiny') -> Path:
    """An uninterrupted run and a killed-and-resumed one of the same config: they must be the same training."""
    env = env or {}
    result = run_train(*hf_args(tmp_path / 'reference', dataset, *overrides), **env)
    assert result.returncode == 0, result.stderr[-3000:]
    killed = tmp_path / 'killed'
    killed_and_resumed(killed, hf_args(killed, dataset, *overrides), env, run_name)
    assert_same_training(tmp_path / 'reference' / run_name, killed / run_name)
    return killed / run_name


def export_folder(run: Path, out: Path) -> None:
    result = subprocess.run([sys.executable, '-m', 'prefix', 'export', run.name, str(out),
                             '--root', str(run.parent)], env=run_env(), capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr


def same_weights(folder: Path, run: Path) -> None:
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).state_dict()
    trained = whole_checkpoint(run / 'checkpoints')['state']['model']
    assert {f'model.{k}' for k in exported} == set(trained)
    assert all(torch.equal(v, trained[f'model.{k}']) for k, v in exported.items())


@pytest.mark.slow
def test_hf_gpt2_inline_resumes_bit_exact_and_exports(tmp_path: Path, dataset: Path) -> None:
    """GPT-2 has dropout on by default: the resume restores the RNG states too."""
    run = trained_twice(tmp_path, dataset)
    export_folder(run, tmp_path / 'out')
    same_weights(tmp_path / 'out', run)


@pytest.mark.slow
def test_hf_llama_under_fsdp_is_built_on_rank_0_and_trains_like_without_fsdp(tmp_path: Path, dataset: Path) -> None:
    """Rank 0 builds the model whole, rank 1 on the meta device and receives its shards (rotary buffers
    included); stopped by SIGTERM and resumed, the run's losses are those of the same run without FSDP."""
    args = hf_args(tmp_path, dataset, LLAMA, 'fsdp={}')
    run = tmp_path / 'hf-gpt2-tiny'
    held, release = tmp_path / 'held', tmp_path / 'release'
    proc = subprocess.Popen(train_cmd(*args, nproc=2), cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=run_env(**faults(
                                {'op': 'step', 'step': 8, 'marker': str(held), 'block': True, 'release': str(release)})))
    wait_for(lambda: held.exists() and len(held.read_text().splitlines()) == 2, proc, 'step 8 on both ranks')
    signal_ranks(proc, signal.SIGTERM)
    wait_for(lambda: all('SIGTERM received' in (run / 'logs' / f'rank{r}.log').read_text() for r in (0, 1)), proc)
    release.touch()
    assert proc.wait(timeout=300) == PREEMPTED_EXIT_CODE
    resumed = run_train(*args, nproc=2)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert (run / 'logs' / 'rank1.log').read_text().count('Sync Module States across all ranks took') == 2, 'both starts'
    plain = run_train(*hf_args(tmp_path / 'plain', dataset, LLAMA), nproc=2)
    assert plain.returncode == 0, plain.stdout[-3000:]
    got, expected = step_losses(run), step_losses(tmp_path / 'plain' / 'hf-gpt2-tiny')
    assert sorted(got) == sorted(expected) == list(range(STEPS))
    worst = max(abs(expected[s] - got[s]) for s in expected)
    assert worst < 1e-4, f'the same model and samples give the same losses (worst difference {worst})'


def tokenizer_and_model(folder: Path) -> None:
    """A byte-level BPE tokenizer trained on a few files, and a tiny GPT-2 of its vocabulary, saved as a Hub folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=['<|endoftext|>'],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([(STDLIB / name).read_text() for name in ('bisect.py', 'abc.py', 'stat.py')], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token='<|endoftext|>')
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=2)
                    ).save_pretrained(folder)


@pytest.mark.slow
def test_hf_model_from_a_local_folder_with_its_tokenizer(tmp_path: Path) -> None:
    """The folder's tokenizer prepares the data, its weights start the run, the export carries both."""
    from transformers import AutoTokenizer

    folder = tmp_path / 'gpt2-folder'
    tokenizer_and_model(folder)
    data = tmp_path / 'bpe-data'
    prepared = subprocess.run([sys.executable, '-m', 'prefix.data', str(data), *(str(STDLIB / f) for f in (
        'bisect.py', 'colorsys.py', 'abc.py', 'fnmatch.py', 'genericpath.py', 'stat.py', 'sched.py')),
        '--tokenizer', str(folder), '--seq-len', '64', '--val-fraction', '0.3'],
        env=run_env(), capture_output=True, text=True, cwd=REPO)
    assert prepared.returncode == 0, prepared.stderr
    run = trained_twice(tmp_path, data, 'model.config=null', f'model.pretrained_model_name_or_path={folder}',
                        'model.pretrained=true', 'model.max_seq_len=64', 'global_batch_size=4')
    first = whole_checkpoint(tmp_path / 'reference' / 'hf-gpt2-tiny' / 'checkpoints')
    assert first['state']['integrations']['huggingface']['tokenizer'], 'the folder tokenizer is kept in the checkpoint'
    export_folder(run, tmp_path / 'out')
    same_weights(tmp_path / 'out', run)
    text = 'def insort(a, x):\n    return a'
    assert AutoTokenizer.from_pretrained(tmp_path / 'out').encode(text) == AutoTokenizer.from_pretrained(folder).encode(text)


@pytest.mark.parametrize('overrides', [
    [],  # GPT-2, its head tied to its embedding
    ['model.config=null', 'model.name=import', 'model.factory=zoo:mixed', 'model.kwargs={vocab_size: 257, dim: 16}'],
], ids=['hf_causal_lm', 'import'])
def test_a_resumed_model_draws_no_initial_weights(overrides: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A resume loads every weight: drawing them first costs minutes and the model's size in host memory at 70B."""
    from prefix import models

    monkeypatch.syspath_prepend(str(Path(__file__).parent))  # zoo.py, a team's module
    cfg = load_config(str(HF_TINY), overrides)
    torch.manual_seed(0)
    resumed = models.build(cfg, initialize=False)
    assert torch.equal(torch.get_rng_state(), torch.manual_seed(0).get_state()), 'initial values were drawn'
    fresh = models.build(cfg)
    assert [name for name, _ in resumed.named_parameters()] == [name for name, _ in fresh.named_parameters()], \
        'the same parameters, tied alike: the optimizer state is keyed by their names'
    assert not torch.equal(torch.get_rng_state(), torch.manual_seed(0).get_state()), 'a fresh start draws them'


def test_a_resume_of_a_pretrained_model_reads_no_weights_and_keeps_their_dtype(tmp_path: Path) -> None:
    """The folder's weights are replaced by the checkpoint's: not read (minutes at 70B), and the model has the
    dtype ``from_pretrained`` gives (fp32) even where the folder holds bf16 weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from prefix import models

    folder = tmp_path / 'llama'
    LlamaForCausalLM(LlamaConfig(vocab_size=257, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=128)).to(torch.bfloat16).save_pretrained(folder)
    cfg = load_config(str(HF_TINY), ['model.config=null', f'model.pretrained_model_name_or_path={folder}',
                                     'model.pretrained=true'])
    fresh = models.build(cfg)
    (folder / 'model.safetensors').unlink()
    resumed = models.build(cfg, initialize=False)
    assert {p.dtype for p in fresh.parameters()} == {p.dtype for p in resumed.parameters()} == {torch.float32}


def test_exporting_a_model_that_is_not_hugging_face_to_a_folder_is_refused(tmp_path: Path, finished_run: Path) -> None:
    out = tmp_path / 'out'
    result = subprocess.run([sys.executable, '-m', 'prefix', 'export', 'smoke', str(out), '--root',
                             str(finished_run.parent)], env=run_env(), capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 1
    assert 'not a Hugging Face model' in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize('overrides, message', [
    (['model.config=null', 'model.pretrained_model_name_or_path=/nonexistent/gpt2'],
     '/nonexistent/gpt2 is not a folder with a config.json'),
    (['model.pretrained=true'], 'model.pretrained: weights come from model.pretrained_model_name_or_path'),
    (['model.factory=x:y'], 'model.factory does not apply to model.name=hf_causal_lm'),
    (['model.name=import', 'model.config=null'], 'model.name=import needs model.factory'),
    (['model.config.model_type=null'], 'give model_type'),
    (['model.name=nope'], "model.name: 'nope' is not one of gpt, hf_causal_lm, import"),
])
def test_model_config_errors_are_one_line(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(str(HF_TINY), overrides)


@pytest.mark.parametrize('overrides, message', [
    (['model.config.model_type=nosuch'], "'nosuch' is not an architecture transformers knows"),
    (['model.max_seq_len=256'], 'model.max_seq_len: 256 is more than the 128 positions'),
    (['model.name=import', 'model.config=null', 'model.factory=no_such_module:build'], 'cannot import no_such_module'),
    (['precision=amp_fp16'], 'config key precision: amp_fp16 needs a GPU and this machine has none'),
])
def test_model_build_errors_are_one_line_and_leave_no_run(tmp_path: Path, dataset: Path, overrides: list[str],
                                                          message: str) -> None:
    result = run_train(str(HF_TINY), f'runs_root={tmp_path}', f'data.local={dataset}', *overrides)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith('prefix:')]
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
    assert not list(tmp_path.glob('*/checkpoints/*'))


@pytest.mark.parametrize('config, overrides, fix', [
    (SMOKE, ['model.vocab_size=100'], 'set model.vocab_size=257'),
    (HF_TINY, ['model.config.vocab_size=100'], "prepare the data with the model's tokenizer"),
])
def test_token_ids_past_the_models_vocabulary_are_refused_before_the_run_exists(
        tmp_path: Path, dataset: Path, config: Path, overrides: list[str], fix: str) -> None:
    """Byte data (257 ids) for a model of 100: an index error mid-step on a CPU, a device-side assert on a GPU."""
    result = run_train(str(config), f'runs_root={tmp_path}', f'data.local={dataset}', *overrides)
    errors = [line for line in result.stderr.splitlines() if line.startswith('prefix:')]
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-2000:]
    assert 'holds token ids up to 256 (tokenizer byte, 257 ids) but the model embeds 100' in errors[0] and fix in errors[0]
    assert list(tmp_path.iterdir()) == [], 'nothing was created'
