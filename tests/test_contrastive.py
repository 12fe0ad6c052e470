"""CLIP loss by hand, and the contrastive warm-up changes the vision path only."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmalign.config import load_config
from mmalign.lab.recipes.contrastive import ContrastiveConfig, clip_loss, train


def test_clip_loss_by_hand() -> None:
    """Two orthonormal pairs, scale e^0 = 1: logits = identity; each row's CE = log(1 + e^-1) - ... by hand:
    row i: -log(e^1 / (e^1 + e^0)) = log(1 + e^-1). Both directions equal, so the loss is log(1 + e^-1)."""
    emb = torch.eye(2)
    got = clip_loss(emb, emb, torch.tensor(0.0))
    assert got.item() == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-6)


def test_warm_up_trains_only_the_vision_path(llava_dir: Path, world_dir: Path, tmp_path: Path) -> None:
    cfg = load_config(
        ContrastiveConfig,
        flags={"model": str(llava_dir), "data": str(world_dir / "captions.jsonl"), "out": str(tmp_path)},
        overrides=["steps=4", "batch_size=8", "progress=false", "log_every=1"],
    )
    final = train(cfg)
    before, after = load_file(str(llava_dir / "model.safetensors")), load_file(str(final / "model.safetensors"))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any("vision_tower" in k for k in changed)
    assert not any("language_model" in k or "lm_head" in k for k in changed)
