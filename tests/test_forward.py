"""The shared-prompt pair forward gives the same log-probs and gradients as scoring full sequences."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from conftest import build_model
from mmalign.data.pair_inputs import encode_pairs
from mmalign.forward import ForwardOptions, PairScorer, unsupported_reason
from mmalign.models.families import FAMILIES as FAMILY_REGISTRY
from mmalign.models.load import load_model
from mmalign.types import ImageRef, Message, PreferencePair

FAMILIES = sorted(FAMILY_REGISTRY)


def _pairs(world: Path) -> list[PreferencePair]:
    """Pairs whose prompts and replies differ in length (so both paddings are exercised)."""
    questions = [
        "Describe the image in detail.",
        "Is there a red star in the image? Answer yes or no.",
        "What colour is the circle?",
    ]
    replies = [
        ("There are two objects. A large blue cross is in the center.", "There is one object."),
        ("No.", "Yes, there is a red star at the top left of the image."),
        ("It is green.", "The circle is blue and it is small."),
    ]
    return [
        PreferencePair(
            id=f"p{i}",
            prompt=(Message.user(q, images=1),),
            chosen=c,
            rejected=r,
            images=(ImageRef(path=f"images/train/{i:06d}.png"),),
            root=str(world),
        )
        for i, (q, (c, r)) in enumerate(zip(questions, replies))
    ]


@pytest.fixture(scope="module", params=FAMILIES)
def model(request: pytest.FixtureRequest, world_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    path = build_model(request.param, world_dir, tmp_path_factory.mktemp(request.param))
    loaded = load_model(path)
    return loaded.model.float().eval(), loaded.processor


def _score(vlm, processor, pairs, options: ForwardOptions, corrupt=None) -> tuple[torch.Tensor, ...]:
    scorer = PairScorer(vlm, options)
    enc = encode_pairs(processor, pairs, share_prompt=scorer.options.share_prompt, corrupt_images=corrupt)
    return scorer(enc)


def test_shared_prompt_matches_full_sequences(model, world_dir: Path) -> None:
    vlm, processor = model
    pairs = _pairs(world_dir)
    corrupt = [[ImageRef(path="images/train/000005.png")] for _ in pairs]
    assert unsupported_reason(vlm) is None
    with torch.no_grad():
        naive = _score(vlm, processor, pairs, ForwardOptions(share_prompt=False, response_logits_only=False), corrupt)
        fast = _score(vlm, processor, pairs, ForwardOptions(), corrupt)
    chosen_n, rejected_n, len_c, len_r, corrupt_n = naive
    chosen_f, rejected_f, len_cf, len_rf, corrupt_f = fast
    assert torch.equal(len_c, len_cf) and torch.equal(len_r, len_rf)
    assert len_c.tolist() != len_r.tolist()
    # Per-token log-probs agree to 1e-5 (float32); the sums agree to that times the reply length.
    for a, b, n in ((chosen_n, chosen_f, len_c), (rejected_n, rejected_f, len_r), (corrupt_n, corrupt_f, len_c)):
        torch.testing.assert_close(a / n, b / n, atol=1e-5, rtol=0)
    # The corrupted image changes the chosen reply's log-prob: the image really conditions the reply.
    assert (chosen_f - corrupt_f).abs().max() > 1e-4


def test_shared_prompt_gives_the_same_gradients(model, world_dir: Path) -> None:
    vlm, processor = model
    pairs = _pairs(world_dir)[:2]
    grads = []
    for options in (ForwardOptions(share_prompt=False, response_logits_only=False), ForwardOptions()):
        vlm.zero_grad(set_to_none=True)
        chosen, rejected, *_ = _score(vlm, processor, pairs, options)
        (chosen - 0.5 * rejected).sum().backward()
        grads.append({n: p.grad.clone() for n, p in vlm.named_parameters() if p.grad is not None})
    vlm.zero_grad(set_to_none=True)
    naive, fast = grads
    assert naive.keys() == fast.keys() and len(naive) > 10
    # The projector's and the first decoder layer's gradients flow through the shared prompt's cache.
    for name in naive:
        torch.testing.assert_close(fast[name], naive[name], atol=1e-4, rtol=1e-3, msg=name)


def test_unsupported_architecture_falls_back_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    class Other(torch.nn.Module):
        config = type("Cfg", (), {"model_type": "paligemma"})()

    with caplog.at_level(logging.WARNING):
        scorer = PairScorer(Other())
    assert scorer.options.share_prompt is False
    assert "paligemma" in caplog.text


def test_llava_loaded_for_real_keeps_the_shared_forward(llava_dir: Path) -> None:
    loaded = load_model(llava_dir)
    assert PairScorer(loaded.model).options.share_prompt is True


def test_short_and_long_replies_run_as_two_batches_with_the_same_result(model, world_dir: Path) -> None:
    vlm, processor = model
    long = "There are two objects. A large blue cross is in the center. A small red star is at the top left."
    pairs = [
        PreferencePair(
            id=f"q{i}",
            prompt=(Message.user("Is there a star?" if i % 2 else "Describe the image in detail.", images=1),),
            chosen="No." if i % 2 else long,
            rejected="Yes." if i % 2 else long.replace("red", "green"),
            images=(ImageRef(path=f"images/train/{i:06d}.png"),),
            root=str(world_dir),
        )
        for i in range(4)
    ]
    enc = encode_pairs(processor, pairs, share_prompt=True)
    groups = enc.shared.length_groups()
    if "image_grid_thw" in enc.shared.prompt:  # one tensor of patches for all prompts: never split
        assert groups is None
        return
    assert [g.tolist() for g in groups] == [[1, 3], [0, 2]]
    results, grads = [], []
    for options in (ForwardOptions(split_by_length=False), ForwardOptions()):
        vlm.zero_grad(set_to_none=True)
        chosen, rejected, len_c, len_r, _ = PairScorer(vlm, options)(enc)
        (chosen - 0.5 * rejected).sum().backward()
        results.append((chosen.detach(), rejected.detach(), len_c, len_r))
        grads.append({n: p.grad.clone() for n, p in vlm.named_parameters() if p.grad is not None})
    vlm.zero_grad(set_to_none=True)
    (c1, r1, lc1, lr1), (c2, r2, lc2, lr2) = results
    assert torch.equal(lc1, lc2) and torch.equal(lr1, lr2) and lc1.tolist()[1] < lc1.tolist()[0]
    torch.testing.assert_close(c2, c1, atol=1e-4, rtol=0)
    torch.testing.assert_close(r2, r1, atol=1e-4, rtol=0)
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-4, rtol=1e-3, msg=name)


def test_batches_are_split_by_length_only_when_every_prompt_has_one_image() -> None:
    from mmalign.data.pair_inputs import Continuations

    lengths = [3, 3, 40, 40, 3, 3]  # k = 2 replies for each of 3 prompts
    mask = torch.tensor([[j < n for j in range(40)] for n in lengths])
    prompt = {"input_ids": torch.zeros(3, 5, dtype=torch.long), "pixel_values": torch.zeros(3, 3, 8, 8)}
    batch = Continuations(prompt, mask.long(), mask, 2, (1, 1, 1))
    assert [g.tolist() for g in batch.length_groups()] == [[0, 2], [1]]
    part = batch.select(torch.tensor([0, 2]))
    assert part.replies.shape == (4, 3) and part.images_per_prompt == (1, 1)
    # Three image rows for prompts holding 2, 1 and 0 images: rows cannot be cut by prompt.
    for counts in ((2, 1, 0), None, (1, 1)):
        assert Continuations(prompt, mask.long(), mask, 2, counts).length_groups() is None


def test_pair_logps_packs_scores_for_the_losses() -> None:
    """One builder for every recipe: counts as floats, the chosen reply's mean NLL, mDPO's term only when scored."""
    from mmalign.forward import PairScores, pair_logps

    scores = PairScores(
        chosen=torch.tensor([-6.0, -2.0]),
        rejected=torch.tensor([-9.0, -1.0]),
        chosen_tokens=torch.tensor([3, 0]),
        rejected_tokens=torch.tensor([4, 2]),
        chosen_corrupt=None,
    )
    ref_c, ref_r = torch.tensor([-5.0, -2.5]), torch.tensor([-8.0, -1.5])
    out = pair_logps(scores, ref_c, ref_r, ref_chosen_corrupt=torch.tensor([-7.0, -3.0]))
    assert out.chosen_tokens.dtype == torch.float32 and out.rejected_tokens.tolist() == [4.0, 2.0]
    # -(-6)/3 = 2; a reply of no tokens divides by 1, not 0.
    assert out.policy_chosen_nll.tolist() == [2.0, 2.0]
    assert out.policy_chosen_corrupt is None and out.ref_chosen_corrupt is None and out.margin is None
    scored = scores._replace(chosen_corrupt=torch.tensor([-7.5, -3.5]))
    corrupt, margin = torch.tensor([-7.0, -3.0]), torch.tensor([1.0, 0.5])
    with_corrupt = pair_logps(scored, ref_c, ref_r, ref_chosen_corrupt=corrupt, margin=margin)
    assert with_corrupt.ref_chosen_corrupt.tolist() == [-7.0, -3.0]
    assert with_corrupt.margin.tolist() == [1.0, 0.5]
    with pytest.raises(ValueError, match="chosen and rejected"):
        pair_logps(scores._replace(rejected=None), ref_c, ref_r)
