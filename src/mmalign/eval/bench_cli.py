"""``mmalign eval amber | mmhal | objhal | llava-bench``: the released benchmark files, offline.

Each command reads the benchmark's released files from local paths, then either answers every question with a local
model (``--model``; greedy decoding, answers written beside ``--out`` in the benchmark's own answer format) or takes
an existing answer file (``--answers``), scores it, prints the papers' table and writes the results JSON (atomically)
to ``--out``. MMHal-Bench and LLaVA-Bench need a judge (``--judge``: a local model directory or ``FILE.py:function``,
see ``bench_judge``), or earlier judge outputs (``--reviews``). Bad input is a ``DataError`` naming file, row and
field; image paths are resolved inside their root (``resolve_in_root``) and decoded before any model sees them.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmalign.errors import ConfigError, DataError, ModelError
from mmalign.eval.io import read_text

log = logging.getLogger(__name__)


def add_bench_commands(esub: argparse._SubParsersAction) -> None:
    """Add the four benchmark commands to ``mmalign eval``'s sub-commands."""
    _add_amber(esub)
    _add_mmhal(esub)
    _add_objhal(esub)
    _add_llava_bench(esub)


# --- arguments -----------------------------------------------------------------------------------------------


def _source(p: argparse.ArgumentParser, answers: str, reviews: bool = False) -> None:
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--model", help="local model directory: answer every question with it (greedy)")
    group.add_argument("--answers", help=answers)
    if reviews:
        group.add_argument("--reviews", help="judge outputs saved earlier: score them without a model or judge")


def _common(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help="answer length cap (with --model)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts generated together (with --model)")
    p.add_argument("--limit", type=int, default=None, help="only the first N questions (with --model)")
    p.add_argument("--engine", choices=["hf", "vllm"], default="hf", help="what generates the answers (with --model)")
    p.add_argument("--out", required=True, help="result JSON (generated answers are written beside it)")


def _judge_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--judge", help="local judge model directory, or FILE.py:function / module:function")
    p.add_argument("--judge-max-new-tokens", type=int, default=256, help="judge output length cap (model judge)")
    p.add_argument("--judge-batch-size", type=int, default=4)


def _add_amber(esub: argparse._SubParsersAction) -> None:
    p = esub.add_parser("amber", help="AMBER: generative CHAIR/Cover/Hal/Cog and yes/no F1 (LLM-free)")
    p.add_argument("--data", required=True, help="AMBER's data/ directory (annotations.json, relation.json, ...)")
    p.add_argument("--image-root", help="directory of the AMBER images (AMBER_<n>.jpg; needed with --model)")
    _source(p, "response file: JSON list of {id, response}")
    p.add_argument("--evaluation-type", default="a", choices=["a", "g", "d", "de", "da", "dr"])
    p.add_argument("--similarity-score", type=float, default=0.8, help="word-vector similarity threshold")
    p.add_argument("--spacy-model", help="installed spaCy model for similarity (official: en_core_web_lg)")
    p.add_argument(
        "--nouns", default="rules", choices=["rules", "nltk"], help="noun extraction (nltk: official, needs data)"
    )
    p.add_argument("--suffix", default="", help="text appended to every yes/no question (with --model)")
    _common(p, max_new_tokens=512)
    p.set_defaults(func=cmd_eval_amber)


def _add_mmhal(esub: argparse._SubParsersAction) -> None:
    p = esub.add_parser("mmhal", help="MMHal-Bench: 0-6 judge ratings, hallucination rate, per question type")
    p.add_argument("--data", required=True, help="the 96-question template JSON (e.g. response_template.json)")
    p.add_argument("--image-root", help="directory of the images, named by image_src's basename (default: images/)")
    _source(p, "answers: response JSON (model_answer filled) or JSONL {text} in template order", reviews=True)
    _judge_args(p)
    p.add_argument("--judge-prompt", help="text file replacing the judge prompt ({question}, ... or four {})")
    _common(p, max_new_tokens=512)
    p.set_defaults(func=cmd_eval_mmhal)


def _add_objhal(esub: argparse._SubParsersAction) -> None:
    p = esub.add_parser("objhal", help="Object HalBench: CHAIR on detailed descriptions of COCO images")
    p.add_argument("--data", required=True, help="obj_halbench_300_with_image.jsonl (image_id, question, image)")
    p.add_argument("--coco", required=True, help="directory with instances_/captions_{val,train}2014.json")
    p.add_argument("--synonyms", help="synonyms_refine.txt (RLHF-V) or synonyms.txt (default: our COCO synonyms)")
    _source(p, "answers JSONL {question_id, image_id, prompt, text}")
    _common(p, max_new_tokens=512)
    p.set_defaults(func=cmd_eval_objhal)


def _add_llava_bench(esub: argparse._SubParsersAction) -> None:
    p = esub.add_parser("llava-bench", help="LLaVA-Bench (In-the-Wild): judge score relative to GPT-4's answers")
    p.add_argument("--data", help="llava-bench-in-the-wild directory (questions.jsonl, context.jsonl, ...)")
    p.add_argument("--image-root", help="directory of the images (default: DATA/images)")
    _source(p, "model answers JSONL (model_vqa format), in questions.jsonl order", reviews=True)
    _judge_args(p)
    p.add_argument("--rule", help="LLaVA's rule.json (default: our paraphrase of its prompt)")
    _common(p, max_new_tokens=1024)
    p.set_defaults(func=cmd_eval_llava_bench)


# --- shared steps --------------------------------------------------------------------------------------------


def _write_json(path: str | Path, obj: Any) -> None:
    from mmalign.runtime.checkpoint import atomic_write_json

    atomic_write_json(path, obj, ensure_ascii=False)


def _write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    from mmalign.runtime.checkpoint import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


class _Images:
    """Image files of one root, checked by the loaders' own media checker (inside the root after symlinks, a regular
    file, decodable, under the pixel limit) before generation, each distinct file once."""

    def __init__(self, root: str | Path) -> None:
        from mmalign.data.media import MediaChecker

        self.root = Path(root).absolute()
        if not self.root.is_dir():
            raise DataError(self.root, None, None, "image directory not found")
        self._checker = MediaChecker(self.root, remember=True)

    def check(self, name: str, path: str | Path, row: int, field: str) -> Path:
        """The image's absolute path; a path outside the root or an unusable image is a ``DataError``."""
        from mmalign.errors import MediaError

        try:
            return self._checker.check_path(name)
        except MediaError as err:
            raise DataError(path, row, field, str(err)) from None

    def save(self) -> None:
        """Remember the images that decoded, for the next run (``MediaChecker.save``)."""
        self._checker.save()


def _sample(ident: str, text: str, image: Path | bytes | None) -> Any:
    from mmalign.types import ImageRef, Message, Sample

    if image is None:
        return Sample(id=ident, messages=(Message.user(text),))
    ref = ImageRef(data=image) if isinstance(image, bytes) else ImageRef(path=str(image))
    return Sample(id=ident, messages=(Message.user(text, images=1),), images=(ref,))


def _generate(
    loaded: Any, samples: Sequence[Any], args: argparse.Namespace, desc: str, tokens: int | None = None
) -> list[str]:
    from mmalign.eval.generate import generate_answers

    return generate_answers(
        loaded.model if loaded else None,
        loaded.processor if loaded else None,
        samples,
        max_new_tokens=tokens or args.max_new_tokens,
        batch_size=args.batch_size,
        desc=desc,
        engine=args.engine,
        model_dir=args.model,
    )


def _load_model(args: argparse.Namespace) -> Any:
    """The answering model (None with ``--engine vllm``, which loads its own copy; checked before anything runs)."""
    from mmalign.generation.engines import check_engine
    from mmalign.models.load import load_model

    check_engine(args.engine)
    return load_model(args.model) if args.engine == "hf" else None


def _early_judge(args: argparse.Namespace, benchmark: str) -> Any:
    """Check ``--judge`` before any generation; a function judge is loaded now (cheap), a model judge later."""
    if args.judge is None:
        raise ConfigError(f"mmalign eval {benchmark}: give --judge (a model directory or FILE.py:function)")
    path = Path(args.judge)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path}: not a model directory (no config.json)")
        return None
    return _load_judge(args, benchmark)


def _load_judge(args: argparse.Namespace, benchmark: str) -> Any:
    from mmalign.eval.bench_judge import load_judge

    return load_judge(
        args.judge, benchmark=benchmark, max_new_tokens=args.judge_max_new_tokens, batch_size=args.judge_batch_size
    )


def _limited(items: list[Any], args: argparse.Namespace) -> list[Any]:
    return items[: args.limit] if args.model is not None and args.limit is not None else items


# --- commands ------------------------------------------------------------------------------------------------


def cmd_eval_amber(args: argparse.Namespace) -> int:
    from mmalign.eval.amber import (
        amber_markdown,
        exact_similarity,
        noun_extractor,
        read_amber_data,
        read_amber_responses,
        score_amber,
        spacy_similarity,
    )

    data = read_amber_data(args.data)
    nouns = noun_extractor(args.nouns, data.vocabulary)
    similarity = spacy_similarity(args.spacy_model) if args.spacy_model else exact_similarity
    if args.answers is not None:
        responses = read_amber_responses(args.answers, len(data.annotations))
    else:
        responses = _amber_generate(args, data)
        _write_json(Path(args.out).with_suffix(".responses.json"), [{"id": i, "response": r} for i, r in responses])
    result = score_amber(
        responses,
        data,
        evaluation_type=args.evaluation_type,
        nouns=nouns,
        similarity=similarity,
        threshold=args.similarity_score,
    )
    result["similarity"] = args.spacy_model or "exact"
    result["nouns"] = args.nouns
    _write_json(args.out, result)
    print(amber_markdown(result))
    return 0


def _amber_generate(args: argparse.Namespace, data: Any) -> list[tuple[int, str]]:
    """Answer the evaluation type's queries: descriptions up to ``--max-new-tokens``, yes/no questions in 8 tokens
    normalised to exactly "Yes"/"No" when the reply starts with one of them (the official comparison is exact)."""
    from mmalign.eval.amber import GENERATIVE, normalize_yes_no, read_amber_queries

    if args.image_root is None:
        raise ConfigError("mmalign eval amber --model: give --image-root (the directory of the AMBER images)")
    path, queries = read_amber_queries(args.data, args.evaluation_type)
    images = _Images(args.image_root)
    describe, ask = [], []
    for row, q in enumerate(_limited(queries, args), start=1):
        if not 1 <= q.id <= len(data.annotations):
            raise DataError(path, row, "id", f"id {q.id} is outside the annotations (1..{len(data.annotations)})")
        image = images.check(q.image, path, row, "image")
        if data.annotations[q.id - 1].type == GENERATIVE:
            describe.append(_sample(str(q.id), q.query, image))
        else:
            ask.append(_sample(str(q.id), q.query + args.suffix, image))
    images.save()
    loaded = _load_model(args)
    texts = dict(zip((s.id for s in describe), _generate(loaded, describe, args, "AMBER descriptions")))
    replies = _generate(loaded, ask, args, "AMBER yes/no", tokens=8)
    texts.update((s.id, normalize_yes_no(r)) for s, r in zip(ask, replies))
    return [(int(s_id), texts[s_id]) for s_id in (str(q.id) for q in _limited(queries, args))]


def cmd_eval_mmhal(args: argparse.Namespace) -> int:
    from mmalign.eval.mmhal import (
        JUDGE_PROMPT,
        check_judge_prompt,
        judge_mmhal,
        mmhal_markdown,
        read_mmhal_answers,
        read_mmhal_reviews,
        read_mmhal_template,
        score_mmhal,
    )

    items = _limited(read_mmhal_template(args.data), args)
    if args.reviews is not None:
        outputs = read_mmhal_reviews(args.reviews)
        if len(outputs) != len(items):
            raise DataError(args.reviews, None, None, f"{len(outputs)} judge outputs for {len(items)} questions")
        result = score_mmhal(items, outputs, judge=f"reviews from {args.reviews}")
    else:
        template = JUDGE_PROMPT
        if args.judge_prompt is not None:
            template = check_judge_prompt(read_text(args.judge_prompt), args.judge_prompt)
        judge = _early_judge(args, "mmhal")
        if args.answers is not None:
            answers = read_mmhal_answers(args.answers, len(items))
        else:
            answers = _mmhal_generate(args, items)
        result = judge_mmhal(items, answers, judge or _load_judge(args, "mmhal"), template)
    if len(items) != 96:
        log.warning("MMHal-Bench has 96 questions; scoring %d (per-type averages use index mod 8)", len(items))
    _write_json(args.out, result)
    print(mmhal_markdown(result))
    return 0


def _mmhal_generate(args: argparse.Namespace, items: Sequence[Any]) -> list[str]:
    """Answer each question about its image (no prompt suffix: the official script passes none)."""
    images = _Images(args.image_root or Path(args.data).parent / "images")
    samples = [
        _sample(str(it.index), it.question, images.check(it.image_name, args.data, it.index + 1, "image_src"))
        for it in items
    ]
    images.save()
    answers = _generate(_load_model(args), samples, args, "MMHal answers")
    rows = [_mmhal_row(it, a) for it, a in zip(items, answers)]
    _write_json(Path(args.out).with_suffix(".responses.json"), rows)
    return answers


def _mmhal_row(item: Any, answer: str) -> dict[str, Any]:
    """A template row with ``model_answer`` filled (LLaVA-RLHF's response file)."""
    keys = ("question_type", "question_topic", "image_id", "image_src", "image_content", "question", "gt_answer")
    row = {k: getattr(item, k) for k in keys}
    return {**row, "image_content": list(item.image_content), "model_answer": answer}


def cmd_eval_objhal(args: argparse.Namespace) -> int:
    from mmalign.eval.chair_score import ChairVocab, read_chair_synonyms
    from mmalign.eval.objhal import (
        objhal_markdown,
        read_coco_truth,
        read_objhal_answers,
        read_objhal_questions,
        score_objhal,
    )

    vocab = read_chair_synonyms(args.synonyms, strip=True) if args.synonyms else ChairVocab.coco()
    questions = _limited(read_objhal_questions(args.data, need_images=args.model is not None), args)
    answers = read_objhal_answers(args.answers, questions) if args.answers is not None else None
    # The ground truth of the images answered (read before any generation: a bad COCO file fails at once).
    ids = {a.image_id for a in answers} if answers is not None else {q.image_id for q in questions}
    truth = read_coco_truth(args.coco, vocab, ids)
    if answers is not None:
        source = args.answers
    else:
        answers = _objhal_generate(args, questions)
        source = Path(args.out).with_suffix(".answers.jsonl")
    result = score_objhal(answers, truth, vocab, source)
    result["vocabulary"] = args.synonyms or "coco (mmalign synonyms)"
    _write_json(args.out, result)
    print(objhal_markdown(result))
    return 0


def _objhal_generate(args: argparse.Namespace, questions: Sequence[Any]) -> list[Any]:
    """Describe each image (its base64 decoded by the reader, the image itself checked here before generation)."""
    from mmalign.data.media import check_image
    from mmalign.errors import MediaError
    from mmalign.eval.objhal import ObjHalAnswer

    samples = []
    for q in questions:
        try:
            check_image(q.image)
        except MediaError as err:
            raise DataError(args.data, q.row, "image", str(err)) from None
        samples.append(_sample(str(q.row), q.question, q.image))
    texts = _generate(_load_model(args), samples, args, "Object HalBench")
    answers = [ObjHalAnswer(q.row, q.image_id, t, q.question) for q, t in zip(questions, texts)]
    model_id = Path(args.model).name
    rows = [
        {"question_id": i, "image_id": a.image_id, "prompt": a.question, "text": a.text, "model_id": model_id}
        for i, a in enumerate(answers)
    ]
    _write_jsonl(Path(args.out).with_suffix(".answers.jsonl"), rows)
    return answers


def cmd_eval_llava_bench(args: argparse.Namespace) -> int:
    from mmalign.eval.llava_bench import (
        judge_llava_bench,
        llava_bench_markdown,
        read_llava_answers,
        read_llava_bench,
        read_reviews,
        read_rules,
        summarize_reviews,
    )

    if args.reviews is not None:
        reviews, judge_name = read_reviews(args.reviews), f"reviews from {args.reviews}"
    else:
        if args.data is None:
            raise ConfigError("mmalign eval llava-bench: give --data (or --reviews to summarise a review file)")
        questions = _limited(read_llava_bench(args.data), args)
        rules = read_rules(args.rule, {q.category for q in questions}) if args.rule else None
        judge = _early_judge(args, "llava-bench")
        if args.answers is not None:
            texts, ids = zip(*read_llava_answers(args.answers, questions))
        else:
            texts = tuple(_llava_generate(args, questions))
            ids = tuple(q.question_id for q in questions)
        judge = judge or _load_judge(args, "llava-bench")
        reviews, judge_name = judge_llava_bench(questions, texts, judge, rules, ids), judge.name
        _write_jsonl(Path(args.out).with_suffix(".reviews.jsonl"), reviews)
    summary = summarize_reviews(reviews)
    _write_json(args.out, {**summary, "judge": judge_name, "reviews": reviews})
    print(llava_bench_markdown(summary, judge_name))
    return 0


def _llava_generate(args: argparse.Namespace, questions: Sequence[Any]) -> list[str]:
    """Answer each question about its image; answers written in ``model_vqa``'s layout."""
    images = _Images(args.image_root or Path(args.data) / "images")
    qpath = Path(args.data) / "questions.jsonl"
    samples = [
        _sample(str(q.question_id), q.text, images.check(q.image, qpath, row, "image"))
        for row, q in enumerate(questions, start=1)
    ]
    images.save()
    texts = _generate(_load_model(args), samples, args, "LLaVA-Bench answers")
    model_id = Path(args.model).name
    rows = [
        {"question_id": q.question_id, "prompt": q.text, "text": t, "answer_id": str(q.question_id),
         "model_id": model_id, "metadata": {}}
        for q, t in zip(questions, texts)
    ]  # fmt: skip
    _write_jsonl(Path(args.out).with_suffix(".answers.jsonl"), rows)
    return texts
