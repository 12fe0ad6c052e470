"""Image corruptions for preference data: the mDPO random crop and diffusion-style noise.

Every function takes an explicit ``random.Random`` so that a corruption is sampled once per pair per step and the
same corrupted image is shown to the policy and to the reference (the reference mDPO code re-samples the crop on
every forward call, so its policy and reference see different crops).
"""

from __future__ import annotations

import math
import random

import numpy as np
from PIL import Image


def random_crop(
    image: Image.Image,
    rng: random.Random,
    area: tuple[float, float] = (0.01, 0.2),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> Image.Image:
    """Keep a random region covering ``area`` of the image (aspect ratio in ``ratio``) and resize it back.

    mDPO (Wang et al. 2024, §3.1): the rejected image of the conditional term is a crop of less than 20% of the
    original, scale (0.01, 0.2) in the released code.
    """
    width, height = image.size
    for _ in range(10):
        target = rng.uniform(*area) * width * height
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left, top = rng.randint(0, width - w), rng.randint(0, height - h)
            return image.crop((left, top, left + w, top + h)).resize((width, height), Image.BILINEAR)
    side = max(1, round(math.sqrt(area[1]) * min(width, height)))
    left, top = (width - side) // 2, (height - side) // 2
    return image.crop((left, top, left + side, top + side)).resize((width, height), Image.BILINEAR)


def diffusion_noise(image: Image.Image, rng: random.Random, steps: int = 500) -> Image.Image:
    """Forward-diffuse ``image`` for ``steps`` of a 1000-step sigmoid schedule (BDHS_noise, Apple App. E.1).

    ``x̃ = sqrt(ᾱ_N)·x + sqrt(1−ᾱ_N)·ε`` with ``β_k = σ(−6 + 12k/1000)·(5e−3 − 1e−5) + 1e−5``, pixels in [−1, 1].
    """
    betas = [1 / (1 + math.exp(-(-6 + 12 * k / 1000))) * (5e-3 - 1e-5) + 1e-5 for k in range(steps)]
    alpha_bar = math.prod(1 - b for b in betas)
    x = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    noise = np.random.default_rng(rng.getrandbits(63)).standard_normal(x.shape).astype(np.float32)
    y = math.sqrt(alpha_bar) * x + math.sqrt(1 - alpha_bar) * noise
    return Image.fromarray(((np.clip(y, -1, 1) + 1) * 127.5).round().astype(np.uint8))
