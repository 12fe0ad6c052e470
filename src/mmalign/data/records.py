"""One data row (a dict) into a validated ``Sample``.

The row format (JSON-lines objects, JSON array elements, Parquet rows and Hugging Face dataset rows share it)::

    {"id": "sft-000123",                       # optional, str or int; default "<file stem>-<row>"
     "images": ["images/train/000010.png"],    # or "image": "<path>"; optional
     "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "..."}]},
                  {"role": "assistant", "content": "Yes."}],
     "meta": {...}}                            # optional dict

A media value is a path (relative to the data set root), ``{"path": ...}``, ``{"bytes": <base64 text or
raw bytes>}``, raw bytes or a PIL image. ``audios`` works like ``images`` for ``{"type": "audio"}`` parts
(checked for existence, not decoded). ShareGPT rows use ``"conversations": [{"from": "human", "value":
"<image>\\nIs there a star?"}, {"from": "gpt", "value": "Yes."}]``, where ``<image>`` marks where each
image goes; LLaVA's instruction data (``{"id", "image", "conversations"}``) reads this way. When content
is given as plain strings and the conversation has no image part at all, the sample's images are placed at
the start of the first user turn. Other top-level keys are ignored.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

from mmalign.data.media import MediaChecker, media_source
from mmalign.errors import DataError, MediaError
from mmalign.limits import text_problem
from mmalign.types import AudioRef, ImageRef, Message, Part, PartType, Role, Sample

ROLES: tuple[str, ...] = get_args(Role)
PART_TYPES: tuple[str, ...] = get_args(PartType)
SHAREGPT_ROLES: dict[str, Role] = {
    "human": "user",
    "gpt": "assistant",
    "system": "system",
    "user": "user",
    "assistant": "assistant",
}
IMAGE_TOKEN = "<image>"


@dataclass(frozen=True)
class RowContext:
    """Where a row comes from, to build errors that name file, row and field."""

    path: Path
    row: int

    def error(self, field: str | None, reason: str) -> DataError:
        return DataError(self.path, self.row, field, reason)


def _is_mapping(value: Any) -> bool:
    """``isinstance(value, Mapping)``, with the common case (a ``dict`` from JSON) first: the ABC check is slow."""
    return type(value) is dict or isinstance(value, Mapping)


def type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def parse_sample(
    record: Mapping[str, Any],
    *,
    path: str | Path,
    row: int,
    root: str | Path,
    checker: MediaChecker | None = None,
    needs_reply: bool = False,
) -> Sample:
    """Validate one row and build its ``Sample``.

    Args:
        record: the row (a JSON object, or a Parquet / datasets row as a dict).
        path: the data file, for error messages and the default id.
        row: 1-based row number, for error messages and the default id.
        root: data set root that relative media paths resolve against (stored in ``Sample.root``).
        checker: media checker shared across the rows of one load (its cache avoids decoding an image
            file twice); a fresh decoding checker is made when omitted.
        needs_reply: the row must hold an assistant turn with text (supervised training learns from nothing else).

    Returns:
        The sample; ``ImageRef`` paths stay as written, bytes become ``ImageRef(data=...)``.

    Raises:
        DataError: the first problem found, naming file, row and field.
    """
    ctx = RowContext(path if isinstance(path, Path) else Path(path), row)
    if not _is_mapping(record):
        raise ctx.error(None, f"row must be an object, got {type_name(record)}")
    checker = checker or MediaChecker(root)
    sample_id = parse_id(record.get("id"), ctx)
    meta = record.get("meta")
    if meta is not None and not _is_mapping(meta):
        raise ctx.error("meta", f"must be an object, got {type_name(meta)}")
    messages, plain_text = parse_conversation(record, ctx)
    field = "conversations" if "messages" not in record else "messages"
    check_texts(messages, field, ctx)
    if needs_reply and not any(m.role == "assistant" and m.text.strip() for m in messages):
        raise ctx.error(field, "no assistant turn with text: nothing to learn from")
    image_values, image_field = media_values(record, "images", "image", ctx)
    audio_values, audio_field = media_values(record, "audios", "audio", ctx)
    n_image_parts = count_parts(messages, "image")
    if plain_text and n_image_parts == 0 and image_values:
        messages = prepend_images(messages, len(image_values))
        n_image_parts = count_parts(messages, "image")
    check_count(n_image_parts, len(image_values), "image", image_field, ctx)
    check_count(count_parts(messages, "audio"), len(audio_values), "audio", audio_field, ctx)
    images = media_refs(image_values, "image", ctx, checker, ImageRef)
    audios = media_refs(audio_values, "audio", ctx, checker, AudioRef)
    return Sample(
        id=sample_id,
        messages=tuple(messages),
        images=tuple(images),
        audios=tuple(audios),
        root=str(checker.root),
        meta=dict(meta or {}),
    )


def check_texts(messages: Sequence[Message], field: str, ctx: RowContext) -> None:
    """Refuse a turn whose text is over the text-length limit (``MMALIGN_MAX_TEXT_CHARS``), naming the turn."""
    for i, message in enumerate(messages):
        problem = text_problem(message.text)
        if problem is not None:
            raise ctx.error(f"{field}[{i}]", problem)


def parse_id(value: Any, ctx: RowContext) -> str:
    """The row's id as a string; a row without one gets ``<file stem>-<row>``."""
    if value is None:
        return f"{ctx.path.stem}-{ctx.row}"
    # bool is an int subclass, but an id of True is a data bug, not an id.
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ctx.error("id", f"must be a string or an integer, got {type_name(value)}")
    return str(value)


def parse_conversation(record: Mapping[str, Any], ctx: RowContext) -> tuple[list[Message], bool]:
    """Parse ``messages`` or ``conversations``; also says whether any content was a plain string.

    ``conversations`` turns may be ShareGPT's ``{"from", "value"}`` (their ``<image>`` markers become image
    parts here) or ``{"role", "content"}``; ``messages`` turns are always ``{"role", "content"}``.
    """
    messages, conversations = record.get("messages"), record.get("conversations")
    if messages is not None and conversations is not None:
        raise ctx.error("messages", "both 'messages' and 'conversations' are given")
    if messages is None and conversations is None:
        raise ctx.error("messages", "missing 'messages' (or ShareGPT 'conversations')")
    key = "messages" if messages is not None else "conversations"
    turns = messages if messages is not None else conversations
    if not isinstance(turns, list | tuple):
        raise ctx.error(key, f"must be a list of turns, got {type_name(turns)}")
    if not turns:
        raise ctx.error(key, "empty conversation")
    parsed: list[Message] = []
    plain_text = key == "conversations"
    for i, turn in enumerate(turns):
        field = f"{key}[{i}]"
        if not _is_mapping(turn):
            raise ctx.error(field, f"a turn must be an object, got {type_name(turn)}")
        if key == "conversations" and "role" not in turn:
            parsed.append(parse_sharegpt_turn(turn, field, ctx))
            continue
        message, was_string = parse_message(turn, field, ctx)
        parsed.append(message)
        plain_text = plain_text or was_string
    return parsed, plain_text


def parse_message(turn: Mapping[str, Any], field: str, ctx: RowContext) -> tuple[Message, bool]:
    role = turn.get("role")
    if role is None:
        raise ctx.error(f"{field}.role", "missing role")
    if role not in ROLES:
        raise ctx.error(f"{field}.role", f"unknown role {role!r} (expected one of {', '.join(ROLES)})")
    content = turn.get("content")
    if isinstance(content, str):
        return Message(role, (Part("text", content),)), True
    if not isinstance(content, list | tuple):
        raise ctx.error(f"{field}.content", f"must be a string or a list of parts, got {type_name(content)}")
    if not content:
        raise ctx.error(f"{field}.content", "empty content")
    parts = tuple(_parse_part(part, field, j, ctx) for j, part in enumerate(content))
    return Message(role, parts), False


_MEDIA_PARTS = {kind: Part(kind) for kind in PART_TYPES if kind != "text"}  # records are immutable: share them


def _parse_part(part: Any, field: str, j: int, ctx: RowContext) -> Part:
    """Part ``j`` of the content at ``field`` (the field names are only spelled out for an error)."""
    if not _is_mapping(part):
        raise ctx.error(f"{field}.content[{j}]", f"a content part must be an object, got {type_name(part)}")
    kind = part.get("type")
    if kind == "text":
        text = part.get("text")
        if not isinstance(text, str):
            raise ctx.error(f"{field}.content[{j}].text", f"a text part needs a string 'text', got {type_name(text)}")
        return Part("text", text)
    media = _MEDIA_PARTS.get(kind) if isinstance(kind, str) else None
    if media is None:
        expected = ", ".join(PART_TYPES)
        raise ctx.error(f"{field}.content[{j}].type", f"unknown part type {kind!r} (expected one of {expected})")
    return media


def parse_sharegpt_turn(turn: Mapping[str, Any], field: str, ctx: RowContext) -> Message:
    """A ShareGPT ``{"from": "human" | "gpt" | "system", "value": "..."}`` turn, ``<image>`` markers as parts."""
    speaker = turn.get("from")
    if speaker is None:
        raise ctx.error(f"{field}.from", "missing 'from' (or 'role')")
    if not isinstance(speaker, str) or speaker not in SHAREGPT_ROLES:
        raise ctx.error(f"{field}.from", f"unknown speaker {speaker!r} (expected human, gpt or system)")
    value = turn.get("value")
    if not isinstance(value, str):
        raise ctx.error(f"{field}.value", f"must be a string, got {type_name(value)}")
    return Message(SHAREGPT_ROLES[speaker], split_image_tokens(value))


def split_image_tokens(text: str, token: str = IMAGE_TOKEN) -> tuple[Part, ...]:
    """Split ShareGPT text at ``<image>`` markers into text and image parts.

    One line break right next to a marker is dropped (LLaVA data writes ``"<image>\\nQuestion"``; the
    chat template decides the layout around image tokens), and empty text pieces are left out.

    Example:
        ``"<image>\\nIs there a star?"`` → ``(Part("image"), Part("text", "Is there a star?"))``.
    """
    pieces = text.split(token)
    parts: list[Part] = []
    for i, piece in enumerate(pieces):
        if i > 0:
            parts.append(Part("image"))
            piece = piece.removeprefix("\n")
        if i < len(pieces) - 1:
            piece = piece.removesuffix("\n")
        if piece:
            parts.append(Part("text", piece))
    return tuple(parts)


def count_parts(messages: Sequence[Message], kind: str) -> int:
    return sum(part.type == kind for message in messages for part in message.content)


def prepend_images(messages: list[Message], n: int) -> list[Message]:
    """Put ``n`` image parts at the start of the first user turn (unchanged if there is none)."""
    for i, message in enumerate(messages):
        if message.role == "user":
            images = tuple(Part("image") for _ in range(n))
            return [*messages[:i], Message("user", images + message.content), *messages[i + 1 :]]
    return messages


def check_count(n_parts: int, n_media: int, kind: str, field: str, ctx: RowContext) -> None:
    if n_parts != n_media:
        raise ctx.error(field, f"{n_media} {kind}(s) given but the conversation has {n_parts} {kind} part(s)")


def media_values(
    record: Mapping[str, Any], plural: str, singular: str, ctx: RowContext
) -> tuple[list[tuple[str, Any]], str]:
    """The media values of a row as ``(field, value)`` pairs, plus the field name for count errors."""
    many, one = record.get(plural), record.get(singular)
    if many is not None and one is not None:
        raise ctx.error(singular, f"both {singular!r} and {plural!r} are given")
    if one is not None:
        return [(singular, one)], singular
    if many is None:
        return [], plural
    if isinstance(many, str):
        return [(plural, many)], plural
    if not isinstance(many, list | tuple):
        raise ctx.error(plural, f"must be a list or a string, got {type_name(many)}")
    return [(f"{plural}[{i}]", value) for i, value in enumerate(many)], plural


def media_refs(
    values: list[tuple[str, Any]],
    kind: str,
    ctx: RowContext,
    checker: MediaChecker,
    make: Callable[..., Any],
) -> list[Any]:
    refs = []
    for item_field, value in values:
        try:
            path, data = media_source(value)
            if path is not None:
                checker.check_path(path, kind=kind)
            else:
                checker.check_data(data or b"", kind=kind)
        except MediaError as err:
            raise ctx.error(item_field, str(err)) from None
        refs.append(make(path=path, data=data))
    return refs
