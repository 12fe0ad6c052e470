"""Sequence lengths at load time: every example's token count (image tokens included) against ``max_length``.

A training example longer than ``max_length`` is found when the data is loaded, not when its batch comes up
mid-run; what happens to it is the run's ``truncation`` policy:

* ``error`` (default): a one-line ``DataError`` naming the file, row and field, before any model step;
* ``truncate_prompt``: tokens are cut from the start of the prompt's text (system and user turns, first turn
  first) until the example fits; images and replies are never cut (an example whose images and replies alone are
  too long is still an error);
* ``skip``: the example is left out and counted.

Counting does not preprocess pixels: the text is tokenized as the processor would, and each image adds the tokens
its placeholder expands to, measured once per image size with the model's own processor (exact for processors that
expand image placeholders in the text: LLaVA, Qwen2-VL, Idefics3 and their kin).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args

from jinja2 import TemplateError

from mmalign.data.collate import render
from mmalign.errors import DataError, MediaError
from mmalign.limits import open_image
from mmalign.types import ImageRef, Message, Part, PreferencePair, Sample

log = logging.getLogger(__name__)

Truncation = Literal["error", "truncate_prompt", "skip"]
TRUNCATIONS: tuple[str, ...] = get_args(Truncation)
T = TypeVar("T", Sample, PreferencePair)


class TokenCounter:
    """Counts the model tokens of a conversation with its images, as ``mmalign.data.collate`` would encode it."""

    def __init__(self, processor: Any, *, generation_prompt: bool = False, critique_request: str | None = None) -> None:
        self.processor = processor
        self.generation_prompt = generation_prompt
        self.critique_request = critique_request
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self._probe = render(processor, [Message.user("x", images=1)])
        self._probe_text = self.text_tokens([self._probe])[0]
        self._by_size: dict[tuple[int, int], int] = {}
        self._sizes: dict[tuple[str | None, str | None], tuple[int, int]] = {}

    def text_tokens(self, texts: Sequence[str]) -> list[int]:
        """Tokens of each text (special tokens added as the processor adds them)."""
        return [len(ids) for ids in self.tokenizer(list(texts))["input_ids"]]

    def image_extra(self, ref: ImageRef, root: str | None) -> int:
        """The tokens an image adds beyond its placeholder in the rendered text (by image size, measured once)."""
        if ref.data is not None:
            size = _size(ref.data)
        else:
            key = (ref.path, root)
            if key not in self._sizes:
                self._sizes[key] = _size(ref.file(root))
            size = self._sizes[key]
        if size not in self._by_size:
            from PIL import Image

            # The processor itself, not a fast encoder (whose one-time check against the processor must see a real
            # batch), on one row (no padding, so the tokenizer's padding side is left alone).
            enc = self.processor(text=[self._probe], images=[[Image.new("RGB", size)]], return_tensors="pt")
            self._by_size[size] = int(enc["attention_mask"].sum()) - self._probe_text
        return self._by_size[size]

    def conversation_tokens(self, conversations: Sequence[Sequence[Message]]) -> list[int]:
        """Text tokens of each conversation as the chat template renders it (image placeholders unexpanded)."""
        texts = [render(self.processor, conv, generation_prompt=self.generation_prompt) for conv in conversations]
        return self.text_tokens(texts)

    def image_tokens(self, refs: Sequence[ImageRef], root: str | None) -> int:
        """The tokens a conversation's images add to its text."""
        return sum(self.image_extra(ref, root) for ref in refs)

    def lengths(self, conversations: Sequence[Sequence[Message]], images: Sequence[Sequence[ImageRef]], root: Any):
        """Token count of each conversation (with its images)."""
        text = self.conversation_tokens(conversations)
        return [n + self.image_tokens(refs, root) for n, refs in zip(text, images, strict=True)]


def _size(source: Any) -> tuple[int, int]:
    """An image's size, read from its header."""
    try:
        with open_image(source) as img:
            return img.size
    except (OSError, ValueError) as err:
        raise MediaError(f"unreadable image: {err}") from None


def _conversations(item: Sample | PreferencePair, critique_request: str | None = None) -> list[tuple[Message, ...]]:
    """The sequences an example is encoded as: a sample's conversation, or a pair's prompt + each reply (and, for a
    critique reward model, the critique request and the reply's critique after it)."""
    if isinstance(item, Sample):
        return [item.messages]
    sides = ((item.chosen, item.chosen_critique), (item.rejected, item.rejected_critique))
    if critique_request is None:
        return [(*item.prompt, Message.assistant(reply)) for reply, _ in sides]
    return [
        (*item.prompt, Message.assistant(reply), Message.user(critique_request), Message.assistant(critique or ""))
        for reply, critique in sides
    ]


def _with_prompt(item: T, turns: tuple[Message, ...]) -> T:
    """``item`` with its prompt turns (a sample: every turn) replaced."""
    if isinstance(item, Sample):
        return dataclasses.replace(item, messages=turns)
    return dataclasses.replace(item, prompt=turns)


def _prompt_turns(item: Sample | PreferencePair) -> tuple[Message, ...]:
    return item.messages if isinstance(item, Sample) else item.prompt


def _cut_prompt(counter: TokenCounter, turns: tuple[Message, ...], excess: int) -> tuple[tuple[Message, ...], int]:
    """Remove about ``excess`` tokens from the start of the system/user text, first turn first; returns the new
    turns and the tokens removed."""
    removed = 0
    out = list(turns)
    for i, message in enumerate(out):
        if removed >= excess:
            break
        if message.role == "assistant":
            continue
        parts = []
        for part in message.content:
            if part.type == "text" and part.text and removed < excess:
                ids = counter.tokenizer(part.text, add_special_tokens=False)["input_ids"]
                cut = min(len(ids), excess - removed)
                removed += cut
                rest = counter.tokenizer.decode(ids[cut:], skip_special_tokens=False) if cut < len(ids) else ""
                if rest:
                    parts.append(Part("text", rest))
                continue
            parts.append(part)
        out[i] = Message(message.role, tuple(parts))
    return tuple(out), removed


@dataclass
class Fitted:
    """What ``fit_lengths`` did: the examples kept (some truncated), their rows, and the counts."""

    items: list[Any]
    rows: list[int]
    truncated: int = 0
    skipped: int = 0
    longest: int = 0


def fit_lengths(
    processor: Any,
    items: Sequence[T],
    rows: Sequence[int],
    path: str | Path,
    max_length: int,
    policy: Truncation = "error",
    *,
    field: str = "messages",
    reserve: int = 0,
    critique_request: str | None = None,
) -> Fitted:
    """Check every example's token count against ``max_length`` and apply ``policy`` to those over it.

    Args:
        processor: the model's processor (chat template, tokenizer, image processor).
        items: samples or preference pairs, as loaded.
        rows: each item's 1-based row in ``path`` (``LoadResult.rows``), for errors.
        path: the data file, for errors.
        max_length: longest allowed sequence in tokens (image tokens included).
        policy: ``error``, ``truncate_prompt`` or ``skip`` (see the module docstring).
        field: the field an error names.
        reserve: tokens kept free after each example (prompts that replies are sampled for: ``max_new_tokens``);
            the examples are then rendered with the generation prompt.
        critique_request: pairs are encoded with their critiques after this request (critique reward models).

    Raises:
        DataError: an example over the limit (``error``), one that cannot be cut short enough
            (``truncate_prompt``), an unreadable image, or nothing left (``skip``).
    """
    if policy not in TRUNCATIONS:
        raise ValueError(f"truncation must be one of {', '.join(TRUNCATIONS)}, got {policy!r}")
    counter = TokenCounter(processor, generation_prompt=reserve > 0, critique_request=critique_request)
    rows = list(rows) if rows else list(range(1, len(items) + 1))
    if reserve >= max_length:
        raise DataError(
            path, None, None, f"max_new_tokens={reserve} leaves no room for a prompt in max_length={max_length}"
        )
    kept: list[Any] = []
    kept_rows: list[int] = []
    fitted = Fitted(kept, kept_rows)
    chunk = 512
    for start in range(0, len(items), chunk):
        part = items[start : start + chunk]
        lengths = _lengths(counter, part, rows[start : start + chunk], path)
        for item, row, length in zip(part, rows[start : start + chunk], lengths, strict=True):
            fitted.longest = max(fitted.longest, length)
            if length + reserve > max_length:
                item = _over(counter, item, row, path, length, max_length - reserve, policy, field, reserve)
                if item is None:
                    fitted.skipped += 1
                    continue
                fitted.truncated += 1
            kept.append(item)
            kept_rows.append(row)
    if not kept:
        raise DataError(path, None, None, f"every example is longer than max_length={max_length} (truncation=skip)")
    if fitted.truncated or fitted.skipped:
        log.warning(
            "%s: %d examples over max_length=%d: %d prompts truncated, %d skipped",
            Path(path).name,
            fitted.truncated + fitted.skipped,
            max_length,
            fitted.truncated,
            fitted.skipped,
        )
    return fitted


def _lengths(counter: TokenCounter, items: Sequence[Any], rows: Sequence[int], path: str | Path) -> list[int]:
    """The longest encoded sequence of each item (its images counted once: every sequence of an item holds them)."""
    groups = [_conversations(item, counter.critique_request) for item in items]
    try:
        text = counter.conversation_tokens([conv for group in groups for conv in group])
    except (TemplateError, ValueError, TypeError) as err:  # a chat template that rejects a conversation
        raise DataError(path, None, None, f"the model's chat template cannot render a conversation: {err}") from None
    out, at = [], 0
    for item, row, group in zip(items, rows, groups, strict=True):
        try:
            images = counter.image_tokens(item.images, item.root)
        except MediaError as err:
            raise DataError(path, row, "images", str(err)) from None
        out.append(max(text[at : at + len(group)]) + images)
        at += len(group)
    return out


def _over(
    counter: TokenCounter,
    item: Any,
    row: int,
    path: str | Path,
    length: int,
    max_length: int,
    policy: Truncation,
    field: str,
    reserve: int = 0,
) -> Any | None:
    """The policy's answer for one example over the limit: a truncated copy, None (skip), or a ``DataError``."""
    if policy == "skip":
        return None
    if policy == "error":
        raise DataError(
            path,
            row,
            field,
            f"{length} tokens (image tokens included){_plus(reserve)} > max_length={max_length + reserve}; raise "
            "max_length, or set truncation=truncate_prompt or truncation=skip",
        )
    for _ in range(4):  # re-tokenizing a cut text can shift a boundary by a token or two
        turns, removed = _cut_prompt(counter, _prompt_turns(item), length - max_length)
        item = _with_prompt(item, turns)
        length = _lengths(counter, [item], [row], path)[0]
        if length <= max_length:
            return item
        if removed == 0:
            break
    raise DataError(
        path,
        row,
        field,
        f"{length} tokens{_plus(reserve)} > max_length={max_length + reserve} even with the prompt's text cut: its "
        "images and replies alone are too long; raise max_length or set truncation=skip",
    )


def _plus(reserve: int) -> str:
    return f" + max_new_tokens={reserve}" if reserve else ""
