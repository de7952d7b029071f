"""The ``prefix`` command: prepare data, train, and look at runs (``runs``, ``show``, ``plot``)."""

from __future__ import annotations

import sys
from typing import Optional

COMMANDS = {
    'check': 'check a config and overrides as the trainer will, in under a second, without torch: '
             'check CONFIG [key=value ...] [--no-paths]',
    'prepare': 'turn text into MDS shards (python -m prefix.data)',
    'train': 'train or resume a run in one process (python -m prefix.train)',
    'runs': 'list the runs under runs_root: state, progress, checkpoints, preemptions [--root DIR] [--json]',
    'show': "one run's config, starts, checkpoints and goodput: show RUN [--root DIR] [--json]",
    'plot': "write a run's loss curve, resumes marked, to its logs/loss.png: plot RUN [--root DIR]",
    'export': "a run's newest checkpoint as one latest.pt-format file (OUT.pt) or, for a Hugging Face model, "
              'a save_pretrained folder (OUT): export RUN OUT [--root DIR]',
}


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        lines = [f'  {name:8} {what}' for name, what in COMMANDS.items()]
        asked = argv[:1] in (['-h'], ['--help'])
        if argv and not asked:
            print(f'prefix: unknown command {argv[0]!r}', file=sys.stderr)
        print('usage: prefix COMMAND [args]', *lines, sep='\n', file=sys.stdout if asked else sys.stderr)
        return 0 if asked else 2
    command, rest = argv[0], argv[1:]
    if command == 'check':
        return check(rest)
    if command == 'prepare':
        from prefix.data.prepare import main as prepare_main
        return prepare_main(rest)
    if command == 'train':
        from prefix.train import main as train_main
        return train_main(rest)
    if command == 'export':
        from prefix.models.export import main as export_main
        return export_main(rest)
    from prefix.run.runs import main as runs_main
    return runs_main(command, rest)


def check(args: list[str]) -> int:
    """``prefix check``: the config errors the trainer would stop on, found before a pod waits for GPUs.

    ``--no-paths`` skips what depends on this machine's files (a Hugging Face model's folder): for a
    config checked where it is submitted, not where it trains.
    """
    from prefix.config.config import load_config
    from prefix.errors import PrefixError

    paths = '--no-paths' not in args
    args = [a for a in args if a != '--no-paths']
    if not args:
        print('usage: prefix check CONFIG.yaml [key=value ...] [--no-paths]', file=sys.stderr)
        return 2
    try:
        cfg = load_config(args[0], args[1:], check_paths=paths)
    except PrefixError as e:
        return e.report()
    print(f'{args[0]}: ok (run {cfg.run_name}, model {cfg.model.name}, max_duration {cfg.max_duration})')
    return 0


if __name__ == '__main__':
    sys.exit(main())
