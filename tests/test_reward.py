"""Reward models: the shared-prompt reward equals the full-sequence one on every family; the recipe learns world
pairs, saves its head, resumes exactly; `mmalign eval rm` reports accuracy per pair kind."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import build_model
from mmalign.config import load_config
from mmalign.data.pair_inputs import encode_pairs
from mmalign.data.preference import load_pairs, write_pairs
from mmalign.errors import ConfigError, ModelError
from mmalign.lab.world.pairs import world_pairs
from mmalign.models.families import FAMILIES
from mmalign.models.load import load_model
from mmalign.recipes import rm
from mmalign.reward import RewardScorer, attach_head, load_head


@pytest.fixture(scope="module")
def split_pairs(world_dir: Path) -> tuple[Path, Path]:
    """Oracle pairs of the world's first 60 training scenes (train) and of the others (held out)."""
    pairs = world_pairs(world_dir, seed=0, kinds=("partner", "attribute"))
    train, held = world_dir / "rm_train.jsonl", world_dir / "rm_heldout.jsonl"
    ids = sorted({p.meta["image_id"] for p in pairs})
    first = set(ids[:60])
    write_pairs([p for p in pairs if p.meta["image_id"] in first], train)
    write_pairs([p for p in pairs if p.meta["image_id"] not in first], held)
    return train, held


def _run(model: Path, data: Path, out: Path, *extra: str) -> list[dict]:
    cfg = load_config(
        rm.RewardConfig,
        flags={"model": str(model), "data": str(data), "out": str(out)},
        overrides=["progress=false", "log_every=1", "batch_size=8", "lr=2e-3", *extra],
    )
    rm.train(cfg)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_shared_prompt_rewards_equal_full_sequences(
    family: str, world_dir: Path, split_pairs: tuple[Path, Path], tmp_path: Path
) -> None:
    loaded = load_model(build_model(family, world_dir, tmp_path / family))
    attach_head(loaded.model, seed=1)
    scorer = RewardScorer(loaded.model.eval())
    assert scorer.share_prompt
    pairs = load_pairs(split_pairs[0], limit=4).pairs
    with torch.no_grad():
        shared = scorer(encode_pairs(loaded.processor, pairs, share_prompt=True))
        full = scorer(encode_pairs(loaded.processor, pairs, share_prompt=False))
    for a, b in zip(shared, full):
        assert a.shape == (4,)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    assert not torch.equal(shared[0], shared[1])  # chosen and rejected are told apart


def test_reward_model_learns_and_generalises_to_held_out_scenes(
    llava_dir: Path, split_pairs: tuple[Path, Path], tmp_path: Path
) -> None:
    from mmalign.cli import main

    rows = _run(llava_dir, split_pairs[0], tmp_path / "rm", "steps=40")
    assert rows[0]["loss"] == pytest.approx(0.693, abs=0.05)  # a small random head: rewards near 0
    for key in ("accuracy", "margin", "rewards/chosen", "rewards/rejected", "grad_norm"):
        assert key in rows[-1]
    assert sum(r["loss"] for r in rows[-5:]) / 5 < 0.5
    model_dir = tmp_path / "rm" / "model"
    assert (model_dir / "reward.json").is_file()
    out = tmp_path / "eval.json"
    assert main(["eval", "rm", "--model", str(model_dir), "--data", str(split_pairs[1]), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result) == {"all", "partner", "attribute"}
    assert result["partner"]["n"] + result["attribute"]["n"] == result["all"]["n"] == 20  # 80 scenes, 60 trained on
    # An inserted object (partner pairs) is learned from the text and generalises to held-out scenes; a swapped
    # colour (attribute pairs) needs the image, which the test model's random vision tower does not read.
    assert result["partner"]["accuracy"] >= 0.9, result


def test_reward_resume_matches_uninterrupted(llava_dir: Path, split_pairs: tuple[Path, Path], tmp_path: Path) -> None:
    common = ("steps=4", "save_every=2", "max_samples=16")
    _run(llava_dir, split_pairs[0], tmp_path / "full", *common)
    _run(llava_dir, split_pairs[0], tmp_path / "part", *common)
    shutil.rmtree(tmp_path / "part" / "model")
    shutil.rmtree(tmp_path / "part" / "checkpoints" / "step-00000004")
    (tmp_path / "part" / "checkpoints" / "latest.json").write_text(json.dumps({"step": 2, "dir": "step-00000002"}))
    _run(llava_dir, split_pairs[0], tmp_path / "part", *common, "resume=true")
    a = load_file(str(tmp_path / "full" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "part" / "model" / "model.safetensors"))
    assert any("reward_head" in k for k in a)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)


def test_bad_inputs_are_clear_errors(llava_dir: Path, split_pairs: tuple[Path, Path], tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not a reward model"):
        load_head(load_model(llava_dir))
    with pytest.raises(ConfigError, match="has no margin"):
        _run(llava_dir, split_pairs[0], tmp_path / "m", "steps=1", "use_margin=true")


def test_fact_augmented_model_reads_the_facts_in_training_and_evaluation(
    llava_dir: Path, split_pairs: tuple[Path, Path], tmp_path: Path
) -> None:
    """Fact-RLHF: each pair's facts follow the question, in training and (from reward.json) in evaluation."""
    from mmalign.eval.reward import evaluate_reward_model
    from mmalign.reward import with_facts

    pair = load_pairs(split_pairs[0], limit=1).pairs[0]
    assert pair.facts and with_facts(pair).prompt[-1].text.endswith(" In the image: " + ". ".join(pair.facts) + ".")
    rows = _run(llava_dir, split_pairs[0], tmp_path / "facts", "steps=20", "facts=true")
    assert rows[-1]["loss"] < rows[0]["loss"]
    model_dir = tmp_path / "facts" / "model"
    assert json.loads((model_dir / "reward.json").read_text())["facts"] is True
    with_read = evaluate_reward_model(model_dir, split_pairs[1], progress=False)["all"]["margin"]
    loaded = load_model(model_dir)
    load_head(loaded)
    scorer = RewardScorer(loaded.model.eval())
    pairs = load_pairs(split_pairs[1]).pairs
    with torch.no_grad():
        plain = [scorer(encode_pairs(loaded.processor, pairs, share_prompt=True))]
        read = [scorer(encode_pairs(loaded.processor, [with_facts(p) for p in pairs], share_prompt=True))]
    margin = lambda scored: float((scored[0][0] - scored[0][1]).mean())  # noqa: E731
    assert with_read == pytest.approx(margin(read), abs=1e-4)
    assert margin(plain) != pytest.approx(margin(read), abs=1e-4)
    no_facts = split_pairs[1].parent / "rm_no_facts.jsonl"  # beside the images, which may not be left
    write_pairs([replace(p, facts=()) for p in pairs], no_facts)
    with pytest.raises(ConfigError, match="needs facts"):
        evaluate_reward_model(model_dir, no_facts, progress=False)
    # As a judge (online DPO, RL) it reads each prompt's meta.facts, and refuses a prompt without them.
    from mmalign.judges.reward import RewardModelJudge
    from mmalign.types import Sample

    judge = RewardModelJudge.load(model_dir, batch_size=4)
    prompts = [Sample(p.id, p.prompt, p.images, root=p.root, meta={"facts": list(p.facts)}) for p in pairs[:4]]
    assert judge.score(prompts, [p.chosen for p in pairs[:4]]) == pytest.approx(read[0][0][:4].tolist(), abs=1e-4)
    with pytest.raises(ConfigError, match=f"prompt {pairs[0].id!r} has no meta.facts"):
        judge.score([replace(prompts[0], meta={})], [pairs[0].chosen])
    with pytest.raises(ConfigError, match=f"prompt {pairs[0].id!r} has no meta.facts"):
        judge.check_prompts([prompts[1], replace(prompts[0], meta={})])


def test_mm_dpo_takes_its_margins_from_a_reward_model(
    llava_dir: Path, split_pairs: tuple[Path, Path], tmp_path: Path
) -> None:
    """MM-DPO's dynamic β closes the loop: the margins δ come from `mmalign train rm`, not from the data."""
    from mmalign.recipes import dpo

    _run(llava_dir, split_pairs[0], tmp_path / "rm", "steps=20")

    def run_dpo(out: str, *extra: str) -> list[dict]:
        cfg = load_config(
            dpo.DpoConfig,
            flags={"model": str(llava_dir), "data": str(split_pairs[0]), "out": str(tmp_path / out)},
            overrides=["steps=2", "batch_size=4", "max_samples=8", "progress=false", "log_every=1", *extra],
        )
        dpo.train(cfg)
        return [json.loads(line) for line in (tmp_path / out / "metrics.jsonl").read_text().splitlines()]

    with pytest.raises(ConfigError, match="needs margins"):  # world pairs carry no margins of their own
        run_dpo("no_rm", "loss=mm_dpo")
    rows = run_dpo("mm", "loss=mm_dpo", f"reward_model={tmp_path / 'rm' / 'model'}")
    # β_i = β·(1 + w·(1 − e^{−kδ})) with δ ≥ 0 clamped: above β = 0.1 wherever the reward model agrees.
    assert 0.1 < rows[0]["extra/beta"] <= 0.2
    with pytest.raises(ConfigError, match="does not read them"):
        run_dpo("wrong", "loss=dpo", f"reward_model={tmp_path / 'rm' / 'model'}")


def test_reward_model_judges_online_dpo_samples(
    llava_dir: Path, world_dir: Path, split_pairs: tuple[Path, Path], tmp_path: Path
) -> None:
    """`--judge rm:DIR`: online DPO ranks its samples with a reward model that sees the image; the judge's rewards
    are the pair scorer's."""
    from mmalign.judges.reward import RewardModelJudge
    from mmalign.recipes import online_dpo
    from mmalign.types import Sample

    _run(llava_dir, split_pairs[0], tmp_path / "rm", "steps=10")
    judge = RewardModelJudge.load(tmp_path / "rm" / "model", batch_size=3)
    pairs = load_pairs(split_pairs[1], limit=4).pairs
    prompts = [Sample(id=p.id, messages=p.prompt, images=p.images, root=p.root) for p in pairs]
    chosen = judge.score(prompts, [p.chosen for p in pairs])
    rejected = judge.score(prompts, [p.rejected for p in pairs])
    with torch.no_grad():
        pair_chosen, pair_rejected = judge.scorer(encode_pairs(judge.processor, pairs, share_prompt=True))
    assert chosen == pytest.approx(pair_chosen.tolist(), abs=1e-4)
    assert rejected == pytest.approx(pair_rejected.tolist(), abs=1e-4)
    cfg = load_config(
        online_dpo.OnlineDpoConfig,
        flags={"model": str(llava_dir), "data": str(world_dir / "captions.jsonl"), "out": str(tmp_path / "on")},
        overrides=["steps=2", "batch_size=2", "max_new_tokens=6", "progress=false", "log_every=1",
                   f"judge=rm:{tmp_path / 'rm' / 'model'}"],
    )  # fmt: skip
    online_dpo.train(cfg)
    rows = [json.loads(x) for x in (tmp_path / "on" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and "objective/scores" in rows[0]


def test_critique_reward_model_learns_to_write_critiques_and_scores_after_them(
    llava_dir: Path, split_pairs: tuple[Path, Path], tmp_path: Path
) -> None:
    """MM-RLHF's critique model: teacher-forced on the world's rule-written critiques, its critique NLL falls; the
    critique rows mark exactly the critique turn; at evaluation it writes its own critiques, then scores."""
    from mmalign.data.pair_inputs import prompt_sample
    from mmalign.eval.reward import evaluate_reward_model
    from mmalign.reward import CRITIQUE_REQUEST, encode_pair_critiques

    pair = next(p for p in load_pairs(split_pairs[0]).pairs if p.meta["kind"] == "partner")
    assert pair.chosen_critique and pair.rejected_critique == f"There is no {pair.meta['inserted']} in the image."
    loaded = load_model(llava_dir)
    cont = encode_pair_critiques(loaded.processor, [pair])
    tok = loaded.processor.tokenizer
    for row, note in zip(range(2), (pair.chosen_critique, pair.rejected_critique)):
        marked = cont.replies[row][cont.target_mask[row]].tolist()
        as_read = tok.decode(tok(note, add_special_tokens=False)["input_ids"], skip_special_tokens=True)
        assert tok.decode(marked, skip_special_tokens=True).strip() == as_read.strip()  # the critique, then end tokens
        assert not (cont.target_mask[row] & ~cont.reply_mask[row]).any()
    assert CRITIQUE_REQUEST and prompt_sample(pair).messages == pair.prompt

    rows = _run(llava_dir, split_pairs[0], tmp_path / "critique", "steps=30", "critique=true")
    assert "critique_nll" in rows[0]
    assert sum(r["critique_nll"] for r in rows[-5:]) / 5 < 0.7 * sum(r["critique_nll"] for r in rows[:5]) / 5
    model_dir = tmp_path / "critique" / "model"
    assert json.loads((model_dir / "reward.json").read_text())["critique"] is True
    result = evaluate_reward_model(model_dir, split_pairs[1], progress=False)
    assert result["all"]["n"] == 20 and 0.0 <= result["all"]["accuracy"] <= 1.0
    bare = split_pairs[0].parent / "rm_no_critiques.jsonl"  # beside the images, which may not be left
    write_pairs(
        [replace(p, chosen_critique=None, rejected_critique=None) for p in load_pairs(split_pairs[1]).pairs], bare
    )
    with pytest.raises(ConfigError, match="lacks one"):
        _run(llava_dir, bare, tmp_path / "c2", "steps=1", "critique=true")
