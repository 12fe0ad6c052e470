"""The embedded synthetic scene world: hallucination measurable with exact ground truth.

Scenes of coloured shapes on a 3x3 grid, with planted co-occurrence pairs (``star``/``moon``,
``heart``/``cross``) that training scenes keep together and eval scenes pull apart. ``write_world``
writes images, captions, instruction data, POPE and CHAIR sets; see ``mmalign.lab.world.writer``.
"""

from mmalign.lab.world.config import WorldConfig, load_world_config
from mmalign.lab.world.pope import POPE_SPLITS, pope_questions
from mmalign.lab.world.render import render_scene
from mmalign.lab.world.scenes import (
    Scene,
    SceneObject,
    cooccurrence_matrix,
    load_scenes,
    object_frequency,
    sample_scenes,
)
from mmalign.lab.world.text import chair_vocab, detailed_caption, short_caption
from mmalign.lab.world.writer import WorldSummary, make_world, write_world

__all__ = [
    "POPE_SPLITS",
    "Scene",
    "SceneObject",
    "WorldConfig",
    "WorldSummary",
    "chair_vocab",
    "cooccurrence_matrix",
    "detailed_caption",
    "load_scenes",
    "load_world_config",
    "make_world",
    "object_frequency",
    "pope_questions",
    "render_scene",
    "sample_scenes",
    "short_caption",
    "write_world",
]
