"""Sampling settings and the pure next-token sampler (greedy, temperature, top-k, top-p)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How replies are sampled.

    Attributes:
        max_new_tokens: most tokens generated per reply.
        temperature: softmax temperature; 0 means greedy.
        top_k: keep only the ``k`` most likely tokens (0: all).
        top_p: keep the smallest set of tokens whose probability reaches ``p`` (1: all).
        stop_at_sentence_end: stop a reply after the first token that ends a sentence (".", "!", "?"), as BDHS's
            guided generation needs; end-of-sequence always stops.
        seed: seed of the sampling generator (same seed, same replies).
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    stop_at_sentence_end: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


GREEDY = SamplingParams(temperature=0.0)
DEFAULT_SAMPLING = SamplingParams()


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set to -inf every logit outside the top-k / nucleus (top-p) set. [N, V] → [N, V].

    Top-p keeps the most likely tokens up to and including the first one at which the cumulative probability
    reaches ``top_p`` (so at least one token always survives).
    """
    out = logits.clone()
    if top_k > 0 and top_k < out.shape[-1]:
        kth = torch.topk(out, top_k, dim=-1).values[..., -1:]
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(out, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Mass strictly before each token: a token is dropped once the mass before it already reaches top_p.
        before = torch.cumsum(probs, dim=-1) - probs
        drop_sorted = before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """Next token ids [N] from logits [N, V] under ``params``."""
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    scaled = filter_logits(logits.float() / params.temperature, params.top_k, params.top_p)
    probs = torch.softmax(scaled, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
