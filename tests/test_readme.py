"""The README's real-checkpoint quickstart runs as written, on a tiny local checkpoint and hand-made data files."""

from __future__ import annotations

import io
import json
import re
import shlex
from pathlib import Path

import pytest

README = Path(__file__).parent.parent / "README.md"
# Appended to training commands: the quickstart's settings, at the size of a test.
SMALL = ["steps=2", "batch_size=2", "progress=false", "max_samples=4"]


def _block(heading: str) -> list[str]:
    """The lines of the first ```bash block after ``heading``."""
    text = README.read_text()
    start = text.index(heading)
    match = re.search(r"```bash\n(.*?)```", text[start:], re.S)
    assert match, f"no bash block after {heading!r}"
    return [line for line in match.group(1).splitlines() if line.strip()]


def _image_bytes(colour: tuple[int, int, int]) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (48, 48), colour).save(buf, format="PNG")
    return buf.getvalue()


def _rlaif_v(path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {
            "image": {"bytes": _image_bytes((255, 0, 0) if i % 2 else (0, 0, 255)), "path": f"{i}.png"},
            "question": "What is in the picture?",
            "chosen": "A red star." if i % 2 else "A blue heart.",
            "rejected": "A red star and a moon." if i % 2 else "A blue heart and a cross.",
            "ds_name": "test",
        }
        for i in range(4)
    ]
    pq.write_table(pa.Table.from_pylist(rows), path)


def _pope(path: Path, images: Path) -> None:
    images.mkdir()
    for i in range(2):
        (images / f"COCO_val2014_{i:012d}.jpg").write_bytes(_image_bytes((255, 0, 0)))
    rows = [
        {"question_id": i + 1, "image": f"COCO_val2014_{i % 2:012d}.jpg", "text": f"Is there a {obj} in the image?",
         "label": label}
        for i, (obj, label) in enumerate([("star", "yes"), ("moon", "no"), ("heart", "no"), ("star", "yes")])
    ]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_real_checkpoint_quickstart_runs_as_written(
    llava_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mmalign.cli import main

    _rlaif_v(tmp_path / "train.parquet")
    _pope(tmp_path / "coco_pope_random.json", tmp_path / "val2014")
    env = {
        "MODEL": str(llava_dir),
        "PAIRS": str(tmp_path / "train.parquet"),
        "POPE": str(tmp_path / "coco_pope_random.json"),
        "COCO": str(tmp_path / "val2014"),
    }
    monkeypatch.chdir(tmp_path)
    lines = _block("## Quickstart: your checkpoint")
    assigned = [line.split("=", 1)[0] for line in lines if re.match(r"^[A-Z]+=", line)]
    assert sorted(assigned) == sorted(env), "the quickstart's variables changed; update this test"
    commands = [line for line in lines if line.startswith("mmalign ")]
    assert [c.split()[1:3] for c in commands] == [["train", "dpo"], ["eval", "pope"], ["eval", "pope"]]
    for command in commands:
        for name, value in env.items():
            command = command.replace(f"${name}", value)
        argv = shlex.split(command.partition("#")[0])[1:]
        if argv[0] == "train":
            argv += SMALL
        assert main(argv) == 0, command
    assert (tmp_path / "runs/dpo/model/config.json").is_file() and (tmp_path / "runs/dpo/adapter").is_dir()
    metrics = [json.loads(line) for line in (tmp_path / "runs/dpo/metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 2 and "rewards/accuracies" in metrics[-1]
    for name in ("sft-pope", "dpo-pope"):
        result = json.loads((tmp_path / f"runs/{name}.json").read_text())
        assert result["n"] == 4 and 0.0 <= result["accuracy"] <= 1.0


def test_readme_is_a_users_document() -> None:
    text = README.read_text()
    assert len(text.splitlines()) <= 150
    assert text.startswith("# mmalign\n\n```bash\nmake demo")
