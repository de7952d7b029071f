"""``python -m prefix`` is the ``prefix`` command."""

import sys

from prefix.cli import main

sys.exit(main())
