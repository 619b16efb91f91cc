"""``python -m latentforge``: the command line (``latentforge/__init__`` sets OMP_WAIT_POLICY first)."""

import sys

from latentforge.cli import main

sys.exit(main())
