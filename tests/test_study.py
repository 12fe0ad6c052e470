"""The study's table, gap measure and prompt extraction; the whole grid at quick size behind the slow marker."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmalign.errors import ConfigError
from mmalign.lab.study import demo_profile_of, gap_closed, prompts_from_pairs, study_table
from mmalign.lab.world.pairs import write_world_pairs


def _result(chair_i: float, f1: float = 0.9) -> dict:
    pope = {s: {"f1": f1} for s in ("random", "popular", "adversarial")}
    chair = {"chair_i": chair_i, "chair_s": 2 * chair_i, "recall": 0.7, "mean_length": 20.0}
    return {"pope": pope, "chair": chair}


def test_demo_profile_of_reads_the_record_and_refuses_another_versions() -> None:
    """A demo's recorded profile comes back as the same profile; a record with a field missing or unknown (a demo of
    another version, whose world the present defaults would not describe) is a clear error naming the fields."""
    from dataclasses import asdict

    from mmalign.lab.demo import demo_profile

    profile = demo_profile("quick", ["caption_prior_prob=0.5"])
    assert demo_profile_of({"profile": asdict(profile)}, Path("r.json")) == profile
    old = {k: v for k, v in asdict(profile).items() if k != "pair_kinds"} | {"retired_knob": 1}
    with pytest.raises(ConfigError, match=r"r\.json: .*missing fields: pair_kinds; unknown fields: retired_knob"):
        demo_profile_of({"profile": old}, Path("r.json"))
    with pytest.raises(ConfigError, match="no 'profile' record"):
        demo_profile_of({}, Path("r.json"))


def test_gap_closed_and_table() -> None:
    results = {"sft": _result(0.20), "dpo_oracle": _result(0.10), "dpo_bdhs": _result(0.14)}
    assert gap_closed(results) == pytest.approx(0.6)
    assert gap_closed({"sft": _result(0.1), "dpo_oracle": _result(0.2), "dpo_bdhs": _result(0.1)}) is None
    lines = study_table(results)
    assert len(lines) == 5 and "| DPO, BDHS pairs | 0.900 | 0.900 | 0.900 | 0.140 | 0.280 | 0.700 | 20.0 |" in lines


def test_prompts_from_pairs_keep_prompt_chosen_and_objects(world_dir: Path) -> None:
    from mmalign.data.loaders import load_samples

    pairs = world_dir / "pairs_study.jsonl"
    write_world_pairs(world_dir, pairs, seed=0)
    out = prompts_from_pairs(pairs, world_dir / "study_prompts_test.jsonl", limit=5)
    samples = load_samples(out).samples
    first = json.loads(pairs.read_text().splitlines()[0])
    assert len(samples) == 5
    assert samples[0].target == first["chosen"] and samples[0].meta["objects"] == first["objects"]
    assert samples[0].load_images()[0].size[0] > 0


@pytest.mark.slow
def test_quick_study_runs(tmp_path: Path) -> None:
    from mmalign.lab.study import run_study

    # Rows side by side in two processes (the default profile's setting), resumed below with one.
    report = run_study(tmp_path / "study", quick=True, processes=2)
    text = report.read_text()
    assert "DPO, BDHS pairs" in text and "mixed DPO" in text
    data = json.loads((tmp_path / "study" / "study.json").read_text())
    assert {"sft", "dpo_oracle", "dpo_bdhs", "dpo_no_image", "online_dpo", "mixed_dpo", "mdpo_bdhs"} <= set(data)
    assert data["_setup"]["prompts"] == 80
    shaped = json.loads((tmp_path / "study" / "results.json").read_text())
    assert shaped["chair"] == data["sft"]["chair"]
    assert shaped["alignment"]["dpo_bdhs"]["pope"] == data["dpo_bdhs"]["pope"]
    assert len((tmp_path / "study" / "demo" / "world" / "study_bdhs_pairs.jsonl").read_text().splitlines()) == 80
    # Started again, the study keeps its finished rows (nothing is retrained: the run directories stay as they were).
    stamp = (tmp_path / "study" / "runs" / "dpo_bdhs" / "model").stat().st_mtime_ns
    run_study(tmp_path / "study", quick=True)
    assert json.loads((tmp_path / "study" / "study.json").read_text())["dpo_bdhs"] == data["dpo_bdhs"]
    assert (tmp_path / "study" / "runs" / "dpo_bdhs" / "model").stat().st_mtime_ns == stamp
