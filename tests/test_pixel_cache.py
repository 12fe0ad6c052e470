"""The pixel cache returns exactly what the image processor returns, bounds its memory, and leaves others alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import build_model
from mmalign.data.collate import encode_sft
from mmalign.data.loaders import load_samples
from mmalign.data.pixel_cache import PixelCache, with_pixel_cache
from mmalign.models.load import load_model


@pytest.mark.parametrize("family", ["llava", "qwen2-vl", "idefics3"])
def test_cached_encoding_equals_uncached(
    family: str, world_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    loaded = load_model(build_model(family, world_dir, tmp_path_factory.mktemp(family)))
    samples = load_samples(world_dir / "sft.jsonl", limit=40).samples
    cached = with_pixel_cache(loaded.processor)
    assert cached is not loaded.processor and not isinstance(loaded.processor.image_processor, PixelCache)
    # Overlapping batches: later ones repeat images of earlier ones (the world asks several questions per image).
    for start in (0, 4, 0, 8):
        batch = samples[start : start + 8]
        want, got = encode_sft(loaded.processor, batch), encode_sft(cached, batch)
        assert want.keys() == got.keys()
        for key in want:
            assert torch.equal(want[key], got[key]), key
    cache = cached.image_processor
    if family == "llava":  # one fixed-shape tensor per image: cached
        images = {s.images[0].path for s in samples[:16]}
        # The first batch is encoded twice (``models/fast_inputs.py`` checks its direct encoding once per processor).
        assert cache.misses == len(images) and cache.hits == 32 + 8 - len(images)
    else:  # patch lists or tiles: called as before, nothing cached
        assert cache.hits == 0 and len(cache._items) == 0


def _image(value: int) -> Image.Image:
    return Image.new("RGB", (8, 8), (value, 0, 0))


class _Scale:
    """A stand-in image processor: one [1] tensor per image, counting its calls."""

    def __init__(self) -> None:
        self.seen = 0
        self.crop_size = 8

    def __call__(self, images: list[Image.Image], **kwargs: object) -> dict[str, torch.Tensor]:
        self.seen += len(images)
        scale = float(kwargs.get("scale", 1.0))
        return {"pixel_values": torch.tensor([[im.getpixel((0, 0))[0] * scale] for im in images])}


def test_cache_is_keyed_by_content_and_arguments_and_bounded() -> None:
    inner = _Scale()
    cache = PixelCache(inner, max_bytes=2 * 4)  # room for two float32 rows
    out = cache([_image(1), _image(2), _image(1)])
    assert out["pixel_values"].tolist() == [[1.0], [2.0], [1.0]] and inner.seen == 2  # a repeat inside one call
    assert cache([_image(2)])["pixel_values"].tolist() == [[2.0]] and inner.seen == 2  # equal pixels, new object
    assert cache([_image(2)], scale=2.0)["pixel_values"].tolist() == [[4.0]] and inner.seen == 3  # other arguments
    # Two rows fit: 2 (scale 2) and 2 (scale 1) are the most recent; 1 was evicted and is computed again.
    assert cache([_image(1)])["pixel_values"].tolist() == [[1.0]] and inner.seen == 4
    assert len(cache._items) == 2 and cache.crop_size == 8  # other attributes are the wrapped processor's


def test_processor_without_image_processor_or_zero_budget_is_returned_as_is(llava_dir: Path) -> None:
    loaded = load_model(llava_dir)
    assert with_pixel_cache(loaded.processor, max_bytes=0) is loaded.processor
    assert with_pixel_cache(loaded.tokenizer) is loaded.tokenizer


def test_rendered_text_is_remembered_per_template(llava_dir: Path, world_dir: Path) -> None:
    from mmalign.data.collate import hf_messages, render

    processor = load_model(llava_dir).processor
    sample = load_samples(world_dir / "sft.jsonl", limit=1).samples[0]
    want = processor.apply_chat_template(hf_messages(sample.messages), tokenize=False)
    assert render(processor, sample.messages) == want == render(processor, list(sample.messages))
    prompt = render(processor, sample.prompt_messages, generation_prompt=True)
    assert want.startswith(prompt) and prompt != want
    # Another template on the same processor renders anew.
    saved = processor.chat_template
    try:
        processor.chat_template = "{% for m in messages %}[{{ m['role'] }}]{% endfor %}"
        assert render(processor, sample.messages) == "[user][assistant]"
    finally:
        processor.chat_template = saved
    assert render(processor, sample.messages) == want


def test_decoded_images_follow_changes_of_the_file(tmp_path: Path) -> None:
    from mmalign.data.collate import DecodedImages
    from mmalign.types import ImageRef

    Image.new("RGB", (4, 4), (255, 0, 0)).save(tmp_path / "a.png")
    images, ref = DecodedImages(), ImageRef(path="a.png")
    first = images.open(ref, str(tmp_path))
    assert images.open(ref, str(tmp_path)) is first and first.getpixel((0, 0)) == (255, 0, 0)
    Image.new("RGB", (5, 5), (0, 0, 255)).save(tmp_path / "a.png")
    assert images.open(ref, str(tmp_path)).getpixel((0, 0)) == (0, 0, 255)
    # Bounded: an image larger than the budget is decoded every time and never held.
    small = DecodedImages(max_bytes=10)
    assert small.open(ref, str(tmp_path)) is not small.open(ref, str(tmp_path))
