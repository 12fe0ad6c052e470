"""On-policy RL for VLMs, the pure parts: group advantages (GRPO, RLOO), the policy-gradient loss, KL shaping and
the per-token KL penalty, PPO's token rewards, GAE and clipped losses, and Fact-RLHF's symbolic rewards
(shared/specs/algorithms.md §4.2, §4.3, §3.7).

GRPO / RLOO: a step samples ``k`` replies to each of ``B`` prompts; ``rewards`` are [B, k]. The loss is the on-policy
policy gradient with one update per batch of samples, so the importance ratio is 1 and a clip never binds:
``L_i = −A_i · log π(y_i|x) / |y_i|`` (each reply's log-probability averaged over its tokens, as GRPO does; RLOO
uses the summed log-probability, as TRL's RLOO trainer).

PPO: per-token tensors [N, T] over the replies' tokens (``mask`` True on real tokens, right-padded). The reward of
token ``t`` is ``−kl_coef · (log π_old − log π_ref)`` at ``t``, plus the reply's score at its last token; a value
head gives ``V_t`` (the value of the state before token ``t``); GAE turns them into advantages and returns; the
update takes ``ppo_epochs`` clipped steps on the same samples.
"""

from __future__ import annotations

import re
from typing import Literal, NamedTuple

import torch

Algo = Literal["grpo", "rloo"]  # the group estimators; PPO has its own functions below


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


def kl_penalty(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """The per-token KL estimate k3 ``exp(ref − logp) − (ref − logp) − 1`` (≥ 0; TRL's GRPO ``beta`` term), for the KL
    as a loss term; gradients flow through ``logps``."""
    delta = ref_logps.detach() - logps
    return torch.exp(delta) - delta - 1


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` where ``mask`` is True (over ``dim``, or over everything)."""
    m = mask.to(x.dtype)
    if dim is None:
        return (x * m).sum() / m.sum().clamp_min(1)
    return (x * m).sum(dim) / m.sum(dim).clamp_min(1)


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``(x − mean) / std`` over the masked entries (the unbiased std, as TRL's ``masked_whiten``); zero where ``mask``
    is False."""
    mean = masked_mean(x, mask)
    n = mask.sum().clamp_min(2).to(x.dtype)
    var = masked_mean((x - mean) ** 2, mask) * n / (n - 1)
    return torch.where(mask, (x - mean) * torch.rsqrt(var + eps), torch.zeros_like(x))


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """PPO's per-token rewards [N, T]: ``−kl_coef · kl`` on every reply token, plus ``scores`` [N] at each reply's last
    token (a reply with no token gets nothing)."""
    rewards = torch.where(mask, -kl_coef * kl, torch.zeros_like(kl))
    lengths = mask.sum(-1)
    rows = torch.nonzero(lengths > 0).squeeze(-1)
    rewards[rows, lengths[rows] - 1] += scores[rows].to(rewards.dtype)
    return rewards


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over right-padded replies: ``δ_t = r_t + γ V_{t+1} − V_t`` (``V`` is 0 after a
    reply's last token), ``A_t = δ_t + γλ A_{t+1}``; returns (advantages, returns = A + V), zero off the mask."""
    m = mask.to(values.dtype)
    values, rewards = values * m, rewards * m
    advantages = torch.zeros_like(values)
    last = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        following = values[:, t + 1] if t + 1 < values.shape[1] else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * following - values[:, t]
        last = (delta + gamma * lam * last) * m[:, t]
        advantages[:, t] = last
    return advantages, (advantages + values) * m


class PpoLoss(NamedTuple):
    """PPO's loss terms (scalars) and their diagnostics, under TRL's PPO trainer's names."""

    policy: torch.Tensor
    value: torch.Tensor
    clipfrac: torch.Tensor
    value_clipfrac: torch.Tensor
    approx_kl: torch.Tensor


def ppo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
    value_clip: float = 0.2,
) -> PpoLoss:
    """The clipped surrogate ``mean max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε))`` with ``ρ = exp(log π − log π_old)`` and the
    clipped value loss ``½ mean max((V − R)², (V_old + clip(V − V_old, ±ε_v) − R)²)``, both over the masked tokens."""
    ratio = torch.exp(logps - old_logps.detach())
    adv = advantages.detach()
    pg_free, pg_clipped = -adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip)
    pg = torch.maximum(pg_free, pg_clipped)
    clipped_v = old_values.detach() + (values - old_values.detach()).clamp(-value_clip, value_clip)
    vf_free, vf_clipped = (values - returns.detach()) ** 2, (clipped_v - returns.detach()) ** 2
    vf = torch.maximum(vf_free, vf_clipped)
    with torch.no_grad():  # the share of tokens where the clipped term is the one taken (TRL's clip fractions)
        clipfrac = masked_mean((pg_clipped > pg_free).float(), mask)
        value_clipfrac = masked_mean((vf_clipped > vf_free).float(), mask)
        approx_kl = masked_mean(0.5 * (logps - old_logps) ** 2, mask)
    return PpoLoss(masked_mean(pg, mask), 0.5 * masked_mean(vf, mask), clipfrac, value_clipfrac, approx_kl)


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
