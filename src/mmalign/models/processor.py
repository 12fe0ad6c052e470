"""Tokenizer + image-processor pairs for families whose transformers processor cannot be built here.

transformers' ``Qwen2VLProcessor`` insists on a video processor, and the video processors need torchvision. On a
machine without torchvision (ours, and CI) this small processor does the image half of the job the same way: it
expands every image placeholder into as many image tokens as the image processor's grid implies and marks them in
``mm_token_type_ids`` (which Qwen2-VL's M-RoPE needs). ``AnyresTokenProcessor`` does the same for LLaVA-OneVision's
tiled ("anyres") images. With torchvision installed the real processors are used.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch


class _TokenizerHalf:
    """What a processor stand-in forwards to its tokenizer, and how it is saved (tokenizer + image processor)."""

    tokenizer: Any
    image_processor: Any

    def apply_chat_template(self, messages: list[dict[str, Any]], **kwargs: Any) -> Any:
        return self.tokenizer.apply_chat_template(messages, **kwargs)

    def batch_decode(self, *args: Any, **kwargs: Any) -> list[str]:
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args: Any, **kwargs: Any) -> str:
        return self.tokenizer.decode(*args, **kwargs)

    def save_pretrained(self, out: str | Path) -> None:
        self.tokenizer.save_pretrained(out)
        self.image_processor.save_pretrained(out)


class ImageTokenProcessor(_TokenizerHalf):
    """Minimal processor: chat template + image-token expansion + image preprocessing.

    Args:
        tokenizer: a ``PreTrainedTokenizerFast`` carrying the chat template.
        image_processor: an image processor returning ``pixel_values`` and ``image_grid_thw``.
        image_token: placeholder token in the text, expanded per image.
    """

    def __init__(self, tokenizer: Any, image_processor: Any, image_token: str = "<|image_pad|>") -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_token = image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        self.chat_template = tokenizer.chat_template

    def _tokens_per_image(self, grid_thw: torch.Tensor) -> int:
        merge = getattr(self.image_processor, "merge_size", 1)
        return int(grid_thw.prod().item()) // (merge * merge)

    def __call__(
        self,
        text: list[str] | str,
        images: list[Any] | None = None,
        return_tensors: str = "pt",
        padding: bool | str = True,
        padding_side: str | None = None,
        **kwargs: Any,
    ) -> dict[str, torch.Tensor]:
        texts = [text] if isinstance(text, str) else list(text)
        flat = [im for group in (images or []) for im in (group if isinstance(group, list) else [group])]
        out: dict[str, torch.Tensor] = {}
        if flat:
            vis = self.image_processor(images=flat, return_tensors="pt")
            out.update({k: v for k, v in vis.items()})
            counts = [self._tokens_per_image(g) for g in vis["image_grid_thw"]]
            it = iter(counts)
            expanded = []
            for t in texts:
                pieces = t.split(self.image_token)
                rebuilt = pieces[0]
                for piece in pieces[1:]:
                    rebuilt += self.image_token * next(it) + piece
                expanded.append(rebuilt)
            texts = expanded
        if padding_side is not None:
            self.tokenizer.padding_side = padding_side
        enc = self.tokenizer(texts, return_tensors=return_tensors, padding=padding, add_special_tokens=False)
        out["input_ids"] = enc["input_ids"]
        out["attention_mask"] = enc["attention_mask"]
        out["mm_token_type_ids"] = (enc["input_ids"] == self.image_token_id).long()
        return out


class AnyresTokenProcessor(_TokenizerHalf):
    """Image-only stand-in for ``LlavaOnevisionProcessor``, which transformers cannot build without torchvision.

    transformers checks the processor's video processor against a class it only exports with torchvision installed,
    so the real processor cannot be constructed here even for images alone. This one does the image half the same
    way: each prompt's images are preprocessed as a group (the image processor tiles a prompt's lone image and gives
    each image of a multi-image prompt its base tile only), every placeholder becomes as many image tokens as the
    model makes features of that image (``LlavaOnevisionProcessor``'s count, for the "full" feature strategy of
    SigLIP towers), and the texts are tokenized. Outputs: ``input_ids``, ``attention_mask`` [B, T],
    ``pixel_values`` [images, tiles, C, H, W], ``image_sizes`` [images, 2], ``batch_num_images`` [prompts with images].

    Args:
        tokenizer: a tokenizer carrying the chat template.
        image_processor: a LLaVA-OneVision image processor (PIL or torchvision).
        num_image_tokens: vision features of one tile, ``(image_size // patch_size) ** 2``.
        image_token: the placeholder in chat text.
        vision_aspect_ratio: ``anyres_max_N``: grid features past N tiles' worth are downsampled.
    """

    def __init__(
        self,
        tokenizer: Any,
        image_processor: Any,
        num_image_tokens: int,
        image_token: str = "<image>",
        vision_aspect_ratio: str = "anyres_max_9",
    ) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.num_image_tokens = num_image_tokens
        self.image_token = image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        self.vision_aspect_ratio = vision_aspect_ratio
        self.chat_template = tokenizer.chat_template

    @classmethod
    def from_pretrained(cls, path: str | Path) -> AnyresTokenProcessor:
        """Rebuild from a model directory (tokenizer, image processor and ``config.json``), offline."""
        from transformers import AutoConfig, AutoTokenizer
        from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
            LlavaOnevisionImageProcessorPil,
        )

        config = AutoConfig.from_pretrained(path, local_files_only=True)
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        vision = config.vision_config
        return cls(
            tok,
            LlavaOnevisionImageProcessorPil.from_pretrained(path, local_files_only=True),
            (vision.image_size // vision.patch_size) ** 2,
            tok.convert_ids_to_tokens(config.image_token_id),
            config.vision_aspect_ratio,
        )

    def tokens_per_image(self, height: int, width: int, tile: tuple[int, int], alone: bool) -> int:
        """Image tokens of one image of ``height`` x ``width`` pixels (``alone``: the only image of its prompt)."""
        from transformers.image_processing_utils import select_best_resolution

        if not alone:
            return self.num_image_tokens + 1  # base tile + one newline
        side = math.isqrt(self.num_image_tokens)
        best_h, best_w = select_best_resolution([height, width], self.image_processor.image_grid_pinpoints)
        rows, cols = side * (best_h // tile[0]), side * (best_w // tile[1])
        # The grid holds the image letterboxed; the model unpads it to the rows / columns the image covers.
        if width / height > cols / rows:
            rows -= 2 * ((rows - int(round(height * (cols / width), 7))) // 2)
        else:
            cols -= 2 * ((cols - int(round(width * (rows / height), 7))) // 2)
        grid, newlines = rows * cols, rows
        ratio = math.sqrt(rows * cols / (int(self.vision_aspect_ratio.removeprefix("anyres_max_")) * side * side))
        if ratio > 1.1:
            grid, newlines = int(rows // ratio) * int(cols // ratio), int(rows // ratio)
        return self.num_image_tokens + grid + newlines

    def __call__(
        self,
        text: list[str] | str,
        images: list[Any] | None = None,
        return_tensors: str = "pt",
        padding: bool | str = True,
        padding_side: str | None = None,
        **kwargs: Any,
    ) -> dict[str, torch.Tensor]:
        texts = [text] if isinstance(text, str) else list(text)
        if images and not any(isinstance(g, (list, tuple)) for g in images):
            images = [images] if len(texts) == 1 else [[im] for im in images]
        groups = [list(g) for g in (images or [])] or [[] for _ in texts]
        if len(groups) != len(texts) or any(t.count(self.image_token) != len(g) for t, g in zip(texts, groups)):
            raise ValueError(f"each text needs one {self.image_token} per image of its group")
        out: dict[str, torch.Tensor] = {}
        if any(groups):
            vis = self.image_processor(images=[g for g in groups if g], return_tensors="pt")
            out.update(vis.items())
            tile = tuple(vis["pixel_values"].shape[-2:])
            sizes = iter(vis["image_sizes"].tolist())
            expanded = []
            for t, group in zip(texts, groups):
                pieces = t.split(self.image_token)
                for i in range(1, len(pieces)):
                    height, width = next(sizes)
                    n = self.tokens_per_image(height, width, tile, alone=len(group) == 1)
                    pieces[i] = self.image_token * n + pieces[i]
                expanded.append("".join(pieces))
            texts = expanded
        side = {"padding_side": padding_side} if padding_side is not None else {}
        enc = self.tokenizer(texts, return_tensors=return_tensors, padding=padding, add_special_tokens=False, **side)
        out["input_ids"] = enc["input_ids"]
        out["attention_mask"] = enc["attention_mask"]
        return out
