"""Models as teams bring them, for ``model.name=import`` (``model.factory=zoo:mixed``, with tests/models on PYTHONPATH).

``mixed`` is a small causal LM whose state is not all one dtype, as a real model's rarely is: a
BatchNorm (fp32 running statistics and an int64 ``num_batches_tracked``), a bf16 parameter (and so
bf16 optimizer moments), a bool buffer that training updates, an empty buffer, a non-persistent buffer,
and an embedding tied to the output head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from composer.metrics.nlp import LanguageCrossEntropy
from composer.models import ComposerModel


class Gate(torch.nn.Module):
    """A bf16 parameter in a module of its own: FSDP2 shards a unit's parameters as one dtype."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(dim, dtype=torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.float()


class MixedNet(torch.nn.Module):
    def __init__(self, vocab_size: int, dim: int) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(vocab_size, dim)
        self.norm = torch.nn.BatchNorm1d(dim)
        self.gate = Gate(dim)
        self.mix = torch.nn.Linear(dim, dim)
        self.drop = torch.nn.Dropout(0.1)
        self.head = torch.nn.Linear(dim, vocab_size, bias=False)
        self.head.weight = self.emb.weight
        self.register_buffer('seen', torch.zeros(vocab_size, dtype=torch.bool))
        self.register_buffer('nothing', torch.zeros(0, dim))
        self.register_buffer('positions', torch.arange(4096), persistent=False)
        self.fsdp_wrap_fn = lambda module: isinstance(module, Gate)  # Composer wraps this module and each Gate

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.seen[ids.flatten()] = True
        x = self.norm(self.emb(ids).transpose(1, 2)).transpose(1, 2)
        x = x + 1e-3 * (self.positions[:ids.shape[1]] % 7).float()[:, None] + self.nothing.sum()
        return self.head(self.drop(torch.tanh(self.mix(self.gate(x)))))


class MixedLM(ComposerModel):
    """The network is one child, as in Composer's HuggingFaceModel: Composer's FSDP2 wraps a ComposerModel's children."""

    def __init__(self, vocab_size: int = 257, dim: int = 16) -> None:
        super().__init__()
        self.net = MixedNet(vocab_size, dim)
        self.val = {'LanguageCrossEntropy': LanguageCrossEntropy()}

    def forward(self, batch: dict) -> torch.Tensor:
        return self.net(batch['input_ids'][:, :-1])

    def loss(self, outputs: torch.Tensor, batch: dict) -> torch.Tensor:
        return F.cross_entropy(outputs.flatten(0, 1).float(), batch['input_ids'][:, 1:].flatten())

    def eval_forward(self, batch: dict, outputs: torch.Tensor | None = None) -> torch.Tensor:
        return outputs if outputs is not None else self.forward(batch)

    def get_metrics(self, is_train: bool = False) -> dict:
        return {} if is_train else self.val

    def update_metric(self, batch: dict, outputs: torch.Tensor, metric) -> None:
        metric.update(outputs, batch['input_ids'][:, 1:].contiguous())


def mixed(vocab_size: int = 257, dim: int = 16) -> MixedLM:
    return MixedLM(vocab_size, dim)
