"""GRPO / RLOO advantages, the policy-gradient loss, KL shaping and Fact-RLHF's symbolic rewards, by hand."""

from __future__ import annotations

import pytest
import torch

from mmalign.rl_losses import group_advantages, kl_shaped, policy_gradient_loss, symbolic_reward, yes_no_correctness


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
