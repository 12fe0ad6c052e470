"""GRPO / RLOO advantages, the policy-gradient loss, KL shaping and penalty, PPO's token rewards, GAE, whitening and
clipped losses, and Fact-RLHF's symbolic rewards, by hand."""

from __future__ import annotations

import pytest
import torch

from mmalign.rl_losses import (
    gae,
    group_advantages,
    kl_penalty,
    kl_shaped,
    masked_mean,
    policy_gradient_loss,
    ppo_loss,
    symbolic_reward,
    token_rewards,
    whiten,
    yes_no_correctness,
)


def test_grpo_advantages_by_hand() -> None:
    rewards = torch.tensor([[1.0, 3.0], [2.0, 2.0]])
    # Group 1: mean 2, unbiased std sqrt(2); group 2: all equal → 0.
    adv = group_advantages(rewards, "grpo", eps=0.0)
    assert adv[0].tolist() == pytest.approx([-1 / 2**0.5, 1 / 2**0.5])
    assert group_advantages(rewards, "grpo", eps=1e-4)[1].tolist() == [0.0, 0.0]
    assert group_advantages(rewards, "grpo", scale=False)[0].tolist() == [-1.0, 1.0]


def test_rloo_advantages_by_hand() -> None:
    rewards = torch.tensor([[1.0, 2.0, 6.0]])
    # 1 − (2+6)/2 = −3; 2 − (1+6)/2 = −1.5; 6 − (1+2)/2 = 4.5
    assert group_advantages(rewards, "rloo").tolist() == [[-3.0, -1.5, 4.5]]
    with pytest.raises(ValueError, match="k >= 2"):
        group_advantages(torch.tensor([[1.0]]), "rloo")


def test_policy_gradient_raises_the_better_reply() -> None:
    logps = torch.tensor([-4.0, -6.0], requires_grad=True)
    loss = policy_gradient_loss(logps, torch.tensor([2, 3]), torch.tensor([1.0, -1.0]))
    assert loss.tolist() == pytest.approx([2.0, -2.0])  # −1·(−4)/2 and +1·(−6)/3
    loss.sum().backward()
    assert logps.grad.tolist() == pytest.approx([-0.5, 1 / 3])  # descent raises the first, lowers the second
    summed = policy_gradient_loss(torch.tensor([-4.0, -6.0]), None, torch.tensor([1.0, -1.0]))
    assert summed.tolist() == pytest.approx([4.0, -6.0])  # RLOO: the summed log-probability


def test_kl_shaping_by_hand() -> None:
    shaped = kl_shaped(torch.tensor([1.0, 1.0]), torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -5.0]), coef=0.1)
    assert shaped.tolist() == pytest.approx([0.9, 1.0])


def test_fact_rlhf_symbolic_rewards_by_hand() -> None:
    assert yes_no_correctness("No, there is none.", "no") == 0.5
    assert yes_no_correctness("Yes.", "no") == -0.5
    assert yes_no_correctness("Yes.", "yes") == 0.0 and yes_no_correctness("Maybe.", "no") == 0.0
    # Only the words themselves: "Nothing", "Now" and "Yesterday" start no answer.
    assert yes_no_correctness("Nothing is there.", "no") == 0.0 and yes_no_correctness("Now I see.", "no") == 0.0
    assert yes_no_correctness("Yesterday.", "no") == 0.0 and yes_no_correctness("  no!", "No") == 0.5
    assert yes_no_correctness("No.", True) == 0.0  # a label that is not "no" gives nothing
    kwargs = {"correct_bonus": 2.0, "length_penalty": -10.0, "max_new_tokens": 20, "missing_eos_penalty": -8.0}
    # 2·0.5 − 10·4/20 = −1; not finished: −8 more.
    assert symbolic_reward("No.", 4, True, "no", **kwargs) == pytest.approx(-1.0)
    assert symbolic_reward("No.", 4, False, "no", **kwargs) == pytest.approx(-9.0)
    assert symbolic_reward("A star.", 10, True, None, **kwargs) == pytest.approx(-5.0)


def _close(actual: torch.Tensor, expected: list) -> None:
    torch.testing.assert_close(actual.detach().float(), torch.tensor(expected), rtol=1e-5, atol=1e-6)


def test_k3_kl_penalty_by_hand() -> None:
    logps = torch.tensor([-1.0, -2.0], requires_grad=True)
    ref = torch.tensor([-1.0, -1.0])
    k3 = kl_penalty(logps, ref)
    # delta = ref − logp: 0 → 0; 1 → e − 1 − 1 = e − 2
    _close(k3, [0.0, 2.718281828 - 2])
    k3.sum().backward()
    _close(logps.grad, [0.0, -(2.718281828 - 1)])  # d/dlogp = −(e^δ − 1)


def test_token_rewards_put_the_score_on_the_last_token() -> None:
    mask = torch.tensor([[True, True, True], [True, False, False], [False, False, False]])
    kl = torch.tensor([[0.5, -1.0, 2.0], [1.0, 9.0, 9.0], [9.0, 9.0, 9.0]])
    r = token_rewards(torch.tensor([3.0, -1.0, 7.0]), kl, mask, kl_coef=0.1)
    _close(r, [[-0.05, 0.1, 2.8], [-1.1, 0.0, 0.0], [0.0, 0.0, 0.0]])


def test_gae_by_hand() -> None:
    # One reply of three tokens, one of two (padded); γ = 0.9, λ = 0.5.
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 5.0]])
    values = torch.tensor([[0.5, 0.2, 0.4], [1.0, 1.0, 7.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    # Row 0: δ2 = 1 − 0.4 = 0.6; δ1 = 0 + 0.9·0.4 − 0.2 = 0.16; δ0 = 0.9·0.2 − 0.5 = −0.32
    # A2 = 0.6; A1 = 0.16 + 0.45·0.6 = 0.43; A0 = −0.32 + 0.45·0.43 = −0.1265
    # Row 1 (the padded token's value and reward are ignored): δ1 = 2 − 1 = 1; δ0 = 0.9·1 − 1 = −0.1; A0 = −0.1 + 0.45
    _close(adv[0], [-0.1265, 0.43, 0.6])
    _close(adv[1], [0.35, 1.0, 0.0])
    _close(ret[0], [0.3735, 0.63, 1.0])
    _close(ret[1], [1.35, 2.0, 0.0])
    # γ = λ = 1 and V = 0: every token's advantage is the reply's return from there on.
    plain, _ = gae(rewards, torch.zeros(2, 3), mask, gamma=1.0, lam=1.0)
    _close(plain, [[1.0, 1.0, 1.0], [2.0, 2.0, 0.0]])


def test_whiten_and_masked_mean_ignore_padding() -> None:
    x = torch.tensor([[1.0, 3.0], [5.0, 100.0]])
    mask = torch.tensor([[True, True], [True, False]])
    assert masked_mean(x, mask).item() == pytest.approx(3.0)
    assert masked_mean(x, mask, dim=-1).tolist() == pytest.approx([2.0, 5.0])
    w = whiten(x, mask, eps=0.0)
    std = 2.0  # values 1, 3, 5: mean 3, unbiased variance 4
    _close(w, [[-2 / std, 0.0], [2 / std, 0.0]])


def test_ppo_loss_by_hand() -> None:
    mask = torch.tensor([[True, True, False]])
    old = torch.tensor([[0.0, 0.0, 0.0]])
    # Ratios e^0.5 ≈ 1.65 (clipped to 1.2 for A > 0) and e^−0.5 ≈ 0.61 (A < 0: max picks the clipped 0.8 → −(−1)·0.8)
    logps = torch.tensor([[0.5, -0.5, 3.0]], requires_grad=True)
    adv = torch.tensor([[1.0, -1.0, 5.0]])
    values = torch.tensor([[1.0, 0.0, 9.0]], requires_grad=True)
    old_values = torch.tensor([[0.5, 0.0, 0.0]])
    returns = torch.tensor([[2.0, 0.1, 0.0]])
    terms = ppo_loss(logps, old, adv, values, old_values, returns, mask, clip=0.2, value_clip=0.2)
    e = 2.718281828
    # token 0: max(−1.6487, −1.2) = −1.2; token 1: max(e^−0.5, 0.8) = 0.8 → mean −0.2
    assert terms.policy.item() == pytest.approx((-1.2 + 0.8) / 2)
    # value: token 0: max((1 − 2)², (0.7 − 2)²) = 1.69; token 1: max(0.01, 0.01) = 0.01 → ½ · mean = 0.425
    assert terms.value.item() == pytest.approx(0.5 * (1.69 + 0.01) / 2)
    # The clipped term is taken on both tokens; the clipped value term only on token 0 (1.69 > 1).
    assert terms.clipfrac.item() == pytest.approx(1.0) and terms.value_clipfrac.item() == pytest.approx(0.5)
    # A ratio outside the clip range whose unclipped term is taken is not counted: A > 0 and ρ = e^−0.5 < 0.8.
    low = ppo_loss(torch.tensor([[-0.5, 0.0]]), torch.zeros(1, 2), torch.tensor([[1.0, 1.0]]), torch.zeros(1, 2),
                   torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([[True, True]]))  # fmt: skip
    assert low.clipfrac.item() == 0.0 and low.policy.item() == pytest.approx(-(e**-0.5 + 1) / 2)
    assert terms.approx_kl.item() == pytest.approx(0.5 * 0.25)
    terms.policy.backward()
    # Both tokens are clipped, so no gradient reaches the policy's log-probs.
    _close(logps.grad, [[0.0, 0.0, 0.0]])
    inside = torch.tensor([[0.1, 0.0, 0.0]], requires_grad=True)
    ppo_loss(inside, old, adv, values, old_values, returns, mask).policy.backward()
    _close(inside.grad, [[-(e**0.1) / 2, 1 / 2, 0.0]])
