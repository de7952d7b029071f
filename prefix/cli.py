"""The ``prefix`` command: prepare data, train, and look at runs (``runs``, ``show``, ``plot``)."""

from __future__ import annotations

import sys
from typing import Optional

COMMANDS = {
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
        print('usage: prefix COMMAND [args]', *lines, sep='\n', file=sys.stderr)
        return 0 if argv[:1] in (['-h'], ['--help']) else 2
    command, rest = argv[0], argv[1:]
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


if __name__ == '__main__':
    sys.exit(main())
