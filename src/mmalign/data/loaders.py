"""Load data files into validated ``Sample`` records.

Four sources share one row format (see ``mmalign.data.records``): JSON-lines files (``.jsonl``, or a
``.json`` file with one object per line), ``.json`` files holding one JSON array of row objects (LLaVA's
``llava_instruct_150k.json``), Parquet files, and directories written by ``datasets.Dataset.save_to_disk``
(read with ``datasets.load_from_disk``, never from the hub). Every row is validated once, here.

Example:
    >>> result = load_samples("data/sft/train.jsonl", on_bad_record="skip")
    >>> print(result.summary())
    loaded 98 samples from train.jsonl, skipped 2 bad records (first: ...)
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from mmalign.data.media import MediaChecker
from mmalign.data.records import parse_sample
from mmalign.errors import DataError
from mmalign.types import Sample

T = TypeVar("T")
Format = Literal["jsonl", "json", "parquet", "hf"]
JSONL_SUFFIXES = (".jsonl", ".json")
JSON_SUFFIX = ".json"  # a JSON array of rows, or JSON lines: the first byte tells
PARQUET_SUFFIXES = (".parquet",)
MAX_REASONS = 5
_BATCH_ROWS = 256
_PEEK_BYTES = 4096
_UTF8_BOM = b"\xef\xbb\xbf"

# A row as read from a file: the parsed object, or the error that made it unreadable (kept as a value so
# that skip mode can go on to the next row).
RawRow = tuple[int, dict[str, Any] | DataError]


@dataclass
class LoadResult:
    """The outcome of ``load_samples``.

    Attributes:
        samples: the valid samples, in file order.
        skipped: how many bad rows were skipped (always 0 with ``on_bad_record="fail"``).
        reasons: the ``DataError`` messages of the first ``MAX_REASONS`` skipped rows.
        path: the file or directory that was read.
        rows: the 1-based row of each of ``samples`` in the file.
    """

    samples: list[Sample]
    skipped: int
    reasons: list[str] = field(default_factory=list)
    path: Path = Path()
    rows: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.samples)

    def summary(self) -> str:
        """One line for logs: ``loaded 98 samples from data.jsonl, skipped 2 bad records (first: ...)``."""
        line = f"loaded {len(self.samples)} samples from {self.path.name}"
        if self.skipped:
            line += f", skipped {self.skipped} bad records"
            if self.reasons:
                line += f" (first: {self.reasons[0]})"
        return line


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Read a JSON-lines file as ``(row, object)`` pairs; blank lines are skipped.

    Row numbers are 1-based line numbers, so they match what an editor shows.

    Raises:
        DataError: the file is missing, or a line is not valid JSON or not a JSON object.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, None, "file not found")
    for row, obj in _read_jsonl(path):
        if isinstance(obj, DataError):
            raise obj
        yield row, obj


def load_samples(
    path: str | Path,
    *,
    root: str | Path | None = None,
    on_bad_record: Literal["fail", "skip"] = "fail",
    check_images: bool = True,
    limit: int | None = None,
    needs_reply: bool = False,
) -> LoadResult:
    """Load and validate every row of a data file.

    Args:
        path: a ``.jsonl`` (JSON lines), ``.json`` (a JSON array of rows, or JSON lines) or ``.parquet`` file,
            or a ``save_to_disk`` directory.
        root: directory that media paths resolve against and must stay inside; defaults to the directory
            containing the file (for a ``save_to_disk`` directory: that directory).
        on_bad_record: ``"fail"`` raises on the first bad row; ``"skip"`` drops bad rows and counts them.
        check_images: fully decode every image (each distinct file once). Path containment and file
            existence are checked either way.
        limit: stop after this many valid samples.
        needs_reply: every row must hold an assistant turn with text (supervised training); a row without one is
            bad (it fails the load, or is skipped and counted).

    Returns:
        The samples, with ``Sample.root`` set to the absolute data set root.

    Raises:
        DataError: the path is missing or of an unknown kind, a row is bad (``"fail"``), or no row is
            usable (the file is empty, or every row is bad).
        ValueError: ``on_bad_record`` or ``limit`` is invalid.
    """
    source = open_source(path, root=root, on_bad_record=on_bad_record, limit=limit, check_images=check_images)
    path, root_dir = source.path, source.root

    def parse(row: int, obj: dict[str, Any]) -> Sample:
        return parse_sample(obj, path=path, row=row, root=root_dir, checker=source.checker, needs_reply=needs_reply)

    samples, skipped, reasons, rows = collect_rows(source, parse, on_bad_record=on_bad_record, limit=limit)
    result = LoadResult(samples=samples, skipped=skipped, reasons=reasons, path=path, rows=rows)
    if not result.samples:
        if result.skipped:
            reason = f"all {result.skipped} records are bad (first: {result.reasons[0]})"
        else:
            reason = "no records"
        raise DataError(path, None, None, reason)
    return result


@dataclass(frozen=True)
class Source:
    """A data file (or ``save_to_disk`` directory) ready to be read: its format, root and media checker."""

    path: Path
    kind: Format
    root: Path
    checker: MediaChecker


def open_source(
    path: str | Path, *, root: str | Path | None, on_bad_record: str, limit: int | None, check_images: bool
) -> Source:
    """Check the loading options and resolve the data set root (shared by every record loader).

    Raises:
        ValueError: ``on_bad_record`` or ``limit`` is invalid.
        DataError: the path is missing or of an unknown kind, or the root is not a directory.
    """
    if on_bad_record not in ("fail", "skip"):
        raise ValueError(f"on_bad_record must be 'fail' or 'skip', got {on_bad_record!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive integer, got {limit}")
    path = Path(path)
    kind = detect_format(path)
    root_dir = Path(root) if root is not None else (path if kind == "hf" else path.parent)
    if not root_dir.is_dir():
        raise DataError(path, None, None, f"data set root is not a directory: {root_dir}")
    checker = MediaChecker(root_dir, decode=check_images, remember=True)
    return Source(path=path, kind=kind, root=root_dir, checker=checker)


def collect_rows(
    source: Source,
    parse: Callable[[int, dict[str, Any]], T],
    *,
    on_bad_record: str,
    limit: int | None,
    always_skip: tuple[type[DataError], ...] = (),
) -> tuple[list[T], int, list[str], list[int]]:
    """Parse every row of ``source``; bad rows raise (``"fail"``) or are counted (``"skip"``).

    Args:
        parse: turns ``(row, object)`` into a record or raises ``DataError``.
        always_skip: error types skipped even in ``"fail"`` mode (rows that are valid but unusable).

    Returns:
        (records, skipped, the messages of the first ``MAX_REASONS`` skipped rows, each record's 1-based row).
    """
    items: list[T] = []
    rows: list[int] = []
    skipped, reasons = 0, []
    for row, obj in read_records(source.path, source.kind):
        try:
            if isinstance(obj, DataError):
                raise obj
            items.append(parse(row, obj))
            rows.append(row)
        except DataError as err:
            if on_bad_record == "fail" and not isinstance(err, always_skip):
                raise
            skipped += 1
            if len(reasons) < MAX_REASONS:
                reasons.append(str(err))
        if limit is not None and len(items) >= limit:
            break
    source.checker.save()
    return items, skipped, reasons, rows


def detect_format(path: Path) -> Format:
    """Say how to read ``path``: ``"jsonl"``, ``"json"``, ``"parquet"`` or ``"hf"`` (a ``save_to_disk`` directory).

    ``"json"`` is any ``.json`` file; whether it holds a JSON array or JSON lines is seen when it is read.

    Raises:
        DataError: the path does not exist or is not one of those.
    """
    if path.is_dir():
        if (path / "dataset_dict.json").is_file():
            splits = sorted(p.name for p in path.iterdir() if p.is_dir())
            raise DataError(path, None, None, f"is a DatasetDict with splits {splits}; pass one split's directory")
        if (path / "state.json").is_file() and (path / "dataset_info.json").is_file():
            return "hf"
        files = sorted(p.name for p in path.iterdir() if p.suffix in JSONL_SUFFIXES + PARQUET_SUFFIXES)
        hint = f"; pass one of its files instead: {', '.join(files[:5])}" if files else ""
        raise DataError(
            path,
            None,
            None,
            "directory is not a data set saved with datasets.Dataset.save_to_disk "
            f"(no state.json and dataset_info.json){hint}",
        )
    if not path.exists():
        raise DataError(path, None, None, "file not found")
    suffix = path.suffix.lower()
    if suffix == JSON_SUFFIX:
        return "json"
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    expected = ", ".join(JSONL_SUFFIXES + PARQUET_SUFFIXES)
    raise DataError(path, None, None, f"unknown file type {suffix or '(none)'!r}: expected {expected}")


def read_records(path: Path, kind: Format) -> Iterator[RawRow]:
    """The rows of a data file as ``(1-based row, object or DataError)``.

    Raises:
        DataError: the file as a whole cannot be read (broken JSON array, unreadable Parquet).
    """
    if kind == "json":
        yield from _read_json(path)
    elif kind == "jsonl":
        yield from _read_jsonl(path)
    elif kind == "parquet":
        yield from _read_parquet(path)
    else:
        yield from _read_saved_dataset(path)


def _read_jsonl(path: Path) -> Iterator[RawRow]:
    with path.open("rb") as lines:
        for row, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            # A whole JSON array in a .jsonl file is a common mix-up; say so instead of a bare parse error.
            hint = " (expected one JSON object per line; a JSON array is read from a .json file)"
            hint = hint if line.lstrip()[:1] == b"[" else ""
            try:
                obj = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                yield row, DataError(path, row, None, f"invalid JSON: {err}{hint}")
                continue
            if not isinstance(obj, dict):
                yield (
                    row,
                    DataError(path, row, None, f"expected a JSON object, got {type(obj).__name__}{hint}"),
                )
                continue
            yield row, obj


def _read_json(path: Path) -> Iterator[RawRow]:
    """A ``.json`` file: a JSON array of row objects (row = 1-based index), else one JSON object per line."""
    with path.open("rb") as file:
        head = file.read(_PEEK_BYTES).removeprefix(_UTF8_BOM).lstrip()
    if head[:1] != b"[":
        yield from _read_json_lines(path)
        return
    # One json.load: a 150k-row LLaVA file is a few hundred MB of objects, and rows are kept anyway.
    try:
        with path.open("rb") as file:
            rows = json.load(file)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(path, None, None, f"invalid JSON array: {err}") from None
    for row, obj in enumerate(rows, start=1):
        if isinstance(obj, dict):
            yield row, obj
        else:
            yield row, DataError(path, row, None, f"expected a JSON object, got {type(obj).__name__}")


def _read_json_lines(path: Path) -> Iterator[RawRow]:
    """JSON lines in a ``.json`` file; a file that is one JSON value over several lines is refused as a whole."""
    rows = _read_jsonl(path)
    first = next(rows, None)
    if first is None:
        return
    if isinstance(first[1], DataError):
        try:
            with path.open("rb") as file:
                whole = json.load(file)
        except (json.JSONDecodeError, UnicodeDecodeError):
            pass  # not one JSON value either: the broken line is the error to report
        else:
            keys = f" (keys: {', '.join(sorted(map(str, whole))[:8])})" if isinstance(whole, dict) else ""
            reason = "expected a JSON array of row objects or one JSON object per line, got one JSON value"
            raise DataError(path, None, None, f"{reason} over several lines{keys}")
    yield first
    yield from rows


def _read_parquet(path: Path) -> Iterator[RawRow]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    row = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=_BATCH_ROWS):
            for obj in batch.to_pylist():
                row += 1
                yield row, obj
    except (pa.ArrowException, OSError) as err:
        raise DataError(path, None, None, f"not a readable Parquet file: {err}") from None


def _read_saved_dataset(path: Path) -> Iterator[RawRow]:
    """Rows of a ``save_to_disk`` directory, read as Arrow so that images stay undecoded bytes."""
    import datasets

    try:
        dataset = datasets.load_from_disk(str(path))
    except (OSError, ValueError) as err:
        raise DataError(path, None, None, f"cannot load saved dataset: {err}") from None
    if not isinstance(dataset, datasets.Dataset):
        raise DataError(path, None, None, f"expected a Dataset, got {type(dataset).__name__}")
    row = 0
    for table in dataset.with_format("arrow").iter(batch_size=_BATCH_ROWS):
        for obj in table.to_pylist():
            row += 1
            yield row, obj
