"""A tokenizer + image-processor pair for families whose transformers processor cannot be built here.

transformers' ``Qwen2VLProcessor`` insists on a video processor, and the video processors need torchvision. On a
machine without torchvision (ours, and CI) this small processor does the image half of the job the same way: it
expands every image placeholder into as many image tokens as the image processor's grid implies and marks them in
``mm_token_type_ids`` (which Qwen2-VL's M-RoPE needs). With torchvision installed the real processor is used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


class ImageTokenProcessor:
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

    def apply_chat_template(self, messages: list[dict[str, Any]], **kwargs: Any) -> Any:
        return self.tokenizer.apply_chat_template(messages, **kwargs)

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

    def batch_decode(self, *args: Any, **kwargs: Any) -> list[str]:
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args: Any, **kwargs: Any) -> str:
        return self.tokenizer.decode(*args, **kwargs)

    def save_pretrained(self, out: str | Path) -> None:
        self.tokenizer.save_pretrained(out)
        self.image_processor.save_pretrained(out)
