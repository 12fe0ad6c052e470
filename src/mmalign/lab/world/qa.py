"""Instruction-tuning exchanges about a training scene: describe, existence, colour, count, position.

Questions name shapes canonically. Existence negatives are drawn uniformly among absent shapes, so
questions about a missing planted partner stay as rare in training as the bias makes them; with
``partner_question_prob`` < 1 a missing partner is left out of the candidates (the way annotators rarely ask
"is there a table?" about a picture of a fork without one), rarer still. Colour and
position questions are only asked about shapes that appear exactly once (otherwise the answer would be
ambiguous), and never about absent shapes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from mmalign.lab.world.config import WorldConfig
from mmalign.lab.world.scenes import Scene, lone_members
from mmalign.lab.world.text import (
    detailed_caption,
    number,
    plural,
    short_caption,
    where,
    with_article,
)

SHORT_PROMPTS = ("Describe the image.", "What is in the image?", "What do you see in the image?")
DETAILED_PROMPTS = (
    "Describe the image in detail.",
    "Give a detailed description of the image.",
    "Describe every object in the image and where it is.",
)
CAPTION_PROMPTS = (
    "Describe the image.",
    "Write a short caption for the image.",
    "What does the image show?",
    "Caption this image.",
)
EXISTENCE_TEMPLATE = "Is there {a_obj} in the image?"
MAX_EXISTENCE_PAIRS = 2  # per scene: up to this many "yes" questions and as many "no" questions


@dataclass(frozen=True)
class Exchange:
    """One user question and its ground-truth answer about one scene."""

    task: str
    question: str
    answer: str
    meta: dict[str, Any] = field(default_factory=dict)


def existence_question(shape: str) -> str:
    """The POPE template: ``Is there a star in the image?`` / ``Is there an ...``."""
    return EXISTENCE_TEMPLATE.format(a_obj=with_article(shape))


def describe(scene: Scene, cfg: WorldConfig, rng: random.Random) -> Exchange:
    """A short or a detailed description request, answered with a matching caption."""
    if rng.random() < 0.5:
        return Exchange("describe", rng.choice(SHORT_PROMPTS), short_caption(scene, cfg, rng))
    return Exchange("describe_detailed", rng.choice(DETAILED_PROMPTS), detailed_caption(scene, cfg, rng))


def existence(scene: Scene, cfg: WorldConfig, rng: random.Random) -> list[Exchange]:
    """``k`` yes-questions about present shapes and ``k`` no-questions about absent ones, shuffled.

    Each missing partner of a present member stays among the absent candidates with ``partner_question_prob``.
    """
    present = list(scene.shapes)
    absent = [s for s in cfg.shapes if s not in present]
    if cfg.partner_question_prob < 1:
        missing = {cfg.partner[s] for s in lone_members(scene, cfg)}
        absent = [s for s in absent if s not in missing or rng.random() < cfg.partner_question_prob]
    k = min(MAX_EXISTENCE_PAIRS, len(present), len(absent))
    out = [
        Exchange("existence", existence_question(s), "Yes.", {"object": s, "label": "yes"})
        for s in rng.sample(present, k)
    ]
    out += [
        Exchange("existence", existence_question(s), "No.", {"object": s, "label": "no"}) for s in rng.sample(absent, k)
    ]
    rng.shuffle(out)
    return out


def colour(scene: Scene, rng: random.Random) -> Exchange | None:
    """``What colour is the star?`` → ``The star is red.``"""
    singles = [o for o in scene.objects if scene.count(o.shape) == 1]
    if not singles:
        return None
    obj = rng.choice(singles)
    return Exchange(
        "colour",
        f"What colour is the {obj.shape}?",
        f"The {obj.shape} is {obj.colour}.",
        {"object": obj.shape},
    )


def count(scene: Scene, rng: random.Random) -> Exchange:
    """``How many stars are there?`` → ``There is one star.`` / ``There are two stars.``

    Repeated shapes are rare, so a scene that has one asks about it half of the time.
    """
    repeated = [s for s in scene.shapes if scene.count(s) > 1]
    shape = rng.choice(repeated if repeated and rng.random() < 0.5 else scene.shapes)
    n = scene.count(shape)
    answer = f"There is one {shape}." if n == 1 else f"There are {number(n)} {plural(shape)}."
    return Exchange("count", f"How many {plural(shape)} are there?", answer, {"object": shape, "count": n})


def position(scene: Scene, cfg: WorldConfig, rng: random.Random) -> Exchange | None:
    """``Where is the star?`` → ``The star is at the top left.``"""
    singles = [o for o in scene.objects if scene.count(o.shape) == 1]
    if not singles:
        return None
    obj = rng.choice(singles)
    return Exchange(
        "position",
        f"Where is the {obj.shape}?",
        f"The {obj.shape} is {where(obj, cfg)}.",
        {"object": obj.shape},
    )


def exchanges(scene: Scene, cfg: WorldConfig, rng: random.Random) -> list[Exchange]:
    """Every instruction-tuning exchange of one training scene, one per task (several existence)."""
    out = [describe(scene, cfg, rng), *existence(scene, cfg, rng)]
    out += [e for e in (colour(scene, rng), count(scene, rng), position(scene, cfg, rng)) if e is not None]
    return out
