"""Limits on what a loader opens, which users can raise: image pixels and text length (environment variables, so
that launched worker processes inherit them), and the one function that opens an image file within them.

The lowest layer: ``mmalign.types`` decodes images through ``open_image``.
"""

from __future__ import annotations

import functools
import io
import os
import warnings
from pathlib import Path
from stat import S_ISREG

from PIL import Image

from mmalign.errors import MediaError

MAX_PIXELS_ENV = "MMALIGN_MAX_IMAGE_PIXELS"
MAX_TEXT_ENV = "MMALIGN_MAX_TEXT_CHARS"
DEFAULT_MAX_PIXELS = 40_000_000  # a 6300 x 6300 image; every supported processor resizes far below it
DEFAULT_MAX_TEXT = 100_000  # characters of one text field


def _env_int(name: str, default: int) -> int:
    """A positive integer from the environment, or ``default`` when unset (a bad value is a one-line error). Read at
    every call (a loader asks once per text field), parsed once per value."""
    return _positive(name, os.environ.get(name, ""), default)


@functools.lru_cache(maxsize=32)
def _positive(name: str, raw: str, default: int) -> int:
    raw = raw.strip()
    if not raw:
        return default
    try:
        value = int(raw.replace("_", ""))
    except ValueError:
        value = 0
    if value <= 0:
        raise MediaError(f"{name}={raw!r} must be a positive integer")
    return value


def max_image_pixels() -> int:
    """The largest image (width x height) a loader decodes: ``MMALIGN_MAX_IMAGE_PIXELS``, default 40M."""
    return _env_int(MAX_PIXELS_ENV, DEFAULT_MAX_PIXELS)


def max_text_chars() -> int:
    """The longest text field a loader accepts: ``MMALIGN_MAX_TEXT_CHARS``, default 100,000 characters."""
    return _env_int(MAX_TEXT_ENV, DEFAULT_MAX_TEXT)


def text_problem(text: str) -> str | None:
    """Why a text field is refused (longer than ``max_text_chars``), or None."""
    limit = max_text_chars()
    if len(text) <= limit:
        return None
    return f"text of {len(text):,} characters is over the limit of {limit:,} (raise it with {MAX_TEXT_ENV}=N)"


def open_image(source: Path | str | bytes) -> Image.Image:
    """Open an image (header only) from a regular file or bytes, refusing more than ``max_image_pixels()`` pixels.

    Raises:
        MediaError: not a regular file (a FIFO or device would block or stream forever) or too many pixels.
        OSError, ValueError: Pillow cannot identify the data.
    """
    if not isinstance(source, bytes):
        try:
            mode = os.stat(source).st_mode
        except (OSError, ValueError) as err:
            raise MediaError(f"cannot read image file {source}: {getattr(err, 'strerror', None) or err}") from None
        if not S_ISREG(mode):
            raise MediaError(f"not a regular file: {source}")
    # The size is checked below against our own limit, which users may raise above Pillow's: its guard is off
    # while the header is read.
    pil_limit = Image.MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            Image.MAX_IMAGE_PIXELS = None
            img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    finally:
        Image.MAX_IMAGE_PIXELS = pil_limit
    width, height = img.size
    limit = max_image_pixels()
    if width * height > limit:
        img.close()
        raise MediaError(
            f"image of {width}x{height} = {width * height:,} pixels is over the limit of {limit:,} "
            f"(raise it with {MAX_PIXELS_ENV}=N)"
        )
    return img
