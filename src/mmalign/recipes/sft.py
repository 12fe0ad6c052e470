"""Supervised next-token training of a VLM: instruction tuning, and (with other defaults) projector pretraining.

Reads top to bottom: accelerator → model (freeze / LoRA) → data → an explicit loop (accumulation, clipping,
logging, atomic checkpoints, exact resume) → final ``save_pretrained``. The loss is the token-mean cross-entropy
over assistant tokens only. The same file runs on one CPU and on N GPUs under ``accelerate launch``.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path

import torch
from pydantic import Field

from mmalign.config import FreezeConfig, TrainConfig
from mmalign.data.collate import IGNORE_INDEX, encode_sft
from mmalign.data.lengths import fit_lengths
from mmalign.data.loaders import load_samples
from mmalign.data.packing import pack_batch, per_sample_sums
from mmalign.data.pixel_cache import with_pixel_cache
from mmalign.errors import ConfigError
from mmalign.logprobs import sequence_logps, token_logps
from mmalign.models.load import count_parameters, load_model
from mmalign.runtime.batching import Batches
from mmalign.runtime.launch import Recipe
from mmalign.runtime.launch import main as launch_main
from mmalign.runtime.optim import lr_factor, make_optimizer, set_lr
from mmalign.runtime.progress import progress_bar
from mmalign.runtime.run import finish_run, resume_and_log, start_run, trainable_model
from mmalign.runtime.step import StepEnd

log = logging.getLogger(__name__)


class SftConfig(TrainConfig):
    """Instruction tuning: projector + language model trained, vision tower frozen (the usual second stage)."""

    lr: float = Field(2e-5, gt=0)
    freeze: FreezeConfig = Field(default_factory=lambda: FreezeConfig(vision=True, projector=False, llm=False))


def sequence_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence summed next-token cross-entropy [B] and labelled-token counts [B]."""
    logps, n = sequence_logps(logits, labels)
    return -logps, n


def _loss_terms(model: torch.nn.Module, batch: dict[str, torch.Tensor], per: str) -> tuple[torch.Tensor, float]:
    """The batch's loss numerator and its token-weighted NLL sum (for logging)."""
    labels = batch.pop("labels")
    owner = batch.pop("sample_index", None)
    logits = model(**batch, use_cache=False).logits
    if owner is None:
        nll, n = sequence_nll(logits, labels)
    else:  # packed rows: sum each sample's tokens wherever they sit
        logps, mask = token_logps(logits, labels)
        summed, n = per_sample_sums(logps, mask, owner, int(owner.max()) + 1)
        nll = -summed
    if per == "sample":
        return (nll / n.clamp_min(1)).sum(), nll.sum().item()
    return nll.sum(), nll.sum().item()


def _n_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Real (not padding) tokens of a batch, packed or not."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int((batch["sample_index"] >= 0).sum())


def _targets_per_sample(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Labelled tokens of each sample of a batch (packed or not)."""
    mask = batch["labels"][:, 1:] != IGNORE_INDEX
    if "sample_index" not in batch:
        return mask.sum(-1)
    owner = batch["sample_index"]
    return torch.bincount(owner[:, 1:][mask], minlength=int(owner.max()) + 1)


def _normaliser(micro_batches: list[dict[str, torch.Tensor]], per: str) -> int:
    """Tokens (``per="token"``) or samples (``per="sample"``) with a target in the accumulated batch."""
    counts = [_targets_per_sample(b) for b in micro_batches]
    if per == "sample":
        return sum(int((c > 0).sum()) for c in counts)
    return sum(int(c.sum()) for c in counts)


def train(cfg: TrainConfig) -> Path:
    """Run supervised training; returns the directory of the final model (``<out>/model``)."""
    accelerator, out = start_run(cfg)
    torch.use_deterministic_algorithms(True, warn_only=True)

    # Data first: a bad file fails in a second, before any model is loaded.
    data = load_samples(cfg.data, on_bad_record=cfg.on_bad_record, limit=cfg.max_samples, needs_reply=True)
    loaded = load_model(cfg.model)
    if cfg.pack and (loaded.family is None or not loaded.family.packable):
        name = loaded.family.name if loaded.family else loaded.model.config.model_type
        raise ConfigError(
            f"pack=true needs a family whose rows can be packed (1-D positions, one pixel row per image); {name} "
            "cannot be packed (pack=false)"
        )
    samples = fit_lengths(loaded.processor, data.samples, data.rows, data.path, cfg.max_length, cfg.truncation).items
    model = trainable_model(loaded, cfg)
    trainable, total = count_parameters(model)
    if accelerator.is_main_process:
        log.info("%s", data.summary())
        log.info("trainable parameters: %d / %d", trainable, total)
    batches = Batches.for_run(samples, cfg, accelerator.process_index, accelerator.num_processes)

    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    start, metrics = resume_and_log(accelerator, model, optimizer, cfg)

    warmup = int(cfg.warmup_ratio * cfg.steps)
    model.train()
    bar = progress_bar(
        total=cfg.steps,
        initial=start,
        desc=f"train {out.name}",
        enabled=cfg.progress and accelerator.is_main_process,
    )

    pad_id = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    encoder = with_pixel_cache(loaded.processor, cfg.pixel_cache_mb << 20)

    def encode_micro(m: int) -> dict[str, torch.Tensor]:
        chunk = [samples[i] for i in batches(m)]
        enc = encode_sft(encoder, chunk, cfg.max_length)
        if cfg.pack:
            enc = pack_batch(enc, [len(s.images) for s in chunk], pad_id, cfg.pack_length)
        return enc

    def encode_step(step: int) -> list[dict[str, torch.Tensor]]:
        return [encode_micro(m) for m in range(step * cfg.grad_accum, (step + 1) * cfg.grad_accum)]

    tokens_seen = 0
    end_step = StepEnd(
        cfg, optimizer, metrics, bar, model=model, accelerator=accelerator, show=("loss", "tokens_per_s")
    )
    for step in range(start, cfg.steps):
        micro_batches = encode_step(step)
        lr = cfg.lr * lr_factor(step, cfg.steps, warmup, cfg.schedule)
        set_lr(optimizer, lr)
        # Normalise by the labelled tokens of the whole (accumulated, all-process) batch, so that gradient
        # accumulation 4x1 equals 1x4 exactly.
        n_local = _normaliser(micro_batches, cfg.loss_per)
        n_tokens = _normaliser(micro_batches, "token")
        n_total = int(accelerator.reduce(torch.tensor(n_local, device=accelerator.device), "sum").item())
        step_loss = 0.0
        for micro, batch in enumerate(micro_batches):
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            tokens_seen += _n_tokens(batch)
            sync = micro == len(micro_batches) - 1
            ctx = accelerator.no_sync(model) if not sync else contextlib.nullcontext()
            with ctx:
                numerator, nll_sum = _loss_terms(model, batch, cfg.loss_per)
                # DDP averages gradients over processes; scale so the result is the global mean.
                accelerator.backward(numerator * accelerator.num_processes / max(1, n_total))
            step_loss += nll_sum
        loss_value = step_loss / max(1, n_tokens)
        tokens_per_s = tokens_seen / max(end_step.elapsed(), 1e-9)
        end_step(step, {"loss": loss_value, "tokens_per_s": tokens_per_s}, lr)
    bar.close()
    return finish_run(accelerator, model, optimizer, loaded.processor, cfg, metrics)


RECIPE = Recipe("sft", SftConfig, train, "instruction tuning")

if __name__ == "__main__":
    sys.exit(launch_main(RECIPE, sys.argv[1:]))
