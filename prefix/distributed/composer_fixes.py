"""Narrow corrections to Composer 0.32.1, applied on import (``prefix.train`` imports this module).

Each names the function it corrects and why, so that a Composer upgrade knows what to re-check.
"""

from __future__ import annotations

import functools
import random
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional, Union

import composer.core.state
import composer.distributed.prepare_distributed
import composer.utils.checkpoint
import torch
from composer.utils import dist

# composer.core.state.get_composer_env_dict: State.state_dict() rescans the installed packages for
# checkpoint metadata (about 45 ms, most of a small model's checkpoint), although the answer cannot
# change within a process. Ask once.
composer.core.state.get_composer_env_dict = functools.cache(composer.core.state.get_composer_env_dict)

# composer.core.state.State.load_state_dict warns for every callback of this start that the checkpoint
# does not hold: the progress bar of a start on a terminal after one that logged to a file, a monitor
# added since. Such a callback starts fresh, which is what a reader of the warning would want anyway.
warnings.filterwarnings('ignore', message='.* is not in the state_dict. Its state will not be restored.',
                        category=UserWarning)


# composer.utils.dist.get_node_signal_file_name: the file the ranks of one node wait for during
# autoresume is named by rank 0 and broadcast, so it has the same name on every node. In a save folder
# the nodes share (one PVC), every node's local rank 0 then writes and removes the same file, and all
# but one fail (FileNotFoundError in Trainer._get_autoresume_checkpoint). Keep rank 0's random part
# and name the file after this node again.
_signal_file_name = dist.get_node_signal_file_name


def _signal_file_of_this_node(rng: Optional[random.Random] = None) -> str:
    shared = _signal_file_name(rng)
    return f'._signal_file_node{dist.get_node_rank()}_{shared.rsplit("_", 1)[1]}'


dist.get_node_signal_file_name = _signal_file_of_this_node


# composer.utils.checkpoint._torch_load_with_validation: every rank torch.loads the whole checkpoint into
# memory of its own. Memory-mapped, the ranks of a node share one copy in the page cache, which the
# CRC check of the node's local rank 0 has just filled (prefix.checkpoint.checkpoint): latest.pt is read once per
# node, whatever the number of ranks.
def _load_mapped(checkpoint_filepath: Union[Path, str], map_location: str) -> Any:
    path = composer.utils.checkpoint._ensure_valid_checkpoint(checkpoint_filepath)
    return torch.load(path, map_location=map_location, weights_only=True, mmap=True)


composer.utils.checkpoint._torch_load_with_validation = _load_mapped


# composer.distributed.param_init.meta_init (as prepare_distributed calls it): materializes a module
# built on the meta device with to_empty(device='cuda'), so FSDP2's meta-device initialization fails
# on a CPU run. The same walk (children first, each module's own param_init_fn), on this rank's
# device.


def _meta_init_on_this_device(module: torch.nn.Module, param_init_fn: Optional[Callable[[torch.nn.Module], None]] = None,
                              ) -> None:
    init = getattr(module, 'param_init_fn', param_init_fn)
    for child in module.children():
        _meta_init_on_this_device(child, init)
    own = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
    if any(t.is_meta for t in own):
        if init is None:
            raise ValueError(f'{type(module).__name__} was built on the meta device but nothing can initialize it: '
                             'give the model a param_init_fn(module)')
        module.to_empty(device=torch.device('cuda', torch.cuda.current_device()) if torch.cuda.is_available() else 'cpu',
                        recurse=False)
        init(module)


composer.distributed.prepare_distributed.meta_init = _meta_init_on_this_device
