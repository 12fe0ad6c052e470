"""Judges and online / hybrid DPO: ranking by the judge, EOS penalty, mixing, γ-weights, and the recipe end to end."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import pytest

from mmalign.config import load_config
from mmalign.errors import ConfigError
from mmalign.judges.python import FunctionJudge
from mmalign.judges.rules import ObjectJudge
from mmalign.lab.world.pairs import write_world_pairs
from mmalign.recipes import online_dpo
from mmalign.recipes.online_dpo import OnlineDpoConfig, sampled_pairs, step_pairs
from mmalign.types import Message, PreferencePair, Rollout, Sample


def _sample(objects: list[str]) -> Sample:
    return Sample(id="s", messages=(Message.user("Describe.", images=1),), meta={"objects": objects})


def test_object_judge_counts_hallucinated_and_missed(world_dir: Path) -> None:
    judge = ObjectJudge.for_world(world_dir)
    s = _sample(["star", "circle"])
    assert judge.counts(s, "A red star and a blue moon.") == (1, 1)
    assert judge.counts(s, "Two stars and a circle.") == (0, 0)
    assert judge.score([s, s], ["A red star and a blue moon.", "A star."]) == [-1.5, -0.5]


def test_function_judge_loads_from_a_file(tmp_path: Path) -> None:
    f = tmp_path / "myjudge.py"
    f.write_text("def length(prompt, reply):\n    return -len(reply.split())\n")
    judge = FunctionJudge.load(f"{f}:length")
    assert judge.score([_sample([])] * 2, ["a b c", "a"]) == [-3.0, -1.0]
    with pytest.raises(ConfigError, match="no function 'nope'"):
        FunctionJudge.load(f"{f}:nope")
    with pytest.raises(ConfigError, match="expected 'module:function'"):
        FunctionJudge.load("justaname")


def test_a_weighted_sum_of_judges(world_dir: Path, tmp_path: Path) -> None:
    from mmalign.judges import load_judge

    f = tmp_path / "myjudge.py"
    f.write_text("def length(prompt, reply):\n    return -len(reply.split())\n")
    judge = load_judge(f"0.5*{f}:length + 2*world", world_dir)
    s = _sample(["star", "circle"])
    # 0.5·(−7 words) + 2·(−1.5) and 0.5·(−2) + 2·(−0.5)
    assert judge.score([s, s], ["A red star and a blue moon.", "A star."]) == [-6.5, -2.0]
    assert load_judge(f"{f}:length+world", world_dir).score([s], ["A star."]) == [-2.5]
    with pytest.raises(ConfigError, match="an empty term"):
        load_judge("world+", world_dir)


def test_judges_check_their_prompts_before_any_sampling() -> None:
    from mmalign.judges import WeightedJudges, check_prompts

    class NeedsObjects:
        def score(self, prompts, replies):
            return [0.0] * len(replies)

        def check_prompts(self, prompts):
            for p in prompts:
                if "objects" not in p.meta:
                    raise ConfigError(f"prompt {p.id!r} has no objects")

    good, bad = _sample(["star"]), Sample(id="bare", messages=(Message.user("Describe.", images=1),))
    check_prompts(NeedsObjects(), [good])
    with pytest.raises(ConfigError, match="prompt 'bare'"):
        check_prompts(WeightedJudges([(1.0, ObjectJudgeStub()), (0.5, NeedsObjects())]), [good, bad])


class ObjectJudgeStub:
    def score(self, prompts, replies):
        return [1.0] * len(replies)


class FixedGenerator:
    def __init__(self, replies: list[tuple[str, bool]]) -> None:
        self.replies = replies

    def generate(self, prompts: Sequence[Sample], n: int = 1, *, params, prefixes=None, image_drop=0.0):
        return [[Rollout(p.id, t, (1,), 0.0, fin) for t, fin in self.replies[:n]] for p in prompts]


def test_sampled_pairs_rank_by_judge_and_penalise_missing_eos(world_dir: Path) -> None:
    judge = ObjectJudge.for_world(world_dir)
    cfg = OnlineDpoConfig(samples_per_prompt=3)
    gen = FixedGenerator([("A star and a moon.", True), ("A star and a circle.", True), ("A star.", True)])
    pairs, stats = sampled_pairs(gen, judge, [_sample(["star", "circle"])], cfg, seed=0)
    assert pairs[0].chosen == "A star and a circle." and pairs[0].rejected == "A star and a moon."
    assert stats["objective/scores_margin"] == pytest.approx(1.5)
    assert stats["val/contain_eos_token"] == 1.0
    # The best reply did not stop: with a penalty of 2 it drops below the others.
    gen = FixedGenerator([("A star and a circle.", False), ("A star.", True)])
    cfg = OnlineDpoConfig(missing_eos_penalty=2.0)
    pairs, stats = sampled_pairs(gen, judge, [_sample(["star", "circle"])], cfg, seed=0)
    assert pairs[0].chosen == "A star." and stats["val/contain_eos_token"] == 0.5
    # Ties go to the earlier sample.
    gen = FixedGenerator([("A star.", True), ("One star.", True)])
    pairs, _ = sampled_pairs(gen, judge, [_sample(["star"])], OnlineDpoConfig(), seed=0)
    assert pairs[0].chosen == "A star." and pairs[0].rejected == "One star."


def _offline(i: int) -> PreferencePair:
    return PreferencePair(id=f"o{i}", prompt=(Message.user("Describe."),), chosen="A star.", rejected="A moon.")


def test_mixing_and_gamma_weights() -> None:
    gen = FixedGenerator([("A star.", True), ("A moon.", True)])
    prompts = [_sample(["star"]) for _ in range(8)]
    offline = [_offline(i) for i in range(3)]
    cfg = OnlineDpoConfig(mix_p=1.0, offline_data="x")
    pairs, weights, stats = step_pairs(gen, None, prompts, offline, cfg, m=0)
    assert stats["mix/offline_fraction"] == 1.0 and all(p.id.startswith("o") for p in pairs)
    assert weights.sum().item() == pytest.approx(1.0)

    class Judge:
        def score(self, prompts, replies):
            return [-len(r) for r in replies]

    cfg = OnlineDpoConfig(mix_p=0.5, offline_data="x")
    pairs, _, stats = step_pairs(gen, Judge(), prompts * 8, offline, cfg, m=3)
    assert 0.2 < stats["mix/offline_fraction"] < 0.8
    assert {p.id[0] for p in pairs} == {"o", "s"}


def test_online_dpo_recipe_runs_and_logs_trl_names(llava_dir: Path, world_dir: Path, tmp_path: Path) -> None:
    cfg = load_config(
        OnlineDpoConfig,
        flags={"model": str(llava_dir), "data": str(world_dir / "captions.jsonl"), "out": str(tmp_path / "on")},
        overrides=["steps=2", "batch_size=2", "max_new_tokens=6", "progress=false", "log_every=1", "lr=1e-3"],
    )
    online_dpo.train(cfg)
    rows = [json.loads(x) for x in (tmp_path / "on" / "metrics.jsonl").read_text().splitlines()]
    first = rows[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)
    for key in (
        "objective/kl",
        "objective/scores",
        "objective/scores_margin",
        "objective/rlhf_reward",
        "objective/non_score_reward",
        "val/contain_eos_token",
        "rewards/margins",
        "logps/chosen",
    ):
        assert key in first, key
    assert first["objective/scores_margin"] >= 0
    assert (tmp_path / "on" / "model" / "model.safetensors").exists()


def test_online_bdhs_and_gamma_recipe_run(llava_dir: Path, world_dir: Path, tmp_path: Path) -> None:
    pairs = world_dir / "pairs_online.jsonl"
    if not pairs.exists():
        write_world_pairs(world_dir, pairs, seed=0)
    base = ["steps=1", "batch_size=2", "max_new_tokens=4", "progress=false", "log_every=1"]
    flags = {"model": str(llava_dir), "data": str(world_dir / "captions.jsonl")}
    for name, extra in (("bdhs", ["rejected=bdhs"]), ("gamma", [f"offline_data={pairs}", "gamma=0.5"])):
        cfg = load_config(OnlineDpoConfig, flags={**flags, "out": str(tmp_path / name)}, overrides=base + extra)
        online_dpo.train(cfg)
        row = json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[0])
        assert row["loss"] == pytest.approx(math.log(2), abs=1e-4)
    with pytest.raises(ConfigError, match="offline_data"):
        online_dpo.train(
            load_config(OnlineDpoConfig, flags={**flags, "out": str(tmp_path / "x")}, overrides=["gamma=0.5"])
        )


def test_online_dpo_resume_matches_uninterrupted(llava_dir: Path, world_dir: Path, tmp_path: Path) -> None:
    import shutil

    import torch
    from safetensors.torch import load_file

    def run(out: Path, *extra: str) -> None:
        cfg = load_config(
            OnlineDpoConfig,
            flags={"model": str(llava_dir), "data": str(world_dir / "captions.jsonl"), "out": str(out)},
            overrides=[
                "steps=4",
                "batch_size=2",
                "max_new_tokens=5",
                "progress=false",
                "lr=1e-3",
                "save_every=2",
                *extra,
            ],
        )
        online_dpo.train(cfg)

    run(tmp_path / "full")
    run(tmp_path / "part")
    shutil.rmtree(tmp_path / "part" / "model")
    shutil.rmtree(tmp_path / "part" / "checkpoints" / "step-00000004")
    (tmp_path / "part" / "checkpoints" / "latest.json").write_text(json.dumps({"step": 2, "dir": "step-00000002"}))
    run(tmp_path / "part", "resume=true")
    a = load_file(str(tmp_path / "full" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "part" / "model" / "model.safetensors"))
    moved = load_file(str(llava_dir / "model.safetensors"))
    assert max((a[k] - moved[k]).abs().max().item() for k in a) > 1e-4
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)
