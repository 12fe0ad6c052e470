"""Data loaders: JSONL / JSON arrays / Parquet / saved HF datasets into validated ``Sample`` records."""

from __future__ import annotations

import base64
import io
import json
import os
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from mmalign.data import media
from mmalign.data.loaders import iter_jsonl, load_samples
from mmalign.data.records import split_image_tokens
from mmalign.errors import DataError
from mmalign.types import ImageRef, Message, Part


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


def user_image_turn(text: str, images: int = 1) -> dict[str, Any]:
    parts: list[dict[str, Any]] = [{"type": "image"} for _ in range(images)]
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


def good_row(i: int = 0) -> dict[str, Any]:
    return {
        "id": f"sft-{i}",
        "images": ["images/a.png"],
        "messages": [
            user_image_turn("Is there a star in the image?"),
            {"role": "assistant", "content": [{"type": "text", "text": "Yes."}]},
        ],
        "meta": {"split": "train"},
    }


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A data set directory with two images, and one image just outside it."""
    make_png(tmp_path / "ds" / "images" / "a.png")
    make_png(tmp_path / "ds" / "images" / "b.png", (0, 255, 0))
    make_png(tmp_path / "outside.png")
    return tmp_path / "ds"


def test_jsonl_round_trip(root: Path) -> None:
    rows = [
        good_row(1),
        {  # single "image", plain-string content: the image goes before the first user text
            "id": 7,
            "image": {"path": "images/b.png"},
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What color?"},
                {"role": "assistant", "content": "Green."},
            ],
        },
        {  # no id, base64 image, a prompt without an answer
            "images": [{"bytes": base64.b64encode(png_bytes()).decode()}],
            "messages": [user_image_turn("Describe.")],
        },
    ]
    result = load_samples(write_jsonl(root / "data.jsonl", rows))
    a, b, c = result.samples
    assert (result.skipped, len(result)) == (0, 3)
    assert result.summary() == "loaded 3 samples from data.jsonl"

    assert a.id == "sft-1" and a.meta == {"split": "train"} and a.root == str(root)
    assert [m.role for m in a.messages] == ["user", "assistant"]
    assert a.messages[0].content == (Part("image"), Part("text", "Is there a star in the image?"))
    assert a.images == (ImageRef(path="images/a.png"),)
    assert a.target == "Yes."
    assert a.load_images()[0].getpixel((0, 0)) == (255, 0, 0)

    assert b.id == "7" and b.meta == {}
    assert [m.role for m in b.messages] == ["system", "user", "assistant"]
    assert b.messages[1] == Message("user", (Part("image"), Part("text", "What color?")))
    assert b.load_images()[0].getpixel((0, 0)) == (0, 255, 0)

    assert c.id == "data-3" and c.target == "" and c.images[0].data == png_bytes()
    assert c.load_images()[0].getpixel((0, 0)) == (0, 0, 255)


def test_parquet_matches_jsonl(root: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [good_row(i) for i in range(3)]
    rows[2]["images"] = ["images/b.png", "images/a.png"]
    rows[2]["messages"][0] = user_image_turn("Compare.", images=2)
    pq.write_table(pa.Table.from_pylist(rows), root / "data.parquet")
    from_parquet = load_samples(root / "data.parquet").samples
    from_jsonl = load_samples(write_jsonl(root / "data.jsonl", rows)).samples
    assert from_parquet == from_jsonl
    assert [s.meta for s in from_parquet] == [{"split": "train"}] * 3
    assert len(from_parquet[2].images) == 2


def test_parquet_image_structs(root: Path) -> None:
    """Parquet written from HF ``Image`` columns stores ``{"bytes", "path"}`` structs."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {"messages": [user_image_turn("Q?")], "images": [{"bytes": png_bytes(), "path": "x.png"}]},
        {"messages": [user_image_turn("Q?")], "images": [{"bytes": None, "path": "images/a.png"}]},
    ]
    pq.write_table(pa.Table.from_pylist(rows), root / "structs.parquet")
    first, second = load_samples(root / "structs.parquet").samples
    assert first.images == (ImageRef(data=png_bytes()),)
    assert second.images == (ImageRef(path="images/a.png"),)


def test_saved_hf_dataset_with_image_column(tmp_path: Path) -> None:
    import datasets

    features = datasets.Features(
        {
            "image": datasets.Image(),
            "messages": datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")}),
        }
    )
    rows = {
        "image": [Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 255, 0))],
        "messages": [
            [{"role": "user", "content": "Color?"}, {"role": "assistant", "content": "Red."}],
            [{"role": "user", "content": "Color?"}, {"role": "assistant", "content": "Green."}],
        ],
    }
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "hfds"))

    red, green = load_samples(tmp_path / "hfds").samples
    assert red.id == "hfds-1" and red.root == str(tmp_path / "hfds")
    assert red.messages[0].content == (Part("image"), Part("text", "Color?"))
    assert red.images[0].data is not None
    assert red.load_images()[0].getpixel((0, 0)) == (255, 0, 0)
    assert green.target == "Green." and green.load_images()[0].getpixel((0, 0)) == (0, 255, 0)


def test_sharegpt_conversations(root: Path) -> None:
    row = {
        "id": "llava-1",
        "images": ["images/a.png", "images/b.png"],
        "conversations": [
            {"from": "system", "value": "You are helpful."},
            {"from": "human", "value": "<image>\nFirst, then <image> second?"},
            {"from": "gpt", "value": "Red, then green."},
        ],
    }
    (sample,) = load_samples(write_jsonl(root / "llava.jsonl", [row])).samples
    assert [m.role for m in sample.messages] == ["system", "user", "assistant"]
    assert sample.messages[1].content == (
        Part("image"),
        Part("text", "First, then "),
        Part("image"),
        Part("text", " second?"),
    )
    # Without any <image> marker the images go to the start of the first user turn.
    row["images"] = ["images/a.png"]
    row["conversations"][1]["value"] = "What is this?"
    (sample,) = load_samples(write_jsonl(root / "llava.jsonl", [row])).samples
    assert sample.messages[1].content == (Part("image"), Part("text", "What is this?"))


def llava_row(i: int, image: str = "images/a.png") -> dict[str, Any]:
    """A row of LLaVA's ``llava_instruct_150k.json``: one ``image`` string and ShareGPT turns."""
    return {
        "id": f"{i:012d}",
        "image": image,
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is in the picture?"},
            {"from": "gpt", "value": "A red square."},
            {"from": "human", "value": "Is it big?"},
            {"from": "gpt", "value": "No."},
        ],
    }


def test_llava_json_array(root: Path) -> None:
    path = root / "llava_instruct.json"
    path.write_text(json.dumps([llava_row(1), llava_row(2, "images/b.png")], indent=1))
    result = load_samples(path)
    first, second = result.samples
    assert result.summary() == "loaded 2 samples from llava_instruct.json"
    assert first.id == "000000000001" and first.images == (ImageRef(path="images/a.png"),)
    assert [m.role for m in first.messages] == ["user", "assistant", "user", "assistant"]
    assert first.messages[0].content == (Part("image"), Part("text", "What is in the picture?"))
    assert first.messages[2].content == (Part("text", "Is it big?"),) and first.target == "No."
    assert second.load_images()[0].getpixel((0, 0)) == (0, 255, 0)
    # The same rows one per line in a .json file still read as JSON lines.
    lines = write_jsonl(root / "lines.json", [llava_row(1), llava_row(2, "images/b.png")])
    assert load_samples(lines).samples == result.samples


def test_llava_json_array_errors_name_the_element(root: Path) -> None:
    rows: list[Any] = [llava_row(i) for i in range(1, 5)]
    rows[2]["conversations"][1] = {"from": "gpt", "value": None}
    path = root / "llava.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(DataError) as info:
        load_samples(path)
    assert (info.value.row, info.value.field) == (3, "conversations[1].value")
    assert str(info.value).startswith(f"{path} row 3 field 'conversations[1].value': must be a string")
    rows[2] = "not a row"
    path.write_text(json.dumps(rows))
    result = load_samples(path, on_bad_record="skip")
    assert [s.id for s in result.samples] == ["000000000001", "000000000002", "000000000004"]
    assert result.reasons == [f"{path} row 3: expected a JSON object, got str"]


BAD_JSON_FILES: dict[str, tuple[str, str]] = {
    # case: (file text, reason snippet); each is an error about the whole file
    "broken array": ('[{"image": "images/a.png"}, {"conversations": ', "invalid JSON array: Expecting value"),
    "array after BOM, broken": ("\ufeff[1, ", "invalid JSON array"),
    "one object": ('{\n  "data": [1, 2]\n}\n', "expected a JSON array of row objects or one JSON object per line"),
}


@pytest.mark.parametrize("case", sorted(BAD_JSON_FILES))
def test_json_files_that_are_not_row_arrays(root: Path, case: str) -> None:
    text, reason = BAD_JSON_FILES[case]
    path = root / "data.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_samples(path, on_bad_record="skip")
    assert (info.value.path, info.value.row, info.value.field) == (path, None, None)
    assert str(info.value).startswith(f"{path}: ") and reason in str(info.value)


def test_json_lines_with_a_broken_line_still_name_the_line(root: Path) -> None:
    path = write_jsonl(root / "data.json", [good_row(1), "{oops", good_row(3)])
    with pytest.raises(DataError, match=r"data\.json row 2: invalid JSON"):
        load_samples(path)
    path = write_jsonl(root / "data.json", ["{oops", good_row(2)])
    result = load_samples(path, on_bad_record="skip")
    assert len(result) == 1 and "data.json row 1: invalid JSON" in result.reasons[0]


def test_split_image_tokens() -> None:
    assert split_image_tokens("<image>\nQ?") == (Part("image"), Part("text", "Q?"))
    assert split_image_tokens("Q?\n<image>") == (Part("text", "Q?"), Part("image"))
    assert split_image_tokens("no image") == (Part("text", "no image"),)


def _truncated_png(root: Path) -> str:
    data = (make_png(root / "images" / "big.png", size=64)).read_bytes()
    (root / "images" / "cut.png").write_bytes(data[: len(data) // 2])
    return "images/cut.png"


def _with(**changes: Any) -> dict[str, Any]:
    row = good_row(2)
    row.update(changes)
    return {k: v for k, v in row.items() if v is not None}


BAD_ROWS: dict[str, tuple[Any, str | None, str]] = {
    # case: (row 2 of data.jsonl, field named in the error, reason snippet)
    "missing messages": (_with(messages=None), "messages", "missing 'messages'"),
    "empty conversation": (_with(messages=[]), "messages", "empty conversation"),
    "no role": (_with(messages=[{"content": "hi"}]), "messages[0].role", "missing role"),
    "unknown role": (
        _with(messages=[user_image_turn("Q"), {"role": "bot", "content": "A"}]),
        "messages[1].role",
        "unknown role 'bot'",
    ),
    "content type": (_with(messages=[{"role": "user", "content": 3}]), "messages[0].content", "got int"),
    "part type": (
        _with(messages=[{"role": "user", "content": [{"type": "video"}]}]),
        "messages[0].content[0].type",
        "unknown part type 'video'",
    ),
    "text not string": (
        _with(messages=[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": 5}]}]),
        "messages[0].content[1].text",
        "string 'text'",
    ),
    "image count": (
        _with(images=["images/a.png", "images/b.png"]),
        "images",
        "2 image(s) given but the conversation has 1 image part(s)",
    ),
    "missing image": (
        _with(images=["images/nope.png"]),
        "images[0]",
        "image file not found: images/nope.png",
    ),
    "escaping path": (_with(images=["../outside.png"]), "images[0]", "escapes the data set root"),
    "bad base64": (_with(images=[{"bytes": "not base64!"}]), "images[0]", "bad base64"),
    "images type": (_with(images=3), "images", "must be a list or a string"),
    "image value type": (_with(images=[3]), "images[0]", "got int"),
    "meta type": (_with(meta=["x"]), "meta", "must be an object"),
    "id type": (_with(id=1.5), "id", "must be a string or an integer"),
    "sharegpt speaker": (
        {"conversations": [{"from": "robot", "value": "hi"}]},
        "conversations[0].from",
        "unknown speaker 'robot'",
    ),
    "bad json": ('{"id": "x", "messages": [', None, "invalid JSON"),
    "not an object": ("[1, 2]", None, "expected a JSON object"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_rows_name_file_row_and_field(root: Path, case: str) -> None:
    bad, field, reason = BAD_ROWS[case]
    path = write_jsonl(root / "data.jsonl", [good_row(1), bad])
    with pytest.raises(DataError) as info:
        load_samples(path)
    message = str(info.value)
    assert "data.jsonl row 2" in message
    assert (info.value.row, info.value.field) == (2, field)
    if field is not None:
        assert f"field '{field}'" in message
    assert reason in message


def test_truncated_png_and_absolute_path_outside_root(root: Path) -> None:
    cut = _with(images=[_truncated_png(root)])
    absolute = _with(images=[str(root.parent / "outside.png")])
    for bad, reason in [(cut, "unreadable image"), (absolute, "escapes the data set root")]:
        path = write_jsonl(root / "data.jsonl", [good_row(1), bad])
        with pytest.raises(DataError, match=r"data\.jsonl row 2 field 'images\[0\]'") as info:
            load_samples(path)
        assert reason in str(info.value)
    # The truncated file is only caught by decoding.
    write_jsonl(root / "data.jsonl", [cut])
    assert len(load_samples(root / "data.jsonl", check_images=False)) == 1


def test_absolute_path_inside_root_and_explicit_root(root: Path) -> None:
    row = _with(images=[str(root / "images" / "a.png")])
    (sample,) = load_samples(write_jsonl(root / "data.jsonl", [row])).samples
    assert sample.images[0].path == str(root / "images" / "a.png")
    # With root= the parent directory becomes the root, so ../outside.png is allowed.
    row = _with(images=["outside.png"])
    (sample,) = load_samples(write_jsonl(root / "data.jsonl", [row]), root=root.parent).samples
    assert sample.root == str(root.parent) and sample.load_images()[0].size == (8, 8)


def test_skip_mode_counts_and_reports(root: Path) -> None:
    rows = [good_row(1), _with(messages=[]), good_row(3), "{oops", good_row(5)]
    result = load_samples(write_jsonl(root / "data.jsonl", rows), on_bad_record="skip")
    assert [s.id for s in result.samples] == ["sft-1", "sft-3", "sft-5"]
    assert result.skipped == 2 and len(result.reasons) == 2
    assert "row 2 field 'messages': empty conversation" in result.reasons[0]
    assert "row 4: invalid JSON" in result.reasons[1]
    assert result.summary().startswith("loaded 3 samples from data.jsonl, skipped 2 bad records (first: ")


def test_all_bad_and_empty_files_raise(root: Path) -> None:
    path = write_jsonl(root / "data.jsonl", [_with(messages=[]), "{oops"])
    with pytest.raises(DataError, match="all 2 records are bad"):
        load_samples(path, on_bad_record="skip")
    (root / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="no records"):
        load_samples(root / "empty.jsonl")


def test_limit(root: Path) -> None:
    path = write_jsonl(root / "data.jsonl", [good_row(i) for i in range(5)] + ["{never read"])
    assert [s.id for s in load_samples(path, limit=2).samples] == ["sft-0", "sft-1"]


def test_bad_paths(root: Path) -> None:
    (root / "data.csv").write_text("id\n")
    cases = {
        root / "nope.jsonl": "file not found",
        root / "data.csv": "unknown file type '.csv'",
        root / "images": "not a data set saved with datasets.Dataset.save_to_disk",
    }
    for path, reason in cases.items():
        with pytest.raises(DataError, match=reason) as info:
            load_samples(path)
        assert path.name in str(info.value)


def test_iter_jsonl(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "q.jsonl", [{"a": 1}, "", {"a": 2}, "not json"])
    rows = iter_jsonl(path)
    assert next(rows) == (1, {"a": 1})
    assert next(rows) == (3, {"a": 2})
    with pytest.raises(DataError, match=r"q\.jsonl row 4: invalid JSON"):
        next(rows)


def test_each_image_file_decoded_once(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[object] = []
    real = media.check_image
    monkeypatch.setattr(media, "check_image", lambda source: calls.append(source) or real(source))
    load_samples(write_jsonl(root / "data.jsonl", [good_row(i) for i in range(10)]))
    assert len(calls) == 1


def test_unchanged_images_are_not_decoded_again_by_later_loads(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_jsonl(root / "data.jsonl", [good_row(0), good_row(1), _with(images=["images/b.png"])])
    calls: list[object] = []
    real = media.check_image
    monkeypatch.setattr(media, "check_image", lambda source: calls.append(source) or real(source))
    # Files written a moment ago are decoded but not remembered (their time stamps may not have ticked yet).
    load_samples(path)
    load_samples(path)
    assert len(calls) == 4
    monkeypatch.setattr(media, "RACY_NS", -1)
    load_samples(path)  # decodes a.png and b.png, and remembers them
    calls.clear()
    assert len(load_samples(path)) == 3
    assert calls == []
    # b.png cut in half: its stamp changed, so it is decoded again and refused.
    image = root / "images" / "b.png"
    image.write_bytes(image.read_bytes()[:40])
    with pytest.raises(DataError, match=r"data\.jsonl row 3 field 'images\[0\]'") as info:
        load_samples(path)
    assert "unreadable image" in str(info.value)
    assert calls == [image]
    # A bad image is never remembered as good.
    with pytest.raises(DataError):
        load_samples(path)
    assert calls == [image, image]


def test_odd_paths_and_a_damaged_image_memo_give_errors_or_nothing(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A NUL in a path: one-line error naming the row and field.
    path = write_jsonl(root / "data.jsonl", [good_row(0), _with(images=["images/a\u0000.png"])])
    with pytest.raises(DataError, match=r"data\.jsonl row 2 field 'images\[0\]'") as info:
        load_samples(path)
    assert "path holds a NUL character" in str(info.value)
    # The memo of checked images: a damaged file, another header or garbage lines count as nothing remembered.
    monkeypatch.setattr(media, "RACY_NS", -1)
    path = write_jsonl(root / "data.jsonl", [good_row(0), _with(images=["images/b.png"])])
    load_samples(path)
    memo = media.CheckedImages(Path(os.path.abspath(root)))
    assert len(memo._read()) == 2
    text = memo.file.read_text()
    for damaged in ("garbage\n\x0b\t1\n", text.replace("v1", "v0"), text[: len(text) // 2]):
        memo.file.write_text(damaged)
        assert len(load_samples(path)) == 2
