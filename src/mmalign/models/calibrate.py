"""Data-dependent initialisation of a random-init projector.

A random vision tower's patch features share a large common component (background, position embeddings), so
different images look alike to the decoder (cosine similarity ≈ 0.9), and a random decoder trained jointly with the
projector drives the projector's output to a constant: the model learns the language prior and never reads the
image. Standardising the projector's input per dimension over a sample of the data (the first linear layer absorbs
the mean and scale, as in data-dependent init schemes) makes image features distinct from the start.
Only used for tiny random-init models; real checkpoints keep their trained projector.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def first_projector_linear(model: torch.nn.Module, projector_paths: Sequence[str]) -> torch.nn.Linear | None:
    """The first ``nn.Linear`` inside the projector (what image features enter first)."""
    for path in projector_paths:
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue
        for sub in module.modules():
            if isinstance(sub, torch.nn.Linear):
                return sub
    return None


@torch.no_grad()
def whiten_projector_input(
    model: Any, processor: Any, images: Sequence[Any], projector_paths: Sequence[str], *, redraw: bool = False
) -> bool:
    """Fold per-dimension standardisation of the projector's input into its first linear layer.

    The standardisation folds into the weights, so it compounds if applied twice; ``redraw`` first draws the layer
    afresh at the model's init scale (for a random-init projector whose input features changed, e.g. after the
    tower was pretrained).

    Args:
        model: a VLM with ``model.model.get_image_features``.
        processor: its processor (``image_processor`` turns PIL images into pixel inputs).
        images: calibration images (a few hundred suffice).
        projector_paths: module paths of the projector (from the family).

    Returns:
        ``True`` if the projector was recalibrated, ``False`` if no linear layer was found.
    """
    linear = first_projector_linear(model, projector_paths)
    if linear is None or not images:
        return False
    if redraw:
        std = getattr(model.config.get_text_config(), "initializer_range", 0.02) or 0.02
        torch.nn.init.normal_(linear.weight, mean=0.0, std=std)
        if linear.bias is not None:
            linear.bias.zero_()
    captured: list[torch.Tensor] = []
    hook = linear.register_forward_pre_hook(lambda _m, args: captured.append(args[0].reshape(-1, args[0].shape[-1])))
    try:
        for i in range(0, len(images), 64):
            pixels = processor.image_processor(images=list(images[i : i + 64]), return_tensors="pt")
            kwargs = {k: v for k, v in pixels.items() if isinstance(v, torch.Tensor)}
            model.model.get_image_features(**kwargs)
    finally:
        hook.remove()
    x = torch.cat(captured).float()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-5)
    weight = linear.weight.data.float()
    if linear.bias is not None:
        linear.bias.data.copy_(linear.bias.data - weight @ (mean / std))
    linear.weight.data.copy_(weight / std)
    return True
