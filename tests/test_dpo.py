"""The DPO recipe on world oracle pairs: step-0 loss, learning, mDPO, image-removed diagnostic, resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmalign.config import load_config
from mmalign.lab.world.pairs import write_world_pairs
from mmalign.recipes import dpo
from mmalign.recipes.dpo import DpoConfig


@pytest.fixture(scope="module")
def pairs_file(world_dir: Path) -> Path:
    out = world_dir / "pairs.jsonl"
    write_world_pairs(world_dir, out, seed=0)
    return out


def _run(model: Path, data: Path, out: Path, *extra: str) -> list[dict]:
    cfg = load_config(
        DpoConfig,
        flags={"model": str(model), "data": str(data), "out": str(out)},
        overrides=["steps=6", "batch_size=4", "lr=2e-3", "progress=false", "log_every=1", "max_samples=8", *extra],
    )
    dpo.train(cfg)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_dpo_starts_at_ln2_and_learns_the_preference(llava_dir: Path, pairs_file: Path, tmp_path: Path) -> None:
    rows = _run(llava_dir, pairs_file, tmp_path / "dpo")
    # Policy == reference at step 0: every margin is 0 and −log σ(0) = ln 2.
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert rows[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen", "logps/rejected"):
        assert key in rows[0]
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert rows[-1]["rewards/margins"] > 0


def test_mdpo_logs_its_three_terms(llava_dir: Path, pairs_file: Path, tmp_path: Path) -> None:
    rows = _run(llava_dir, pairs_file, tmp_path / "mdpo", "loss=mdpo", "steps=2")
    first = rows[0]
    # At step 0 each of the three terms is ln 2 (all log-ratios are 0, anchor δ = 0).
    for term in ("extra/dpo", "extra/conditional", "extra/anchor"):
        assert first[term] == pytest.approx(math.log(2), abs=1e-5)
    assert first["loss"] == pytest.approx(3 * math.log(2), abs=1e-4)


def test_image_removed_diagnostic_runs(llava_dir: Path, pairs_file: Path, tmp_path: Path) -> None:
    rows = _run(llava_dir, pairs_file, tmp_path / "noimg", "drop_images=true", "steps=2")
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)


def test_unknown_loss_is_a_clear_error(llava_dir: Path, pairs_file: Path, tmp_path: Path) -> None:
    from mmalign.errors import ConfigError

    # A configuration error (one line on the command line, exit 2), found before anything is loaded.
    with pytest.raises(ConfigError, match="loss: Input should be 'cdpo', 'dpo', 'dpo_norm'"):
        _run(llava_dir, pairs_file, tmp_path / "bad", "loss=dop")
    assert not (tmp_path / "bad").exists()


def test_dpo_resume_matches_uninterrupted(llava_dir: Path, pairs_file: Path, tmp_path: Path) -> None:
    _run(llava_dir, pairs_file, tmp_path / "full", "loss=mdpo", "steps=4", "save_every=2")
    _run(llava_dir, pairs_file, tmp_path / "part", "loss=mdpo", "steps=4", "save_every=2")
    # Simulate an interruption after step 2: drop the final model and the last checkpoint, then resume.
    import shutil

    shutil.rmtree(tmp_path / "part" / "model")
    shutil.rmtree(tmp_path / "part" / "checkpoints" / "step-00000004")
    (tmp_path / "part" / "checkpoints" / "latest.json").write_text(json.dumps({"step": 2, "dir": "step-00000002"}))
    _run(llava_dir, pairs_file, tmp_path / "part", "loss=mdpo", "steps=4", "save_every=2", "resume=true")
    a = load_file(str(tmp_path / "full" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "part" / "model" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)


def test_cached_reference_and_shared_forward_match_the_naive_run(
    llava_dir: Path, pairs_file: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    fast = _run(llava_dir, pairs_file, tmp_path / "fast", "steps=4", f"ref_cache_dir={cache}")
    files = list(cache.glob("*.safetensors"))
    assert len(files) == 1
    stored = load_file(str(files[0]))
    # 4 steps x 4 pairs of 8: the visited pairs are scored, the others are not.
    visited = int(stored["present"].sum())
    assert 4 <= visited <= 8
    assert torch.isnan(stored["chosen"][stored["present"] == 0]).all()
    assert torch.isfinite(stored["chosen"][stored["present"] == 1]).all()
    naive = _run(
        llava_dir,
        pairs_file,
        tmp_path / "naive",
        "steps=4",
        "ref_cache=false",
        "share_prompt=false",
        "response_logits_only=false",
    )
    for a, b in zip(fast, naive):
        for key in ("loss", "rewards/margins", "logps/chosen", "logps/rejected"):
            assert a[key] == pytest.approx(b[key], abs=1e-4), key
    # A second run finds every reference log-prob in the cache and leaves the file as it was.
    before = files[0].read_bytes()
    again = _run(llava_dir, pairs_file, tmp_path / "again", "steps=4", f"ref_cache_dir={cache}")
    assert files[0].read_bytes() == before
    assert [r["loss"] for r in again] == [r["loss"] for r in fast]


def test_cache_key_changes_with_the_data_and_the_model(llava_dir: Path, pairs_file: Path, tmp_path: Path) -> None:
    from dataclasses import replace

    from mmalign.data.preference import load_pairs
    from mmalign.runtime.refcache import cache_key

    pairs = load_pairs(pairs_file).pairs[:4]
    key = cache_key(llava_dir, pairs, {"max_length": None})
    assert key == cache_key(llava_dir, list(pairs), {"max_length": None})
    assert key != cache_key(llava_dir, [replace(pairs[0], rejected="x"), *pairs[1:]], {"max_length": None})
    assert key != cache_key(llava_dir, pairs, {"max_length": 64})
    other = tmp_path / "other"
    import shutil

    shutil.copytree(llava_dir, other)
    weights = load_file(str(other / "model.safetensors"))
    name = next(iter(weights))
    weights[name] = weights[name] + 1
    from safetensors.torch import save_file

    save_file(weights, str(other / "model.safetensors"), metadata={"format": "pt"})
    assert key != cache_key(other, pairs, {"max_length": None})


def test_bf16_autocast_runs_and_starts_at_ln2(llava_dir: Path, pairs_file: Path, tmp_path: Path) -> None:
    f32 = _run(llava_dir, pairs_file, tmp_path / "f32", "steps=1")
    bf16 = _run(llava_dir, pairs_file, tmp_path / "bf16", "steps=2", "mixed_precision=bf16")
    assert bf16[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)
    # The reply log-probs really were computed in bfloat16: they differ from float32's in the low digits. On a CPU
    # with native bfloat16 (AVX-512 BF16) one of the two batch means can round to float32's exactly, so the pair
    # of means is compared, not each.
    keys = ("logps/chosen", "logps/rejected")
    assert tuple(bf16[0][k] for k in keys) != tuple(f32[0][k] for k in keys)
    for k in keys:
        assert bf16[0][k] == pytest.approx(f32[0][k], rel=1e-2)


def test_lora_dpo_uses_the_shared_forward_and_saves_an_adapter(
    llava_dir: Path, pairs_file: Path, tmp_path: Path
) -> None:
    rows = _run(
        llava_dir,
        pairs_file,
        tmp_path / "lora",
        "steps=4",
        "lora.enabled=true",
        "lora.r=4",
        "lora.alpha=8",
        "freeze.llm=true",
        "freeze.projector=true",
    )
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert rows[-1]["rewards/margins"] > 0
    assert (tmp_path / "lora" / "adapter" / "adapter_config.json").exists()
    assert (tmp_path / "lora" / "model" / "model.safetensors").exists()


def test_filled_reference_cache_serves_dpo_and_mdpo_unchanged(
    llava_dir: Path, pairs_file: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Scored inside a run, the cache holds exactly what fill_reference_cache writes beforehand.
    inside = tmp_path / "inside"
    _run(llava_dir, pairs_file, tmp_path / "scored", "steps=4", f"ref_cache_dir={inside}")
    ahead = tmp_path / "ahead"
    overrides = ["steps=4", "batch_size=4", "max_samples=8", "progress=false", f"ref_cache_dir={ahead}"]
    flags = {"model": str(llava_dir), "data": str(pairs_file), "out": str(tmp_path / "unused")}
    dpo.fill_reference_cache(load_config(DpoConfig, flags=flags, overrides=overrides))
    [want], [got] = list(inside.glob("*.safetensors")), list(ahead.glob("*.safetensors"))
    assert got.name == want.name and got.read_bytes() == want.read_bytes()
    assert not (tmp_path / "unused" / "model").exists()  # nothing trained
    # DPO and mDPO on the same data then score nothing themselves.
    caplog.set_level("INFO", logger="mmalign.runtime.refcache")
    for loss in ("dpo", "mdpo"):
        _run(llava_dir, pairs_file, tmp_path / loss, "steps=4", f"loss={loss}", f"ref_cache_dir={ahead}")
    assert not [r for r in caplog.records if "scoring" in r.getMessage()]
    assert got.read_bytes() == want.read_bytes()
