"""Shared fixtures: a small synthetic world and tiny random-init models built from it (offline, seconds)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# A smaller model than the demo's keeps the tests fast; the architecture is the same (``TinySize`` fields).
TEST_SIZE = {"patch_size": 8, "vision_hidden": 32, "vision_layers": 1, "text_hidden": 64, "text_layers": 2,
             "text_intermediate": 128}  # fmt: skip


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Reference log-prob caches go to a temporary directory, never to the user's home."""
    os.environ["MMALIGN_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def world_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mmalign.lab.world import make_world

    out = tmp_path_factory.mktemp("world")
    make_world(out, n_train=80, n_eval=12, seed=1, progress=False)
    return out


def build_model(family: str, world: Path, out: Path) -> Path:
    from mmalign.data.corpus import corpus_texts
    from mmalign.models.build import build_tiny, save_model
    from mmalign.models.families import TinySize

    size = TinySize(**TEST_SIZE)
    model, processor = build_tiny(family, corpus_texts([world]), size=size, seed=0)
    return save_model(model, processor, out)


@pytest.fixture(scope="session")
def llava_dir(world_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model("llava", world_dir, tmp_path_factory.mktemp("llava"))
