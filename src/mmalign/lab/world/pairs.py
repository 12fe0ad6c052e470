"""Oracle preference pairs from the world's ground truth: a true caption against one with a planted error.

For each training scene the prompt is the eval describe request with the scene's image, the chosen reply
is the canonical ground-truth detailed caption, and the rejected reply is the caption of the same scene
with one error made on purpose:

- ``partner``: an object the image does not hold is added, namely the planted co-occurrence partner of a
  shape that appears without it (the hallucination the world's bias invites); a scene with no such lone
  pair member gets a random absent shape instead (``meta["source"]`` says which).
- ``attribute``: one object's colour (or, for a quarter of the pairs, its shape) is swapped.
- ``existence`` (not in the default kinds): a POPE-style question instead of the describe request. Half of them ask
  about an absent shape (a lone member's missing partner when there is one, else a random absent shape): chosen
  "No.", rejected "Yes."; the other half about a present shape: chosen "Yes.", rejected "No.", so that the pairs
  do not simply teach the model to say no.
- ``removed`` and ``removed_existence`` (counterfactual images; not in the default kinds): a scene holding both
  members of a planted pair is re-drawn without one of them, and the new image is written to
  ``images/pairs/<image id>-<pair number>.png`` in the world. ``removed``: the chosen reply is the new scene's
  caption, the rejected one the original scene's, which names the removed shape: exactly the hallucination the
  co-occurrence invites, on an image that shows the partner alone. ``removed_existence``: on the same kind of image,
  "Is there a <removed shape>?" (chosen "No.") or, half of the time, "Is there a <remaining partner>?" (chosen
  "Yes."). A scene without a complete pair falls back to ``partner`` / ``existence``.
- ``omission`` (not in the default kinds): every object of one shape the scene holds is left out of the rejected
  caption — a shorter caption that invents nothing but misses an object (what CHAIR's recall counts); a reward model
  trained with it cannot prefer a caption for being short. A scene of a single shape falls back to ``partner``.
- ``truncated`` (not in the default kinds): the true caption cut after a random number of its words (at least one,
  at most all but two): the degenerate short replies a policy trained against a reward model drifts to when no pair
  ever showed one (docs/results.md, RL on the world).
- ``prior_tail`` (not in the default kinds): the true caption against the same caption with one more sentence at
  its end naming an absent object (a lone member's partner when there is one, else a random absent shape), small,
  in a free cell: the late, prior-driven hallucination that ``WorldConfig.caption_prior_prob`` plants in training
  descriptions, in the form the SFT model writes it.

The rejected caption is regenerated from the altered scene, so it reads as fluently as the true one and
stays self-consistent (the object count in its first sentence includes the added object). Every choice
comes from a ``random.Random`` seeded by ``(seed, image id, pair number)``: same world and seed, same pairs.
"""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path
from typing import Any

from mmalign.data.preference import write_pairs
from mmalign.eval.coco_vocab import ChairVocab, extract_mentions
from mmalign.lab.world.config import WorldConfig, load_world_config
from mmalign.lab.world.qa import existence_question
from mmalign.lab.world.scenes import Scene, SceneObject, load_scenes, lone_members
from mmalign.lab.world.text import (
    detailed_caption,
    object_sentence,
    prior_tail,
    scene_facts,
    small_object_in_free_cell,
)
from mmalign.lab.world.writer import CHAIR_VOCAB_JSON, EVAL_DESCRIBE_PROMPT
from mmalign.types import ImageRef, Message, PreferencePair

KINDS: tuple[str, ...] = (
    "partner",
    "attribute",
    "existence",
    "removed",
    "removed_existence",
    "prior_tail",
    "partner_swap",
    "omission",
    "truncated",
)
COUNTERFACTUAL_DIR = "images/pairs"
DEFAULT_KINDS: tuple[str, ...] = ("partner", "attribute")
SHAPE_SWAP_PROB = 0.25  # share of attribute pairs that swap the shape rather than the colour


def world_pairs(
    world_dir: str | Path,
    *,
    seed: int = 0,
    per_scene: int = 1,
    kinds: tuple[str, ...] = DEFAULT_KINDS,
    max_scenes: int | None = None,
    processes: int = 1,
) -> list[PreferencePair]:
    """Oracle (chosen = truth, rejected = planted error) pairs over the training scenes of a written world.

    Args:
        world_dir: a directory written by ``write_world``.
        seed: seed of the choices (which object, which colour, where the added object goes).
        per_scene: pairs per scene; pair ``j`` of the ``i``-th scene has kind ``kinds[(i * per_scene + j) %
            len(kinds)]``, so kinds alternate evenly.
        kinds: error kinds to use, from ``KINDS``.
        max_scenes: only the first ``max_scenes`` training scenes (default: all).
        processes: render the counterfactual images (kinds ``removed*``) in this many processes (same bytes).

    Returns:
        The pairs, scene by scene; ``images`` hold the image path relative to ``root`` (the world): the scene's own
        image, or for ``removed*`` pairs the counterfactual image, rendered before this returns.

    Raises:
        ValueError: ``per_scene`` < 1, or ``kinds`` empty or holding an unknown kind.
        RuntimeError: a generated pair fails its own check (rejected equal to chosen, or an added object
            that CHAIR does not find as hallucinated): a bug in the world's captions.
    """
    if per_scene < 1:
        raise ValueError(f"per_scene must be at least 1, got {per_scene}")
    unknown = [k for k in kinds if k not in KINDS]
    if not kinds or unknown:
        raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {kinds}")
    world_dir = Path(world_dir).absolute()
    cfg = load_world_config(world_dir)
    vocab = ChairVocab.from_file(world_dir / CHAIR_VOCAB_JSON)
    pairs: list[PreferencePair] = []
    to_render: list[tuple[Scene, str]] = []
    for i, scene in enumerate(load_scenes(world_dir, "train")[:max_scenes]):
        chosen = detailed_caption(scene, cfg)
        for j in range(per_scene):
            kind = kinds[(i * per_scene + j) % len(kinds)]
            rng = random.Random(f"{seed}/pairs/{scene.image_id}/{j}")
            if kind.startswith("removed"):
                cut = _remove_partner(scene, cfg, rng)
                if cut is not None:
                    image = f"{COUNTERFACTUAL_DIR}/{scene.image_id}-{j}.png"
                    pairs.append(_removed_pair(scene, *cut, kind, image, cfg, rng, j, world_dir, vocab))
                    to_render.append((cut[0], image))
                    continue
                kind = "existence" if kind == "removed_existence" else "partner"
            if kind == "existence":
                pairs.append(_existence_pair(scene, cfg, rng, j, world_dir))
                continue
            if kind == "prior_tail" and len(scene.objects) >= cfg.grid_rows * cfg.grid_cols:
                kind = "attribute"  # no free cell to invent an object in
            if kind == "truncated" and len(chosen.split()) < 4:
                kind = "partner"  # too short to cut and leave at least one word
            if kind == "omission" and len(set(scene.shapes)) < 2:
                kind = "partner"  # nothing to leave out that would not empty the scene
            swapped = _swap_in_partner(scene, cfg, rng) if kind == "partner_swap" else None
            if kind == "partner_swap" and swapped is None:
                kind = "partner"  # nothing but the lone member to replace
            if swapped is not None:
                rejected, info = detailed_caption(swapped[0], cfg), swapped[1]
                _check(scene, chosen, rejected, "partner", info, vocab)
            elif kind == "truncated":
                words = chosen.split()
                kept = rng.randint(1, max(1, len(words) - 2))
                rejected, info = " ".join(words[:kept]), {"source": "truncated", "kept_words": kept}
                _check(scene, chosen, rejected, kind, info, vocab)
            elif kind == "omission":
                altered, info = _omit_shape(scene, rng)
                rejected = detailed_caption(altered, cfg)
                _check(scene, chosen, rejected, kind, info, vocab)
            elif kind == "prior_tail":
                rejected, info = _tail_caption(scene, chosen, cfg, rng)
                _check(scene, chosen, rejected, "partner", info, vocab)
            else:
                altered, info = (_add_object if kind == "partner" else _swap_attribute)(scene, cfg, rng)
                rejected = detailed_caption(altered, cfg)
                _check(scene, chosen, rejected, kind, info, vocab)
            pairs.append(
                PreferencePair(
                    id=f"{scene.image_id}-{kind}-{j}",
                    prompt=(Message.user(EVAL_DESCRIBE_PROMPT, images=1),),
                    chosen=chosen,
                    rejected=rejected,
                    images=(ImageRef(path=scene.image),),
                    root=str(world_dir),
                    objects=scene.shapes,
                    facts=scene_facts(scene, cfg),
                    chosen_critique=TRUE_CRITIQUE,
                    rejected_critique=critique(info),
                    meta={"method": "oracle", "kind": kind, **info, "image_id": scene.image_id},
                )
            )
    if to_render:
        from mmalign.lab.world.writer import render_images

        render_images(cfg, world_dir, to_render, processes=processes)
    return pairs


def write_world_pairs(world_dir: str | Path, out_path: str | Path, **kw: Any) -> int:
    """Write ``world_pairs(world_dir, **kw)`` with ``write_pairs``; returns the number of pairs.

    Put ``out_path`` inside ``world_dir`` (e.g. ``world/pairs.jsonl``) so that image paths stay relative;
    elsewhere they are written absolute and ``load_pairs`` needs ``root=world_dir``.
    """
    return write_pairs(world_pairs(world_dir, **kw), out_path)


def _existence_pair(scene: Scene, cfg: WorldConfig, rng: random.Random, j: int, world_dir: Path) -> PreferencePair:
    """A yes/no question about an absent shape (answer "No.") or a present one ("Yes.")."""
    present, lone = scene.shapes, lone_members(scene, cfg)
    absent = [s for s in cfg.shapes if s not in present]
    if rng.random() < 0.5 and absent:
        shape = cfg.partner[rng.choice(lone)] if lone else rng.choice(absent)
        label, info = "no", {"source": "partner" if lone else "random"}
    else:
        shape, label, info = rng.choice(present), "yes", {"source": "present"}
    chosen, rejected = ("No.", "Yes.") if label == "no" else ("Yes.", "No.")
    return PreferencePair(
        id=f"{scene.image_id}-existence-{j}",
        prompt=(Message.user(existence_question(shape), images=1),),
        chosen=chosen,
        rejected=rejected,
        images=(ImageRef(path=scene.image),),
        root=str(world_dir),
        objects=scene.shapes,
        facts=scene_facts(scene, cfg),
        meta={
            "method": "oracle",
            "kind": "existence",
            "object": shape,
            "label": label,
            **info,
            "image_id": scene.image_id,
        },
    )


def _remove_partner(scene: Scene, cfg: WorldConfig, rng: random.Random) -> tuple[Scene, dict[str, Any]] | None:
    """The scene without every object of one planted-pair member whose partner is also present (None if none)."""
    present = scene.shapes
    members = [s for s in present if s in cfg.partner and cfg.partner[s] in present]
    if not members:
        return None
    removed = rng.choice(members)
    kept = tuple(o for o in scene.objects if o.shape != removed)
    return replace(scene, objects=kept), {"inserted": removed, "source": "removed", "partner_of": cfg.partner[removed]}


def _removed_pair(
    scene: Scene,
    altered: Scene,
    info: dict[str, Any],
    kind: str,
    image: str,
    cfg: WorldConfig,
    rng: random.Random,
    j: int,
    world_dir: Path,
    vocab: ChairVocab,
) -> PreferencePair:
    """A pair on the counterfactual image of ``altered`` (the caller renders it to ``image``, a path in the world): a
    caption pair or a yes/no question."""
    if kind == "removed":
        prompt = Message.user(EVAL_DESCRIBE_PROMPT, images=1)
        chosen, rejected = detailed_caption(altered, cfg), detailed_caption(scene, cfg)
        _check(altered, chosen, rejected, "partner", info, vocab)
    elif rng.random() < 0.5:
        prompt, chosen, rejected = Message.user(existence_question(info["inserted"]), images=1), "No.", "Yes."
        info = {**info, "object": info["inserted"], "label": "no"}
    else:
        prompt, chosen, rejected = Message.user(existence_question(info["partner_of"]), images=1), "Yes.", "No."
        info = {**info, "object": info["partner_of"], "label": "yes"}
    return PreferencePair(
        id=f"{scene.image_id}-{kind}-{j}",
        prompt=(prompt,),
        chosen=chosen,
        rejected=rejected,
        images=(ImageRef(path=image),),
        root=str(world_dir),
        objects=altered.shapes,
        facts=scene_facts(altered, cfg),
        meta={"method": "oracle", "kind": kind, **info, "image_id": scene.image_id},
    )


def _add_object(scene: Scene, cfg: WorldConfig, rng: random.Random) -> tuple[Scene, dict[str, Any]]:
    """The scene plus one absent shape in a free cell: a lone member's partner when there is one."""
    present, lone = scene.shapes, lone_members(scene, cfg)
    if lone:
        member = rng.choice(lone)
        shape, info = cfg.partner[member], {"source": "partner", "partner_of": member}
    else:
        shape, info = rng.choice([s for s in cfg.shapes if s not in present]), {"source": "random"}
    taken = {(o.row, o.col) for o in scene.objects}
    free = [(r, c) for r in range(cfg.grid_rows) for c in range(cfg.grid_cols) if (r, c) not in taken]
    row, col = rng.choice(free)
    added = SceneObject(shape, rng.choice(list(cfg.colours)), rng.choice(list(cfg.sizes)), row, col)
    objects = sorted((*scene.objects, added), key=lambda o: (o.row, o.col))
    return replace(scene, objects=tuple(objects)), {"inserted": shape, **info}


def _omit_shape(scene: Scene, rng: random.Random) -> tuple[Scene, dict[str, Any]]:
    """The scene without every object of one of its shapes (the scene holds at least two shapes)."""
    shape = rng.choice(sorted(set(scene.shapes)))
    kept = tuple(o for o in scene.objects if o.shape != shape)
    return replace(scene, objects=kept), {"omitted": shape, "source": "omission"}


def _tail_caption(scene: Scene, chosen: str, cfg: WorldConfig, rng: random.Random) -> tuple[str, dict[str, Any]]:
    """The true caption with one more sentence naming an absent object (``prior_tail``; a random absent shape when
    the scene has no lone member)."""
    tail = prior_tail(scene, replace(cfg, caption_prior_min_objects=1), rng, force=True)
    info: dict[str, Any] = {"source": "partner", "partner_of": cfg.partner[tail.shape]} if tail else {}
    if tail is None:
        shape = rng.choice([s for s in cfg.shapes if s not in scene.shapes])
        tail, info = small_object_in_free_cell(scene, shape, cfg, rng), {"source": "random"}
    return f"{chosen} {object_sentence(tail, tail.shape, cfg, None)}", {"inserted": tail.shape, **info}


# Rule-written critiques of caption pairs (what a critique reward model learns to write before it scores): the true
# caption's, and one naming the hallucinated object or the wrong attribute, in the world's own words.
TRUE_CRITIQUE = "Every object in the description is in the image."


def critique(info: dict[str, Any]) -> str:
    """The critique of a rejected caption from its error record (``inserted``, ``attribute``, ``original``)."""
    if info.get("attribute") == "colour":
        return f"The {info['object']} is {info['original']}, not {info['inserted']}."
    if "omitted" in info:
        return f"The description misses the {info['omitted']}."
    if "kept_words" in info:
        return "The description stops before it names every object."
    return f"There is no {info['inserted']} in the image."


def _swap_in_partner(scene: Scene, cfg: WorldConfig, rng: random.Random) -> tuple[Scene, dict[str, Any]] | None:
    """The scene with one object turned into an absent shape — a lone member's planted partner when there is one —
    at the same place, colour and size: a caption of the same length that names what is not there (None when only
    the lone member could be replaced). Objects whose shape is unique are replaced first (a local edit)."""
    present, lone = scene.shapes, lone_members(scene, cfg)
    absent = [s for s in cfg.shapes if s not in present]
    if not lone and not absent:
        return None
    member = rng.choice(lone) if lone else None
    shape = cfg.partner[member] if member else rng.choice(absent)
    others = [i for i, o in enumerate(scene.objects) if o.shape != member]
    singles = [i for i in others if scene.count(scene.objects[i].shape) == 1]
    if not others:
        return None
    index = rng.choice(singles or others)
    obj = scene.objects[index]
    objects = (*scene.objects[:index], replace(obj, shape=shape), *scene.objects[index + 1 :])
    info = {"inserted": shape, "original": obj.shape, "source": "partner" if member else "random"}
    return replace(scene, objects=objects), {**info, **({"partner_of": member} if member else {})}


def _swap_attribute(scene: Scene, cfg: WorldConfig, rng: random.Random) -> tuple[Scene, dict[str, Any]]:
    """The scene with one object's colour (or shape) changed; objects whose shape is unique come first.

    A unique shape keeps the error local: changing one of two red stars would also rewrite "two red stars".
    """
    singles = [i for i, o in enumerate(scene.objects) if scene.count(o.shape) == 1]
    index = rng.choice(singles or range(len(scene.objects)))
    obj = scene.objects[index]
    if rng.random() < SHAPE_SWAP_PROB:
        shape = rng.choice([s for s in cfg.shapes if s not in scene.shapes])
        new, info = replace(obj, shape=shape), {"attribute": "shape", "original": obj.shape, "inserted": shape}
    else:
        colour = rng.choice([c for c in cfg.colours if c != obj.colour])
        new, info = replace(obj, colour=colour), {"attribute": "colour", "original": obj.colour, "inserted": colour}
    objects = (*scene.objects[:index], new, *scene.objects[index + 1 :])
    return replace(scene, objects=objects), {"object": obj.shape, **info}


def _check(scene: Scene, chosen: str, rejected: str, kind: str, info: dict[str, Any], vocab: ChairVocab) -> None:
    """The rejected caption differs; in partner pairs CHAIR sees the added shape as hallucinated, in omission pairs
    the rejected caption names only present shapes and not the omitted one."""
    if rejected == chosen:
        raise RuntimeError(f"{scene.image_id}: the {kind} error left the caption unchanged")
    if kind == "omission":
        mentioned = set(extract_mentions(rejected, vocab))
        if info["omitted"] in mentioned or not mentioned <= set(scene.shapes):
            raise RuntimeError(f"{scene.image_id}: {rejected!r} names {info['omitted']!r} or an absent shape")
    if kind == "partner":
        mentioned = set(extract_mentions(rejected, vocab))
        inserted = info["inserted"]
        if inserted not in mentioned or inserted in scene.shapes:
            raise RuntimeError(f"{scene.image_id}: CHAIR does not see {inserted!r} as hallucinated in {rejected!r}")
