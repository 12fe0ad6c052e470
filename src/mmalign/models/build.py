"""Build small random-init models of real VLM architectures, offline.

``mmalign model init`` uses this: a word-level tokenizer is built from the data set's text, a model of the chosen
family is built from a small config, and the processor (image processor constructed from arguments) is attached.
Everything saves with ``save_pretrained`` and loads back with ``from_pretrained`` from the local directory.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from mmalign.models.calibrate import whiten_projector_input
from mmalign.models.families import Family, TinySize, get_family
from mmalign.models.tokenizer import build_word_tokenizer

# Words every tiny model knows even if the vocabulary data lacks them: the POPE answers and common glue.
BASE_WORDS = (
    "Yes.",
    "No.",
    "yes no not there is are a an the in image of and with",
    "User: Assistant: System: user assistant system",
)


def build_tiny(
    family: str | Family,
    texts: Iterable[str],
    *,
    size: TinySize | None = None,
    seed: int = 0,
    calibration_images: Sequence[Any] = (),
) -> tuple[torch.nn.Module, Any]:
    """Build (model, processor) of ``family`` with a tokenizer covering ``texts``.

    Args:
        family: family name (``llava``, ``qwen2-vl``, ``idefics3``) or a ``Family``.
        texts: corpus for the word-level vocabulary.
        size: model dimensions; defaults to ``TinySize()``.
        seed: seed of the random initialisation.
        calibration_images: images whose vision features standardise the projector's input (see
            ``models/calibrate.py``); without them the projector keeps its plain random init.
    """
    fam = get_family(family) if isinstance(family, str) else family
    size = size or TinySize()
    if fam.build_tiny is None:
        raise ValueError(f"family {fam.name!r} has no tiny-model builder")
    tok = build_word_tokenizer(
        texts,
        special_tokens=fam.special_tokens,
        pad_token=fam.pad_token,
        unk_token="<unk>",
        eos_token=fam.eos_token,
        bos_token=fam.bos_token,
        chat_template=fam.chat_template,
        extra_words=BASE_WORDS,
    )
    torch.manual_seed(seed)
    model, processor = fam.build_tiny(tok, size)
    if calibration_images:
        whiten_projector_input(model, processor, calibration_images, fam.projector_modules)
    gen = model.generation_config
    gen.eos_token_id = tok.eos_token_id
    gen.pad_token_id = tok.pad_token_id
    gen.bos_token_id = tok.bos_token_id
    gen.do_sample = False
    return model, processor


def save_model(model: torch.nn.Module, processor: Any, out: str | Path) -> Path:
    """Save model (safetensors) and processor to ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    return out
