"""Bradley–Terry reward losses on hand-computed numbers."""

from __future__ import annotations

import math

import pytest
import torch

from mmalign.reward_losses import RewardLossConfig, bradley_terry, reward_metrics


def _nls(z: float) -> float:
    return -math.log(1 / (1 + math.exp(-z)))


def test_plain_bradley_terry_by_hand() -> None:
    chosen, rejected = torch.tensor([2.0, 0.0, -1.0]), torch.tensor([1.0, 0.0, 1.0])
    loss = bradley_terry(chosen, rejected, RewardLossConfig())
    assert loss.tolist() == pytest.approx([_nls(1.0), math.log(2.0), _nls(-2.0)])


def test_margin_and_centring_by_hand() -> None:
    chosen, rejected = torch.tensor([2.0, 0.5]), torch.tensor([1.0, 0.5])
    margin = torch.tensor([0.5, -1.0])
    cfg = RewardLossConfig(use_margin=True, center_coef=0.1)
    loss = bradley_terry(chosen, rejected, cfg, margin)
    # −log σ(1 − 0.5) + 0.1·3² and −log σ(0 + 1) + 0.1·1²
    assert loss.tolist() == pytest.approx([_nls(0.5) + 0.9, _nls(1.0) + 0.1])
    with pytest.raises(ValueError, match="margin"):
        bradley_terry(chosen, rejected, cfg)
    with pytest.raises(ValueError, match="center_coef"):
        RewardLossConfig(center_coef=-1.0)


def test_gradient_pushes_the_chosen_reward_up() -> None:
    chosen = torch.tensor([0.0], requires_grad=True)
    rejected = torch.tensor([0.0], requires_grad=True)
    bradley_terry(chosen, rejected, RewardLossConfig()).sum().backward()
    assert chosen.grad.item() == pytest.approx(-0.5) and rejected.grad.item() == pytest.approx(0.5)


def test_metrics_use_trl_names() -> None:
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    loss = bradley_terry(chosen, rejected, RewardLossConfig())
    m = reward_metrics(loss, chosen, rejected)
    assert m["accuracy"] == 0.5 and m["margin"] == 0.0
    assert m["rewards/chosen"] == 1.0 and m["rewards/rejected"] == 1.0
    assert m["loss"] == pytest.approx((_nls(1.0) + _nls(-1.0)) / 2)
