"""Preference pairs: the five row schemas, validation errors, writing, and the world's oracle pairs."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from mmalign.data.preference import SCHEMAS, detect_schema, load_pairs, write_pairs
from mmalign.errors import DataError
from mmalign.eval.coco_vocab import ChairVocab, extract_mentions
from mmalign.types import ImageRef, Message, Part, PreferencePair

IMG, TXT = Part("image"), Part("text", "What is this?")


def make_png(path: Path, color: tuple[int, int, int] = (255, 0, 0), size: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), color).save(path)
    return path


def png_bytes(color: tuple[int, int, int] = (0, 0, 255)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, format="PNG")
    return buffer.getvalue()


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def user(text: str = "What is this?", images: int = 1) -> dict[str, Any]:
    return {"role": "user", "content": [*({"type": "image"} for _ in range(images)), {"type": "text", "text": text}]}


def assistant(text: str) -> list[dict[str, Any]]:
    return [{"role": "assistant", "content": [{"type": "text", "text": text}]}]


def ours(i: int = 0, **changes: Any) -> dict[str, Any]:
    row = {"id": f"p-{i}", "images": ["images/a.png"], "prompt": [user()], "chosen": "A star.", "rejected": "A moon."}
    row.update(changes)
    return {k: v for k, v in row.items() if v is not None}


def trl(**changes: Any) -> dict[str, Any]:
    row = {"images": ["images/a.png"], "prompt": [user()], "chosen": assistant("A star."), "rejected": assistant("No.")}
    row.update(changes)
    return {k: v for k, v in row.items() if v is not None}


def rlaif(**changes: Any) -> dict[str, Any]:
    row = {"idx": 3, "ds_name": "vqa", "image": "images/a.png", "question": "Q?", "chosen": "Yes.", "rejected": "No."}
    row.update(changes)
    return {k: v for k, v in row.items() if v is not None}


def vlf(**changes: Any) -> dict[str, Any]:
    row = {
        "id": "vlf-1",
        "image": "images/a.png",
        "prompt": "Describe it.",
        "completions": [
            {"model": "m1", "response": "Middling.", "score": 3},
            {"model": "m2", "text": "Best.", "rating": "4.5"},
            {"model": "m3", "response": "Worst.", "annotations": {"Helpfulness": {"Rating": "1"}, "Faith": 2}},
        ],
    }
    row.update(changes)
    return {k: v for k, v in row.items() if v is not None}


def llamafactory(**changes: Any) -> dict[str, Any]:
    """A LLaMA-Factory ranking row, sharegpt style (``dataset_info.json``: ``"ranking": true``)."""
    row = {
        "conversations": [{"from": "human", "value": "<image>What is this?"}],
        "chosen": {"from": "gpt", "value": "A star."},
        "rejected": {"from": "gpt", "value": "A moon."},
        "images": ["images/a.png"],
    }
    row.update(changes)
    return {k: v for k, v in row.items() if v is not None}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A data set directory with two images, and one image just outside it."""
    make_png(tmp_path / "ds" / "images" / "a.png")
    make_png(tmp_path / "ds" / "images" / "b.png", (0, 255, 0))
    make_png(tmp_path / "outside.png")
    return tmp_path / "ds"


# --- schemas ------------------------------------------------------------------------------------------


def test_mmalign_schema(root: Path) -> None:
    rows = [
        ours(
            1,
            margin=0.5,
            corrupted_image="images/b.png",
            objects=["star"],
            meta={"method": "oracle"},
            prompt=[{"role": "system", "content": "Be brief."}, user()],
        ),
        ours(2, images=["images/a.png", "images/b.png"], prompt="Compare <image> with\n<image>\nplease."),
        ours(3, image={"bytes": base64.b64encode(png_bytes()).decode()}, images=None, prompt="What is this?"),
    ]
    result = load_pairs(write_jsonl(root / "pairs.jsonl", rows))
    a, b, c = result.pairs
    assert (result.schema, result.skipped) == ("mmalign", 0)
    assert result.summary() == "loaded 3 mmalign pairs from pairs.jsonl"
    assert a.prompt == (Message("system", (Part("text", "Be brief."),)), Message("user", (IMG, TXT)))
    assert (a.chosen, a.rejected, a.margin, a.objects) == ("A star.", "A moon.", 0.5, ("star",))
    assert a.images == (ImageRef(path="images/a.png"),) and a.root == str(root)
    assert a.corrupted_image == ImageRef(path="images/b.png") and a.meta == {"method": "oracle"}
    # <image> markers place the images where they are written.
    assert b.prompt[0].content == (Part("text", "Compare "), IMG, Part("text", " with"), IMG, Part("text", "please."))
    # Plain text without markers: the image goes first.
    assert c.prompt == (Message("user", (IMG, TXT)),) and c.images[0].data == png_bytes()
    chosen, rejected = c.as_samples()
    assert chosen.target == "A star." and rejected.target == "A moon."
    assert chosen.load_images()[0].getpixel((0, 0)) == (0, 0, 255)


def test_trl_schema(root: Path) -> None:
    rows = [
        trl(),
        trl(images=None, image="images/b.png"),  # TRL's singular "image"
        trl(prompt=[{"role": "user", "content": [{"type": "text", "text": "<image>What is this?"}]}]),
    ]
    result = load_pairs(write_jsonl(root / "trl.jsonl", rows))
    assert result.schema == "trl"
    for pair in result.pairs:
        assert pair.prompt == (Message("user", (IMG, TXT)),)
        assert (pair.chosen, pair.rejected) == ("A star.", "No.")
    assert [p.images[0].path for p in result.pairs] == ["images/a.png", "images/b.png", "images/a.png"]
    assert [p.id for p in result.pairs] == ["trl-1", "trl-2", "trl-3"]


def test_rlaif_v_schema(root: Path) -> None:
    rows = [
        rlaif(),
        rlaif(idx=None, id="r2", image={"bytes": base64.b64encode(png_bytes()).decode()}, question="Q? <image>"),
    ]
    first, second = load_pairs(write_jsonl(root / "rlaif.jsonl", rows)).pairs
    assert first.id == "3" and first.prompt == (Message("user", (IMG, Part("text", "Q?"))),)
    assert (first.chosen, first.rejected, first.images) == ("Yes.", "No.", (ImageRef(path="images/a.png"),))
    assert first.meta == {"source": "rlaif_v", "ds_name": "vqa", "idx": 3}
    assert second.id == "r2" and second.prompt == (Message("user", (Part("text", "Q? "), IMG)),)


def test_vlfeedback_best_and_worst(root: Path) -> None:
    tie = vlf(id="tie", completions=[{"response": "A", "score": 2}, {"response": "B", "score": 2.0}])
    result = load_pairs(write_jsonl(root / "vlf.jsonl", [vlf(), tie]))  # ties are skipped even in fail mode
    (pair,) = result.pairs
    assert result.schema == "vlfeedback" and result.skipped == 1
    assert "vlf.jsonl row 2 field 'completions'" in result.reasons[0] and "no preference" in result.reasons[0]
    assert (pair.chosen, pair.rejected, pair.margin) == ("Best.", "Worst.", 3.0)  # 4.5 - mean(1, 2)
    assert pair.prompt == (Message("user", (IMG, Part("text", "Describe it."))),)
    assert pair.meta == {
        "source": "vlfeedback",
        "scores": [3.0, 4.5, 1.5],
        "chosen_model": "m2",
        "rejected_model": "m3",
    }
    # image_path is the fallback image field.
    (pair,) = load_pairs(write_jsonl(root / "vlf.jsonl", [vlf(image=None, image_path="images/b.png")])).pairs
    assert pair.images == (ImageRef(path="images/b.png"),)
    with pytest.raises(DataError, match="all 1 records were skipped"):
        load_pairs(write_jsonl(root / "vlf.jsonl", [tie]))


def test_llamafactory_schema(root: Path) -> None:
    openai = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Compare <image> with <image>"},
        ],
        "chosen": {"role": "assistant", "content": "Two stars."},
        "rejected": {"role": "assistant", "content": "Two moons."},
        "images": ["images/a.png", "images/b.png"],
    }
    rows = [
        llamafactory(),
        llamafactory(  # several turns, a system column, no marker: the image goes to the first user turn
            id="lf-2",
            system="Be brief.",
            conversations=[
                {"from": "human", "value": "Hi."},
                {"from": "gpt", "value": "Hello."},
                {"from": "human", "value": "What is this?"},
            ],
        ),
        openai,
    ]
    path = root / "lf.json"
    path.write_text(json.dumps(rows, indent=2))  # LLaMA-Factory's files are JSON arrays
    result = load_pairs(path)
    first, second, third = result.pairs
    assert result.schema == "llamafactory" and result.summary() == "loaded 3 llamafactory pairs from lf.json"
    assert first.id == "lf-1" and first.prompt == (Message("user", (IMG, TXT)),)
    assert (first.chosen, first.rejected, first.images) == ("A star.", "A moon.", (ImageRef(path="images/a.png"),))
    system = Message("system", (Part("text", "Be brief."),))
    assert second.id == "lf-2" and second.prompt == (
        system,
        Message("user", (IMG, Part("text", "Hi."))),
        Message("assistant", (Part("text", "Hello."),)),
        Message("user", (TXT,)),
    )
    assert third.prompt == (system, Message("user", (Part("text", "Compare "), IMG, Part("text", " with "), IMG)))
    assert (third.chosen, third.rejected) == ("Two stars.", "Two moons.")
    assert [ref.path for ref in third.images] == ["images/a.png", "images/b.png"]
    assert third.as_samples()[0].load_images()[1].getpixel((0, 0)) == (0, 255, 0)


def test_json_array_of_pairs_names_its_rows(root: Path) -> None:
    rows = [rlaif(), rlaif(), rlaif(question=None), rlaif()]
    (root / "rl.json").write_text(json.dumps(rows))
    with pytest.raises(DataError) as info:
        load_pairs(root / "rl.json")
    assert str(info.value) == f"{root / 'rl.json'} row 3 field 'question': missing 'question'"
    assert len(load_pairs(root / "rl.json", on_bad_record="skip")) == 3
    (root / "broken.json").write_text(json.dumps(rows)[:-30])
    with pytest.raises(DataError, match=r"broken\.json: invalid JSON array: ") as info:
        load_pairs(root / "broken.json", on_bad_record="skip")  # the file as a whole: no row to skip
    assert info.value.row is None


def test_detection_and_forced_schema(root: Path) -> None:
    expected = {
        "mmalign": ours(),
        "trl": trl(),
        "rlaif_v": rlaif(),
        "vlfeedback": vlf(),
        "llamafactory": llamafactory(),
    }
    assert sorted(expected) == sorted(SCHEMAS)
    for schema, row in expected.items():
        assert detect_schema(row) == schema
        assert load_pairs(write_jsonl(root / "d.jsonl", [row]), schema=schema).schema == schema
    assert detect_schema({"prompt": "x"}) is None
    undetectable = {"{}": "missing 'chosen' (or VLFeedback 'completions')", '{"chosen": 3}': "got int"}
    for row, reason in undetectable.items():
        with pytest.raises(DataError, match=r"d\.jsonl row 1 field 'chosen'") as info:
            load_pairs(write_jsonl(root / "d.jsonl", [row]))
        assert reason in str(info.value)
    # Detection locks onto the first row that loads; later rows are read with that schema.
    bad_first = {"completions": "oops"}
    result = load_pairs(write_jsonl(root / "d.jsonl", [bad_first, ours(), rlaif()]), on_bad_record="skip")
    assert result.schema == "mmalign" and len(result) == 1 and result.skipped == 2
    assert "row 3 field 'prompt': missing 'prompt'" in result.reasons[1]
    with pytest.raises(DataError, match=r"d\.jsonl row 1 field 'prompt': missing"):
        load_pairs(write_jsonl(root / "d.jsonl", [rlaif()]), schema="mmalign")
    with pytest.raises(ValueError, match="schema must be"):
        load_pairs(root / "d.jsonl", schema="dpo")  # type: ignore[arg-type]


def test_parquet_matches_jsonl(root: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [trl(), trl(chosen=assistant("Two stars."), prompt=[user("Compare.", images=2)])]
    rows[1]["images"] = ["images/a.png", "images/b.png"]
    pq.write_table(pa.Table.from_pylist(rows), root / "trl.parquet")
    from_parquet = load_pairs(root / "trl.parquet")
    assert from_parquet.pairs == load_pairs(write_jsonl(root / "trl.jsonl", rows)).pairs
    assert from_parquet.schema == "trl" and len(from_parquet.pairs[1].images) == 2


def test_saved_hf_datasets(tmp_path: Path) -> None:
    import datasets

    red, green = Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 255, 0))
    rlaif_rows = {"image": [red, green], "question": ["Q1?", "Q2?"], "chosen": ["A", "B"], "rejected": ["C", "D"]}
    features = datasets.Features({k: datasets.Value("string") for k in rlaif_rows} | {"image": datasets.Image()})
    datasets.Dataset.from_dict(rlaif_rows, features=features).save_to_disk(str(tmp_path / "rlaif"))
    first, second = load_pairs(tmp_path / "rlaif").pairs
    assert first.root == str(tmp_path / "rlaif") and first.prompt == (Message("user", (IMG, Part("text", "Q1?"))),)
    assert (second.chosen, second.rejected) == ("B", "D")
    assert second.as_samples()[0].load_images()[0].getpixel((0, 0)) == (0, 255, 0)

    # TRL's layout: a list of images and nested content lists (Arrow fills absent keys with None).
    trl_rows = {
        "images": [[red], [green]],
        "prompt": [[user()], [user()]],
        "chosen": [assistant("Red."), assistant("Green.")],
        "rejected": [assistant("Blue."), assistant("Blue.")],
    }
    datasets.Dataset.from_dict(trl_rows).cast_column("images", datasets.Sequence(datasets.Image())).save_to_disk(
        str(tmp_path / "trl")
    )
    result = load_pairs(tmp_path / "trl")
    assert result.schema == "trl" and [p.chosen for p in result.pairs] == ["Red.", "Green."]
    assert result.pairs[0].prompt == (Message("user", (IMG, TXT)),)
    assert result.pairs[0].as_samples()[1].load_images()[0].getpixel((0, 0)) == (255, 0, 0)


# --- bad input ----------------------------------------------------------------------------------------


def _completions(*items: Any) -> dict[str, Any]:
    return vlf(completions=list(items))


BAD_ROWS: dict[str, tuple[Any, str | None, str]] = {
    # case: (row 2 of pairs.jsonl, field named in the error, reason snippet)
    "chosen type": (ours(chosen=3), "chosen", "must be a string, got int"),
    "missing prompt": (ours(prompt=None), "prompt", "missing 'prompt'"),
    "empty prompt": (ours(prompt=[]), "prompt", "empty prompt"),
    "prompt type": (ours(prompt=5), "prompt", "must be a string or a list of messages"),
    "prompt ends with assistant": (ours(prompt=[user(), *assistant("A")]), "prompt[1].role", "end with a user turn"),
    "unknown role": (ours(prompt=[{"role": "bot", "content": "x"}]), "prompt[0].role", "unknown role 'bot'"),
    "part type": (
        ours(prompt=[{"role": "user", "content": [{"type": "video"}]}]),
        "prompt[0].content[0].type",
        "unknown part type 'video'",
    ),
    "missing rejected": (ours(rejected=None), "rejected", "missing 'rejected'"),
    "rejected type": (ours(rejected=["x"]), "rejected", "must be a string, got list"),
    "empty chosen": (ours(chosen="  "), "chosen", "empty reply"),
    "chosen equals rejected": (ours(rejected="A star."), "rejected", "identical to the chosen reply"),
    "too many images": (ours(images=["images/a.png", "images/b.png"]), "images", "2 image(s) given but"),
    "too few images": (ours(images=[]), "images", "0 image(s) given but the conversation has 1"),
    "missing image": (ours(images=["images/nope.png"]), "images[0]", "image file not found: images/nope.png"),
    "escaping path": (ours(images=["../outside.png"]), "images[0]", "escapes the data set root"),
    "bad base64": (ours(images=[{"bytes": "not base64!"}]), "images[0]", "bad base64"),
    "corrupted image": (ours(corrupted_image="images/nope.png"), "corrupted_image", "image file not found"),
    "margin text": (ours(margin="0.5"), "margin", "must be a finite number"),
    "margin bool": (ours(margin=True), "margin", "must be a finite number"),
    "objects": (ours(objects=["star", 3]), "objects[1]", "must be a non-empty string"),
    "meta": (ours(meta=["x"]), "meta", "must be an object"),
    "id": (ours(id=1.5), "id", "must be a string or an integer"),
    "trl two replies": (trl(chosen=assistant("A") * 2), "chosen", "expected one assistant message, got 2"),
    "trl reply role": (trl(rejected=[user("No.", 0)]), "rejected[0].role", "expected an assistant turn"),
    "trl no image part": (trl(prompt=[user(images=0)]), "images", "1 image(s) given but the conversation has 0"),
    "trl image and images": (trl(image="images/b.png"), "image", "both 'image' and 'images'"),
    "rlaif empty question": (rlaif(question=" "), "question", "empty question"),
    "rlaif two markers": (rlaif(question="<image><image>"), "image", "1 image(s) given but the conversation has 2"),
    "vlf completions type": (vlf(completions={"a": 1}), "completions", "must be a list of completions"),
    "vlf one completion": (_completions({"response": "A", "score": 1}), "completions", "at least 2 completions"),
    "vlf no response": (
        _completions({"response": "A", "score": 1}, {"score": 2}),
        "completions[1].text",
        "missing 'response' (or 'text')",
    ),
    "vlf empty response": (
        _completions({"response": "A", "score": 1}, {"response": "", "score": 2}),
        "completions[1].response",
        "empty response",
    ),
    "vlf bad score": (
        _completions({"response": "A", "score": "high"}, {"response": "B", "score": 2}),
        "completions[0].score",
        "must be a finite number, got 'high'",
    ),
    "vlf no score": (
        _completions({"response": "A"}, {"response": "B", "score": 2}),
        "completions[0].score",
        "missing 'score', 'rating'",
    ),
    "vlf bad annotation": (
        _completions({"response": "A", "annotations": {"Help": {"Rationale": "ok"}}}, {"response": "B", "score": 2}),
        "completions[0].annotations.Help",
        "expected a number or an object with one of Rating",
    ),
    "vlf same text": (
        _completions({"response": "A", "score": 1}, {"response": "A", "score": 2}),
        "completions[0].response",
        "identical to the chosen reply",
    ),
    "lf prompt ends with gpt": (
        llamafactory(conversations=[{"from": "human", "value": "<image>Hi"}, {"from": "gpt", "value": "Hello."}]),
        "conversations[1].from",
        "must end with a user turn, not assistant",
    ),
    "lf messages end with assistant": (
        llamafactory(conversations=None, messages=[{"role": "user", "content": "Hi"}, *assistant("A")]),
        "messages[1].role",
        "must end with a user turn",
    ),
    "lf unknown speaker": (
        llamafactory(conversations=[{"from": "observation", "value": "x"}]),
        "conversations[0].from",
        "unknown speaker 'observation'",
    ),
    "lf no conversation": (llamafactory(conversations=None), "messages", "missing 'messages'"),
    "lf reply speaker": (llamafactory(rejected={"from": "human", "value": "No."}), "rejected.from", "got 'human'"),
    "lf reply role": (
        llamafactory(chosen={"role": "user", "content": "No."}),
        "chosen.role",
        "expected an assistant turn, got 'user'",
    ),
    "lf reply value": (llamafactory(chosen={"from": "gpt", "value": 3}), "chosen.value", "must be a string"),
    "lf reply list": (llamafactory(rejected=assistant("No.")), "rejected", "must be one assistant turn object"),
    "lf missing rejected": (llamafactory(rejected=None), "rejected", "missing 'rejected'"),
    "lf reply image": (llamafactory(chosen={"from": "gpt", "value": "<image>"}), "chosen", "cannot hold images"),
    "lf equal replies": (llamafactory(rejected={"from": "gpt", "value": "A star."}), "rejected", "identical"),
    "lf image count": (llamafactory(images=["images/a.png", "images/b.png"]), "images", "2 image(s) given"),
    "lf system": (llamafactory(system=["x"]), "system", "must be a string, got list"),
    "lf videos": (llamafactory(videos=["v.mp4"]), "videos", "not supported"),
    "bad json": ('{"chosen": ', None, "invalid JSON"),
    "not an object": ("[1, 2]", None, "expected a JSON object"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_rows_name_file_row_and_field(root: Path, case: str) -> None:
    bad, field, reason = BAD_ROWS[case]
    first_rows = {"vlf": vlf(), "trl": trl(), "rlaif": rlaif(), "lf": llamafactory()}
    first = first_rows.get(case.split()[0], ours())  # row 1 sets the schema
    path = write_jsonl(root / "pairs.jsonl", [first, bad])
    with pytest.raises(DataError) as info:
        load_pairs(path)
    message = str(info.value)
    assert "pairs.jsonl row 2" in message
    assert (info.value.row, info.value.field) == (2, field)
    if field is not None:
        assert f"field '{field}'" in message
    assert reason in message


def test_truncated_image(root: Path) -> None:
    data = make_png(root / "images" / "big.png", size=64).read_bytes()
    (root / "images" / "cut.png").write_bytes(data[: len(data) // 2])
    path = write_jsonl(root / "pairs.jsonl", [ours(), ours(images=["images/cut.png"])])
    with pytest.raises(DataError, match=r"pairs\.jsonl row 2 field 'images\[0\]': unreadable image"):
        load_pairs(path)
    assert len(load_pairs(path, check_images=False)) == 2  # only decoding catches a truncated file
    absolute = write_jsonl(root / "pairs.jsonl", [ours(images=[str(root.parent / "outside.png")])])
    with pytest.raises(DataError, match=r"row 1 field 'images\[0\]': path escapes the data set root"):
        load_pairs(absolute)
    assert load_pairs(absolute, root=root.parent).pairs[0].root == str(root.parent)


def test_skip_mode_counts_and_reports(root: Path) -> None:
    bad = [ours(chosen=""), "{oops", ours(images=["x.png"]), ours(prompt=[]), ours(margin="1"), ours(meta=1)]
    rows = [ours(1), *bad, ours(8)]
    result = load_pairs(write_jsonl(root / "pairs.jsonl", rows), on_bad_record="skip")
    assert [p.id for p in result.pairs] == ["p-1", "p-8"]
    assert result.skipped == 6 and len(result.reasons) == 5
    assert "pairs.jsonl row 2 field 'chosen': empty reply" in result.reasons[0]
    assert "row 3: invalid JSON" in result.reasons[1]
    assert result.summary().startswith("loaded 2 mmalign pairs from pairs.jsonl, skipped 6 records (first: ")
    with pytest.raises(DataError, match="row 2 field 'chosen'"):
        load_pairs(root / "pairs.jsonl")


def test_all_bad_empty_limit_and_arguments(root: Path) -> None:
    with pytest.raises(DataError, match=r"pairs\.jsonl: all 2 records were skipped \(first: "):
        load_pairs(write_jsonl(root / "pairs.jsonl", [ours(chosen=""), "{oops"]), on_bad_record="skip")
    (root / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no records"):
        load_pairs(root / "empty.jsonl")
    with pytest.raises(DataError, match="file not found"):
        load_pairs(root / "nope.jsonl")
    path = write_jsonl(root / "pairs.jsonl", [ours(i) for i in range(4)] + ["{never read"])
    assert [p.id for p in load_pairs(path, limit=2).pairs] == ["p-0", "p-1"]
    with pytest.raises(ValueError, match="on_bad_record"):
        load_pairs(path, on_bad_record="warn")  # type: ignore[arg-type]


# --- writing ------------------------------------------------------------------------------------------


def test_write_pairs_round_trip(root: Path) -> None:
    rows = [
        ours(1, margin=1.5, corrupted_image="images/b.png", objects=["star", "moon"], meta={"kind": "partner"}),
        ours(2, images=[{"bytes": base64.b64encode(png_bytes()).decode()}], prompt="Hi <image> there"),
    ]
    original = (
        load_pairs(write_jsonl(root / "in.jsonl", rows)).pairs
        + load_pairs(write_jsonl(root / "rl.jsonl", [rlaif()])).pairs
    )
    assert write_pairs(original, root / "out.jsonl") == 3
    assert [p.name for p in root.iterdir() if p.name.startswith(".")] == []  # no temporary file left
    again = load_pairs(root / "out.jsonl")
    assert again.schema == "mmalign" and again.pairs == original
    assert [p.meta for p in again.pairs] == [p.meta for p in original]
    assert json.loads((root / "out.jsonl").read_text().splitlines()[0])["images"] == ["images/a.png"]
    # Written into a subdirectory, paths stay relative to the file; outside the root they become absolute.
    write_pairs(original, root / "sub" / "out.jsonl")
    assert json.loads((root / "sub" / "out.jsonl").read_text().splitlines()[0])["images"] == [
        str(root / "images" / "a.png")
    ]
    assert load_pairs(root / "sub" / "out.jsonl", root=root).pairs[0].images == (
        ImageRef(path=str(root / "images" / "a.png")),
    )
    moved = [
        PreferencePair(
            id="x",
            prompt=(Message.user("Q", images=1),),
            chosen="a",
            rejected="b",
            images=(ImageRef(path="images/a.png"),),
            root=str(root),
        )
    ]
    write_pairs(moved, root / "images" / "here.jsonl")
    assert json.loads((root / "images" / "here.jsonl").read_text())["images"] == ["a.png"]


# --- oracle pairs from the world ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mmalign.lab.world import make_world

    out = tmp_path_factory.mktemp("pairs_world")
    make_world(out, n_train=40, n_eval=6, seed=1, progress=False)
    return out


def test_world_pairs_are_deterministic_and_grounded(world: Path) -> None:
    from mmalign.lab.world import detailed_caption, load_scenes, load_world_config
    from mmalign.lab.world.pairs import world_pairs

    pairs = world_pairs(world, seed=3, per_scene=2)
    assert pairs == world_pairs(world, seed=3, per_scene=2)
    assert [p.meta for p in pairs] == [p.meta for p in world_pairs(world, seed=3, per_scene=2)]
    assert [p.rejected for p in pairs] != [p.rejected for p in world_pairs(world, seed=4, per_scene=2)]

    cfg, scenes = load_world_config(world), load_scenes(world, "train")
    assert len(pairs) == 2 * len(scenes) == 80
    by_scene = {s.image_id: s for s in scenes}
    for i, pair in enumerate(pairs):
        scene = by_scene[pair.meta["image_id"]]
        assert pair.meta["kind"] == ("partner", "attribute")[i % 2] and pair.meta["method"] == "oracle"
        assert pair.prompt == (Message("user", (IMG, Part("text", "Describe the image in detail."))),)
        assert pair.chosen == detailed_caption(scene, cfg) and pair.rejected != pair.chosen
        assert pair.images == (ImageRef(path=scene.image),) and pair.root == str(world)
        assert pair.objects == scene.shapes
        if pair.meta["kind"] == "attribute":
            assert pair.meta["original"] != pair.meta["inserted"]
            assert pair.meta["attribute"] in ("colour", "shape") and pair.meta["object"] in scene.shapes
    # Images exist, so the pairs load back through the validating loader.
    from mmalign.lab.world.pairs import write_world_pairs

    assert write_world_pairs(world, world / "pairs.jsonl", seed=3, per_scene=2) == 80
    assert load_pairs(world / "pairs.jsonl").pairs == pairs


def test_partner_pairs_are_chair_hallucinations(world: Path) -> None:
    from mmalign.lab.world import load_world_config
    from mmalign.lab.world.pairs import world_pairs

    cfg, vocab = load_world_config(world), ChairVocab.from_file(world / "chair_vocab.json")
    pairs = world_pairs(world, kinds=("partner",))
    sources = {p.meta["source"] for p in pairs}
    assert sources == {"partner", "random"}  # this world has scenes with and without a lone pair member
    for pair in pairs:
        truth = set(pair.objects)
        assert set(extract_mentions(pair.chosen, vocab)) == truth  # the ground truth hallucinates nothing
        hallucinated = set(extract_mentions(pair.rejected, vocab)) - truth
        assert hallucinated == {pair.meta["inserted"]}
        if pair.meta["source"] == "partner":
            member = pair.meta["partner_of"]
            assert member in truth and cfg.partner[member] == pair.meta["inserted"]
        else:
            assert all(cfg.partner.get(s) in truth for s in truth if s in cfg.partner)  # no lone member


def test_world_pairs_arguments(world: Path) -> None:
    from mmalign.lab.world.pairs import world_pairs

    with pytest.raises(ValueError, match="per_scene"):
        world_pairs(world, per_scene=0)
    with pytest.raises(ValueError, match="kinds"):
        world_pairs(world, kinds=("count",))
    colour_only = world_pairs(world, kinds=("attribute",))
    assert {p.meta["kind"] for p in colour_only} == {"attribute"}


def test_existence_pairs_are_balanced_pope_questions(world: Path) -> None:
    from mmalign.lab.world import load_scenes, load_world_config
    from mmalign.lab.world.pairs import world_pairs
    from mmalign.lab.world.text import with_article

    cfg, scenes = load_world_config(world), {s.image_id: s for s in load_scenes(world, "train")}
    pairs = world_pairs(world, kinds=("existence",), per_scene=4)
    labels = [p.meta["label"] for p in pairs]
    assert 0.3 < labels.count("no") / len(labels) < 0.7
    for pair in pairs:
        scene, shape = scenes[pair.meta["image_id"]], pair.meta["object"]
        assert pair.prompt == (Message("user", (IMG, Part("text", f"Is there {with_article(shape)} in the image?"))),)
        present = shape in scene.shapes
        assert (pair.chosen, pair.rejected) == (("Yes.", "No.") if present else ("No.", "Yes."))
        assert pair.meta["label"] == ("yes" if present else "no")
        lone = [s for s in scene.shapes if s in cfg.partner and cfg.partner[s] not in scene.shapes]
        if not present and lone:
            assert shape in {cfg.partner[s] for s in lone}  # the missing partner is the one asked about
    assert {p.meta["source"] for p in pairs} == {"present", "partner", "random"}


def test_removed_pairs_show_the_partner_missing_on_a_redrawn_image(world: Path, tmp_path: Path) -> None:
    import shutil

    from PIL import Image

    from mmalign.lab.world import detailed_caption, load_scenes, load_world_config
    from mmalign.lab.world.pairs import world_pairs
    from mmalign.lab.world.render import render_scene
    from mmalign.lab.world.text import with_article

    own = tmp_path / "world"
    shutil.copytree(world, own)
    cfg, vocab = load_world_config(own), ChairVocab.from_file(own / "chair_vocab.json")
    scenes = {s.image_id: s for s in load_scenes(own, "train")}
    pairs = world_pairs(own, kinds=("removed", "removed_existence"), per_scene=2, processes=2)
    removed = [p for p in pairs if p.meta.get("source") == "removed"]
    assert removed and len(removed) < len(pairs)  # scenes without a complete pair fall back
    fallback = [p for p in pairs if p.meta.get("source") != "removed"]
    assert {p.meta["kind"] for p in fallback} <= {"partner", "existence"}
    labels = set()
    for pair in removed:
        scene, gone = scenes[pair.meta["image_id"]], pair.meta["inserted"]
        partner = pair.meta["partner_of"]
        assert gone in scene.shapes and partner in scene.shapes and cfg.partner[gone] == partner
        assert gone not in pair.objects and partner in pair.objects
        assert set(pair.objects) == set(scene.shapes) - {gone}
        # The written image is the scene redrawn without the removed shape, nothing else changed.
        altered = type(scene)(scene.split, scene.index, tuple(o for o in scene.objects if o.shape != gone))
        drawn = Image.open(own / pair.images[0].path).convert("RGB")
        assert drawn.tobytes() == render_scene(altered, cfg).tobytes()
        assert pair.images[0].path.startswith("images/pairs/") and pair.root == str(own)
        if pair.meta["kind"] == "removed":
            assert pair.chosen == detailed_caption(altered, cfg) and pair.rejected == detailed_caption(scene, cfg)
            assert set(extract_mentions(pair.chosen, vocab)) == set(pair.objects)
            assert set(extract_mentions(pair.rejected, vocab)) - set(pair.objects) == {gone}
        else:
            asked = pair.meta["object"]
            question = f"Is there {with_article(asked)} in the image?"
            assert pair.prompt == (Message("user", (IMG, Part("text", question))),)
            want = ("No.", "Yes.") if asked == gone else ("Yes.", "No.")
            assert asked in (gone, partner) and (pair.chosen, pair.rejected) == want
            labels.add(pair.meta["label"])
    assert labels == {"yes", "no"}
    # Same seed, same pairs and the same image bytes; the pairs load back through the validating loader.
    before = {p.images[0].path: (own / p.images[0].path).read_bytes() for p in removed}
    assert world_pairs(own, kinds=("removed", "removed_existence"), per_scene=2) == pairs
    assert all((own / path).read_bytes() == data for path, data in before.items())
    from mmalign.lab.world.pairs import write_world_pairs

    write_world_pairs(own, own / "cf.jsonl", kinds=("removed", "removed_existence"), per_scene=2)
    assert load_pairs(own / "cf.jsonl").pairs == pairs


def test_prior_tail_pairs_add_one_invented_sentence_at_the_end(world: Path) -> None:
    from mmalign.lab.world import load_world_config
    from mmalign.lab.world.pairs import world_pairs

    cfg, vocab = load_world_config(world), ChairVocab.from_file(world / "chair_vocab.json")
    pairs = world_pairs(world, kinds=("prior_tail",))
    assert {p.meta["source"] for p in pairs} == {"partner", "random"}
    for pair in pairs:
        truth = set(pair.objects)
        assert pair.rejected.startswith(pair.chosen + " ")
        tail = pair.rejected[len(pair.chosen) + 1 :]
        assert tail.count(".") == 1 and " small " in f" {tail}"
        assert set(extract_mentions(tail, vocab)) == {pair.meta["inserted"]} and pair.meta["inserted"] not in truth
        if pair.meta["source"] == "partner":
            assert cfg.partner[pair.meta["partner_of"]] == pair.meta["inserted"]


def test_partner_swap_pairs_name_an_absent_partner_at_the_same_length(world: Path) -> None:
    """The rejected caption turns one object into the absent planted partner: same sentences, same place and colour,
    so its length tells nothing (unlike an inserted object); the facts describe the true scene."""
    from mmalign.lab.world import load_world_config
    from mmalign.lab.world.pairs import world_pairs

    cfg, vocab = load_world_config(world), ChairVocab.from_file(world / "chair_vocab.json")
    pairs = [p for p in world_pairs(world, kinds=("partner_swap",)) if p.meta["kind"] == "partner_swap"]
    assert len(pairs) > 10 and {p.meta["source"] for p in pairs} >= {"partner"}
    for pair in pairs:
        inserted, original = pair.meta["inserted"], pair.meta["original"]
        assert pair.chosen.count(".") == pair.rejected.count(".")
        assert inserted in extract_mentions(pair.rejected, vocab) and inserted not in pair.objects
        assert len(pair.facts) == len(pair.chosen.split(". ")) - 1  # one fact per object (the intro is not one)
        if pair.meta["source"] == "partner":
            assert cfg.partner[pair.meta["partner_of"]] == inserted
        assert original in pair.objects


def test_omission_pairs_leave_out_a_present_shape(world: Path) -> None:
    """The rejected caption describes the scene without every object of one shape: shorter, naming only present
    shapes, so a reward model trained on them learns that leaving objects out is worse."""
    from mmalign.lab.world.pairs import critique, world_pairs

    vocab = ChairVocab.from_file(world / "chair_vocab.json")
    pairs = [p for p in world_pairs(world, kinds=("omission",)) if p.meta["kind"] == "omission"]
    assert len(pairs) > 10
    for pair in pairs:
        omitted = pair.meta["omitted"]
        chosen, rejected = set(extract_mentions(pair.chosen, vocab)), set(extract_mentions(pair.rejected, vocab))
        assert omitted in chosen and omitted in pair.objects
        assert rejected == chosen - {omitted}
        assert len(pair.rejected) < len(pair.chosen)
        assert pair.rejected_critique == critique(pair.meta) == f"The description misses the {omitted}."


def test_truncated_pairs_cut_the_true_caption(world: Path) -> None:
    from mmalign.lab.world.pairs import world_pairs

    pairs = [p for p in world_pairs(world, kinds=("truncated",)) if p.meta["kind"] == "truncated"]
    assert len(pairs) > 10 and len({p.meta["kept_words"] for p in pairs}) > 3
    for pair in pairs:
        words = pair.chosen.split()
        assert pair.rejected == " ".join(words[: pair.meta["kept_words"]])
        assert 1 <= pair.meta["kept_words"] <= len(words) - 2
        assert pair.rejected_critique == "The description stops before it names every object."
