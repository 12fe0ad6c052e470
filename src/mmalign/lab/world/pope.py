"""POPE question sets over the eval scenes, built the way POPE builds them.

POPE: Li et al., 2023, "Evaluating Object Hallucination in Large Vision-Language Models". Per image,
the first ``k = min(3, #distinct shapes)`` ground-truth shapes give ``k`` "yes" questions and ``k``
absent shapes give "no" questions, interleaved yes, no, yes, no, ... The absent shapes are drawn:

* random: uniformly among the shapes not in the image;
* popular: the most frequent shapes over the eval images, in frequency order;
* adversarial: for each positive shape in turn, the absent shape that co-occurs with it most often in the
  TRAINING scenes, which for a planted pair member is its missing partner.

Ties are broken by config order; no negative is repeated within an image.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from mmalign.lab.world.config import WorldConfig
from mmalign.lab.world.qa import existence_question
from mmalign.lab.world.scenes import Scene

POPE_SPLITS = ("random", "popular", "adversarial")
MAX_POSITIVES = 3


def pope_questions(
    scenes: Sequence[Scene],
    cfg: WorldConfig,
    split: str,
    eval_frequency: dict[str, int],
    train_cooccurrence: list[list[int]],
) -> list[dict[str, Any]]:
    """POPE rows for one split, in the official schema plus ``category``, ``object`` and ``image_id``.

    Args:
        scenes: eval scenes.
        cfg: the world config (shape order breaks ties).
        split: one of ``POPE_SPLITS``.
        eval_frequency: shape → number of eval scenes holding it (for ``popular``).
        train_cooccurrence: ``[i][j]`` training scenes holding shapes i and j (for ``adversarial``).

    Returns:
        Rows ``{"question_id", "image", "text", "label", "category", "object", "image_id"}`` with
        ``question_id`` counting from 1.

    Raises:
        ValueError: unknown split.
    """
    if split not in POPE_SPLITS:
        raise ValueError(f"unknown POPE split {split!r}; expected one of {', '.join(POPE_SPLITS)}")
    rng = random.Random(f"{cfg.seed}/pope/{split}")
    order = {s: i for i, s in enumerate(cfg.shapes)}
    popular = sorted(cfg.shapes, key=lambda s: (-eval_frequency[s], order[s]))
    rows: list[dict[str, Any]] = []
    for scene in scenes:
        positives = list(scene.shapes[:MAX_POSITIVES])
        absent = [s for s in cfg.shapes if s not in scene.shapes]
        if split == "random":
            negatives = rng.sample(absent, len(positives))
        elif split == "popular":
            negatives = [s for s in popular if s in absent][: len(positives)]
        else:
            negatives = adversarial_negatives(positives, absent, cfg.shapes, train_cooccurrence)
        for pos, neg in zip(positives, negatives):
            for shape, label in ((pos, "yes"), (neg, "no")):
                rows.append(
                    {
                        "question_id": len(rows) + 1,
                        "image": scene.image,
                        "text": existence_question(shape),
                        "label": label,
                        "category": split,
                        "object": shape,
                        "image_id": scene.image_id,
                    }
                )
    return rows


def adversarial_negatives(
    positives: Sequence[str],
    absent: Sequence[str],
    shapes: Sequence[str],
    cooccurrence: list[list[int]],
) -> list[str]:
    """For each positive, the not-yet-used absent shape it co-occurs with most (ties: config order)."""
    index = {s: i for i, s in enumerate(shapes)}
    chosen: list[str] = []
    for pos in positives:
        row = cooccurrence[index[pos]]
        candidates = [s for s in absent if s not in chosen]
        chosen.append(max(candidates, key=lambda s: (row[index[s]], -index[s])))
    return chosen
