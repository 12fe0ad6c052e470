"""Bradley–Terry reward model of a VLM: a scalar head on the last reply token, trained on preference pairs.

One linear recipe: pairs (any format ``load_pairs`` reads) → the VLM with a ``reward_head`` (``mmalign.reward``),
frozen or LoRA-adapted like every recipe → per step: each prompt and its images encoded once, both replies scored
from its cache → ``bradley_terry`` (plain, with the data's margins, with centring) → the shared step end → the
model saved with its head and ``reward.json``. Metrics under TRL's reward-trainer names (``accuracy``, ``margin``,
``rewards/chosen``, ``rewards/rejected``).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch
from pydantic import Field

from mmalign.config import FreezeConfig, TrainConfig
from mmalign.data.lengths import fit_lengths
from mmalign.data.pair_inputs import encode_pairs
from mmalign.data.preference import load_pairs
from mmalign.errors import ConfigError
from mmalign.forward import inner_model
from mmalign.models.load import count_parameters, load_model
from mmalign.reward import (
    CRITIQUE_REQUEST,
    RewardScorer,
    attach_head,
    critiques_missing,
    encode_pair_critiques,
    facts_missing,
    with_facts,
    write_marker,
)
from mmalign.reward_losses import RewardLossConfig, bradley_terry, reward_metrics
from mmalign.runtime.batching import Batches
from mmalign.runtime.launch import Recipe
from mmalign.runtime.launch import main as launch_main
from mmalign.runtime.optim import lr_factor, make_optimizer, set_lr
from mmalign.runtime.progress import progress_bar
from mmalign.runtime.run import finish_run, resume_and_log, start_run, trainable_model
from mmalign.runtime.step import StepEnd

log = logging.getLogger(__name__)


class RewardConfig(TrainConfig):
    """Reward-model training: the head, the projector and the language model train (or LoRA with ``lora.*``)."""

    lr: float = Field(1e-4, gt=0)
    batch_size: int = Field(8, ge=1)
    use_margin: bool = Field(RewardLossConfig.use_margin, description="subtract each pair's data margin")
    center_coef: float = Field(RewardLossConfig.center_coef, ge=0, description="weight of (r_c + r_r)^2")
    facts: bool = Field(False, description="fact-augmented: read each pair's facts after the question (Fact-RLHF)")
    critique: bool = Field(False, description="write each reply's critique, then score (MM-RLHF; needs critiques)")
    critique_weight: float = Field(1.0, ge=0, description="weight of the critiques' language-model loss")
    # Encode each prompt once and continue both replies from its cache (off: full sequences, to compare).
    share_prompt: bool = True
    freeze: FreezeConfig = Field(default_factory=lambda: FreezeConfig(vision=True, projector=False, llm=False))

    def loss_config(self) -> RewardLossConfig:
        return RewardLossConfig(use_margin=self.use_margin, center_coef=self.center_coef)


def train(cfg: RewardConfig) -> Path:
    """Train a reward model; returns the final model directory (``<out>/model``, with ``reward.json``)."""
    accelerator, out = start_run(cfg)
    data = load_pairs(cfg.data, on_bad_record=cfg.on_bad_record, limit=cfg.max_samples)
    if cfg.facts:
        facts_missing(data.pairs, cfg.data)
    if cfg.critique:
        critiques_missing(data.pairs, cfg.data)
    pairs = [with_facts(p) for p in data.pairs] if cfg.facts else data.pairs
    if cfg.use_margin and any(p.margin is None for p in pairs):
        missing = next(p.id for p in pairs if p.margin is None)
        raise ConfigError(f"use_margin=true but pair {missing!r} of {cfg.data} has no margin")
    loaded = load_model(cfg.model)
    request = CRITIQUE_REQUEST if cfg.critique else None
    fitted = fit_lengths(
        loaded.processor, pairs, data.rows, data.path, cfg.max_length, cfg.truncation, critique_request=request
    )
    pairs = fitted.items
    attach_head(loaded.model, cfg.seed)
    model = trainable_model(loaded, cfg)
    lm_head = inner_model(model).get_output_embeddings()
    if not cfg.critique and lm_head.weight is not inner_model(model).get_input_embeddings().weight:
        lm_head.requires_grad_(False)  # an untied LM head takes no part in the reward (and DDP wants no idle weight)
    scorer = RewardScorer(model)
    share = cfg.share_prompt and scorer.share_prompt
    if accelerator.is_main_process:
        log.info("%s", data.summary())
        log.info("trainable parameters: %d / %d", *count_parameters(scorer))
    optimizer = make_optimizer(scorer, cfg.lr, cfg.weight_decay)
    scorer, optimizer = accelerator.prepare(scorer, optimizer)
    start, metrics = resume_and_log(accelerator, scorer, optimizer, cfg)
    batches = Batches.for_run(pairs, cfg, accelerator.process_index, accelerator.num_processes)
    loss_cfg = cfg.loss_config()
    warmup = int(cfg.warmup_ratio * cfg.steps)
    scorer.train()
    bar = progress_bar(
        cfg.steps, desc=f"rm {out.name}", initial=start, enabled=cfg.progress and accelerator.is_main_process
    )
    end_step = StepEnd(cfg, optimizer, metrics, bar, model=scorer, accelerator=accelerator, show=("loss", "accuracy"))
    for step in range(start, cfg.steps):
        lr = cfg.lr * lr_factor(step, cfg.steps, warmup, cfg.schedule)
        set_lr(optimizer, lr)
        logged: dict[str, float] = {}
        for micro in range(cfg.grad_accum):
            batch = [pairs[i] for i in batches(step * cfg.grad_accum + micro)]
            extra: dict[str, float] = {}
            if cfg.critique:
                rewards, nll = scorer(
                    encode_pair_critiques(loaded.processor, batch, cfg.max_length).to(accelerator.device)
                )
                chosen, rejected = rewards[0::2], rewards[1::2]
                critique_loss = nll.view(-1, 2).sum(-1)
                extra["critique_nll"] = nll.mean().item()
            else:
                enc = encode_pairs(loaded.processor, batch, share_prompt=share, max_length=cfg.max_length)
                chosen, rejected = scorer(enc.to(accelerator.device))
                critique_loss = torch.zeros_like(chosen)
            margin = torch.tensor([p.margin or 0.0 for p in batch], device=chosen.device) if cfg.use_margin else None
            loss = bradley_terry(chosen, rejected, loss_cfg, margin)
            accelerator.backward((loss + cfg.critique_weight * critique_loss).mean() / cfg.grad_accum)
            for key, value in {**reward_metrics(loss, chosen, rejected), **extra}.items():
                logged[key] = logged.get(key, 0.0) + value / cfg.grad_accum
        end_step(step, logged, lr)
    bar.close()
    final = finish_run(accelerator, scorer, optimizer, loaded.processor, cfg, metrics)
    if accelerator.is_main_process:
        write_marker(final, facts=cfg.facts, critique=cfg.critique)
    return final


RECIPE = Recipe("rm", RewardConfig, train, "Bradley–Terry reward model (scalar head on the last reply token)")

if __name__ == "__main__":
    sys.exit(launch_main(RECIPE, sys.argv[1:]))
