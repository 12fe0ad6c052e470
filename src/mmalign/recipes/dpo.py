"""Offline preference optimisation of a VLM: one linear recipe for every loss in ``mmalign.losses.LOSSES``.

accelerator → policy and frozen reference → pairs → an explicit loop: per step, the chosen and rejected replies of
each pair are scored by the policy (with gradients) and the reference (without), on the same images; mDPO adds the
chosen reply under a corrupted image, sampled once per pair per step and shared by policy and reference. The loss
comes from the registry by name; metrics use TRL's names. Checkpoints and ``--resume`` work as in SFT.

This version scores pairs the straightforward way (chosen and rejected as two full sequences, as TRL does).
"""

from __future__ import annotations

import copy
import logging
import random
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from mmalign.config import FreezeConfig, TrainConfig, dump_config
from mmalign.data.collate import encode_sft
from mmalign.data.corruption import random_crop
from mmalign.data.preference import load_pairs
from mmalign.logprobs import sequence_logps
from mmalign.losses import LOSSES, LossConfig, PairLogps, compute_loss, dpo_metrics
from mmalign.models.load import count_parameters, load_model
from mmalign.runtime.batching import batch_indices
from mmalign.runtime.optim import lr_factor, make_optimizer, set_lr
from mmalign.runtime.progress import progress_bar
from mmalign.runtime.run import finish_run, maybe_checkpoint, resume_and_log, trainable_model
from mmalign.types import ImageRef, PreferencePair, Sample

log = logging.getLogger(__name__)


class DpoConfig(TrainConfig):
    """Preference optimisation; loss hyper-parameters as in ``mmalign.losses.LossConfig``."""

    loss: str = "dpo"
    beta: float = Field(0.1, gt=0)
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    ipo_tau: float | None = None
    simpo_gamma: float = 0.5
    rpo_alpha: float = Field(0.0, ge=0)
    mdpo_anchor: float = 0.0
    mm_w: float = Field(1.0, ge=0)
    mm_k: float = Field(1.0, gt=0)
    lr: float = Field(1e-6, gt=0)
    batch_size: int = Field(8, ge=1)
    # Remove every image from the pairs (the mDPO paper's "unconditional preference" diagnostic).
    drop_images: bool = False
    freeze: FreezeConfig = Field(default_factory=lambda: FreezeConfig(vision=True, projector=False, llm=False))

    def loss_config(self) -> LossConfig:
        return LossConfig(
            beta=self.beta,
            label_smoothing=self.label_smoothing,
            ipo_tau=self.ipo_tau,
            simpo_gamma=self.simpo_gamma,
            rpo_alpha=self.rpo_alpha,
            mdpo_anchor=self.mdpo_anchor,
            mm_w=self.mm_w,
            mm_k=self.mm_k,
        )


def _corrupted(pair: PreferencePair, rng: random.Random) -> Sample:
    """The chosen conversation with every image replaced by its crop (or the pair's own corrupted image)."""
    chosen, _ = pair.as_samples()
    if pair.corrupted_image is not None:
        return replace(chosen, images=(pair.corrupted_image,))
    import io

    refs = []
    for img in chosen.load_images():
        buf = io.BytesIO()
        random_crop(img, rng).save(buf, format="PNG")
        refs.append(ImageRef(data=buf.getvalue()))
    return replace(chosen, images=tuple(refs))


def _without_images(pair: PreferencePair) -> PreferencePair:
    prompt = tuple(replace(m, content=tuple(p for p in m.content if p.type != "image")) for m in pair.prompt)
    return replace(pair, prompt=prompt, images=())


def _score(model: Any, processor: Any, samples: list[Sample], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed reply log-probs [N] and reply lengths [N] of ``samples`` in one forward pass."""
    device = next(model.parameters()).device
    enc = {k: v.to(device) for k, v in encode_sft(processor, samples, max_length).items()}
    labels = enc.pop("labels")
    logits = model(**enc, use_cache=False).logits
    return sequence_logps(logits, labels)


def pair_logps(
    policy: Any,
    reference: Any,
    processor: Any,
    pairs: list[PreferencePair],
    *,
    loss: str,
    rng: random.Random,
    max_length: int,
) -> PairLogps:
    """Policy (with grad) and reference (without) log-probs of a batch of pairs."""
    chosen = [p.as_samples()[0] for p in pairs]
    rejected = [p.as_samples()[1] for p in pairs]
    n = len(pairs)
    pol, lengths = _score(policy, processor, chosen + rejected, max_length)
    with torch.no_grad():
        ref, _ = _score(reference, processor, chosen + rejected, max_length)
    fields: dict[str, Any] = {}
    if loss == "mdpo":
        corrupt = [_corrupted(p, rng) for p in pairs]
        fields["policy_chosen_corrupt"], _ = _score(policy, processor, corrupt, max_length)
        with torch.no_grad():
            fields["ref_chosen_corrupt"], _ = _score(reference, processor, corrupt, max_length)
    if any(p.margin is not None for p in pairs):
        fields["margin"] = torch.tensor([p.margin or 0.0 for p in pairs], device=pol.device)
    return PairLogps(
        policy_chosen=pol[:n],
        policy_rejected=pol[n:],
        ref_chosen=ref[:n],
        ref_rejected=ref[n:],
        chosen_tokens=lengths[:n].float(),
        rejected_tokens=lengths[n:].float(),
        policy_chosen_nll=-pol[:n] / lengths[:n].clamp_min(1),
        **fields,
    )


def train(cfg: DpoConfig) -> Path:
    """Run preference optimisation; returns the final model directory (``<out>/model``)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    if cfg.loss not in LOSSES:
        raise ValueError(f"unknown loss {cfg.loss!r}; choose one of {sorted(LOSSES)}")
    out = Path(cfg.out)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision)
    set_seed(cfg.seed)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, out / "config.yaml")

    data = load_pairs(cfg.data, on_bad_record=cfg.on_bad_record, limit=cfg.max_samples)
    pairs = [_without_images(p) for p in data.pairs] if cfg.drop_images else data.pairs
    loaded = load_model(cfg.model)
    reference = copy.deepcopy(loaded.model).eval().requires_grad_(False)
    model = trainable_model(loaded, cfg)
    if accelerator.is_main_process:
        log.info("%s", data.summary())
        log.info("trainable parameters: %d / %d", *count_parameters(model))
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    reference.to(accelerator.device)
    start, metrics = resume_and_log(accelerator, model, optimizer, cfg)
    loss_cfg = cfg.loss_config()
    warmup = int(cfg.warmup_ratio * cfg.steps)
    model.train()
    bar = progress_bar(
        cfg.steps, desc=f"{cfg.loss} {out.name}", initial=start, enabled=cfg.progress and accelerator.is_main_process
    )
    t0 = time.perf_counter()
    for step in range(start, cfg.steps):
        lr = cfg.lr * lr_factor(step, cfg.steps, warmup, cfg.schedule)
        set_lr(optimizer, lr)
        logged: dict[str, float] = {}
        for micro in range(cfg.grad_accum):
            m = step * cfg.grad_accum + micro
            idx = batch_indices(
                len(pairs), cfg.batch_size, m, cfg.seed, accelerator.process_index, accelerator.num_processes
            )
            # One generator per (seed, micro-step): corrupted images are reproducible and resume exactly.
            rng = random.Random(cfg.seed * 1_000_003 + m)
            logps = pair_logps(
                model,
                reference,
                loaded.processor,
                [pairs[i] for i in idx],
                loss=cfg.loss,
                rng=rng,
                max_length=cfg.max_length,
            )
            result = compute_loss(cfg.loss, logps, loss_cfg)
            accelerator.backward(result.loss.mean() / cfg.grad_accum)
            for key, value in dpo_metrics(result, logps).items():
                logged[key] = logged.get(key, 0.0) + value / cfg.grad_accum
        if cfg.max_grad_norm:
            logged["grad_norm"] = float(accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        bar.update(1)
        bar.set_postfix(loss=f"{logged['loss']:.3f}", acc=f"{logged['rewards/accuracies']:.2f}")
        done = step + 1
        if metrics is not None and (done % cfg.log_every == 0 or done == cfg.steps):
            metrics.write(done, {**logged, "lr": lr, "elapsed_s": time.perf_counter() - t0})
        maybe_checkpoint(accelerator, model, optimizer, cfg, done)
    bar.close()
    return finish_run(accelerator, model, optimizer, loaded.processor, cfg, metrics)
