"""``python -m mmalign``: the command-line interface."""

import sys

from mmalign.cli import main

if __name__ == "__main__":
    sys.exit(main())
