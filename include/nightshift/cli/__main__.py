"""``python -m nightshift.cli``: the same commands as ``nightshift``."""

import sys

from nightshift.cli import main

sys.exit(main())
