"""FSDP2 for models that do not fit one GPU: Composer's FSDP2 from the ``fsdp:`` block of the config.

The model is built on the meta device (no rank holds it whole), Composer shards each block
(``GPT.fsdp_wrap_fn``) and the root, and ``GPT.param_init_fn`` fills each rank's shards with the
values a model built whole would have. Checkpoints of a sharded model are written sharded by default
(``prefix.checkpoint.shards``).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as tdist
from composer.utils.parallelism import FSDP2Config
from torch.distributed.fsdp import FSDPModule

from prefix.config import TrainConfig


def parallelism_config(cfg: TrainConfig) -> Optional[dict[str, Any]]:
    """Composer's ``parallelism_config`` for the run: FSDP2, or None for plain data parallelism."""
    if cfg.fsdp is None:
        return None
    return {'fsdp': FSDP2Config(
        reshard_after_forward=cfg.fsdp.reshard_after_forward,
        mixed_precision=cfg.fsdp.mixed_precision,
        activation_checkpointing=cfg.fsdp.activation_checkpointing,
        activation_cpu_offload=cfg.fsdp.activation_cpu_offload,
        state_dict_type=cfg.checkpoint.format,
    )}


def average_gradients_on_gloo(model: torch.nn.Module) -> None:
    """Make FSDP2 average the gradients on gloo, as it does on NCCL.

    FSDP2 (torch 2.7) reduce-scatters fp32 gradients with ReduceOp.AVG, which gloo carries out as a
    sum (pytorch/pytorch#162338): gradients came out world-size times too large. Each FSDP module
    divides its reduced shard by the world size; on NCCL nothing is changed.
    """
    if not tdist.is_initialized() or tdist.get_backend() != 'gloo' or tdist.get_world_size() == 1:
        return
    world_size = tdist.get_world_size()
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_all_reduce_hook(lambda reduced: reduced.div_(world_size))
