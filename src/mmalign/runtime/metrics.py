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
            rows = [(ln, _row(ln)) for ln in path.read_text().splitlines() if ln.strip()]
            torn = sum(row is None for _, row in rows)
            if torn:  # a run killed while writing a line leaves it half written
                log.warning("%s: dropping %d unreadable line(s) (a run stopped mid-write)", path, torn)
            kept = [ln for ln, row in rows if row is not None and row.get("step", 0) <= resume_step]
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
    """All readable rows of a metrics JSONL file (a line torn by a killed run is left out)."""
    if not path.is_file():
        return []
    rows = (_row(ln) for ln in path.read_text().splitlines() if ln.strip())
    return [row for row in rows if row is not None]


def _row(line: str) -> dict[str, Any] | None:
    """One metrics line as a dict, or None when it is not a JSON object (torn or foreign)."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    return row if isinstance(row, dict) else None
