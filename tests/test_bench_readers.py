"""AMBER, MMHal-Bench, Object HalBench and LLaVA-Bench: readers on files in the released schemas (spec §15),
metrics on hand-made examples computed by hand, bad rows, and each command end to end."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from mmalign.cli import main
from mmalign.errors import DataError
from mmalign.eval.amber import (
    amber_score,
    generative_metrics,
    normalize_yes_no,
    read_amber_data,
    read_amber_responses,
    rule_nouns,
    score_amber,
    score_generative_response,
)
from mmalign.eval.bench_judge import FunctionBenchJudge
from mmalign.eval.chair_score import ChairVocab, read_chair_synonyms
from mmalign.eval.llava_bench import (
    judge_llava_bench,
    parse_scores,
    read_llava_answers,
    read_llava_bench,
    summarize_reviews,
)
from mmalign.eval.mmhal import QUESTION_TYPES, judge_mmhal, parse_rating, read_mmhal_answers, read_mmhal_template
from mmalign.eval.objhal import read_coco_truth, read_objhal_answers, read_objhal_questions, score_objhal


def write_json(path: Path, obj: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def image_bytes(colour: tuple[int, int, int] = (200, 30, 30), fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, format=fmt)
    return buffer.getvalue()


def write_image(path: Path, fmt: str = "PNG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(image_bytes(fmt=fmt))
    return path


# --- AMBER ---------------------------------------------------------------------------------------------------

AMBER_RELATION = {"dog": ["puppy"], "cat": ["kitten"], "car": [], "tree": [], "bench": [], "sign": []}
AMBER_ANNOTATIONS = [
    {"id": 1, "type": "generative", "truth": ["dog", "tree"], "hallu": ["cat"]},
    {"id": 2, "type": "generative", "truth": ["car"], "hallu": ["bench"]},
    {"id": 3, "type": "discriminative-hallucination", "truth": "no"},
    {"id": 4, "type": "discriminative-attribute-state", "truth": "yes"},
    {"id": 5, "type": "discriminative-attribute-number", "truth": "no"},
    {"id": 6, "type": "discriminative-attribute-action", "truth": "yes"},
    {"id": 7, "type": "discriminative-relation", "truth": "yes"},
    {"id": 8, "type": "relation", "truth": "no"},
]
AMBER_RESPONSES = [
    {"id": 1, "response": "A puppy sits under a tree next to a cat."},
    {"id": 2, "response": "A red car and a sign."},
    {"id": 3, "response": "No"},
    {"id": 4, "response": "Yes"},
    {"id": 5, "response": "Yes"},
    {"id": 6, "response": "No"},
    {"id": 7, "response": "yes"},
    {"id": 8, "response": "No"},
]


@pytest.fixture
def amber_dir(tmp_path: Path) -> Path:
    """AMBER's data/ layout: annotations (index = id - 1), relation.json, safe words, the query files."""
    root = tmp_path / "amber" / "data"
    write_json(root / "relation.json", AMBER_RELATION)
    (root / "safe_words.txt").write_text("sign\norange\n")
    write_json(root / "annotations.json", AMBER_ANNOTATIONS)
    queries = [
        {"id": a["id"], "image": f"AMBER_{a['id']}.jpg", "query": "Describe this image." if a["id"] <= 2 else "Is it?"}
        for a in AMBER_ANNOTATIONS
    ]
    write_json(root / "query" / "query_all.json", queries)
    write_json(root / "query" / "query_generative.json", queries[:2])
    return root


def test_amber_generative_by_hand(amber_dir: Path) -> None:
    """Response 1: vocabulary nouns puppy, tree, cat. "puppy" is dog's associated word (covers dog), "tree" covers
    tree, "cat" is no truth word: hallucinated, and it is the annotated "hallu" object (Cog). One of three nouns:
    CHAIR = 1 / (0.001 + 3) × 100 = 33.3 (the official counters start at 0.001).

    Response 2: car covers car; "sign" is a safe word: skipped, but counted: 2 nouns, none hallucinated.
    Both: CHAIR = 1 / 5.001 = 20.0; Cover = 3 / 3.001 = 100.0; Hal = 100 - 1/2.001 × 100 = 50.0;
    Cog = 1 / 2.001 (cat matched, bench not) = 50.0.
    """
    data = read_amber_data(amber_dir)
    first = score_generative_response(
        [n for n in rule_nouns(AMBER_RESPONSES[0]["response"], data.vocabulary) if n in data.vocabulary],
        data.annotations[0],
        data,
    )
    assert first == {"nouns": ["puppy", "tree", "cat"], "hallucinated": ["cat"], "covered": [True, True], "cog": [True]}
    assert generative_metrics([first])["CHAIR"] == 33.3
    result = score_amber([(r["id"], r["response"]) for r in AMBER_RESPONSES], data)
    g = result["generative"]
    assert (g["CHAIR"], g["Cover"], g["Hal"], g["Cog"]) == (20.0, 100.0, 50.0, 50.0)
    assert (g["n"], g["n_nouns"], g["n_hallucinated"]) == (2, 5, 1)


def test_amber_discriminative_by_hand(amber_dir: Path) -> None:
    """ "No" is the positive class; "yes" (lowercase) is simply wrong.

    Overall (6 questions): correct ids 3, 4, 8 → accuracy 3/6.001 = 50.0. Said "No": 3, 6, 8, right on 3 and 8 →
    precision 2/3.001 = 66.6; gold "no": 3, 5, 8, found 3 and 8 → recall 66.6; F1 from the rounded P and R:
    2·.666·.666/(.666+.666+1e-4) = 66.6. Existence (id 3 only): 99.9 everywhere (F1 with 1e-3). Attribute (4, 5, 6):
    accuracy 1/3.003 = 33.3, no correct "No" → P = R = F1 = 0. Relation (7, 8): accuracy 1/2.001 = 50.0, P = R = 99.9.
    AMBER score = ((100 - 20.0) + 66.6) / 2 = 73.3.
    """
    data = read_amber_data(amber_dir)
    result = score_amber([(r["id"], r["response"]) for r in AMBER_RESPONSES], data)
    d = result["discriminative"]
    assert {k: d["overall"][k] for k in ("Accuracy", "Precision", "Recall", "F1", "n")} == {
        "Accuracy": 50.0, "Precision": 66.6, "Recall": 66.6, "F1": 66.6, "n": 6
    }  # fmt: skip
    assert (d["existence"]["Accuracy"], d["existence"]["F1"]) == (99.9, 99.9)
    assert (d["attribute"]["Accuracy"], d["attribute"]["Precision"], d["attribute"]["F1"]) == (33.3, 0.0, 0.0)
    assert (d["relation"]["Accuracy"], d["relation"]["Precision"], d["relation"]["Recall"]) == (50.0, 99.9, 99.9)
    assert result["amber_score"] == amber_score(20.0, 66.6) == 73.3
    only_g = score_amber([(r["id"], r["response"]) for r in AMBER_RESPONSES], data, evaluation_type="g")
    assert "discriminative" not in only_g and only_g["amber_score"] is None


def test_amber_nouns_and_yes_no() -> None:
    vocabulary = {"dog", "glass", "glasses"}
    # Case is kept as in the official script: "Dogs" lemmatises to "Dog", which is not in the vocabulary.
    assert rule_nouns("Dogs and two dogs;\tglasses.", vocabulary) == ["Dog", "and", "two", "dog", ";", "glass", "."]
    assert normalize_yes_no(" yes, there is.") == "Yes" and normalize_yes_no("No.") == "No"
    assert normalize_yes_no("There is a dog.") == "There is a dog."


def test_amber_bad_rows(amber_dir: Path, tmp_path: Path) -> None:
    annotations = json.loads((amber_dir / "annotations.json").read_text())
    annotations[1]["id"] = 7
    write_json(amber_dir / "annotations.json", annotations)
    with pytest.raises(DataError) as info:
        read_amber_data(amber_dir)
    assert (info.value.row, info.value.field) == (2, "id")
    annotations[1] = {"id": 2, "type": "generative", "truth": ["car"], "hallu": ["spaceship"]}
    write_json(amber_dir / "annotations.json", annotations)
    with pytest.raises(DataError, match=r"not a key of relation\.json") as info:
        read_amber_data(amber_dir)
    assert (info.value.row, info.value.field) == (2, "hallu")
    bad = write_json(tmp_path / "responses.json", [{"id": 1, "response": "A dog."}, {"id": 2}])
    with pytest.raises(DataError) as info:
        read_amber_responses(bad, 8)
    assert (info.value.path, info.value.row, info.value.field) == (bad, 2, "response")
    write_json(bad, [{"id": 9, "response": "No"}])
    with pytest.raises(DataError, match="outside the annotations"):
        read_amber_responses(bad, 8)


def test_amber_cli_scores_an_answer_file(amber_dir: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    answers = write_json(tmp_path / "responses.json", AMBER_RESPONSES)
    out = tmp_path / "res" / "amber.json"
    assert main(["eval", "amber", "--data", str(amber_dir), "--answers", str(answers), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["generative"]["CHAIR"] == 20.0 and result["amber_score"] == 73.3
    printed = capsys.readouterr().out
    assert "| CHAIR ↓ | Cover ↑ | Hal ↓ | Cog ↓ | responses |" in printed and "AMBER score: 73.3" in printed
    write_json(answers, [{"id": 1, "response": 3}])
    assert main(["eval", "amber", "--data", str(amber_dir), "--answers", str(answers), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "row 1 field 'response'" in err and "Traceback" not in err


def test_amber_cli_generates_with_a_tiny_model(amber_dir: Path, llava_dir: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    images = tmp_path / "images"
    for a in AMBER_ANNOTATIONS:
        write_image(images / f"AMBER_{a['id']}.jpg", fmt="JPEG")
    out = tmp_path / "amber.json"
    args = ["eval", "amber", "--data", str(amber_dir), "--image-root", str(images), "--model", str(llava_dir)]
    assert main([*args, "--max-new-tokens", "4", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["generative"]["n"] == 2 and result["discriminative"]["overall"]["n"] == 6
    responses = json.loads(out.with_suffix(".responses.json").read_text())
    assert [r["id"] for r in responses] == list(range(1, 9))
    # An image path that leaves the image root is refused before any image is opened.
    queries = json.loads((amber_dir / "query" / "query_all.json").read_text())
    queries[0]["image"] = "../amber.json"
    write_json(amber_dir / "query" / "query_all.json", queries)
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "again.json")]) == 2
    err = capsys.readouterr().err
    assert "query_all.json row 1 field 'image'" in err and "escapes the data set root" in err


# --- MMHal-Bench ---------------------------------------------------------------------------------------------


def mmhal_template(n: int = 8) -> list[dict]:
    return [
        {
            "question_type": QUESTION_TYPES[i % 8],
            "question_topic": "animal",
            "image_id": f"{i:016x}",
            "image_src": f"https://farm.example/photos/{i:016x}_o.jpg",
            "image_content": ["Dog", "Animal"],
            "question": f"Question {i}?",
            "gt_answer": f"Answer {i}.",
            "model_answer": "",
        }
        for i in range(n)
    ]


JUDGE_FILE = '''
RATINGS = ["Rating: 6", "Rating: 5", "rating: 4", "RATING: 3", "Rating: 2", "Rating: 1", "Rating: 0",
           "I cannot decide."]


def mmhal(prompt, reply):
    """A fixed verdict per question index; the last one holds no rating."""
    assert prompt.meta["benchmark"] == "mmhal" and prompt.meta["model_answer"] == reply
    return "Explanation.\\n" + RATINGS[int(prompt.id)]


def llava(prompt, reply):
    """(8, 6) as text, (10, 5) as a pair, one number per answer (8 for the reference), and a bad first line."""
    qid = int(prompt.id)
    if qid == 0:
        return "8 6\\nThe second answer misses details."
    if qid == 1:
        return (10, 5)
    if qid == 2:
        return 8.0 if reply == prompt.meta["reference"] else 4.0
    return "8, 6\\nComma and space: not two numbers after the official split."
'''


@pytest.fixture
def judge_file(tmp_path: Path) -> Path:
    path = tmp_path / "my_judge.py"
    path.write_text(JUDGE_FILE)
    return path


def test_mmhal_scores_by_hand(tmp_path: Path, judge_file: Path) -> None:
    """Ratings 6, 5, 4, 3, 2, 1, 0 and one unparsed output (scored 0, as officially).

    Average = (6+5+4+3+2+1+0+0)/8 = 21/8 = 2.625; hallucination rate = #(< 3) = 4/8 = 0.5; each type's average is
    its one rating; informativeness = mean(3, 2, 1, 0, 2, 1, 0, 0)/3 × 100 = 1.125/3 × 100 = 37.5.
    """
    from mmalign.judges.python import FunctionJudge

    items = read_mmhal_template(write_json(tmp_path / "template.json", mmhal_template()))
    judge = FunctionBenchJudge(FunctionJudge.load(f"{judge_file}:mmhal").fn, "fixed", "mmhal")
    result = judge_mmhal(items, [f"My answer {i}." for i in range(8)], judge)
    assert result["average_score"] == 2.625 and result["hallucination_rate"] == 0.5
    assert result["informativeness"] == pytest.approx(37.5)
    assert result["by_type"] == dict(zip(QUESTION_TYPES, [6, 5, 4, 3, 2, 1, 0, 0]))
    assert (result["n"], result["n_unparsed"], result["unparsed"]) == (8, 1, [7])


def test_mmhal_rating_parser() -> None:
    """The official rule: exactly one k in 0..6 with "rating: k" in the lowercased text."""
    assert parse_rating("Good.\nRating: 4") == 4 and parse_rating("RATING: 0, not informative") == 0
    assert parse_rating("Rating: 2. On second thought, Rating: 5") is None
    assert parse_rating("Score 5") is None and parse_rating(None) is None
    assert parse_rating("Rating: 10") == 1  # a substring match, as in the official script
    assert parse_rating(5.0) == 5 and parse_rating(7.0) is None


def test_mmhal_bad_rows(tmp_path: Path) -> None:
    rows = mmhal_template()
    rows[1], rows[2] = rows[2], rows[1]
    path = write_json(tmp_path / "template.json", rows)
    with pytest.raises(DataError, match="type = index mod 8") as info:
        read_mmhal_template(path)
    assert (info.value.row, info.value.field) == (2, "question_type")
    rows = mmhal_template()
    rows[3]["image_content"] = "Dog"
    write_json(path, rows)
    with pytest.raises(DataError) as info:
        read_mmhal_template(path)
    assert (info.value.row, info.value.field) == (4, "image_content")
    answers = write_jsonl(tmp_path / "answers.jsonl", [{"text": "Assistant: a dog."}, {"answer": "x"}])
    with pytest.raises(DataError) as info:
        read_mmhal_answers(answers, 2)
    assert (info.value.row, info.value.field) == (2, "model_answer")
    write_jsonl(answers, [{"text": "Assistant: a dog."}])
    assert read_mmhal_answers(answers, 1) == ["a dog."]
    with pytest.raises(DataError, match="1 answers for 8 questions"):
        read_mmhal_answers(answers, 8)


def test_mmhal_cli_with_a_function_judge(tmp_path: Path, judge_file: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    template = write_json(tmp_path / "template.json", mmhal_template())
    answers = write_jsonl(tmp_path / "answers.jsonl", [{"text": f"Assistant: answer {i}"} for i in range(8)])
    out = tmp_path / "mmhal.json"
    args = ["eval", "mmhal", "--data", str(template), "--answers", str(answers), "--out", str(out)]
    assert main([*args, "--judge", f"{judge_file}:mmhal"]) == 0
    result = json.loads(out.read_text())
    assert (result["average_score"], result["hallucination_rate"], result["n_unparsed"]) == (2.625, 0.5, 1)
    assert result["items"][0]["judge_output"] == "Explanation.\nRating: 6"
    printed = capsys.readouterr().out
    assert "| Average score | Hallucination rate | attribute |" in printed and "| 2.62 | 0.50 | 6.00 |" in printed
    # Scoring saved judge outputs again (our items, or the official list of chat completions) gives the same.
    completions = [{"choices": [{"message": {"content": it["judge_output"]}}]} for it in result["items"]]
    reviews = write_json(tmp_path / "evaluation.json", completions)
    again = tmp_path / "again.json"
    assert main(["eval", "mmhal", "--data", str(template), "--reviews", str(reviews), "--out", str(again)]) == 0
    assert json.loads(again.read_text())["average_score"] == 2.625
    assert main([*args]) == 2 and "give --judge" in capsys.readouterr().err


def test_mmhal_cli_generates_and_judges_with_tiny_models(llava_dir: Path, tmp_path: Path) -> None:
    """Answers and verdicts from a tiny random model: its outputs hold no rating, so each is unparsed, scored 0."""
    template = write_json(tmp_path / "mmhal" / "template.json", mmhal_template())
    for row in mmhal_template():
        write_image(tmp_path / "mmhal" / "images" / row["image_src"].rsplit("/", 1)[-1])
    prompt = tmp_path / "judge_prompt.txt"
    prompt.write_text("Rate it.\n{question}\n{gt_answer}\n{model_answer}\n")
    out = tmp_path / "mmhal.json"
    code = main(
        ["eval", "mmhal", "--data", str(template), "--model", str(llava_dir), "--judge", str(llava_dir),
         "--judge-prompt", str(prompt), "--judge-max-new-tokens", "4", "--max-new-tokens", "4", "--out", str(out)]
    )  # fmt: skip
    assert code == 0
    result = json.loads(out.read_text())
    assert (result["n"], result["n_unparsed"], result["average_score"]) == (8, 8, 0.0)
    responses = json.loads(out.with_suffix(".responses.json").read_text())
    assert len(responses) == 8 and set(responses[0]) == set(mmhal_template()[0])
    # --engine vllm: refused in one line where vLLM is not installed, before any answer is generated.
    from mmalign.generation.vllm import vllm_available

    if not vllm_available():
        vllm = ["eval", "mmhal", "--data", str(template), "--model", str(llava_dir), "--judge", str(llava_dir),
                "--engine", "vllm", "--out", str(tmp_path / "v.json")]  # fmt: skip
        assert main(vllm) == 2 and not (tmp_path / "v.responses.json").exists()


# --- LLaVA-Bench ---------------------------------------------------------------------------------------------


@pytest.fixture
def llava_bench_dir(tmp_path: Path) -> Path:
    root = tmp_path / "llava-bench-in-the-wild"
    questions = [
        {"image": "001.jpg", "text": "What is this?", "category": "conv", "question_id": 0},
        {"image": "001.jpg", "text": "What colour is it?", "category": "conv", "question_id": 1},
        {"image": "002.jpg", "text": "Describe the image in detail.", "category": "detail", "question_id": 2},
        {"image": "002.jpg", "text": "Why is this funny?", "category": "complex", "question_id": 3},
    ]
    write_jsonl(root / "questions.jsonl", questions)
    write_jsonl(
        root / "context.jsonl",
        [{"id": "a", "image": "001.jpg", "caption": "A red car."}, {"image": "002.jpg", "caption": ["A cat.", "Hat."]}],
    )
    write_jsonl(root / "answers_gpt4.jsonl", [{"question_id": i, "text": f"Reference {i}.", "answer_id": f"r{i}"}
                                              for i in range(4)])  # fmt: skip
    for name in ("001.jpg", "002.jpg"):
        write_image(root / "images" / name, fmt="JPEG")
    return root


def model_answers(path: Path) -> Path:
    return write_jsonl(path, [{"question_id": i, "prompt": "q", "text": f"Model {i}.", "answer_id": f"m{i}",
                               "model_id": "tiny", "metadata": {}} for i in range(4)])  # fmt: skip


def test_llava_bench_relative_scores_by_hand(llava_bench_dir: Path, tmp_path: Path, judge_file: Path) -> None:
    """Pairs (reference, model): conv (8, 6) and (10, 5); detail (8, 4) from one number per answer; complex
    unparsed → (−1, −1), averaged in as the official summariser does.

    all: means 25/4 = 6.25 and 14/4 = 3.5 → 100 · 3.5/6.25 = 56.0, ×10: 62.5 and 35.0;
    conv: 9 and 5.5 → 61.1; detail: 8 and 4 → 50.0; complex: −1/−1 → 100.0 (−10.0, −10.0).
    """
    from mmalign.judges.python import FunctionJudge

    questions = read_llava_bench(llava_bench_dir)
    assert questions[2].caption == "A cat.\nHat." and questions[0].reference == "Reference 0."
    answers = read_llava_answers(model_answers(tmp_path / "answers.jsonl"), questions)
    judge = FunctionBenchJudge(FunctionJudge.load(f"{judge_file}:llava").fn, "fixed", "llava-bench")
    reviews = judge_llava_bench(questions, [a for a, _ in answers], judge, answer_ids=[i for _, i in answers])
    assert [r["tuple"] for r in reviews] == [[8, 6], [10, 5], [8, 4], [-1, -1]]
    assert reviews[0]["content"].startswith("8 6\n") and reviews[3]["category"] == "llava_bench_complex"
    assert (reviews[0]["answer1_id"], reviews[0]["answer2_id"]) == ("r0", "m0")
    summary = summarize_reviews(reviews)
    assert list(summary["scores"]) == ["all", "llava_bench_complex", "llava_bench_conv", "llava_bench_detail"]
    assert summary["scores"]["all"] == {"relative": 56.0, "reference_x10": 62.5, "model_x10": 35.0, "n": 4}
    assert summary["scores"]["llava_bench_conv"]["relative"] == 61.1
    assert summary["scores"]["llava_bench_detail"]["relative"] == 50.0
    assert summary["scores"]["llava_bench_complex"]["relative"] == 100.0
    assert (summary["n"], summary["n_unparsed"]) == (4, 1)


def test_llava_bench_score_parser() -> None:
    """First line only; commas become spaces; exactly two single-space-separated numbers."""
    assert parse_scores("7 9\nBecause.") == (7.0, 9.0) and parse_scores("7,9") == (7.0, 9.0)
    assert parse_scores("7, 9") is None and parse_scores("Scores: 7 9") is None and parse_scores("") is None
    assert parse_scores((3.0, 4.0)) == (3.0, 4.0) and parse_scores(None) is None


def test_llava_bench_bad_rows(llava_bench_dir: Path, tmp_path: Path) -> None:
    questions = read_llava_bench(llava_bench_dir)
    answers = model_answers(tmp_path / "answers.jsonl")
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    rows[1]["question_id"] = 2
    write_jsonl(answers, rows)
    with pytest.raises(DataError, match="paired by line order") as info:
        read_llava_answers(answers, questions)
    assert (info.value.row, info.value.field) == (2, "question_id")
    write_jsonl(answers, rows[:3])
    with pytest.raises(DataError, match="3 answers for 4 questions"):
        read_llava_answers(answers, questions)
    write_jsonl(llava_bench_dir / "context.jsonl", [{"image": "001.jpg", "caption": "A red car."}])
    with pytest.raises(DataError, match=r"has no line in context\.jsonl") as info:
        read_llava_bench(llava_bench_dir)
    assert (info.value.row, info.value.field) == (3, "image")


def test_llava_bench_cli_round_trip(llava_bench_dir: Path, tmp_path: Path, judge_file: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "llava.json"
    args = [
        "eval",
        "llava-bench",
        "--data",
        str(llava_bench_dir),
        "--answers",
        str(model_answers(tmp_path / "a.jsonl")),
    ]
    assert main([*args, "--judge", f"{judge_file}:llava", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["scores"]["all"]["relative"] == 56.0
    assert "| all | 56.0 | 62.5 | 35.0 | 4 |" in capsys.readouterr().out
    # The review file written beside the result summarises to the same numbers.
    again = tmp_path / "again.json"
    reviews = out.with_suffix(".reviews.jsonl")
    assert main(["eval", "llava-bench", "--reviews", str(reviews), "--out", str(again)]) == 0
    assert json.loads(again.read_text())["scores"] == json.loads(out.read_text())["scores"]
    # A released-style rule.json must hold a rule for every question category.
    rules = write_json(tmp_path / "rule.json", {"llava_bench_conv": {"role": "Assistant", "prompt": "Rate."}})
    assert main([*args, "--judge", f"{judge_file}:llava", "--rule", str(rules), "--out", str(out)]) == 2
    assert "field 'llava_bench_complex': no rule for this question category" in capsys.readouterr().err


# --- Object HalBench -----------------------------------------------------------------------------------------


@pytest.fixture
def objhal_files(tmp_path: Path) -> tuple[Path, Path]:
    """Three questions; COCO ground truth: image 1 person, dog, frisbee (+ bench from its captions), image 2 a
    potted plant, image 3 nothing."""
    picture = base64.b64encode(image_bytes(fmt="JPEG")).decode()
    questions = write_jsonl(
        tmp_path / "obj_halbench_300_with_image.jsonl",
        [{"image_id": i, "question": "Describe this image in detail.", "image": picture} for i in (1, 2, 3)],
    )
    coco = tmp_path / "coco"
    instances = {
        "images": [{"id": 1}, {"id": 2}, {"id": 3}],
        "categories": [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}, {"id": 34, "name": "frisbee"},
                       {"id": 64, "name": "potted plant"}],
        "annotations": [{"id": 10, "image_id": 1, "category_id": 1}, {"id": 11, "image_id": 1, "category_id": 18},
                        {"id": 12, "image_id": 1, "category_id": 34}, {"id": 13, "image_id": 2, "category_id": 64}],
    }  # fmt: skip
    write_json(coco / "instances_val2014.json", instances)
    captions = {"images": [{"id": 1}], "annotations": [{"id": 1, "image_id": 1, "caption": "A man on a park bench."}]}
    write_json(coco / "captions_val2014.json", captions)
    return questions, coco


OBJHAL_ANSWERS = [
    {"question_id": 0, "image_id": 1, "prompt": "q", "text": "Assistant: A man and his dog sit on a bench with a cat."},
    {"question_id": 1, "image_id": 2, "prompt": "q", "text": "A plant on a table."},
    {"question_id": 2, "prompt": "q", "text": "A blurry photo."},
]


def test_objhal_by_hand(objhal_files: tuple[Path, Path], tmp_path: Path) -> None:
    """Answer 1: person (man), dog, bench, cat → cat hallucinated; answer 2: potted plant (plant), dining table
    (table) → table hallucinated; answer 3 (image id from the question file's line 3) mentions nothing.

    CHAIRs = 2/3; CHAIRs_refine = 2 / 2 answers with a COCO object = 1.0; CHAIRi = 2/6; recall =
    (3 of {person, dog, frisbee, bench} + 1 of {potted plant}) / (4 + 1 + 0) = 0.8; avg length = (12 + 5 + 3)/3.
    """
    questions, coco = objhal_files
    qs = read_objhal_questions(questions, need_images=True)
    answers = read_objhal_answers(write_jsonl(tmp_path / "answers.jsonl", OBJHAL_ANSWERS), qs)
    assert answers[0].text.startswith("A man") and answers[2].image_id == 3
    vocab = ChairVocab.coco()
    truth = read_coco_truth(coco, vocab)
    assert truth[1] == {"person", "dog", "frisbee", "bench"}
    r = score_objhal(answers, truth, vocab)
    assert r["CHAIRs"] == pytest.approx(2 / 3) and r["CHAIRs_refine"] == 1.0
    assert r["CHAIRi"] == pytest.approx(2 / 6) and r["obj_rec"] == pytest.approx(0.8)
    assert r["avg_word_len"] == pytest.approx(20 / 3)
    assert (r["sentence_num"], r["coco_sentence_num"], r["gt_word_count"], r["coco_word_count"]) == (3, 2, 5, 4)


def test_objhal_bad_rows_and_synonyms(objhal_files: tuple[Path, Path], tmp_path: Path) -> None:
    questions, coco = objhal_files
    bad = write_jsonl(tmp_path / "answers.jsonl", [OBJHAL_ANSWERS[0], {"image_id": 2, "prompt": "q"}])
    with pytest.raises(DataError) as info:
        read_objhal_answers(bad)
    assert (info.value.row, info.value.field) == (2, "text")
    write_jsonl(questions, [{"image_id": "abc", "question": "q", "image": "x"}])
    with pytest.raises(DataError) as info:
        read_objhal_questions(questions)
    assert (info.value.row, info.value.field) == (1, "image_id")
    write_jsonl(questions, [{"image_id": 1, "question": "q", "image": "not base64!"}])
    with pytest.raises(DataError, match="bad base64") as info:
        read_objhal_questions(questions, need_images=True)
    # RLHF-V's synonym file format: "canonical, synonym, ..." per line; "table" is not listed here.
    synonyms = tmp_path / "synonyms_refine.txt"
    synonyms.write_text("person, man, woman\ndog, puppy\npotted plant, plant\nbench\nfrisbee\ncat, kitten\n")
    vocab = read_chair_synonyms(synonyms, strip=True)
    answers = read_objhal_answers(write_jsonl(tmp_path / "ok.jsonl", OBJHAL_ANSWERS[:2]))
    r = score_objhal(answers, read_coco_truth(coco, vocab), vocab)
    assert r["CHAIRi"] == pytest.approx(1 / 5) and r["CHAIRs"] == pytest.approx(1 / 2)


def test_objhal_cli_scores_an_answer_file(objhal_files: tuple[Path, Path], tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    questions, coco = objhal_files
    answers = write_jsonl(tmp_path / "answers.jsonl", OBJHAL_ANSWERS)
    out = tmp_path / "objhal.json"
    args = ["eval", "objhal", "--data", str(questions), "--coco", str(coco), "--answers", str(answers)]
    assert main([*args, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["CHAIRs_refine"] == 1.0 and result["CHAIRi"] == pytest.approx(1 / 3)
    assert "| 100.0 | 33.3 | 66.7 | 80.0 | 3 | 2 | 6.7 |" in capsys.readouterr().out
    assert main([*args[:-2], "--answers", str(tmp_path / "missing.jsonl"), "--out", str(out)]) == 2
    assert "missing.jsonl: file not found" in capsys.readouterr().err


def test_a_text_only_causal_lm_can_judge(llava_dir: Path, tmp_path: Path) -> None:
    """A directory that is no image-text model loads as a causal LM (local files only) and judges as text."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from mmalign.eval.bench_judge import load_judge

    tokenizer = AutoTokenizer.from_pretrained(llava_dir, local_files_only=True)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path / "causal")
    tokenizer.save_pretrained(tmp_path / "causal")
    judge = load_judge(str(tmp_path / "causal"), benchmark="mmhal", max_new_tokens=3)
    items = read_mmhal_template(write_json(tmp_path / "template.json", mmhal_template()))
    result = judge_mmhal(items, ["A dog."] * 8, judge, template="Rate it: {model_answer}")
    assert (result["n"], result["n_unparsed"]) == (8, 8)
    assert all(isinstance(it["judge_output"], str) for it in result["items"])


def test_objhal_and_llava_bench_generate_with_a_tiny_model(  # type: ignore[no-untyped-def]
    llava_dir: Path, objhal_files: tuple[Path, Path], llava_bench_dir: Path, judge_file: Path, tmp_path: Path
) -> None:
    questions, coco = objhal_files
    out = tmp_path / "objhal.json"
    common = ["--model", str(llava_dir), "--max-new-tokens", "4", "--limit", "2"]
    assert main(["eval", "objhal", "--data", str(questions), "--coco", str(coco), *common, "--out", str(out)]) == 0
    assert json.loads(out.read_text())["sentence_num"] == 2
    rows = [json.loads(line) for line in out.with_suffix(".answers.jsonl").read_text().splitlines()]
    assert [r["image_id"] for r in rows] == [1, 2] and set(rows[0]) == {"question_id", "image_id", "prompt", "text",
                                                                         "model_id"}  # fmt: skip
    out = tmp_path / "llava.json"
    args = ["eval", "llava-bench", "--data", str(llava_bench_dir), "--judge", f"{judge_file}:llava"]
    assert main([*args, *common, "--out", str(out)]) == 0
    assert json.loads(out.read_text())["scores"]["all"]["n"] == 2
    assert len(out.with_suffix(".answers.jsonl").read_text().splitlines()) == 2
