"""`mmalign demo --quick` runs the whole pipeline and writes its report."""

from __future__ import annotations

import json
from pathlib import Path

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
