"""``prefix runs``, ``prefix show RUN`` and ``prefix plot RUN``: every run at a glance, one run in detail, its loss curve.

Read-only (``prefix.run.runinfo``); ``plot`` writes one PNG into the run's ``logs/``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

from prefix.config import default_runs_root
from prefix.errors import PrefixError, reader_gone_quietly
from prefix.files import jsonl
from prefix.run.rundir import RunDir
from prefix.run.runinfo import EVAL_LOSS, LOSS, SETUP_FAILED, details, failure, list_runs, pair_starts


def age(seconds: Optional[float]) -> str:
    if seconds is None:
        return '-'
    for unit, size in (('d', 86400), ('h', 3600), ('m', 60)):
        if seconds >= size:
            return f'{seconds / size:.0f}{unit}'
    return f'{seconds:.0f}s'


def text(value: Any) -> str:
    """A value as shown, ``-`` for one that is not there (never ``None``)."""
    return '-' if value is None else str(value)


def number(value: Optional[float]) -> str:
    if value is None:
        return '-'
    for suffix, size in (('G', 1e9), ('M', 1e6), ('k', 1e3)):
        if abs(value) >= size:
            return f'{value / size:.1f}{suffix}'
    return f'{value:g}'


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows, strict=False)]
    return '\n'.join('  '.join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows])


def runs_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog='prefix runs', description='List the runs under runs_root.')
    parser.add_argument('--root', type=Path, default=None, help='runs_root (default: $PREFIX_RUNS_ROOT or ./runs)')
    parser.add_argument('--json', action='store_true', help='one JSON list, for scripts')
    opts = parser.parse_args(argv)
    root = opts.root or Path(default_runs_root())
    if not root.is_dir():
        print(f'prefix: error: runs_root {root} does not exist', file=sys.stderr)
        return 1
    summaries = list_runs(root)
    if opts.json:
        print(json.dumps([s.as_dict() for s in summaries], indent=2))
        return 0
    rows = [[
        s.name, s.state, f'{text(s.step)}/{s.max_duration or "?"}', number(s.tokens_seen),
        f'{s.checkpoint_step} ({age(s.checkpoint_age_s)} ago)' if s.checkpoint_step is not None else '-',
        str(s.starts), str(s.redone_steps), f'{s.last_loss:.4f}' if isinstance(s.last_loss, float) else '-',
        '; '.join(filter(None, [s.error, *s.problems])),
    ] for s in summaries]
    print(table(['RUN', 'STATE', 'STEP', 'TOKENS', 'CHECKPOINT', 'STARTS', 'REDONE', 'LOSS', 'PROBLEMS'], rows))
    if not summaries:
        print(f'(no runs under {root})')
    return 0


def find_run(root: Path, name: str) -> RunDir:
    run = RunDir.for_run(str(root), name)
    if not run.meta.is_dir():
        raise FileNotFoundError(f'no run {name!r} under {root} (see `prefix runs --root {root}`)')
    return run


def show_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog='prefix show', description="One run's details and goodput.")
    parser.add_argument('run_name')
    parser.add_argument('--root', type=Path, default=None, help='runs_root (default: $PREFIX_RUNS_ROOT or ./runs)')
    parser.add_argument('--json', action='store_true', help='one JSON object, for scripts')
    opts = parser.parse_args(argv)
    run = find_run(opts.root or Path(default_runs_root()), opts.run_name)
    info = details(run)
    if opts.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    print(render(run, info))
    return 0


def render(run: RunDir, info: dict[str, Any]) -> str:
    s, cfg, git, g = info['summary'], info['config'], info['git'], info['goodput']
    model, data, opt = cfg.get('model') or {}, cfg.get('data') or {}, cfg.get('optimizer') or {}
    lines = [
        f'run {s["name"]}: {s["state"]}, step {text(s["step"])}/{s["max_duration"] or "?"}, last loss '
        f'{text(s["last_loss"])}  ({run.root})',
        f'config: model d_model={text(model.get("d_model"))} n_layers={text(model.get("n_layers"))} '
        f'n_heads={text(model.get("n_heads"))} seq={text(model.get("max_seq_len"))}; '
        f'global_batch_size={text(cfg.get("global_batch_size"))}, lr={text(opt.get("lr"))}, seed={text(cfg.get("seed"))}; '
        f'data {text(data.get("remote") or data.get("local"))}; '
        f'checkpoint every {text((cfg.get("checkpoint") or {}).get("interval"))}',
        f'git: {git.get("commit") or "-"} ({git.get("ref") or "-"}{", dirty" if git.get("dirty") else ""})',
        '',
        'starts:',
        table(['#', 'TIME', 'HOST', 'WORLD', 'FROM STEP', 'PREVIOUS ENDED', 'REDONE', 'STARTUP', 'ENDED', 'AT STEP'], [[
            str(i + 1), st.get('time', '-'), st.get('host', '-'), str(st.get('world_size', '-')), str(st.get('start_step', '-')),
            st.get('previous_end') or '-', str(st.get('redone_steps', 0)),
            f'{st["startup_s"]:.1f}s' if 'startup_s' in st else '-', st['ended'],
            text(st['end'].get('step')) if st['end'] else '-',
        ] for i, st in enumerate(info['starts'])]),
        *(f'start {i + 1} {why}' for i, st in enumerate(info['starts'])
          if (why := failure(st if st.get('event') == SETUP_FAILED else st['end']))),
        '',
        'checkpoints:',
        table(['FILE', 'STEP', 'SIZE', 'AGE'], [
            [c['file'], str(c['step']) if c['step'] is not None else 'unreadable', f'{number(c["bytes"])}B', age(c['age_s'])]
            for c in info['checkpoints']]),
        '',
        f'goodput: {100 * g["goodput"]:.1f}% of {g["total_s"]:.1f}s in {len(info["starts"])} starts kept as training; '
        f'start-up {g["startup_s"]:.1f}s, checkpointing {g["checkpoint_s"]:.1f}s, lost to preemption {g["lost_s"]:.1f}s '
        f'({s["redone_steps"]} steps redone); {g["waiting_s"]:.1f}s waiting between starts (not counted)',
    ]
    if s['problems']:
        lines.append('problems: ' + '; '.join(s['problems']))
    return '\n'.join(lines)


def plot_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog='prefix plot', description="Write the run's loss curve to logs/loss.png.")
    parser.add_argument('run_name')
    parser.add_argument('--root', type=Path, default=None, help='runs_root (default: $PREFIX_RUNS_ROOT or ./runs)')
    opts = parser.parse_args(argv)
    run = find_run(opts.root or Path(default_runs_root()), opts.run_name)
    print(plot(run))
    return 0


def plot(run: RunDir) -> Path:
    """Train loss (the last value of each step: a redone step shows its final value) and eval loss, resumes marked.

    A run with no loss logged is a ``PrefixError``, not a blank picture.
    """
    metrics = jsonl.read(run.metrics)
    train = {r['step'] + 1: r[LOSS] for r in metrics if isinstance(r.get(LOSS), (int, float))}
    evals = {r['step']: r[EVAL_LOSS] for r in metrics if isinstance(r.get(EVAL_LOSS), (int, float))}
    if not train and not evals:
        raise PrefixError(f'nothing to plot for run {run.name}: {run.metrics} '
                          f'{"has no loss logged" if run.metrics.exists() else "does not exist"}; '
                          'plot again once the run has trained a step')

    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    resumes = [s for s in pair_starts(jsonl.read(run.starts)) if s.get('start_step')]
    fig, ax = plt.subplots(figsize=(10, 5), dpi=120)
    ax.plot(sorted(train), [train[k] for k in sorted(train)], color='tab:blue', linewidth=1, label='train loss')
    if evals:
        ax.plot(sorted(evals), [evals[k] for k in sorted(evals)], 'o-', color='tab:orange', markersize=4,
                label='eval loss (val cross-entropy)')
    for i, start in enumerate(resumes):
        ax.axvline(start['start_step'], color='tab:red', linestyle='--', linewidth=1, alpha=0.7,
                   label='resume (after: ' + ', '.join(sorted({str(s.get('previous_end')) for s in resumes})) + ')'
                   if i == 0 else None)
    ax.set_xlabel('step (optimizer steps)')
    ax.set_ylabel('loss (nats per token)')
    ax.set_title(f'{run.name}: loss, {len(resumes)} resume{"s" if len(resumes) != 1 else ""} marked')
    ax.grid(True, alpha=0.3)
    ax.legend(loc='upper right')
    fig.tight_layout()
    out = run.plot
    out.parent.mkdir(exist_ok=True)
    tmp = out.with_name(out.name + '.tmp.png')
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out)
    return out


COMMANDS = {'runs': runs_command, 'show': show_command, 'plot': plot_command}


def main(command: str, argv: list[str]) -> int:
    try:
        with reader_gone_quietly():
            return COMMANDS[command](argv)
        return 0
    except FileNotFoundError as e:
        print(f'prefix: error: {e}', file=sys.stderr)
        return 1
    except PrefixError as e:  # a run name that cannot be one
        return e.report()
