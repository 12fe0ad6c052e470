"""Tiny models of three real VLM families: build offline, save/load, loss masks, freezing, LoRA, SFT steps."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import build_model
from mmalign.config import load_config
from mmalign.data.collate import IGNORE_INDEX, encode_sft
from mmalign.data.loaders import load_samples
from mmalign.models.families import FAMILIES as FAMILY_REGISTRY
from mmalign.models.load import apply_freeze, apply_lora, count_parameters, load_model
from mmalign.recipes.sft import SftConfig, train

FAMILIES = sorted(FAMILY_REGISTRY)


@pytest.fixture(scope="module", params=FAMILIES)
def family_dir(request: pytest.FixtureRequest, world_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model(request.param, world_dir, tmp_path_factory.mktemp(request.param))


def test_save_load_round_trip_gives_same_logits(family_dir: Path, world_dir: Path) -> None:
    a, b = load_model(family_dir), load_model(family_dir)
    samples = load_samples(world_dir / "sft.jsonl", limit=2).samples
    batch = encode_sft(a.processor, samples)
    batch.pop("labels")
    with torch.no_grad():
        assert torch.equal(a.model(**batch).logits, b.model(**batch).logits)
    assert a.family is not None and a.family.name in FAMILIES


def test_labels_cover_exactly_the_assistant_reply(family_dir: Path, world_dir: Path) -> None:
    loaded = load_model(family_dir)
    samples = load_samples(world_dir / "sft.jsonl", limit=6).samples
    batch = encode_sft(loaded.processor, samples)
    tok = loaded.tokenizer
    for row, sample in enumerate(samples):
        target_ids = batch["input_ids"][row][batch["labels"][row] != IGNORE_INDEX]
        # The reply and the end-of-turn marker, nothing of the prompt or the image.
        assert tok.decode(target_ids, skip_special_tokens=True).strip() == sample.target
        assert target_ids[-1].item() == tok.eos_token_id
    image_id = loaded.model.config.image_token_id if hasattr(loaded.model.config, "image_token_id") else None
    if image_id is not None:
        assert not ((batch["input_ids"] == image_id) & (batch["labels"] != IGNORE_INDEX)).any()


def test_pretrain_freezing_leaves_only_the_projector(family_dir: Path) -> None:
    loaded = load_model(family_dir)
    apply_freeze(loaded.model, loaded.family, vision=True, projector=False, llm=True)
    trainable = {n for n, p in loaded.model.named_parameters() if p.requires_grad}
    assert trainable
    assert all(any(n.startswith(m) for m in loaded.family.projector_modules) for n in trainable)


def test_lora_adapts_only_the_language_model(family_dir: Path) -> None:
    loaded = load_model(family_dir)
    apply_freeze(loaded.model, loaded.family, vision=True, projector=False, llm=True)
    model = apply_lora(loaded.model, loaded.family, r=4, alpha=8, dropout=0.0, targets=None)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    lora = [n for n in names if "lora_" in n]
    assert lora and all("vision" not in n and "visual" not in n for n in lora)
    trainable, total = count_parameters(model)
    assert 0 < trainable < total


def test_sft_runs_and_learns_on_each_family(family_dir: Path, world_dir: Path, tmp_path: Path) -> None:
    cfg = load_config(
        SftConfig,
        flags={"model": str(family_dir), "data": str(world_dir / "sft.jsonl"), "out": str(tmp_path)},
        overrides=[
            "steps=16",
            "batch_size=4",
            "max_samples=4",
            "lr=1e-2",
            "schedule=constant",
            "progress=false",
            "log_every=1",
        ],
    )
    final = train(cfg)
    assert (final / "config.json").is_file()
    import json

    losses = [json.loads(ln)["loss"] for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # Four samples seen three times each: the loss must fall well below its start.
    assert losses[-1] < 0.6 * losses[0]
    assert load_model(final).family is not None


def test_sft_with_lora_saves_adapter_and_merged_model(llava_dir: Path, world_dir: Path, tmp_path: Path) -> None:
    cfg = load_config(
        SftConfig,
        flags={"model": str(llava_dir), "data": str(world_dir / "sft.jsonl"), "out": str(tmp_path)},
        overrides=["steps=3", "batch_size=2", "freeze.llm=true", "lora.enabled=true", "lora.r=4", "progress=false"],
    )
    final = train(cfg)
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    merged = load_model(final)
    base = load_model(llava_dir)
    # The merged model differs from the base in the language model only where LoRA (and the projector) trained.
    changed = [
        n
        for (n, p), (_, q) in zip(merged.model.named_parameters(), base.model.named_parameters())
        if not torch.equal(p, q)
    ]
    assert changed and all("vision_tower" not in n for n in changed)
    assert any("language_model" in n for n in changed)


def test_vocabulary_words_are_those_of_each_text_split_alone() -> None:
    from mmalign.models.tokenizer import _pre_tokenizer, words_of

    texts = [
        "A red star, a blue moon.",
        "user\nIs there a star?\tYes.",
        "two  spaces and\u00a0no-break\x1cspace",
        "A red star, a blue moon.",
        "ünïcode wörds: ok!",
        "",
    ]
    pre = _pre_tokenizer()
    expected = {tok for text in texts for tok, _ in pre.pre_tokenize_str(text)}
    assert words_of(texts) == expected
    assert "▁star" in expected and "?" in expected and "▁Yes" in expected
