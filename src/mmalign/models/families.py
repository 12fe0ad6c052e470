"""Per-architecture quirks, in one place.

Everything that differs between VLM families lives here: which transformers classes to use, the image
placeholder token, the module names of the vision tower, the projector and the language model (for freezing and
LoRA targets), the decoder's position rule (for the shared-prompt pair forward and the sampler), whether SFT rows can
be packed, how to build the processor where transformers' own needs a missing package, a direct input encoder, how a
flat image-feature tensor splits per image, and which builder makes a small random-init model of the family
(``models/tiny_builders.py``). The rest of the toolkit is architecture-agnostic and asks this module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch

from mmalign.models import tiny_builders as tiny
from mmalign.models.fast_inputs import llava_inputs
from mmalign.models.processor import AnyresTokenProcessor, ImageTokenProcessor

# How the decoder numbers positions: "1d" rotary positions (a plain causal LM), or Qwen2-VL's 3-D "mrope".
Rope = Literal["1d", "mrope"]

QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<unk>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)


@dataclass(frozen=True)
class TinySize:
    """Dimensions of a small random-init model (defaults: fast on a laptop CPU, able to learn the world).

    Attributes:
        image_size / patch_size: the vision tower's input side and patch side, in pixels.
        vision_hidden: width of the vision tower.
        vision_layers: transformer layers of the vision tower.
        vision_heads: attention heads of the vision tower.
        text_hidden: width of the language model.
        text_layers: transformer layers of the language model.
        text_heads: attention heads of the language model.
        text_intermediate: MLP width of the language model.
        max_positions: longest sequence the language model's positions cover.
        tie_embeddings: share the input and output embeddings of the language model.
    """

    image_size: int = 48
    patch_size: int = 16
    vision_hidden: int = 96
    vision_layers: int = 2
    vision_heads: int = 4
    text_hidden: int = 128
    text_layers: int = 3
    text_heads: int = 4
    text_intermediate: int = 384
    max_positions: int = 1024
    # Tied input/output embeddings (as in many small LMs): the word a caption emits for an image feature and the
    # word a question asks about share one vector, which makes question-to-image binding far easier to learn.
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        small = [f"{k}={v}" for k, v in vars(self).items() if not isinstance(v, bool) and v < 1]
        if small:
            raise ValueError(f"TinySize sizes must be >= 1: {', '.join(small)}")
        for width, heads in (("vision_hidden", "vision_heads"), ("text_hidden", "text_heads")):
            if getattr(self, width) % getattr(self, heads):
                raise ValueError(f"{width}={getattr(self, width)} is not a multiple of {heads}={getattr(self, heads)}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}")


@dataclass(frozen=True)
class Family:
    """What the toolkit must know about one VLM architecture.

    Attributes:
        name: family name used on the command line.
        model_types: ``config.model_type`` values that belong to the family.
        vision_modules / projector_modules / language_modules: attribute paths (from the top-level model)
            of the three parts, used by the freezing policy.
        lora_targets: module-name suffixes of the language model's linear layers that LoRA adapts.
        image_token: the placeholder in chat text that the processor expands into image tokens.
        special_tokens: tokens a word-level tokenizer for a tiny model of the family needs.
        chat_template: template for the tiny model's tokenizer and processor.
        build_tiny: builds (model, processor) of the family from a tokenizer and a ``TinySize``.
        rope: the decoder's position rule; ``None`` keeps the family off the shared-prompt forward and the sampler.
        packable: SFT rows can be packed end to end (1-D positions restarting per sample, one pixel row per image).
        processor_fallback: builds the processor from a checkpoint directory when ``AutoProcessor`` cannot (e.g. it
            wants a video processor, i.e. torchvision).
        processor_class / fast_encoder: a processor of this class name may be encoded by ``fast_encoder(processor,
            texts, images, call)`` instead of its own call (``call()``), which it must match.
        feature_sizes: image tokens per image of a flat [tokens, D] image-feature tensor, from the model and the
            processor's batch.
    """

    name: str
    model_types: tuple[str, ...]
    vision_modules: tuple[str, ...]
    projector_modules: tuple[str, ...]
    language_modules: tuple[str, ...]
    lora_targets: tuple[str, ...] = (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    )
    image_token: str = "<image>"
    special_tokens: tuple[str, ...] = ()
    pad_token: str = "<pad>"
    eos_token: str = "<|end|>"
    bos_token: str | None = None
    chat_template: str = ""
    build_tiny: Callable[[Any, TinySize], tuple[torch.nn.Module, Any]] | None = field(default=None, repr=False)
    # Default patches per image side of a tiny model: LLaVA gets one patch per cell of the world's 3x3 grid;
    # families that merge 2x2 patches into one token get 6 (still one token per cell).
    patches_per_side: int = 3
    rope: Rope | None = None
    packable: bool = False
    processor_fallback: Callable[[Path, Family], Any] | None = field(default=None, repr=False)
    processor_class: str = ""
    fast_encoder: Callable[..., dict[str, torch.Tensor]] | None = field(default=None, repr=False)
    feature_sizes: Callable[[Any, dict[str, torch.Tensor]], list[int]] | None = field(default=None, repr=False)


def _qwen2vl_processor(path: Path, fam: Family) -> Any:
    """Qwen2-VL's processor wants a video processor, i.e. torchvision; the image-only one does the same work."""
    from transformers import AutoImageProcessor, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    try:
        image_processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
    except ImportError:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        image_processor = Qwen2VLImageProcessorPil.from_pretrained(path, local_files_only=True)
    return ImageTokenProcessor(tok, image_processor, fam.image_token)


def _merged_grid_sizes(model: Any, batch: dict[str, torch.Tensor]) -> list[int]:
    """Qwen2-VL: each image's patches (its ``image_grid_thw``) merged ``spatial_merge_size``² to one token."""
    merge = model.config.vision_config.spatial_merge_size**2
    return (batch["image_grid_thw"].prod(-1) // merge).tolist()


FAMILIES: dict[str, Family] = {
    "llava": Family(
        name="llava",
        model_types=("llava",),
        vision_modules=("model.vision_tower",),
        projector_modules=("model.multi_modal_projector",),
        language_modules=("model.language_model", "lm_head"),
        special_tokens=(
            "<pad>",
            "<unk>",
            "<s>",
            "<|end|>",
            "<image>",
            "<|user|>",
            "<|assistant|>",
            "<|system|>",
        ),
        bos_token="<s>",
        chat_template=tiny.LLAVA_TEMPLATE,
        build_tiny=tiny.build_llava,
        rope="1d",
        packable=True,
        processor_class="LlavaProcessor",
        fast_encoder=llava_inputs,
    ),
    "qwen2-vl": Family(
        name="qwen2-vl",
        model_types=("qwen2_vl",),
        vision_modules=("model.visual.patch_embed", "model.visual.blocks", "model.visual.rotary_pos_emb"),
        projector_modules=("model.visual.merger",),
        language_modules=("model.language_model", "lm_head"),
        image_token="<|image_pad|>",
        special_tokens=QWEN_SPECIAL_TOKENS,
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        chat_template=tiny.QWEN2VL_TEMPLATE,
        build_tiny=tiny.build_qwen2vl,
        patches_per_side=6,
        rope="mrope",
        processor_fallback=_qwen2vl_processor,
        feature_sizes=_merged_grid_sizes,
    ),
    "idefics3": Family(
        name="idefics3",
        model_types=("idefics3",),
        vision_modules=("model.vision_model",),
        projector_modules=("model.connector",),
        language_modules=("model.text_model", "lm_head"),
        special_tokens=(
            "<|endoftext|>",
            "<unk>",
            "<|begin_of_text|>",
            "<end_of_utterance>",
            "<image>",
            "<fake_token_around_image>",
            "<global-img>",
        ),
        pad_token="<|endoftext|>",
        eos_token="<end_of_utterance>",
        bos_token="<|begin_of_text|>",
        chat_template=tiny.IDEFICS3_TEMPLATE,
        build_tiny=tiny.build_idefics3,
        patches_per_side=6,
        rope="1d",
    ),
    # LLaVA-NeXT and OneVision learn ``image_newline`` (a bare parameter, the row separator of tiled features) with
    # the projector.
    "llava-next": Family(
        name="llava-next",
        model_types=("llava_next",),
        vision_modules=("model.vision_tower",),
        projector_modules=("model.multi_modal_projector", "model.image_newline"),
        language_modules=("model.language_model", "lm_head"),
        special_tokens=("<pad>", "<unk>", "<s>", "</s>", "<image>", "[INST]", "[/INST]"),
        eos_token="</s>",
        bos_token="<s>",
        chat_template=tiny.LLAVA_NEXT_TEMPLATE,
        build_tiny=tiny.build_llava_next,
        rope="1d",
    ),
    "llava-onevision": Family(
        name="llava-onevision",
        model_types=("llava_onevision",),
        vision_modules=("model.vision_tower",),
        projector_modules=("model.multi_modal_projector", "model.image_newline"),
        language_modules=("model.language_model", "lm_head"),
        special_tokens=("<|endoftext|>", "<unk>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"),
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        chat_template=tiny.LLAVA_ONEVISION_TEMPLATE,
        build_tiny=tiny.build_llava_onevision,
        rope="1d",
        processor_fallback=lambda path, fam: AnyresTokenProcessor.from_pretrained(path),
    ),
}


# The family of ``mmalign model init`` and of the world lab's model.
DEFAULT_FAMILY = "llava"

# SmolVLM kept Idefics3's module names and chat format, with its own start, padding and end-of-turn tokens.
FAMILIES["smolvlm"] = replace(
    FAMILIES["idefics3"],
    name="smolvlm",
    model_types=("smolvlm",),
    special_tokens=(
        "<|endoftext|>",
        "<unk>",
        "<|im_start|>",
        "<|im_end|>",
        "<end_of_utterance>",
        "<image>",
        "<fake_token_around_image>",
        "<global-img>",
    ),
    pad_token="<|im_end|>",
    bos_token="<|im_start|>",
    chat_template=tiny.SMOLVLM_TEMPLATE,
    build_tiny=tiny.build_smolvlm,
)
# Qwen2.5-VL kept Qwen2-VL's module names, tokens, chat format, positions and processor.
FAMILIES["qwen2.5-vl"] = replace(
    FAMILIES["qwen2-vl"], name="qwen2.5-vl", model_types=("qwen2_5_vl",), build_tiny=tiny.build_qwen25vl
)


def family_of(config: Any) -> Family | None:
    """The family of a loaded model's config, or ``None`` for an architecture without registered quirks."""
    model_type = getattr(config, "model_type", "")
    for fam in FAMILIES.values():
        if model_type in fam.model_types:
            return fam
    return None


def get_family(name: str) -> Family:
    """Look a family up by its command-line name."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; choose one of {sorted(FAMILIES)}") from None


def fast_encoder(processor: Any) -> Callable[..., dict[str, torch.Tensor]] | None:
    """The direct input encoder registered for ``processor``'s class, if any."""
    name = type(processor).__name__
    for fam in FAMILIES.values():
        if fam.fast_encoder is not None and fam.processor_class == name:
            return fam.fast_encoder
    return None


def prompt_positions(model: Any, prompt: dict[str, torch.Tensor]) -> torch.Tensor:
    """Position ids of left-padded prompts for ``model`` (the HF model with ``.config`` and ``.model``): [B, P], or
    [3, B, P] for M-RoPE (from the model's own ``get_rope_index`` when the prompts hold images)."""
    mask = prompt["attention_mask"]
    linear = (mask.long().cumsum(-1) - 1).clamp_min(0)
    fam = family_of(model.config)
    if fam is None or fam.rope != "mrope":
        return linear
    if "image_grid_thw" not in prompt:
        return linear.unsqueeze(0).expand(3, -1, -1)
    pos, _ = model.model.get_rope_index(
        prompt["input_ids"],
        image_grid_thw=prompt["image_grid_thw"],
        attention_mask=mask,
        mm_token_type_ids=prompt.get("mm_token_type_ids"),
    )
    return pos
