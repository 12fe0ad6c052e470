"""CHAIR scoring (Rohrbach et al., EMNLP 2018; spec §9.2): hallucinated object mentions in captions.

With M the object mentions of all captions (duplicates counted) and H ⊆ M those whose category is not in
the image's ground truth:

* CHAIR_i = |H| / |M|;
* CHAIR_s = #captions with at least one hallucinated mention / #captions;
* recall = Σ_captions |unique correctly mentioned categories| / Σ_captions |ground-truth categories|;
* mean length = mean number of words per caption (``coco_vocab.tokenize``).

A zero denominator gives 0.0.

The word matcher (``chair_words``) follows the official script step by step: lowercase → ``word_tokenize`` (NLTK's
``word_tokenize`` splitting rules, re-implemented: no NLTK needed) → singularise every token → merge two-word
phrases left to right (CHAIR's fixed COCO phrases such as "traffic light", every two-word form of the vocabulary,
and the rewrites "baby/adult <animal>" → animal, "passenger jet/train" → jet/train, "bow tie" → tie, "toilet seat"
→ toilet) → drop every "seat" when "toilet" is among the words → keep the words the vocabulary knows, exactly as
written → map them to their category. ``read_chair_synonyms`` reads the official ``synonyms.txt`` (or RLHF-V's
``synonyms_refine.txt``) as such a vocabulary; without one, the COCO categories with our own synonym lists
(``coco_vocab.COCO_SYNONYMS``) are used.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from mmalign.errors import DataError
from mmalign.eval.coco_vocab import ChairVocab, extract_mentions, normalize_form, singularize, tokenize
from mmalign.eval.io import read_captions, read_object_annotations, read_rows, read_text, show

__all__ = [
    "CHAIR_DOUBLE_WORDS",
    "ChairVocab",
    "chair_markdown_table",
    "chair_words",
    "double_words",
    "extract_mentions",
    "read_chair_synonyms",
    "read_reference_caption_objects",
    "score_chair",
    "score_chair_files",
    "word_tokenize",
]

# --- tokenising: NLTK's word_tokenize rules ------------------------------------------------------------------

# The Treebank rules of NLTK's ``word_tokenize`` that decide where words end, in NLTK's order. NLTK first splits
# sentences (Punkt), then strips the period that ends each sentence; here a period followed by whitespace or the end
# of the text counts as a sentence end (Punkt's rule for every word that is not a known abbreviation, and none of the
# object words is one). A hyphen, a slash or an inner period does not split a word ("hot-dog", "cat/dog" stay
# whole), a comma before a digit does not either ("1,000").
# fmt: off
_TOKEN_RULES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"([«“‘„]|`+)"), r" \1 "),
    (re.compile(r'^"'), r"``"),
    (re.compile(r"(``)"), r" \1 "),
    (re.compile(r'([ (\[{<])("|\'{2})'), r"\1 `` "),
    (re.compile(r"(?i)(')(?!re|ve|ll|m|t|s|d|n)(\w)\b"), r"\1 \2"),
    (re.compile(r"([^.])(\.)([\]\)}>\"']*)(?=\s|$)"), r"\1 \2 \3 "),
    (re.compile(r"([:,])([^\d])"), r" \1 \2"),
    (re.compile(r"([:,])$"), r" \1 "),
    (re.compile(r"\.{2,}"), r" \g<0> "),
    (re.compile(r"[;@#$%&*?!]"), r" \g<0> "),
    (re.compile(r"([^'])' "), r"\1 ' "),
    (re.compile(r"[\]\[(){}<>]"), r" \g<0> "),
    (re.compile(r"--"), r" -- "),
)
_ENDING_RULES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"([»”’])"), r" \1 "),
    (re.compile(r"''"), " '' "),
    (re.compile(r'"'), " '' "),
    (re.compile(r"([^' ])('[sS]|'[mM]|'[dD]|') "), r"\1 \2 "),
    (re.compile(r"([^' ])('ll|'LL|'re|'RE|'ve|'VE|n't|N'T) "), r"\1 \2 "),
)
# fmt: on


def word_tokenize(text: str) -> list[str]:
    """Tokens as NLTK's ``word_tokenize`` splits them: punctuation and clitics ("'s", "n't") apart, words whole.

    Any whitespace (newlines, tabs, runs of spaces) separates tokens. Example: ``"A dog's hot-dog,\\tcats."`` →
    ``["A", "dog", "'s", "hot-dog", ",", "cats", "."]``.
    """
    for pattern, repl in _TOKEN_RULES:
        text = pattern.sub(repl, text)
    text = f" {text} "
    for pattern, repl in _ENDING_RULES:
        text = pattern.sub(repl, text)
    return text.split()


# --- matching ------------------------------------------------------------------------------------------------

# CHAIR's fixed "double words" for COCO: each is merged into one token before the vocabulary lookup. Some are not
# objects ("home plate", "train track"): merging them keeps "plate" and "train" from counting.
# fmt: off
CHAIR_DOUBLE_WORDS = (
    "motor bike", "motor cycle", "air plane", "traffic light", "street light", "traffic signal", "stop light",
    "fire hydrant", "stop sign", "parking meter", "suit case", "sports ball", "baseball bat", "baseball glove",
    "tennis racket", "wine glass", "hot dog", "cell phone", "mobile phone", "teddy bear", "hair drier",
    "potted plant", "bow tie", "laptop computer", "stove top oven", "home plate", "train track",
)
# "baby elephant" is an elephant, not a person; "passenger train" is a train, not a person.
_ANIMAL_WORDS = ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "animal", "cub")
_VEHICLE_WORDS = ("jet", "train")
# fmt: on


@functools.lru_cache(maxsize=16)
def double_words(vocab: ChairVocab) -> Mapping[str, str]:
    """The two-word phrases merged before matching and the token each becomes.

    CHAIR's fixed phrases and the vocabulary's two-word forms become themselves (RLHF-V builds its list from the
    synonym file the same way); then the rewrites: "baby/adult <animal>" → animal, "passenger jet/train" →
    jet/train, "bow tie" → "tie", "toilet seat" → "toilet", "wine glas" → "wine glass".
    """
    merged = {phrase: phrase for phrase in CHAIR_DOUBLE_WORDS}
    merged.update({form: form for form in vocab.forms if len(form.split(" ")) == 2})
    for animal in _ANIMAL_WORDS:
        merged[f"baby {animal}"] = merged[f"adult {animal}"] = animal
    for vehicle in _VEHICLE_WORDS:
        merged[f"passenger {vehicle}"] = vehicle
    merged.update({"bow tie": "tie", "toilet seat": "toilet", "wine glas": "wine glass"})
    return merged


def chair_words(caption: str, vocab: ChairVocab) -> list[tuple[str, str]]:
    """The object words of a caption, in order and with duplicates, each with its category.

    Example (COCO): "Two baby elephants, a toilet seat\\nand a traffic light." → ``[("elephant", "elephant"),
    ("toilet", "toilet"), ("traffic light", "traffic light")]``.
    """
    words = [singularize(w) for w in word_tokenize(caption.lower())]
    pairs = double_words(vocab)
    merged: list[str] = []
    i = 0
    while i < len(words):
        pair = " ".join(words[i : i + 2])
        if pair in pairs:
            merged.append(pairs[pair])
            i += 2
        else:
            merged.append(words[i])
            i += 1
    # The seat of a toilet is not a chair, wherever it is named in the caption.
    if "toilet" in merged and "seat" in merged:
        merged = [w for w in merged if w != "seat"]
    return [(w, vocab.forms[w]) for w in merged if w in vocab.forms]


def read_chair_synonyms(path: str | Path, *, strip: bool = False) -> ChairVocab:
    """A vocabulary from a CHAIR synonym file: one category per line, ``", "``-separated, canonical name first.

    Forms are kept exactly as written, as the official scripts look them up: with ``strip=False`` (LisaAnne's
    ``synonyms.txt`` as CHAIR reads it) an item written after a double space keeps its leading space and never
    matches; ``strip=True`` strips every item (RLHF-V's reader of ``synonyms_refine.txt``). A form listed under
    two lines belongs to the later one. Each canonical name is also stored under its normalised form ("sport ball"),
    so that ground-truth names such as COCO's "sports ball" resolve.

    Raises:
        DataError: the file cannot be read or has no categories.
    """
    lines = read_text(path).splitlines()
    categories: list[str] = []
    forms: dict[str, str] = {}
    for line in lines:
        if not line.strip():
            continue
        items = line.strip().split(", ")
        if strip:
            items = [item.strip() for item in items]
        categories.append(items[0])
        forms.update({item: items[0] for item in items})
    if not categories:
        raise DataError(path, None, None, "no categories in file")
    for name in categories:
        forms.setdefault(normalize_form(name), name)
    return ChairVocab(tuple(dict.fromkeys(categories)), forms)


# --- scoring -------------------------------------------------------------------------------------------------


def score_chair(
    captions: Mapping[str, str], ground_truth: Mapping[str, Collection[str]], vocab: ChairVocab
) -> dict[str, Any]:
    """CHAIR_i, CHAIR_s, recall and length of captions against ground-truth object categories.

    Args:
        captions: image id → generated caption.
        ground_truth: image id → object categories in the image (canonical names or any surface form).
        vocab: the object vocabulary.

    Returns:
        ``chair_i``, ``chair_s``, ``recall``, ``mean_length``, ``n`` (captions), ``n_mentions``,
        ``n_hallucinated``, ``hallucinated_objects`` (category → count, most frequent first) and
        ``per_caption`` (``{"image_id", "mentioned", "hallucinated", "recall"}``, each list unique in order of
        first mention, with the caption's counts: ``n_mentions``, ``n_hallucinated`` (duplicates counted),
        ``n_truth``, ``n_correct``, ``n_words``; the per-caption table a bootstrap resamples).

    Raises:
        DataError: a caption whose image has no ground truth, or a ground-truth category unknown to ``vocab``.
    """
    per_caption = []
    hallucinated: Counter[str] = Counter()
    n_mentions = n_words = n_correct = n_truth = n_bad_captions = 0
    for image_id, caption in captions.items():
        if image_id not in ground_truth:
            raise DataError("<captions>", None, "image_id", f"image_id {show(image_id)} has no ground truth")
        truth = _canonical_truth(image_id, ground_truth[image_id], vocab)
        mentions = [category for _, category in chair_words(caption, vocab)]
        wrong = [m for m in mentions if m not in truth]
        correct = set(mentions) & truth
        hallucinated.update(wrong)
        words = len(tokenize(caption))
        n_mentions += len(mentions)
        n_words += words
        n_correct += len(correct)
        n_truth += len(truth)
        n_bad_captions += bool(wrong)
        per_caption.append(
            {
                "image_id": image_id,
                "mentioned": list(dict.fromkeys(mentions)),
                "hallucinated": list(dict.fromkeys(wrong)),
                "recall": _ratio(len(correct), len(truth)),
                "n_mentions": len(mentions),
                "n_hallucinated": len(wrong),
                "n_truth": len(truth),
                "n_correct": len(correct),
                "n_words": words,
            }
        )
    n = len(per_caption)
    n_hallucinated = sum(hallucinated.values())
    return {
        "chair_i": _ratio(n_hallucinated, n_mentions),
        "chair_s": _ratio(n_bad_captions, n),
        "recall": _ratio(n_correct, n_truth),
        "mean_length": _ratio(n_words, n),
        "n": n,
        "n_mentions": n_mentions,
        "n_hallucinated": n_hallucinated,
        "hallucinated_objects": dict(sorted(hallucinated.items(), key=lambda kv: (-kv[1], kv[0]))),
        "per_caption": per_caption,
    }


def _canonical_truth(image_id: str, objects: Collection[str], vocab: ChairVocab) -> set[str]:
    truth = set()
    for name in objects:
        canonical = vocab.forms.get(name) or vocab.canonical(name)
        if canonical is None:
            raise DataError(
                "<ground_truth>", None, "objects", f"image_id {show(image_id)}: unknown category {show(name)}"
            )
        truth.add(canonical)
    return truth


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


def read_reference_caption_objects(
    path: str | Path, vocab: ChairVocab, image_ids: Collection[str] | None = None
) -> dict[str, set[str]]:
    """Categories that each image's reference captions mention, found by ``chair_words`` (as CHAIR does).

    Reads a COCO ``captions_*.json`` (``annotations``: ``{"image_id", "caption"}``) or JSONL/JSON-array rows
    ``{"image_id", "caption"}``, several per image. With ``image_ids`` only those images' captions are matched (every
    row is still checked): COCO's 2014 files hold 600,000 captions, a benchmark asks about a few hundred images.

    Raises:
        DataError: a malformed file or annotation.
    """
    rows = read_rows(path)
    if len(rows) == 1 and "annotations" in rows[0][1]:
        items = rows[0][1]["annotations"]
        if not isinstance(items, list):
            raise DataError(path, None, "annotations", f"expected a list, got {show(items)}")
        located = [(None, f"annotations[{i}].", item) for i, item in enumerate(items)]
    else:
        located = [(row, "", rec) for row, rec in rows]
    objects: dict[str, set[str]] = {}
    for row, prefix, item in located:
        if not isinstance(item, dict):
            raise DataError(path, row, prefix.rstrip("."), f"expected an object, got {show(item)}")
        image_id, caption = item.get("image_id"), item.get("caption")
        if isinstance(image_id, bool) or not isinstance(image_id, int | str) or not str(image_id).strip():
            raise DataError(path, row, f"{prefix}image_id", f"expected an integer or a string, got {show(image_id)}")
        if not isinstance(caption, str):
            raise DataError(path, row, f"{prefix}caption", f"expected a string, got {show(caption)}")
        key = str(image_id).strip()
        if image_ids is None or key in image_ids:
            objects.setdefault(key, set()).update(category for _, category in chair_words(caption, vocab))
    return objects


def score_chair_files(
    captions_path: str | Path,
    annotations_path: str | Path,
    coco_captions_path: str | Path | None = None,
    vocab: ChairVocab | None = None,
) -> dict[str, Any]:
    """``score_chair`` on files: captions JSONL, object annotations, optional COCO reference captions.

    Args:
        captions_path: JSONL ``{"image_id", "caption"}``.
        annotations_path: JSONL ``{"image_id", "objects"}`` or COCO ``instances_*.json``.
        coco_captions_path: COCO ``captions_*.json``; the objects its captions mention join the ground
            truth, as in the original CHAIR.
        vocab: object vocabulary; COCO's when ``None``.

    Raises:
        DataError: a bad file or row, or a caption whose image has no ground truth.
    """
    vocab = vocab or ChairVocab.coco()
    truth = read_object_annotations(annotations_path, vocab)
    if coco_captions_path is not None:
        for image_id, objects in read_reference_caption_objects(coco_captions_path, vocab).items():
            truth.setdefault(image_id, set()).update(objects)
    captions = read_captions(captions_path)
    for image_id in captions:
        if image_id not in truth:
            reason = f"image_id {show(image_id)} has no ground truth in {annotations_path}"
            raise DataError(captions_path, None, "image_id", reason)
    return score_chair(captions, truth, vocab)


def chair_markdown_table(result: Mapping[str, Any]) -> str:
    """A one-row markdown table of a ``score_chair`` result; rates in percent, two decimals."""
    rates = [f"{100 * result[k]:.2f}" for k in ("chair_s", "chair_i", "recall")]
    counts = [f"{result['mean_length']:.1f}", str(result["n"]), str(result["n_mentions"])]
    return "\n".join(
        [
            "| CHAIR_s | CHAIR_i | recall | mean length | captions | mentions |",
            "|---:|---:|---:|---:|---:|---:|",
            f"| {' | '.join(rates + counts)} |",
        ]
    )
