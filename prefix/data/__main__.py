"""``python -m prefix.data``: turn text into MDS shards (``prefix.data.prepare``)."""

import sys

from prefix.data.prepare import main

sys.exit(main())
