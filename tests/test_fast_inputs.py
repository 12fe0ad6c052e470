"""The direct LLaVA encoder gives the processor's own tensors, and is never trusted where it does not."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mmalign.data.collate import load_image_groups, processor_inputs, render
from mmalign.data.loaders import load_samples
from mmalign.models import fast_inputs
from mmalign.models.load import load_model


def _call(processor, texts, images):  # type: ignore[no-untyped-def]
    enc = processor(text=texts, images=images, return_tensors="pt", padding=True)
    return {k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}


def test_direct_encoding_equals_the_processors(llava_dir: Path, world_dir: Path) -> None:
    processor = load_model(llava_dir).processor
    samples = load_samples(world_dir / "sft.jsonl", limit=48).samples
    for start, side in ((0, "right"), (8, "left"), (20, "right"), (30, "left")):
        batch = samples[start : start + 9]
        texts, images = [render(processor, s.messages) for s in batch], load_image_groups(batch)
        # Two images in one sample, and a text-only sample beside image samples.
        texts[1] = texts[1].replace("<image>", "<image> and <image>", 1)
        images[1] = [*images[1], images[2][0]]
        texts[3], images[3] = texts[3].replace("<image>", ""), []
        processor.tokenizer.padding_side = side
        want = _call(processor, texts, images)
        direct = fast_inputs._direct(processor, texts, images)
        assert direct is not None and direct.keys() == want.keys()
        for key in want:
            assert torch.equal(direct[key], want[key]), key
        got = processor_inputs(processor, texts, images, padding_side=side)
        assert all(torch.equal(got[k], want[k]) for k in want)
    assert fast_inputs._VERIFIED[processor] is True


def test_a_processor_that_differs_is_always_called(
    llava_dir: Path, world_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    processor = load_model(llava_dir).processor
    samples = load_samples(world_dir / "sft.jsonl", limit=8).samples
    texts, images = [render(processor, s.messages) for s in samples], load_image_groups(samples)
    real = fast_inputs._direct

    def off_by_one(*args):  # type: ignore[no-untyped-def]
        out = real(*args)
        return {**out, "input_ids": out["input_ids"] + 1}

    monkeypatch.setattr(fast_inputs, "_direct", off_by_one)
    want = _call(processor, texts, images)
    for _ in range(2):
        got = processor_inputs(processor, texts, images, padding_side="right")
        assert torch.equal(got["input_ids"], want["input_ids"])
    assert fast_inputs._VERIFIED[processor] is False
    # A placeholder count that differs from the image count gets the processor's own error.
    with pytest.raises(ValueError, match="image"):
        processor_inputs(processor, texts, [g[:0] for g in images], padding_side="right")
