"""Supervised dense pretraining of a random-init vision tower on the world's per-cell object labels.

Real VLMs inherit a vision tower that was pretrained on labelled images (classification, detection or image–text
pairs); the embedded world's tiny models start from a random one. This stage gives them the same start with the
world's exact ground truth: the world is a grid of cells, and every patch token of the tower's output is classified
into the shape, colour and size of the object in its cell (or "empty") by linear heads that are thrown away
afterwards. Only training scenes are used; the eval split's images are held out and the per-attribute accuracy on
them is reported. Because the tower's features change, the projector's input standardisation
(``models/calibrate.py``) is recomputed on the training images at the end (``calibrate_projector``: the projector's
first layer is drawn afresh and standardised, so a model calibrated at ``model init`` ends the same as one that was
not).

Data: a written world (the directory, or its ``scenes.jsonl``). Real checkpoints do not need this stage.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field

from mmalign.config import TrainConfig, dump_config
from mmalign.errors import DataError, ModelError
from mmalign.lab.world.config import WorldConfig, load_world_config
from mmalign.lab.world.scenes import SCENES_JSONL, Scene
from mmalign.models.calibrate import whiten_projector_input
from mmalign.models.load import load_model
from mmalign.runtime.batching import batch_indices
from mmalign.runtime.checkpoint import save_model_atomic
from mmalign.runtime.launch import Recipe
from mmalign.runtime.launch import main as launch_main
from mmalign.runtime.locks import lock_run_dir, release_run_dir
from mmalign.runtime.metrics import MetricsLog
from mmalign.runtime.optim import lr_factor, make_optimizer, set_lr
from mmalign.runtime.progress import progress_bar
from mmalign.runtime.step import StepEnd
from mmalign.types import ImageRef

log = logging.getLogger(__name__)

ATTRIBUTES = ("shape", "colour", "size")


class VisionConfig(TrainConfig):
    """Tower pretraining: every tower parameter trains; the rest of the VLM is untouched."""

    resumable: ClassVar[bool] = False

    steps: int = Field(200, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(3e-3, gt=0)
    # Training scenes used (their images are preprocessed once and kept in memory).
    max_samples: int | None = Field(8000, ge=1)
    # Held-out (eval split) images scored at the end.
    eval_images: int = Field(400, ge=0)
    calibrate_projector: bool = True
    calibration_images: int = Field(512, ge=1)


def cell_labels(scene: Scene, world: WorldConfig) -> torch.Tensor:
    """``[3, rows * cols]`` class ids per cell (row-major): 0 = empty, else 1 + index in the world's sorted
    shapes / colours / sizes."""
    names = _class_names(world)
    labels = torch.zeros(len(ATTRIBUTES), world.grid_rows * world.grid_cols, dtype=torch.long)
    for obj in scene.objects:
        cell = obj.row * world.grid_cols + obj.col
        for k, attr in enumerate(ATTRIBUTES):
            labels[k, cell] = 1 + names[k].index(getattr(obj, attr))
    return labels


def patch_to_cell(patches_per_side: int, rows: int, cols: int) -> torch.Tensor:
    """``[P * P]`` cell index of each patch (row-major) by the patch centre: the world's cells need not be patches."""
    centre = (torch.arange(patches_per_side) + 0.5) / patches_per_side
    r = (centre * rows).long().clamp_max(rows - 1)
    c = (centre * cols).long().clamp_max(cols - 1)
    return (r[:, None] * cols + c[None, :]).reshape(-1)


def dense_loss(logits: Sequence[torch.Tensor], labels: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """Sum over attributes of the mean cross-entropy over patches.

    Args:
        logits: per attribute, ``[B, P*P, n_classes]`` from the patch tokens.
        labels: ``[B, 3, rows*cols]`` from :func:`cell_labels`.
        cells: ``[P*P]`` from :func:`patch_to_cell`.
    """
    total = logits[0].new_zeros(())
    for k, lg in enumerate(logits):
        target = labels[:, k, cells]  # [B, P*P]
        total = total + F.cross_entropy(lg.reshape(-1, lg.shape[-1]), target.reshape(-1))
    return total


class _Heads(torch.nn.Module):
    def __init__(self, dim: int, n_classes: Sequence[int]) -> None:
        super().__init__()
        self.heads = torch.nn.ModuleList(torch.nn.Linear(dim, n) for n in n_classes)

    def forward(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        return [h(tokens) for h in self.heads]


def train(cfg: VisionConfig) -> Path:
    """Pretrain the vision tower of ``cfg.model`` on the world at ``cfg.data``; saves ``<out>/model``."""
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    world_dir = _world_dir(cfg.data)
    world = load_world_config(world_dir)
    scenes = read_scenes(world_dir / SCENES_JSONL, world)
    train_scenes = [s for s in scenes if s.split == "train"][: cfg.max_samples]
    eval_scenes = [s for s in scenes if s.split != "train"][: cfg.eval_images]
    if not train_scenes:
        raise DataError(world_dir / SCENES_JSONL, None, None, "no training scenes")
    loaded = load_model(cfg.model)
    tower, select = _tower(loaded.model)
    side = int(tower.config.image_size) // int(tower.config.patch_size)
    cells = patch_to_cell(side, world.grid_rows, world.grid_cols)
    lock_run_dir(out)  # one run per directory, as the library's recipes
    dump_config(cfg, out / "config.yaml")

    images = _pixels(loaded.processor, world_dir, train_scenes)
    labels = torch.stack([cell_labels(s, world) for s in train_scenes])
    heads = _Heads(int(tower.config.hidden_size), [1 + len(n) for n in _class_names(world)])
    for p in loaded.model.parameters():
        p.requires_grad_(False)
    for p in tower.parameters():
        p.requires_grad_(True)
    modules = torch.nn.ModuleList([tower, heads])
    optimizer = make_optimizer(modules, cfg.lr, cfg.weight_decay)
    metrics = MetricsLog(out / "metrics.jsonl", tensorboard_dir=out / "tb")
    warmup = int(cfg.warmup_ratio * cfg.steps)
    tower.train()
    bar = progress_bar(cfg.steps, desc=f"vision {out.name}", enabled=cfg.progress)
    end_step = StepEnd(cfg, optimizer, metrics, bar, params=modules.parameters())
    for step in range(cfg.steps):
        lr = cfg.lr * lr_factor(step, cfg.steps, warmup, cfg.schedule)
        set_lr(optimizer, lr)
        idx = torch.as_tensor(batch_indices(len(train_scenes), cfg.batch_size, step, cfg.seed))
        loss = dense_loss(heads(select(tower, images[idx])), labels[idx], cells)
        loss.backward()
        end_step(step, {"loss": loss.item()}, lr)
    bar.close()
    tower.eval()
    for p in tower.parameters():
        p.requires_grad_(False)
    held_out = _accuracy(tower, select, heads, loaded.processor, world_dir, eval_scenes, world, cells)
    if held_out:
        metrics.write(cfg.steps, {f"eval_{k}": v for k, v in held_out.items()})
        log.info("held-out cell accuracy: %s", ", ".join(f"{k} {v:.3f}" for k, v in held_out.items()))
    metrics.close()
    if cfg.calibrate_projector:
        calib = [_open(world_dir, s) for s in train_scenes[: cfg.calibration_images]]
        whiten_projector_input(loaded.model, loaded.processor, calib, loaded.family.projector_modules, redraw=True)
    for p in loaded.model.parameters():
        p.requires_grad_(True)
    (out / "held_out.json").write_text(json.dumps(held_out, indent=2) + "\n")
    final = save_model_atomic(loaded.model, loaded.processor, out / "model")
    release_run_dir(out)
    return final


def _accuracy(
    tower: torch.nn.Module,
    select: Any,
    heads: _Heads,
    processor: Any,
    world_dir: Path,
    scenes: list[Scene],
    world: WorldConfig,
    cells: torch.Tensor,
) -> dict[str, float]:
    """Per-attribute accuracy over patches of the held-out images: occupied cells, and empty cells called empty."""
    if not scenes:
        return {}
    with torch.no_grad():
        logits = heads(select(tower, _pixels(processor, world_dir, scenes)))
    labels = torch.stack([cell_labels(s, world) for s in scenes])[:, :, cells]
    result = {}
    for k, attr in enumerate(ATTRIBUTES):
        pred, target = logits[k].argmax(-1), labels[:, k]
        occupied = target > 0
        result[attr] = float((pred[occupied] == target[occupied]).float().mean())
    empty = labels[:, 0] == 0
    result["empty"] = float((logits[0].argmax(-1)[empty] == 0).float().mean())
    return result


def read_scenes(path: Path, world: WorldConfig) -> list[Scene]:
    """All scenes of ``scenes.jsonl``, each checked against the world (cells on the grid, known attributes); a bad
    row is a ``DataError`` naming the file, the row and the field."""
    names = dict(zip(ATTRIBUTES, _class_names(world), strict=True))
    scenes = []
    with path.open(encoding="utf-8") as f:
        for row, line in enumerate(f, start=1):
            try:
                scene = Scene.from_dict(json.loads(line))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
                raise DataError(path, row, None, f"not a scene record ({type(exc).__name__}: {exc})") from None
            for i, obj in enumerate(scene.objects):
                for attr, known in names.items():
                    value = getattr(obj, attr)
                    if value not in known:
                        raise DataError(path, row, f"objects[{i}].{attr}", f"{value!r} is not in the world")
                if not (0 <= obj.row < world.grid_rows and 0 <= obj.col < world.grid_cols):
                    raise DataError(path, row, f"objects[{i}]", f"cell ({obj.row}, {obj.col}) is off the grid")
            scenes.append(scene)
    return scenes


def _class_names(world: WorldConfig) -> tuple[list[str], list[str], list[str]]:
    return sorted(world.shapes), sorted(world.colours), sorted(world.sizes)


def _world_dir(data: str) -> Path:
    path = Path(data)
    directory = path.parent if path.name == SCENES_JSONL else path
    if not (directory / SCENES_JSONL).is_file():
        reason = f"not a written world (no {SCENES_JSONL}); `mmalign world --out DIR` writes one"
        raise DataError(data, None, None, reason)
    return directory


def _tower(model: Any) -> tuple[torch.nn.Module, Any]:
    """The vision tower and a function ``(tower, pixels) -> [B, P*P, D]`` giving the patch tokens the VLM uses."""
    core = getattr(model, "model", model)
    tower = getattr(core, "vision_tower", None)
    cfg = getattr(tower, "config", None)
    if tower is None or not hasattr(cfg, "patch_size") or not hasattr(cfg, "image_size"):
        raise ModelError(
            "vision pretraining needs a VLM with a ViT vision tower over a square image (`model.vision_tower`); "
            "this model has none"
        )
    layer = getattr(model.config, "vision_feature_layer", -1)
    side = int(cfg.image_size) // int(cfg.patch_size)

    def select(tower: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        hidden = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[layer]
        return hidden[:, -side * side :]  # drop a leading CLS token where the tower has one

    return tower, select


def _open(world_dir: Path, scene: Scene) -> Any:  # PIL image
    return ImageRef(path=scene.image).open(world_dir)


def _pixels(processor: Any, world_dir: Path, scenes: list[Scene]) -> torch.Tensor:
    chunks = []
    for i in range(0, len(scenes), 256):
        images = [_open(world_dir, s) for s in scenes[i : i + 256]]
        chunks.append(processor.image_processor(images=images, return_tensors="pt")["pixel_values"])
    return torch.cat(chunks)


RECIPE = Recipe(
    "vision",
    VisionConfig,
    train,
    "supervised pretraining of a random-init vision tower on a world's per-cell labels (--data WORLD)",
    distributed=False,
)

if __name__ == "__main__":
    sys.exit(launch_main(RECIPE, sys.argv[1:]))
