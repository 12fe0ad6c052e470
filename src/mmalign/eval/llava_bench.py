"""LLaVA-Bench (In-the-Wild) (Liu et al.; spec §15.4): a judge scores the model's answer against GPT-4's.

Released files (one directory): ``questions.jsonl`` (``image``, ``text``, ``category`` conv/detail/complex,
``question_id``), ``context.jsonl`` (``image``, ``caption``), ``answers_gpt4.jsonl`` (``text``), ``images/``. Model
answers are ``model_vqa`` lines (``question_id``, ``prompt``, ``text``, ...). Questions, reference answers and model
answers are paired **by line order**, as the official script zips them.

The judge reads the context caption, the question, Assistant 1 = the GPT-4 reference and Assistant 2 = the model,
then the rule for ``llava_bench_<category>``, and must write the two scores (1–10) on its first line. The first line,
commas turned into spaces and split on single spaces, must be exactly two numbers; otherwise the pair is
[−1, −1] — averaged in, as the official summariser does, and counted in ``n_unparsed``.

Relative score per category and overall ("all") = 100 · mean(model score) / mean(reference score), means rounded to
3 decimals, then to 0.1; the summariser also prints both means × 10.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmalign.errors import DataError
from mmalign.eval.bench_judge import BenchJudge, JudgeOutput, JudgeRequest
from mmalign.eval.io import get_field, int_field, read_rows, require_file, show, str_field

ROLE = "Assistant"
# The rule prompt, paraphrased from LLaVA's ``rule.json`` (the spec does not quote it); ``--rule rule.json`` uses the
# released file's ``llava_bench_<category>`` entries instead.
RULE_PROMPT = (
    "We would like your feedback on the two AI assistants' answers to the user question above. The user asked the "
    "question while looking at an image; a few sentences describing the image are given above for reference.\n"
    "Rate each answer's helpfulness, relevance, accuracy and level of detail with one overall score from 1 to 10; "
    "higher is better.\n"
    "On the first line, write only the two scores, for Assistant 1 and Assistant 2, separated by a space.\n"
    "From the second line on, explain your judgement in full, without bias, and without letting the order of the "
    "answers affect it."
)
UNPARSED = (-1.0, -1.0)


@dataclass(frozen=True)
class LlavaQuestion:
    """One question with what the judge needs: its context caption and GPT-4's reference answer."""

    question_id: int
    image: str
    text: str
    category: str
    caption: str
    reference: str
    reference_id: Any


@dataclass(frozen=True)
class Rule:
    """The judge's role name and instructions for one category."""

    role: str = ROLE
    prompt: str = RULE_PROMPT


def _file(directory: Path, name: str) -> Path:
    return require_file(directory, name, "give the llava-bench-in-the-wild directory")


def _caption(path: Path, row: int, rec: dict[str, Any]) -> str:
    caption = get_field(path, row, rec, "caption")
    if isinstance(caption, str):
        return caption
    if isinstance(caption, list) and all(isinstance(c, str) for c in caption):
        return "\n".join(caption)
    raise DataError(path, row, "caption", f"expected a string or a list of strings, got {show(caption)}")


def read_llava_bench(directory: str | Path) -> list[LlavaQuestion]:
    """``questions.jsonl`` with each question's context caption (by ``image``) and reference answer (by line).

    Raises:
        DataError: a missing file, a bad row, a question whose image has no context, or files of different lengths.
    """
    root = Path(directory)
    qpath, cpath, apath = (_file(root, n) for n in ("questions.jsonl", "context.jsonl", "answers_gpt4.jsonl"))
    captions = {str_field(cpath, row, rec, "image"): _caption(cpath, row, rec) for row, rec in read_rows(cpath)}
    references = read_rows(apath)
    questions = read_rows(qpath)
    if len(references) != len(questions):
        reason = f"{len(references)} reference answers for {len(questions)} questions (paired by line order)"
        raise DataError(apath, None, None, reason)
    out = []
    for (row, rec), (arow, ans) in zip(questions, references):
        image = str_field(qpath, row, rec, "image")
        if image not in captions:
            raise DataError(qpath, row, "image", f"image {show(image)} has no line in {cpath.name}")
        out.append(
            LlavaQuestion(
                question_id=int_field(qpath, row, rec, "question_id"),
                image=image,
                text=str_field(qpath, row, rec, "text"),
                category=str_field(qpath, row, rec, "category"),
                caption=captions[image],
                reference=str_field(apath, arow, ans, "text"),
                reference_id=ans.get("answer_id", ans.get("question_id")),
            )
        )
    if not out:
        raise DataError(qpath, None, None, "no questions in file")
    return out


def read_llava_answers(path: str | Path, questions: Sequence[LlavaQuestion]) -> list[tuple[str, Any]]:
    """``(text, answer_id)`` of each model answer, paired with the questions by line order.

    Raises:
        DataError: a bad row, a ``question_id`` that is not the question's on the same line, or a count mismatch.
    """
    rows = read_rows(path)
    if len(rows) != len(questions):
        raise DataError(path, None, None, f"{len(rows)} answers for {len(questions)} questions (paired by line order)")
    out = []
    for (row, rec), q in zip(rows, questions):
        if "question_id" in rec and int_field(path, row, rec, "question_id") != q.question_id:
            reason = f"expected {q.question_id} (the question on this line): answers are paired by line order"
            raise DataError(path, row, "question_id", reason)
        out.append((str_field(path, row, rec, "text"), rec.get("answer_id", rec.get("question_id"))))
    return out


def read_rules(path: str | Path, categories: Collection[str] = ()) -> dict[str, Rule]:
    """``rule.json``: ``{name: {"role", "prompt"}}``, checked to hold ``llava_bench_<c>`` for each of ``categories``.

    Raises:
        DataError: not an object of objects with string ``role`` and ``prompt``, or a category without a rule.
    """
    rows = read_rows(path)
    if len(rows) != 1:
        raise DataError(path, None, None, "expected one JSON object {rule name: {role, prompt}}")
    rules = {}
    for name, rule in rows[0][1].items():
        if not isinstance(rule, dict) or not all(isinstance(rule.get(k), str) for k in ("role", "prompt")):
            raise DataError(path, None, name, "expected an object with string 'role' and 'prompt'")
        rules[name] = Rule(rule["role"], rule["prompt"])
    for category in sorted(categories):
        if f"llava_bench_{category}" not in rules:
            raise DataError(path, None, f"llava_bench_{category}", "no rule for this question category")
    return rules


def judge_content(q: LlavaQuestion, answer: str, rule: Rule) -> str:
    """The judge's input, laid out as the official script lays it out."""
    r = rule.role
    return (
        f"[Context]\n{q.caption}\n\n[Question]\n{q.text}\n\n"
        f"[{r} 1]\n{q.reference}\n\n[End of {r} 1]\n\n[{r} 2]\n{answer}\n\n[End of {r} 2]\n\n"
        f"[System]\n{rule.prompt}\n\n"
    )


def judge_requests(
    questions: Sequence[LlavaQuestion], answers: Sequence[str], rules: Mapping[str, Rule] | None = None
) -> list[JudgeRequest]:
    """One request per question (``rules``: from ``read_rules``; ``None`` uses ``RULE_PROMPT`` for every category).

    Raises:
        DataError: ``rules`` has no entry for a question's category.
    """
    requests = []
    for q, answer in zip(questions, answers):
        name = f"llava_bench_{q.category}"
        if rules is not None and name not in rules:
            raise DataError("<rules>", None, name, "no rule for this category")
        rule = rules[name] if rules is not None else Rule()
        fields = {"question": q.text, "category": q.category, "caption": q.caption, "reference": q.reference}
        requests.append(JudgeRequest(str(q.question_id), judge_content(q, answer, rule), answer, fields))
    return requests


def parse_scores(output: JudgeOutput) -> tuple[float, float] | None:
    """The two scores on the first line of a review (commas as spaces, exactly two single-space-separated numbers),
    or a pair output as is; ``None`` when neither."""
    if isinstance(output, tuple):
        return output
    if not isinstance(output, str):
        return None
    parts = output.split("\n")[0].replace(",", " ").split(" ")
    if len(parts) != 2:
        return None
    try:
        return (float(parts[0]), float(parts[1]))
    except ValueError:
        return None


def judge_llava_bench(
    questions: Sequence[LlavaQuestion],
    answers: Sequence[str],
    judge: BenchJudge,
    rules: Mapping[str, Rule] | None = None,
    answer_ids: Sequence[Any] | None = None,
) -> list[dict[str, Any]]:
    """Review every answer; a judge that returns one number per answer is asked again about the reference answer.

    Returns:
        Review lines in the official layout (``id``, ``question_id``, ``answer1_id``, ``answer2_id``, ``category``,
        ``content``, ``tuple``), with ``parsed`` (false for a [−1, −1] pair).
    """
    requests = judge_requests(questions, answers, rules)
    outputs = judge.judge(requests)
    single = [i for i, o in enumerate(outputs) if isinstance(o, float)]
    if single:
        again = [
            JudgeRequest(requests[i].id, requests[i].prompt, questions[i].reference, requests[i].fields) for i in single
        ]
        for i, ref in zip(single, judge.judge(again)):
            model = outputs[i]
            outputs[i] = (ref, model) if isinstance(ref, float) and isinstance(model, float) else None
    reviews = []
    for idx, (q, output) in enumerate(zip(questions, outputs)):
        pair = parse_scores(output)
        reviews.append(
            {
                "id": idx + 1,
                "question_id": q.question_id,
                "answer1_id": q.reference_id,
                "answer2_id": answer_ids[idx] if answer_ids is not None else q.question_id,
                "category": f"llava_bench_{q.category}",
                "content": output if isinstance(output, str) else None,
                "tuple": list(pair if pair is not None else UNPARSED),
                "parsed": pair is not None,
            }
        )
    return reviews


def read_reviews(path: str | Path) -> list[dict[str, Any]]:
    """A review JSONL (``tuple`` and, usually, ``category`` per line), e.g. one the official script wrote.

    Raises:
        DataError: a line without a two-number ``tuple``.
    """
    reviews = []
    for row, rec in read_rows(path):
        pair = get_field(path, row, rec, "tuple")
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(v, int | float) for v in pair)):
            raise DataError(path, row, "tuple", f"expected two scores, got {show(pair)}")
        category = rec.get("category")
        if category is not None and not isinstance(category, str):
            raise DataError(path, row, "category", f"expected a string, got {show(category)}")
        reviews.append({**rec, "parsed": rec.get("parsed", list(pair) != list(UNPARSED))})
    if not reviews:
        raise DataError(path, None, None, "no reviews in file")
    return reviews


def summarize_reviews(reviews: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per category and "all": relative score and both means × 10, as the official summariser prints them.

    Returns:
        ``{"scores": {key: {"relative", "reference_x10", "model_x10", "n"}}, "n", "n_unparsed"}``; keys sorted as
        the summariser sorts them ("all" first).
    """
    groups: dict[str, list[Sequence[float]]] = {}
    for r in reviews:
        keys = [r["category"], "all"] if r.get("category") is not None else ["all"]
        for key in keys:
            groups.setdefault(key, []).append(r["tuple"])
    scores = {}
    for key, pairs in sorted(groups.items()):
        ref = round(sum(p[0] for p in pairs) / len(pairs), 3)
        model = round(sum(p[1] for p in pairs) / len(pairs), 3)
        relative = round(model / ref * 100, 1) if ref else None
        scores[key] = {"relative": relative, "reference_x10": round(ref * 10, 1), "model_x10": round(model * 10, 1)}
        scores[key]["n"] = len(pairs)
    return {"scores": scores, "n": len(reviews), "n_unparsed": sum(not r["parsed"] for r in reviews)}


def llava_bench_markdown(summary: Mapping[str, Any], judge: str = "") -> str:
    """The summariser's lines (category, relative score, reference × 10, model × 10) as a markdown table."""
    lines = ["| category | relative score | reference ×10 | model ×10 | questions |", "|---|---:|---:|---:|---:|"]
    for key, s in summary["scores"].items():
        relative = "–" if s["relative"] is None else f"{s['relative']:.1f}"
        lines.append(f"| {key} | {relative} | {s['reference_x10']:.1f} | {s['model_x10']:.1f} | {s['n']} |")
    lines += [
        "",
        f"judge: {judge or '-'}; unparsed reviews: {summary['n_unparsed']} of {summary['n']} "
        "(scored [-1, -1] and averaged in, as the official summariser does)",
    ]
    return "\n".join(lines)
