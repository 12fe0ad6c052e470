"""GRPO / RLOO end to end on the world: metric names, a reward it learns, judges, exact resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmalign.config import load_config
from mmalign.recipes import rl


def _run(model: Path, data: Path, out: Path, *extra: str) -> list[dict]:
    cfg = load_config(
        rl.RlConfig,
        flags={"model": str(model), "data": str(data), "out": str(out)},
        overrides=["progress=false", "log_every=1", "batch_size=2", "samples_per_prompt=3", "max_new_tokens=8",
                   "max_samples=16", "lr=1e-3", *extra],
    )  # fmt: skip
    rl.train(cfg)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("algo", ["grpo", "rloo"])
def test_the_policy_learns_what_the_judge_rewards(llava_dir: Path, world_dir: Path, tmp_path: Path, algo: str) -> None:
    """A dense reward from a user's function judge (fewer characters is better): the replies get shorter."""
    judge = tmp_path / "short.py"
    judge.write_text("def short(prompt, reply):\n    return -len(reply) / 10\n")
    rows = _run(llava_dir, world_dir / "sft.jsonl", tmp_path / algo, "steps=40", f"algo={algo}", "batch_size=4",
                f"judge={judge}:short", "kl_coef=0.0")  # fmt: skip
    for key in ("loss", "reward", "reward_std", "completions/mean_length", "completions/clipped_ratio"):
        assert key in rows[0]
    assert "kl" not in rows[0]  # kl_coef=0: no reference model at all
    first = sum(r["reward"] for r in rows[:3]) / 3
    last = sum(r["reward"] for r in rows[-3:]) / 3
    assert last > first + 0.5, [round(r["reward"], 2) for r in rows]


def test_rloo_with_the_world_judge_runs(llava_dir: Path, world_dir: Path, tmp_path: Path) -> None:
    rows = _run(llava_dir, world_dir / "sft.jsonl", tmp_path / "rloo", "steps=2", "algo=rloo", "judge=world")
    assert len(rows) == 2 and rows[0]["rewards/judge/mean"] <= 0.0  # the rule judge charges every miss
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # the policy starts as the reference
    assert rows[1]["kl"] != pytest.approx(0.0, abs=1e-6)


def test_rl_resume_matches_uninterrupted(llava_dir: Path, world_dir: Path, tmp_path: Path) -> None:
    common = ("steps=4", "save_every=2", "correct_bonus=2.0")
    _run(llava_dir, world_dir / "sft.jsonl", tmp_path / "full", *common)
    _run(llava_dir, world_dir / "sft.jsonl", tmp_path / "part", *common)
    shutil.rmtree(tmp_path / "part" / "model")
    shutil.rmtree(tmp_path / "part" / "checkpoints" / "step-00000004")
    (tmp_path / "part" / "checkpoints" / "latest.json").write_text(json.dumps({"step": 2, "dir": "step-00000002"}))
    _run(llava_dir, world_dir / "sft.jsonl", tmp_path / "part", *common, "resume=true")
    a = load_file(str(tmp_path / "full" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "part" / "model" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)
