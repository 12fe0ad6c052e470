"""A direct encoder for LLaVA-style processors: the tensors ``LlavaProcessor.__call__`` returns, without its
per-call keyword merging, validation and per-image size probing (a third of an SFT batch's encoding on the world).

What the processor does for fixed-shape images is short: preprocess the images, expand each image placeholder (by
its own ``replace_image_token``, once per batch), tokenize with padding. ``llava_inputs`` does exactly that and is
trusted for a processor only after its first batch gave the same tensors as the processor's own call (checked per
processor object); a processor that ever differs, or is not a ``LlavaProcessor``, is always called as it is.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

import torch

log = logging.getLogger(__name__)

# Per processor: True once its first batch matched the processor's own call, False if it did not.
_VERIFIED: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()


def _eligible(processor: Any, texts: list[str], images: list[list[Any]] | None) -> bool:
    if type(processor).__name__ != "LlavaProcessor" or not images:
        return False
    token = getattr(processor, "image_token", None)
    if not isinstance(token, str) or not token or not callable(getattr(processor, "replace_image_token", None)):
        return False
    # The processor refuses a placeholder count that differs from the image count: let it say so.
    return sum(t.count(token) for t in texts) == sum(map(len, images))


def _direct(processor: Any, texts: list[str], images: list[list[Any]]) -> dict[str, torch.Tensor] | None:
    flat = [im for group in images for im in group]
    pixels = processor.image_processor(flat, return_tensors="pt").get("pixel_values")
    if not isinstance(pixels, torch.Tensor) or pixels.ndim != 4 or pixels.shape[0] != len(flat):
        return None
    # Every image has the same shape, so the processor's own expansion of the first placeholder serves them all.
    expansion = processor.replace_image_token({"pixel_values": pixels}, image_idx=0)
    expanded = [t.replace(processor.image_token, expansion) for t in texts]
    enc = processor.tokenizer(expanded, padding=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "pixel_values": pixels}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a
    )


def llava_inputs(
    processor: Any, texts: list[str], images: list[list[Any]] | None, call: Any
) -> dict[str, torch.Tensor]:
    """The processor's tensors for ``texts`` and ``images``; ``call()`` is the processor's own call (used for
    processors this encoder does not know, and once per processor to check that it gives the same tensors)."""
    try:
        verified = _VERIFIED.get(processor)
    except TypeError:  # cannot be weakly referenced
        return call()
    if verified is False or not _eligible(processor, texts, images):
        return call()
    direct = _direct(processor, texts, images)
    if direct is None:
        return call()
    if verified is None:
        reference = call()
        _VERIFIED[processor] = _same(direct, reference)
        if not _VERIFIED[processor]:
            log.debug("%s: direct LLaVA encoding differs from the processor's; using the processor", processor)
        return reference
    return direct
