"""The learning-rate schedule: raising max_duration on resume warns of the jump; optimizer.decay_end extends without one."""

import math
import re
from pathlib import Path

import pytest
import torch
from composer.core import Timestamp
from conftest import copy_run, run_train, smoke_args

from prefix.config.config import TrainConfig, to_dict
from prefix.schedule import lr_at

LR, FLOOR = 3.0e-3, 3.0e-4  # yamls/smoke.yaml: optimizer.lr and lr * min_lr_ratio


def at(step: int) -> dict[str, int]:
    return Timestamp(batch=step, batch_in_epoch=step).state_dict()


def config(max_duration: str, decay_end: str | None = None) -> dict:
    cfg = to_dict(TrainConfig(run_name='r', max_duration=max_duration))
    cfg['optimizer'].update(warmup='5ba', min_lr_ratio=0.1, decay_end=decay_end)
    return cfg


def test_decay_end_keeps_the_old_schedule_and_then_the_floor() -> None:
    old, extended = config('22ba'), config('44ba', decay_end='22ba')
    assert [lr_at(extended, LR, at(s), None) for s in range(23)] == [lr_at(old, LR, at(s), None) for s in range(23)]
    assert {lr_at(extended, LR, at(s), None) for s in range(22, 45)} == {lr_at(old, LR, at(22), None)}
    assert lr_at(old, LR, at(22), None) == pytest.approx(FLOOR)
    assert lr_at(config('44ba'), LR, at(22), None) > 6 * FLOOR, 'without it the cosine is stretched: a jump'


@pytest.mark.slow
@pytest.mark.parametrize('recipe', [(), ('optimizer.decay_end=22ba',)], ids=['raised', 'raised-with-decay_end'])
def test_raising_max_duration_warns_of_the_jump_unless_decay_end_keeps_the_schedule(
        finished_run: Path, tmp_path: Path, dataset: Path, recipe: tuple[str, ...]) -> None:
    run = copy_run(finished_run, tmp_path)  # 22 steps of the smoke config, finished
    result = run_train(*smoke_args(tmp_path, dataset, 'max_duration=44ba', *recipe))
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if 'the learning rate at step' in line]
    latest = torch.load(run / 'checkpoints' / 'latest.pt', weights_only=True)
    set_lr = latest['state']['schedulers']['LambdaLR']['_last_lr'][0]  # what the trainer set after step 43
    assert set_lr == lr_at(latest['config'], LR, at(43), None), 'the warning computes the learning rate as training does'
    if recipe:
        assert warnings == [], 'the old end kept: no jump'
        assert set_lr == pytest.approx(FLOOR, rel=1e-12), 'the extension trains at the floor'
        return
    stretched = LR * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (22 - 5) / (44 - 5))))  # Composer's cosine, by hand
    assert len(warnings) == 1, result.stderr[-3000:]
    match = re.search(r'max_duration changed from 22ba to 44ba: the learning rate at step 22 jumps from (\S+) to (\S+) '
                      r'\(the cosine schedule now ends at 44ba\); to extend without a jump, set optimizer.decay_end=22ba',
                      warnings[0])
    assert match, warnings[0]
    assert float(match.group(1)) == pytest.approx(FLOOR, rel=0.05) and float(match.group(2)) == pytest.approx(stretched, rel=0.05)


def test_a_changed_lr_becomes_the_base_of_every_group_and_scheduler_keeping_the_multiplier() -> None:
    """What a resume does after Composer restored the checkpoint's base learning rate (3e-3) at a multiplier of 0.5."""
    from composer.optim import DecoupledAdamW

    from prefix.schedule import use_lr

    optimizer = DecoupledAdamW([torch.nn.Parameter(torch.ones(2))], lr=LR)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
    group = optimizer.param_groups[0]
    use_lr([optimizer], [scheduler], LR)
    assert (group['lr'], group['initial_lr'], scheduler.base_lrs) == (LR / 2, LR, [LR]), 'unchanged: nothing changes'
    use_lr([optimizer], [scheduler], 1e-3)
    assert scheduler.base_lrs == [1e-3] and group['initial_lr'] == 1e-3
    assert group['lr'] == pytest.approx(0.5e-3), 'the step about to run already trains at the new rate'
    scheduler.step()
    assert group['lr'] == pytest.approx(0.5e-3)


@pytest.mark.slow
def test_a_changed_lr_takes_effect_at_the_resume_step_with_one_line(finished_run: Path, tmp_path: Path, dataset: Path) -> None:
    """Lowering the learning rate after a loss spike: the records and the optimizer agree on the new rate."""
    run = copy_run(finished_run, tmp_path)  # 22 steps of the smoke config, finished at the floor (3e-4)
    result = run_train(*smoke_args(tmp_path, dataset, 'max_duration=26ba', 'optimizer.decay_end=22ba', 'optimizer.lr=1e-3'))
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if 'the learning rate at step' in line]
    assert len(warnings) == 1 and 'optimizer.lr changed from 0.003 to 0.001' in warnings[0], result.stderr[-3000:]
    assert 'the learning rate at step 22 jumps from 3.0e-04 to 1.0e-04' in warnings[0], warnings[0]
    latest = torch.load(run / 'checkpoints' / 'latest.pt', weights_only=True)
    scheduler = latest['state']['schedulers']['LambdaLR']
    groups = latest['state']['optimizers']['DecoupledAdamW']['param_groups']
    assert scheduler['base_lrs'] == [1e-3] and all(g['initial_lr'] == 1e-3 for g in groups)
    assert scheduler['_last_lr'][0] == pytest.approx(1e-4, rel=1e-12) and all(g['lr'] == pytest.approx(1e-4) for g in groups)
