"""Load local Hugging Face VLM checkpoints, apply the freezing policy and LoRA.

Nothing here reaches a hub: ``from_pretrained`` is always called on a local directory given by the user (or made by
``mmalign model init``), with ``local_files_only=True``. ``trust_remote_code`` stays off unless asked for.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmalign.errors import ModelError
from mmalign.models.families import Family, family_of

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A model, its processor and its family quirks (``family`` is ``None`` for unregistered architectures)."""

    model: torch.nn.Module
    processor: Any
    family: Family | None
    path: Path

    @property
    def tokenizer(self) -> Any:
        return getattr(self.processor, "tokenizer", self.processor)


def _load_processor(path: Path, fam: Family | None, trust_remote_code: bool) -> Any:
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except (ImportError, TypeError, AttributeError) as exc:
        if fam is None or fam.processor_fallback is None:
            raise ModelError(f"{path}: cannot build the processor: {exc}") from None
        return fam.processor_fallback(path, fam)


def load_model(
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load a VLM and its processor from a local directory.

    Args:
        path: directory with ``config.json``, weights (safetensors) and processor files.
        dtype: parameter dtype; ``None`` keeps float32 (what CPU training wants).
        trust_remote_code: allow custom modelling code shipped with the checkpoint (off unless asked).

    Raises:
        ModelError: the directory is missing or is not a loadable image-text model.
    """
    from transformers import AutoConfig, AutoModelForImageTextToText

    p = Path(path)
    if not (p / "config.json").is_file():
        raise ModelError(f"{p}: not a model directory (no config.json); build one with `mmalign model init`")
    try:
        config = AutoConfig.from_pretrained(p, local_files_only=True, trust_remote_code=trust_remote_code)
    except (ValueError, OSError) as exc:
        raise ModelError(f"{p}: cannot read config.json: {exc}") from None
    fam = family_of(config)
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            p, local_files_only=True, dtype=dtype or torch.float32, trust_remote_code=trust_remote_code
        )
    except (ValueError, OSError, KeyError) as exc:
        raise ModelError(f"{p}: cannot load as an image-text-to-text model: {exc}") from None
    processor = _load_processor(p, fam, trust_remote_code)
    if fam is None:
        log.warning("%s: architecture %r has no registered quirks; using generic handling", p, config.model_type)
    return LoadedModel(model=model, processor=processor, family=fam, path=p)


def _parts(model: torch.nn.Module, paths: tuple[str, ...]) -> list[list[torch.nn.Parameter]]:
    """The parameters of each path that exists: a module's, or a bare parameter (LLaVA-NeXT's ``image_newline``)."""
    found = []
    for dotted in paths:
        try:
            found.append(list(model.get_submodule(dotted).parameters()))
        except AttributeError:
            try:
                found.append([model.get_parameter(dotted)])
            except AttributeError:
                continue
    return found


def apply_freeze(model: torch.nn.Module, fam: Family | None, *, vision: bool, projector: bool, llm: bool) -> None:
    """Set ``requires_grad`` by part: ``True`` arguments freeze that part.

    Raises:
        ModelError: a part is asked to be frozen/trained but the architecture's module names are unknown.
    """
    if fam is None:
        if vision or projector:
            raise ModelError("freezing by part needs a registered model family (see models/families.py)")
        for p in model.parameters():
            p.requires_grad_(not llm)
        return
    for p in model.parameters():
        p.requires_grad_(True)
    for frozen, paths in (
        (vision, fam.vision_modules),
        (projector, fam.projector_modules),
        (llm, fam.language_modules),
    ):
        parts = _parts(model, paths)
        if not parts:
            raise ModelError(f"family {fam.name}: none of the modules {paths} found in the model")
        if frozen:
            for params in parts:
                for p in params:
                    p.requires_grad_(False)


def apply_lora(
    model: torch.nn.Module,
    fam: Family | None,
    *,
    r: int,
    alpha: int,
    dropout: float,
    targets: list[str] | None,
) -> torch.nn.Module:
    """Wrap the language model's linear layers with LoRA adapters (``peft``); returns the peft model.

    Only modules inside the language model are targeted, so the vision tower keeps its frozen weights.
    """
    from peft import LoraConfig, get_peft_model

    suffixes = tuple(targets or (fam.lora_targets if fam else ("q_proj", "v_proj")))
    lang_prefixes = tuple(fam.language_modules) if fam else ("",)
    names = [
        name
        for name, mod in model.named_modules()
        if isinstance(mod, torch.nn.Linear) and name.endswith(suffixes) and name.startswith(lang_prefixes)
    ]
    if not names:
        raise ModelError(f"LoRA: no linear layer named {suffixes} inside {lang_prefixes}")
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=names, bias="none")
    trainable_before = {n for n, p in model.named_parameters() if p.requires_grad}
    peft_model = get_peft_model(model, cfg)
    # peft freezes everything but the adapters; keep parts the freezing policy left trainable (e.g. projector).
    for name, p in peft_model.named_parameters():
        base = name.removeprefix("base_model.model.")
        if base in trainable_before:
            p.requires_grad_(True)
    return peft_model


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total
