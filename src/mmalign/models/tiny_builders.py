"""Builders of small random-init models of every registered VLM family, offline.

Each builder has the signature of ``Family.build_tiny`` (tokenizer, ``TinySize``) → (model, processor) and builds a
small random-init model of the real transformers architecture offline; ``families.py`` registers them with the rest
of each family's quirks. This module imports nothing from ``families.py`` at run time (which imports it).

Without torchvision (our machines and CI) transformers cannot construct a processor that owns a video processor,
so the builders fall back: SmolVLM to ``Idefics3Processor`` (same prompt and pixels for unsplit images), Qwen2.5-VL
to ``ImageTokenProcessor``, LLaVA-OneVision to ``AnyresTokenProcessor`` (``models/processor.py``). With torchvision
(and, for SmolVLM, ``num2words``) the real processors are used.

Like ``families.py``, the size's ``patch_size`` is used as is: pick ``image_size // patches_per_side`` to get the
small image-token counts listed below (48-pixel images: 9 image tokens for SmolVLM and Qwen2.5-VL, 21 for
LLaVA-NeXT and LLaVA-OneVision, whose images are one base tile plus one grid tile with a newline per row).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from mmalign.models.processor import AnyresTokenProcessor, ImageTokenProcessor

if TYPE_CHECKING:
    from mmalign.models.families import TinySize

# Chat templates: the shape of each family's real template, without newlines (the word-level tokenizer has no
# whitespace tokens). Every literal marker is a special token, so no template word needs to be in the vocabulary.
LLAVA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|user|>{% elif m['role'] == 'assistant' %}<|assistant|>"
    "{% else %}<|system|>{% endif %}"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}<image>{% elif p['type'] == 'text' %}{{ p['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|end|>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
QWEN2VL_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }} "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif p['type'] == 'text' %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)
IDEFICS3_TEMPLATE = (
    "<|begin_of_text|>{% for m in messages %}{{ m['role'] | capitalize }}: "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}<image>{% elif p['type'] == 'text' %}{{ p['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_utterance>{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)


# SmolVLM kept Idefics3's format and opens with its own start token; Qwen2.5-VL kept Qwen2-VL's (QWEN2VL_TEMPLATE).
SMOLVLM_TEMPLATE = IDEFICS3_TEMPLATE.replace("<|begin_of_text|>", "<|im_start|>", 1)
# llava-v1.6-mistral's format; Mistral has no system role, so a system turn is rendered as an instruction turn.
LLAVA_NEXT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] != 'assistant' %}[INST] {% endif %}"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}<image>{% elif p['type'] == 'text' %}{{ p['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{% if m['role'] == 'assistant' %}</s>{% else %} [/INST]{% endif %}{% endfor %}"
)
LLAVA_ONEVISION_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }} "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}<image>{% elif p['type'] == 'text' %}{{ p['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)


def _text_config(tok: Any, size: TinySize) -> dict[str, Any]:
    """Decoder fields shared by the llama / qwen2 text configs (no ``model_type``)."""
    return {
        "vocab_size": len(tok),
        "hidden_size": size.text_hidden,
        "intermediate_size": size.text_intermediate,
        "num_hidden_layers": size.text_layers,
        "num_attention_heads": size.text_heads,
        "num_key_value_heads": size.text_heads,
        "max_position_embeddings": size.max_positions,
        "pad_token_id": tok.pad_token_id,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "tie_word_embeddings": size.tie_embeddings,
    }


def _clip_vision(size: TinySize) -> Any:
    """The CLIP vision tower of the LLaVA and LLaVA-NeXT builders."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=size.vision_hidden,
        intermediate_size=size.vision_hidden * 4,
        num_hidden_layers=size.vision_layers,
        num_attention_heads=size.vision_heads,
        image_size=size.image_size,
        patch_size=size.patch_size,
        projection_dim=size.vision_hidden,
    )


def _clip_processor_args(tok: Any, size: TinySize) -> dict[str, Any]:
    """Processor arguments of a CLIP tower: it emits a CLS token beside the patches, the "default" strategy drops
    it, and the processor must count it (``num_additional_image_tokens=1``) for image tokens and features to agree."""
    return {
        "tokenizer": tok,
        "patch_size": size.patch_size,
        "vision_feature_select_strategy": "default",
        "num_additional_image_tokens": 1,
        "chat_template": tok.chat_template,
    }


def _mrope_text_config(tok: Any, size: TinySize) -> dict[str, Any]:
    """A qwen2-style decoder with M-RoPE, which splits the rotary half-dimension into temporal / height / width."""
    half = size.text_hidden // size.text_heads // 2
    sections = [half - 2 * (half // 3), half // 3, half // 3]
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": sections}
    return {**_text_config(tok, size), "rope_parameters": rope}


def _qwen_token_ids(tok: Any) -> dict[str, int]:
    """The ids of Qwen2-VL's (and Qwen2.5-VL's) image, video and vision-span tokens, as their configs name them."""
    names = {"image": "<|image_pad|>", "video": "<|video_pad|>", "vision_start": "<|vision_start|>",
             "vision_end": "<|vision_end|>"}  # fmt: skip
    return {f"{key}_token_id": tok.convert_tokens_to_ids(token) for key, token in names.items()}


def _qwen_image_processor(size: TinySize, merge: int) -> Any:
    """Qwen2-VL's image processor at exactly ``image_size`` pixels a side (one fixed grid per image)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    pixels = size.image_size * size.image_size
    return Qwen2VLImageProcessorPil(
        min_pixels=pixels, max_pixels=pixels, patch_size=size.patch_size, merge_size=merge, temporal_patch_size=2
    )


def _idefics_vision_config(size: TinySize) -> dict[str, Any]:
    """The SigLIP-like tower of Idefics3 and SmolVLM."""
    return {
        "hidden_size": size.vision_hidden,
        "intermediate_size": size.vision_hidden * 4,
        "num_hidden_layers": size.vision_layers,
        "num_attention_heads": size.vision_heads,
        "image_size": size.image_size,
        "patch_size": size.patch_size,
    }


def build_llava(tok: Any, size: TinySize) -> tuple[torch.nn.Module, Any]:
    from transformers import (
        CLIPImageProcessor,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    vision = _clip_vision(size)
    n_patches = (size.image_size // size.patch_size) ** 2
    text = LlamaConfig(**_text_config(tok, size))
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_seq_length=n_patches,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        tie_word_embeddings=size.tie_embeddings,
    )
    model = LlavaForConditionalGeneration(config)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": size.image_size},
        crop_size={"height": size.image_size, "width": size.image_size},
        do_center_crop=True,
        do_resize=True,
    )
    processor = LlavaProcessor(image_processor=image_processor, **_clip_processor_args(tok, size))
    return model, processor


def build_qwen2vl(tok: Any, size: TinySize) -> tuple[torch.nn.Module, Any]:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor

    text = _mrope_text_config(tok, size)
    vision = {
        "depth": size.vision_layers,
        "embed_dim": size.vision_hidden,
        "hidden_size": size.text_hidden,
        "num_heads": size.vision_heads,
        "patch_size": size.patch_size,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    config = Qwen2VLConfig(
        text_config=text,
        vision_config=vision,
        **_qwen_token_ids(tok),
        tie_word_embeddings=size.tie_embeddings,
    )
    model = Qwen2VLForConditionalGeneration(config)
    image_processor = _qwen_image_processor(size, merge=2)
    try:
        processor = Qwen2VLProcessor(image_processor=image_processor, tokenizer=tok, chat_template=tok.chat_template)
    except (TypeError, AttributeError, ImportError):
        # transformers wants a video processor, which needs torchvision; use the image-only equivalent.
        processor = ImageTokenProcessor(tok, image_processor, "<|image_pad|>")
    return model, processor


def _idefics_style(
    tok: Any, size: TinySize, config_cls: Any, model_cls: Any, image_processor_cls: Any
) -> tuple[torch.nn.Module, Any, int]:
    """(model, image processor, image tokens per image) of Idefics3 or SmolVLM: SigLIP-like tower, pixel-shuffle
    connector (scale 2), llama decoder; images are not split."""
    scale = 2
    config = config_cls(
        text_config={"model_type": "llama", **_text_config(tok, size)},
        vision_config=_idefics_vision_config(size),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        scale_factor=scale,
        tie_word_embeddings=size.tie_embeddings,
    )
    image_processor = image_processor_cls(
        do_image_splitting=False,
        size={"longest_edge": size.image_size},
        max_image_size={"longest_edge": size.image_size},
    )
    return model_cls(config), image_processor, (size.image_size // size.patch_size) ** 2 // (scale * scale)


def build_idefics3(tok: Any, size: TinySize) -> tuple[torch.nn.Module, Any]:
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    model, image_processor, seq_len = _idefics_style(
        tok, size, Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessorPil
    )
    processor = Idefics3Processor(
        image_processor=image_processor, tokenizer=tok, image_seq_len=seq_len, chat_template=tok.chat_template
    )
    return model, processor


def build_smolvlm(tok: Any, size: TinySize) -> tuple[torch.nn.Module, Any]:
    """SmolVLM (Idefics3's successor): SigLIP-like tower, pixel-shuffle connector (scale 2), llama decoder.

    Images are not split: each is one ``image_size`` tile of ``(image_size // patch_size)**2 / 4`` tokens between
    ``<fake_token_around_image><global-img>`` and ``<fake_token_around_image>``. ``pixel_values`` are
    [B, images, C, H, W] with a ``pixel_attention_mask`` [B, images, H, W].
    """
    from transformers import Idefics3Processor, SmolVLMConfig, SmolVLMForConditionalGeneration
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    model, image_processor, seq_len = _idefics_style(
        tok, size, SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMImageProcessorPil
    )
    try:
        from transformers import SmolVLMProcessor
        from transformers.models.smolvlm.video_processing_smolvlm import SmolVLMVideoProcessor

        processor = SmolVLMProcessor(
            image_processor=image_processor,
            tokenizer=tok,
            video_processor=SmolVLMVideoProcessor(),
            image_seq_len=seq_len,
            chat_template=tok.chat_template,
        )
    except (TypeError, AttributeError, ImportError):
        # SmolVLMProcessor refuses to start without `num2words` (used only for video prompts), and without
        # torchvision transformers cannot check its video processor's class. For images that are not split,
        # Idefics3Processor writes the same prompt (<fake><global-img><image>*n<fake>) and pixels.
        processor = Idefics3Processor(
            image_processor=image_processor, tokenizer=tok, image_seq_len=seq_len, chat_template=tok.chat_template
        )
    return model, processor


def build_qwen25vl(tok: Any, size: TinySize) -> tuple[torch.nn.Module, Any]:
    """Qwen2.5-VL: windowed-attention ViT with 2x2 patch merging, M-RoPE qwen2 decoder.

    The tower's windows are two merged tokens a side and its last block attends over the whole image (as the real
    model's every-eighth block does). ``pixel_values`` are flattened patches [sum of patches, C*T*P*P] with
    ``image_grid_thw`` [images, 3]; the position ids are 3D (``get_rope_index``).
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = _mrope_text_config(tok, size)
    merge = 2
    vision = {
        "depth": size.vision_layers,
        "hidden_size": size.vision_hidden,
        "intermediate_size": size.vision_hidden * 4,
        "num_heads": size.vision_heads,
        "out_hidden_size": size.text_hidden,
        "patch_size": size.patch_size,
        "spatial_merge_size": merge,
        "temporal_patch_size": 2,
        "window_size": 2 * merge * size.patch_size,
        "fullatt_block_indexes": [size.vision_layers - 1],
    }
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        **_qwen_token_ids(tok),
        tie_word_embeddings=size.tie_embeddings,
    )
    model = Qwen2_5_VLForConditionalGeneration(config)
    image_processor = _qwen_image_processor(size, merge=merge)
    try:
        from transformers import Qwen2_5_VLProcessor
        from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

        processor = Qwen2_5_VLProcessor(
            image_processor=image_processor,
            tokenizer=tok,
            video_processor=Qwen2VLVideoProcessor(),
            chat_template=tok.chat_template,
        )
    except (TypeError, AttributeError, ImportError):
        # Qwen2-VL's video processor (which Qwen2.5-VL uses) needs torchvision; use the image-only equivalent.
        processor = ImageTokenProcessor(tok, image_processor, "<|image_pad|>")
    return model, processor


def _anyres_image_processor(cls: Any, tiny: TinySize, **kwargs: Any) -> Any:
    # One pinpoint equal to the tile size: every image is resized to one tile, so the processor emits the base
    # tile plus exactly one grid tile, whatever the image's aspect ratio.
    return cls(
        image_grid_pinpoints=[[tiny.image_size, tiny.image_size]],
        do_pad=True,
        do_resize=True,
        **kwargs,
    )


def build_llava_next(tok: Any, size: TinySize) -> tuple[torch.nn.Module, Any]:
    """LLaVA-NeXT: CLIP tower ("default" strategy drops CLS), MLP projector, llama decoder, anyres tiles.

    With one pinpoint the image gives n base features + n grid features + one ``image_newline`` per grid row
    (n = patches per tile; 9 + 9 + 3 = 21 at 3 patches a side). ``pixel_values`` are [B, 2, C, H, W] (base tile,
    grid tile) with ``image_sizes`` [B, 2] (original height, width).
    """
    from transformers import (
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextProcessor,
    )
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    vision = _clip_vision(size)
    config = LlavaNextConfig(
        vision_config=vision,
        text_config=LlamaConfig(**_text_config(tok, size)),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=[[size.image_size, size.image_size]],
        image_seq_length=(size.image_size // size.patch_size) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        tie_word_embeddings=size.tie_embeddings,
    )
    model = LlavaNextForConditionalGeneration(config)
    image_processor = _anyres_image_processor(
        LlavaNextImageProcessorPil,
        size,
        size={"shortest_edge": size.image_size},
        crop_size={"height": size.image_size, "width": size.image_size},
        do_center_crop=True,
    )
    processor = LlavaNextProcessor(image_processor=image_processor, **_clip_processor_args(tok, size))
    return model, processor


def build_llava_onevision(tok: Any, size: TinySize) -> tuple[torch.nn.Module, Any]:
    """LLaVA-OneVision: SigLIP tower (no CLS, "full" strategy), MLP projector, qwen2 decoder, anyres tiles.

    Features and pixel shapes as LLaVA-NeXT's (21 image tokens at 3 patches a side, ``pixel_values``
    [B, 2, C, H, W] with ``image_sizes``); the processor also returns ``batch_num_images`` [B]. A prompt with
    several images switches to the multi-image layout (base tile only + one newline per image).
    """
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionProcessor,
        Qwen2Config,
        SiglipVisionConfig,
    )
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )
    from transformers.models.llava_onevision.video_processing_llava_onevision import LlavaOnevisionVideoProcessor

    vision = SiglipVisionConfig(
        hidden_size=size.vision_hidden,
        intermediate_size=size.vision_hidden * 4,
        num_hidden_layers=size.vision_layers,
        num_attention_heads=size.vision_heads,
        image_size=size.image_size,
        patch_size=size.patch_size,
        vision_use_head=False,
    )
    config = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=Qwen2Config(**_text_config(tok, size)),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        video_token_index=tok.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=[[size.image_size, size.image_size]],
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        vision_aspect_ratio="anyres_max_9",
        tie_word_embeddings=size.tie_embeddings,
    )
    model = LlavaOnevisionForConditionalGeneration(config)
    image_processor = _anyres_image_processor(
        LlavaOnevisionImageProcessorPil, size, size={"height": size.image_size, "width": size.image_size}
    )
    num_image_tokens = (size.image_size // size.patch_size) ** 2
    try:
        video_processor = LlavaOnevisionVideoProcessor(size={"height": size.image_size, "width": size.image_size})
        processor = LlavaOnevisionProcessor(
            image_processor=image_processor,
            tokenizer=tok,
            video_processor=video_processor,
            num_image_tokens=num_image_tokens,
            vision_feature_select_strategy="full",
            vision_aspect_ratio="anyres_max_9",
            chat_template=tok.chat_template,
        )
    except (TypeError, AttributeError, ImportError):
        # Without torchvision transformers cannot check the video processor's class; use the image-only equivalent.
        processor = AnyresTokenProcessor(tok, image_processor, num_image_tokens, "<image>", "anyres_max_9")
    return model, processor
