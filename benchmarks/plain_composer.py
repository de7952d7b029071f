"""What a user would run instead of prefix: Composer's own Trainer with ``autoresume=True`` and a ``save_interval``.

    composer [-n N] benchmarks/plain_composer.py CONFIG.yaml [key=value ...]

The benchmarks run it side by side with ``prefix.train`` on the same experiment: the YAML and overrides
are read by prefix's config loader (the only prefix code here besides the model), and the script builds
the same model (prefix's GPT), data (MDS shards through Streaming), optimizer, cosine schedule, gradient
clipping and batch, as a short Composer script does. Checkpoints go to
``<runs_root>/<run_name>/composer/`` every ``checkpoint.interval`` batches (Composer's synchronous saver);
a restart of the same command resumes from the newest. No corrections to Composer, no callbacks, no
preemption handling beyond Composer's (SIGTERM exits at once, 143).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from composer import Trainer
from composer.algorithms import GradientClipping
from composer.devices import DeviceCPU, DeviceGPU
from composer.optim import CosineAnnealingWithWarmupScheduler, DecoupledAdamW
from composer.utils import dist, reproducibility
from streaming import StreamingDataLoader, StreamingDataset

from prefix.config.config import load_config
from prefix.config.duration import Duration
from prefix.models.composer_model import ComposerGPT


def loader(cfg, split: str, batch_size: int, train: bool) -> StreamingDataLoader:
    dataset = StreamingDataset(local=cfg.data.local, remote=cfg.data.remote, split=split, shuffle=train and cfg.data.shuffle,
                               shuffle_seed=cfg.seed, batch_size=batch_size, num_canonical_nodes=cfg.data.num_canonical_nodes)

    def collate(samples: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
        return {'input_ids': torch.from_numpy(np.stack([s['input_ids'] for s in samples]).astype(np.int64))}

    return StreamingDataLoader(dataset, batch_size=batch_size, collate_fn=collate, num_workers=cfg.data.num_workers,
                               drop_last=train)


def main(argv: list[str]) -> None:
    cfg = load_config(argv[0], argv[1:])
    interval = Duration.parse(cfg.checkpoint.interval)
    if interval.batches is None:
        sys.exit(f'plain_composer: checkpoint.interval={cfg.checkpoint.interval}: give it in batches (e.g. 50ba)')
    reproducibility.configure_deterministic_mode()
    reproducibility.seed_all(cfg.seed)
    # Before the datasets, as llm-foundry's train script does: otherwise each StreamingDataset sets up and tears
    # down a process group of its own, and a rank that connects to one being torn down fails (seen here, 2 ranks).
    device = DeviceGPU() if torch.cuda.is_available() else DeviceCPU()
    dist.initialize_dist(device)
    batch = cfg.global_batch_size // dist.get_world_size()
    model = ComposerGPT(cfg.model, cfg.seed)
    opt = cfg.optimizer
    trainer = Trainer(
        model=model,
        train_dataloader=loader(cfg, cfg.data.train_split, batch, train=True),
        eval_dataloader=loader(cfg, cfg.data.val_split, batch, train=False),
        eval_interval=cfg.eval_interval,
        eval_subset_num_batches=cfg.eval_batches or -1,
        max_duration=cfg.max_duration,
        optimizers=DecoupledAdamW(model.parameters(), lr=opt.lr, betas=tuple(opt.betas), weight_decay=opt.weight_decay),
        schedulers=CosineAnnealingWithWarmupScheduler(t_warmup=opt.warmup, alpha_f=opt.min_lr_ratio),
        step_schedulers_every_batch=True,
        algorithms=[GradientClipping('norm', opt.grad_clip_norm)] if opt.grad_clip_norm > 0 else [],
        precision='amp_bf16' if torch.cuda.is_available() else 'fp32',
        device=device,
        seed=cfg.seed,
        run_name=cfg.run_name,
        autoresume=True,
        save_folder=str(Path(cfg.runs_root or '.') / cfg.run_name / 'composer'),
        save_interval=f'{interval.batches}ba',
        save_num_checkpoints_to_keep=1,
        progress_bar=False,
        log_to_console=True,
        console_log_interval=cfg.log_interval,
    )
    trainer.fit()
    trainer.close()


if __name__ == '__main__':
    main(sys.argv[1:])
