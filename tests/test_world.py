"""Tests of the synthetic scene world: determinism, planted bias, eval split, POPE, rendering, text."""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmalign.lab.world import (
    POPE_SPLITS,
    WorldConfig,
    chair_vocab,
    cooccurrence_matrix,
    detailed_caption,
    load_scenes,
    load_world_config,
    object_frequency,
    pope_questions,
    render_scene,
    sample_scenes,
    short_caption,
    write_world,
)
from mmalign.lab.world.qa import exchanges, existence_question
from mmalign.lab.world.scenes import Scene, SceneObject
from mmalign.lab.world.text import article, caption, plural, position_phrase

SMALL = WorldConfig(n_train=60, n_eval=30, seed=3)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("world")
    write_world(SMALL, out, progress=False)
    return out


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def mentions(text: str, vocab: dict[str, list[str]]) -> list[tuple[str, str]]:
    """``(term, canonical shape)`` for each mention in ``text``, multi-word terms first (as CHAIR does)."""
    words = re.findall(r"[a-z]+", text.lower())
    terms = sorted(
        ((tuple(term.split()), shape) for shape, terms in vocab.items() for term in terms),
        key=lambda t: -len(t[0]),
    )
    found, i = [], 0
    while i < len(words):
        for term, shape in terms:
            if tuple(words[i : i + len(term)]) == term:
                found.append((" ".join(term), shape))
                i += len(term)
                break
        else:
            i += 1
    return found


# --- config -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"pairs": (("star", "sun"),)}, "unknown shape 'sun'"),
        ({"pairs": (("star", "moon"), ("moon", "heart"))}, "more than one pair"),
        ({"pairs": (("star", "star"),)}, "with itself"),
        ({"image_size": 31}, "32 to 1024"),
        ({"image_size": 1025}, "32 to 1024"),
        ({"pair_prob": 1.5}, "pair_prob"),
        ({"synonym_prob": 0.5}, "at most 0.2"),
        ({"min_objects": 3, "max_objects": 2}, "min_objects"),
        ({"max_objects": 10}, "grid cells"),
        ({"shapes": ("circle", "hexagon")}, "no renderer"),
        ({"shapes": ("circle", "square", "star", "moon")}, "too few"),
        ({"colours": {"red": (300, 0, 0), "blue": (0, 0, 255)}}, "colours"),
        ({"n_train": -1}, "n_train"),
        ({"caption_order": "random"}, "caption_order"),
        ({"partner_question_prob": -0.1}, "partner_question_prob"),
        ({"partner_small_prob": 2.0}, "partner_small_prob"),
    ],
)
def test_config_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        WorldConfig(**kwargs)


def test_config_round_trip(world: Path) -> None:
    assert WorldConfig.from_dict(SMALL.to_dict()) == SMALL
    assert load_world_config(world) == SMALL
    with pytest.raises(ValueError, match="unknown WorldConfig keys: colors"):
        WorldConfig.from_dict({"colors": {}})


# --- writer -------------------------------------------------------------------------------------


def all_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_write_is_deterministic(tmp_path: Path, world: Path) -> None:
    write_world(SMALL, tmp_path / "a", progress=False)
    first = all_bytes(tmp_path / "a")
    assert first == all_bytes(world)
    assert not any(name.endswith(".tmp") for name in first)

    write_world(replace(SMALL, seed=4), tmp_path / "b", progress=False)
    other = all_bytes(tmp_path / "b")
    assert other.keys() == first.keys()
    assert other["scenes.jsonl"] != first["scenes.jsonl"]
    assert other["images/train/000000.png"] != first["images/train/000000.png"]


def test_rendering_in_two_processes_writes_the_same_bytes(tmp_path: Path) -> None:
    cfg = replace(SMALL, n_train=700, n_eval=20)  # two chunks of scenes
    write_world(cfg, tmp_path / "one", progress=False)
    write_world(cfg, tmp_path / "two", progress=False, processes=2)
    assert all_bytes(tmp_path / "one") == all_bytes(tmp_path / "two")


def test_layout_and_schemas(tmp_path: Path) -> None:
    summary = write_world(SMALL, tmp_path, progress=False)
    assert (summary.n_train, summary.n_eval) == (60, 30)
    info = json.loads(summary.world_json.read_text())
    assert info["counts"] == {"train": 60, "eval": 30}
    assert info["pairs"] == [["star", "moon"], ["heart", "cross"]]
    assert sum(map(sum, info["cooccurrence"]["counts"])) > 0

    scenes = read_jsonl(summary.scenes)
    assert [s["image_id"] for s in scenes[:2]] == ["train-000000", "train-000001"]
    assert scenes[60]["image"] == "images/eval/000000.png"
    assert all((tmp_path / s["image"]).is_file() for s in scenes)

    for path, n in ((summary.captions, 60), (summary.eval_describe, 30)):
        assert len(read_jsonl(path)) == n
    sft = read_jsonl(summary.sft)
    assert len(sft) == summary.n_sft and len({r["id"] for r in sft}) == len(sft)
    row = sft[0]
    assert set(row) == {"id", "images", "messages", "meta"}
    assert row["messages"][0]["content"][0] == {"type": "image"}
    assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
    assert {"image_id", "task", "objects"} <= set(row["meta"])

    describe = read_jsonl(summary.eval_describe)[0]
    assert describe["messages"][0]["content"][1]["text"] == "Describe the image in detail."
    assert describe["meta"]["objects"] == read_jsonl(summary.chair_annotations)[0]["objects"]

    for split, path in summary.pope.items():
        rows = read_jsonl(path)
        assert [r["question_id"] for r in rows] == list(range(1, len(rows) + 1))
        assert {r["category"] for r in rows} == {split}
        assert set(rows[0]) == {"question_id", "image", "text", "label", "category", "object", "image_id"}
    assert set(json.loads(summary.chair_vocab.read_text())["synonyms"]) == set(SMALL.shapes)
    assert [s.image_id for s in load_scenes(tmp_path, "eval")][:1] == ["eval-000000"]


# --- scenes -------------------------------------------------------------------------------------


@pytest.mark.parametrize("pair_prob", [0.9, 0.5])
def test_training_scenes_plant_the_pairs(pair_prob: float) -> None:
    cfg = WorldConfig(n_train=1000, pair_prob=pair_prob, seed=1)
    scenes = sample_scenes(cfg, "train")
    m = cooccurrence_matrix(scenes, cfg.shapes)
    index = {s: i for i, s in enumerate(cfg.shapes)}
    for pair in cfg.pairs:
        for a, b in (pair, pair[::-1]):
            rate = m[index[a]][index[b]] / m[index[a]][index[a]]
            assert abs(rate - pair_prob) < 0.05, (a, b, rate)
    for scene in scenes:
        cells = [(o.row, o.col) for o in scene.objects]
        assert len(set(cells)) == len(cells) and cells == sorted(cells)
        assert cfg.min_objects <= len(scene.objects) <= cfg.max_objects
        assert max(Counter(o.shape for o in scene.objects).values()) <= 2
    repeated = sum(len(s.shapes) < len(s.objects) for s in scenes) / len(scenes)
    assert 0.0 < repeated < 0.2


@pytest.mark.parametrize("small_prob", [0.0, 1.0])
def test_brought_partners_are_small_with_partner_small_prob(small_prob: float) -> None:
    cfg = WorldConfig(n_train=1500, seed=4, partner_small_prob=small_prob)
    both = []
    for scene in sample_scenes(cfg, "train"):
        for pair in cfg.pairs:
            objs = [o for o in scene.objects if o.shape in pair]
            if {o.shape for o in objs} == set(pair):
                both.append(any(o.size == "small" for o in objs))
    # One member of every pair that appears together was brought by the other: with probability 1 it is small;
    # with 0 sizes are uniform, and at least one of two objects is small 3 times in 4.
    rate = sum(both) / len(both)
    assert len(both) > 300
    assert rate == 1.0 if small_prob == 1.0 else abs(rate - 0.75) < 0.06
    # The knob changes sizes only: the same shapes and cells are drawn either way.
    plain = sample_scenes(replace(cfg, partner_small_prob=0.0), "train")
    assert [s.shapes for s in plain] == [s.shapes for s in sample_scenes(cfg, "train")]


def test_partner_size_is_drawn_for_brought_partners_only() -> None:
    sizes = {"small": 0.45, "large": 0.85, "tiny": 0.2}
    cfg = WorldConfig(n_train=1500, n_eval=200, seed=4, sizes=sizes, partner_size="tiny", partner_small_prob=1.0)
    tiny_shapes = Counter()
    together = 0
    for scene in sample_scenes(cfg, "train"):
        for obj in scene.objects:
            if obj.size == "tiny":
                tiny_shapes[obj.shape] += 1
                # Only a partner whose member is in the scene is ever tiny.
                assert cfg.partner[obj.shape] in scene.shapes
        together += sum(set(pair) <= set(scene.shapes) for pair in cfg.pairs)
    assert set(tiny_shapes) <= set(cfg.partner) and sum(tiny_shapes.values()) >= 0.95 * together > 300
    # Eval scenes break the pairs, so nothing there is tiny; other objects keep the two ordinary sizes.
    assert {o.size for s in sample_scenes(cfg, "eval") for o in s.objects} == {"small", "large"}
    with pytest.raises(ValueError, match="partner_size"):
        WorldConfig(partner_size="huge")


def test_eval_scenes_break_the_pairs() -> None:
    cfg = WorldConfig(n_eval=400, seed=2)
    partner = cfg.partner
    for scene in sample_scenes(cfg, "eval"):
        shapes = set(scene.shapes)
        assert not any(a in shapes and b in shapes for a, b in cfg.pairs)
        assert any(s in partner and partner[s] not in shapes for s in shapes)


def test_frequency_counts_images() -> None:
    objs = (SceneObject("star", "red", "small", 0, 0), SceneObject("star", "blue", "small", 0, 1))
    scenes = [Scene("train", 0, objs), Scene("train", 1, objs[:1])]
    assert object_frequency(scenes, ("star", "moon")) == {"star": 2, "moon": 0}
    assert cooccurrence_matrix(scenes, ("star", "moon")) == [[2, 0], [0, 0]]


# --- POPE ---------------------------------------------------------------------------------------


def test_pope_sets_follow_pope() -> None:
    cfg = WorldConfig(n_train=600, n_eval=200, seed=5)
    train, evals = sample_scenes(cfg, "train"), sample_scenes(cfg, "eval")
    freq, cooc = object_frequency(evals, cfg.shapes), cooccurrence_matrix(train, cfg.shapes)
    by_id = {s.image_id: s for s in evals}
    for split in POPE_SPLITS:
        rows = pope_questions(evals, cfg, split, freq, cooc)
        assert Counter(r["label"] for r in rows)["yes"] * 2 == len(rows)
        per_image: dict[str, list[dict]] = {}
        for r in rows:
            per_image.setdefault(r["image_id"], []).append(r)
            assert r["text"] == existence_question(r["object"])
        assert per_image.keys() == by_id.keys()
        for image_id, qs in per_image.items():
            scene = by_id[image_id]
            k = min(3, len(scene.shapes))
            assert [q["label"] for q in qs] == ["yes", "no"] * k
            assert [q["object"] for q in qs[::2]] == list(scene.shapes[:k])
            negatives = [q["object"] for q in qs[1::2]]
            assert len(set(negatives)) == k and not set(negatives) & set(scene.shapes)
            if split == "popular":
                absent = [s for s in cfg.shapes if s not in scene.shapes]
                assert min(freq[s] for s in negatives) >= max(freq[s] for s in absent if s not in negatives)


def test_adversarial_negatives_are_the_missing_partners() -> None:
    cfg = WorldConfig(n_train=600, n_eval=200, seed=6)
    train, evals = sample_scenes(cfg, "train"), sample_scenes(cfg, "eval")
    rows = pope_questions(
        evals, cfg, "adversarial", object_frequency(evals, cfg.shapes), cooccurrence_matrix(train, cfg.shapes)
    )
    partner, n_neg, n_partner, n_missing, n_found = cfg.partner, 0, 0, 0, 0
    for scene in evals:
        qs = [r for r in rows if r["image_id"] == scene.image_id]
        positives = [q["object"] for q in qs if q["label"] == "yes"]
        negatives = {q["object"] for q in qs if q["label"] == "no"}
        missing = {partner[s] for s in positives if s in partner and partner[s] not in scene.shapes}
        if missing:
            n_neg += len(negatives)
            n_partner += len(negatives & missing)
            n_missing += len(missing)
            n_found += len(missing & negatives)
    assert n_missing > 100
    assert n_found == n_missing
    assert n_partner / n_neg > 0.5


# --- rendering ----------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [64, 336])
def test_render_puts_each_colour_in_its_cell(size: int) -> None:
    cfg = WorldConfig(image_size=size, n_train=40, seed=7)
    palette = np.array(list(cfg.colours.values()), dtype=int)
    for scene in sample_scenes(cfg, "train"):
        image = render_scene(scene, cfg)
        assert image.size == (size, size) and image.mode == "RGB"
        pixels = np.asarray(image, dtype=int)
        occupied = {(o.row, o.col): o for o in scene.objects}
        for row in range(3):
            for col in range(3):
                cell = pixels[row * size // 3 : (row + 1) * size // 3, col * size // 3 : (col + 1) * size // 3]
                near = np.abs(cell[:, :, None, :] - palette[None, None]).max(-1) <= 12
                if (row, col) in occupied:
                    want = list(cfg.colours).index(occupied[row, col].colour)
                    assert near[:, :, want].sum() >= 4, (scene.image_id, occupied[row, col])
                else:
                    assert not near.any(), (scene.image_id, row, col)


@pytest.mark.parametrize("size", ["small", "large"])
def test_shapes_are_distinct_at_64px(size: str) -> None:
    """Soft masks (0 = background, 1 = fill) of every two shapes overlap by less than 90% (IoU)."""
    cfg = WorldConfig()
    fill = np.array(cfg.colours["blue"], dtype=float)
    masks = {}
    for shape in cfg.shapes:
        scene = Scene("train", 0, (SceneObject(shape, "blue", size, 1, 1),))
        pixels = np.asarray(render_scene(scene, cfg), dtype=float)
        bg = pixels[0, 0]
        masks[shape] = np.clip((pixels - bg) @ (fill - bg) / ((fill - bg) @ (fill - bg)), 0, 1)
    for i, a in enumerate(cfg.shapes):
        for b in cfg.shapes[i + 1 :]:
            iou = np.minimum(masks[a], masks[b]).sum() / np.maximum(masks[a], masks[b]).sum()
            assert iou < 0.9, (a, b, iou)


def test_written_images_decode(world: Path) -> None:
    image = Image.open(world / "images" / "eval" / "000000.png")
    assert image.size == (64, 64) and image.mode == "RGB"


# --- text ---------------------------------------------------------------------------------------


def test_captions_mention_exactly_the_scene_shapes() -> None:
    cfg = WorldConfig(n_train=300, seed=8)
    vocab = chair_vocab(cfg)["synonyms"]
    found: list[tuple[str, str]] = []
    for scene in sample_scenes(cfg, "train"):
        rng = random.Random(scene.image_id)
        texts = [
            short_caption(scene, cfg, rng),
            detailed_caption(scene, cfg, rng),
            caption(scene, cfg, rng),
            detailed_caption(scene, cfg),
        ]
        for text in texts:
            assert text.endswith(".") and text[0].isupper(), text
            terms = mentions(text, vocab)
            assert {shape for _, shape in terms} == set(scene.shapes), text
            found += terms
    n_synonyms = sum(term not in (shape, plural(shape)) for term, shape in found)
    assert 0 < n_synonyms / len(found) <= 0.2


def test_detailed_caption_reads_in_order() -> None:
    cfg = WorldConfig()
    scene = Scene(
        "eval",
        0,
        (
            SceneObject("star", "red", "large", 0, 0),
            SceneObject("moon", "blue", "small", 1, 1),
            SceneObject("star", "orange", "small", 2, 1),
        ),
    )
    assert detailed_caption(scene, cfg) == (
        "There are three objects. A large red star is at the top left. A small blue moon is in the center. "
        "A small orange star is at the bottom."
    )
    assert short_caption(scene, cfg) == "Two stars and a blue moon."


def test_grouped_order_puts_the_partner_right_after_its_member() -> None:
    cfg = WorldConfig(caption_order="grouped")
    scene = Scene(
        "train",
        0,
        (
            SceneObject("star", "red", "large", 0, 0),
            SceneObject("circle", "green", "small", 0, 2),
            SceneObject("moon", "blue", "small", 1, 1),
            SceneObject("star", "orange", "small", 2, 1),
        ),
    )
    assert detailed_caption(scene, cfg) == (
        "There are four objects. A large red star is at the top left. A small blue moon is in the center. "
        "A small green circle is at the top right. A small orange star is at the bottom."
    )
    assert short_caption(scene, cfg) == "Two stars, a blue moon and a green circle."
    # Reading order (the default) keeps row-major order.
    assert short_caption(scene, WorldConfig()) == "Two stars, a green circle and a blue moon."
    # Over many scenes, every caption names each present partner right after its member's first mention.
    cfg = WorldConfig(n_train=300, seed=8, caption_order="grouped", synonym_prob=0.0)
    shape_words = re.compile("|".join(sorted((w for s in cfg.shapes for w in (plural(s), s)), key=len, reverse=True)))
    singular = {plural(s): s for s in cfg.shapes}
    n_pairs = 0
    for scene in sample_scenes(cfg, "train"):
        for text in (short_caption(scene, cfg), detailed_caption(scene, cfg).split(". ", 1)[1]):
            named = [singular.get(w, w) for w in shape_words.findall(text)]
            for a, b in cfg.pairs:
                if a in scene.shapes and b in scene.shapes:
                    first = min(named.index(a), named.index(b))
                    assert {named[first], named[first + 1]} == {a, b}, text
                    n_pairs += 1
    assert n_pairs > 100


def test_words() -> None:
    assert (article("orange"), article("red")) == ("an", "a")
    assert (plural("cross"), plural("box"), plural("star")) == ("crosses", "boxes", "stars")
    assert existence_question("heart") == "Is there a heart in the image?"
    assert (position_phrase("center"), position_phrase("top left")) == ("in the center", "at the top left")
    assert chair_vocab(WorldConfig())["synonyms"]["moon"][:2] == ["moon", "crescent"]


def test_sft_questions_match_the_ground_truth(world: Path) -> None:
    scenes = {s.image_id: s for s in load_scenes(world, "train")}
    rows = read_jsonl(world / "sft.jsonl")
    tasks = Counter(r["meta"]["task"] for r in rows)
    assert tasks["describe"] + tasks["describe_detailed"] == len(scenes)
    assert min(tasks["colour"], tasks["count"], tasks["position"]) > 0.8 * len(scenes)
    labels = []
    for r in rows:
        scene, meta = scenes[r["meta"]["image_id"]], r["meta"]
        answer = r["messages"][1]["content"][0]["text"]
        if meta["task"] == "existence":
            present = meta["object"] in scene.shapes
            assert answer == ("Yes." if present else "No.") and meta["label"] == ("yes" if present else "no")
            labels.append(meta["label"])
        elif meta["task"] in ("colour", "position"):
            assert scene.count(meta["object"]) == 1
        elif meta["task"] == "count":
            assert meta["count"] == scene.count(meta["object"]) >= 1
    assert 0.45 <= labels.count("yes") / len(labels) <= 0.55


@pytest.mark.parametrize("question_prob", [1.0, 0.0])
def test_partner_question_prob_sets_how_often_a_missing_partner_is_asked(question_prob: float) -> None:
    cfg = WorldConfig(n_train=800, seed=9, partner_question_prob=question_prob)
    asked = lone = 0
    for scene in sample_scenes(cfg, "train"):
        missing = {cfg.partner[s] for s in scene.shapes if s in cfg.partner} - set(scene.shapes)
        if not missing:
            continue
        lone += 1
        exs = exchanges(scene, cfg, random.Random(scene.image_id))
        negatives = [e.meta["object"] for e in exs if e.task == "existence" and e.meta["label"] == "no"]
        asked += any(e in missing for e in negatives)
    assert lone > 50
    # Uniform negatives ask about a missing partner in a good share of the scenes that lack one; 0 never does.
    assert asked == 0 if question_prob == 0.0 else asked / lone > 0.2


def test_caption_prior_prob_ends_busy_training_descriptions_with_an_absent_partner() -> None:
    """With the knob at 1, every detailed description of a scene with ≥ 3 objects and a lone pair member names one
    object more than the scene holds, last, and it is that member's missing partner; with the knob at 0.5 about half
    do; at 0 none (and the captions are those of a config without the knob); ground-truth captions never do."""
    from mmalign.lab.world.scenes import lone_members

    base = WorldConfig(n_train=600, seed=4, caption_order="grouped")
    vocab = chair_vocab(base)["synonyms"]
    scenes = sample_scenes(base, "train")
    eligible = [s for s in scenes if lone_members(s, base) and len(s.objects) >= 3]
    assert len(eligible) > 20
    rates = {}
    for prob in (0.0, 0.5, 1.0):
        cfg = replace(base, caption_prior_prob=prob)
        invented = 0
        for scene in scenes:
            text = detailed_caption(scene, cfg, random.Random(scene.image_id))
            if prob == 0.0:
                assert text == detailed_caption(scene, base, random.Random(scene.image_id))
            shapes = [shape for _, shape in mentions(text, vocab)]
            extra = set(shapes) - set(scene.shapes)
            assert detailed_caption(scene, cfg) == detailed_caption(scene, base)  # the ground truth stays true
            if scene not in eligible:
                assert not extra, text
                continue
            if extra:
                (shape,) = extra
                assert shape in {cfg.partner[m] for m in lone_members(scene, cfg)}
                assert shapes[-1] == shape and text.count(".") == len(scene.objects) + 2, text
                invented += 1
        rates[prob] = invented / len(eligible)
    assert rates[0.0] == 0.0 and rates[1.0] == 1.0
    assert 0.35 < rates[0.5] < 0.65
    with pytest.raises(ValueError, match="caption_prior_prob"):
        WorldConfig(caption_prior_prob=1.5)
    with pytest.raises(ValueError, match="caption_prior_min_objects"):
        WorldConfig(caption_prior_min_objects=0)


def test_open_intro_neither_counts_nor_lists_the_objects() -> None:
    """``detailed_intro="open"``: the first sentence is a fixed opener without a number or a shape name, and one
    sentence per object follows, so the description alone says how many objects there are."""
    from mmalign.lab.world.text import OPEN_INTRO_TEMPLATES

    cfg = WorldConfig(n_train=50, seed=2, caption_order="grouped", detailed_intro="open")
    vocab = chair_vocab(cfg)["synonyms"]
    for scene in sample_scenes(cfg, "train"):
        text = detailed_caption(scene, cfg, random.Random(scene.image_id))
        first, _, rest = text.partition(". ")
        assert first + "." in OPEN_INTRO_TEMPLATES
        assert not mentions(first, vocab)
        assert text.count(".") == len(scene.objects) + 1
        assert sorted(shape for _, shape in mentions(rest, vocab)) == sorted(o.shape for o in scene.objects)
    assert detailed_caption(scene, cfg).startswith(OPEN_INTRO_TEMPLATES[0])
    with pytest.raises(ValueError, match="detailed_intro"):
        WorldConfig(detailed_intro="summary")
