"""Encode preference pairs and sampled replies for the pair forward (``mmalign.forward``).

Two layouts: the shared prompt (``Continuations``: each prompt and its images once, left-padded, and its ``k``
replies as separate right-padded token rows) and full sequences (``encode_sft`` rows with labels, the naive path).
``encode_pairs`` builds either for a batch of ``PreferencePair`` records, with mDPO's chosen reply under corrupted
images when asked for.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from mmalign.data.collate import encode_sft, load_image_groups, processor_inputs, render
from mmalign.types import Message, PreferencePair, Sample

# ``Continuations.length_groups`` splits a batch only when that spares at least this share of the padded positions.
SPLIT_MIN_SAVING = 0.2


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
        target_mask: [B*k, T] bool, True on the tokens a language-model loss is taken on (a critique reward model's
            critiques), or None.
    """

    prompt: dict[str, torch.Tensor]
    replies: torch.Tensor
    reply_mask: torch.Tensor
    k: int
    images_per_prompt: tuple[int, ...] | None = None
    target_mask: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> Continuations:
        return Continuations(
            {key: v.to(device) for key, v in self.prompt.items()},
            self.replies.to(device),
            self.reply_mask.to(device),
            self.k,
            self.images_per_prompt,
            None if self.target_mask is None else self.target_mask.to(device),
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
        by the prompts (several images per prompt, flat patch lists) cannot be cut by prompt.
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
    tails: list[str] = []
    for sample, prefix, texts in zip(prompts, prefixes, replies):
        for text in texts:
            full = render(processor, (*sample.messages, Message.assistant(text)))
            if not full.startswith(prefix):
                raise ValueError("chat template is not prefix-stable; cannot split prompt and reply")
            tails.append(full[len(prefix) :])
    rows: list[list[int]] = tok(tails, add_special_tokens=False)["input_ids"]  # one call for every reply
    return _with_reply_rows(enc, rows, k, prompts, max_length)


def encode_reply_ids(
    processor: Any, prompts: Sequence[Sample], replies: Sequence[Sequence[Sequence[int]]], max_length: int | None = None
) -> Continuations:
    """Like ``encode_continuations``, with each reply given as the token ids a sampler produced from the same
    rendered prompt (``generation.hf``): the replies are scored exactly as they were sampled, end-of-sequence token
    included when the sampler stopped on it and nothing added when it hit its token limit.

    Raises:
        ValueError: replies of unequal count, or a sequence longer than ``max_length``.
    """
    k = len(replies[0])
    if any(len(r) != k for r in replies):
        raise ValueError("every prompt needs the same number of replies")
    texts = [render(processor, s.prompt_messages, generation_prompt=True) for s in prompts]
    enc = processor_inputs(processor, texts, load_image_groups(prompts), padding_side="left")
    return _with_reply_rows(enc, [list(ids) for group in replies for ids in group], k, prompts, max_length)


def encode_critiques(
    processor: Any,
    prompts: Sequence[Sample],
    replies: Sequence[Sequence[str]],
    critiques: Sequence[Sequence[str]],
    request: str,
    max_length: int | None = None,
) -> Continuations:
    """Each reply followed by a user turn ``request`` and an assistant turn holding its critique, continued from the
    prompt encoded once; ``target_mask`` marks the critique turn's tokens (the language-model targets of a critique
    reward model, MM-RLHF). The rows are the tokens of the text before the critique, then the critique turn's.

    Raises:
        ValueError: unequal counts, a chat template that is not prefix-stable, or a sequence over ``max_length``.
    """
    k = len(replies[0])
    if any(len(r) != k for r in replies) or any(len(c) != k for c in critiques):
        raise ValueError("every prompt needs the same number of replies and critiques")
    tok = _tokenizer(processor)
    prefixes = [render(processor, s.messages, generation_prompt=True) for s in prompts]
    enc = processor_inputs(processor, prefixes, load_image_groups(prompts), padding_side="left")
    rows, targets = [], []
    for sample, prefix, texts, notes in zip(prompts, prefixes, replies, critiques):
        for text, note in zip(texts, notes):
            turns = (*sample.messages, Message.assistant(text), Message.user(request))
            before = render(processor, turns, generation_prompt=True)
            full = render(processor, (*turns, Message.assistant(note)))
            if not (before.startswith(prefix) and full.startswith(before)):
                raise ValueError("chat template is not prefix-stable; cannot split reply and critique")
            head, tail = tok([before[len(prefix) :], full[len(before) :]], add_special_tokens=False)["input_ids"]
            rows.append(head + tail)
            targets.append((len(head), len(head) + len(tail)))
    out = _with_reply_rows(enc, rows, k, prompts, max_length)
    mask = torch.zeros_like(out.reply_mask)
    for i, (start, end) in enumerate(targets):
        mask[i, start:end] = True
    out.target_mask = mask
    return out


def _with_reply_rows(
    enc: dict[str, torch.Tensor], rows: list[list[int]], k: int, prompts: Sequence[Sample], max_length: int | None
) -> Continuations:
    prompt_lens = enc["attention_mask"].sum(-1).tolist()
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
        corrupt = [replace(c, images=tuple(imgs)) for c, imgs in zip(chosen, corrupt_images)]
        out.corrupt_full = encode_sft(processor, corrupt, max_length)
    return out
