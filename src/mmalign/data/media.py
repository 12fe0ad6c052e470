"""Media references in data rows: normalising image/audio values and checking that they can be used.

Functions here raise ``MediaError`` with a short reason; ``mmalign.data.records`` wraps it into a
``DataError`` that names the file, row and field.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from pathlib import Path
from typing import Any

from PIL import Image


class MediaError(ValueError):
    """A media value that cannot be used; the message is the reason, without file/row context."""


def decode_base64(text: str) -> bytes:
    """Decode standard base64 text, strictly (characters outside the alphabet are errors).

    Args:
        text: base64 text; surrounding whitespace and line breaks are ignored.

    Returns:
        The decoded bytes.

    Raises:
        MediaError: the text is not valid base64 or decodes to nothing.
    """
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as err:
        raise MediaError(f"bad base64: {err}") from None
    if not data:
        raise MediaError("bad base64: empty data")
    return data


def encode_png(image: Image.Image) -> bytes:
    """Encode a PIL image as PNG bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def media_source(value: Any) -> tuple[str | None, bytes | None]:
    """Normalise one media value of a row to ``(path, data)``; exactly one of the two is set.

    Accepted values: a path string; raw bytes; a dict with ``"bytes"`` (raw bytes, or base64 text as in
    JSONL) and/or ``"path"`` (the Hugging Face ``Image``/``Audio`` storage shape, where ``bytes`` wins
    when both are set); a PIL image (encoded to PNG).

    Raises:
        MediaError: the value has none of these shapes, or its base64 is bad.
    """
    if isinstance(value, str):
        if not value.strip():
            raise MediaError("empty path")
        return value, None
    if isinstance(value, bytes | bytearray | memoryview):
        return None, bytes(value)
    if isinstance(value, Image.Image):
        return None, encode_png(value)
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if isinstance(data, str):
            return None, decode_base64(data)
        if isinstance(data, bytes | bytearray | memoryview):
            return None, bytes(data)
        if data is not None:
            raise MediaError(f"'bytes' must be base64 text or bytes, got {type(data).__name__}")
        if isinstance(path, str) and path.strip():
            return path, None
        raise MediaError("expected an object with a 'path' string or 'bytes'")
    shapes = "a path, bytes, a {'path' | 'bytes': ...} object or a PIL image"
    raise MediaError(f"expected {shapes}, got {type(value).__name__}")


_UNSEEN = object()


def _is_within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def resolve_in_root(path: str, root: Path) -> Path:
    """Resolve a media path against the data set root, refusing paths that leave it.

    The check is lexical (``..`` is collapsed without touching the file system), with a fallback on the
    symlink-resolved paths so that an absolute path spelled through a symlinked root is still accepted.

    Args:
        path: the path as written in the row (relative to ``root``, or absolute).
        root: absolute data set root.

    Returns:
        The absolute, normalised path.

    Raises:
        MediaError: the path points outside ``root``.
    """
    full = Path(os.path.normpath(root / path))
    if _is_within(full, root) or _is_within(full.resolve(), root.resolve()):
        return full
    raise MediaError(f"path escapes the data set root {root}: {path}")


def check_image(source: Path | bytes) -> None:
    """Fully decode an image (``load()``, which catches truncated files that ``verify()`` lets through).

    Raises:
        MediaError: the image cannot be opened or decoded.
    """
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            img.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise MediaError(f"unreadable image: {err}") from None


class MediaChecker:
    """Checks the media of one data set, decoding each distinct image file once.

    Args:
        root: the data set root that relative paths resolve against.
        decode: decode images fully; when false only path containment and existence are checked.
    """

    def __init__(self, root: str | Path, *, decode: bool = True) -> None:
        self.root = Path(os.path.abspath(root))
        self.decode = decode
        self._files: dict[tuple[Path, str], str | None] = {}  # (path, kind) -> failure reason or None
        self._paths: dict[tuple[str, str], str | None] = {}  # the same, keyed by the path as written

    def check_path(self, path: str, *, kind: str = "image") -> None:
        """Check a media path: inside the root, an existing file and (images) decodable.

        Raises:
            MediaError: with the reason, e.g. ``image file not found: images/x.png``.
        """
        # The same path string always resolves the same way against this root: rows that share an image (many
        # questions about one picture) cost one dictionary lookup.
        seen = self._paths.get((path, kind), _UNSEEN)
        if seen is _UNSEEN:
            try:
                full = resolve_in_root(path, self.root)
            except MediaError as err:
                seen = str(err)
            else:
                key = (full, kind)
                if key not in self._files:
                    self._files[key] = self._file_problem(full, path, kind)
                seen = self._files[key]
            self._paths[(path, kind)] = seen
        if seen is not None:
            raise MediaError(seen)

    def check_data(self, data: bytes, *, kind: str = "image") -> None:
        """Check encoded media bytes (images are decoded when ``decode`` is set).

        Raises:
            MediaError: the bytes are empty or not a decodable image.
        """
        if not data:
            raise MediaError(f"empty {kind} data")
        if kind == "image" and self.decode:
            check_image(data)

    def _file_problem(self, full: Path, written: str, kind: str) -> str | None:
        if not full.is_file():
            return f"{kind} file not found: {written}"
        if kind == "image" and self.decode:
            try:
                check_image(full)
            except MediaError as err:
                return f"{err} ({written})"
        return None
