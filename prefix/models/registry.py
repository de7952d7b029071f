"""The model a config names (``model.name``): prefix's GPT, a Hugging Face causal LM, or a team's own ComposerModel.

Every model trains on the same batches, ``{'input_ids': (B, L+1)}``, predicting tokens 1..L from
0..L-1, and gets the same guarantees: the checkpoint contract, bit-exact resume, drift detection of
its ``model.*`` keys. Hugging Face models are read from local folders only: nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from composer.metrics.nlp import LanguageCrossEntropy, LanguagePerplexity
from composer.models import ComposerModel, HuggingFaceModel
from composer.utils import dist

from prefix.config import TrainConfig
from prefix.errors import ConfigError
from prefix.models.composer_model import ComposerGPT


def build(cfg: TrainConfig, initialize: bool = True) -> ComposerModel:
    """The run's model; its initial weights depend on ``cfg.seed`` alone (the caller seeds the global RNG).

    ``initialize=False`` (a resume loads every weight) draws no initial values and reads no pretrained
    weights: prefix's GPT is only allocated; a Hugging Face or imported model is built with
    ``torch.nn.init``'s functions made no-ops (``transformers``' ``no_init_weights``, what its
    ``from_pretrained`` does), which would otherwise cost minutes and the model's size in host memory
    per rank for a 70B model. Under FSDP a Hugging Face model is built whole on rank 0 only, on the
    meta device elsewhere; Composer broadcasts rank 0's weights into every rank's shards.
    """
    m = cfg.model
    if m.name == 'gpt':
        return ComposerGPT(m, cfg.seed, on_meta=cfg.fsdp is not None, initialize=initialize)
    with contextlib.nullcontext() if initialize else _no_init_weights():
        if m.name == 'hf_causal_lm':
            on_meta = cfg.fsdp is not None and dist.get_global_rank() != 0
            with torch.device('meta') if on_meta else contextlib.nullcontext():
                model, tokenizer = hf_model(m.pretrained_model_name_or_path, m.pretrained, m.config,
                                            read_weights=initialize and not on_meta)
            positions = getattr(model.config, 'max_position_embeddings', None)
            if positions is not None and positions < m.max_seq_len:
                raise ConfigError(f'config key model.max_seq_len: {m.max_seq_len} is more than the {positions} positions '
                                  'of the Hugging Face model')
            return HFCausalLM(model, tokenizer)
        return imported(m.factory or '', m.kwargs or {})


def _no_init_weights() -> contextlib.AbstractContextManager:
    from transformers.modeling_utils import no_init_weights

    return no_init_weights()


def hf_model(folder: str | None, pretrained: bool, inline: dict[str, Any] | None,
             read_weights: bool = True) -> tuple[Any, Any]:
    """A ``transformers`` causal LM and the folder's tokenizer, if it has one.

    From a local folder (its weights, or new ones of its architecture), or new of ``inline``. A
    ``pretrained`` model has ``from_pretrained``'s dtype (the default, fp32, whatever the folder was
    saved in) whether or not its weights are read: a resume and FSDP's meta ranks skip the read.
    """
    config = hf_config(folder, inline)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = None
    if folder is not None:
        path = Path(folder).expanduser()
        tokenizer = (AutoTokenizer.from_pretrained(path, local_files_only=True)
                     if (path / 'tokenizer_config.json').is_file() else None)
        if pretrained and read_weights:
            try:
                return AutoModelForCausalLM.from_pretrained(path, local_files_only=True), tokenizer
            except (OSError, ValueError) as e:
                raise ConfigError(f'config key model.pretrained_model_name_or_path: {path}: {str(e).splitlines()[0]}') from None
    try:
        model = AutoModelForCausalLM.from_config(config, **({'torch_dtype': torch.get_default_dtype()} if pretrained else {}))
    except ValueError as e:  # not a causal LM
        raise ConfigError(f'config key model.config: {str(e).splitlines()[0][:300]}') from None
    model.tie_weights()  # what from_pretrained does: under no_init_weights, post_init ties nothing
    return model, tokenizer


def hf_config(folder: str | None, inline: dict[str, Any] | None) -> Any:
    """The ``transformers`` config of a local folder's model, or of ``inline`` (its ``model_type`` and fields)."""
    os.environ.setdefault('HF_HUB_OFFLINE', '1')  # a cluster's pod has no hub: never try
    from transformers import CONFIG_MAPPING, AutoConfig

    if folder is not None:
        path = Path(folder).expanduser()
        try:
            return AutoConfig.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ConfigError(f'config key model.pretrained_model_name_or_path: {path}: {str(e).splitlines()[0]}') from None
    inline = dict(inline or {})
    model_type = inline.pop('model_type')
    if model_type not in CONFIG_MAPPING:
        raise ConfigError(f'config key model.config.model_type: {model_type!r} is not an architecture transformers '
                          'knows (gpt2, llama, mistral, qwen2, ...)')
    try:
        return AutoConfig.for_model(model_type, **inline)
    except ValueError as e:  # a field the architecture refuses
        raise ConfigError(f'config key model.config: {str(e).splitlines()[0][:300]}') from None


def check_vocabulary(cfg: TrainConfig, dataset: dict[str, Any]) -> None:
    """Refuse data whose token ids the model cannot embed (an index error mid-step; on a GPU a device-side assert).

    ``dataset`` is the data's ``prefix_dataset.json`` ({} when it has none: nothing to check); an imported
    model's vocabulary is its own business.
    """
    if 'vocab_size' not in dataset or cfg.model.name not in ('gpt', 'hf_causal_lm'):
        return
    m = cfg.model
    if m.name == 'gpt':
        model_vocab, fix = m.vocab_size, f'set model.vocab_size={dataset["vocab_size"]}'
    else:
        model_vocab = getattr(hf_config(m.pretrained_model_name_or_path, m.config), 'vocab_size', None)
        fix = "prepare the data with the model's tokenizer (python -m prefix.data --tokenizer ...)"
    if model_vocab is not None and dataset['vocab_size'] > model_vocab:
        raise ConfigError(f'the dataset {cfg.data.remote or cfg.data.local} holds token ids up to '
                          f'{dataset["vocab_size"] - 1} (tokenizer {dataset.get("tokenizer")}, {dataset["vocab_size"]} '
                          f'ids) but the model embeds {model_vocab}: {fix}')


class HFCausalLM(HuggingFaceModel):
    """A Hugging Face causal LM on prefix's batches, through Composer's ``HuggingFaceModel``.

    It reads tokens 0..L-1 and is scored on 1..L, as prefix's GPT is, so a sample of L+1 tokens
    needs only L positions. Composer keeps the model's config (and tokenizer) in every checkpoint,
    which is what ``prefix export`` turns back into a ``save_pretrained`` folder.
    """

    def __init__(self, model: Any, tokenizer: Any = None) -> None:
        super().__init__(model, tokenizer=tokenizer, metrics=[], shift_labels=True,
                         eval_metrics=[LanguageCrossEntropy(), LanguagePerplexity()])
        blocks = set(getattr(model, '_no_split_modules', None) or [])
        self.model.fsdp_wrap_fn = lambda module: type(module).__name__ in blocks  # FSDP: one unit a block
        self.model.activation_checkpointing_fn = self.model.fsdp_wrap_fn

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(input_ids=batch['input_ids'][:, :-1]).logits

    def loss(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor], *args: Any, **kwargs: Any) -> torch.Tensor:
        return F.cross_entropy(outputs.flatten(0, 1), batch['input_ids'][:, 1:].flatten())

    def eval_forward(self, batch: dict[str, torch.Tensor], outputs: Optional[torch.Tensor] = None) -> torch.Tensor:
        return outputs if outputs is not None else self.forward(batch)

    def update_metric(self, batch: dict[str, torch.Tensor], outputs: torch.Tensor, metric: Any) -> None:
        metric.update(outputs, batch['input_ids'][:, 1:].contiguous())


def imported(factory: str, kwargs: dict[str, Any]) -> ComposerModel:
    """``module.path:function`` called with ``kwargs``: a team's own ComposerModel."""
    module_name, _, attribute = factory.partition(':')
    if not module_name or not attribute:
        raise ConfigError(f"config key model.factory: {factory!r} is not of the form 'module.path:function'")
    try:
        function = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f'config key model.factory: cannot import {factory} ({e}); is its module on PYTHONPATH?') from None
    model = function(**kwargs)
    if not isinstance(model, ComposerModel):
        raise ConfigError(f'config key model.factory: {factory} returned a {type(model).__name__}, not a ComposerModel')
    return model
