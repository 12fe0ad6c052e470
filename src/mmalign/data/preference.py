"""Load preference pairs (a prompt with its images, a chosen and a rejected reply) into ``PreferencePair`` records.

Files are read like ``load_samples`` reads them (JSON lines, a ``.json`` JSON array, Parquet, ``save_to_disk``
directories) and every row is validated once, here, with errors that name file, 1-based row and field.
Five row schemas::

    mmalign     {"id", "images": [...], "prompt": [messages...] or "text", "chosen": "...", "rejected": "...",
                 "margin"?: float, "corrupted_image"?: <image>, "objects"?: ["star", ...],
                 "facts"?: ["A red star.", ...], "chosen_critique"?: str, "rejected_critique"?: str
                 (or MM-RLHF's "chosen_reason" / "rejected_reason"), "meta"?: {...}}
    trl         TRL's conversational vision format: "images" (or "image"), "prompt": [messages with
                {"type": "image"} parts], "chosen"/"rejected": [one assistant message] (or strings)
    rlaif_v     RLAIF-V: "image", "question", "chosen", "rejected" (strings)
    vlfeedback  VLFeedback: "image" (or "image_path"), "prompt", "completions": [{"response" | "text",
                "score" | "rating" | "annotations": {aspect: number or {"Rating": number}}}]
    llamafactory
                LLaMA-Factory's ranking rows: "images"?, "conversations": [{"from": "human" | "gpt" | "system",
                "value"}] (or "messages": [{"role", "content"}]) ending with a user turn, "chosen"/"rejected":
                one {"from": "gpt", "value"} (or {"role": "assistant", "content"}), "system"?: "..." (used when
                the conversation has no system turn)

With ``schema="auto"`` the schema is taken from the keys of the first row that loads, then held for the file.
A text with ``<image>`` markers gets its image parts there; a plain-text prompt without markers gets its
images at the start of the first user turn. VLFeedback rows become (best, worst) pairs with
``margin`` = score difference; a row whose completions all score the same has no preference and is skipped
(counted in ``skipped``, in both modes).

Example:
    >>> result = load_pairs("data/rlaif_v.parquet", on_bad_record="skip")
    >>> print(result.summary())
    loaded 998 rlaif_v pairs from rlaif_v.parquet, skipped 2 records (first: ...)
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from mmalign.data.loaders import collect_rows, open_source
from mmalign.data.media import MediaChecker
from mmalign.data.records import (
    IMAGE_TOKEN,
    RowContext,
    check_count,
    check_texts,
    count_parts,
    media_refs,
    media_values,
    parse_conversation,
    parse_id,
    parse_message,
    parse_sharegpt_turn,
    prepend_images,
    split_image_tokens,
    type_name,
)
from mmalign.errors import DataError
from mmalign.limits import text_problem
from mmalign.types import ImageRef, Message, Part, PreferencePair

Schema = Literal["mmalign", "trl", "rlaif_v", "vlfeedback", "llamafactory"]
SCHEMAS: tuple[str, ...] = get_args(Schema)
# RLAIF-V columns worth keeping as provenance.
RLAIF_V_META = ("ds_name", "origin_dataset", "origin_split", "idx", "image_path")
RATING_KEYS = ("Rating", "rating", "score")


class NoPreference(DataError):
    """A row that is well formed but prefers nothing (tied scores); skipped in both modes."""


@dataclass
class PairLoadResult:
    """The outcome of ``load_pairs``.

    Attributes:
        pairs: the valid pairs, in file order.
        skipped: rows left out: bad rows (``on_bad_record="skip"``) and rows without a preference.
        reasons: the ``DataError`` messages of the first ``MAX_REASONS`` skipped rows.
        path: the file or directory that was read.
        rows: the 1-based row of each of ``pairs`` in the file.
        schema: the schema the rows were read with (detected or forced).
    """

    pairs: list[PreferencePair]
    skipped: int
    reasons: list[str] = field(default_factory=list)
    path: Path = Path()
    rows: list[int] = field(default_factory=list)
    schema: str = ""

    def __len__(self) -> int:
        return len(self.pairs)

    def summary(self) -> str:
        """One line for logs: ``loaded 98 trl pairs from data.jsonl, skipped 2 records (first: ...)``."""
        line = f"loaded {len(self.pairs)} {self.schema} pairs from {self.path.name}"
        if self.skipped:
            line += f", skipped {self.skipped} records"
            if self.reasons:
                line += f" (first: {self.reasons[0]})"
        return line


@dataclass
class _Fields:
    """One row in schema-neutral form, before the checks shared by every schema."""

    id: str
    prompt: list[Message]
    plain_text: bool  # some prompt text was a plain string, so images may be placed for it
    images: list[tuple[str, Any]]
    image_field: str
    chosen: str
    rejected: str
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"
    margin: float | None = None
    corrupted_image: Any = None
    objects: tuple[str, ...] = ()
    facts: tuple[str, ...] = ()
    critiques: tuple[str | None, str | None] = (None, None)
    meta: dict[str, Any] = field(default_factory=dict)


def load_pairs(
    path: str | Path,
    *,
    root: str | Path | None = None,
    on_bad_record: Literal["fail", "skip"] = "fail",
    check_images: bool = True,
    limit: int | None = None,
    schema: Schema | Literal["auto"] = "auto",
) -> PairLoadResult:
    """Load and validate every preference pair of a data file.

    Args:
        path: a ``.jsonl`` (JSON lines), ``.json`` (a JSON array of rows, or JSON lines) or ``.parquet``
            file, or a ``save_to_disk`` directory.
        root: directory that image paths resolve against and must stay inside; defaults to the directory
            containing the file (for a ``save_to_disk`` directory: that directory).
        on_bad_record: ``"fail"`` raises on the first bad row; ``"skip"`` drops bad rows and counts them.
        check_images: fully decode every image (each distinct file once). Path containment and file
            existence are checked either way.
        limit: stop after this many valid pairs.
        schema: ``"auto"`` (from the first loadable row's keys) or one of ``SCHEMAS``.

    Returns:
        The pairs, with ``PreferencePair.root`` set to the absolute data set root.

    Raises:
        DataError: the path is missing or of an unknown kind, a row is bad (``"fail"``), or no row is
            usable (the file is empty, or every row was skipped).
        ValueError: ``on_bad_record``, ``limit`` or ``schema`` is invalid.
    """
    if schema != "auto" and schema not in SCHEMAS:
        raise ValueError(f"schema must be 'auto' or one of {', '.join(SCHEMAS)}, got {schema!r}")
    source = open_source(path, root=root, on_bad_record=on_bad_record, limit=limit, check_images=check_images)
    path = source.path
    # The schema is fixed by the first row that loads (or forced by the caller).
    locked: list[Schema] = [] if schema == "auto" else [schema]

    def parse(row: int, obj: dict[str, Any]) -> PreferencePair:
        ctx = RowContext(path, row)
        row_schema = locked[0] if locked else _detect(obj, ctx)
        pair = _finish(PARSERS[row_schema](obj, ctx), ctx, source.checker)
        locked[:1] = [row_schema]
        return pair

    pairs, skipped, reasons, rows = collect_rows(
        source, parse, on_bad_record=on_bad_record, limit=limit, always_skip=(NoPreference,)
    )
    result = PairLoadResult(pairs=pairs, skipped=skipped, reasons=reasons, path=path, rows=rows)
    result.schema = locked[0] if locked else ""
    if not result.pairs:
        reason = f"all {result.skipped} records were skipped (first: {result.reasons[0]})" if result.skipped else ""
        raise DataError(path, None, None, reason or "no records")
    return result


def detect_schema(record: Mapping[str, Any]) -> Schema | None:
    """The schema a row's keys point to, or ``None`` when they point to none.

    ``completions`` → vlfeedback; ``chosen`` as one turn object → llamafactory; ``question`` → rlaif_v;
    ``chosen`` as a list of messages → trl; ``chosen`` as a string → mmalign (TRL rows with string replies
    read the same way).
    """
    if "completions" in record:
        return "vlfeedback"
    chosen = record.get("chosen")
    if isinstance(chosen, Mapping):
        return "llamafactory"
    if "question" in record and isinstance(chosen, str):
        return "rlaif_v"
    if isinstance(chosen, list | tuple):
        return "trl"
    if isinstance(chosen, str):
        return "mmalign"
    return None


def _detect(record: Mapping[str, Any], ctx: RowContext) -> Schema:
    found = detect_schema(record)
    if found is not None:
        return found
    if record.get("chosen") is None:
        keys = ", ".join(sorted(map(str, record))) or "none"
        reason = f"missing 'chosen' (or VLFeedback 'completions'), so the schema is unknown; keys: {keys}"
        raise ctx.error("chosen", reason)
    reason = f"must be a string, a list of messages or one turn object, got {type_name(record['chosen'])}"
    raise ctx.error("chosen", reason)


# --- the five schemas ----------------------------------------------------------------------------------


def _mmalign_fields(record: Mapping[str, Any], ctx: RowContext) -> _Fields:
    return _prompt_fields(record, ctx, _text)


def _trl_fields(record: Mapping[str, Any], ctx: RowContext) -> _Fields:
    return _prompt_fields(record, ctx, _reply)


def _prompt_fields(
    record: Mapping[str, Any], ctx: RowContext, reply: Callable[[Mapping[str, Any], str, RowContext], str]
) -> _Fields:
    """Rows that carry ``prompt``, ``chosen`` and ``rejected`` directly (our schema and TRL's)."""
    prompt, plain = _prompt(_required(record, "prompt", ctx), "prompt", ctx)
    images, image_field = media_values(record, "images", "image", ctx)
    return _Fields(
        id=parse_id(record.get("id"), ctx),
        prompt=prompt,
        plain_text=plain,
        images=images,
        image_field=image_field,
        chosen=reply(record, "chosen", ctx),
        rejected=reply(record, "rejected", ctx),
        margin=_margin(record.get("margin"), ctx),
        corrupted_image=record.get("corrupted_image"),
        objects=_strings(record.get("objects"), "objects", ctx),
        facts=_strings(record.get("facts"), "facts", ctx),
        critiques=(_critique(record, "chosen", ctx), _critique(record, "rejected", ctx)),
        meta=_meta(record.get("meta"), ctx),
    )


def _rlaif_v_fields(record: Mapping[str, Any], ctx: RowContext) -> _Fields:
    question = _text(record, "question", ctx)
    if not question.strip():
        raise ctx.error("question", "empty question")
    images, image_field = _image_values(record, ctx)
    raw_id = record.get("id") if record.get("id") is not None else record.get("idx")
    provenance = {k: record[k] for k in RLAIF_V_META if isinstance(record.get(k), str | int | float)}
    return _Fields(
        id=parse_id(raw_id, ctx),
        prompt=[Message("user", (Part("text", question),))],
        plain_text=True,
        images=images,
        image_field=image_field,
        chosen=_text(record, "chosen", ctx),
        rejected=_text(record, "rejected", ctx),
        meta={"source": "rlaif_v", **provenance, **_meta(record.get("meta"), ctx)},
    )


def _vlfeedback_fields(record: Mapping[str, Any], ctx: RowContext) -> _Fields:
    prompt, plain = _prompt(_required(record, "prompt", ctx), "prompt", ctx)
    images, image_field = _image_values(record, ctx)
    completions = _required(record, "completions", ctx)
    if not isinstance(completions, list | tuple):
        raise ctx.error("completions", f"must be a list of completions, got {type_name(completions)}")
    if len(completions) < 2:
        raise ctx.error("completions", f"need at least 2 completions to make a pair, got {len(completions)}")
    scored = [_completion(c, f"completions[{i}]", ctx) for i, c in enumerate(completions)]
    scores = [score for _, _, score, _ in scored]
    # Ties at the top or bottom resolve to the first such completion, so the pair is deterministic.
    best, worst = scores.index(max(scores)), scores.index(min(scores))
    if scores[best] == scores[worst]:
        raise NoPreference(ctx.path, ctx.row, "completions", f"all completions score {scores[best]:g}: no preference")
    (best_key, best_text, _, best_model), (worst_key, worst_text, _, worst_model) = scored[best], scored[worst]
    meta = {"source": "vlfeedback", "scores": scores, "chosen_model": best_model, "rejected_model": worst_model}
    return _Fields(
        id=parse_id(record.get("id"), ctx),
        prompt=prompt,
        plain_text=plain,
        images=images,
        image_field=image_field,
        chosen=best_text,
        rejected=worst_text,
        chosen_field=f"completions[{best}].{best_key}",
        rejected_field=f"completions[{worst}].{worst_key}",
        margin=scores[best] - scores[worst],
        meta={k: v for k, v in meta.items() if v is not None} | _meta(record.get("meta"), ctx),
    )


def _llamafactory_fields(record: Mapping[str, Any], ctx: RowContext) -> _Fields:
    """LLaMA-Factory's ranking rows (sharegpt or OpenAI style): the conversation is the prompt."""
    prompt, plain = parse_conversation(record, ctx)
    if prompt[-1].role != "user":
        key = "messages" if record.get("messages") is not None else "conversations"
        last = len(prompt) - 1
        role_key = "role" if "role" in record[key][last] else "from"
        raise ctx.error(f"{key}[{last}].{role_key}", f"the prompt must end with a user turn, not {prompt[-1].role}")
    system = record.get("system")
    if system is not None and prompt[0].role != "system":  # a system turn wins, as in LLaMA-Factory
        if not isinstance(system, str):
            raise ctx.error("system", f"must be a string, got {type_name(system)}")
        if system.strip():
            prompt = [Message("system", (Part("text", system),)), *prompt]
    for key in ("videos", "audios"):
        if record.get(key):  # their markers would stay in the text as words
            raise ctx.error(key, f"{key} are not supported in preference pairs")
    images, image_field = media_values(record, "images", "image", ctx)
    return _Fields(
        id=parse_id(record.get("id"), ctx),
        prompt=prompt,
        plain_text=plain,
        images=images,
        image_field=image_field,
        chosen=_turn_reply(record, "chosen", ctx),
        rejected=_turn_reply(record, "rejected", ctx),
        meta=_meta(record.get("meta"), ctx),
    )


PARSERS: dict[str, Callable[[Mapping[str, Any], RowContext], _Fields]] = {
    "mmalign": _mmalign_fields,
    "trl": _trl_fields,
    "rlaif_v": _rlaif_v_fields,
    "vlfeedback": _vlfeedback_fields,
    "llamafactory": _llamafactory_fields,
}


def _completion(value: Any, field: str, ctx: RowContext) -> tuple[str, str, float, str | None]:
    """A VLFeedback completion as ``(text key, text, score, model)``."""
    if not isinstance(value, Mapping):
        raise ctx.error(field, f"a completion must be an object, got {type_name(value)}")
    key = "response" if value.get("response") is not None else "text"
    text = value.get(key)
    if not isinstance(text, str):
        raise ctx.error(f"{field}.{key}", f"missing 'response' (or 'text') string, got {type_name(text)}")
    if not text.strip():
        raise ctx.error(f"{field}.{key}", "empty response")
    model = value.get("model")
    return key, text, _completion_score(value, field, ctx), model if isinstance(model, str) else None


def _completion_score(value: Mapping[str, Any], field: str, ctx: RowContext) -> float:
    """``score`` or ``rating``, else the mean of the ``annotations`` ratings (numbers or ``{"Rating": n}``)."""
    for key in ("score", "rating"):
        if value.get(key) is not None:
            return _number(value[key], f"{field}.{key}", ctx)
    annotations = value.get("annotations")
    if not isinstance(annotations, Mapping) or not annotations:
        raise ctx.error(f"{field}.score", "missing 'score', 'rating' or a non-empty 'annotations' object")
    ratings = []
    for aspect, rating in annotations.items():
        where = f"{field}.annotations.{aspect}"
        if isinstance(rating, Mapping):
            key = next((k for k in RATING_KEYS if rating.get(k) is not None), None)
            if key is None:
                raise ctx.error(where, f"expected a number or an object with one of {', '.join(RATING_KEYS)}")
            rating, where = rating[key], f"{where}.{key}"
        ratings.append(_number(rating, where, ctx))
    return sum(ratings) / len(ratings)


# --- shared row pieces ---------------------------------------------------------------------------------


def _finish(fields: _Fields, ctx: RowContext, checker: MediaChecker) -> PreferencePair:
    """Place and count the image parts, check the replies and the media, and build the pair."""
    prompt = _place_images(fields.prompt, len(fields.images), fields.plain_text)
    check_count(count_parts(prompt, "image"), len(fields.images), "image", fields.image_field, ctx)
    if count_parts(prompt, "audio"):
        raise ctx.error("prompt", "audio parts are not supported in preference pairs")
    check_texts(prompt, "prompt", ctx)
    for name, text in ((fields.chosen_field, fields.chosen), (fields.rejected_field, fields.rejected)):
        if not text.strip():
            raise ctx.error(name, "empty reply")
        if (problem := text_problem(text)) is not None:
            raise ctx.error(name, problem)
    if fields.chosen.strip() == fields.rejected.strip():
        raise ctx.error(fields.rejected_field, "identical to the chosen reply")
    images = media_refs(fields.images, "image", ctx, checker, ImageRef)
    corrupted = None
    if fields.corrupted_image is not None:
        (corrupted,) = media_refs([("corrupted_image", fields.corrupted_image)], "image", ctx, checker, ImageRef)
    return PreferencePair(
        id=fields.id,
        prompt=tuple(prompt),
        chosen=fields.chosen,
        rejected=fields.rejected,
        images=tuple(images),
        root=str(checker.root),
        margin=fields.margin,
        corrupted_image=corrupted,
        objects=fields.objects,
        facts=fields.facts,
        chosen_critique=fields.critiques[0],
        rejected_critique=fields.critiques[1],
        meta=fields.meta,
    )


def _place_images(messages: list[Message], n_images: int, plain_text: bool) -> list[Message]:
    """Turn ``<image>`` markers into image parts; without any image part, put plain-text prompts' images first."""
    has_parts = count_parts(messages, "image") > 0
    if not has_parts and any(IMAGE_TOKEN in p.text for m in messages for p in m.content if p.type == "text"):
        messages = [Message(m.role, _split_markers(m.content)) for m in messages]
    elif not has_parts and plain_text and n_images:
        messages = prepend_images(messages, n_images)
    return messages


def _split_markers(parts: tuple[Part, ...]) -> tuple[Part, ...]:
    out: list[Part] = []
    for part in parts:
        out.extend(split_image_tokens(part.text) if part.type == "text" and IMAGE_TOKEN in part.text else (part,))
    return tuple(out)


def _prompt(value: Any, field: str, ctx: RowContext) -> tuple[list[Message], bool]:
    """A prompt given as one user text or as a list of messages ending with a user turn."""
    if isinstance(value, str):
        if not value.strip():
            raise ctx.error(field, "empty prompt")
        return [Message("user", (Part("text", value),))], True
    if not isinstance(value, list | tuple):
        raise ctx.error(field, f"must be a string or a list of messages, got {type_name(value)}")
    if not value:
        raise ctx.error(field, "empty prompt")
    messages, plain = [], False
    for i, turn in enumerate(value):
        if not isinstance(turn, Mapping):
            raise ctx.error(f"{field}[{i}]", f"a turn must be an object, got {type_name(turn)}")
        message, was_string = parse_message(turn, f"{field}[{i}]", ctx)
        messages.append(message)
        plain = plain or was_string
    if messages[-1].role != "user":
        last = len(messages) - 1
        raise ctx.error(f"{field}[{last}].role", f"the prompt must end with a user turn, not {messages[-1].role}")
    return messages, plain


def _reply(record: Mapping[str, Any], key: str, ctx: RowContext) -> str:
    """A TRL reply: one assistant message (its text), or a plain string."""
    value = _required(record, key, ctx)
    if isinstance(value, str):
        return value
    if not isinstance(value, list | tuple):
        raise ctx.error(key, f"must be a list of messages or a string, got {type_name(value)}")
    if len(value) != 1:
        raise ctx.error(key, f"expected one assistant message, got {len(value)} messages")
    if not isinstance(value[0], Mapping):
        raise ctx.error(f"{key}[0]", f"a turn must be an object, got {type_name(value[0])}")
    message, _ = parse_message(value[0], f"{key}[0]", ctx)
    if message.role != "assistant":
        raise ctx.error(f"{key}[0].role", f"expected an assistant turn, got {message.role!r}")
    return message.text


def _turn_reply(record: Mapping[str, Any], key: str, ctx: RowContext) -> str:
    """A LLaMA-Factory reply: one ``{"from": "gpt", "value"}`` or ``{"role": "assistant", "content"}`` object."""
    value = _required(record, key, ctx)
    if not isinstance(value, Mapping):
        raise ctx.error(key, f"must be one assistant turn object, got {type_name(value)}")
    # Arrow fills a struct's absent keys with None, so a present but null "role" means ShareGPT's form.
    role_key = "role" if value.get("role") is not None else "from"
    message = parse_message(value, key, ctx)[0] if role_key == "role" else parse_sharegpt_turn(value, key, ctx)
    if message.role != "assistant":
        raise ctx.error(f"{key}.{role_key}", f"expected an assistant turn, got {value[role_key]!r}")
    if count_parts([message], "image"):
        raise ctx.error(key, "a reply cannot hold images")
    return message.text


def _image_values(record: Mapping[str, Any], ctx: RowContext) -> tuple[list[tuple[str, Any]], str]:
    """``image``/``images``, falling back to ``image_path`` (RLAIF-V and VLFeedback exports)."""
    values, image_field = media_values(record, "images", "image", ctx)
    if not values and record.get("image_path") is not None:
        return [("image_path", record["image_path"])], "image_path"
    return values, image_field


def _required(record: Mapping[str, Any], key: str, ctx: RowContext) -> Any:
    value = record.get(key)
    if value is None:
        raise ctx.error(key, f"missing {key!r}")
    return value


def _text(record: Mapping[str, Any], key: str, ctx: RowContext) -> str:
    value = _required(record, key, ctx)
    if not isinstance(value, str):
        raise ctx.error(key, f"must be a string, got {type_name(value)}")
    return value


def _number(value: Any, field: str, ctx: RowContext) -> float:
    """A finite number; numeric strings count (VLFeedback stores ratings as text)."""
    number = math.nan
    if isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        with contextlib.suppress(ValueError):
            number = float(value.strip())
    if not math.isfinite(number):
        raise ctx.error(field, f"must be a finite number, got {value!r}")
    return number


def _margin(value: Any, ctx: RowContext) -> float | None:
    if value is None:
        return None
    if isinstance(value, str):  # a margin is data, not text: refuse what _number would accept
        raise ctx.error("margin", f"must be a finite number, got {value!r}")
    return _number(value, "margin", ctx)


def _critique(record: Mapping[str, Any], side: str, ctx: RowContext) -> str | None:
    """``<side>_critique`` (or MM-RLHF's ``<side>_reason``): a non-empty string, or absent."""
    for key in (f"{side}_critique", f"{side}_reason"):
        value = record.get(key)
        if value is None:
            continue
        if not isinstance(value, str) or not value.strip():
            raise ctx.error(key, f"must be a non-empty string, got {type_name(value)}")
        return value
    return None


def _strings(value: Any, name: str, ctx: RowContext) -> tuple[str, ...]:
    """An optional list of non-empty strings (``objects``, ``facts``)."""
    if value is None:
        return ()
    if not isinstance(value, list | tuple):
        raise ctx.error(name, f"must be a list of strings, got {type_name(value)}")
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item.strip():
            raise ctx.error(f"{name}[{i}]", f"must be a non-empty string, got {item!r}")
    return tuple(value)


def _meta(value: Any, ctx: RowContext) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ctx.error("meta", f"must be an object, got {type_name(value)}")
    return dict(value)


# --- writing -------------------------------------------------------------------------------------------


def write_pairs(pairs: Iterable[PreferencePair], path: str | Path) -> int:
    """Write pairs as ``mmalign``-schema JSON lines, atomically (a temporary file renamed into place).

    Image paths are written relative to the output file's directory when they lie inside it, otherwise
    absolute; images held as bytes are written as ``{"bytes": <base64>}``. ``load_pairs`` reads the file
    back into equal pairs when the images lie under the file's directory (or pass ``root=``).

    Args:
        pairs: the pairs to write.
        path: the output ``.jsonl`` file; its directory is created if needed.

    Returns:
        The number of pairs written.
    """
    path = Path(path)
    out_dir = Path(os.path.abspath(path.parent))
    # Serialise everything before touching the disk, so a bad pair leaves no partial file behind.
    lines = [json.dumps(pair_row(pair, out_dir), ensure_ascii=False) + "\n" for pair in pairs]
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text("".join(lines), encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return len(lines)


def pair_row(pair: PreferencePair, out_dir: Path) -> dict[str, Any]:
    """One pair as an ``mmalign``-schema JSON row; image paths relative to ``out_dir`` when inside it."""
    row: dict[str, Any] = {
        "id": pair.id,
        "images": [_image_value(ref, pair.root, out_dir) for ref in pair.images],
        "prompt": [message.to_hf() for message in pair.prompt],
        "chosen": pair.chosen,
        "rejected": pair.rejected,
    }
    if pair.margin is not None:
        row["margin"] = pair.margin
    if pair.corrupted_image is not None:
        row["corrupted_image"] = _image_value(pair.corrupted_image, pair.root, out_dir)
    if pair.objects:
        row["objects"] = list(pair.objects)
    if pair.facts:
        row["facts"] = list(pair.facts)
    if pair.chosen_critique is not None:
        row["chosen_critique"] = pair.chosen_critique
    if pair.rejected_critique is not None:
        row["rejected_critique"] = pair.rejected_critique
    if pair.meta:
        row["meta"] = pair.meta
    return row


def _image_value(ref: ImageRef, root: str | None, out_dir: Path) -> str | dict[str, str]:
    if ref.data is not None:
        return {"bytes": base64.b64encode(ref.data).decode("ascii")}
    if ref.path is None:
        raise ValueError("ImageRef has neither path nor data")
    full = Path(os.path.abspath(Path(root or ".") / ref.path))
    try:
        return full.relative_to(out_dir).as_posix()
    except ValueError:
        return str(full)
