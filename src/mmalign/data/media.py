"""Media references in data rows: normalising image/audio values and checking that they can be used.

Functions here raise ``MediaError`` with a short reason; ``mmalign.data.records`` wraps it into a
``DataError`` that names the file, row and field.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import io
import os
import time
from pathlib import Path
from stat import S_ISREG
from typing import Any

import PIL
from PIL import Image

from mmalign.cachedir import cache_root
from mmalign.errors import MediaError
from mmalign.limits import max_image_pixels, open_image


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

ALLOW_OUTSIDE_ENV = "MMALIGN_ALLOW_OUTSIDE_ROOT"


def outside_allowed() -> bool:
    """Whether media may live outside the data set root: ``--allow-outside-root`` sets
    ``MMALIGN_ALLOW_OUTSIDE_ROOT=1``, which launched worker processes inherit."""
    return os.environ.get(ALLOW_OUTSIDE_ENV, "") not in ("", "0")


def _is_within(path: str | Path, root: str | Path) -> bool:
    """Whether normalised absolute ``path`` is ``root`` or below it (on the strings: ``Path.parents`` is slow)."""
    p, r = str(path), str(root)
    return p == r or p.startswith(r if r.endswith(os.sep) else r + os.sep)


def resolve_in_root(path: str, root: Path, *, allow_outside: bool | None = None) -> Path:
    """Resolve a media path against the data set root, refusing paths that leave it: the one path rule of every
    loader and evaluator that reads media.

    The path is resolved as the operating system opens it (every symlink followed, the root's own included, and
    ``..`` applied after the link it follows) and must lie inside the root's real path; an absolute path is accepted
    when it does. ``allow_outside`` (default: the ``--allow-outside-root`` setting, ``outside_allowed()``) accepts
    any path.

    Args:
        path: the path as written in the row (relative to ``root``, or absolute).
        root: absolute data set root.
        allow_outside: accept paths outside the root (None: the process-wide setting).

    Returns:
        The absolute path that is opened (``root`` joined with ``path``; symlinks and ``..`` kept as written, so that
        it names the very file the check resolved).

    Raises:
        MediaError: the path points outside ``root``.
    """
    if "\0" in path:
        raise MediaError(f"path holds a NUL character: {path!r}")
    full = os.path.join(root, path)
    if allow_outside is None:
        allow_outside = outside_allowed()
    try:
        inside = allow_outside or _is_within(os.path.realpath(full), os.path.realpath(root))
    except ValueError as err:  # e.g. a lone surrogate, which no file name can hold
        raise MediaError(f"path cannot name a file ({err}): {path!r}") from None
    if inside:
        return Path(full)
    how = "after symlinks " if _is_within(os.path.normpath(full), root) else ""
    raise MediaError(f"path escapes the data set root {root} {how}(use --allow-outside-root to allow it): {path}")


def check_image(source: Path | bytes) -> None:
    """Fully decode an image (``load()``, which catches truncated files that ``verify()`` lets through), refusing
    one larger than ``max_image_pixels()`` before it is decoded.

    Raises:
        MediaError: the image cannot be opened or decoded, or is too large.
    """
    try:
        with open_image(source) as img:
            img.load()
    except MediaError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise MediaError(f"unreadable image: {err}") from None


FileStamp = tuple[int, int, int, int]  # size, modification and change times (ns), inode
RACY_NS = 2_000_000_000


def file_stamp(stat: os.stat_result) -> FileStamp:
    """What changes whenever a file's content may have changed (the change time cannot be set back by a user)."""
    return (stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino)


class CheckedImages:
    """Image files of one data set root known to decode, with the stamp each had then, kept in the cache directory.

    Decoding every image is the load's own validation, and the slow part of loading an image data set (the default
    world: 20,000 PNGs, 5 s of a 24 s load); a file whose stamp is unchanged since it last decoded is not decoded
    again. The file's first line names the Pillow version and decompression-bomb limit it was checked under (another
    version or limit starts afresh); ``save`` merges with what other processes wrote meanwhile and replaces the file
    atomically. Set ``MMALIGN_RECHECK_IMAGES=1`` to decode every image at every load.
    """

    def __init__(self, root: Path, directory: Path | None = None) -> None:
        name = hashlib.sha256(os.fsencode(root)).hexdigest()[:32]
        self.file = (directory or cache_root() / "checked_images") / f"{name}.tsv"
        limits = f"{Image.MAX_IMAGE_PIXELS}/{max_image_pixels()}"
        self._header = f"# checked images v2, Pillow {PIL.__version__}, max pixels {limits}"
        self._known = self._read()
        self._new: dict[str, FileStamp] = {}

    def _read(self) -> dict[str, FileStamp]:
        """The remembered files; an unreadable, damaged or other-version cache file counts as empty."""
        known: dict[str, FileStamp] = {}
        try:
            lines = self.file.read_text(encoding="utf-8", errors="surrogateescape").split("\n")
        except OSError:
            return known
        if not lines or lines[0] != self._header:
            return known
        for line in lines[1:]:
            fields = line.split("\t")
            if len(fields) < 5:
                continue
            with contextlib.suppress(ValueError):
                known["\t".join(fields[:-4])] = tuple(int(v) for v in fields[-4:])  # type: ignore[assignment]
        return known

    def is_known(self, path: Path, stamp: FileStamp) -> bool:
        return self._known.get(str(path)) == stamp

    def add(self, path: Path, stamp: FileStamp) -> None:
        """Remember a file that decoded, unless it changed too recently (file times tick in steps of a few
        milliseconds, so a file rewritten with the same size right after it was checked could keep its stamp) or
        its name holds a line break (one line per file)."""
        name = str(path)
        if time.time_ns() - max(stamp[1], stamp[2]) > RACY_NS and "\n" not in name:
            self._known[name] = self._new[name] = stamp

    def save(self) -> None:
        """Write the images learned since the last save (nothing to do, or a cache that cannot be written, is
        not an error: the next load decodes again)."""
        if not self._new:
            return
        from mmalign.runtime.locks import file_lock

        tmp = self.file.with_name(f"{self.file.name}.tmp{os.getpid()}")
        try:
            with file_lock(self.file):  # loads in other processes merge their files too: one writer at a time
                merged = {**self._read(), **self._new}
                lines = [self._header, *(f"{name}\t" + "\t".join(map(str, stamp)) for name, stamp in merged.items())]
                tmp.write_text("\n".join(lines) + "\n", encoding="utf-8", errors="surrogateescape")
                os.replace(tmp, self.file)
        except (OSError, ValueError):
            tmp.unlink(missing_ok=True)
            return
        self._new.clear()


class MediaChecker:
    """Checks the media of one data set, decoding each distinct image file once.

    Args:
        root: the data set root that relative paths resolve against.
        decode: decode images fully; when false only path containment and existence are checked.
        remember: skip decoding image files that decoded before and are unchanged since (``CheckedImages``;
            call ``save`` after the load).
    """

    def __init__(self, root: str | Path, *, decode: bool = True, remember: bool = False) -> None:
        self.root = Path(os.path.abspath(root))
        self.decode = decode
        remember = remember and os.environ.get("MMALIGN_RECHECK_IMAGES", "") in ("", "0")
        self._checked = CheckedImages(self.root) if decode and remember else None
        self._files: dict[tuple[Path, str], str | None] = {}  # (path, kind) -> failure reason or None
        self._paths: dict[tuple[str, str], str | None] = {}  # the same, keyed by the path as written

    def save(self) -> None:
        """Keep the images this checker decoded for later loads (when made with ``remember``)."""
        if self._checked is not None:
            self._checked.save()

    def check_path(self, path: str, *, kind: str = "image") -> Path:
        """Check a media path: inside the root, an existing file and (images) decodable.

        Returns:
            The path to open (``resolve_in_root``'s answer).

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
        return Path(os.path.join(self.root, path))

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
        try:
            stat = full.stat()
        except (FileNotFoundError, NotADirectoryError, ValueError):  # ValueError: a NUL in the path
            return f"{kind} file not found: {written}"
        except OSError as err:
            return f"cannot read {kind} file: {err.strerror or err} ({written})"
        if not S_ISREG(stat.st_mode):
            return f"{kind} path is not a regular file: {written}"
        if kind == "image" and self.decode:
            stamp = file_stamp(stat)
            if self._checked is not None and self._checked.is_known(full, stamp):
                return None
            try:
                check_image(full)
            except MediaError as err:
                return f"{err} ({written})"
            if self._checked is not None:
                self._checked.add(full, stamp)
        return None
