"""Turn ``Sample`` records into model inputs: chat template, image tokens, loss masks.

The processor of the model does the architecture-specific part (image placeholder expansion, pixel values, grid
sizes); this module adds what training needs on top: labels that are ``-100`` everywhere except on the assistant
turns (the end-of-turn token included, so the model learns to stop).
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mmalign.data.lru import ByteLRU
from mmalign.data.media import file_stamp
from mmalign.logprobs import IGNORE_INDEX
from mmalign.models.families import fast_encoder
from mmalign.types import ImageRef, Message, Sample

__all__ = ["IGNORE_INDEX", "encode_prompts", "encode_sft", "render"]


def hf_messages(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """Records → the message dicts chat templates expect."""
    return [m.to_hf() for m in messages]


@dataclass
class _Rendered:
    """One processor's remembered renders and the characters they hold."""

    texts: dict[tuple[Any, ...], str] = field(default_factory=dict)
    chars: int = 0


# Rendered texts per processor. Instruction data asks the same few questions of every image, so most prompts (and
# every short exchange such as "Is there a star?" / "No.") render to a text seen before; a chat template is a pure
# function of the messages and of the tokenizer's special tokens, which a run does not change, and rendering through
# ``apply_chat_template`` costs a tenth of a millisecond. Bounded by the characters held (then emptied).
_RENDERED: weakref.WeakKeyDictionary[Any, _Rendered] = weakref.WeakKeyDictionary()
_MAX_RENDERED_CHARS = 32 << 20


def render(processor: Any, messages: Sequence[Message], *, generation_prompt: bool = False) -> str:
    """The chat-template text of ``messages`` (remembered per processor and template)."""
    key = (getattr(processor, "chat_template", None), tuple(messages), generation_prompt)
    try:
        memo: _Rendered | None = _RENDERED.setdefault(processor, _Rendered())
        text = memo.texts.get(key)
    except TypeError:  # a processor that cannot be weakly referenced, or an unhashable template
        memo, text = None, None
    if text is None:
        text = processor.apply_chat_template(
            hf_messages(messages), tokenize=False, add_generation_prompt=generation_prompt
        )
        if memo is not None:
            if memo.chars + len(text) > _MAX_RENDERED_CHARS:
                memo.texts.clear()
                memo.chars = 0
            memo.texts[key] = text
            memo.chars += len(text)
    return text


def _tokenizer(processor: Any) -> Any:
    return getattr(processor, "tokenizer", processor)


def assistant_spans(processor: Any, messages: Sequence[Message]) -> tuple[str, list[tuple[int, int]]]:
    """Full text and the character spans of each assistant turn (generation prompt excluded).

    A span starts where the generation prompt of that turn ends and stops where the rendering of the
    conversation up to and including that turn ends, so it covers the reply and its end-of-turn marker.
    """
    full = render(processor, messages)
    spans = []
    for j, msg in enumerate(messages):
        if msg.role != "assistant":
            continue
        before = render(processor, messages[:j], generation_prompt=True)
        upto = full if j == len(messages) - 1 else render(processor, messages[: j + 1])
        if not full.startswith(before) or not full.startswith(upto):
            raise ValueError("chat template is not prefix-stable; cannot locate assistant turns")
        spans.append((len(before), len(upto)))
    return full, spans


class DecodedImages:
    """Decoded images of files, kept while the file is unchanged (same path, size, modification and change times,
    inode). The images returned are shared: read them, do not draw on them.

    Training reads each picture of an instruction set several times (the default world: 7.7 conversations per
    image); decoding a small PNG costs about as much as the rest of its preprocessing. Least recently used images
    go first once the pixels held pass ``max_bytes``. Images given as bytes are decoded every time.
    """

    def __init__(self, max_bytes: int = 512 << 20) -> None:
        self._items = ByteLRU(max_bytes, lambda img: img.width * img.height * len(img.getbands()))

    def open(self, ref: ImageRef, root: str | None) -> Any:
        """The decoded RGB image of ``ref`` (the same object for the same unchanged file)."""
        path = ref.file(root)
        if path is None:
            return ref.open(root)
        key = (str(path), *file_stamp(os.stat(path)))
        img = self._items.get(key)
        if img is None:
            img = ref.open(root)
            self._items.put(key, img)
        return img


_DECODED = DecodedImages()


def load_image_groups(samples: Sequence[Sample]) -> list[list[Any]] | None:
    """The decoded images of each sample (None when no sample has any), as processors take them."""
    groups = [[_DECODED.open(ref, s.root) for ref in s.images] for s in samples]
    return groups if any(groups) else None


def processor_inputs(
    processor: Any,
    texts: list[str],
    images: list[list[Any]] | None,
    *,
    padding_side: str,
) -> dict[str, torch.Tensor]:
    """Call the processor on a batch of rendered texts (with their images)."""
    tok = _tokenizer(processor)
    tok.padding_side = padding_side
    kwargs: dict[str, Any] = {"text": texts, "return_tensors": "pt", "padding": True}
    if images is not None:
        kwargs["images"] = images

    def call() -> dict[str, torch.Tensor]:
        enc = processor(**kwargs)
        return {k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}

    encoder = fast_encoder(processor)
    return call() if encoder is None else encoder(processor, texts, images, call)


def encode_sft(processor: Any, samples: Sequence[Sample], max_length: int | None = None) -> dict[str, torch.Tensor]:
    """Encode conversations for teacher-forced training; labels only on assistant turns.

    Returns:
        Processor outputs (``input_ids`` [B, T], ``attention_mask`` [B, T], pixel tensors ...) plus ``labels``
        [B, T] with ``IGNORE_INDEX`` on prompt, image and padding positions.

    Raises:
        ValueError: a sample longer than ``max_length`` (image tokens are never truncated).
    """
    tok = _tokenizer(processor)
    rendered = [assistant_spans(processor, s.messages) for s in samples]
    enc = processor_inputs(processor, [r[0] for r in rendered], load_image_groups(samples), padding_side="right")
    ids = enc["input_ids"]
    lengths = enc["attention_mask"].sum(dim=1).tolist()
    labels = torch.full_like(ids, IGNORE_INDEX)
    for row, length in enumerate(lengths):
        if max_length is not None and length > max_length:
            raise ValueError(f"sample {samples[row].id!r} has {length} tokens > max_length={max_length}")
    # Count tokens from the end: the text after an assistant span holds no image placeholders in single-image
    # conversations, so tokenizing it alone gives the same tokens as in context. One tokenizer call for all spans.
    turns = [(row, start, end) for row, (_, spans) in enumerate(rendered) for start, end in spans]
    pieces = [rendered[row][0][cut:] for row, start, end in turns for cut in (start, end)]
    tokens = tok(pieces, add_special_tokens=False)["input_ids"] if pieces else []
    for t, (row, _, _) in enumerate(turns):
        tail, after = tokens[2 * t], tokens[2 * t + 1]
        length = lengths[row]
        a, b = length - len(tail), length - len(after)
        if a < 0 or ids[row, a:length].tolist() != tail:
            raise ValueError(f"sample {samples[row].id!r}: cannot align the assistant turn with its tokens")
        labels[row, a:b] = ids[row, a:b]
    enc["labels"] = labels
    return enc


def encode_prompts(processor: Any, samples: Sequence[Sample]) -> dict[str, torch.Tensor]:
    """Encode the prompt turns of each sample with the generation prompt, left-padded for generation."""
    texts = [render(processor, s.prompt_messages, generation_prompt=True) for s in samples]
    return processor_inputs(processor, texts, load_image_groups(samples), padding_side="left")
