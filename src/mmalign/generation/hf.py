"""Batched sampling from any supported Hugging Face VLM, with a key/value cache and optional image-attention masking.

The loop is our own rather than ``model.generate`` because image-attention masking (BDHS, Amirloo et al. §3.4.1)
must hide image tokens through the attention mask while leaving every position id where it was: ``generate`` derives
position ids from the attention mask, which would shift every token after a hidden image token.

Per batch: one prompt pass (left-padded; images encoded once; with ``n`` samples per prompt and no masking the cache
is repeated instead of re-encoding), then one cached decoder step per new token; the LM head runs on the last hidden
state only. Replies stop at end of sequence, optionally at the end of the first sentence, or at ``max_new_tokens``.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from typing import Any

import torch

from mmalign.data.collate import processor_inputs, render
from mmalign.forward import inner_model, unsupported_reason
from mmalign.generation.sampling import DEFAULT_SAMPLING, SamplingParams, sample_next
from mmalign.models.families import prompt_positions
from mmalign.runtime.progress import progress_bar
from mmalign.types import Rollout, Sample

SENTENCE_END = (".", "!", "?")


def _tokenizer(processor: Any) -> Any:
    return getattr(processor, "tokenizer", processor)


@cache
def _sentence_end_ids(tok: Any) -> frozenset[int]:
    """Token ids whose text ends a sentence (".", "!", "?", possibly with word-boundary markers around them)."""
    ids = set()
    for token, i in tok.get_vocab().items():
        text = token.replace("▁", " ").replace("Ġ", " ").replace("Ċ", "\n").strip()
        if text and text.endswith(SENTENCE_END):
            ids.add(i)
    return frozenset(ids)


def _eos_ids(model: Any, tok: Any) -> set[int]:
    ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    return ids


def image_keep_mask(
    input_ids: torch.Tensor, image_token_id: int, drop: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Bool [N, T]: False at image tokens hidden from attention (each hidden independently with prob ``drop``)."""
    is_image = input_ids == image_token_id
    if drop <= 0:
        return torch.ones_like(is_image)
    u = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)
    return ~is_image | (u >= drop)


def _image_token_id(model: Any) -> int:
    cfg = inner_model(model).config
    for name in ("image_token_id", "image_token_index"):
        value = getattr(cfg, name, None)
        if value is not None:
            return int(value)
    raise ValueError(f"{type(model).__name__}: config names no image token id")


def _encode(processor: Any, prompts: Sequence[Sample], prefixes: Sequence[str], repeat: int) -> dict[str, Any]:
    texts, images = [], []
    for sample, prefix in zip(prompts, prefixes):
        text = render(processor, sample.prompt_messages, generation_prompt=True) + prefix
        imgs = sample.load_images()
        texts.extend([text] * repeat)
        images.extend([imgs] * repeat)
    return processor_inputs(processor, texts, images if any(images) else None, padding_side="left")


@torch.no_grad()
def sample_batch(
    model: Any,
    processor: Any,
    prompts: Sequence[Sample],
    n: int,
    params: SamplingParams,
    *,
    prefixes: Sequence[str] | None = None,
    image_drop: float = 0.0,
    generator: torch.Generator | None = None,
) -> list[list[Rollout]]:
    """``n`` replies to each prompt, in one batch.

    Args:
        prompts: samples whose prompt turns are answered (a final assistant turn, if any, is ignored).
        n: replies per prompt.
        prefixes: per prompt, text forced at the start of the reply (continued, and included in ``Rollout.text``).
        image_drop: probability ρ that each image token is hidden from attention, drawn once per reply.
        generator: random generator for sampling and masking (on the model's device).

    Returns:
        one list of ``n`` rollouts per prompt.
    """
    reason = unsupported_reason(model)
    if reason is not None:
        raise ValueError(f"cannot sample from this model: {reason}")
    inner = inner_model(model)
    base, lm_head = inner.model, inner.lm_head
    tok = _tokenizer(processor)
    device = next(inner.parameters()).device
    prefixes = list(prefixes) if prefixes is not None else [""] * len(prompts)
    # Masking draws one mask per reply, so each reply needs its own prompt pass; otherwise the cache is shared.
    per_reply = image_drop > 0
    enc = {k: v.to(device) for k, v in _encode(processor, prompts, prefixes, n if per_reply else 1).items()}
    pad_mask = enc["attention_mask"]
    pos = prompt_positions(inner, enc)
    attn = pad_mask
    keep = None
    if per_reply:
        keep = image_keep_mask(enc["input_ids"], _image_token_id(model), image_drop, generator)
        attn = pad_mask * keep.to(pad_mask.dtype)
    out = base(**{**enc, "attention_mask": attn}, position_ids=pos, use_cache=True, return_dict=True)
    cache_kv, hidden = out.past_key_values, out.last_hidden_state[:, -1]
    if not per_reply and n > 1:
        cache_kv.batch_repeat_interleave(n)
        hidden, attn = hidden.repeat_interleave(n, dim=0), attn.repeat_interleave(n, dim=0)
        pos = pos.repeat_interleave(n, dim=-2)
    next_pos = (pos.amax(dim=(0, 2)) if pos.dim() == 3 else pos[:, -1]) + 1
    rows = hidden.shape[0]
    stop_ids = torch.tensor(sorted(_eos_ids(inner, tok)), device=device)
    sentence_ids = torch.tensor(sorted(_sentence_end_ids(tok)), device=device)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    logp = torch.zeros(rows, device=device)
    lengths = torch.full((rows,), params.max_new_tokens, dtype=torch.long, device=device)
    tokens: list[torch.Tensor] = []
    for step in range(params.max_new_tokens):
        logits = lm_head(hidden).float()
        nxt = sample_next(logits, params, generator)
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        token_logp = torch.log_softmax(logits, dim=-1).gather(-1, nxt.unsqueeze(-1)).squeeze(-1)
        logp += torch.where(done, torch.zeros_like(token_logp), token_logp)
        tokens.append(nxt)
        ended = torch.isin(nxt, stop_ids)
        if params.stop_at_sentence_end:
            ended |= torch.isin(nxt, sentence_ids)
        newly = ended & ~done
        finished |= newly
        lengths = torch.where(newly, torch.full_like(lengths, step + 1), lengths)
        done |= ended
        if bool(done.all()) or step == params.max_new_tokens - 1:
            break
        attn = torch.cat([attn, torch.ones(rows, 1, dtype=attn.dtype, device=device)], dim=1)
        step_pos = next_pos.unsqueeze(-1)
        if pos.dim() == 3:
            step_pos = step_pos.unsqueeze(0).expand(3, -1, -1)
        out = base(
            input_ids=nxt.unsqueeze(-1),
            attention_mask=attn,
            position_ids=step_pos,
            past_key_values=cache_kv,
            use_cache=True,
            return_dict=True,
        )
        cache_kv, hidden = out.past_key_values, out.last_hidden_state[:, -1]
        next_pos = next_pos + 1
    generated = torch.stack(tokens, dim=1).tolist() if tokens else [[] for _ in range(rows)]
    results: list[list[Rollout]] = []
    for i, sample in enumerate(prompts):
        group = []
        prefix_ids = tok(prefixes[i], add_special_tokens=False)["input_ids"] if prefixes[i] else []
        for j in range(n):
            r = i * n + j
            ids = generated[r][: int(lengths[r])]
            text = tok.decode(prefix_ids + ids, skip_special_tokens=True).strip()
            prefix = tok.decode(prefix_ids, skip_special_tokens=True).strip()
            if not text.startswith(prefix):  # a tokenizer that merges across the boundary: keep them apart
                text = f"{prefix} {tok.decode(ids, skip_special_tokens=True).strip()}".strip()
            meta: dict[str, Any] = {"sample": j, "temperature": params.temperature}
            if keep is not None:
                is_image = enc["input_ids"][r] == _image_token_id(model)
                meta["image_drop"] = image_drop
                meta["image_tokens_visible"] = float(keep[r][is_image].float().mean()) if is_image.any() else 1.0
            group.append(Rollout(sample.id, text, tuple(ids), float(logp[r]), bool(finished[r]), prefix, meta))
        results.append(group)
    return results


class HFGenerator:
    """The ``Generator`` over a Hugging Face VLM: batches prompts, seeds every call, shows progress."""

    def __init__(self, model: Any, processor: Any, *, batch_size: int = 16, progress: bool = False) -> None:
        self.model = model
        self.processor = processor
        self.batch_size = batch_size
        self.progress = progress

    def generate(
        self,
        prompts: Sequence[Sample],
        n: int = 1,
        *,
        params: SamplingParams = DEFAULT_SAMPLING,
        prefixes: Sequence[str] | None = None,
        image_drop: float = 0.0,
    ) -> list[list[Rollout]]:
        """``n`` rollouts per prompt; the same ``params.seed`` and batch size give the same rollouts."""
        device = next(inner_model(self.model).parameters()).device
        generator = torch.Generator(device=device).manual_seed(params.seed)
        was_training = self.model.training
        self.model.eval()
        out: list[list[Rollout]] = []
        bar = progress_bar(len(prompts), desc="generate", enabled=self.progress, unit="prompt")
        for start in range(0, len(prompts), self.batch_size):
            chunk = prompts[start : start + self.batch_size]
            chunk_prefixes = prefixes[start : start + self.batch_size] if prefixes is not None else None
            out.extend(
                sample_batch(
                    self.model,
                    self.processor,
                    chunk,
                    n,
                    params,
                    prefixes=chunk_prefixes,
                    image_drop=image_drop,
                    generator=generator,
                )
            )
            bar.update(len(chunk))
        bar.close()
        self.model.train(was_training)
        return out
