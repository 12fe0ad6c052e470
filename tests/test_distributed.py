"""Two CPU processes (torchrun + gloo) train to the same weights as one process with the whole batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmalign.world.pairs import write_world_pairs

SCRIPT = """
import sys
from mmalign.config import load_config
from mmalign.recipes import dpo
dpo.train(load_config(dpo.DpoConfig, overrides=sys.argv[1:]))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(tmp_path: Path, args: list[str], processes: int) -> None:
    script = tmp_path / "run_dpo.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if processes == 1:
        cmd = [sys.executable, str(script), *args]
    else:
        cmd = [
            sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
            f"--master_port={_free_port()}", str(script), *args,
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
