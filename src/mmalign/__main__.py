"""``python -m mmalign``: the command-line interface."""

import sys

from mmalign.cli import main

sys.exit(main())
