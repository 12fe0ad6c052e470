"""Two CPU processes (torchrun + gloo) train to the same weights as one process with the whole batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmalign.lab.world.pairs import write_world_pairs


def _train(tmp_path: Path, args: list[str], processes: int) -> None:
    """``python -m mmalign.recipes.dpo key=value ...``: the recipe's own entry point, alone or under torchrun."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if processes == 1:
        cmd = [sys.executable, "-m", "mmalign.recipes.dpo", *args]
    else:
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
            "-m", "mmalign.recipes.dpo", *args,
        ]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("loss", ["mdpo"])
def test_two_processes_match_one(llava_dir: Path, world_dir: Path, tmp_path: Path, loss: str) -> None:
    pairs = world_dir / "pairs_distributed.jsonl"
    if not pairs.exists():
        write_world_pairs(world_dir, pairs, seed=0)
    common = [
        f"model={llava_dir}", f"data={pairs}", "steps=3", "lr=2e-3", "progress=false", "max_samples=8",
        f"loss={loss}", "log_every=1", f"ref_cache_dir={tmp_path / 'cache'}",
    ]  # fmt: skip
    _train(tmp_path, [*common, f"out={tmp_path / 'one'}", "batch_size=4"], processes=1)
    _train(tmp_path, [*common, f"out={tmp_path / 'two'}", "batch_size=2"], processes=2)
    one = load_file(str(tmp_path / "one" / "model" / "model.safetensors"))
    two = load_file(str(tmp_path / "two" / "model" / "model.safetensors"))
    start = load_file(str(llava_dir / "model.safetensors"))
    moved = max((one[k] - start[k]).abs().max().item() for k in one)
    assert moved > 1e-3
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=0, atol=2e-5, msg=k)
    # The logged metrics are means over both processes, so they match the single process's too.
    rows_one = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    rows_two = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows_two] == [1, 2, 3]
    for a, b in zip(rows_one, rows_two):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-4)
        assert b["rewards/margins"] == pytest.approx(a["rewards/margins"], abs=1e-4)


def test_launcher_runs_sft_in_two_processes_like_one(llava_dir: Path, world_dir: Path, tmp_path: Path) -> None:
    from mmalign.recipes import recipes
    from mmalign.runtime.launch import run_recipe

    flags = {
        "model": str(llava_dir), "data": str(world_dir / "sft.jsonl"), "steps": 3, "lr": 2e-3, "batch_size": 4,
        "max_samples": 24, "progress": False, "log_every": 1,
    }  # fmt: skip
    grouped = ["group_by_length=true", "loss_per=sample"]
    one = run_recipe(recipes()["sft"], {**flags, "out": str(tmp_path / "one")}, grouped, processes=1)
    two = run_recipe(recipes()["sft"], {**flags, "out": str(tmp_path / "two")}, grouped, processes=2)
    assert two == tmp_path / "two" / "model"
    w1 = load_file(str(one / "model.safetensors"))
    w2 = load_file(str(two / "model.safetensors"))
    start = load_file(str(llava_dir / "model.safetensors"))
    assert max((w1[k] - start[k]).abs().max().item() for k in w1) > 1e-3
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=2e-5, msg=k)
    # Each process took half of the global batch of 4.
    assert "batch_size: 2" in (tmp_path / "two" / "config.yaml").read_text()


def test_launcher_reports_a_failed_run(llava_dir: Path, tmp_path: Path) -> None:
    from mmalign.recipes import recipes
    from mmalign.runtime.launch import LaunchError, run_recipe

    flags = {"model": str(llava_dir), "data": str(tmp_path / "missing.jsonl"), "out": str(tmp_path / "x")}
    with pytest.raises(LaunchError, match="sft with 2 processes failed"):
        run_recipe(recipes()["sft"], {**flags, "batch_size": 4, "steps": 1}, processes=2)
    with pytest.raises(ValueError, match="does not split"):
        run_recipe(recipes()["sft"], {**flags, "batch_size": 3, "steps": 1}, processes=2)
