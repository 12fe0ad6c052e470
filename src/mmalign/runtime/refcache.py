"""Reference log-probs computed once and kept on disk.

The DPO reference model is frozen, so ``log π_ref(chosen)`` and ``log π_ref(rejected)`` of a pair never change: a run
scores each pair it will visit once, before training, and later runs (resumed, or with other hyper-parameters) reuse
them. The cache file is keyed by a fingerprint of the data (texts and image bytes), of the reference weights and of
everything else that changes the scores; it holds one value per pair and a mask of the pairs already scored, so a
longer run only scores what is missing. Files are written atomically, under a lock (runs that share a cache merge
their scores), with a checksum of their values: a damaged or edited file is scored again.

While the cache is in use the training loop needs no reference model in memory at all.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from mmalign.cachedir import cache_root
from mmalign.runtime.locks import file_lock
from mmalign.runtime.progress import progress_bar
from mmalign.types import ImageRef, PreferencePair

log = logging.getLogger(__name__)

# Bump when the way pairs are scored changes, so that old caches are not reused.
SCORING_VERSION = 2


def default_cache_dir() -> Path:
    """``$MMALIGN_CACHE_DIR``, else ``~/.cache/mmalign``, with a ``reference_logps`` sub-directory."""
    return cache_root() / "reference_logps"


def _sha_file(path: Path, h: Any) -> None:
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)


def model_fingerprint(model_dir: str | Path) -> str:
    """SHA-256 of a checkpoint directory's config and weight files (names and bytes)."""
    d = Path(model_dir)
    h = hashlib.sha256()
    weights = {".safetensors", ".bin"}
    files = sorted(p for p in d.iterdir() if p.is_file() and (p.suffix in weights or p.name == "config.json"))
    if not files:
        raise FileNotFoundError(f"{d}: no config.json or weight files to fingerprint")
    for p in files:
        h.update(p.name.encode())
        _sha_file(p, h)
    return h.hexdigest()


def _image_bytes_hash(ref: ImageRef, root: str | None, h: Any) -> None:
    if ref.data is not None:
        h.update(ref.data)
        return
    p = Path(ref.path or "")
    if root is not None and not p.is_absolute():
        p = Path(root) / p
    _sha_file(p, h)


def pairs_fingerprint(pairs: Sequence[PreferencePair]) -> str:
    """SHA-256 of the pairs' ids, prompts, replies and image bytes, in order."""
    h = hashlib.sha256()
    for p in pairs:
        record = {
            "id": p.id,
            "prompt": [m.to_hf() for m in p.prompt],
            "chosen": p.chosen,
            "rejected": p.rejected,
        }
        h.update(json.dumps(record, sort_keys=True).encode())
        for ref in p.images:
            _image_bytes_hash(ref, p.root, h)
    return h.hexdigest()


def cache_key(model_dir: str | Path, pairs: Sequence[PreferencePair], settings: dict[str, Any]) -> str:
    """The cache file's name: data, reference weights and scoring settings together."""
    parts = {
        "version": SCORING_VERSION,
        "model": model_fingerprint(model_dir),
        "pairs": pairs_fingerprint(pairs),
        "settings": settings,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


ScoreFn = Callable[[list[PreferencePair]], tuple[torch.Tensor, torch.Tensor]]


def cached_reference_logps(
    path: Path,
    pairs: Sequence[PreferencePair],
    needed: Sequence[int],
    score: ScoreFn,
    *,
    batch_size: int,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference log-probs of every pair in ``needed``, scoring only those the cache at ``path`` lacks.

    Args:
        path: the cache file (``<dir>/<cache_key>.safetensors``).
        pairs: the whole data set, in the order the indices refer to.
        needed: indices of the pairs the run will visit.
        score: (pairs) → (chosen [n], rejected [n]) log-probs under the reference, without gradients.
        batch_size: pairs per scoring call.

    Returns:
        (chosen [N], rejected [N]) float32 on CPU; entries outside ``needed`` that were never scored are NaN.
    """
    n = len(pairs)
    chosen, rejected, present = _read(path, n)
    missing = sorted({i for i in needed if not present[i]})
    if missing:
        log.info("scoring %d pairs with the reference model (cache: %s)", len(missing), path)
        bar = progress_bar(len(missing), desc="reference log-probs", enabled=progress)
        for start in range(0, len(missing), batch_size):
            idx = missing[start : start + batch_size]
            c, r = score([pairs[i] for i in idx])
            chosen[idx], rejected[idx] = c.detach().float().cpu(), r.detach().float().cpu()
            present[idx] = True
            bar.update(len(idx))
        bar.close()
        with file_lock(path):  # another run may have scored other pairs meanwhile: merge, then replace
            theirs_c, theirs_r, theirs_p = _read(path, n)
            take = theirs_p & ~present
            chosen[take], rejected[take], present[take] = theirs_c[take], theirs_r[take], True
            _write(path, chosen, rejected, present)
    return chosen, rejected


def _checksum(chosen: torch.Tensor, rejected: torch.Tensor, present: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in (chosen, rejected, present):
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def _read(path: Path, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The cache file's values for ``n`` pairs; a missing, unreadable, damaged or edited file (its checksum does not
    match) or one of another size counts as empty, so its pairs are scored again."""
    empty = (torch.full((n,), float("nan")), torch.full((n,), float("nan")), torch.zeros(n, dtype=torch.bool))
    if not path.exists():
        return empty
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            stored = {k: f.get_tensor(k) for k in ("chosen", "rejected", "present")}
    except (SafetensorError, OSError, KeyError, RuntimeError) as err:  # truncated, garbled or incomplete
        log.warning("%s: unreadable reference cache (%s); scoring again", path, err)
        return empty
    chosen, rejected, present = stored["chosen"], stored["rejected"], stored["present"].to(torch.uint8)
    if meta.get("sha256") != _checksum(chosen, rejected, present):
        log.warning("%s: reference cache fails its checksum (damaged or edited); scoring again", path)
        return empty
    if chosen.shape[0] != n:
        log.warning("%s: cache has %d pairs, data has %d; rescoring", path, chosen.shape[0], n)
        return empty
    return chosen, rejected, present.bool()


def _write(path: Path, chosen: torch.Tensor, rejected: torch.Tensor, present: torch.Tensor) -> None:
    """Replace the cache file atomically, with the checksum of its values in the metadata."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    flags = present.to(torch.uint8)
    tensors = {"chosen": chosen.contiguous(), "rejected": rejected.contiguous(), "present": flags}
    save_file(tensors, str(tmp), metadata={"sha256": _checksum(chosen, rejected, flags)})
    os.replace(tmp, path)
