"""Scene sampling: which shapes, colours, sizes and cells each image holds.

Training scenes plant the bias: the first time a member of a planted pair enters a scene, one coin
decides whether its partner comes too; if not, the partner is kept out of that scene. A scene holding
``a`` alone needs ``a`` drawn first and the coin lost, while a scene holding both pairs arises from either
member drawn first, so a coin of probability ``c`` gives P(b | a) = 2c / (1 + c). The coin therefore uses
``c = p / (2 - p)``, which makes P(partner | member) equal ``pair_prob`` (``p``) in expectation.
Eval scenes break the bias: each holds one member of a pair without its partner, and none holds both
members of any pair.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from mmalign.lab.world.config import WorldConfig

Split = Literal["train", "eval"]
SCENES_JSONL = "scenes.jsonl"
MAX_COPIES = 2  # the same shape appears at most twice in a scene


@dataclass(frozen=True)
class SceneObject:
    """One shape in one grid cell."""

    shape: str
    colour: str
    size: str
    row: int
    col: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "shape": self.shape,
            "colour": self.colour,
            "size": self.size,
            "row": self.row,
            "col": self.col,
        }


@dataclass(frozen=True)
class Scene:
    """One image's ground truth; ``objects`` are in reading order (row-major)."""

    split: Split
    index: int
    objects: tuple[SceneObject, ...]

    @property
    def image_id(self) -> str:
        return f"{self.split}-{self.index:06d}"

    @property
    def image(self) -> str:
        """Image path relative to the world directory, with forward slashes."""
        return f"images/{self.split}/{self.index:06d}.png"

    @cached_property
    def shapes(self) -> tuple[str, ...]:
        """Distinct shapes in reading order of first appearance (computed once: captions and questions ask often)."""
        return tuple(dict.fromkeys(o.shape for o in self.objects))

    def count(self, shape: str) -> int:
        return sum(o.shape == shape for o in self.objects)

    def to_dict(self) -> dict[str, Any]:
        """The ``scenes.jsonl`` row."""
        return {
            "image_id": self.image_id,
            "split": self.split,
            "image": self.image,
            "objects": [o.to_dict() for o in self.objects],
        }

    @staticmethod
    def from_dict(row: dict[str, Any]) -> Scene:
        split, index = row["image_id"].rsplit("-", 1)
        objects = tuple(SceneObject(**o) for o in row["objects"])
        return Scene(split=split, index=int(index), objects=objects)


def sample_scenes(cfg: WorldConfig, split: Split) -> list[Scene]:
    """All scenes of one split, from a generator seeded by ``(cfg.seed, split)`` only."""
    rng = random.Random(f"{cfg.seed}/scenes/{split}")
    # The partner-size coins have their own stream, so that ``partner_small_prob`` changes sizes and nothing else.
    size_rng = random.Random(f"{cfg.seed}/partner-size/{split}")
    n = cfg.n_train if split == "train" else cfg.n_eval
    scenes = []
    for i in range(n):
        shapes, brought = _train_shapes(rng, cfg) if split == "train" else (_eval_shapes(rng, cfg), set())
        scenes.append(_place(rng, size_rng, cfg, split, i, shapes, brought))
    return scenes


def lone_members(scene: Scene, cfg: WorldConfig) -> list[str]:
    """The scene's planted-pair members whose partner is absent, in the order of ``scene.shapes``."""
    present = scene.shapes
    return [s for s in present if s in cfg.partner and cfg.partner[s] not in present]


def load_scenes(directory: str | Path, split: Split | None = None) -> list[Scene]:
    """Read ``scenes.jsonl`` of a written world, optionally keeping one split."""
    scenes = []
    with (Path(directory) / SCENES_JSONL).open(encoding="utf-8") as f:
        for line in f:
            scene = Scene.from_dict(json.loads(line))
            if split is None or scene.split == split:
                scenes.append(scene)
    return scenes


def object_frequency(scenes: Iterable[Scene], shapes: Sequence[str]) -> dict[str, int]:
    """Number of scenes that contain each shape (image-level, as POPE counts)."""
    freq = dict.fromkeys(shapes, 0)
    for scene in scenes:
        for s in scene.shapes:
            freq[s] += 1
    return freq


def cooccurrence_matrix(scenes: Iterable[Scene], shapes: Sequence[str]) -> list[list[int]]:
    """``m[i][j]`` = number of scenes holding both ``shapes[i]`` and ``shapes[j]``.

    The diagonal is the number of scenes holding ``shapes[i]``, so ``m[i][j] / m[i][i]`` is
    P(shape j | shape i).
    """
    index = {s: i for i, s in enumerate(shapes)}
    m = [[0] * len(shapes) for _ in shapes]
    for scene in scenes:
        present = [index[s] for s in scene.shapes]
        for i in present:
            for j in present:
                m[i][j] += 1
    return m


def _train_shapes(rng: random.Random, cfg: WorldConfig) -> tuple[list[str], set[int]]:
    """The scene's shapes, and the indices of the partners that a member's coin brought along."""
    partner = cfg.partner
    coin = cfg.pair_prob / (2.0 - cfg.pair_prob)
    n = rng.randint(cfg.min_objects, cfg.max_objects)
    shapes: list[str] = []
    banned: set[str] = set()
    brought: set[int] = set()

    def unresolved(s: str) -> bool:
        return s in partner and partner[s] not in shapes and partner[s] not in banned

    while len(shapes) < n:
        if _maybe_duplicate(rng, cfg, shapes):
            continue
        # A member drawn into the last slot of a full scene would leave no room for its partner; keep
        # unresolved members out of that slot entirely, so both coin outcomes lose the same share.
        can_grow = n - len(shapes) >= 2 or n < cfg.max_objects
        cands = [s for s in cfg.shapes if s not in shapes and s not in banned and (can_grow or not unresolved(s))]
        if not cands:
            break
        s = rng.choice(cands)
        needs_decision = unresolved(s)
        shapes.append(s)
        if needs_decision:
            if rng.random() < coin:
                n = max(n, len(shapes) + 1)
                brought.add(len(shapes))
                shapes.append(partner[s])
            else:
                banned.add(partner[s])
    return shapes, brought


def _eval_shapes(rng: random.Random, cfg: WorldConfig) -> list[str]:
    partner = cfg.partner
    n = rng.randint(cfg.min_objects, cfg.max_objects)
    shapes: list[str] = []
    banned: set[str] = set()
    if cfg.pairs:
        anchor = rng.choice(rng.choice(cfg.pairs))
        shapes.append(anchor)
        banned.add(partner[anchor])
    while len(shapes) < n:
        if _maybe_duplicate(rng, cfg, shapes):
            continue
        cands = [s for s in cfg.shapes if s not in shapes and s not in banned]
        if not cands:
            break
        s = rng.choice(cands)
        shapes.append(s)
        if s in partner:
            banned.add(partner[s])
    return shapes


def _maybe_duplicate(rng: random.Random, cfg: WorldConfig, shapes: list[str]) -> bool:
    """With ``duplicate_prob``, repeat a shape already in the scene; says whether it did."""
    if not shapes or rng.random() >= cfg.duplicate_prob:
        return False
    cands = [s for s in dict.fromkeys(shapes) if shapes.count(s) < MAX_COPIES]
    if not cands:
        return False
    shapes.append(rng.choice(cands))
    return True


def _place(
    rng: random.Random,
    size_rng: random.Random,
    cfg: WorldConfig,
    split: Split,
    index: int,
    shapes: list[str],
    brought: set[int],
) -> Scene:
    """Give each shape a colour, a size and a distinct cell; order objects row-major.

    A partner that its member brought along (index in ``brought``) is drawn at the smallest size (or at
    ``cfg.partner_size``, a size only such partners get) with ``cfg.partner_small_prob`` (a coin from
    ``size_rng``): the object that comes with another is often the one barely in view, like the table at the edge
    of a photo of a fork.
    """
    n_cells = cfg.grid_rows * cfg.grid_cols
    cells = rng.sample(range(n_cells), len(shapes))
    colours = list(cfg.colours)
    sizes = [name for name in cfg.sizes if name != cfg.partner_size]
    smallest = cfg.partner_size or min(sizes, key=lambda name: cfg.sizes[name])

    def size(i: int) -> str:
        drawn = rng.choice(sizes)
        if i in brought and size_rng.random() < cfg.partner_small_prob:
            return smallest
        return drawn

    objects = []
    for i, (s, cell) in enumerate(zip(shapes, cells)):
        colour = rng.choice(colours)
        objects.append(SceneObject(s, colour, size(i), row=cell // cfg.grid_cols, col=cell % cfg.grid_cols))
    objects.sort(key=lambda o: (o.row, o.col))
    return Scene(split=split, index=index, objects=tuple(objects))
