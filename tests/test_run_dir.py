"""Run directories that cannot be confused: fingerprints, foreign checkpoints, pruning by step, one lock per --out,
and crash safety under SIGKILL between and during checkpoint writes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmalign.cli import main
from mmalign.config import load_config
from mmalign.errors import ConfigError
from mmalign.recipes import sft
from mmalign.recipes.sft import SftConfig
from mmalign.runtime.checkpoint import checkpoint_steps, latest_checkpoint
from mmalign.runtime.locks import RUN_LOCK

BASE = ["steps=6", "batch_size=4", "lr=1e-3", "progress=false", "log_every=1", "save_every=2"]


def _cfg(model: Path, data: Path, out: Path, *extra: str) -> SftConfig:
    flags = {"model": str(model), "data": str(data), "out": str(out)}
    return load_config(SftConfig, flags=flags, overrides=[*BASE, *extra])


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model" / "model.safetensors"))


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_a_foreign_checkpoint(llava_dir: Path, world_dir: Path, tmp_path: Path) -> None:
    data, out = world_dir / "sft.jsonl", tmp_path / "run"
    sft.train(_cfg(llava_dir, data, out, "steps=4"))
    first = _weights(out)
    state = json.loads((out / "checkpoints" / "step-00000004" / "state.json").read_text())
    assert state["run"]["recipe"] == "SftConfig" and state["run"]["settings"]["lr"] == 1e-3
    # Another learning rate, or fewer steps (the old run's last checkpoint is past the end: it would be saved as
    # this run's model): refused, naming what differs; nothing of the first run is touched.
    for extra, differs in ((("lr=2e-3",), "lr 0.001 -> 0.002"), (("steps=3",), "steps 4 -> 3")):
        with pytest.raises(ConfigError, match=f"holds another run's checkpoint, step-00000004 .*{differs}"):
            sft.train(_cfg(llava_dir, data, out, "steps=4", *extra, "resume=true"))
        # Without --resume: a new run into a directory that holds another run's checkpoints is refused as well.
        with pytest.raises(ConfigError, match="use --resume with its settings, or choose another --out"):
            sft.train(_cfg(llava_dir, data, out, "steps=4", *extra))
    assert _same(_weights(out), first)
    # The same settings resume (nothing left to do) and keep the model; settings that change nothing computed
    # (log_every, save_every, keep_checkpoints, progress) may differ.
    sft.train(_cfg(llava_dir, data, out, "steps=4", "resume=true", "log_every=3", "save_every=0"))
    assert _same(_weights(out), first)
    # A new run with the same settings starts again from step 0, clearing the earlier checkpoints.
    sft.train(_cfg(llava_dir, data, out, "steps=4"))
    assert _same(_weights(out), first)


def test_pruning_is_by_step_of_the_current_run(llava_dir: Path, world_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    sft.train(_cfg(llava_dir, world_dir / "sft.jsonl", out, "save_every=1", "keep_checkpoints=2"))
    ckpts = out / "checkpoints"
    assert sorted(checkpoint_steps(ckpts)) == [5, 6]
    assert latest_checkpoint(ckpts) == ckpts / "step-00000006"
    # Left-overs of a killed run: a half-written checkpoint and a damaged pointer; the next resume cleans up.
    (ckpts / ".step-00000007.tmp-99999").mkdir()
    (ckpts / "latest.json").write_text("{not json")
    assert latest_checkpoint(ckpts) == ckpts / "step-00000006"
    sft.train(_cfg(llava_dir, world_dir / "sft.jsonl", out, "save_every=1", "keep_checkpoints=2", "resume=true"))
    assert not list(ckpts.glob(".step-*")) and sorted(checkpoint_steps(ckpts)) == [5, 6]


def _holding(lock: str, path: Path) -> subprocess.Popen:
    """Another process that takes ``mmalign.runtime.locks.<lock>(path)`` and holds it (returns once it has)."""
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import sys, time; from pathlib import Path; from mmalign.runtime.locks import {lock}; "
         f"{lock}(Path(sys.argv[1])); print('locked', flush=True); time.sleep(60)", str(path)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    return holder


def test_one_run_per_directory(llava_dir: Path, world_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    holder = _holding("lock_run_dir", out)
    try:
        args = ["train", "sft", "--model", str(llava_dir), "--data", str(world_dir / "sft.jsonl"), "--out", str(out),
                "--steps", "1", "--batch-size", "2", "progress=false"]  # fmt: skip
        assert main(args) == 2
        assert f"is in use by another run (process {holder.pid})" in capsys.readouterr().err
        assert not (out / "metrics.jsonl").exists() and not (out / "config.yaml").exists()
    finally:
        holder.kill()
        holder.wait()
    assert main(args) == 0  # the lock went with the process that held it
    assert (out / RUN_LOCK).exists() and (out / "model").is_dir()


def _train_command(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "mmalign", "train", "sft", "--model", str(model), "--data", str(data),
            "--out", str(out), *BASE, "steps=12", "save_every=1", "keep_checkpoints=2", *extra]  # fmt: skip


def _kill_when(cmd: list[str], ready, timeout: float = 120.0) -> bool:
    """Start ``cmd``; SIGKILL it as soon as ``ready()`` is true; returns whether it was killed (not finished)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    end = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < end:
        if ready():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.0005)
    proc.kill()
    proc.wait()
    return False


def test_sigkill_between_and_during_checkpoint_writes_resumes_bit_identically(
    llava_dir: Path, world_dir: Path, tmp_path: Path
) -> None:
    data = world_dir / "sft.jsonl"
    full = tmp_path / "full"
    subprocess.run(_train_command(llava_dir, data, full), check=True, capture_output=True)
    reference = _weights(full)
    run = tmp_path / "killed"
    ckpts = run / "checkpoints"
    # 1. Between writes: killed once step 3's checkpoint is complete.
    assert _kill_when(_train_command(llava_dir, data, run), lambda: 3 in checkpoint_steps(ckpts))
    # 2. During a write: killed while a checkpoint directory is still under its temporary name (tried a few times:
    #    the write is short). Each kill leaves the previous checkpoint as the one to resume from.
    caught = 0
    for _ in range(8):
        killed = _kill_when(
            _train_command(llava_dir, data, run, "resume=true"), lambda: any(ckpts.glob(".step-*.tmp-*"))
        )
        caught += killed
        if caught >= 3 or not killed:
            break
    assert caught >= 1, "no kill landed during a checkpoint write"
    assert not (run / "model").exists()
    subprocess.run(_train_command(llava_dir, data, run, "resume=true"), check=True, capture_output=True)
    assert _same(_weights(run), reference)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13))  # every step once, in order
    assert not list(ckpts.glob(".step-*"))


def test_one_writer_per_output_file(tmp_path: Path) -> None:
    from mmalign.runtime.locks import lock_output, release_run_dir

    out = tmp_path / "pairs.jsonl"
    holder = _holding("lock_output", out)
    try:
        with pytest.raises(ConfigError, match=f"pairs.jsonl is in use by another run \\(process {holder.pid}\\)"):
            lock_output(out)
    finally:
        holder.kill()
        holder.wait()
    lock_output(out)
    release_run_dir(out)


def test_a_failed_command_frees_its_run_directory(llava_dir: Path, world_dir: Path, tmp_path: Path) -> None:
    """The lock goes with the command however it ends: another process may take the directory at once."""
    out = tmp_path / "run"
    args = ["train", "sft", "--model", str(llava_dir), "--data", str(world_dir / "sft.jsonl"), "--out", str(out),
            "--steps", "1", "--batch-size", "2", "max_length=20", "progress=false"]  # fmt: skip
    assert main(args) == 2  # over max_length: refused after the directory was claimed
    taken = subprocess.run(
        [sys.executable, "-c", "import sys; from pathlib import Path; from mmalign.runtime.locks import "
         "lock_run_dir; lock_run_dir(Path(sys.argv[1]))", str(out)], capture_output=True, text=True,
    )  # fmt: skip
    assert taken.returncode == 0, taken.stderr
