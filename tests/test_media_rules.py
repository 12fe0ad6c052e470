"""The one path rule for media, and the limits on what a loader opens (regular files, pixels, text length)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from mmalign.cli import main
from mmalign.data import media
from mmalign.data.loaders import load_samples
from mmalign.data.media import resolve_in_root
from mmalign.errors import DataError, MediaError
from mmalign.eval.pope import load_pope_sets
from mmalign.limits import MAX_PIXELS_ENV, MAX_TEXT_ENV, open_image


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    """``data/`` with one good image, and ``secret.png`` beside it (outside the data root)."""
    root = tmp_path / "data"
    (root / "img").mkdir(parents=True)
    Image.new("RGB", (8, 8), "red").save(root / "img" / "a.png")
    Image.new("RGB", (8, 8), "blue").save(tmp_path / "secret.png")
    (root / "img" / "link.png").symlink_to(tmp_path / "secret.png")
    (root / "img" / "inner_link.png").symlink_to(root / "img" / "a.png")
    (tmp_path / "alias").symlink_to(root)
    # A link to a directory outside, with a file of the same name as one beside the link: ``..`` after the link
    # leaves the root (the operating system follows the link first).
    (tmp_path / "elsewhere" / "dir").mkdir(parents=True)
    Image.new("RGB", (8, 8), "green").save(tmp_path / "elsewhere" / "outside_twin.png")
    Image.new("RGB", (8, 8), "green").save(root / "img" / "outside_twin.png")
    (root / "img" / "dirlink").symlink_to(tmp_path / "elsewhere" / "dir")
    return root


def _row(image: str, text: str = "Is there a star?") -> dict:
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}
    return {"images": [image], "messages": [user, {"role": "assistant", "content": "No."}]}


def _sft(root: Path, *rows: dict) -> Path:
    path = root / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_paths_resolve_inside_the_root_after_symlinks(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(media.ALLOW_OUTSIDE_ENV, raising=False)
    assert resolve_in_root("img/a.png", tree) == tree / "img" / "a.png"
    assert resolve_in_root("img/inner_link.png", tree) == tree / "img" / "inner_link.png"  # a link that stays inside
    assert resolve_in_root(str(tree / "img" / "a.png"), tree) == tree / "img" / "a.png"  # absolute, inside
    # The root spelled through a symlink still holds its own files.
    alias = tree.parent / "alias"
    assert resolve_in_root("img/a.png", alias) == alias / "img" / "a.png"
    escapes = ("../secret.png", "img/../../secret.png", str(tree.parent / "secret.png"), "img/link.png",
               "img/dirlink/../outside_twin.png")  # fmt: skip
    for escaping in escapes:
        with pytest.raises(MediaError, match="escapes the data set root"):
            resolve_in_root(escaping, tree)
    with pytest.raises(MediaError, match="after symlinks"):
        resolve_in_root("img/link.png", tree)
    with pytest.raises(MediaError, match="NUL"):
        resolve_in_root("img/a\0.png", tree)
    with pytest.raises(MediaError, match="cannot name a file"):  # a lone surrogate (from JSON "\ud800")
        resolve_in_root("img/\ud800.png", tree)
    # Opting in: an argument, or the process-wide setting that --allow-outside-root makes.
    assert resolve_in_root("img/link.png", tree, allow_outside=True) == tree / "img" / "link.png"
    monkeypatch.setenv(media.ALLOW_OUTSIDE_ENV, "1")
    assert resolve_in_root("../secret.png", tree).resolve() == tree.parent / "secret.png"


def test_every_loader_applies_the_rule(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(media.ALLOW_OUTSIDE_ENV, raising=False)
    path = _sft(tree, _row("img/a.png"), _row("img/link.png"))
    with pytest.raises(DataError, match=r"sft\.jsonl row 2 field 'images\[0\]': path escapes .* after symlinks"):
        load_samples(path)
    pope = tree / "pope.jsonl"
    question = {"question_id": 1, "image": "img/a.png", "text": "Is there a cat?", "label": "no"}
    rows = [question, {**question, "question_id": 2, "image": "bad/../../../../etc/passwd"}]
    pope.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"pope\.jsonl row 2 field 'image': path escapes the data set root"):
        load_pope_sets(pope)
    monkeypatch.setenv(media.ALLOW_OUTSIDE_ENV, "1")
    assert len(load_samples(path).samples) == 2
    with pytest.raises(DataError, match=r"row 2 field 'image': (image file not found|unreadable image)"):
        load_pope_sets(pope)


def test_the_cli_flag_opts_in_on_every_command(tree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _sft(tree, _row("img/link.png"))
    args = ["train", "sft", "--model", str(tree / "no-model"), "--data", str(path), "--out", str(tree / "run")]
    assert main(args) == 2
    assert "escapes the data set root" in capsys.readouterr().err
    assert main([*args, "--allow-outside-root"]) == 2  # the data loads; the missing model is the next error
    assert "no-model" in capsys.readouterr().err
    assert media.ALLOW_OUTSIDE_ENV not in os.environ  # the setting ends with its command
    assert main(args) == 2
    for command in (["eval", "pope"], ["eval", "chair"], ["pairs", "bdhs"], ["world"], ["world", "pairs"], ["demo"],
                    ["train", "dpo"]):  # fmt: skip
        with pytest.raises(SystemExit):
            main([*command, "--help"])
        assert "--allow-outside-root" in capsys.readouterr().out


def test_only_regular_files_under_the_pixel_limit_are_opened(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fifo = tree / "img" / "fifo.png"
    os.mkfifo(fifo)
    with pytest.raises(MediaError, match="not a regular file"):
        open_image(fifo)  # returns at once: a FIFO is never opened, so nothing blocks
    path = _sft(tree, _row("img/fifo.png"))
    with pytest.raises(DataError, match=r"row 1 field 'images\[0\]': image path is not a regular file"):
        load_samples(path)
    Image.new("L", (300, 200)).save(tree / "img" / "big.png")
    monkeypatch.setenv(MAX_PIXELS_ENV, "59999")
    with pytest.raises(
        MediaError, match=r"300x200 = 60,000 pixels is over the limit of 59,999 .*MMALIGN_MAX_IMAGE_PIXELS"
    ):
        open_image(tree / "img" / "big.png")
    with pytest.raises(DataError, match="over the limit"):
        load_samples(_sft(tree, _row("img/big.png")))
    monkeypatch.setenv(MAX_PIXELS_ENV, "60000")
    assert open_image(tree / "img" / "big.png").size == (300, 200)
    monkeypatch.setenv(MAX_PIXELS_ENV, "lots")
    with pytest.raises(MediaError, match="must be a positive integer"):
        open_image(tree / "img" / "big.png")


def test_text_fields_have_a_length_limit(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(MAX_TEXT_ENV, "50")
    path = _sft(tree, _row("img/a.png", "x" * 50), _row("img/a.png", "x" * 51))
    with pytest.raises(DataError, match=r"row 2 field 'messages\[0\]': text of 51 characters is over the limit of 50"):
        load_samples(path)
    pope = tree / "pope.jsonl"
    pope.write_text(json.dumps({"question_id": 1, "image": "img/a.png", "text": "y" * 51, "label": "no"}) + "\n")
    with pytest.raises(DataError, match=r"pope\.jsonl row 1 field 'text': text of 51 characters"):
        load_pope_sets(pope)
