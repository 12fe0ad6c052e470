"""Per-sequence log-probabilities of target tokens, from logits and labels.

Convention (as TRL's DPO trainer): the log-prob of a reply is the *sum* over its target tokens of
``log softmax(logits[t])[labels[t+1]]``; positions whose label is ``IGNORE_INDEX`` (prompt, image tokens, padding)
contribute nothing. Masks come from explicit labels, never from ``input_ids != pad_id`` (some models pad with EOS,
which would drop the final EOS from the loss).
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token log-probs of the labels and the mask of labelled positions.

    Args:
        logits: [B, T, V].
        labels: [B, T] with ``IGNORE_INDEX`` where no target applies.

    Returns:
        (logps [B, T-1], mask [B, T-1] bool): ``logps[:, t]`` is log p(labels[:, t+1] | prefix up to t), 0 where masked.
    """
    shift_labels = labels[:, 1:]
    mask = shift_labels != IGNORE_INDEX
    safe = shift_labels.masked_fill(~mask, 0)
    logps = -torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), safe, reduction="none")
    return logps * mask, mask


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-prob of each row's target tokens, and the number of target tokens.

    Returns:
        (logps [B], n_tokens [B] long).
    """
    logps, mask = token_logps(logits, labels)
    return logps.sum(-1), mask.sum(-1)
