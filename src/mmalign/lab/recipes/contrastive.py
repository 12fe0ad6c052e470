"""Contrastive (CLIP-style) warm-up of a VLM's vision tower on image–caption pairs.

A random-init tower sees nothing; real VLMs inherit towers pretrained contrastively on image–text pairs. This
stage gives the tiny models of the embedded world the same start: the VLM's own vision path (tower + projector,
``get_image_features``), mean-pooled over image tokens, is trained against a small throw-away text encoder
(``CLIPTextModel`` over the VLM's tokenizer) with the symmetric InfoNCE loss of CLIP. Only the vision path is kept.
Real checkpoints do not need it: their towers already see.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field

from mmalign.config import TrainConfig, dump_config
from mmalign.data.loaders import load_samples
from mmalign.errors import ModelError
from mmalign.models.families import family_of
from mmalign.models.load import load_model
from mmalign.runtime.batching import batch_indices
from mmalign.runtime.checkpoint import save_model_atomic
from mmalign.runtime.launch import Recipe
from mmalign.runtime.launch import main as launch_main
from mmalign.runtime.locks import lock_run_dir, release_run_dir
from mmalign.runtime.metrics import MetricsLog
from mmalign.runtime.optim import lr_factor, make_optimizer, set_lr
from mmalign.runtime.progress import progress_bar
from mmalign.runtime.step import StepEnd
from mmalign.types import Sample

log = logging.getLogger(__name__)


class ContrastiveConfig(TrainConfig):
    """Vision warm-up: batch size matters (more negatives per step)."""

    resumable: ClassVar[bool] = False

    batch_size: int = Field(64, ge=2)
    lr: float = Field(1e-3, gt=0)
    text_hidden: int = Field(64, ge=8)
    text_layers: int = Field(2, ge=1)
    embed_dim: int = Field(64, ge=8)


def clip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP, Radford et al. 2021, Fig. 3).

    Args:
        image_emb: [B, D] L2-normalised image embeddings.
        text_emb: [B, D] L2-normalised text embeddings; row i describes image i.
        logit_scale: scalar log-temperature (``exp`` is the multiplier of the cosine similarities).

    Returns:
        Scalar mean of the image→text and text→image cross-entropies.
    """
    logits = logit_scale.exp() * image_emb @ text_emb.t()
    target = torch.arange(len(logits), device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


class ContrastiveHeads(torch.nn.Module):
    """Text encoder and projections used only during the warm-up."""

    def __init__(self, vocab_size: int, pad_id: int, eos_id: int, vision_dim: int, cfg: ContrastiveConfig) -> None:
        super().__init__()
        from transformers import CLIPTextConfig, CLIPTextModel

        text_cfg = CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=cfg.text_hidden,
            intermediate_size=cfg.text_hidden * 4,
            num_hidden_layers=cfg.text_layers,
            num_attention_heads=4,
            max_position_embeddings=128,
            pad_token_id=pad_id,
            eos_token_id=eos_id,
            bos_token_id=pad_id,
        )
        self.text = CLIPTextModel(text_cfg)
        self.text_proj = torch.nn.Linear(cfg.text_hidden, cfg.embed_dim, bias=False)
        self.image_proj = torch.nn.Linear(vision_dim, cfg.embed_dim, bias=False)
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.6592))  # log(1/0.07), CLIP's initial temperature


def _image_tokens(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean over image tokens of the VLM's projected image features: [B, D]."""
    kwargs = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    feats = model.get_image_features(**kwargs)
    feats = getattr(feats, "pooler_output", feats)
    if isinstance(feats, (list, tuple)):
        return torch.stack([f.reshape(-1, f.shape[-1]).mean(0) for f in feats])
    if feats.dim() == 3:
        return feats.mean(1)
    # Flat [sum of tokens, D]: split per image as the family says.
    fam = family_of(model.config)
    if fam is None or fam.feature_sizes is None:
        raise ModelError(f"{model.config.model_type}: flat image features and no registered way to split them")
    return torch.stack([chunk.mean(0) for chunk in feats.split(fam.feature_sizes(model, batch))])


def _encode(processor: Any, samples: list[Sample], max_len: int = 96) -> tuple[dict[str, torch.Tensor], dict]:
    tok = processor.tokenizer
    images = [s.load_images()[0] for s in samples]
    vis = processor.image_processor(images=images, return_tensors="pt")
    texts = [s.target + tok.eos_token for s in samples]
    tok.padding_side = "right"
    txt = tok(
        texts,
        return_tensors="pt",
        padding=True,
        truncation=True,
        max_length=max_len,
        add_special_tokens=False,
    )
    return dict(vis), dict(txt)


def train(cfg: ContrastiveConfig) -> Path:
    """Warm up the vision path of ``cfg.model`` on the captions in ``cfg.data``; saves ``<out>/model``."""
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    lock_run_dir(out)  # one run per directory, as the library's recipes
    dump_config(cfg, out / "config.yaml")
    loaded = load_model(cfg.model)
    vlm = loaded.model
    core = vlm.model
    samples = [
        s
        for s in load_samples(cfg.data, on_bad_record=cfg.on_bad_record, limit=cfg.max_samples).samples
        if s.images and s.target
    ]
    tok = loaded.tokenizer
    with torch.no_grad():
        probe = _image_tokens(core, _encode(loaded.processor, samples[:2])[0])
    heads = ContrastiveHeads(len(tok), tok.pad_token_id, tok.eos_token_id, probe.shape[-1], cfg)
    language = _language_prefix(core)
    for name, p in vlm.named_parameters():
        p.requires_grad_(not name.removeprefix("model.").startswith(language))
    vlm.lm_head.requires_grad_(False)
    optimizer = make_optimizer(torch.nn.ModuleList([core, heads]), cfg.lr, cfg.weight_decay)
    metrics = MetricsLog(out / "metrics.jsonl", tensorboard_dir=out / "tb")
    warmup = int(cfg.warmup_ratio * cfg.steps)
    bar = progress_bar(cfg.steps, desc=f"contrastive {out.name}", enabled=cfg.progress)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    end_step = StepEnd(cfg, optimizer, metrics, bar, params=params, show=("loss", "retrieval_acc"))
    for step in range(cfg.steps):
        lr = cfg.lr * lr_factor(step, cfg.steps, warmup, cfg.schedule)
        set_lr(optimizer, lr)
        idx = batch_indices(len(samples), cfg.batch_size, step, cfg.seed)
        vis, txt = _encode(loaded.processor, [samples[i] for i in idx])
        img = F.normalize(heads.image_proj(_image_tokens(core, vis)), dim=-1)
        txt_out = heads.text(**txt).pooler_output
        txt_emb = F.normalize(heads.text_proj(txt_out), dim=-1)
        loss = clip_loss(img, txt_emb, heads.logit_scale.clamp(max=4.6052))
        loss.backward()
        with torch.no_grad():
            acc = (img @ txt_emb.t()).argmax(-1).eq(torch.arange(len(idx))).float().mean().item()
        end_step(step, {"loss": loss.item(), "retrieval_acc": acc}, lr)
    bar.close()
    metrics.close()
    for p in vlm.parameters():
        p.requires_grad_(True)
    final = save_model_atomic(vlm, loaded.processor, out / "model")
    release_run_dir(out)
    return final


def _language_prefix(core: torch.nn.Module) -> str:
    for name in ("language_model", "text_model"):
        if hasattr(core, name):
            return name
    raise ValueError("cannot find the language model inside the VLM")


RECIPE = Recipe(
    "contrastive",
    ContrastiveConfig,
    train,
    "CLIP-style warm-up of a random-init vision path on image-caption pairs",
    distributed=False,
)

if __name__ == "__main__":
    sys.exit(launch_main(RECIPE, sys.argv[1:]))
