"""The learning-rate schedule, built from the config; and the jump a resume with another schedule makes.

The schedule is Composer's cosine with linear warmup: a multiplier of the learning rate that Composer
evaluates after every step from the run's progress, rising over ``optimizer.warmup`` and decaying to
``optimizer.min_lr_ratio`` at ``max_duration``. Raising ``max_duration`` to train a run further therefore
stretches the cosine to the new end, and the learning rate jumps at the resume step (from its floor back
up, for a finished run). ``optimizer.decay_end`` ends the cosine somewhere else: set to the old end, the
extended run goes on at the floor, without a jump (docs/changing-a-run.md).

``optimizer.lr`` is what the multiplier multiplies. Composer restores it from a checkpoint (its
scheduler's ``base_lrs``, each parameter group's ``initial_lr``), so a resume with another value would
train on at the old one; ``ConfiguredLR`` makes this start's value the one trained with, from the
resume step on, and ``warn_of_jump`` names the change in one line.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any, Optional

from composer.core import Callback, State, Time, Timestamp
from composer.loggers import Logger
from composer.optim import ComposerScheduler, CosineAnnealingWithWarmupScheduler

from prefix.checkpoint import ResumePoint
from prefix.config import OptimizerConfig, diff

log = logging.getLogger(__name__)

# What the learning rate is made of in the config.
KEYS = ('optimizer.lr', 'max_duration', 'optimizer.warmup', 'optimizer.min_lr_ratio', 'optimizer.decay_end')
END_KEYS = ('max_duration', 'optimizer.decay_end')


@dataclass
class Progress:
    """What Composer's schedulers read of the trainer's State: where training stands and where it ends."""

    max_duration: Time
    timestamp: Timestamp
    dataloader_len: Optional[int]  # batches per epoch: for durations in epochs


class CosineWithWarmup(ComposerScheduler):
    """Composer's ``CosineAnnealingWithWarmupScheduler``, ending at ``decay_end`` instead of ``max_duration`` when
    that is set; past ``decay_end`` the multiplier stays at ``alpha_f`` (Composer's own ``t_max`` may not end
    before ``max_duration``, so the cosine is given ``decay_end`` as the duration it spans)."""

    def __init__(self, t_warmup: str, alpha_f: float, decay_end: Optional[str] = None) -> None:
        self.cosine = CosineAnnealingWithWarmupScheduler(t_warmup=t_warmup, alpha_f=alpha_f)
        self.decay_end = decay_end

    def __call__(self, state: State, ssr: float = 1.0) -> float:
        if self.decay_end is not None:
            state = Progress(Time.from_timestring(self.decay_end), state.timestamp, state.dataloader_len)  # type: ignore[assignment]
        return self.cosine(state, ssr)


def build(opt: OptimizerConfig) -> CosineWithWarmup:
    """The run's scheduler, as the Trainer gets it."""
    return CosineWithWarmup(opt.warmup, opt.min_lr_ratio, opt.decay_end)


class ConfiguredLR(Callback):
    """This start's ``optimizer.lr`` is the learning rate trained with, on a resume too (after the checkpoint is loaded)."""

    def __init__(self, lr: float) -> None:
        self.lr = lr

    def fit_start(self, state: State, logger: Logger) -> None:
        use_lr(state.optimizers, state.schedulers, self.lr)


def use_lr(optimizers: Any, schedulers: Any, lr: float) -> None:
    """Make ``lr`` the base of every scheduler and parameter group, the step about to run included.

    Each group's current rate is rescaled (the schedule's multiplier kept), and so is its ``initial_lr``,
    which DecoupledAdamW's weight decay divides by. With ``lr`` unchanged nothing changes, bit for bit.
    """
    for scheduler in schedulers:
        scheduler.base_lrs = [lr for _ in scheduler.base_lrs]
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            base = group.get('initial_lr', lr)
            if base != lr:
                group['lr'] = group['lr'] / base * lr
                group['initial_lr'] = lr


def _optimizer(config: dict[str, Any]) -> OptimizerConfig:
    """The optimizer settings of a resolved config (a checkpoint's: a key it predates takes its default)."""
    names = {f.name for f in dataclasses.fields(OptimizerConfig)}
    return OptimizerConfig(**{k: v for k, v in config['optimizer'].items() if k in names})


def lr_at(config: dict[str, Any], lr: float, timestamp: dict[str, int], dataloader_len: Optional[int]) -> float:
    """The learning rate that ``config``'s schedule sets at ``timestamp`` (a checkpoint's), ``lr`` its base."""
    progress = Timestamp()
    progress.load_state_dict(timestamp)
    state = Progress(Time.from_timestring(config['max_duration']), progress, dataloader_len)
    return lr * build(_optimizer(config))(state)  # type: ignore[arg-type]


def warn_of_jump(resume: ResumePoint, config: dict[str, Any], dataloader_len: Optional[int]) -> Optional[str]:
    """Warn, in one line, when ``config``'s schedule sets another learning rate at the resume step than the
    schedule the checkpoint was written with; the line, or None."""
    changed = {k: v for k, v in diff(resume.config, config).items() if k in KEYS}
    lr = resume.lr if resume.lr is not None else resume.config['optimizer']['lr']
    if lr != config['optimizer']['lr']:  # the rate trained with: an older prefix kept the first start's
        changed['optimizer.lr'] = (lr, config['optimizer']['lr'])
    if not changed:
        return None
    old = lr_at(resume.config, lr, resume.timestamp, dataloader_len)
    new = lr_at(config, config['optimizer']['lr'], resume.timestamp, dataloader_len)
    if math.isclose(old, new, rel_tol=1e-9):
        return None
    listed = '; '.join(f'{k} changed from {_show(o)} to {_show(n)}' for k, (o, n) in changed.items())
    line = f'{listed}: the learning rate at step {resume.global_step} jumps from {old:.1e} to {new:.1e}'
    if set(changed) <= set(END_KEYS):
        old_end = _end(resume.config)
        floor = lr * _optimizer(resume.config).min_lr_ratio
        line += (f' (the cosine schedule now ends at {_end(config)}); to extend without a jump, set '
                 f'optimizer.decay_end={old_end} as well: the cosine then ends where it did, and the learning rate '
                 f'stays at {floor:.1e} after it')
    log.warning(line)
    return line


def _end(config: dict[str, Any]) -> str:
    return _optimizer(config).decay_end or config['max_duration']


def _show(value: Any) -> str:
    return 'null' if value is None else str(value)
