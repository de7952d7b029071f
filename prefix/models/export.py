"""``prefix export RUN OUT``: a run's newest checkpoint, usable without prefix.

``OUT.pt``: one whole ``latest.pt``-format file. A sharded checkpoint's model and optimizer are
gathered from its shard folder into ``state``, so the file is what a run without FSDP writes: it
opens with ``torch.load(OUT.pt, weights_only=True)`` where only torch is installed.

``OUT`` (a new folder), for a Hugging Face model (``model.name: hf_causal_lm``): what
``save_pretrained`` writes (config, safetensors weights, and the tokenizer if the model's folder had
one), for ``AutoModelForCausalLM.from_pretrained(OUT)``. The config comes from the checkpoint, where
Composer's ``HuggingFaceModel`` keeps it.

Either is built in one process, in host memory: the whole model and optimizer state (about 12 bytes
per parameter with AdamW in fp32).
"""

from __future__ import annotations

import argparse
import os
import pickle
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.api import CheckpointException

from prefix.checkpoint import LATEST, CheckpointError, global_file, read_whole, safe_load
from prefix.config import default_runs_root
from prefix.errors import PrefixError
from prefix.files import atomic_write
from prefix.run import RunDir


def whole_checkpoint(checkpoints: Path, kind: str = LATEST) -> dict[str, Any]:
    """The checkpoint ``kind``.pt of a run, with the tensors of its shard folder in ``state``."""
    ckpt = safe_load(global_file(checkpoints, kind), mmap=True)
    name = ckpt.pop('shards', None)
    if name is not None:
        ckpt['state'].update(read_whole(checkpoints / name))
    return ckpt


def write_pretrained(ckpt: dict[str, Any], out: Path) -> None:
    """A ``save_pretrained`` folder of the Hugging Face model in ``ckpt``, moved into place whole."""
    from composer.models.huggingface import HuggingFaceModel, get_hf_config_from_composer_state_dict
    from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present
    from transformers import AutoModelForCausalLM

    hf_state = ckpt['state'].get('integrations', {}).get('huggingface')
    if hf_state is None:
        raise PrefixError('its model is not a Hugging Face model (model.name: hf_causal_lm); export it to a .pt file')
    model = AutoModelForCausalLM.from_config(get_hf_config_from_composer_state_dict(ckpt))
    weights = dict(ckpt['state']['model'])
    consume_prefix_in_state_dict_if_present(weights, 'model.')  # HFCausalLM keeps the HF model as .model
    model.load_state_dict(weights)
    tmp = out.with_name(f'.{out.name}.tmp')
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer = HuggingFaceModel.load_huggingface_tokenizer_from_saved_state(hf_state, tokenizer_save_dir=str(tmp))
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    os.replace(tmp, out)  # an empty folder is replaced; one with files was refused before


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog='prefix export', description=__doc__.splitlines()[0])
    parser.add_argument('run_name')
    parser.add_argument('out', type=Path, help='OUT.pt: the file to write (replaced atomically); '
                        'a new folder: a save_pretrained folder of a Hugging Face model')
    parser.add_argument('--root', default=None, help='runs_root (default: $PREFIX_RUNS_ROOT or ./runs)')
    opts = parser.parse_args(argv)
    # Every torch.load, DCP's of a shard folder's objects included, is restricted to plain data (as in training).
    os.environ['TORCH_FORCE_WEIGHTS_ONLY_LOAD'] = '1'

    run = RunDir.for_run(str(opts.root or default_runs_root()), opts.run_name)
    if not global_file(run.checkpoints).exists():
        print(f'prefix: error: run {opts.run_name} has no checkpoint ({global_file(run.checkpoints)})', file=sys.stderr)
        return 1
    try:
        ckpt = whole_checkpoint(run.checkpoints)
    except CheckpointException as e:  # DCP's, around what a rank's read raised
        failure = next(iter(e.failures.values()), (e,))  # (exception, traceback) per failed rank
        cause = failure[0] if isinstance(failure, tuple) else failure
        why = ('it holds objects other than plain data and could run code when loaded: refusing it'
               if isinstance(cause, pickle.UnpicklingError) else str(cause).splitlines()[0])
        print(f'prefix: error: cannot export {run.checkpoints}: reading its shard folder failed: {why}', file=sys.stderr)
        return 1
    except (CheckpointError, OSError, ValueError, pickle.UnpicklingError) as e:
        print(f'prefix: error: cannot export {run.checkpoints}: {str(e).splitlines()[0]}', file=sys.stderr)
        return 1
    if opts.out.suffix == '.pt':
        atomic_write(opts.out, lambda f: torch.save(ckpt, f))
    elif opts.out.exists() and (not opts.out.is_dir() or any(opts.out.iterdir())):
        print(f'prefix: error: {opts.out} exists; give a new folder (or OUT.pt for one file)', file=sys.stderr)
        return 1
    else:
        try:
            write_pretrained(ckpt, opts.out)
        except (PrefixError, RuntimeError, OSError) as e:  # RuntimeError: weights that do not fit the config
            print(f'prefix: error: cannot export run {opts.run_name} to {opts.out}: {str(e).splitlines()[0]}',
                  file=sys.stderr)
            return 1
    print(f'wrote {opts.out}: step {ckpt["global_step"]} of run {opts.run_name}')
    return 0
