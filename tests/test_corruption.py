"""Image corruptions: crop area bounds, determinism, noise schedule."""

from __future__ import annotations

import math
import random

import numpy as np
from PIL import Image

from mmalign.data.corruption import diffusion_noise, random_crop


def _checker(size: int = 64) -> Image.Image:
    a = (np.indices((size, size)).sum(0) % 2 * 255).astype(np.uint8)
    return Image.fromarray(np.stack([a, np.zeros_like(a), 255 - a], -1))


def test_random_crop_keeps_size_and_is_deterministic() -> None:
    img = _checker()
    a, b = random_crop(img, random.Random(3)), random_crop(img, random.Random(3))
    assert a.size == img.size and np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(random_crop(img, random.Random(4))))


def test_random_crop_area_is_within_bounds() -> None:
    """Mark each pixel with its coordinates; the crop's distinct source pixels measure the kept area."""
    size = 100
    ys, xs = np.indices((size, size))
    coded = Image.fromarray(np.stack([xs, ys, np.zeros_like(xs)], -1).astype(np.uint8))
    rng = random.Random(0)
    for _ in range(20):
        out = np.asarray(random_crop(coded, rng, area=(0.01, 0.2)).resize((size, size), Image.NEAREST))
        span_x = int(out[..., 0].max()) - int(out[..., 0].min()) + 1
        span_y = int(out[..., 1].max()) - int(out[..., 1].min()) + 1
        assert 0.005 <= span_x * span_y / size**2 <= 0.25


def test_diffusion_noise_strength_follows_schedule() -> None:
    """At N=500, ᾱ = Π(1−β_k); a mid-grey image keeps mean ≈ 0 in [−1, 1] units and gains std ≈ sqrt(1−ᾱ)."""
    grey = Image.new("RGB", (64, 64), (128, 128, 128))
    out = np.asarray(diffusion_noise(grey, random.Random(0)), dtype=np.float32) / 127.5 - 1
    betas = [1 / (1 + math.exp(6 - 12 * k / 1000)) * (5e-3 - 1e-5) + 1e-5 for k in range(500)]
    expected_std = math.sqrt(1 - math.prod(1 - b for b in betas))
    clipped_std = out.std()
    assert abs(out.mean()) < 0.05
    assert 0.6 * expected_std < clipped_std < 1.05 * expected_std
