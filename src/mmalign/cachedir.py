"""Where the toolkit keeps what it can recompute: ``$MMALIGN_CACHE_DIR``, else ``~/.cache/mmalign``."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "MMALIGN_CACHE_DIR"


def cache_root() -> Path:
    """The cache directory (not created here)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "mmalign")
