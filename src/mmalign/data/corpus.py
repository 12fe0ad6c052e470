"""Collect the text a tiny model's vocabulary is built from."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from mmalign.data.loaders import detect_format, iter_jsonl, read_records
from mmalign.errors import ConfigError, DataError


def _texts_of_row(row: dict[str, Any]) -> Iterator[str]:
    for key in ("messages", "conversations", "prompt", "chosen", "rejected"):
        turns = row.get(key)
        if isinstance(turns, dict):  # one turn object (LLaMA-Factory's chosen / rejected)
            turns = [turns]
        if isinstance(turns, str):
            yield turns
        elif isinstance(turns, list):
            for turn in turns:
                if not isinstance(turn, dict):
                    continue
                content = turn.get("content", turn.get("value"))
                if isinstance(content, str):
                    yield content.replace("<image>", " ")
                elif isinstance(content, list):
                    yield from (p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    for key in ("system", "text", "caption", "question", "answer"):
        if isinstance(row.get(key), str):
            yield row[key]


def texts_from(path: Path) -> list[str]:
    """All text in a data file (JSON lines, JSON array, Parquet), or in every JSONL file of a directory."""
    files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
    if not files:
        raise DataError(path, None, None, "no JSONL files to build a vocabulary from")
    texts: list[str] = []
    for f in files:
        if not f.is_file():
            raise DataError(f, None, None, "file not found")
        for _, row in _rows(f):
            texts.extend(_texts_of_row(row))
    return texts


def _rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """The rows of a data file; the first unreadable one is an error (a vocabulary needs the whole file)."""
    if path.suffix.lower() == ".jsonl":
        yield from iter_jsonl(path)
        return
    for row, record in read_records(path, detect_format(path)):
        if isinstance(record, DataError):
            raise record
        yield row, record


def corpus_images(paths: Sequence[str | Path] | None, limit: int = 256) -> list[Any]:
    """Up to ``limit`` distinct images referenced by the data files (for projector calibration)."""
    from PIL import Image

    seen: dict[Path, None] = {}
    for p in paths or []:
        path = Path(p)
        files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
        for f in files:
            for _, row in iter_jsonl(f):
                refs = row.get("images", row.get("image", []))
                for ref in [refs] if isinstance(refs, str) else refs if isinstance(refs, list) else []:
                    if isinstance(ref, str):
                        seen.setdefault((f.parent / ref).resolve(), None)
                if len(seen) >= limit:
                    break
            if len(seen) >= limit:
                break
    images = []
    for img_path in list(seen)[:limit]:
        try:
            with Image.open(img_path) as img:
                images.append(img.convert("RGB"))
        except OSError as exc:
            raise DataError(img_path, None, None, f"unreadable calibration image: {exc}") from None
    return images


def corpus_texts(paths: Sequence[str | Path]) -> list[str]:
    """Texts of the given data files/directories."""
    if not paths:
        raise ConfigError("--vocab-from: no data files to build a vocabulary from")
    return [t for p in paths for t in texts_from(Path(p))]
