"""`mmalign demo --quick` runs the whole pipeline and writes its report."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from mmalign.cli import main


def test_quick_demo_writes_a_complete_report(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    for heading in ("POPE after SFT", "CHAIR after SFT", "Time per stage"):
        assert heading in report
    assert (out / "loss_curves.png").stat().st_size > 1000
    assert (out / "pope_splits.png").stat().st_size > 1000
    results = json.loads((out / "results.json").read_text())
    assert set(results["pope"]) == {"random", "popular", "adversarial"}
    assert 0.0 <= results["chair"]["chair_i"] <= 1.0
    # The SFT run learned something: its loss fell well below the start.
    rows = [json.loads(ln) for ln in (out / "runs" / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < 0.5 * rows[0]["loss"]


def test_sft_evaluation_and_preference_runs_side_by_side_match_one_after_another(
    llava_dir: Path, world_dir: Path, tmp_path: Path
) -> None:
    import shutil
    from dataclasses import replace

    from mmalign.lab.demo import ALIGNMENT_RUNS, PROFILES, _alignment_stage

    world = tmp_path / "world"
    shutil.copytree(world_dir, world)
    profile = replace(PROFILES["quick"], dpo_steps=2, chair_max_new_tokens=24)
    one: dict[str, float] = {}
    two: dict[str, float] = {}
    for run in ("one", "two"):
        (tmp_path / run / "eval").mkdir(parents=True)
    sft_seq, seq = _alignment_stage(tmp_path / "one", world, llava_dir, profile, 0, one, processes=1)
    sft_par, par = _alignment_stage(tmp_path / "two", world, llava_dir, profile, 0, two, processes=2)
    assert set(seq) == set(par) == set(ALIGNMENT_RUNS)
    assert "evaluation and alignment (wall)" in two and "evaluation and alignment (wall)" not in one
    # The SFT model's evaluation ran in the pool too, with its answers and captions kept for the report.
    assert set(sft_par) == {"pope", "pope_logits", "chair"}
    assert sft_par["chair"]["chair_i"] == sft_seq["chair"]["chair_i"]
    assert sft_par["pope"]["adversarial"]["f1"] == sft_seq["pope"]["adversarial"]["f1"]
    assert (tmp_path / "two" / "eval" / "chair_captions.jsonl").is_file()
    for name in ALIGNMENT_RUNS:
        assert (tmp_path / "two" / "runs" / name / "model" / "config.json").is_file()
        assert par[name]["chair"]["chair_i"] == seq[name]["chair"]["chair_i"]
        for split, metrics in seq[name]["pope"].items():
            assert par[name]["pope"][split]["accuracy"] == metrics["accuracy"]
        a = load_file(str(tmp_path / "one" / "runs" / name / "model" / "model.safetensors"))
        b = load_file(str(tmp_path / "two" / "runs" / name / "model" / "model.safetensors"))
        for k in a:
            torch.testing.assert_close(b[k], a[k], msg=k)


def test_vision_stage_pretrains_the_tower_before_the_decoder(llava_dir: Path, world_dir: Path, tmp_path: Path) -> None:
    from dataclasses import replace

    from mmalign.lab.demo import PROFILES, _vision_stage

    profile = replace(PROFILES["quick"], vision_steps=3, vision_scenes=40)
    timings: dict[str, float] = {}
    model_dir = _vision_stage(tmp_path, world_dir, llava_dir, profile, 0, timings)
    assert "vision" in timings
    before = load_file(str(llava_dir / "model.safetensors"))
    after = load_file(str(model_dir / "model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before if "vision_tower" in k)
    assert all(torch.equal(before[k], after[k]) for k in before if "language_model" in k)
    held_out = json.loads((tmp_path / "runs" / "vision" / "held_out.json").read_text())
    assert set(held_out) == {"shape", "colour", "size", "empty"}


def test_profile_overrides_take_the_fields_types_and_refuse_bad_input(capsys) -> None:
    import pytest

    from mmalign.errors import ConfigError
    from mmalign.lab.demo import PROFILES, demo_profile

    assert demo_profile("default") is PROFILES["default"]
    got = demo_profile("quick", ["caption_order=grouped", "partner_question_prob=0.5", "n_eval=40", "pack=false"])
    assert (got.caption_order, got.partner_question_prob, got.n_eval, got.pack) == ("grouped", 0.5, 40, False)
    assert got.sft_steps == PROFILES["quick"].sft_steps
    assert got.name == "quick, caption_order=grouped partner_question_prob=0.5 n_eval=40 pack=False"
    assert got.world_config(0).partner_question_prob == 0.5
    for bad, says in (
        ("sft_steps", "'sft_steps' is not of the form key=value"),
        ("steps=3", "unknown key 'steps' (did you mean 'sft_steps'?)"),
        ("name=x", "the profile's name is not a setting"),
        ("n_eval=many", "n_eval='many' is not int"),
        ("pack=maybe", "pack='maybe' is not bool"),
        ("caption_order=sideways", "caption_order must be one of"),
        ("pair_prob=1.5", "pair_prob must be in [0, 1]"),
    ):
        with pytest.raises(ConfigError, match=re.escape(says)):
            demo_profile("quick", [bad])
    # On the command line: one line naming the override, exit status 2, nothing run.
    assert main(["demo", "--quick", "--out", "/nonexistent/never-made", "n_eval=many"]) == 2
    assert "n_eval='many' is not int" in capsys.readouterr().err
    assert not Path("/nonexistent/never-made").exists()
