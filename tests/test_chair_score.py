"""CHAIR: singularising, the word matcher, hand-computed metrics, file readers and their errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmalign.errors import DataError
from mmalign.eval.chair_score import (
    chair_markdown_table,
    chair_words,
    read_chair_synonyms,
    read_reference_caption_objects,
    score_chair,
    score_chair_files,
    word_tokenize,
)
from mmalign.eval.coco_vocab import COCO_SYNONYMS, ChairVocab, extract_mentions, singularize, tokenize
from mmalign.eval.io import read_captions, read_object_annotations

COCO = ChairVocab.coco()
WORLD_VOCAB = {"synonyms": {"moon": ["moon", "moons", "crescent"], "cross": ["cross", "plus", "plus sign"]}}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    ("plural", "singular"),
    [
        ("dogs", "dog"), ("people", "person"), ("women", "woman"), ("children", "child"), ("mice", "mouse"),
        ("teeth", "tooth"), ("feet", "foot"), ("geese", "goose"), ("policemen", "policeman"),
        ("ponies", "pony"), ("cookies", "cookie"), ("knives", "knife"), ("gloves", "glove"),
        ("boxes", "box"), ("benches", "bench"), ("toothbrushes", "toothbrush"), ("buses", "bus"),
        ("glasses", "glass"), ("horses", "horse"), ("tomatoes", "tomato"), ("shoes", "shoe"),
        ("skis", "ski"), ("tvs", "tv"),
        ("glass", "glass"), ("bus", "bus"), ("grass", "grass"), ("tennis", "tennis"), ("plus", "plus"),
        ("species", "species"), ("this", "this"), ("sheep", "sheep"), ("dog", "dog"), ("2", "2"),
    ],
)  # fmt: skip
def test_singularize(plural: str, singular: str) -> None:
    assert singularize(plural) == singular


def test_tokenize_keeps_words_and_drops_possessives() -> None:
    words = tokenize("The dog's ball, isn't it? 2 T-shirts!")
    assert words == ["the", "dog", "ball", "isn't", "it", "2", "t", "shirts"]


def test_coco_vocab_has_the_80_categories() -> None:
    assert len(COCO.categories) == 80 == len(COCO_SYNONYMS)
    assert all(COCO.canonical(c) == c for c in COCO.categories)
    assert COCO.canonical("Motorbikes") == "motorcycle"
    assert COCO.canonical("dining tables") == "dining table"
    assert COCO.canonical("spaceship") is None


@pytest.mark.parametrize(
    ("caption", "mentions"),
    [
        ("A man and two women walk their dogs past several people.", ["person", "person", "dog", "person"]),
        ("A sofa, a television and a motorbike.", ["couch", "tv", "motorcycle"]),
        ("A plane, a jet and an aircraft.", ["airplane", "airplane", "airplane"]),
        ("A phone on the table.", ["cell phone", "dining table"]),
        ("a traffic light and a hot dog", ["traffic light", "hot dog"]),
        ("Two hot dogs next to teddy bears.", ["hot dog", "teddy bear"]),
        ("A baby elephant follows an adult giraffe.", ["elephant", "giraffe"]),
        ("A baby in a crib.", ["person"]),
        ("The toilet seat is up.", ["toilet"]),
        ("A toilet next to a seat.", ["toilet"]),
        ("A seat by the window.", ["chair"]),
        ("A passenger train and a passenger jet.", ["train", "airplane"]),
        ("A microwave oven above the stove.", ["microwave", "oven"]),
        ("Skis lean on a bus parked on the grass by a glass door.", ["skis", "bus"]),
        ("A glass of wine.", ["wine glass"]),
        ("Cars wait at the train tracks.", ["car"]),
    ],
)
def test_extract_mentions(caption: str, mentions: list[str]) -> None:
    assert extract_mentions(caption, COCO) == mentions


def test_world_vocab_from_json(tmp_path: Path) -> None:
    """Plural forms are found by singularising; "plus sign" is one mention of "cross", not two."""
    path = tmp_path / "chair_vocab.json"
    path.write_text(json.dumps(WORLD_VOCAB))
    vocab = ChairVocab.from_file(path)
    assert vocab.categories == ("moon", "cross")
    caption = "Two moons above a plus sign, a crescent, and crosses; a dog."
    assert extract_mentions(caption, vocab) == ["moon", "cross", "moon", "cross"]


def test_vocab_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'plus' is listed under both 'cross' and 'add'"):
        ChairVocab.from_synonyms({"cross": ["plus"], "add": ["plus"]})
    path = tmp_path / "vocab.json"
    path.write_text(json.dumps({"synonyms": {"moon": "crescent"}}))
    with pytest.raises(DataError) as info:
        ChairVocab.from_file(path)
    assert str(info.value) == f"{path} field 'synonyms.moon': expected a list of strings"


GROUND_TRUTH = {
    "1": {"person", "dog", "frisbee"},
    "2": {"cat", "couch", "tv"},
    "3": {"car", "bus", "traffic light", "person"},
}
CAPTIONS = {
    "1": "A man throws a frisbee to his dog while a woman watches.",
    "2": "A cat sleeps on a sofa next to a laptop and another laptop.",
    "3": "Cars and a bus wait at a traffic light near a dog.",
}


def test_score_chair_by_hand() -> None:
    """Three captions against hand-written ground truth.

    1: person (man), frisbee, dog, person (woman): 4 mentions, 0 hallucinated; correct {person, frisbee, dog}
       = 3 of 3 GT; 12 words.
    2: cat, couch (sofa), laptop, laptop: 4 mentions, 2 hallucinated (laptop twice); correct {cat, couch}
       = 2 of 3 GT; 13 words.
    3: car (cars), bus, traffic light, dog: 4 mentions, 1 hallucinated (dog); correct
       {car, bus, traffic light} = 3 of 4 GT; 12 words.
    CHAIR_i = (0+2+1)/(4+4+4) = 3/12 = 0.25; CHAIR_s = 2/3 (captions 2 and 3);
    recall = (3+2+3)/(3+3+4) = 8/10 = 0.8; mean length = (12+13+12)/3 = 37/3.
    """
    out = score_chair(CAPTIONS, GROUND_TRUTH, COCO)
    assert out["chair_i"] == pytest.approx(0.25)
    assert out["chair_s"] == pytest.approx(2 / 3)
    assert out["recall"] == pytest.approx(0.8)
    assert out["mean_length"] == pytest.approx(37 / 3)
    assert (out["n"], out["n_mentions"], out["n_hallucinated"]) == (3, 12, 3)
    assert list(out["hallucinated_objects"].items()) == [("laptop", 2), ("dog", 1)]
    assert out["per_caption"][1] == {
        "image_id": "2",
        "mentioned": ["cat", "couch", "laptop"],
        "hallucinated": ["laptop"],
        "recall": pytest.approx(2 / 3),
        "n_mentions": 4,
        "n_hallucinated": 2,
        "n_truth": 3,
        "n_correct": 2,
        "n_words": 13,
    }
    counts = [
        (c["n_mentions"], c["n_hallucinated"], c["n_truth"], c["n_correct"], c["n_words"]) for c in out["per_caption"]
    ]
    assert counts == [(4, 0, 3, 3, 12), (4, 2, 3, 2, 13), (4, 1, 4, 3, 12)]


def test_score_chair_empty_and_missing_ground_truth() -> None:
    assert score_chair({}, {}, COCO)["chair_i"] == 0.0
    assert score_chair({"9": "A red wall."}, {"9": set()}, COCO)["recall"] == 0.0
    with pytest.raises(DataError, match='image_id "4" has no ground truth'):
        score_chair({"4": "A dog."}, GROUND_TRUTH, COCO)
    with pytest.raises(DataError, match='unknown category "spaceship"'):
        score_chair({"1": "A dog."}, {"1": ["spaceship"]}, COCO)


def test_chair_markdown_table() -> None:
    lines = chair_markdown_table(score_chair(CAPTIONS, GROUND_TRUTH, COCO)).splitlines()
    assert lines[0] == "| CHAIR_s | CHAIR_i | recall | mean length | captions | mentions |"
    assert lines[2] == "| 66.67 | 25.00 | 80.00 | 12.3 | 3 | 12 |"


def coco_instances(path: Path) -> Path:
    """Image 1: two people and a dog; image 2: a potted plant; image 3: nothing."""
    doc = {
        "images": [{"id": 1}, {"id": 2}, {"id": 3}],
        "categories": [
            {"id": 1, "name": "person"},
            {"id": 18, "name": "dog"},
            {"id": 64, "name": "potted plant"},
        ],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 1},
            {"id": 11, "image_id": 1, "category_id": 18},
            {"id": 12, "image_id": 2, "category_id": 64},
            {"id": 13, "image_id": 1, "category_id": 1},
        ],
    }
    path.write_text(json.dumps(doc))
    return path


def test_read_coco_instances(tmp_path: Path) -> None:
    truth = read_object_annotations(coco_instances(tmp_path / "instances_val2014.json"), COCO)
    assert truth == {"1": {"person", "dog"}, "2": {"potted plant"}, "3": set()}


def test_read_coco_instances_unknown_category_id(tmp_path: Path) -> None:
    path = coco_instances(tmp_path / "instances.json")
    doc = json.loads(path.read_text())
    doc["annotations"][1]["category_id"] = 99
    path.write_text(json.dumps(doc))
    with pytest.raises(DataError) as info:
        read_object_annotations(path, COCO)
    assert str(info.value) == f"{path} field 'annotations[1].category_id': unknown category id 99"


def test_read_jsonl_annotations_maps_names(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "objects.jsonl", [{"image_id": 5, "objects": ["people", "Sofa", "tv"]}])
    assert read_object_annotations(path, COCO) == {"5": {"person", "couch", "tv"}}
    write_jsonl(path, [{"image_id": 5, "objects": ["dog"]}, {"image_id": 6, "objects": ["spaceship"]}])
    with pytest.raises(DataError) as info:
        read_object_annotations(path, COCO)
    assert str(info.value) == (
        f"{path} row 2 field 'objects': unknown category \"spaceship\" (not in the CHAIR vocabulary)"
    )


def test_read_captions_errors(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "captions.jsonl", [{"image_id": 1, "caption": "a"}, {"image_id": "1", "caption": "b"}]
    )
    with pytest.raises(DataError) as info:
        read_captions(path)
    assert str(info.value) == f"{path} row 2 field 'image_id': duplicate image_id \"1\" (first in row 1)"
    path.write_text('{"image_id": 1, "caption": "a"}\n{"image_id": 2, "caption": \n')
    with pytest.raises(DataError, match=r"captions.jsonl row 2: invalid JSON"):
        read_captions(path)
    write_jsonl(path, [{"image_id": 1, "caption": None}])
    with pytest.raises(DataError, match=r"row 1 field 'caption': expected a string, got null"):
        read_captions(path)


def test_score_chair_files_with_coco_captions(tmp_path: Path) -> None:
    """Image 1's reference captions add bench (and person, dog again) to its instances {person, dog}.

    Caption "Two kids and a puppy on a bench with a kite." mentions person, dog, bench, kite: the kite is the
    one hallucination, so CHAIR_i = 1/4, CHAIR_s = 1/1, recall = 3/3 (GT = {person, dog, bench}), 11 words.
    """
    refs = tmp_path / "captions_val2014.json"
    refs.write_text(
        json.dumps(
            {
                "images": [{"id": 1}],
                "annotations": [
                    {"id": 1, "image_id": 1, "caption": "A boy with his puppy."},
                    {"id": 2, "image_id": 1, "caption": "Children sit on a park bench."},
                ],
            }
        )
    )
    assert read_reference_caption_objects(refs, COCO) == {"1": {"person", "dog", "bench"}}
    captions = write_jsonl(
        tmp_path / "c.jsonl", [{"image_id": 1, "caption": "Two kids and a puppy on a bench with a kite."}]
    )
    out = score_chair_files(captions, coco_instances(tmp_path / "instances.json"), refs)
    assert (out["chair_i"], out["chair_s"], out["recall"], out["mean_length"]) == (0.25, 1.0, 1.0, 11.0)
    without_refs = score_chair_files(captions, tmp_path / "instances.json")
    assert without_refs["chair_i"] == pytest.approx(2 / 4)  # bench is now hallucinated too


def test_score_chair_files_missing_ground_truth(tmp_path: Path) -> None:
    captions = write_jsonl(tmp_path / "c.jsonl", [{"image_id": 7, "caption": "A dog."}])
    annotations = write_jsonl(tmp_path / "gt.jsonl", [{"image_id": 1, "objects": ["dog"]}])
    with pytest.raises(DataError) as info:
        score_chair_files(captions, annotations)
    assert str(info.value) == f"{captions} field 'image_id': image_id \"7\" has no ground truth in {annotations}"


# --- the official word matcher (spec §9.2) -------------------------------------------------------------------


def test_word_tokenize_follows_nltk_splitting() -> None:
    """Any whitespace separates; punctuation and clitics split off; hyphens, slashes and inner periods do not."""
    assert word_tokenize("  \tA dog\nand\t\tcats.\n") == ["A", "dog", "and", "cats", "."]
    assert word_tokenize('The dog\'s (red) "ball", isn\'t it? Yes!') == [
        "The", "dog", "'s", "(", "red", ")", "``", "ball", "''", ",", "is", "n't", "it", "?", "Yes", "!"
    ]  # fmt: skip
    assert word_tokenize("a hot-dog, a cat/dog... e.g. 1,000 dogs;") == [
        "a", "hot-dog", ",", "a", "cat/dog", "...", "e.g", ".", "1,000", "dogs", ";"
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("caption", "words"),
    [
        ("  A man\twith two\ndogs.", [("man", "person"), ("dog", "dog")]),
        ("\n\nTwo baby elephants and an adult giraffe.", [("elephant", "elephant"), ("giraffe", "giraffe")]),
        ("A baby in a crib.", [("baby", "person")]),
        ("traffic\nlights near hot dogs and\tteddy bears", [
            ("traffic light", "traffic light"), ("hot dog", "hot dog"), ("teddy bear", "teddy bear")]),
        ("The seat of the toilet is up; a chair.", [("toilet", "toilet"), ("chair", "chair")]),
        ("A toilet seat.", [("toilet", "toilet")]),
        ("A seat by the window.", [("seat", "chair")]),
        ("A passenger train and a passenger jet.", [("train", "train"), ("jet", "airplane")]),
        ("A man at home plate near the train tracks.", [("man", "person")]),
        ("A hot-dog stand and a glass of wine.", []),
        ("A bow tie.", [("tie", "tie")]),
        ("Skis, buses; knives and mice.", [("ski", "skis"), ("bus", "bus"), ("knife", "knife"), ("mouse", "mouse")]),
        ("The dog's bowl", [("dog", "dog"), ("bowl", "bowl")]),
    ],
)  # fmt: skip
def test_chair_words(caption: str, words: list[tuple[str, str]]) -> None:
    assert chair_words(caption, COCO) == words


def test_score_chair_on_captions_with_newlines_tabs_and_leading_spaces() -> None:
    """1: dog, couch, both in the truth. 2: cat, traffic light ("traffic\\nlight" is one phrase): the light is
    hallucinated. 3: toilet ("toilet seat"), sink: the sink is hallucinated.
    CHAIR_i = (0 + 1 + 1) / (2 + 2 + 2) = 1/3; CHAIR_s = 2/3; recall = (2 + 1 + 1) / (2 + 1 + 1) = 1.
    """
    captions = {
        "1": "  A dog\non a couch.\t",
        "2": "\tTwo cats\tand a traffic\nlight.",
        "3": "\n\nA toilet seat next to a sink.",
    }
    truth = {"1": ["dog", "sofa"], "2": ["cat"], "3": ["toilet"]}
    out = score_chair(captions, truth, COCO)
    assert out["chair_i"] == pytest.approx(1 / 3) and out["chair_s"] == pytest.approx(2 / 3)
    assert out["recall"] == 1.0 and out["hallucinated_objects"] == {"sink": 1, "traffic light": 1}


def test_read_chair_synonyms_keeps_the_official_quirks(tmp_path: Path) -> None:
    """LisaAnne's reader splits on ", " without stripping items: an item after a double space keeps its leading
    space and never matches. RLHF-V's reader strips every item. "sports ball" resolves as ground truth."""
    path = tmp_path / "synonyms.txt"
    path.write_text("motorcycle, scooter,  motor bike\ncake,  cheesecake\nsports ball, ball\n")
    raw, stripped = read_chair_synonyms(path), read_chair_synonyms(path, strip=True)
    assert raw.categories == ("motorcycle", "cake", "sports ball")
    caption = "A scooter, a motor bike and a cheesecake."
    assert chair_words(caption, raw) == [("scooter", "motorcycle")]
    assert chair_words(caption, stripped) == [
        ("scooter", "motorcycle"), ("motor bike", "motorcycle"), ("cheesecake", "cake")
    ]  # fmt: skip
    out = score_chair({"1": "Two balls."}, {"1": ["sports ball"]}, raw)
    assert (out["n_mentions"], out["n_hallucinated"]) == (1, 0)
    with pytest.raises(DataError, match="file not found"):
        read_chair_synonyms(tmp_path / "missing.txt")
