"""The sampling loop: greedy equals ``model.generate``, seeds reproduce, image masking hides exactly the image."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from conftest import build_model
from mmalign.eval.generate import generate_answers
from mmalign.generation.hf import HFGenerator, image_keep_mask
from mmalign.generation.sampling import SamplingParams, filter_logits, sample_next
from mmalign.models.load import load_model
from mmalign.types import ImageRef, Message, Sample


def _prompts(world: Path, images: tuple[int, ...] = (0, 1, 2)) -> list[Sample]:
    questions = ["Describe the image in detail.", "Is there a star?", "What colour is the circle in the image?"]
    return [
        Sample(
            id=f"s{i}",
            messages=(Message.user(questions[k % 3], images=1),),
            images=(ImageRef(path=f"images/train/{i:06d}.png"),),
            root=str(world),
        )
        for k, i in enumerate(images)
    ]


def test_top_k_and_top_p_keep_the_right_tokens() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    # Mass before each token: 0, .5, .8, .95 -> with p = .8 the first two survive (the second reaches .8).
    assert torch.isinf(filter_logits(logits, top_p=0.8)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.81)).tolist() == [[False, False, False, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.3)).tolist() == [[False, True, True, True]]
    greedy = sample_next(logits, SamplingParams(temperature=0), None)
    assert greedy.tolist() == [0]
    g = torch.Generator().manual_seed(0)
    draws = [int(sample_next(logits, SamplingParams(top_k=1), g)) for _ in range(20)]
    assert set(draws) == {0}


def test_image_keep_mask_hides_only_image_tokens_at_rate_rho() -> None:
    ids = torch.tensor([[1, 2] + [7] * 4000 + [3]])
    keep = image_keep_mask(ids, image_token_id=7, drop=0.99, generator=torch.Generator().manual_seed(0))
    assert keep[0, :2].all() and keep[0, -1]
    visible = keep[0, 2:-1].float().mean().item()
    assert abs(visible - 0.01) < 0.005


@pytest.mark.parametrize(
    "family", ["llava", "qwen2-vl", "idefics3", "smolvlm", "qwen2.5-vl", "llava-next", "llava-onevision"]
)
def test_greedy_matches_model_generate(family: str, world_dir: Path, tmp_path: Path) -> None:
    loaded = load_model(build_model(family, world_dir, tmp_path / family))
    prompts = _prompts(world_dir)
    gen = HFGenerator(loaded.model, loaded.processor, batch_size=2)
    ours = [g[0].text for g in gen.generate(prompts, params=SamplingParams(temperature=0, max_new_tokens=10))]
    theirs = generate_answers(loaded.model, loaded.processor, prompts, max_new_tokens=10, batch_size=2, progress=False)
    assert ours == theirs


def test_sampling_is_seeded_and_logps_are_model_logps(llava_dir: Path, world_dir: Path) -> None:
    loaded = load_model(llava_dir)
    gen = HFGenerator(loaded.model, loaded.processor)
    params = SamplingParams(temperature=1.0, max_new_tokens=6, seed=3)
    a = gen.generate(_prompts(world_dir), 3, params=params)
    b = gen.generate(_prompts(world_dir), 3, params=params)
    c = gen.generate(_prompts(world_dir), 3, params=SamplingParams(temperature=1.0, max_new_tokens=6, seed=4))
    assert [[r.token_ids for r in g] for g in a] == [[r.token_ids for r in g] for g in b]
    assert [[r.token_ids for r in g] for g in a] != [[r.token_ids for r in g] for g in c]
    assert all(len(g) == 3 for g in a)
    # Rollout.logp is the model's log-prob of the sampled tokens: rescore one reply with a full forward pass.
    r = a[0][0]
    from mmalign.data.collate import encode_prompts

    enc = encode_prompts(loaded.processor, _prompts(world_dir)[:1])
    ids = torch.cat([enc["input_ids"], torch.tensor([r.token_ids])], dim=1)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        logits = loaded.model(input_ids=ids, attention_mask=mask, pixel_values=enc["pixel_values"]).logits
    p = enc["input_ids"].shape[1]
    logps = torch.log_softmax(logits[0, p - 1 : -1].float(), -1).gather(-1, torch.tensor(r.token_ids)[:, None])
    assert r.logp == pytest.approx(logps.sum().item(), abs=1e-3)


def test_full_image_masking_makes_replies_independent_of_the_image(llava_dir: Path, world_dir: Path) -> None:
    loaded = load_model(llava_dir)
    gen = HFGenerator(loaded.model, loaded.processor)
    params = SamplingParams(temperature=0, max_new_tokens=6)
    two_images = _prompts(world_dir, images=(0, 3))
    two_images = [two_images[0], Sample(**{**two_images[1].__dict__, "messages": two_images[0].messages})]
    seen = gen.generate(two_images, params=params)
    hidden = gen.generate(two_images, params=params, image_drop=1.0)
    assert seen[0][0].logp != pytest.approx(seen[1][0].logp, abs=1e-4)
    assert hidden[0][0].logp == pytest.approx(hidden[1][0].logp, abs=1e-5)
    assert hidden[0][0].meta["image_tokens_visible"] == 0.0
    # A negligible masking rate takes the per-reply path yet changes nothing: positions are left as they were.
    almost = gen.generate(two_images, params=params, image_drop=1e-12)
    assert [g[0].logp for g in almost] == pytest.approx([g[0].logp for g in seen], abs=1e-5)
    assert all(math.isfinite(g[0].logp) for g in hidden)


def test_prefix_is_continued_and_kept(llava_dir: Path, world_dir: Path) -> None:
    loaded = load_model(llava_dir)
    gen = HFGenerator(loaded.model, loaded.processor)
    out = gen.generate(
        _prompts(world_dir)[:1],
        params=SamplingParams(temperature=0, max_new_tokens=4, stop_at_sentence_end=True),
        prefixes=["There are two"],
    )
    assert out[0][0].text.startswith("There are two")


def test_vllm_backend_is_imported_only_when_built() -> None:
    import sys

    from mmalign.generation.vllm import VllmGenerator, vllm_available

    if vllm_available():
        pytest.skip("vLLM is installed here")
    assert "vllm" not in sys.modules
    with pytest.raises(ImportError):
        VllmGenerator("/nonexistent")
