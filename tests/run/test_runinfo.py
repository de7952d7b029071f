"""Goodput from start and metric records: which start a metric belongs to, what a kill cost."""

from prefix.run.runinfo import LOSS, goodput


def metric(step: int, t: float) -> dict:
    return {'step': step, 'time': t, LOSS: 1.0}


def test_steps_trained_after_the_last_checkpoint_of_a_killed_start_are_lost() -> None:
    # Start 1 trains steps 0-13 (0.1 s each from t=105), is killed after step 13; start 2 resumes from
    # step 10, whose process started right after the kill. Its recorded process start may be early:
    # only its start of training (``unix``) separates the two starts' metrics.
    first = {'unix': 105.0, 'process_start': 100.0, 'start_step': 0, 'end': None}
    second = {'unix': 112.0, 'process_start': 106.0, 'start_step': 10,
              'end': {'unix': 113.0, 'reason': 'preempted'}}
    metrics = [metric(s, 105.0 + 0.1 * (s + 1)) for s in range(14)]
    metrics += [metric(s, 112.0 + 0.1 * (s - 9)) for s in range(10, 15)]
    g = goodput([first, second], metrics, running=False)
    assert abs(g['lost_s'] - 0.4) < 1e-9, 'steps 11-14 of the first start were trained again'
    assert abs(g['startup_s'] - 11.0) < 1e-9 and g['waiting_s'] == 0.0
    assert abs(g['startup_s'] + g['lost_s'] + g['kept_s'] + g['checkpoint_s'] - g['total_s']) < 1e-9
