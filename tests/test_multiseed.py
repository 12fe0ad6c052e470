"""Figures over seeds: per-item tables from results, means with intervals, paired changes; `--seeds` end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from mmalign.lab.multiseed import gap_closed, paired_changes, seed_tables, summarize, summary_markdown


def _chair(counts: list[tuple[int, int]]) -> dict:
    """A CHAIR result from (mentions, hallucinated) per caption; every caption has 2 true objects, 1 named."""
    per = [{"n_mentions": m, "n_hallucinated": h, "n_truth": 2, "n_correct": 1, "n_words": 10 + h} for m, h in counts]
    return {"chair_i": sum(h for _, h in counts) / sum(m for m, _ in counts), "per_caption": per}


def _pope(label: str, pred: str) -> dict:
    return {split: {"items": {"label": label, "pred": pred}} for split in ("random", "popular", "adversarial")}


def _seed(sft: list[tuple[int, int]], dpo: list[tuple[int, int]]) -> dict:
    return {
        "pope": _pope("1100", "1110"),
        "chair": _chair(sft),
        "alignment": {"dpo": {"pope": _pope("1100", "1100"), "chair": _chair(dpo)}},
    }


def test_seed_tables_join_rows_by_item() -> None:
    tables = seed_tables(_seed([(4, 1), (4, 0)], [(4, 0), (4, 0)]))
    assert list(tables["captions"]["sft.n_hallucinated"]) == [1, 0]
    assert list(tables["captions"]["sft.any_hallucinated"]) == [1, 0]
    assert list(tables["questions"]["dpo.adversarial.pred"]) == [1, 1, 0, 0]
    with pytest.raises(ValueError, match="different numbers of items"):
        seed_tables(_seed([(4, 1), (4, 0)], [(4, 0)]))


def test_summary_means_and_paired_changes_by_hand() -> None:
    """Seed 0: SFT CHAIR_i = 2/8 = 0.25, DPO 1/8 = 0.125 (−50%). Seed 1: SFT 4/8 = 0.5, DPO 1/8 (−75%).
    Mean SFT CHAIR_i 0.375; mean relative change −62.5%. POPE: SFT answers 1110 to 1100 (accuracy 3/4,
    F1 = 2·2/(2·2+1) = 0.8), DPO answers right (accuracy 1, F1 1): accuracy +0.25 in every seed."""
    per_seed = {0: _seed([(4, 1), (4, 1)], [(4, 1), (4, 0)]), 1: _seed([(4, 2), (4, 2)], [(4, 0), (4, 1)])}
    summary = summarize(per_seed, n_boot=300)
    sft = summary["rows"]["sft"]
    assert sft["chair_i"]["per_seed"] == [0.25, 0.5]
    assert sft["chair_i"]["mean"] == pytest.approx(0.375)
    assert sft["pope_acc_random"]["mean"] == pytest.approx(0.75)
    assert sft["f1_random"]["mean"] == pytest.approx(0.8)
    assert sft["chair_s"]["per_seed"] == [1.0, 1.0]
    change = summary["changes"]["dpo"]
    assert change["chair_i_rel"]["per_seed"] == [-0.5, -0.75]
    assert change["chair_i_rel"]["mean"] == pytest.approx(-0.625)
    assert change["chair_i_rel"]["low"] <= -0.625 <= change["chair_i_rel"]["high"] < 0
    assert change["pope_acc_random"]["mean"] == pytest.approx(0.25)
    # Same change in every item of every seed: the interval has no width.
    assert change["recall"]["low"] == change["recall"]["high"] == 0.0
    text = "\n".join(summary_markdown(summary, {"sft": "SFT", "dpo": "DPO"}))
    assert "| SFT | " in text and "DPO vs SFT, CHAIR_i, relative change: -62%" in text
    assert "distinguishable from zero (lower)" in text


def test_gap_closed_is_per_seed_and_skips_seeds_without_a_gap() -> None:
    """Seed 0: SFT 0.5, oracle 0.25, BDHS 0.375 → closes (0.5 − 0.375) / 0.25 = 50%. Seed 1: the oracle run is
    no better than SFT → no gap (nan), left out of the mean. BDHS against SFT: −25% (0.375 vs 0.5), −50% (1/8 vs
    2/8)."""

    def study(sft: list, oracle: list, bdhs: list) -> dict:
        row = lambda c: {"pope": _pope("10", "10"), "chair": _chair(c)}  # noqa: E731
        return {"sft": row(sft), "dpo_oracle": row(oracle), "dpo_bdhs": row(bdhs)}

    tables = [
        seed_tables(study([(4, 2), (4, 2)], [(4, 1), (4, 1)], [(4, 2), (4, 1)])),
        seed_tables(study([(4, 1), (4, 1)], [(4, 1), (4, 1)], [(4, 0), (4, 1)])),
    ]
    got = gap_closed(tables, "dpo_bdhs", n_boot=200)
    assert got["per_seed"][0] == pytest.approx(0.5)
    assert math.isnan(got["per_seed"][1])
    assert got["mean"] == pytest.approx(0.5) and got["n"] == 1
    assert paired_changes(tables, "dpo_bdhs", "sft", n_boot=50)["chair_i_rel"]["per_seed"] == [-0.25, -0.5]


TINY = [
    "n_train=240",
    "n_eval=16",
    "vision_steps=2",
    "vision_scenes=40",
    "pretrain_steps=6",
    "sft_steps=12",
    "dpo_steps=2",
    "chair_max_new_tokens=24",
]


def test_demo_over_seeds_writes_summary_and_resumes(tmp_path: Path) -> None:
    from mmalign.cli import main

    out = tmp_path / "seeds"
    assert main(["demo", "--quick", "--seeds", "0,1", "--out", str(out), *TINY]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"] == [0, 1]
    assert set(summary["rows"]) == {"sft", "dpo", "mdpo", "dpo_no_image"}
    for seed in (0, 1):
        results = json.loads((out / f"seed-{seed}" / "results.json").read_text())
        # The summary's per-seed values are each seed's own results.
        assert summary["rows"]["sft"]["recall"]["per_seed"][seed] == pytest.approx(results["chair"]["recall"])
        assert summary["rows"]["sft"]["length"]["per_seed"][seed] == pytest.approx(results["chair"]["mean_length"])
        assert summary["rows"]["mdpo"]["f1_adversarial"]["per_seed"][seed] == pytest.approx(
            results["alignment"]["mdpo"]["pope"]["adversarial"]["f1"]
        )
    assert "mdpo_vs_dpo" in summary
    report = (out / "report.md").read_text()
    assert "Paired changes against SFT" in report and "mDPO vs DPO" in report
    assert (out / "summary.png").stat().st_size > 1000
    # Interrupted after seed 1's SFT model and its mDPO row: started again, it keeps both and redoes the rest.
    seed1 = out / "seed-1"
    sft_stamp = (seed1 / "runs" / "sft" / "model" / "model.safetensors").stat().st_mtime_ns
    mdpo_stamp = (seed1 / "runs" / "mdpo" / "model" / "model.safetensors").stat().st_mtime_ns
    dpo_stamp = (seed1 / "runs" / "dpo" / "model" / "model.safetensors").stat().st_mtime_ns
    (seed1 / "results.json").unlink()
    (seed1 / "eval" / "rows" / "dpo.json").unlink()
    assert main(["demo", "--quick", "--seeds", "0,1", "--out", str(out), *TINY]) == 0
    assert (seed1 / "runs" / "sft" / "model" / "model.safetensors").stat().st_mtime_ns == sft_stamp
    assert (seed1 / "runs" / "mdpo" / "model" / "model.safetensors").stat().st_mtime_ns == mdpo_stamp
    assert (seed1 / "runs" / "dpo" / "model" / "model.safetensors").stat().st_mtime_ns != dpo_stamp
    again = json.loads((out / "summary.json").read_text())
    assert again["rows"]["dpo"]["f1_random"]["per_seed"] == summary["rows"]["dpo"]["f1_random"]["per_seed"]
    # Another profile in the same directory is refused with one line, not mixed in.
    assert main(["demo", "--quick", "--seeds", "1", "--out", str(out), *TINY, "sft_steps=13"]) == 2


def test_parse_seeds() -> None:
    from mmalign.errors import ConfigError
    from mmalign.lab.demo import parse_seeds

    assert parse_seeds("0,1,2") == [0, 1, 2]
    assert parse_seeds("3-5,1,3") == [3, 4, 5, 1]
    for bad in ("", "a", "1,,2", "-1"):
        with pytest.raises(ConfigError, match="--seeds"):
            parse_seeds(bad)
