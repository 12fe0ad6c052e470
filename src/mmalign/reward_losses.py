"""Reward-model losses: Bradley–Terry on scalar rewards of a chosen and a rejected reply, pure functions.

``bradley_terry(chosen, rejected, cfg, margin=None)`` returns the unreduced per-pair loss

    L = −log σ(r_c − r_r − m) + λ · (r_c + r_r)²

where m is the pair's margin (``use_margin``: the data's own score difference, as Llama-2's reward model and TRL's
``margin`` column) and λ = ``center_coef`` pulls the rewards towards zero mean (TRL's ``center_rewards_coefficient``,
MM-RLHF's ``w_center``; shared/specs/algorithms.md §5.2). ``reward_metrics`` gives ``accuracy`` and ``margin`` as
TRL's reward trainer names them, and the mean rewards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class RewardLossConfig:
    """Hyper-parameters of the reward-model loss.

    Attributes:
        use_margin: subtract the pair's ``margin`` (its score difference in the data) inside the sigmoid.
        center_coef: weight λ of the centring term λ·(r_c + r_r)² (0 turns it off; MM-RLHF uses 0.01).
    """

    use_margin: bool = False
    center_coef: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.center_coef) and self.center_coef >= 0):
            raise ValueError(f"center_coef must be finite and >= 0, got {self.center_coef}")


def bradley_terry(
    chosen: torch.Tensor, rejected: torch.Tensor, cfg: RewardLossConfig, margin: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-pair loss [B] from rewards [B] (and margins [B] when ``cfg.use_margin``).

    Raises:
        ValueError: ``use_margin`` without margins, or shapes that differ.
    """
    if chosen.shape != rejected.shape or chosen.dim() != 1:
        raise ValueError(f"rewards must both be [B], got {tuple(chosen.shape)} and {tuple(rejected.shape)}")
    diff = chosen - rejected
    if cfg.use_margin:
        if margin is None:
            raise ValueError("use_margin needs each pair's margin (a 'margin' field in the data)")
        diff = diff - margin.to(diff.dtype)
    loss = -F.logsigmoid(diff)
    if cfg.center_coef:
        loss = loss + cfg.center_coef * (chosen + rejected) ** 2
    return loss


def reward_metrics(loss: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, float]:
    """Batch means under TRL's reward-trainer names: ``loss``, ``accuracy`` (chosen scored above rejected),
    ``margin`` (chosen − rejected), ``rewards/chosen``, ``rewards/rejected``."""
    chosen, rejected = chosen.detach().float(), rejected.detach().float()
    values = {
        "loss": loss.detach().float(),
        "accuracy": (chosen > rejected).float(),
        "margin": chosen - rejected,
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
    }
    means = torch.stack([v.mean() for v in values.values()]).tolist()
    return dict(zip(values, means))
