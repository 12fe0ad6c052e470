"""Object HalBench (RLHF-V, Yu et al. CVPR 2024; spec §9.3, files §15.3): CHAIR on detailed descriptions.

The question file ``obj_halbench_300_with_image.jsonl`` has one line per COCO val2014 image: ``image_id``,
``question`` (a "describe in detail" instruction) and ``image`` (base64 JPEG). Answers are JSONL
``{question_id, image_id, prompt, text, model_id}`` (``answer`` for ``text`` and ``question`` for ``prompt`` are
accepted; a line without ``image_id`` takes the question file's on the same line). "Assistant:" is removed from each
answer, as RLHF-V does.

Ground truth per image = COCO instance categories ∪ the categories its COCO reference captions mention. Objects are
found in each answer with CHAIR's word matcher (``chair_score.chair_words``; RLHF-V's scorer without ``--use_gpt``);
the vocabulary is ``--synonyms`` (RLHF-V's ``synonyms_refine.txt``) or, by default, our COCO synonyms.

* Response Hall = CHAIRs_refine = answers with a hallucinated object / answers that mention a COCO object;
* Object Hall = CHAIRi = hallucinated mentions / mentions; CHAIRs = answers with a hallucination / all answers;
* obj_rec = Σ |unique correct categories| / Σ |ground-truth categories|; avg_word_len = mean of
  ``len(text.strip().split(" "))``.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmalign.data.media import decode_base64
from mmalign.errors import DataError, MediaError
from mmalign.eval.chair_score import ChairVocab, read_reference_caption_objects, score_chair
from mmalign.eval.io import int_field, read_object_annotations, read_rows, show, str_field

COCO_FILES = ("instances_val2014.json", "instances_train2014.json", "captions_val2014.json", "captions_train2014.json")


@dataclass(frozen=True)
class ObjHalQuestion:
    """One line of the question file; ``image`` is its JPEG, decoded from the base64 text (empty when not read)."""

    row: int
    image_id: int
    question: str
    image: bytes = b""


@dataclass(frozen=True)
class ObjHalAnswer:
    """One answer with the image it describes."""

    row: int
    image_id: int
    text: str
    question: str = ""


def read_objhal_questions(path: str | Path, *, need_images: bool = False) -> list[ObjHalQuestion]:
    """The question file's rows (``image`` checked to be base64 text when ``need_images``).

    Raises:
        DataError: a missing or mistyped field, bad base64, or no rows.
    """
    out = []
    for row, rec in read_rows(path):
        image = b""
        if need_images:
            try:
                image = decode_base64(str_field(path, row, rec, "image"))
            except MediaError as err:
                raise DataError(path, row, "image", str(err)) from None
        out.append(
            ObjHalQuestion(row, int_field(path, row, rec, "image_id"), str_field(path, row, rec, "question"), image)
        )
    if not out:
        raise DataError(path, None, None, "no questions in file")
    return out


def read_objhal_answers(path: str | Path, questions: Sequence[ObjHalQuestion] | None = None) -> list[ObjHalAnswer]:
    """The answers, each with its image id (from the question on the same line when the answer has none).

    Raises:
        DataError: a row without ``text``/``answer``, or without ``image_id`` and no question on its line.
    """
    out = []
    for i, (row, rec) in enumerate(read_rows(path)):
        if "text" not in rec and "answer" not in rec:
            raise DataError(path, row, "text", "missing (the answer goes in 'text' or 'answer')")
        text = str_field(path, row, rec, "text" if "text" in rec else "answer").replace("Assistant:", "").strip()
        if "image_id" in rec:
            image_id = int_field(path, row, rec, "image_id")
        elif questions is not None and i < len(questions):
            image_id = questions[i].image_id
        else:
            raise DataError(path, row, "image_id", "missing (and no question on this line of the question file)")
        key = "prompt" if "prompt" in rec else "question"
        question = str_field(path, row, rec, key) if rec.get(key) is not None else ""
        out.append(ObjHalAnswer(row, image_id, text, question))
    if not out:
        raise DataError(path, None, None, "no answers in file")
    return out


def read_coco_truth(
    directory: str | Path, vocab: ChairVocab, image_ids: Collection[int] | None = None
) -> dict[int, set[str]]:
    """COCO ground truth per image id: instance categories ∪ reference-caption objects, from the 2014 files present
    in ``directory`` (val and train; at least one instances file); with ``image_ids``, of those images only.

    Raises:
        DataError: no instances file, or a malformed one.
    """
    root = Path(directory)
    present = [root / name for name in COCO_FILES if (root / name).is_file()]
    instances = [p for p in present if p.name.startswith("instances")]
    if not instances:
        raise DataError(root, None, None, "no instances_val2014.json (or instances_train2014.json) in the directory")
    wanted = None if image_ids is None else {str(i) for i in image_ids}
    truth: dict[int, set[str]] = {}
    for path in present:
        found = (
            read_object_annotations(path, vocab)
            if path.name.startswith("instances")
            else read_reference_caption_objects(path, vocab, wanted)
        )
        for image_id, objects in found.items():
            if wanted is None or image_id in wanted:
                truth.setdefault(int(image_id), set()).update(objects)
    return truth


def score_objhal(
    answers: Sequence[ObjHalAnswer],
    truth: Mapping[int, set[str]],
    vocab: ChairVocab,
    source: str | Path = "<answers>",
) -> dict[str, Any]:
    """RLHF-V's overall metrics (fractions, as its output file holds them) plus ``per_caption`` from ``score_chair``.

    Raises:
        DataError: an answer whose image has no ground truth (``source`` names the answers in the message).
    """
    for a in answers:
        if a.image_id not in truth:
            raise DataError(source, a.row, "image_id", f"image_id {show(a.image_id)} is not in the COCO files")
    # Keyed by line: two answers about one image stay two captions.
    captions = {str(i): a.text for i, a in enumerate(answers)}
    chair = score_chair(captions, {str(i): truth[a.image_id] for i, a in enumerate(answers)}, vocab)
    per = chair["per_caption"]
    n, coco = len(per), sum(c["n_mentions"] > 0 for c in per)
    bad = sum(c["n_hallucinated"] > 0 for c in per)
    refine = bad / coco if coco else 0.0
    return {
        "CHAIRs": chair["chair_s"],
        "CHAIRs_refine": refine,
        "CHAIRi": chair["chair_i"],
        "obj_rec": chair["recall"],
        "sentence_num": n,
        "coco_sentence_num": coco,
        "coco_word_count": sum(c["n_correct"] for c in per),
        "gt_word_count": sum(c["n_truth"] for c in per),
        "avg_word_len": sum(len(a.text.strip().split(" ")) for a in answers) / n if n else 0.0,
        "correct_rate": 1 - refine,
        "object_correct_rate": 1 - chair["chair_i"],
        "n_mentions": chair["n_mentions"],
        "n_hallucinated": chair["n_hallucinated"],
        "hallucinated_objects": chair["hallucinated_objects"],
        "per_caption": [{**c, "image_id": a.image_id} for c, a in zip(per, answers)],
    }


def objhal_markdown(result: Mapping[str, Any]) -> str:
    """The papers' columns (Response Hall = CHAIRs_refine, Object Hall = CHAIRi, in percent) and RLHF-V's others."""
    r = result
    return "\n".join(
        [
            "| Response Hall ↓ | Object Hall ↓ | CHAIRs | Recall | answers | with COCO objects | avg length |",
            "|---:|---:|---:|---:|---:|---:|---:|",
            f"| {100 * r['CHAIRs_refine']:.1f} | {100 * r['CHAIRi']:.1f} | {100 * r['CHAIRs']:.1f} | "
            f"{100 * r['obj_rec']:.1f} | {r['sentence_num']} | {r['coco_sentence_num']} | {r['avg_word_len']:.1f} |",
        ]
    )
