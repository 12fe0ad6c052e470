"""On-policy RL for VLMs, the pure parts: group advantages (GRPO, RLOO), the policy-gradient loss, KL shaping and
Fact-RLHF's symbolic rewards (shared/specs/algorithms.md §4.2, §3.7).

A step samples ``k`` replies to each of ``B`` prompts; ``rewards`` are [B, k]. The loss is the on-policy
policy gradient with one update per batch of samples, so PPO's importance ratio is 1 and its clip never binds:
``L_i = −A_i · log π(y_i|x) / |y_i|`` (each reply's log-probability averaged over its tokens, as GRPO does; RLOO
uses the summed log-probability, as TRL's RLOO trainer).
"""

from __future__ import annotations

import re
from typing import Literal

import torch

Algo = Literal["grpo", "rloo"]


def group_advantages(rewards: torch.Tensor, algo: Algo, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """Advantages [B, k] from rewards [B, k] of ``k`` replies per prompt.

    ``grpo``: ``r − mean(group)``, divided by ``std(group) + eps`` when ``scale`` (the unbiased std, as TRL);
    ``rloo``: ``r − mean of the other k − 1 replies`` (leave-one-out baseline; ``scale`` is ignored).

    Raises:
        ValueError: fewer than two replies per prompt.
    """
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [B, k] with k >= 2, got {tuple(rewards.shape)}")
    k = rewards.shape[1]
    if algo == "rloo":
        return rewards - (rewards.sum(-1, keepdim=True) - rewards) / (k - 1)
    centred = rewards - rewards.mean(-1, keepdim=True)
    return centred / (rewards.std(-1, keepdim=True) + eps) if scale else centred


def policy_gradient_loss(logps: torch.Tensor, tokens: torch.Tensor | None, advantages: torch.Tensor) -> torch.Tensor:
    """Per-reply loss [N]: ``−A · log π(y|x) / |y|`` with token counts (GRPO), ``−A · log π(y|x)`` without (RLOO,
    as TRL's RLOO trainer); advantages are constants."""
    if tokens is None:
        return -advantages.detach() * logps
    return -advantages.detach() * logps / tokens.clamp_min(1).to(logps.dtype)


def kl_shaped(rewards: torch.Tensor, logps: torch.Tensor, ref_logps: torch.Tensor, coef: float) -> torch.Tensor:
    """Rewards minus ``coef`` · the sampled KL estimate ``log π(y|x) − log π_ref(y|x)`` (k1, summed over the reply's
    tokens), as RLOO and PPO put the KL into the reward."""
    return rewards - coef * (logps - ref_logps).detach()


def yes_no_correctness(reply: str, label: str) -> float:
    """Fact-RLHF's yes/no term: with gold "no", +0.5 when the reply starts with "No", −0.5 when it starts with "Yes";
    with gold "yes", 0 (the paper rewards only the answer models get wrong by bias)."""
    if str(label).strip().lower() != "no":
        return 0.0
    first = re.match(r"\s*(yes|no)\b", reply, re.IGNORECASE)
    if first is None:
        return 0.0
    return 0.5 if first.group(1).lower() == "no" else -0.5


def symbolic_reward(
    reply: str,
    n_tokens: int,
    finished: bool,
    label: str | None,
    *,
    correct_bonus: float,
    length_penalty: float,
    max_new_tokens: int,
    missing_eos_penalty: float,
) -> float:
    """Fact-RLHF's shaping of one reply: ``correct_bonus · c + length_penalty · n / max_new_tokens +
    missing_eos_penalty · 1[no end of sequence]`` (the penalties are negative numbers to punish)."""
    value = correct_bonus * yes_no_correctness(reply, label) if label is not None else 0.0
    value += length_penalty * n_tokens / max_new_tokens
    return value + (0.0 if finished else missing_eos_penalty)
