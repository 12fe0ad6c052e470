"""POPE evaluation of a model: ask every question, parse, score per split.

``--data`` may be a world directory (``pope_{split}.jsonl`` inside), an official POPE question file, or a combined
file whose rows carry a ``category`` naming the split.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from mmalign.errors import DataError
from mmalign.eval.generate import generate_answers, yes_no_logits
from mmalign.eval.io import read_pope_questions
from mmalign.eval.pope_score import parse_pope_answer, pope_markdown_table, score_pope
from mmalign.types import ImageRef, Message, PopeQuestion, Sample

SPLITS = ("random", "popular", "adversarial")
# LLaVA-1.5's POPE prompt suffix; empty by default because the world's instruction data asks bare questions.
LLAVA_SUFFIX = " Answer the question using a single word or phrase."


@dataclass(frozen=True)
class PopeSet:
    """The questions of one split and the directory their image paths resolve against."""

    split: str
    questions: list[PopeQuestion]
    root: Path


def load_pope_sets(data: str | Path, split: str = "all", image_root: str | Path | None = None) -> list[PopeSet]:
    """Find the POPE question sets to run: a world directory, or a question file (its images relative to
    ``image_root``, by default the file's directory; e.g. COCO's ``val2014`` for the official files).

    Raises:
        DataError: no question file for the split, or an unknown split.
    """
    path = Path(data)
    wanted = list(SPLITS) if split == "all" else [split]
    if path.is_dir():
        sets = []
        for name in wanted:
            f = path / f"pope_{name}.jsonl"
            if not f.is_file():
                raise DataError(f, None, None, f"no POPE file for split {name!r} in {path}")
            sets.append(PopeSet(name, read_pope_questions(f, path), path))
        return sets
    root = Path(image_root) if image_root is not None else path.parent
    questions = read_pope_questions(path, root)
    categories = sorted({q.split for q in questions if q.split})
    if not categories:
        name = split if split != "all" else path.stem
        return [PopeSet(name, questions, root)]
    names = categories if split == "all" else wanted
    sets = []
    for name in names:
        chosen = [q for q in questions if q.split == name]
        if not chosen:
            raise DataError(path, None, "category", f"no questions of split {name!r} (found {categories})")
        sets.append(PopeSet(name, chosen, root))
    return sets


def question_samples(pope: PopeSet, suffix: str = "") -> list[Sample]:
    """One single-image prompt per question."""
    return [
        Sample(
            id=str(q.question_id),
            messages=(Message.user(q.text + suffix, images=1),),
            images=(ImageRef(path=q.image),),
            root=str(pope.root),
        )
        for q in pope.questions
    ]


def answer_samples(
    model: Any,
    processor: Any,
    samples: Sequence[Sample],
    *,
    method: Literal["logits", "generate"] = "logits",
    batch_size: int = 32,
    desc: str = "POPE",
    progress: bool = True,
) -> list[str]:
    """Answer yes/no question prompts: ``Yes``/``No`` from the logit margin, or greedy text."""
    if method == "logits":
        margins = yes_no_logits(model, processor, samples, batch_size=batch_size, desc=desc, progress=progress)
        return ["Yes" if m > 0 else "No" for m in margins]
    return generate_answers(
        model, processor, samples, max_new_tokens=8, batch_size=batch_size, desc=desc, progress=progress
    )


def answer_pope(
    model: Any,
    processor: Any,
    pope: PopeSet,
    *,
    method: Literal["logits", "generate"] = "logits",
    suffix: str = "",
    batch_size: int = 32,
    progress: bool = True,
) -> list[str]:
    """Answer every question of one split."""
    samples = question_samples(pope, suffix)
    return answer_samples(
        model, processor, samples, method=method, batch_size=batch_size, desc=f"POPE {pope.split}", progress=progress
    )


def evaluate_pope(
    model: Any,
    processor: Any,
    sets: Sequence[PopeSet],
    *,
    method: Literal["logits", "generate"] = "logits",
    suffix: str = "",
    batch_size: int = 32,
    answers_out: Path | None = None,
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """Score each split; optionally write the answers as JSONL (LLaVA answer-file format).

    The splits share most of their questions (every split asks about the same present objects, and popular and
    adversarial negatives often coincide: the default world's 2,628 questions are 1,158 distinct ones), so each
    distinct question (same image, same text) is asked once and its answer used wherever it occurs.
    """
    index: dict[tuple[Any, ...], int] = {}
    distinct: list[Sample] = []
    where: list[list[int]] = []  # per split, each question's place among the distinct ones
    for pope in sets:
        where.append([])
        for sample in question_samples(pope, suffix):
            key = (sample.root, sample.images, sample.messages)
            if key not in index:
                index[key] = len(distinct)
                distinct.append(sample)
            where[-1].append(index[key])
    answered = answer_samples(model, processor, distinct, method=method, batch_size=batch_size, progress=progress)
    results: dict[str, dict[str, Any]] = {}
    rows = []
    for pope, places in zip(sets, where):
        answers = [answered[i] for i in places]
        preds = [parse_pope_answer(a) for a in answers]
        labels = [q.label for q in pope.questions]
        results[pope.split] = score_pope(preds, labels)
        # Per question, in file order, 1 for "yes": the table a bootstrap resamples (compact in results files).
        results[pope.split]["items"] = {
            "label": "".join("1" if x == "yes" else "0" for x in labels),
            "pred": "".join("1" if x == "yes" else "0" for x in preds),
        }
        rows.extend(
            {"question_id": q.question_id, "prompt": q.text, "text": a, "category": pope.split}
            for q, a in zip(pope.questions, answers)
        )
    if answers_out is not None:
        answers_out.parent.mkdir(parents=True, exist_ok=True)
        answers_out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return results


def summary_table(results: dict[str, dict[str, Any]]) -> str:
    """Markdown table of the per-split results."""
    return pope_markdown_table(results)
