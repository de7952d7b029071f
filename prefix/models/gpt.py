"""A small decoder-only transformer language model in plain PyTorch.

Readable top to bottom in the spirit of nanoGPT: pre-norm blocks of causal self-attention and an
MLP, tied input/output embeddings. It imports nothing but torch and its config's dataclass
(``prefix.config.ModelConfig``), so a checkpoint's weights can be used where only torch is installed;
``prefix.models.composer_model`` wraps it for training.
"""

from __future__ import annotations

import hashlib
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from prefix.config import ModelConfig


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_heads, c // self.n_heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0,
        )
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(b, t, c)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.d_model, 4 * cfg.d_model),
            nn.GELU(),
            nn.Linear(4 * cfg.d_model, cfg.d_model),
            nn.Dropout(cfg.dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Built on the meta device (``torch.device('meta')``), it allocates nothing: FSDP shards it, then
    ``param_init_fn`` gives each rank its shard of the same initial weights as a model built whole.

    ``initialize=False`` (a resume, which loads every weight): nothing is drawn, the memory is left as allocated.
    """

    def __init__(self, cfg: ModelConfig, seed: int = 0, initialize: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        self.seed = seed
        self.initialize = initialize
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.tie_weights()
        # Each parameter by (module, name) -> its first name: a tied weight is initialized by one name.
        first: dict[int, str] = {}
        self._names = {
            (module, name): first.setdefault(id(param), f'{prefix}.{name}' if prefix else name)
            for prefix, module in self.named_modules() for name, param in module.named_parameters(recurse=False)
        }
        if not any(p.is_meta for p in self.parameters()):
            for module in self.modules():
                self.param_init_fn(module)

    def tie_weights(self) -> None:
        """The output projection is the input embedding (again after ``to_empty``, which gives each name its own tensor)."""
        self.head.weight = self.tok_emb.weight

    def param_init_fn(self, module: nn.Module) -> None:
        """Initialize ``module``'s own parameters, whole or as this rank's shard (a DTensor) of the same values.

        Every parameter draws from generators seeded with the model's seed and its name, so the values
        do not depend on the order modules are initialized in, nor on how the model is sharded; a shard
        of rows draws only what it holds.
        """
        if not self.initialize:
            return
        for name, param in module.named_parameters(recurse=False):
            seed = _seed_of(self.seed, self._names[(module, name)])
            with torch.no_grad():
                if isinstance(param, DTensor):
                    local = param.to_local()
                    rows = _rows_of(param)
                    if rows is not None:
                        local.copy_(initial_value(module, name, tuple(param.shape), seed, rows))
                    else:  # sharded other than by rows: draw the whole, keep this rank's part
                        whole = initial_value(module, name, tuple(param.shape), seed)
                        local.copy_(distribute_tensor(whole, param.device_mesh, param.placements, src_data_rank=None).to_local())
                else:
                    param.copy_(initial_value(module, name, tuple(param.shape), seed))

    def fsdp_wrap_fn(self, module: nn.Module) -> bool:
        """FSDP shards each block apart (Composer asks), so one block at a time is gathered whole."""
        return isinstance(module, Block)

    def activation_checkpointing_fn(self, module: nn.Module) -> bool:
        """With activation checkpointing on, each block's activations are recomputed in the backward pass."""
        return isinstance(module, Block)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.cfg.max_seq_len:
            raise ValueError(f'sequence of {t} tokens exceeds model.max_seq_len={self.cfg.max_seq_len}')
        pos = torch.arange(t, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def _seed_of(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f'{seed}/{name}'.encode()).digest()[:8], 'little')


CHUNK = 1 << 20  # elements drawn from one generator: a shard draws the chunks it overlaps, never the whole


def initial_value(module: nn.Module, name: str, shape: tuple[int, ...], seed: int,
                  rows: Optional[tuple[int, int]] = None) -> torch.Tensor:
    """A parameter's initial value, whole or rows ``[start, stop)`` of it: N(0, 0.02) weights of linear and
    embedding layers, zero biases, unit norms.

    Random weights are drawn in chunks of ``CHUNK`` elements of the flattened tensor, chunk ``i`` from a
    generator seeded ``seed + i``: rows of it are the same values as those rows of the whole, drawn at a cost
    proportional to the rows (a 70B model's start draws 1/N of it per rank, not all of it).
    """
    start, stop = rows if rows is not None else (0, shape[0] if shape else 1)
    local = (stop - start, *shape[1:]) if shape else ()
    if name == 'weight' and isinstance(module, nn.LayerNorm):
        return torch.ones(local)
    if not (name == 'weight' and isinstance(module, (nn.Linear, nn.Embedding))):
        return torch.zeros(local)
    per_row, total = math.prod(shape[1:]), math.prod(shape)
    first, last = start * per_row, stop * per_row  # the flattened range to draw
    chunks = []
    for i in range(first // CHUNK, -(-last // CHUNK)):
        size = min(CHUNK, total - i * CHUNK)  # each chunk drawn at its full size: values depend on the size drawn
        drawn = torch.empty(size).normal_(0.0, 0.02, generator=torch.Generator().manual_seed((seed + i) % 2**63))
        chunks.append(drawn[max(first - i * CHUNK, 0):last - i * CHUNK])
    return torch.cat(chunks).view(local) if chunks else torch.empty(local)


def _rows_of(param: DTensor) -> Optional[tuple[int, int]]:
    """The rows ``[start, stop)`` this rank's shard holds, when it holds whole rows (FSDP's Shard(0)); else None."""
    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    if tuple(shape[1:]) != tuple(param.shape[1:]) or not shape:
        return None
    return offset[0], offset[0] + shape[0]
