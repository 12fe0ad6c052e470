"""Batched greedy answers and yes/no logit scoring for evaluation tasks.

Two ways to answer a yes/no question: generate greedily and parse the text (what POPE's official protocol does),
or read the logits of the "Yes" and "No" tokens at the first answer position in one forward pass (fast path: no
decoding loop; agrees with greedy decoding whenever the greedy first token is one of them).

Greedy answers come from ``model.generate`` (``engine="hf"``, the default) or from vLLM (``engine="vllm"``, given
the checkpoint directory; ``pip install 'mmalign[vllm]'``). The vLLM engine of a directory is built once per process
and reused by later calls (an evaluation asks for several splits).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from mmalign.data.collate import encode_prompts
from mmalign.errors import ConfigError
from mmalign.generation.engines import Engine, check_engine, make_generator
from mmalign.generation.sampling import SamplingParams
from mmalign.runtime.progress import progress_bar
from mmalign.types import Sample

YES_FORMS = ("Yes", "yes", "YES")
NO_FORMS = ("No", "no", "NO")


def _tokenizer(processor: Any) -> Any:
    return getattr(processor, "tokenizer", processor)


def answer_token_ids(processor: Any, forms: Sequence[str]) -> list[int]:
    """Ids of the first token of each surface form (as it would start an assistant reply)."""
    tok = _tokenizer(processor)
    ids = set()
    for form in forms:
        for text in (form, " " + form):
            got = tok(text, add_special_tokens=False)["input_ids"]
            if got and got[0] != tok.unk_token_id:
                ids.add(got[0])
    return sorted(ids)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@lru_cache(maxsize=1)
def _vllm_engine(model_dir: str) -> Any:
    """One vLLM engine per process, kept for the next call with the same directory."""
    return make_generator("vllm", model_dir=model_dir)


@torch.no_grad()
def generate_answers(
    model: torch.nn.Module | None,
    processor: Any,
    samples: Sequence[Sample],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    desc: str = "generate",
    progress: bool = True,
    engine: Engine = "hf",
    model_dir: str | Path | None = None,
) -> list[str]:
    """Greedy completions of each sample's prompt (the final assistant turn, if any, is ignored).

    Args:
        model, processor: the loaded model (``engine="hf"``; unused with ``"vllm"``).
        engine: ``"hf"`` (``model.generate``) or ``"vllm"`` (loads ``model_dir``).
        model_dir: the checkpoint directory (``engine="vllm"``).

    Raises:
        ConfigError: ``engine="vllm"`` without vLLM installed or without ``model_dir``; an unknown engine.
    """
    check_engine(engine)
    if engine == "vllm":
        if model_dir is None:
            raise ConfigError("engine=vllm loads the model from its directory: pass model_dir=")
        params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens)
        return [group[0].text for group in _vllm_engine(str(model_dir)).generate(samples, params=params)]
    if model is None:
        raise ValueError("engine=hf answers with a loaded model: pass model=")
    tok = _tokenizer(processor)
    model.eval()
    out: list[str] = []
    bar = progress_bar(total=len(samples), desc=desc, enabled=progress, unit="ex")
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        enc = {k: v.to(_device(model)) for k, v in encode_prompts(processor, chunk).items()}
        gen = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=model.generation_config.eos_token_id or tok.eos_token_id,
        )
        new = gen[:, enc["input_ids"].shape[1] :]
        out.extend(t.strip() for t in tok.batch_decode(new, skip_special_tokens=True))
        bar.update(len(chunk))
    bar.close()
    return out


@torch.no_grad()
def yes_no_logits(
    model: torch.nn.Module,
    processor: Any,
    samples: Sequence[Sample],
    *,
    batch_size: int = 32,
    desc: str = "yes/no",
    progress: bool = True,
) -> list[float]:
    """For each prompt, ``logsumexp(yes logits) − logsumexp(no logits)`` at the first answer position.

    Positive means the model prefers to answer yes. Left padding puts every prompt's last position at -1.
    """
    yes_ids = answer_token_ids(processor, YES_FORMS)
    no_ids = answer_token_ids(processor, NO_FORMS)
    if not yes_ids or not no_ids:
        raise ValueError("the tokenizer has no token for Yes/No; use generation instead of the logit fast path")
    model.eval()
    margins: list[float] = []
    bar = progress_bar(total=len(samples), desc=desc, enabled=progress, unit="ex")
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        enc = {k: v.to(_device(model)) for k, v in encode_prompts(processor, chunk).items()}
        # logits_to_keep=1: only the last position's logits are computed (no full-vocab logits elsewhere).
        logits = model(**enc, use_cache=False, logits_to_keep=1).logits[:, -1].float()
        margin = torch.logsumexp(logits[:, yes_ids], -1) - torch.logsumexp(logits[:, no_ids], -1)
        margins.extend(margin.tolist())
        bar.update(len(chunk))
    bar.close()
    return margins
