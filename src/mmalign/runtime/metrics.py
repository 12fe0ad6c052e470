"""Metrics to a JSONL log (and TensorBoard when installed)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class MetricsLog:
    """Append-only JSONL metrics; on resume, rows past the resumed step are dropped first.

    Args:
        path: the ``metrics.jsonl`` file.
        resume_step: when resuming, keep only rows with ``step <= resume_step``.
        tensorboard_dir: directory for TensorBoard event files, used only if ``tensorboard`` is importable.
    """

    def __init__(self, path: Path, resume_step: int | None = None, tensorboard_dir: Path | None = None) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            path.write_text("")
        elif path.exists():
            kept = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln).get("step", 0) <= resume_step]
            path.write_text("".join(ln + "\n" for ln in kept))
        self._tb = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(tensorboard_dir))
            except ImportError:
                self._tb = None

    def write(self, step: int, values: dict[str, Any]) -> None:
        row = {"step": step, **values}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for key, val in values.items():
                if isinstance(val, (int, float)):
                    self._tb.add_scalar(key, val, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All rows of a metrics JSONL file."""
    if not path.is_file():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
