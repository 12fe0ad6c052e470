"""Atomic, resumable checkpoints without pickle.

A checkpoint is a directory ``step-00000120/`` holding the trainable weights (safetensors), the optimizer state
(``torch.save``; read back with ``weights_only=True``), the random-number states and a small JSON. It is written
under a temporary name and renamed into place, so a run killed mid-write leaves the previous checkpoint intact;
``latest.json`` (also replaced atomically) names the newest complete one.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

LATEST = "latest.json"


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file and a rename."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: str | Path, obj: Any, *, ensure_ascii: bool = True) -> None:
    """Write ``obj`` as indented JSON to ``path`` (its directory made) through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=ensure_ascii) + "\n")


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that training changes (frozen weights come back from the base model)."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    np_state = np.random.get_state()
    meta = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return tensors, meta


def _set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    py = meta["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npm = meta["numpy"]
    np.random.set_state((npm[0], np.array(npm[1], dtype=np.uint32), npm[2], npm[3], npm[4]))


@dataclass
class Resumed:
    """What a run needs to continue from a checkpoint."""

    step: int
    extra: dict[str, Any]


def save_checkpoint(
    ckpt_root: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    extra: dict[str, Any] | None = None,
    keep: int = 2,
    run: dict[str, Any] | None = None,
) -> Path:
    """Write checkpoint ``step`` atomically and prune by step: the ``keep`` newest up to ``step`` stay (this one
    always), later ones (left by an earlier run) go.

    ``run``: the identity of the run that writes it (``mmalign.runtime.run.run_identity``), kept in ``state.json``
    so that ``--resume`` can refuse a checkpoint of other settings."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = step_dir(ckpt_root, step)
    tmp = ckpt_root / f".step-{step:08d}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    rng_tensors, rng_meta = _rng_state()
    save_file(rng_tensors, str(tmp / "rng.safetensors"))
    state = {"step": step, "rng": rng_meta, "extra": extra or {}, "run": run}
    (tmp / "state.json").write_text(json.dumps(state))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_text(ckpt_root / LATEST, json.dumps({"step": step, "dir": final.name}))
    steps = checkpoint_steps(ckpt_root)
    kept = set(sorted(s for s in steps if s <= step)[-keep:])
    for old in steps:
        if old not in kept:
            shutil.rmtree(step_dir(ckpt_root, old), ignore_errors=True)
    return final


def step_dir(ckpt_root: Path, step: int) -> Path:
    """The directory of checkpoint ``step``."""
    return ckpt_root / f"step-{step:08d}"


def checkpoint_steps(ckpt_root: Path) -> list[int]:
    """The steps of the checkpoint directories under ``ckpt_root`` (complete or not), in no order."""
    steps = []
    for path in ckpt_root.glob("step-*"):
        with contextlib.suppress(ValueError):
            steps.append(int(path.name.removeprefix("step-")))
    return steps


def remove_orphans(ckpt_root: Path) -> int:
    """Delete checkpoint directories left half-written by a killed run (``.step-*.tmp-*``); returns how many.

    Call only while holding the run directory's lock: then no other process is writing one."""
    orphans = list(ckpt_root.glob(".step-*.tmp-*"))
    for path in orphans:
        shutil.rmtree(path, ignore_errors=True)
    return len(orphans)


def checkpoint_run(path: Path) -> dict[str, Any] | None:
    """The identity of the run that wrote checkpoint ``path`` (None for a checkpoint written without one)."""
    try:
        return json.loads((path / "state.json").read_text()).get("run")
    except (OSError, ValueError):
        return None


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    """The newest complete checkpoint directory, or ``None``."""
    pointer = ckpt_root / LATEST
    if not pointer.is_file():
        return None
    try:
        name = json.loads(pointer.read_text())["dir"]
    except (OSError, ValueError, KeyError, TypeError):
        name = None
    if not isinstance(name, str) or not (ckpt_root / name / "state.json").is_file():
        # A damaged pointer, or one naming a deleted checkpoint: the newest complete checkpoint instead.
        complete = [s for s in checkpoint_steps(ckpt_root) if (step_dir(ckpt_root, s) / "state.json").is_file()]
        return step_dir(ckpt_root, max(complete)) if complete else None
    return ckpt_root / name


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Resumed:
    """Restore trainable weights, optimizer and RNG states from ``path``."""
    weights = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = [n for n in weights if n not in params]
    if missing:
        raise ValueError(f"{path}: checkpoint has parameters the model lacks, e.g. {missing[0]!r}")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
    state = json.loads((path / "state.json").read_text())
    _set_rng_state(load_file(str(path / "rng.safetensors")), state["rng"])
    return Resumed(step=int(state["step"]), extra=state.get("extra", {}))


def save_model_atomic(
    model: torch.nn.Module, processor: Any, out: Path, state_dict: dict[str, torch.Tensor] | None = None
) -> Path:
    """``save_pretrained`` model + processor into ``out`` through a temporary directory and a rename (``state_dict``:
    the weights to write instead of the model's own, e.g. gathered from a sharded engine)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
    processor.save_pretrained(tmp)
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    return out
