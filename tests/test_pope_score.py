"""POPE scoring: the official answer parser, hand-computed metrics, file readers and their errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmalign.errors import DataError
from mmalign.eval.io import read_pope_answers, read_pope_questions
from mmalign.eval.pope_score import parse_pope_answer, pope_markdown_table, score_pope, score_pope_files


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


KEYS = ("accuracy", "precision", "recall", "f1", "yes_ratio", "n")


def metrics(*values: float) -> dict:
    """A ``score_pope`` result from its six values, in ``KEYS`` order."""
    return dict(zip(KEYS, values, strict=True))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("No, there is not.", "no"),
        ("Yes.", "yes"),
        ("There is not a dog.", "no"),
        ("I don't know", "yes"),
        ("no.", "no"),
        ("yes, no", "no"),  # comma removed → "yes no" → contains "no"
        ("Yes. No cat.", "yes"),  # only the first sentence counts
        ("No", "no"),
        ("", "yes"),
        ("Nope", "yes"),
        ("NO", "yes"),  # the official match is case-sensitive
        ("Not sure.", "yes"),  # "Not" is not in {"No", "no", "not"}
        # Split on single spaces, as the official scripts: a tab or a newline glues the words beside it.
        ("It is not\nthere", "yes"),
        ("It is\tnot there", "yes"),
        ("Yes\nNo", "yes"),
        ("It is not there\tnow", "no"),
        ("  No.", "no"),  # leading spaces leave empty words
        ("No.\nThere is a cat.", "no"),
        ("No\n", "yes"),  # "No\n" is one word
    ],
)
def test_parse_pope_answer(text: str, expected: str) -> None:
    assert parse_pope_answer(text) == expected


def test_score_pope_six_items() -> None:
    """predictions y y y n y n vs labels y n y y n n.

    TP = 2 (items 1, 3), FP = 2 (items 2, 5), FN = 1 (item 4), TN = 1 (item 6).
    accuracy = (2+1)/6 = 0.5; precision = 2/4 = 0.5; recall = 2/3;
    F1 = 2·(1/2)·(2/3) / (1/2 + 2/3) = (2/3) / (7/6) = 4/7; yes-ratio = 4/6 = 2/3.
    """
    preds = ["yes", "yes", "yes", "no", "yes", "no"]
    labels = ["yes", "no", "yes", "yes", "no", "no"]
    out = score_pope(preds, labels)
    assert tuple(out) == KEYS
    assert out["accuracy"] == pytest.approx(0.5)
    assert out["precision"] == pytest.approx(0.5)
    assert out["recall"] == pytest.approx(2 / 3)
    assert out["f1"] == pytest.approx(4 / 7)
    assert out["yes_ratio"] == pytest.approx(2 / 3)
    assert out["n"] == 6


def test_score_pope_zero_divisions() -> None:
    """All "no" on all-"no" labels: TP = FP = FN = 0, so precision, recall and F1 are 0.0; accuracy 1."""
    out = score_pope(["no", "no"], ["no", "no"])
    assert out == metrics(1.0, 0.0, 0.0, 0.0, 0.0, 2)
    assert score_pope([], [])["accuracy"] == 0.0


def test_score_pope_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="2 predictions but 1 labels"):
        score_pope(["yes", "no"], ["yes"])
    with pytest.raises(ValueError, match=r"predictions\[0\] is 'Yes'"):
        score_pope(["Yes"], ["yes"])


def _labels(tmp_path: Path) -> Path:
    """Four questions: 1 yes / 2 no in split "random", 3 yes / 4 no in split "adversarial"."""
    rows = [(1, "dog", "yes", "random"), (2, "cat", "no", "random")]
    rows += [(3, "cup", "yes", "adversarial"), (4, "fork", "no", "adversarial")]
    return write_jsonl(
        tmp_path / "labels.jsonl",
        [
            {"question_id": q, "image": f"{q}.jpg", "text": f"Is there a {o}?", "label": y, "category": c}
            for q, o, y, c in rows
        ],
    )


def test_score_pope_files_by_category(tmp_path: Path) -> None:
    """Answers (shuffled, one under "answer", one extra id 99 that is ignored) parse to y n n y.

    Overall vs labels y n y n: TP = 1 (q1), TN = 1 (q2), FN = 1 (q3), FP = 1 (q4) → every rate 0.5.
    random (q1, q2): TP = 1, TN = 1 → accuracy = precision = recall = F1 = 1, yes-ratio 1/2.
    adversarial (q3, q4): FN = 1, FP = 1 → accuracy = precision = recall = F1 = 0, yes-ratio 1/2.
    """
    answers = write_jsonl(
        tmp_path / "answers.jsonl",
        [
            {"question_id": 4, "prompt": "...", "text": "Yes", "answer_id": "x", "model_id": "m"},
            {"question_id": 99, "text": "No"},
            {"question_id": 1, "text": "Yes, there is a dog."},
            {"question_id": 3, "answer": "No, there is not."},
            {"question_id": 2, "text": "No."},
        ],
    )
    out = score_pope_files(answers, _labels(tmp_path))
    for key in ("accuracy", "precision", "recall", "f1", "yes_ratio"):
        assert out[key] == pytest.approx(0.5)
    assert out["n"] == 4
    assert set(out["by_category"]) == {"random", "adversarial"}
    assert out["by_category"]["random"] == metrics(1.0, 1.0, 1.0, 1.0, 0.5, 2)
    assert out["by_category"]["adversarial"] == metrics(0.0, 0.0, 0.0, 0.0, 0.5, 2)


def test_score_pope_files_single_category_has_no_breakdown(tmp_path: Path) -> None:
    labels = write_jsonl(tmp_path / "l.jsonl", [{"question_id": 7, "image": "i", "text": "t", "label": "no"}])
    answers = write_jsonl(tmp_path / "a.jsonl", [{"question_id": 7, "text": "no"}])
    assert score_pope_files(answers, labels) == metrics(1.0, 0.0, 0.0, 0.0, 0.0, 1)


def test_score_pope_files_missing_answer(tmp_path: Path) -> None:
    answers = write_jsonl(tmp_path / "answers.jsonl", [{"question_id": 1, "text": "yes"}])
    with pytest.raises(DataError) as info:
        score_pope_files(answers, _labels(tmp_path))
    assert str(info.value) == (
        f"{answers} field 'question_id': no answer for question_id 2 of labels.jsonl (3 of 4 questions unanswered)"
    )


def test_read_pope_questions_official_schema_and_json_array(tmp_path: Path) -> None:
    rows = [
        {
            "question_id": 5,
            "image": "COCO_val2014_1.jpg",
            "text": "Is there an umbrella in the image?",
            "label": "Yes",
        }
    ]
    path = tmp_path / "q.json"
    path.write_text(json.dumps(rows, indent=2))
    (q,) = read_pope_questions(path)
    assert (q.question_id, q.label, q.split, q.object) == (5, "yes", "", "umbrella")


def test_data_error_format() -> None:
    err = DataError("answers.jsonl", 12, "label", 'expected "yes" or "no", got "maybe"')
    assert str(err) == 'answers.jsonl row 12 field \'label\': expected "yes" or "no", got "maybe"'
    assert (err.path, err.row, err.field, err.reason) == ("answers.jsonl", 12, "label", err.reason)
    assert str(DataError("x.json", None, None, "file not found")) == "x.json: file not found"


@pytest.mark.parametrize(
    ("line2", "message"),
    [
        (
            '{"question_id": 2, "image": "i", "text": "t", "label": "maybe"}',
            'row 2 field \'label\': expected "yes" or "no", got "maybe"',
        ),
        (
            '{"question_id": "two", "image": "i", "text": "t", "label": "no"}',
            "row 2 field 'question_id': expected an integer, got \"two\"",
        ),
        ('{"question_id": 2, "text": "t", "label": "no"}', "row 2 field 'image': missing"),
        (
            '{"question_id": 1, "image": "i", "text": "t", "label": "no"}',
            "row 2 field 'question_id': duplicate question_id 1 (first in row 1)",
        ),
        ('{"question_id": 2, "image": "i",', "row 2: invalid JSON"),
        ("[1, 2]", "row 2: expected a JSON object, got [1, 2]"),
    ],
)
def test_read_pope_questions_errors(tmp_path: Path, line2: str, message: str) -> None:
    path = tmp_path / "labels.jsonl"
    path.write_text('{"question_id": 1, "image": "i", "text": "t", "label": "yes"}\n' + line2 + "\n")
    with pytest.raises(DataError) as info:
        read_pope_questions(path)
    assert str(info.value).startswith(f"{path} {message}")


def test_read_pope_answers_errors(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", [{"question_id": 1, "text": "yes"}, {"question_id": 2}])
    with pytest.raises(DataError, match=r"row 2 field 'text': missing"):
        read_pope_answers(path)
    with pytest.raises(DataError, match="file not found"):
        read_pope_answers(tmp_path / "nope.jsonl")


def test_pope_markdown_table() -> None:
    table = pope_markdown_table(
        {"random": score_pope(["yes", "no"], ["yes", "yes"]), "popular": score_pope(["no"], ["no"])}
    )
    lines = table.splitlines()
    assert lines[0] == "| split | accuracy | precision | recall | F1 | yes ratio | n |"
    assert lines[2] == "| random | 50.00 | 100.00 | 50.00 | 66.67 | 50.00 | 2 |"
    assert lines[3] == "| popular | 100.00 | 0.00 | 0.00 | 0.00 | 0.00 | 1 |"
