"""Readers for the hallucination benchmarks' files, validated once with errors that name file, row and field.

Row-based files are JSONL (``row`` is the 1-based line number) or one JSON array (``row`` is the 1-based
element number). Every problem raises ``mmalign.errors.DataError``.

* POPE: question/label files (``question_id``, ``image``, ``text``, ``label``; optional ``category``,
  ``object``) and answer files (``question_id`` plus ``text`` or ``answer``).
* CHAIR: captions (``image_id``, ``caption``), ground-truth objects (JSONL ``image_id``/``objects`` or COCO
  ``instances_*.json``) and COCO reference captions (``captions_*.json``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mmalign.data.media import MediaChecker
from mmalign.errors import DataError, MediaError
from mmalign.eval.coco_vocab import ChairVocab
from mmalign.limits import text_problem
from mmalign.types import PopeQuestion

Row = tuple[int, dict[str, Any]]
_NOT_JSON = object()
_POPE_OBJECT = re.compile(r"^is there an? (.+?) in the image\??$", re.IGNORECASE)


def show(value: Any, limit: int = 60) -> str:
    """A value as JSON for an error message, shortened to about ``limit`` characters."""
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_rows(path: str | Path) -> list[Row]:
    """The JSON objects of a JSONL file or a JSON-array file, with their 1-based row numbers.

    Raises:
        DataError: the file cannot be read, a line is not valid JSON, or a row is not a JSON object.
    """
    text = read_text(path)
    return _rows(path, text, _parse_whole(text))


def require_file(directory: Path, name: str, hint: str) -> Path:
    """``directory / name``, which must be a file (a released benchmark's layout; ``hint`` says which directory)."""
    path = directory / name
    if not path.is_file():
        raise DataError(path, None, None, f"file not found ({hint})")
    return path


def read_text(path: str | Path) -> str:
    try:
        if Path(path).exists() and not Path(path).is_file():
            raise DataError(path, None, None, "not a regular file")
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(path, None, None, "file not found") from None
    except OSError as err:
        raise DataError(path, None, None, f"cannot read file ({err.strerror or err})") from None
    except UnicodeDecodeError as err:
        raise DataError(path, None, None, f"not UTF-8 text ({err.reason} at byte {err.start})") from None


def _parse_whole(text: str) -> Any:
    """The file as one JSON document, or ``_NOT_JSON`` (e.g. JSONL with several lines)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return _NOT_JSON


def _rows(path: str | Path, text: str, doc: Any) -> list[Row]:
    if isinstance(doc, list):
        numbered = list(enumerate(doc, start=1))
    elif doc is not _NOT_JSON:
        numbered = [(1, doc)]
    else:
        numbered = []
        for row, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                numbered.append((row, json.loads(line)))
            except json.JSONDecodeError as err:
                raise DataError(path, row, None, f"invalid JSON ({err.msg} at column {err.colno})") from None
    for row, obj in numbered:
        if not isinstance(obj, dict):
            raise DataError(path, row, None, f"expected a JSON object, got {show(obj)}")
    return numbered


def get_field(path: str | Path, row: int | None, rec: dict[str, Any], field: str) -> Any:
    if field not in rec:
        raise DataError(path, row, field, "missing")
    return rec[field]


def str_field(path: str | Path, row: int | None, rec: dict[str, Any], field: str) -> str:
    value = get_field(path, row, rec, field)
    if not isinstance(value, str):
        raise DataError(path, row, field, f"expected a string, got {show(value)}")
    if (problem := text_problem(value)) is not None:
        raise DataError(path, row, field, problem)
    return value


def int_field(path: str | Path, row: int | None, rec: dict[str, Any], field: str) -> int:
    """An integer field; a string of digits is accepted too."""
    value = get_field(path, row, rec, field)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    raise DataError(path, row, field, f"expected an integer, got {show(value)}")


def _image_id(path: str | Path, row: int | None, rec: dict[str, Any], field: str = "image_id") -> str:
    """An image id, given as an integer or a non-empty string, always returned as a string."""
    value = get_field(path, row, rec, field)
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str) and value.strip():
        return value.strip()
    raise DataError(path, row, field, f"expected an integer or a non-empty string, got {show(value)}")


def _check_unique(path: str | Path, row: int, field: str, key: Any, first_row: dict[Any, int]) -> None:
    """Note the row where ``key`` appears; a second appearance is an error."""
    if key in first_row:
        raise DataError(path, row, field, f"duplicate {field} {show(key)} (first in row {first_row[key]})")
    first_row[key] = row


def _optional_str(path: str | Path, row: int, rec: dict[str, Any], field: str) -> str:
    return str_field(path, row, rec, field) if rec.get(field) is not None else ""


# --- POPE ---------------------------------------------------------------------------------------------------


def read_pope_questions(path: str | Path, checker: MediaChecker | None = None) -> list[PopeQuestion]:
    """POPE questions with their labels (official JSONL schema, or a JSON array of the same rows).

    ``category`` (LLaVA's combined file) becomes ``PopeQuestion.split``; ``object`` is read when present,
    else taken from the "Is there a/an {object} in the image?" template when the text follows it. With a
    ``checker`` (of the images' root) every image is checked as the training loaders check theirs (inside the root
    after symlinks, a regular file, decodable, under the pixel limit), each distinct file once per checker.

    Raises:
        DataError: a bad row (missing or mistyped field, label not yes/no, duplicate ``question_id``, an image
            that cannot be used), or no rows.
    """
    rows = read_rows(path)
    if not rows:
        raise DataError(path, None, None, "no questions in file")
    questions: list[PopeQuestion] = []
    first_row: dict[int, int] = {}
    for row, rec in rows:
        qid = int_field(path, row, rec, "question_id")
        _check_unique(path, row, "question_id", qid, first_row)
        text = str_field(path, row, rec, "text")
        label = get_field(path, row, rec, "label")
        norm = label.strip().lower() if isinstance(label, str) else None
        if norm not in ("yes", "no"):
            raise DataError(path, row, "label", f'expected "yes" or "no", got {show(label)}')
        obj = _optional_str(path, row, rec, "object")
        if not obj and (match := _POPE_OBJECT.match(text.strip())):
            obj = match.group(1)
        image = str_field(path, row, rec, "image")
        if checker is not None:
            try:
                checker.check_path(image)
            except MediaError as err:
                raise DataError(path, row, "image", str(err)) from None
        questions.append(
            PopeQuestion(
                question_id=qid,
                image=image,
                text=text,
                label=norm,
                split=_optional_str(path, row, rec, "category"),
                object=obj,
            )
        )
    return questions


def read_pope_answers(path: str | Path) -> dict[int, str]:
    """Model answers by ``question_id`` (LLaVA answer files: ``text``; ``answer`` is accepted too).

    Raises:
        DataError: a bad row, a missing answer field or a duplicate ``question_id``.
    """
    answers: dict[int, str] = {}
    first_row: dict[int, int] = {}
    for row, rec in read_rows(path):
        qid = int_field(path, row, rec, "question_id")
        _check_unique(path, row, "question_id", qid, first_row)
        if "text" not in rec and "answer" not in rec:
            raise DataError(path, row, "text", "missing (the answer goes in 'text' or 'answer')")
        answers[qid] = str_field(path, row, rec, "text" if "text" in rec else "answer")
    return answers


# --- CHAIR --------------------------------------------------------------------------------------------------


def read_captions(path: str | Path) -> dict[str, str]:
    """Model captions by image id (JSONL ``{"image_id", "caption"}``; integer ids become strings).

    Raises:
        DataError: a bad row, a duplicate ``image_id`` or no rows.
    """
    captions: dict[str, str] = {}
    first_row: dict[str, int] = {}
    for row, rec in read_rows(path):
        image_id = _image_id(path, row, rec)
        _check_unique(path, row, "image_id", image_id, first_row)
        captions[image_id] = str_field(path, row, rec, "caption")
    if not captions:
        raise DataError(path, None, None, "no captions in file")
    return captions


def read_object_annotations(path: str | Path, vocab: ChairVocab) -> dict[str, set[str]]:
    """Ground-truth object categories per image id, mapped to the vocabulary's canonical names.

    Accepts JSONL ``{"image_id", "objects": [category, ...]}`` rows or a COCO ``instances_*.json`` file
    (every listed image gets an entry, an empty set when it has no annotation).

    Raises:
        DataError: a bad row, an unknown category, a duplicate ``image_id`` or a malformed COCO file.
    """
    text = read_text(path)
    doc = _parse_whole(text)
    if isinstance(doc, dict) and "annotations" in doc:
        return _coco_instances(path, doc, vocab)
    objects: dict[str, set[str]] = {}
    first_row: dict[str, int] = {}
    for row, rec in _rows(path, text, doc):
        image_id = _image_id(path, row, rec)
        _check_unique(path, row, "image_id", image_id, first_row)
        names = get_field(path, row, rec, "objects")
        if not isinstance(names, list):
            raise DataError(path, row, "objects", f"expected a list of category names, got {show(names)}")
        objects[image_id] = {_category(path, row, "objects", name, vocab) for name in names}
    return objects


def _category(path: str | Path, row: int | None, field: str, name: Any, vocab: ChairVocab) -> str:
    canonical = vocab.canonical(name) if isinstance(name, str) else None
    if canonical is None:
        raise DataError(path, row, field, f"unknown category {show(name)} (not in the CHAIR vocabulary)")
    return canonical


def _coco_list(path: str | Path, doc: dict[str, Any], key: str) -> list[dict[str, Any]]:
    items = doc.get(key)
    if not isinstance(items, list):
        raise DataError(path, None, key, f"expected a list, got {show(items)}")
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise DataError(path, None, f"{key}[{i}]", f"expected an object, got {show(item)}")
    return items


@contextmanager
def _coco_item(path: str | Path, key: str, index: int) -> Iterator[None]:
    """Re-raise a field error inside a COCO list with the item located: ``annotations[4].category_id``."""
    try:
        yield
    except DataError as err:
        raise DataError(path, None, f"{key}[{index}].{err.field}", err.reason) from None


def _coco_instances(path: str | Path, doc: dict[str, Any], vocab: ChairVocab) -> dict[str, set[str]]:
    names = {}
    for i, cat in enumerate(_coco_list(path, doc, "categories")):
        with _coco_item(path, "categories", i):
            names[int_field(path, None, cat, "id")] = _category(path, None, "name", cat.get("name"), vocab)
    objects: dict[str, set[str]] = {}
    for i, img in enumerate(_coco_list(path, doc, "images")):
        with _coco_item(path, "images", i):
            objects[_image_id(path, None, img, "id")] = set()
    for i, ann in enumerate(_coco_list(path, doc, "annotations")):
        with _coco_item(path, "annotations", i):
            category_id = int_field(path, None, ann, "category_id")
            if category_id not in names:
                raise DataError(path, None, "category_id", f"unknown category id {category_id}")
            objects.setdefault(_image_id(path, None, ann), set()).add(names[category_id])
    return objects
