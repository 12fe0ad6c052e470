"""POPE scoring (Li et al., EMNLP 2023; spec §9.1): answer parsing, yes/no metrics, per-split tables.

"yes" is the positive class: accuracy = (TP+TN)/N, precision = TP/(TP+FP), recall = TP/(TP+FN),
F1 = 2PR/(P+R), yes-ratio = #predicted yes / N. A zero denominator gives 0.0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from mmalign.errors import DataError
from mmalign.eval.io import read_pope_answers, read_pope_questions

METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio")
_NO_WORDS = frozenset({"No", "no", "not"})


def parse_pope_answer(text: str) -> Literal["yes", "no"]:
    """The official POPE/LLaVA rule: "no" iff the first sentence contains the word "No", "no" or "not".

    The text is cut at the first ".", commas are removed and it is split on single spaces, exactly as the official
    scripts do (so a tab or a newline joins the words beside it: "Yes\nNo" is "yes"; a leading space leaves an empty
    word and changes nothing); the match is case-sensitive, so "Not sure." is "yes". Anything without a "no" word
    (including "I don't know" and the empty string) counts as "yes".
    """
    words = text.split(".", 1)[0].replace(",", "").split(" ")
    return "no" if _NO_WORDS.intersection(words) else "yes"


def score_pope(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float | int]:
    """Accuracy, precision, recall, F1 and yes-ratio of parsed predictions against labels.

    Args:
        predictions: "yes"/"no" per question (already parsed with ``parse_pope_answer``).
        labels: "yes"/"no" per question, same order.

    Returns:
        ``{"accuracy", "precision", "recall", "f1", "yes_ratio", "n"}``; rates are fractions in [0, 1].

    Raises:
        ValueError: different lengths, or a value other than "yes"/"no".
    """
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions but {len(labels)} labels")
    for name, values in (("predictions", predictions), ("labels", labels)):
        for i, value in enumerate(values):
            if value not in ("yes", "no"):
                raise ValueError(f"{name}[{i}] is {value!r}, expected 'yes' or 'no'")
    pairs = list(zip(predictions, labels))
    tp = pairs.count(("yes", "yes"))
    fp = pairs.count(("yes", "no"))
    tn = pairs.count(("no", "no"))
    fn = pairs.count(("no", "yes"))
    n = len(pairs)
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    return {
        "accuracy": _ratio(tp + tn, n),
        "precision": precision,
        "recall": recall,
        "f1": _ratio(2 * precision * recall, precision + recall),
        "yes_ratio": _ratio(tp + fp, n),
        "n": n,
    }


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


def score_pope_files(answers_path: str | Path, labels_path: str | Path) -> dict[str, Any]:
    """Score an answer file against a question/label file, matching rows by ``question_id``.

    Answers to questions that are not in the label file are ignored (an answer file may cover all splits).
    When the label file holds several ``category`` values (LLaVA's combined file), the result also has
    ``"by_category"``: ``{category: metrics}``; the top-level keys stay the overall metrics.

    Raises:
        DataError: a bad row in either file, or a question without an answer (the first one is named).
    """
    questions = read_pope_questions(labels_path)
    answers = read_pope_answers(answers_path)
    missing = [q.question_id for q in questions if q.question_id not in answers]
    if missing:
        raise DataError(
            answers_path,
            None,
            "question_id",
            f"no answer for question_id {missing[0]} of {Path(labels_path).name} "
            f"({len(missing)} of {len(questions)} questions unanswered)",
        )
    predictions = [parse_pope_answer(answers[q.question_id]) for q in questions]
    result: dict[str, Any] = score_pope(predictions, [q.label for q in questions])
    categories = sorted({q.split for q in questions})
    if len(categories) > 1:
        result["by_category"] = {
            cat: score_pope(
                [p for p, q in zip(predictions, questions) if q.split == cat],
                [q.label for q in questions if q.split == cat],
            )
            for cat in categories
        }
    return result


def pope_markdown_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """A markdown table with one row per split; rates in percent, two decimals.

    Args:
        results: split name → ``score_pope`` result (extra keys such as ``"by_category"`` are ignored).
    """
    lines = [
        "| split | accuracy | precision | recall | F1 | yes ratio | n |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for split, metrics in results.items():
        cells = [f"{100 * metrics[k]:.2f}" for k in METRICS]
        lines.append(f"| {split} | {' | '.join(cells)} | {metrics['n']} |")
    return "\n".join(lines)
