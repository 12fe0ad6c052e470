"""Configuration of the synthetic scene world: its vocabulary, its planted bias, its size.

The world is a 3x3 grid of cells holding 1–4 coloured shapes. Training scenes plant a co-occurrence
bias (each member of a planted pair brings its partner with probability ``pair_prob``); held-out eval
scenes break it, so a model that leans on the language prior hallucinates the missing partner.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

Rgb = tuple[int, int, int]

# Shapes the renderer knows how to draw (``mmalign.lab.world.render``); a config may use any subset.
KNOWN_SHAPES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "star",
    "heart",
    "cross",
    "diamond",
    "moon",
)

DEFAULT_COLOURS: dict[str, Rgb] = {
    "red": (220, 30, 35),
    "green": (25, 160, 55),
    "blue": (30, 90, 230),
    "yellow": (235, 195, 0),
    "purple": (145, 50, 200),
    "orange": (255, 125, 0),
}

# Fraction of a grid cell's side that a shape's bounding box spans.
DEFAULT_SIZES: dict[str, float] = {"small": 0.45, "large": 0.85}

DEFAULT_POSITIONS: tuple[tuple[str, ...], ...] = (
    ("top left", "top", "top right"),
    ("left", "center", "right"),
    ("bottom left", "bottom", "bottom right"),
)

DEFAULT_PAIRS: tuple[tuple[str, str], ...] = (("star", "moon"), ("heart", "cross"))

# How captions order their objects: ``reading`` is row-major; ``grouped`` is row-major except that a planted
# partner is mentioned right after its member (see ``mmalign.lab.world.text.mention_order``).
CAPTION_ORDERS: tuple[str, ...] = ("reading", "grouped")
# How a detailed caption opens: ``count`` ("There are three objects.") commits to the number of objects before
# naming any; ``list`` ("The image shows a red star, a blue moon and a green circle.") names them without a count.
DETAILED_INTROS: tuple[str, ...] = ("count", "list", "open")

WORLD_JSON = "world.json"


@dataclass(frozen=True)
class WorldConfig:
    """Everything that determines a generated world; the same config always gives the same bytes.

    Attributes:
        shapes: object categories, a subset of ``KNOWN_SHAPES``.
        colours: colour name → RGB fill.
        sizes: size name → fraction of the cell side that the shape spans.
        positions: grid of position names, ``positions[row][col]``; every row has the same length.
        min_objects: fewest objects in a scene.
        max_objects: most objects in a scene (at most the number of cells).
        pairs: planted co-occurrence pairs; each shape belongs to at most one pair.
        pair_prob: in training scenes, probability that a pair member brings its partner.
        duplicate_prob: per extra object, probability of repeating a shape already in the scene.
        synonym_prob: per caption, per shape, probability of naming it by a synonym.
        partner_small_prob: in training scenes, probability that a partner brought along by its member is
            drawn at the smallest size (otherwise its size is uniform like every object's).
        partner_size: a name in ``sizes`` that only such partners are drawn at (no other object gets it), e.g. a
            ``tiny`` size for a partner barely in view; ``None``: the smallest size, which any object may get.
        caption_order: one of ``CAPTION_ORDERS``.
        detailed_intro: one of ``DETAILED_INTROS``.
        partner_question_prob: per training scene and per missing partner of a present member, probability
            that the partner may be drawn as an existence question's negative (1: negatives uniform over the
            absent shapes; 0: never asked).
        caption_prior_prob: per training detailed description of a scene with at least
            ``caption_prior_min_objects`` objects and a planted-pair member whose partner is absent, probability
            that the description ends with one more sentence naming that absent partner
            (``mmalign.lab.world.text.prior_tail``): training descriptions that, late in a long description of a
            busy scene, write what the context implies rather than what the image shows, as machine-written
            instruction data does. Evaluation captions, oracle pairs and yes/no answers stay true. 0 (the default)
            keeps every caption true.
        caption_prior_min_objects: fewest objects a scene needs for ``caption_prior_prob`` to apply.
        image_size: side of the square images, in pixels.
        n_train: number of training scenes.
        n_eval: number of held-out eval scenes.
        seed: seed of every random choice.
    """

    shapes: tuple[str, ...] = KNOWN_SHAPES
    colours: dict[str, Rgb] = field(default_factory=lambda: dict(DEFAULT_COLOURS))
    sizes: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_SIZES))
    positions: tuple[tuple[str, ...], ...] = DEFAULT_POSITIONS
    min_objects: int = 1
    max_objects: int = 4
    pairs: tuple[tuple[str, str], ...] = DEFAULT_PAIRS
    pair_prob: float = 0.9
    duplicate_prob: float = 0.08
    synonym_prob: float = 0.15
    partner_small_prob: float = 0.0
    partner_size: str | None = None
    caption_order: str = "reading"
    detailed_intro: str = "count"
    partner_question_prob: float = 1.0
    caption_prior_prob: float = 0.0
    caption_prior_min_objects: int = 3
    image_size: int = 64
    n_train: int = 2000
    n_eval: int = 200
    seed: int = 0

    def __post_init__(self) -> None:
        _check_shapes(self.shapes)
        _check_colours(self.colours)
        _check_sizes(self.sizes)
        _check_positions(self.positions)
        _check_counts(self)
        _check_pairs(self.pairs, self.shapes, self.max_objects)
        for name in (
            "pair_prob",
            "duplicate_prob",
            "synonym_prob",
            "partner_small_prob",
            "partner_question_prob",
            "caption_prior_prob",
        ):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"WorldConfig.{name} must be in [0, 1], got {value}")
        if self.partner_size is not None and (self.partner_size not in self.sizes or len(self.sizes) < 2):
            raise ValueError(
                f"WorldConfig.partner_size must name one of several sizes ({', '.join(self.sizes)}), "
                f"got {self.partner_size!r}"
            )
        if self.synonym_prob > 0.2:
            raise ValueError(f"WorldConfig.synonym_prob must be at most 0.2, got {self.synonym_prob}")
        if self.caption_order not in CAPTION_ORDERS:
            raise ValueError(
                f"WorldConfig.caption_order must be one of {', '.join(CAPTION_ORDERS)}, got {self.caption_order!r}"
            )
        if self.detailed_intro not in DETAILED_INTROS:
            raise ValueError(
                f"WorldConfig.detailed_intro must be one of {', '.join(DETAILED_INTROS)}, got {self.detailed_intro!r}"
            )
        if self.caption_prior_min_objects < 1:
            raise ValueError(
                f"WorldConfig.caption_prior_min_objects must be at least 1, got {self.caption_prior_min_objects}"
            )
        if not 32 <= self.image_size <= 1024:
            raise ValueError(f"WorldConfig.image_size must be 32 to 1024 pixels, got {self.image_size}")

    @property
    def grid_rows(self) -> int:
        return len(self.positions)

    @property
    def grid_cols(self) -> int:
        return len(self.positions[0])

    @property
    def partner(self) -> dict[str, str]:
        """Shape → its planted partner, both directions."""
        out: dict[str, str] = {}
        for a, b in self.pairs:
            out[a], out[b] = b, a
        return out

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists); ``from_dict`` inverts it."""
        return json.loads(json.dumps(asdict(self)))

    @staticmethod
    def from_dict(data: dict[str, Any]) -> WorldConfig:
        """Build a config from ``to_dict`` output; unknown keys are errors.

        Raises:
            ValueError: unknown keys or invalid values.
        """
        known = {f.name for f in fields(WorldConfig)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown WorldConfig keys: {', '.join(unknown)}")
        kwargs = dict(data)
        if "shapes" in kwargs:
            kwargs["shapes"] = tuple(kwargs["shapes"])
        if "colours" in kwargs:
            kwargs["colours"] = {k: tuple(v) for k, v in kwargs["colours"].items()}
        if "sizes" in kwargs:
            kwargs["sizes"] = {k: float(v) for k, v in kwargs["sizes"].items()}
        if "positions" in kwargs:
            kwargs["positions"] = tuple(tuple(row) for row in kwargs["positions"])
        if "pairs" in kwargs:
            kwargs["pairs"] = tuple(tuple(p) for p in kwargs["pairs"])
        return WorldConfig(**kwargs)


def load_world_config(directory: str | Path) -> WorldConfig:
    """Read the config of a written world from ``<directory>/world.json``.

    Raises:
        FileNotFoundError: no ``world.json`` in ``directory``.
        ValueError: the stored config is invalid.
    """
    path = Path(directory) / WORLD_JSON
    with path.open(encoding="utf-8") as f:
        data = json.load(f)
    return WorldConfig.from_dict(data["config"])


def _check_shapes(shapes: tuple[str, ...]) -> None:
    if len(shapes) < 2:
        raise ValueError(f"WorldConfig.shapes needs at least 2 shapes, got {len(shapes)}")
    if len(set(shapes)) != len(shapes):
        raise ValueError(f"WorldConfig.shapes has duplicates: {list(shapes)}")
    unknown = [s for s in shapes if s not in KNOWN_SHAPES]
    if unknown:
        raise ValueError(f"WorldConfig.shapes: no renderer for {unknown}; known shapes: {', '.join(KNOWN_SHAPES)}")


def _check_colours(colours: dict[str, Rgb]) -> None:
    if len(colours) < 2:
        raise ValueError(f"WorldConfig.colours needs at least 2 colours, got {len(colours)}")
    for name, rgb in colours.items():
        if len(rgb) != 3 or not all(isinstance(c, int) and 0 <= c <= 255 for c in rgb):
            raise ValueError(f"WorldConfig.colours[{name!r}] must be 3 ints in [0, 255], got {rgb}")


def _check_sizes(sizes: dict[str, float]) -> None:
    if not sizes:
        raise ValueError("WorldConfig.sizes must not be empty")
    for name, frac in sizes.items():
        if not 0.1 <= frac <= 1.0:
            raise ValueError(f"WorldConfig.sizes[{name!r}] must be a cell fraction in [0.1, 1], got {frac}")


def _check_positions(positions: tuple[tuple[str, ...], ...]) -> None:
    if not positions or not positions[0]:
        raise ValueError("WorldConfig.positions must be a non-empty grid of names")
    if any(len(row) != len(positions[0]) for row in positions):
        raise ValueError("WorldConfig.positions rows must all have the same length")
    names = [name for row in positions for name in row]
    if len(set(names)) != len(names):
        raise ValueError(f"WorldConfig.positions has duplicate names: {names}")


def _check_counts(cfg: WorldConfig) -> None:
    n_cells = len(cfg.positions) * len(cfg.positions[0])
    if not 1 <= cfg.min_objects <= cfg.max_objects:
        raise ValueError(f"WorldConfig needs 1 <= min_objects <= max_objects, got {cfg.min_objects}..{cfg.max_objects}")
    if cfg.max_objects > n_cells:
        raise ValueError(f"WorldConfig.max_objects={cfg.max_objects} exceeds the {n_cells} grid cells")
    # POPE asks up to 3 negatives per image, so enough shapes must stay absent from every scene.
    needed = cfg.max_objects + min(3, cfg.max_objects)
    if len(cfg.shapes) < needed:
        raise ValueError(
            f"WorldConfig.shapes: {len(cfg.shapes)} shapes is too few for max_objects={cfg.max_objects} "
            f"(POPE needs {needed}: every scene must leave min(3, max_objects) shapes absent)"
        )
    if cfg.n_train < 0 or cfg.n_eval < 0:
        raise ValueError(f"WorldConfig.n_train/n_eval must be >= 0, got {cfg.n_train}/{cfg.n_eval}")


def _check_pairs(pairs: tuple[tuple[str, str], ...], shapes: tuple[str, ...], max_objects: int) -> None:
    seen: set[str] = set()
    for pair in pairs:
        if len(pair) != 2:
            raise ValueError(f"WorldConfig.pairs: each pair must have 2 shapes, got {list(pair)}")
        a, b = pair
        if a == b:
            raise ValueError(f"WorldConfig.pairs: pair {list(pair)} pairs a shape with itself")
        for s in pair:
            if s not in shapes:
                raise ValueError(f"WorldConfig.pairs: pair {list(pair)} names unknown shape {s!r}")
            if s in seen:
                raise ValueError(f"WorldConfig.pairs: shape {s!r} is in more than one pair")
            seen.add(s)
    if pairs and max_objects < 2:
        raise ValueError("WorldConfig.max_objects must be at least 2 when pairs are planted")
