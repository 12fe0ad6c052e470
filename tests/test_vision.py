"""Dense vision-tower pretraining on the world's cells: labels, patch-to-cell map and loss by hand; the recipe
trains the tower only, learns the shapes of held-out images, and recalibrates the projector."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmalign.config import load_config
from mmalign.errors import DataError
from mmalign.lab.recipes.vision import VisionConfig, cell_labels, dense_loss, patch_to_cell, train
from mmalign.lab.world import WorldConfig
from mmalign.lab.world.scenes import Scene, SceneObject


def test_patch_to_cell_by_patch_centre() -> None:
    # 6x6 patches over a 3x3 grid: two patches per cell along each side.
    got = patch_to_cell(6, 3, 3).reshape(6, 6)
    assert got[0].tolist() == [0, 0, 1, 1, 2, 2]
    assert got[:, 0].tolist() == [0, 0, 3, 3, 6, 6]
    assert got[5, 5].item() == 8
    # One patch per cell is the identity.
    assert patch_to_cell(3, 3, 3).tolist() == list(range(9))


def test_cell_labels_by_hand() -> None:
    world = WorldConfig()
    scene = Scene("train", 0, (SceneObject("star", "red", "small", row=1, col=2),))
    labels = cell_labels(scene, world)
    assert labels.shape == (3, 9)
    cell = 1 * 3 + 2
    assert labels[0, cell] == 1 + sorted(world.shapes).index("star")
    assert labels[1, cell] == 1 + sorted(world.colours).index("red")
    assert labels[2, cell] == 1 + sorted(world.sizes).index("small")
    assert int((labels != 0).sum()) == 3  # every other cell is empty (class 0)


def test_dense_loss_by_hand() -> None:
    # Zero logits: every patch's cross-entropy is ln(n_classes); the loss sums the attributes' means.
    cells = patch_to_cell(3, 3, 3)
    labels = torch.zeros(2, 3, 9, dtype=torch.long)
    logits = [torch.zeros(2, 9, n) for n in (9, 7, 3)]
    assert dense_loss(logits, labels, cells).item() == pytest.approx(math.log(9) + math.log(7) + math.log(3))
    # A confident, correct logit on every patch drives the loss to ~0.
    sure = [torch.full((2, 9, n), -30.0).index_fill(-1, torch.tensor([0]), 30.0) for n in (9, 7, 3)]
    assert dense_loss(sure, labels, cells).item() < 1e-6


def test_vision_pretraining_learns_held_out_shapes(llava_dir: Path, tmp_path: Path) -> None:
    from mmalign.lab.world import make_world

    world_dir = tmp_path / "world"
    make_world(world_dir, n_train=600, n_eval=40, seed=3, progress=False)
    cfg = load_config(
        VisionConfig,
        flags={"model": str(llava_dir), "data": str(world_dir), "out": str(tmp_path / "run")},
        overrides=["steps=150", "batch_size=32", "progress=false", "log_every=25"],
    )
    final = train(cfg)
    held_out = json.loads((tmp_path / "run" / "held_out.json").read_text())
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[:-1]]
    assert losses[-1] < 0.5 * losses[0]
    # The test's tower is tiny (one layer, four 8 px patches per cell) and 150 steps are short: 8 shapes, chance
    # 1/8 on an occupied cell (measured 0.49); colours and empty cells are easy (0.97, 1.0).
    assert held_out["shape"] > 0.35 and held_out["colour"] > 0.9 and held_out["empty"] > 0.9
    before, after = load_file(str(llava_dir / "model.safetensors")), load_file(str(final / "model.safetensors"))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any("vision_tower" in k for k in changed)
    assert any("multi_modal_projector.linear_1" in k for k in changed)  # recalibrated for the new features
    assert not any("language_model" in k or "lm_head" in k or "linear_2" in k for k in changed)


def test_vision_pretraining_needs_a_world(llava_dir: Path, tmp_path: Path) -> None:
    cfg = load_config(VisionConfig, flags={"model": str(llava_dir), "data": str(tmp_path), "out": str(tmp_path / "o")})
    with pytest.raises(DataError, match="not a written world"):
        train(cfg)


def test_bad_scene_row_names_file_row_and_field(tmp_path: Path) -> None:
    from mmalign.lab.recipes.vision import read_scenes

    good = Scene("train", 0, (SceneObject("star", "red", "small", row=0, col=0),)).to_dict()
    bad = json.loads(json.dumps(good))
    bad["objects"][0]["shape"] = "dragon"
    path = tmp_path / "scenes.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataError, match=r"row 2 field 'objects\[0\].shape': 'dragon' is not in the world"):
        read_scenes(path, WorldConfig())
    path.write_text(json.dumps(good) + "\n{}\n")
    with pytest.raises(DataError, match="row 2: not a scene record"):
        read_scenes(path, WorldConfig())


def test_projector_ends_the_same_whether_or_not_init_calibrated(world_dir: Path, tmp_path: Path) -> None:
    """The stage draws the projector's first layer afresh before standardising it, so calibration at `model init`
    does not compound with its own."""
    from conftest import TEST_SIZE
    from mmalign.data.corpus import corpus_images, corpus_texts
    from mmalign.models.build import build_tiny, save_model
    from mmalign.models.families import TinySize

    size = TinySize(**TEST_SIZE)
    finals = []
    # Explicit files: other tests add deliberately broken data files to the shared world directory.
    texts = corpus_texts([world_dir / "captions.jsonl", world_dir / "sft.jsonl"])
    for name, images in (("plain", []), ("calibrated", corpus_images([world_dir / "captions.jsonl"]))):
        model, processor = build_tiny("llava", texts, size=size, seed=0, calibration_images=images)
        init = save_model(model, processor, tmp_path / name / "init")
        cfg = load_config(
            VisionConfig,
            flags={"model": str(init), "data": str(world_dir), "out": str(tmp_path / name / "run")},
            overrides=["steps=3", "batch_size=8", "progress=false", "eval_images=4"],
        )
        finals.append(load_file(str(train(cfg) / "model.safetensors")))
    plain, calibrated = finals
    for key in plain:
        if "multi_modal_projector.linear_1" in key:
            torch.testing.assert_close(calibrated[key], plain[key])
