"""The model's keys (``model.*``): the same for every model a config can name, so that the config knows them all
and ``prefix.models.gpt`` can be built from a checkpoint's ``config['model']`` where only torch is installed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from prefix.config.schema import setting


@dataclass
class ModelConfig:
    """The model; every field is a YAML key under ``model`` (``prefix.models.registry`` builds it).

    ``name``: ``gpt``, prefix's transformer (``prefix.models.gpt``), shaped by the fields up to ``dropout``;
    ``hf_causal_lm``, a Hugging Face causal LM: from a local folder (``pretrained_model_name_or_path``,
    with its weights when ``pretrained``) or new, of an architecture given inline (``config``:
    ``{model_type: gpt2, n_layer: 2, ...}``); ``import``, a ComposerModel of a team's own code:
    ``factory`` (``module.path:function``) called with ``kwargs``. ``max_seq_len`` bounds the samples
    for every model.
    """

    name: str = setting('gpt', choices=('gpt', 'hf_causal_lm', 'import'))
    vocab_size: int = 257
    max_seq_len: int = 128
    d_model: int = 128
    n_heads: int = 4
    n_layers: int = 4
    dropout: float = 0.0
    pretrained_model_name_or_path: Optional[str] = None
    pretrained: bool = False
    config: Optional[dict[str, Any]] = None
    factory: Optional[str] = None
    kwargs: Optional[dict[str, Any]] = None
