"""The command line: one-line errors with exit status 2, world determinism, eval commands end to end."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from mmalign.cli import main


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(f.relative_to(root).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def test_world_command_is_deterministic(tmp_path: Path) -> None:
    args = ["world", "--train", "20", "--eval", "6", "--seed", "4"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")


def test_bad_data_gives_one_line_error(llava_dir: Path, world_dir: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    bad = world_dir / "cli_bad.jsonl"
    bad.write_text('{"id": "x", "messages": []}\n')
    code = main(["train", "sft", "--model", str(llava_dir), "--data", str(bad), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "cli_bad.jsonl row 1 field 'messages'" in errors[0]
    assert "Traceback" not in err


def test_missing_model_and_bad_override(world_dir: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    code = main(
        [
            "train",
            "sft",
            "--model",
            str(tmp_path / "nope"),
            "--data",
            str(world_dir / "sft.jsonl"),
            "--out",
            str(tmp_path / "r"),
        ]
    )
    assert code == 2 and "not a model directory" in capsys.readouterr().err
    code = main(["train", "sft", "--model", "m", "--data", "d", "--out", "o", "stpes=3"])
    assert code == 2 and "did you mean 'steps'" in capsys.readouterr().err


def test_eval_pope_and_score_pope_round_trip(llava_dir: Path, world_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "pope.json"
    assert main(["eval", "pope", "--model", str(llava_dir), "--data", str(world_dir), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result) == {"random", "popular", "adversarial"}
    assert set(result["random"]) >= {"accuracy", "precision", "recall", "f1", "yes_ratio", "n"}
    # The answers written beside the result score to the same numbers with the official scorer.
    scored = tmp_path / "scored.json"
    answers = out.with_suffix(".answers.jsonl")
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    random_answers = tmp_path / "random_answers.jsonl"
    random_answers.write_text("".join(json.dumps(r) + "\n" for r in rows if r["category"] == "random"))
    labels = world_dir / "pope_random.jsonl"
    assert (
        main(["eval", "score-pope", "--answers", str(random_answers), "--labels", str(labels), "--out", str(scored)])
        == 0
    )
    again = json.loads(scored.read_text())
    for key in ("accuracy", "precision", "recall", "f1", "yes_ratio", "n"):
        assert again[key] == pytest.approx(result["random"][key])
    # Per question, in file order: the label and the parsed answer (1 = yes), the table a bootstrap resamples.
    items = result["random"]["items"]
    questions = [json.loads(line) for line in labels.read_text().splitlines()]
    assert items["label"] == "".join("1" if q["label"] == "yes" else "0" for q in questions)
    said = [r["text"] for r in rows if r["category"] == "random"]
    from mmalign.eval.pope_score import parse_pope_answer

    assert items["pred"] == "".join("1" if parse_pope_answer(t) == "yes" else "0" for t in said)


def test_eval_chair_runs_on_the_world(llava_dir: Path, world_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "chair.json"
    code = main(
        [
            "eval",
            "chair",
            "--model",
            str(llava_dir),
            "--data",
            str(world_dir),
            "--out",
            str(out),
            "--max-new-tokens",
            "12",
            "--limit",
            "4",
        ]
    )
    assert code == 0
    result = json.loads(out.read_text())
    assert {"chair_i", "chair_s", "recall", "mean_length"} <= set(result)
    assert result["n"] == 4
    assert out.with_suffix(".captions.jsonl").is_file()


def test_overrides_may_follow_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``key=value`` overrides between and after flags all count; anything else left over is argparse's error."""
    from mmalign.cli import build_parser, main

    words = ["train", "dpo", "beta=0.3", "--steps", "5", "lr=1e-4", "--batch-size", "2", "freeze.llm=false"]
    parser = build_parser(words)
    args, extra = parser.parse_known_args(words)
    assert args.overrides == ["beta=0.3"] and extra == ["lr=1e-4", "freeze.llm=false"]
    # The run fails on the missing --model, after every override was read (an unknown key would fail first).
    assert main([*words, "bogus_key=1"]) == 2
    assert "bogus_key" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "dpo", "beta=0.3", "--steps", "5", "stray"])
    assert "unrecognized arguments: stray" in capsys.readouterr().err
    assert main(["train", "dpo", "--steps", "5", "stray"]) == 2
    assert "override 'stray' is not of the form key=value" in capsys.readouterr().err
