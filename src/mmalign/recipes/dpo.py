"""Offline preference optimisation of a VLM: one linear recipe for every loss in ``mmalign.losses.LOSSES``.

accelerator → pairs → reference log-probs (scored once by the model as loaded, cached on disk) → policy → an explicit
loop: per step, the chosen and rejected replies of each pair are scored by the policy in one shared-prompt forward
(``mmalign.forward``: images and prompt encoded once, LM head only on reply tokens); mDPO adds the chosen reply under
a corrupted image, sampled once per pair per step and scored by the policy and a live reference alike. The loss comes
from the registry by name; metrics use TRL's names. Checkpoints and ``--resume`` work as in SFT.
"""

from __future__ import annotations

import copy
import io
import logging
import random
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from mmalign.config import FreezeConfig, PreferenceConfig
from mmalign.data.corruption import random_crop
from mmalign.data.lengths import fit_lengths
from mmalign.data.pair_inputs import EncodedPairs, encode_pairs
from mmalign.data.preference import load_pairs
from mmalign.errors import ConfigError
from mmalign.forward import ForwardOptions, PairScorer, pair_logps
from mmalign.losses import LOSSES, PairLogps, compute_loss, dpo_metrics
from mmalign.models.load import count_parameters, load_model
from mmalign.runtime.batching import Batches
from mmalign.runtime.launch import Recipe
from mmalign.runtime.launch import main as launch_main
from mmalign.runtime.optim import lr_factor, make_optimizer, set_lr
from mmalign.runtime.progress import progress_bar
from mmalign.runtime.refcache import cache_key, cached_reference_logps, default_cache_dir
from mmalign.runtime.run import finish_run, make_accelerator, resume_and_log, start_run, trainable_model
from mmalign.runtime.step import StepEnd
from mmalign.types import ImageRef, PreferencePair

log = logging.getLogger(__name__)


class DpoConfig(PreferenceConfig):
    """Offline preference optimisation; the loss and its hyper-parameters as in ``mmalign.config.PreferenceConfig``."""

    lr: float = Field(1e-6, gt=0)
    batch_size: int = Field(8, ge=1)
    # Remove every image from the pairs (the mDPO paper's "unconditional preference" diagnostic).
    drop_images: bool = False
    reward_model: str | None = Field(
        None, description="score each pair's margin with this reward model (mmalign train rm) for loss=mm_dpo"
    )
    # The efficient pair forward (``mmalign.forward``); switch parts off to compare or to debug.
    share_prompt: bool = True
    response_logits_only: bool = True
    # Reference log-probs scored once and cached on disk (``mmalign.runtime.refcache``); the directory defaults to
    # ``$MMALIGN_CACHE_DIR/reference_logps`` or ``~/.cache/mmalign/reference_logps``.
    ref_cache: bool = True
    ref_cache_dir: str | None = None
    freeze: FreezeConfig = Field(default_factory=lambda: FreezeConfig(vision=True, projector=False, llm=False))


def _corrupt_images(pair: PreferencePair, rng: random.Random) -> list[ImageRef]:
    """mDPO's rejected images: the pair's own corrupted image, else a random crop of each image (PNG bytes)."""
    if pair.corrupted_image is not None:
        return [pair.corrupted_image]
    chosen, _ = pair.as_samples()
    refs = []
    for img in chosen.load_images():
        buf = io.BytesIO()
        random_crop(img, rng).save(buf, format="PNG")
        refs.append(ImageRef(data=buf.getvalue()))
    return refs


def _with_reward_margins(pairs: list[PreferencePair], cfg: DpoConfig) -> list[PreferencePair]:
    """The pairs with ``margin`` = r(chosen) − r(rejected) under ``cfg.reward_model`` (MM-DPO's δ), scored once
    before training (with the pairs' facts when the reward model reads facts)."""
    from mmalign.eval.reward import pair_margins

    if cfg.loss != "mm_dpo":
        raise ConfigError(f"reward_model gives MM-DPO its margins; loss={cfg.loss} does not read them")
    margins = pair_margins(cfg.reward_model, pairs, cfg.data, batch_size=cfg.batch_size, progress=cfg.progress)
    log.info("reward margins from %s: mean %.3f, %.0f%% positive", cfg.reward_model,
             sum(margins) / len(margins), 100 * sum(m > 0 for m in margins) / len(margins))  # fmt: skip
    return [replace(p, margin=m) for p, m in zip(pairs, margins)]


def _without_images(pair: PreferencePair) -> PreferencePair:
    prompt = tuple(replace(m, content=tuple(p for p in m.content if p.type != "image")) for m in pair.prompt)
    return replace(pair, prompt=prompt, images=())


def _visited(batches: Batches, cfg: DpoConfig) -> list[int]:
    """Every pair index the run will draw (batches are a pure function of the step), over all processes."""
    seen: set[int] = set()
    for m in range(cfg.steps * cfg.grad_accum):
        for rank in range(batches.world):
            seen.update(batches(m, rank))
    return sorted(seen)


def _reference_cache(
    accelerator: Any,
    cfg: DpoConfig,
    pairs: list[PreferencePair],
    batches: Batches,
    loaded: Any,
    options: ForwardOptions,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference log-probs of the pairs the run visits, from the on-disk cache (the main process fills it).

    Scored with the model as loaded, before any update: at that point the policy *is* the reference.
    """
    scorer = PairScorer(loaded.model, options).to(accelerator.device).eval()
    settings = {
        "max_length": cfg.max_length,
        "drop_images": cfg.drop_images,
        "mixed_precision": cfg.mixed_precision,
    }
    directory = Path(cfg.ref_cache_dir) if cfg.ref_cache_dir else default_cache_dir()
    path = directory / f"{cache_key(cfg.model, pairs, settings)}.safetensors"

    def score(batch: list[PreferencePair]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = encode_pairs(loaded.processor, batch, share_prompt=scorer.options.share_prompt, max_length=cfg.max_length)
        with torch.no_grad(), accelerator.autocast():
            scores = scorer(enc.to(accelerator.device))
        return scores.chosen, scores.rejected

    needed = _visited(batches, cfg)
    if accelerator.is_main_process:
        cached_reference_logps(path, pairs, needed, score, batch_size=cfg.batch_size, progress=cfg.progress)
    accelerator.wait_for_everyone()
    return cached_reference_logps(path, pairs, needed, score, batch_size=cfg.batch_size, progress=False)


def _pair_logps(
    policy: Any,
    reference: Any | None,
    ref_cached: tuple[torch.Tensor, torch.Tensor] | None,
    enc: EncodedPairs,
    idx: list[int],
    batch: list[PreferencePair],
) -> PairLogps:
    """Policy (with grad) and reference (cached, or without grad) log-probs of one micro-batch."""
    scores = policy(enc)
    device = scores.chosen.device
    ref_corrupt = None
    if ref_cached is not None:
        ref_c, ref_r = (t[idx].to(device) for t in ref_cached)
    if reference is not None:
        with torch.no_grad():
            ref = reference(enc if ref_cached is None else enc.only_corrupt())
        if ref_cached is None:
            ref_c, ref_r = ref.chosen, ref.rejected
        ref_corrupt = ref.chosen_corrupt
    margin = None
    if any(p.margin is not None for p in batch):
        margin = torch.tensor([p.margin or 0.0 for p in batch], device=device)
    return pair_logps(scores, ref_c, ref_r, ref_chosen_corrupt=ref_corrupt, margin=margin)


def _prepare(cfg: DpoConfig, accelerator: Any) -> tuple[Any, list[PreferencePair], ForwardOptions, Any, Batches]:
    """The run's data (as loaded, and the pairs it trains on), forward options, model and batch order."""
    data = load_pairs(cfg.data, on_bad_record=cfg.on_bad_record, limit=cfg.max_samples)
    pairs = _with_reward_margins(data.pairs, cfg) if cfg.reward_model else data.pairs
    if cfg.loss == "mm_dpo" and any(p.margin is None for p in pairs):
        missing = next(p.id for p in pairs if p.margin is None)
        raise ConfigError(f"loss=mm_dpo needs margins: pair {missing!r} of {cfg.data} has none (or set reward_model)")
    pairs = [_without_images(p) for p in pairs] if cfg.drop_images else pairs
    loaded = load_model(cfg.model)
    # The sequences as they will be encoded (without their images under drop_images), against max_length.
    pairs = fit_lengths(
        loaded.processor, pairs, data.rows, data.path, cfg.max_length, cfg.truncation, field="chosen"
    ).items
    options = ForwardOptions(share_prompt=cfg.share_prompt, response_logits_only=cfg.response_logits_only)
    batches = Batches.for_run(pairs, cfg, accelerator.process_index, accelerator.num_processes)
    return data, pairs, options, loaded, batches


def fill_reference_cache(cfg: DpoConfig) -> None:
    """Score, without training, the reference log-probs a run with ``cfg`` will read from the on-disk cache.

    Runs that share the reference model, the pairs, the batches and the scoring settings (DPO and mDPO on the same
    data) share one cache entry; filling it first spares each of them the scoring. The values are the ones the run
    would score itself (same batches, same order).
    """
    from accelerate.utils import set_seed

    accelerator = make_accelerator(cfg)
    set_seed(cfg.seed)
    _, pairs, options, loaded, batches = _prepare(cfg, accelerator)
    _reference_cache(accelerator, cfg, pairs, batches, loaded, options)


def train(cfg: DpoConfig) -> Path:
    """Run preference optimisation; returns the final model directory (``<out>/model``)."""
    accelerator, out = start_run(cfg)

    data, pairs, options, loaded, batches = _prepare(cfg, accelerator)
    ref_cached = _reference_cache(accelerator, cfg, pairs, batches, loaded, options) if cfg.ref_cache else None
    # Only mDPO's corrupted-image term (its crop changes every step) still needs a live reference beside the cache.
    reference = None
    if not cfg.ref_cache or cfg.loss == "mdpo":
        frozen = copy.deepcopy(loaded.model).eval().requires_grad_(False)
        reference = PairScorer(frozen, options).to(accelerator.device)
    policy = PairScorer(trainable_model(loaded, cfg), options)
    if accelerator.is_main_process:
        log.info("%s", data.summary())
        log.info("trainable parameters: %d / %d", *count_parameters(policy))
    optimizer = make_optimizer(policy, cfg.lr, cfg.weight_decay)
    policy, optimizer = accelerator.prepare(policy, optimizer)
    start, metrics = resume_and_log(accelerator, policy, optimizer, cfg)
    loss_cfg = cfg.loss_config()
    warmup = int(cfg.warmup_ratio * cfg.steps)
    share = accelerator.unwrap_model(policy).options.share_prompt
    policy.train()
    bar = progress_bar(
        cfg.steps, desc=f"{cfg.loss} {out.name}", initial=start, enabled=cfg.progress and accelerator.is_main_process
    )
    end_step = StepEnd(
        cfg, optimizer, metrics, bar, model=policy, accelerator=accelerator, show=("loss", "rewards/accuracies")
    )
    for step in range(start, cfg.steps):
        lr = cfg.lr * lr_factor(step, cfg.steps, warmup, cfg.schedule)
        set_lr(optimizer, lr)
        logged: dict[str, float] = {}
        for micro in range(cfg.grad_accum):
            m = step * cfg.grad_accum + micro
            idx = batches(m)
            batch = [pairs[i] for i in idx]
            # One generator per (seed, micro-step, pair): crops are reproducible, resume exactly, do not depend on
            # how the batch is split over processes, and the policy and the reference score the same crop.
            corrupt = None
            if cfg.loss == "mdpo":
                corrupt = [_corrupt_images(pairs[i], random.Random(f"{cfg.seed}:{m}:{i}")) for i in idx]
            enc = encode_pairs(
                loaded.processor, batch, share_prompt=share, max_length=cfg.max_length, corrupt_images=corrupt
            ).to(accelerator.device)
            logps = _pair_logps(policy, reference, ref_cached, enc, idx, batch)
            result = compute_loss(cfg.loss, logps, loss_cfg)
            accelerator.backward(result.loss.mean() / cfg.grad_accum)
            for key, value in dpo_metrics(result, logps).items():
                logged[key] = logged.get(key, 0.0) + value / cfg.grad_accum
        end_step(step, logged, lr)
    bar.close()
    return finish_run(accelerator, policy, optimizer, loaded.processor, cfg, metrics)


RECIPE = Recipe(
    "dpo",
    DpoConfig,
    train,
    f"offline preference optimisation (--loss {'|'.join(sorted(LOSSES))})",
)

if __name__ == "__main__":
    sys.exit(launch_main(RECIPE, sys.argv[1:]))
