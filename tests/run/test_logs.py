"""logs/metrics.jsonl: written once a step, and everything logged before a checkpoint's commit is in it by then."""

import json
from pathlib import Path

from composer.utils import dist

from prefix.distributed.agreement import RankFailures
from prefix.run.logs import MetricsLogger


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_steps_lines_are_written_at_its_end_and_after_an_evaluation(tmp_path: Path) -> None:
    assert dist.get_global_rank() == 0
    path = tmp_path / 'metrics.jsonl'
    logger = MetricsLogger(path, RankFailures())
    logger.init(None, None)
    logger.log_metrics({'loss/train/total': 2.5}, step=3)
    logger.log_metrics({'time/batch': 3}, step=3)
    assert path.read_text() == '', 'buffered within the step'
    logger.batch_end(None, None)  # before batch_checkpoint, where a checkpoint is committed
    assert [(r['step'], set(r) - {'step', 'time'}) for r in lines(path)] == [(3, {'loss/train/total'}), (3, {'time/batch'})]
    logger.log_metrics({'metrics/val/LanguageCrossEntropy': float('nan')}, step=3)
    logger.eval_end(None, None)
    assert lines(path)[-1]['metrics/val/LanguageCrossEntropy'] == 'nan'
    logger.log_metrics({'checkpoint/step': 3}, step=3)  # a checkpoint's report, after the commit
    logger.close(None, None)
    assert lines(path)[-1] == {'step': 3, 'time': lines(path)[-1]['time'], 'checkpoint/step': 3}
