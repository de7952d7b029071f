"""The Composer face of the model: next-token loss, and cross-entropy and perplexity on eval."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from composer.metrics.nlp import LanguageCrossEntropy, LanguagePerplexity
from composer.models import ComposerModel

from prefix.models.gpt import GPT, ModelConfig


class ComposerGPT(ComposerModel):
    """Composer wrapper: batches are ``{'input_ids': (B, L+1)}``; predicts tokens 1..L from 0..L-1."""

    def __init__(self, cfg: ModelConfig, seed: int = 0, on_meta: bool = False, initialize: bool = True) -> None:
        """``on_meta``: build the GPT on the meta device, for FSDP to shard and initialize (the metrics stay real).
        ``initialize=False``: draw no initial weights (a resume loads them all)."""
        super().__init__()
        with torch.device('meta') if on_meta or not initialize else contextlib.nullcontext():
            self.model = GPT(cfg, seed, initialize)
        if not initialize and not on_meta:
            self.model.to_empty(device='cpu')
            self.model.tie_weights()
        self.train_metrics: dict[str, Any] = {}  # the training loss is logged already
        self.val_metrics = {
            'LanguageCrossEntropy': LanguageCrossEntropy(),
            'LanguagePerplexity': LanguagePerplexity(),
        }
        # The weights a token is multiplied by: all but the position table (a lookup); the tied head counts once.
        self.matmul_params = self.num_parameters() - self.model.pos_emb.weight.numel()

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(batch['input_ids'][:, :-1])

    def loss(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor], *args: Any, **kwargs: Any) -> torch.Tensor:
        targets = batch['input_ids'][:, 1:]
        return F.cross_entropy(outputs.reshape(-1, outputs.size(-1)), targets.reshape(-1))

    def eval_forward(self, batch: dict[str, torch.Tensor], outputs: Any = None) -> torch.Tensor:
        return outputs if outputs is not None else self.forward(batch)

    def get_metrics(self, is_train: bool = False) -> dict[str, Any]:
        return self.train_metrics if is_train else self.val_metrics

    def update_metric(self, batch: dict[str, torch.Tensor], outputs: torch.Tensor, metric: Any) -> None:
        metric.update(outputs, batch['input_ids'][:, 1:].contiguous())

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_batch(self, batch: dict[str, torch.Tensor]) -> int:
        """A training step's FLOPs on ``batch``, for Composer's SpeedMonitor to report MFU: per token, 6 per weight
        (forward 2, backward 4) and 12 * n_layers * d_model per position attended (scores and their sum; the causal
        mask not subtracted, the convention MFU figures are quoted in)."""
        samples, tokens = batch['input_ids'].shape[0], batch['input_ids'].shape[1] - 1
        cfg = self.model.cfg
        return samples * tokens * (6 * self.matmul_params + 12 * cfg.n_layers * cfg.d_model * tokens)
