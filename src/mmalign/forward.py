"""The efficient pair forward: score several replies to one prompt while encoding the prompt (and its images) once.

A preference step needs log p(reply | prompt, images) for the chosen and the rejected reply (and, for mDPO, the chosen
reply under a corrupted image). The straightforward way, TRL's, runs ``[prompt ; chosen]`` and ``[prompt ; rejected]``
as two full sequences: every image goes through the vision tower twice per model, the prompt's image tokens go through
the decoder twice, and full-vocabulary logits are computed at every position, image tokens included.

Here (``share_prompt``):

1. one decoder pass over the left-padded prompts (images encoded once) returns the key/value cache and the hidden state
   of the last prompt token;
2. the cache is repeated for the ``k`` replies of each prompt, and one pass over the right-padded replies continues from
   it, with position ids restarted at each prompt's length (for Qwen2-VL's M-RoPE: one past the prompt's largest
   position) — exactly the positions the full sequence would give them;
3. the language-model head runs only at the positions that predict a reply token (``response_logits_only``).

Gradients flow through the cache into the prompt pass, so the policy is trained exactly as with full sequences; the
result equals the naive path to float32 rounding (tested to 1e-5). Architectures the family registry does not mark as
supported fall back to the naive path with a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mmalign.data.collate import encode_sft, load_image_groups, processor_inputs, render
from mmalign.logprobs import IGNORE_INDEX, sequence_logps
from mmalign.types import Message, PreferencePair, Sample

log = logging.getLogger(__name__)

# Model types whose decoder is a plain causal LM with 1-D rotary positions, or Qwen2-VL's 3-D M-RoPE.
ROPE_1D = frozenset({"llava", "idefics3"})
ROPE_3D = frozenset({"qwen2_vl", "qwen2_5_vl"})
SPLIT_MIN_SAVING = 0.2


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


@dataclass
class Continuations:
    """``k`` replies to each of ``B`` prompts, ready for the shared-prompt forward.

    Attributes:
        prompt: processor outputs of the prompts (left-padded): ``input_ids`` [B, P], ``attention_mask`` [B, P],
            pixel tensors.
        replies: reply token ids [B*k, T], right-padded with 0; rows ``i*k .. i*k+k-1`` answer prompt ``i``.
        reply_mask: [B*k, T] bool, True on reply tokens.
        k: replies per prompt.
        images_per_prompt: images of each prompt (None: unknown; such batches are never split by length).
    """

    prompt: dict[str, torch.Tensor]
    replies: torch.Tensor
    reply_mask: torch.Tensor
    k: int
    images_per_prompt: tuple[int, ...] | None = None

    def to(self, device: torch.device | str) -> Continuations:
        return Continuations(
            {key: v.to(device) for key, v in self.prompt.items()},
            self.replies.to(device),
            self.reply_mask.to(device),
            self.k,
            self.images_per_prompt,
        )

    def select(self, prompts: torch.Tensor) -> Continuations:
        """The prompts at indices ``prompts`` with their replies, reply columns cut to the longest kept reply.

        Only for prompt inputs with one row per prompt in every tensor (``length_groups`` checks).
        """
        rows = reply_rows(prompts, self.k)
        mask = self.reply_mask[rows]
        width = max(1, int(mask.sum(-1).max()))
        kept = self.images_per_prompt and tuple(self.images_per_prompt[i] for i in prompts.tolist())
        return Continuations(
            {key: v[prompts] for key, v in self.prompt.items()},
            self.replies[rows, :width],
            mask[:, :width],
            self.k,
            kept or None,
        )

    def length_groups(self) -> list[torch.Tensor] | None:
        """Prompt indices of a short-reply and a long-reply group, or None when one batch wastes little.

        The split point minimises the padded reply positions of the two groups; it is taken only when that spares
        at least ``SPLIT_MIN_SAVING`` of the single batch's positions. Only batches whose prompts all hold one image
        (or all none) and whose tensors have one row per prompt are split: a tensor of image rows or patches shared
        by the prompts (several images per prompt, Qwen2-VL's patch lists) cannot be cut by prompt.
        """
        n = self.prompt["input_ids"].shape[0]
        counts = set(self.images_per_prompt or ())
        if n < 2 or len(self.images_per_prompt or ()) != n or counts not in ({0}, {1}):
            return None
        if any(v.shape[0] != n for v in self.prompt.values()):
            return None
        longest = self.reply_mask.sum(-1).view(n, self.k).amax(-1)
        order = torch.argsort(longest, stable=True)
        ranked = longest[order].tolist()
        single = n * ranked[-1]
        cost, split = min(((s * ranked[s - 1] + (n - s) * ranked[-1], s) for s in range(1, n)), key=lambda c: c[0])
        if cost > (1 - SPLIT_MIN_SAVING) * single:
            return None
        return [order[:split], order[split:]]


def reply_rows(prompts: torch.Tensor, k: int) -> torch.Tensor:
    """Rows of the replies of the prompts at indices ``prompts`` (``k`` consecutive rows per prompt)."""
    return (prompts.unsqueeze(-1) * k + torch.arange(k, device=prompts.device)).reshape(-1)


def _tokenizer(processor: Any) -> Any:
    return getattr(processor, "tokenizer", processor)


def encode_continuations(
    processor: Any,
    prompts: Sequence[Sample],
    replies: Sequence[Sequence[str]],
    max_length: int | None = None,
) -> Continuations:
    """Encode prompts (with their images) once and their replies as separate token rows.

    Args:
        prompts: ``B`` samples holding the prompt turns only (``messages`` end with a user turn).
        replies: ``B`` lists of ``k`` reply texts each.
        max_length: longest allowed prompt + reply, in tokens (image tokens included).

    Raises:
        ValueError: replies of unequal count, a chat template that is not prefix-stable, or a sequence longer than
            ``max_length``.
    """
    k = len(replies[0])
    if any(len(r) != k for r in replies):
        raise ValueError("every prompt needs the same number of replies")
    tok = _tokenizer(processor)
    prefixes = [render(processor, s.messages, generation_prompt=True) for s in prompts]
    enc = processor_inputs(processor, prefixes, load_image_groups(prompts), padding_side="left")
    prompt_lens = enc["attention_mask"].sum(-1).tolist()
    tails: list[str] = []
    for sample, prefix, texts in zip(prompts, prefixes, replies):
        for text in texts:
            full = render(processor, (*sample.messages, Message.assistant(text)))
            if not full.startswith(prefix):
                raise ValueError("chat template is not prefix-stable; cannot split prompt and reply")
            tails.append(full[len(prefix) :])
    rows: list[list[int]] = tok(tails, add_special_tokens=False)["input_ids"]  # one call for every reply
    for i, ids in enumerate(rows):
        sample, p_len = prompts[i // k], prompt_lens[i // k]
        if max_length is not None and p_len + len(ids) > max_length:
            raise ValueError(f"sample {sample.id!r} has {p_len + len(ids)} tokens > max_length={max_length}")
    width = max(1, max(len(r) for r in rows))
    replies_t = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, ids in enumerate(rows):
        replies_t[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[i, : len(ids)] = True
    return Continuations(enc, replies_t, mask, k, tuple(len(s.images) for s in prompts))


def prompt_sample(pair: PreferencePair, images: Sequence[Any] | None = None) -> Sample:
    """The pair's prompt as a ``Sample`` (optionally with other images, e.g. mDPO's corrupted one)."""
    return Sample(
        id=pair.id,
        messages=pair.prompt,
        images=tuple(images) if images is not None else pair.images,
        root=pair.root,
        meta=pair.meta,
    )


def unsupported_reason(model: Any) -> str | None:
    """Why the shared-prompt forward cannot run on ``model`` (``None`` when it can)."""
    inner = inner_model(model)
    model_type = getattr(getattr(inner, "config", None), "model_type", None)
    if model_type not in ROPE_1D | ROPE_3D:
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


def prompt_positions(base: Any, model_type: str, prompt: dict[str, torch.Tensor]) -> torch.Tensor:
    """Position ids of the left-padded prompts: [B, P], or [3, B, P] for M-RoPE."""
    mask = prompt["attention_mask"]
    linear = (mask.long().cumsum(-1) - 1).clamp_min(0)
    if model_type not in ROPE_3D:
        return linear
    if "image_grid_thw" not in prompt:
        return linear.unsqueeze(0).expand(3, -1, -1)
    pos, _ = base.get_rope_index(
        prompt["input_ids"],
        image_grid_thw=prompt["image_grid_thw"],
        attention_mask=mask,
        mm_token_type_ids=prompt.get("mm_token_type_ids"),
    )
    return pos


def _head_logps(lm_head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) from hidden states at the positions that predict each target: [N, H], [N] → [N]."""
    logits = lm_head(hidden).float()
    return torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def continuation_logps(
    model: Any, batch: Continuations, options: ForwardOptions = ForwardOptions()
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs [B*k] and token counts [B*k] of every reply, the prompt encoded once per prompt.

    ``model`` must pass ``unsupported_reason`` (check first; ``score_pairs`` does).
    """
    groups = batch.length_groups() if options.split_by_length else None
    if groups is None:
        return _continuation_logps(model, batch, options)
    parts = [_continuation_logps(model, batch.select(prompts), options) for prompts in groups]
    rows = torch.cat([reply_rows(prompts, batch.k) for prompts in groups])
    back = torch.argsort(rows)  # the groups' rows, in the batch's order
    return torch.cat([p[0] for p in parts])[back], torch.cat([p[1] for p in parts])[back]


def _continuation_logps(model: Any, batch: Continuations, options: ForwardOptions) -> tuple[torch.Tensor, torch.Tensor]:
    inner = inner_model(model)
    base, lm_head = inner.model, inner.lm_head
    model_type = inner.config.model_type
    prompt, k = batch.prompt, batch.k
    mask = prompt["attention_mask"]
    pos = prompt_positions(base, model_type, prompt)
    out = base(**prompt, position_ids=pos, use_cache=True, return_dict=True)
    last = out.last_hidden_state[:, -1:]  # left padding: the last column is every prompt's last token
    replies, reply_mask = batch.replies, batch.reply_mask
    n_rows, width = replies.shape
    if k > 1:
        last = last.repeat_interleave(k, dim=0)
    hidden = last
    if width > 1:
        # The reply's last token predicts nothing we score, so the continuation stops one short.
        cache = out.past_key_values
        if k > 1:
            cache.batch_repeat_interleave(k)
        start = (pos.amax(dim=(0, 2)) if pos.dim() == 3 else pos[:, -1]) + 1
        cont_pos = start.repeat_interleave(k).unsqueeze(-1) + torch.arange(width - 1, device=replies.device)
        if pos.dim() == 3:
            cont_pos = cont_pos.unsqueeze(0).expand(3, -1, -1)
        full_mask = torch.cat([mask.repeat_interleave(k, dim=0), reply_mask[:, :-1].to(mask.dtype)], dim=1)
        cont = base(
            input_ids=replies[:, :-1],
            attention_mask=full_mask,
            position_ids=cont_pos,
            past_key_values=cache,
            use_cache=True,
            return_dict=True,
        )
        hidden = torch.cat([last, cont.last_hidden_state], dim=1)
    rows = torch.arange(n_rows, device=replies.device).unsqueeze(-1).expand(-1, width)
    if options.response_logits_only:
        token_logps = _head_logps(lm_head, hidden[reply_mask], replies[reply_mask])
    else:
        all_logps = torch.log_softmax(lm_head(hidden).float(), dim=-1)
        token_logps = all_logps.gather(-1, replies.unsqueeze(-1)).squeeze(-1)[reply_mask]
    sums = torch.zeros(n_rows, dtype=token_logps.dtype, device=replies.device)
    sums = sums.index_add(0, rows[reply_mask], token_logps)
    return sums, reply_mask.sum(-1)


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
        hidden = inner.model(**inputs, use_cache=False, return_dict=True).last_hidden_state
        target_mask = labels[:, 1:] != IGNORE_INDEX
        token_logps = _head_logps(inner.lm_head, hidden[:, :-1][target_mask], labels[:, 1:][target_mask])
        rows = torch.arange(labels.shape[0], device=labels.device).unsqueeze(-1).expand_as(target_mask)
        sums = torch.zeros(labels.shape[0], dtype=token_logps.dtype, device=labels.device)
        return sums.index_add(0, rows[target_mask], token_logps), target_mask.sum(-1)
    logits = model(**inputs, use_cache=False).logits
    return sequence_logps(logits, labels)


@dataclass
class EncodedPairs:
    """A batch of pairs encoded for one forward layout: shared prompt (``shared``) or full sequences (``full``).

    ``corrupt_*`` hold mDPO's chosen reply under the corrupted images, when asked for; ``only_corrupt`` keeps just
    those (the reference's share of an mDPO step when its other log-probs come from the cache).
    """

    n: int
    shared: Continuations | None = None
    full: dict[str, torch.Tensor] | None = None
    corrupt_shared: Continuations | None = None
    corrupt_full: dict[str, torch.Tensor] | None = None

    def to(self, device: torch.device | str) -> EncodedPairs:
        def move(d: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
            return None if d is None else {k: v.to(device) for k, v in d.items()}

        return EncodedPairs(
            self.n,
            self.shared.to(device) if self.shared is not None else None,
            move(self.full),
            self.corrupt_shared.to(device) if self.corrupt_shared is not None else None,
            move(self.corrupt_full),
        )

    def only_corrupt(self) -> EncodedPairs:
        return EncodedPairs(self.n, corrupt_shared=self.corrupt_shared, corrupt_full=self.corrupt_full)


def encode_pairs(
    processor: Any,
    pairs: Sequence[PreferencePair],
    *,
    share_prompt: bool,
    max_length: int | None = None,
    corrupt_images: Sequence[Sequence[Any]] | None = None,
) -> EncodedPairs:
    """Encode pairs for ``PairScorer``; ``corrupt_images`` (one image list per pair) adds mDPO's conditional term."""
    out = EncodedPairs(n=len(pairs))
    if share_prompt:
        out.shared = encode_continuations(
            processor, [prompt_sample(p) for p in pairs], [(p.chosen, p.rejected) for p in pairs], max_length
        )
        if corrupt_images is not None:
            prompts = [prompt_sample(p, imgs) for p, imgs in zip(pairs, corrupt_images)]
            out.corrupt_shared = encode_continuations(processor, prompts, [(p.chosen,) for p in pairs], max_length)
        return out
    chosen = [p.as_samples()[0] for p in pairs]
    rejected = [p.as_samples()[1] for p in pairs]
    out.full = encode_sft(processor, chosen + rejected, max_length)
    if corrupt_images is not None:
        from dataclasses import replace

        corrupt = [replace(c, images=tuple(imgs)) for c, imgs in zip(chosen, corrupt_images)]
        out.corrupt_full = encode_sft(processor, corrupt, max_length)
    return out


class PairScorer(torch.nn.Module):
    """Wraps a VLM so that one ``forward`` call scores a whole batch of pairs.

    One call per micro-step keeps the policy's computation inside a single ``forward``, as DDP requires when
    ``accelerate`` wraps this module; the VLM itself stays reachable as ``.vlm`` for saving.

    ``forward`` returns ``(chosen [B], rejected [B], chosen_tokens [B], rejected_tokens [B], chosen_corrupt [B])``;
    the parts the batch was not encoded for are ``None``.
    """

    def __init__(self, vlm: torch.nn.Module, options: ForwardOptions = ForwardOptions()) -> None:
        super().__init__()
        self.vlm = vlm
        reason = unsupported_reason(vlm) if options.share_prompt else None
        if reason is not None:
            log.warning("shared-prompt pair forward unavailable (%s); scoring full sequences instead", reason)
            options = ForwardOptions(share_prompt=False, response_logits_only=options.response_logits_only)
        self.options = options

    def forward(self, batch: EncodedPairs) -> tuple[torch.Tensor | None, ...]:
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
        return chosen, rejected, chosen_len, rejected_len, corrupt
