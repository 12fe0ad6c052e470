"""Remember the pixel values of images a run has already preprocessed.

An instruction-tuning set asks many questions about one picture (the default world: 7.7 conversations per image), so
an SFT run preprocesses each image several times; with a tiny model that preprocessing is a tenth of the step.
``with_pixel_cache(processor)`` returns a shallow copy of a processor whose image processor answers repeated images
from a bounded least-recently-used cache. Images are keyed by their decoded content (mode, size and a hash of the
pixels) and the keyword arguments of the call, so the cached tensor is exactly what the image processor would
return. It only caches image processors that turn each image into one fixed-shape tensor (``pixel_values`` with one
row per image, e.g. CLIP and SigLIP); others (patch lists, tiling processors) are called as before.
"""

from __future__ import annotations

import copy
import hashlib
from typing import Any

import torch
from PIL import Image

from mmalign.data.lru import ByteLRU

DEFAULT_MAX_BYTES = 1 << 30


def _flat(images: Any) -> list[Any] | None:
    """The images of a (possibly nested) list, or None if anything is not a PIL image."""
    if isinstance(images, Image.Image):
        return [images]
    if not isinstance(images, list | tuple):
        return None
    out: list[Any] = []
    for item in images:
        inner = _flat(item)
        if inner is None:
            return None
        out.extend(inner)
    return out


class PixelCache:
    """An image processor that serves repeated images from memory (``max_bytes`` of tensors at most).

    Attributes other than the call are the wrapped processor's, so processors that read ``crop_size`` or
    ``fetch_images`` from it work unchanged. ``hits`` and ``misses`` count images.
    """

    def __init__(self, image_processor: Any, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self._inner = image_processor
        self._items = ByteLRU(max_bytes, lambda t: t.numel() * t.element_size())
        self._cacheable = max_bytes > 0
        self.hits = 0
        self.misses = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __call__(self, images: Any = None, *args: Any, **kwargs: Any) -> Any:
        flat = _flat(images) if self._cacheable and not args else None
        if not flat:
            return self._inner(images, *args, **kwargs)
        call = repr(sorted(kwargs.items()))
        keys = [(im.mode, im.size, hashlib.blake2b(im.tobytes(), digest_size=16).digest(), call) for im in flat]
        found = {k: v for k in keys if (v := self._items.peek(k)) is not None}
        missing = list(dict.fromkeys(k for k in keys if k not in found))
        if missing:
            first = {k: im for k, im in zip(keys, flat, strict=True)}
            out = self._inner([first[k] for k in missing], **kwargs)
            pixels = out.get("pixel_values") if set(out.keys()) == {"pixel_values"} else None
            if not isinstance(pixels, torch.Tensor) or pixels.shape[0] != len(missing):
                self._cacheable = False  # not one tensor per image: this processor is not cacheable
                return self._inner(images, **kwargs)
            found.update((key, row.clone()) for key, row in zip(missing, pixels, strict=True))
        for key, value in found.items():
            if self._items.get(key) is None:
                self._items.put(key, value)
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        from transformers import BatchFeature

        return BatchFeature({"pixel_values": torch.stack([found[k] for k in keys])})


def with_pixel_cache(processor: Any, max_bytes: int = DEFAULT_MAX_BYTES) -> Any:
    """A shallow copy of ``processor`` whose ``image_processor`` is a ``PixelCache`` (``processor`` is unchanged).

    Returns ``processor`` itself when it has no image processor or ``max_bytes`` is 0.
    """
    inner = getattr(processor, "image_processor", None)
    if inner is None or max_bytes <= 0:
        return processor
    cached = copy.copy(processor)
    cached.image_processor = PixelCache(inner, max_bytes)
    return cached
