"""What the trackers get besides the loss: the config as flat hyperparameters, and the FLOPs behind MFU.

The per-step signals themselves are read back from a real run's trackers in test_loggers.py.
"""

from __future__ import annotations

import pytest
import torch

from prefix.config import ModelConfig, flatten
from prefix.models.composer_model import ComposerGPT
from prefix.trackers.hparams import Hyperparameters
from prefix.trackers.loggers import hparams_summary


def test_the_config_flattens_to_dotted_keys() -> None:
    config = {'seed': 17, 'optimizer': {'lr': 3e-3, 'betas': [0.9, 0.95]}, 'fsdp': None, 'model': {'kwargs': {}},
              'loggers': {'wandb': {'project': 'p'}}}
    assert flatten(config) == {'seed': 17, 'optimizer.lr': 3e-3, 'optimizer.betas': [0.9, 0.95], 'fsdp': None,
                               'loggers.wandb.project': 'p'}
    assert Hyperparameters(config).hyperparameters == {'seed': 17, 'optimizer.lr': 3e-3, 'optimizer.betas': [0.9, 0.95],
                                                       'fsdp': None}, "the trackers' own settings left out"


def test_tensorboard_hparams_keep_numbers_and_write_the_rest_as_text() -> None:
    from tensorboard.plugins.hparams import metadata

    summary = hparams_summary({'optimizer.lr': 3e-3, 'model.n_layers': 2, 'deterministic': True, 'fsdp': None,
                               'optimizer.betas': [0.9, 0.95], 'max_duration': '60ba'})
    (value,) = summary.value
    assert value.tag == metadata.SESSION_START_INFO_TAG
    hparams = metadata.parse_session_start_info_plugin_data(value.metadata.plugin_data.content).hparams
    assert {k: v.WhichOneof('kind') for k, v in hparams.items()} == {
        'optimizer.lr': 'number_value', 'model.n_layers': 'number_value', 'deterministic': 'string_value',
        'optimizer.betas': 'string_value', 'max_duration': 'string_value'}
    assert hparams['optimizer.lr'].number_value == 3e-3 and hparams['optimizer.betas'].string_value == '[0.9, 0.95]'


@pytest.mark.parametrize('seq_len', [64, 256])
def test_gpt_flops_per_batch_is_what_its_training_step_computes(seq_len: int) -> None:
    """MFU's numerator: within 2 % of the FLOPs torch counts in a forward and backward pass (which leave out the
    biases, norms and the causal mask's savings that the convention counts)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    model = ComposerGPT(ModelConfig(vocab_size=257, max_seq_len=seq_len, d_model=128, n_heads=4, n_layers=2,
                                    dropout=0.0))
    batch = {'input_ids': torch.randint(0, 257, (2, seq_len + 1))}
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):  # attention as matmuls torch counts
        model.loss(model(batch), batch).backward()
    assert model.flops_per_batch(batch) == pytest.approx(counter.get_total_flops(), rel=0.02)
