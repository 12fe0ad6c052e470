"""CHAIR scoring (Rohrbach et al., EMNLP 2018; spec §9.2): hallucinated object mentions in captions.

With M the object mentions of all captions (duplicates counted) and H ⊆ M those whose category is not in
the image's ground truth:

* CHAIR_i = |H| / |M|;
* CHAIR_s = #captions with at least one hallucinated mention / #captions;
* recall = Σ_captions |unique correctly mentioned categories| / Σ_captions |ground-truth categories|;
* mean length = mean number of words per caption (``coco_vocab.tokenize``).

A zero denominator gives 0.0. The vocabulary and word matcher live in ``coco_vocab``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from mmalign.errors import DataError
from mmalign.eval.coco_vocab import ChairVocab, extract_mentions, tokenize
from mmalign.eval.io import read_captions, read_coco_caption_objects, read_object_annotations, show

__all__ = ["ChairVocab", "chair_markdown_table", "extract_mentions", "score_chair", "score_chair_files"]


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
        mentions = extract_mentions(caption, vocab)
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
        canonical = vocab.canonical(name)
        if canonical is None:
            raise DataError(
                "<ground_truth>", None, "objects", f"image_id {show(image_id)}: unknown category {show(name)}"
            )
        truth.add(canonical)
    return truth


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


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
        for image_id, objects in read_coco_caption_objects(coco_captions_path, vocab).items():
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
