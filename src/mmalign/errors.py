"""Errors raised by the toolkit."""

from __future__ import annotations

from pathlib import Path


class DataError(Exception):
    """A data file that cannot be used, located by file, row and field.

    Attributes:
        path: the data file (or directory) at fault.
        row: 1-based row number, or ``None`` when the error concerns the whole file.
        field: the offending field (e.g. ``"images[0]"``), or ``None``.
        reason: a short human-readable explanation.
    """

    def __init__(self, path: str | Path, row: int | None, field: str | None, reason: str) -> None:
        self.path = path
        self.row = row
        self.field = field
        self.reason = reason
        super().__init__(path, row, field, reason)

    def __str__(self) -> str:
        where = str(self.path)
        if self.row is not None:
            where += f" row {self.row}"
        if self.field is not None:
            where += f" field {self.field!r}"
        # One line whatever the data held (a path or value with a line break is shown escaped).
        return f"{where}: {self.reason}".replace("\r", "\\r").replace("\n", "\\n")


class ConfigError(Exception):
    """An invalid configuration (YAML file, flag or ``key=value`` override); the message says which key."""


class ModelError(Exception):
    """A model directory that cannot be loaded or used (missing files, unsupported architecture)."""


class TrainingError(Exception):
    """A run that cannot go on: a non-finite loss or gradient (the weights are left as the last good step made them)."""


class MediaError(ValueError):
    """A media value that cannot be used; the message is the reason, without file/row context (loaders wrap it into a
    ``DataError`` that names the file, row and field)."""
