"""The efficient pair forward: score several replies to one prompt while encoding the prompt (and its images) once.

A preference step needs log p(reply | prompt, images) for the chosen and the rejected reply (and, for mDPO, the chosen
reply under a corrupted image). The straightforward way, TRL's, runs ``[prompt ; chosen]`` and ``[prompt ; rejected]``
as two full sequences: every image goes through the vision tower twice per model, the prompt's image tokens go through
the decoder twice, and full-vocabulary logits are computed at every position, image tokens included.

Here (``share_prompt``):

1. one decoder pass over the left-padded prompts (images encoded once) returns the key/value cache and the hidden state
   of the last prompt token;
2. the cache is repeated for the ``k`` replies of each prompt, and one pass over the right-padded replies continues from
   it, with position ids restarted at each prompt's length (for M-RoPE: one past the prompt's largest
   position; ``models.families.prompt_positions``) — exactly the positions the full sequence would give them;
3. the language-model head runs only at the positions that predict a reply token (``response_logits_only``).

Gradients flow through the cache into the prompt pass, so the policy is trained exactly as with full sequences; the
result equals the naive path to float32 rounding (tested to 1e-5). Architectures the family registry does not mark as
supported fall back to the naive path with a warning.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from mmalign.data.pair_inputs import Continuations, EncodedPairs, reply_rows
from mmalign.errors import ModelError
from mmalign.logprobs import IGNORE_INDEX, sequence_logps
from mmalign.losses import PairLogps
from mmalign.models.families import family_of, prompt_positions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ForwardOptions:
    """Which optimisations the pair forward uses (each can be switched off, e.g. to measure it alone).

    Attributes:
        share_prompt: encode the prompt and its images once and continue every reply from its cache.
        response_logits_only: apply the LM head only at positions that predict a reply token.
        split_by_length: with the shared prompt, run the prompts with short replies and those with long ones as two
            batches when that spares at least ``SPLIT_MIN_SAVING`` of the padded reply positions (a batch mixing
            yes/no answers with captions pads every "No." to the longest caption).
    """

    share_prompt: bool = True
    response_logits_only: bool = True
    split_by_length: bool = True


def unsupported_reason(model: Any) -> str | None:
    """Why the shared-prompt forward cannot run on ``model`` (``None`` when it can)."""
    inner = inner_model(model)
    config = getattr(inner, "config", None)
    fam = family_of(config) if config is not None else None
    if fam is None or fam.rope is None:
        model_type = getattr(config, "model_type", None)
        return f"model type {model_type!r} is not one the shared-prompt forward knows"
    if not hasattr(inner, "model") or not hasattr(inner, "lm_head"):
        return f"{type(inner).__name__} has no .model/.lm_head"
    text_cfg = inner.config.get_text_config()
    if getattr(text_cfg, "final_logit_softcapping", None) or getattr(text_cfg, "logit_scale", None):
        return "the decoder rescales its logits"
    return None


def inner_model(model: Any) -> Any:
    """The HF model under a PEFT wrapper (LoRA layers are injected in place, so they still run)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _head_logps(lm_head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) from hidden states at the positions that predict each target: [N, H], [N] → [N]."""
    logits = lm_head(hidden).float()
    return torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def continuation_logps(
    model: Any, batch: Continuations, options: ForwardOptions = ForwardOptions()
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs [B*k] and token counts [B*k] of every reply, the prompt encoded once per prompt.

    ``model`` must pass ``unsupported_reason`` (check first; ``PairScorer`` does).
    """
    groups = batch.length_groups() if options.split_by_length else None
    if groups is None:
        return _continuation_logps(model, batch, options)
    parts = [_continuation_logps(model, batch.select(prompts), options) for prompts in groups]
    rows = torch.cat([reply_rows(prompts, batch.k) for prompts in groups])
    back = torch.argsort(rows)  # the groups' rows, in the batch's order
    return torch.cat([p[0] for p in parts])[back], torch.cat([p[1] for p in parts])[back]


def continuation_hidden(model: Any, batch: Continuations, n_tokens: int) -> torch.Tensor:
    """Decoder hidden states [B*k, 1 + n_tokens, H]: each prompt's last token (the prompt and its images encoded
    once per prompt), then the first ``n_tokens`` tokens of each of its ``k`` replies continued from its cache.

    ``model`` must pass ``unsupported_reason``.
    """
    inner = inner_model(model)
    base = inner.model
    prompt, k = batch.prompt, batch.k
    mask = prompt["attention_mask"]
    pos = prompt_positions(inner, prompt)
    out = base(**prompt, position_ids=pos, use_cache=True, return_dict=True)
    last = out.last_hidden_state[:, -1:]  # left padding: the last column is every prompt's last token
    replies, reply_mask = batch.replies, batch.reply_mask
    if k > 1:
        last = last.repeat_interleave(k, dim=0)
    if n_tokens < 1:
        return last
    cache = out.past_key_values
    if k > 1:
        cache.batch_repeat_interleave(k)
    start = (pos.amax(dim=(0, 2)) if pos.dim() == 3 else pos[:, -1]) + 1
    cont_pos = start.repeat_interleave(k).unsqueeze(-1) + torch.arange(n_tokens, device=replies.device)
    if pos.dim() == 3:
        cont_pos = cont_pos.unsqueeze(0).expand(3, -1, -1)
    full_mask = torch.cat([mask.repeat_interleave(k, dim=0), reply_mask[:, :n_tokens].to(mask.dtype)], dim=1)
    cont = base(
        input_ids=replies[:, :n_tokens],
        attention_mask=full_mask,
        position_ids=cont_pos,
        past_key_values=cache,
        use_cache=True,
        return_dict=True,
    )
    return torch.cat([last, cont.last_hidden_state], dim=1)


def _continuation_logps(model: Any, batch: Continuations, options: ForwardOptions) -> tuple[torch.Tensor, torch.Tensor]:
    lm_head = inner_model(model).lm_head
    replies, reply_mask = batch.replies, batch.reply_mask
    n_rows, width = replies.shape
    # The reply's last token predicts nothing we score, so the continuation stops one short.
    hidden = continuation_hidden(model, batch, width - 1)
    rows = torch.arange(n_rows, device=replies.device).unsqueeze(-1).expand(-1, width)
    if options.response_logits_only:
        token_logps = _head_logps(lm_head, hidden[reply_mask], replies[reply_mask])
    else:
        all_logps = torch.log_softmax(lm_head(hidden).float(), dim=-1)
        token_logps = all_logps.gather(-1, replies.unsqueeze(-1)).squeeze(-1)[reply_mask]
    sums = torch.zeros(n_rows, dtype=token_logps.dtype, device=replies.device)
    sums = sums.index_add(0, rows[reply_mask], token_logps)
    return sums, reply_mask.sum(-1)


def decoder_hidden(model: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Final hidden states [N, T, H] of full sequences: the decoder alone (no language-model head over every
    position) where the family allows, else the whole model's last hidden states."""
    if unsupported_reason(model) is None:
        return inner_model(model).model(**inputs, use_cache=False, return_dict=True).last_hidden_state
    return model(**inputs, use_cache=False, output_hidden_states=True, return_dict=True).hidden_states[-1]


def full_sequence_logps(
    model: Any, enc: dict[str, torch.Tensor], options: ForwardOptions = ForwardOptions()
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed reply log-probs [N] and token counts [N] of full sequences (``encode_sft`` outputs with labels).

    With ``response_logits_only`` and a model that exposes ``.model``/``.lm_head``, the head runs only where a
    label is scored; otherwise the model's full logits are used.
    """
    inputs = dict(enc)
    labels = inputs.pop("labels")
    inner = inner_model(model)
    if options.response_logits_only and unsupported_reason(model) is None:
        hidden = decoder_hidden(model, inputs)
        target_mask = labels[:, 1:] != IGNORE_INDEX
        token_logps = _head_logps(inner.lm_head, hidden[:, :-1][target_mask], labels[:, 1:][target_mask])
        rows = torch.arange(labels.shape[0], device=labels.device).unsqueeze(-1).expand_as(target_mask)
        sums = torch.zeros(labels.shape[0], dtype=token_logps.dtype, device=labels.device)
        return sums.index_add(0, rows[target_mask], token_logps), target_mask.sum(-1)
    logits = model(**inputs, use_cache=False).logits
    return sequence_logps(logits, labels)


class PairScores(NamedTuple):
    """Log-probs of a batch of pairs under one model, every tensor [B] (a named tuple, so DDP sees its tensors).

    Attributes:
        chosen / rejected: summed log p(reply | prompt, images).
        chosen_tokens / rejected_tokens: reply token counts.
        chosen_corrupt: summed log p(chosen | prompt, corrupted images) (mDPO), when the batch was encoded for it.
    """

    chosen: torch.Tensor | None
    rejected: torch.Tensor | None
    chosen_tokens: torch.Tensor | None
    rejected_tokens: torch.Tensor | None
    chosen_corrupt: torch.Tensor | None


class PairScorer(torch.nn.Module):
    """Wraps a VLM so that one ``forward`` call scores a whole batch of pairs (``PairScores``).

    One call per micro-step keeps the policy's computation inside a single ``forward``, as DDP requires when
    ``accelerate`` wraps this module; the VLM itself stays reachable as ``.vlm`` for saving. The parts the batch was
    not encoded for are ``None`` (``EncodedPairs.only_corrupt`` scores only mDPO's corrupted-image term).
    """

    wraps_vlm = True  # ``runtime.run.unwrapped`` saves ``.vlm``

    @property
    def _no_split_modules(self) -> list[str] | None:
        """The VLM's layers that a sharded engine (FSDP2) wraps one by one."""
        return getattr(self.vlm, "_no_split_modules", None)

    def __init__(self, vlm: torch.nn.Module, options: ForwardOptions = ForwardOptions()) -> None:
        super().__init__()
        self.vlm = vlm
        reason = unsupported_reason(vlm) if options.share_prompt else None
        if reason is not None:
            log.warning("shared-prompt pair forward unavailable (%s); scoring full sequences instead", reason)
            options = ForwardOptions(share_prompt=False, response_logits_only=options.response_logits_only)
        self.options = options

    def forward(self, batch: EncodedPairs) -> PairScores:
        n = batch.n
        chosen = rejected = chosen_len = rejected_len = None
        if batch.shared is not None:
            logps, lengths = continuation_logps(self.vlm, batch.shared, self.options)
            chosen, rejected = logps.view(n, 2).unbind(-1)
            chosen_len, rejected_len = lengths.view(n, 2).unbind(-1)
        elif batch.full is not None:
            logps, lengths = full_sequence_logps(self.vlm, batch.full, self.options)
            chosen, rejected = logps[:n], logps[n:]
            chosen_len, rejected_len = lengths[:n], lengths[n:]
        corrupt = None
        if batch.corrupt_shared is not None:
            corrupt, _ = continuation_logps(self.vlm, batch.corrupt_shared, self.options)
        elif batch.corrupt_full is not None:
            corrupt, _ = full_sequence_logps(self.vlm, batch.corrupt_full, self.options)
        return PairScores(chosen, rejected, chosen_len, rejected_len, corrupt)


def pair_logps(
    policy: PairScores,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    ref_chosen_corrupt: torch.Tensor | None = None,
    margin: torch.Tensor | None = None,
) -> PairLogps:
    """The loss functions' input from the policy's scores (with grad) and the reference's log-probs: token counts,
    the chosen reply's mean NLL (RPO's term), mDPO's corrupted-image term when the policy scored it, MM-DPO's margin.
    """
    chosen, chosen_len = policy.chosen, policy.chosen_tokens
    if chosen is None or policy.rejected is None or chosen_len is None or policy.rejected_tokens is None:
        raise ValueError("pair_logps needs the policy's chosen and rejected scores")
    return PairLogps(
        policy_chosen=chosen,
        policy_rejected=policy.rejected,
        ref_chosen=ref_chosen,
        ref_rejected=ref_rejected,
        chosen_tokens=chosen_len.float(),
        rejected_tokens=policy.rejected_tokens.float(),
        policy_chosen_corrupt=policy.chosen_corrupt,
        ref_chosen_corrupt=ref_chosen_corrupt if policy.chosen_corrupt is not None else None,
        margin=margin,
        policy_chosen_nll=-chosen / chosen_len.clamp_min(1),
    )


VALUE_HEAD = "value_head"  # PPO's value head, a ``Linear(H, 1)`` submodule of the policy's VLM while it trains


class TokenScores(NamedTuple):
    """Per-token outputs [B*k, T] on ``k`` replies to each prompt (zero off ``mask``).

    Attributes:
        logps: log π(token | prompt, images, earlier reply tokens), float32.
        mask: True on reply tokens (the batch's ``reply_mask``).
        values: the value head's ``V_t`` of the state before each token (float32), when the VLM carries a value head.
    """

    logps: torch.Tensor
    mask: torch.Tensor
    values: torch.Tensor | None

    def sums(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each reply's summed log-prob [B*k] and token count [B*k]."""
        return self.logps.sum(-1), self.mask.sum(-1)


def continuation_token_scores(model: Any, batch: Continuations, split_by_length: bool = True) -> TokenScores:
    """Per-token log-probs (and values, when ``model`` carries ``VALUE_HEAD``) of every reply, each prompt and its
    images encoded once; the language-model head runs only on reply tokens. With ``split_by_length``, prompts with
    short replies and those with long ones run as two batches when that spares padding (``ForwardOptions``); the
    result is laid out as the batch. ``model`` must pass ``unsupported_reason``."""
    groups = batch.length_groups() if split_by_length else None
    if groups is None:
        return _token_scores(model, batch)
    parts = [(reply_rows(prompts, batch.k), _token_scores(model, batch.select(prompts))) for prompts in groups]
    logps = torch.zeros(batch.replies.shape, dtype=torch.float32, device=batch.replies.device)
    values = None if parts[0][1].values is None else torch.zeros_like(logps)
    for rows, part in parts:
        width = part.logps.shape[1]
        logps[rows, :width] = part.logps
        if values is not None and part.values is not None:
            values[rows, :width] = part.values
    return TokenScores(logps, batch.reply_mask, values)


def _token_scores(model: Any, batch: Continuations) -> TokenScores:
    inner = inner_model(model)
    replies, mask = batch.replies, batch.reply_mask
    # Column t of the hidden states is the state before reply token t (column 0: the prompt's last token).
    hidden = continuation_hidden(model, batch, replies.shape[1] - 1)
    logps = torch.zeros(replies.shape, dtype=torch.float32, device=replies.device)
    logps[mask] = _head_logps(inner.lm_head, hidden[mask], replies[mask])
    head = getattr(inner, VALUE_HEAD, None)
    values = None
    if head is not None:
        values = head(hidden).squeeze(-1).float() * mask
    return TokenScores(logps, mask, values)


class TokenScorer(torch.nn.Module):
    """Wraps a VLM so that one ``forward(Continuations)`` returns the ``TokenScores`` of ``k`` replies to each prompt,
    each prompt and its images encoded once (on-policy RL's forward, inside one ``forward`` for DDP). Keeps the VLM
    as ``.vlm`` (marked ``wraps_vlm``)."""

    wraps_vlm = True

    @property
    def _no_split_modules(self) -> list[str] | None:
        """The VLM's layers that a sharded engine (FSDP2) wraps one by one."""
        return getattr(self.vlm, "_no_split_modules", None)

    def __init__(self, vlm: torch.nn.Module) -> None:
        super().__init__()
        reason = unsupported_reason(vlm)
        if reason is not None:
            raise ModelError(f"on-policy RL needs the shared-prompt forward: {reason}")
        self.vlm = vlm

    def forward(self, batch: Continuations) -> TokenScores:
        return continuation_token_scores(self.vlm, batch)
