"""CHAIR evaluation of a model: caption every image, then count hallucinated object mentions.

``--data`` is a prompts file of ``Sample`` rows (e.g. the world's ``eval_describe.jsonl``) whose ``meta`` carries
``image_id`` and, unless an annotations file is given, the ground-truth ``objects``; or a world directory.
The object vocabulary is the world's ``chair_vocab.json`` when one sits beside the data, else COCO's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mmalign.data.loaders import load_samples
from mmalign.errors import DataError
from mmalign.eval.chair_score import ChairVocab, score_chair
from mmalign.eval.generate import generate_answers
from mmalign.eval.io import read_object_annotations
from mmalign.generation.engines import Engine
from mmalign.types import Sample

DESCRIBE_FILE = "eval_describe.jsonl"
VOCAB_FILE = "chair_vocab.json"


def resolve_chair_inputs(data: str | Path, vocab: str | Path | None = None) -> tuple[Path, ChairVocab]:
    """The prompts file and the vocabulary to use for ``data``."""
    path = Path(data)
    prompts = path / DESCRIBE_FILE if path.is_dir() else path
    if not prompts.is_file():
        raise DataError(prompts, None, None, "CHAIR prompts file not found")
    if vocab is not None:
        return prompts, ChairVocab.from_file(vocab)
    beside = prompts.parent / VOCAB_FILE
    return prompts, (ChairVocab.from_file(beside) if beside.is_file() else ChairVocab.coco())


def ground_truth(
    samples: list[Sample], path: Path, vocab: ChairVocab, annotations: str | Path | None = None
) -> dict[str, set[str]]:
    """Ground-truth objects per image id, from an annotations file or from each sample's ``meta``."""
    if annotations is not None:
        return read_object_annotations(annotations, vocab)
    truth: dict[str, set[str]] = {}
    for row, s in enumerate(samples, start=1):
        objects = s.meta.get("objects")
        if not isinstance(objects, list):
            raise DataError(path, row, "meta.objects", "no ground-truth objects (give --annotations)")
        truth[image_id(s)] = set(objects)
    return truth


def image_id(sample: Sample) -> str:
    return str(sample.meta.get("image_id", sample.id))


def evaluate_chair(
    model: Any,
    processor: Any,
    data: str | Path,
    *,
    vocab: str | Path | None = None,
    annotations: str | Path | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    limit: int | None = None,
    captions_out: Path | None = None,
    progress: bool = True,
    engine: Engine = "hf",
    model_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Generate a caption per prompt (``engine="vllm"``: with vLLM from ``model_dir``) and score CHAIR_i, CHAIR_s,
    recall and mean length."""
    prompts, chair_vocab = resolve_chair_inputs(data, vocab)
    samples = load_samples(prompts, limit=limit).samples
    truth = ground_truth(samples, prompts, chair_vocab, annotations)
    captions = generate_answers(
        model,
        processor,
        samples,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        desc="CHAIR captions",
        progress=progress,
        engine=engine,
        model_dir=model_dir,
    )
    by_id = {image_id(s): c for s, c in zip(samples, captions)}
    if captions_out is not None:
        captions_out.parent.mkdir(parents=True, exist_ok=True)
        captions_out.write_text("".join(json.dumps({"image_id": k, "caption": v}) + "\n" for k, v in by_id.items()))
    return score_chair(by_id, truth, chair_vocab)
