"""On-policy RL for VLMs: GRPO and RLOO with a reward model, a judge and Fact-RLHF's symbolic rewards.

One linear recipe. Per step: ``batch_size`` prompts → ``samples_per_prompt`` replies each from the batched KV-cache
sampler (the current policy) → rewards: ``judge_weight`` · the judge (``rm:DIR`` a reward model that sees the image,
``world`` the world's ground truth, or a Python function) + the symbolic terms (yes/no correctness against
``meta.label``, a length term, a missing-end-of-sequence penalty) → the KL to the frozen reference in the reward
(``kl_coef``, k1 summed over the reply) → group advantages (``grpo``: centred and scaled per prompt; ``rloo``:
leave-one-out) → the on-policy policy gradient (``mmalign.rl_losses``), each prompt and its images encoded once for
all its replies → the shared step end. Metric names as TRL's GRPO trainer (``reward``, ``reward_std``, ``kl``,
``completions/mean_length``, ``completions/clipped_ratio``). Sampling is seeded by (seed, step), so a resumed run
samples what the uninterrupted one did.
"""

from __future__ import annotations

import copy
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from mmalign.config import FreezeConfig, TrainConfig
from mmalign.data.loaders import load_samples
from mmalign.data.pair_inputs import encode_reply_ids
from mmalign.forward import ReplyScorer
from mmalign.generation.hf import HFGenerator
from mmalign.generation.sampling import SamplingParams
from mmalign.judges import Judge, load_judge
from mmalign.models.load import count_parameters, load_model
from mmalign.rl_losses import group_advantages, kl_shaped, policy_gradient_loss, symbolic_reward
from mmalign.runtime.batching import batch_indices
from mmalign.runtime.launch import Recipe
from mmalign.runtime.launch import main as launch_main
from mmalign.runtime.optim import lr_factor, make_optimizer, set_lr
from mmalign.runtime.progress import progress_bar
from mmalign.runtime.run import finish_run, resume_and_log, start_run, trainable_model, unwrapped
from mmalign.runtime.step import StepEnd
from mmalign.types import Rollout, Sample

log = logging.getLogger(__name__)


class RlConfig(TrainConfig):
    """GRPO / RLOO settings; defaults from TRL's GRPO trainer and Fact-RLHF where they exist."""

    algo: Literal["grpo", "rloo"] = Field("grpo", description="advantage estimator")
    lr: float = Field(1e-6, gt=0)
    batch_size: int = Field(4, ge=1, description="prompts per step (per process when launched with torchrun)")
    samples_per_prompt: int = Field(4, ge=2, description="replies sampled per prompt (the group)")
    temperature: float = Field(1.0, gt=0)
    top_k: int = Field(0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(64, ge=1)
    judge: str | None = Field(None, description="rm:DIR, world, or module:function; None: symbolic rewards only")
    judge_weight: float = Field(1.0, description="weight of the judge's score in the reward")
    world: str | None = Field(None, description="the world directory of judge=world (default: the data's)")
    correct_bonus: float = Field(2.0, description="Fact-RLHF: weight of yes/no correctness against meta.label")
    length_penalty: float = Field(0.0, description="reward += length_penalty · tokens / max_new_tokens (< 0)")
    missing_eos_penalty: float = Field(0.0, description="reward += this when a reply hits max_new_tokens (< 0)")
    kl_coef: float = Field(0.05, ge=0, description="reward -= kl_coef · (log π − log π_ref) of the reply")
    scale_rewards: bool = Field(True, description="grpo: divide by the group's reward std")
    normalize: Literal["auto", "mean", "sum"] = Field(
        "auto", description="reply log-prob: mean over tokens (grpo), sum (rloo, as TRL); auto picks by algo"
    )
    freeze: FreezeConfig = Field(default_factory=lambda: FreezeConfig(vision=True, projector=False, llm=False))


def _rewards(
    cfg: RlConfig, judge: Judge | None, prompts: list[Sample], groups: list[list[Rollout]]
) -> tuple[torch.Tensor, dict[str, float]]:
    """Rewards [B, k] of the sampled replies and their parts' means."""
    flat = [(p, r) for p, group in zip(prompts, groups) for r in group]
    symbolic = [
        symbolic_reward(r.text, len(r.token_ids), r.finished, (p.meta or {}).get("label"),
                        correct_bonus=cfg.correct_bonus, length_penalty=cfg.length_penalty,
                        max_new_tokens=cfg.max_new_tokens, missing_eos_penalty=cfg.missing_eos_penalty)
        for p, r in flat
    ]  # fmt: skip
    scores = judge.score([p for p, _ in flat], [r.text for _, r in flat]) if judge is not None else [0.0] * len(flat)
    total = torch.tensor([cfg.judge_weight * s + y for s, y in zip(scores, symbolic)]).view(len(prompts), -1)
    stats = {"rewards/judge/mean": sum(scores) / len(scores), "rewards/symbolic/mean": sum(symbolic) / len(symbolic)}
    return total, stats


def train(cfg: RlConfig) -> Path:
    """Run GRPO / RLOO; returns the final model directory (``<out>/model``)."""
    accelerator, out = start_run(cfg)
    data = load_samples(cfg.data, on_bad_record=cfg.on_bad_record, limit=cfg.max_samples)
    prompts = [replace(s, messages=s.prompt_messages) for s in data.samples]
    world = Path(cfg.world) if cfg.world else Path(cfg.data).parent
    judge = None
    if cfg.judge:
        judge = load_judge(cfg.judge, world, batch_size=cfg.batch_size * cfg.samples_per_prompt,
                           device=accelerator.device)  # fmt: skip
    loaded = load_model(cfg.model)
    reference = None  # the model as loaded, frozen; only the KL term reads it
    if cfg.kl_coef > 0:
        reference = ReplyScorer(copy.deepcopy(loaded.model).eval().requires_grad_(False)).to(accelerator.device)
    policy = ReplyScorer(trainable_model(loaded, cfg))
    if accelerator.is_main_process:
        log.info("%s", data.summary())
        log.info("trainable parameters: %d / %d", *count_parameters(policy))
    optimizer = make_optimizer(policy, cfg.lr, cfg.weight_decay)
    policy, optimizer = accelerator.prepare(policy, optimizer)
    start, metrics = resume_and_log(accelerator, policy, optimizer, cfg)
    generator = HFGenerator(unwrapped(accelerator, policy), loaded.processor, batch_size=cfg.batch_size)
    warmup = int(cfg.warmup_ratio * cfg.steps)
    bar = progress_bar(
        cfg.steps, desc=f"{cfg.algo} {out.name}", initial=start, enabled=cfg.progress and accelerator.is_main_process
    )
    end_step = StepEnd(cfg, optimizer, metrics, bar, model=policy, accelerator=accelerator, show=("loss", "reward"))
    k = cfg.samples_per_prompt
    for step in range(start, cfg.steps):
        lr = cfg.lr * lr_factor(step, cfg.steps, warmup, cfg.schedule)
        set_lr(optimizer, lr)
        logged: dict[str, float] = {}
        for micro in range(cfg.grad_accum):
            m = step * cfg.grad_accum + micro
            idx = batch_indices(
                len(prompts), cfg.batch_size, m, cfg.seed, accelerator.process_index, accelerator.num_processes
            )
            batch = [prompts[i] for i in idx]
            seed = (cfg.seed * 1_000_003 + m) * 1_009 + accelerator.process_index  # each process its own draws
            params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                    top_k=cfg.top_k, top_p=cfg.top_p, seed=seed)  # fmt: skip
            t0 = time.perf_counter()
            policy.eval()
            with accelerator.autocast():  # sampled in the precision it is trained in
                groups = generator.generate(batch, k, params=params)
            policy.train()
            t1 = time.perf_counter()
            rewards, stats = _rewards(cfg, judge, batch, groups)
            t2 = time.perf_counter()
            ids = [[r.token_ids for r in g] for g in groups]
            cont = encode_reply_ids(loaded.processor, batch, ids, cfg.max_length)
            cont = cont.to(accelerator.device)
            logps, tokens = policy(cont)
            ref_logps = logps.detach()
            if reference is not None:
                with torch.no_grad(), accelerator.autocast():
                    ref_logps, _ = reference(cont)
            shaped = kl_shaped(rewards.to(logps.device).flatten(), logps, ref_logps, cfg.kl_coef)
            advantages = group_advantages(shaped.view(-1, k), cfg.algo, scale=cfg.scale_rewards).flatten()
            per_token = cfg.normalize == "mean" or (cfg.normalize == "auto" and cfg.algo == "grpo")
            loss = policy_gradient_loss(logps, tokens if per_token else None, advantages).mean()
            accelerator.backward(loss / cfg.grad_accum)
            lengths = [len(r.token_ids) for g in groups for r in g]
            t3 = time.perf_counter()
            step_stats = {
                **stats,
                "loss": loss.item(),
                "reward": rewards.mean().item(),
                "reward_std": rewards.std(-1).mean().item(),
                "completions/mean_length": sum(lengths) / len(lengths),
                "completions/clipped_ratio": sum(not r.finished for g in groups for r in g) / len(lengths),
                "time/generation_s": t1 - t0,
                "time/rewards_s": t2 - t1,
                "time/update_s": t3 - t2,
            }
            if reference is not None:
                step_stats["kl"] = (logps - ref_logps).detach().mean().item()
            for key, value in step_stats.items():
                logged[key] = logged.get(key, 0.0) + value / cfg.grad_accum
        end_step(step, logged, lr)
    bar.close()
    return finish_run(accelerator, policy, optimizer, loaded.processor, cfg, metrics)


RECIPE = Recipe("rl", RlConfig, train, "on-policy RL: GRPO / RLOO with a reward model, a judge and symbolic rewards")

if __name__ == "__main__":
    sys.exit(launch_main(RECIPE, sys.argv[1:]))
