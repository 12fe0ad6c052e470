"""On-policy RL for VLMs: GRPO, RLOO and PPO with a reward model, a judge and Fact-RLHF's symbolic rewards.

One linear recipe. Per step, for each micro-batch: ``batch_size`` prompts → ``samples_per_prompt`` replies each from
the batched KV-cache sampler (the current policy) → each reply's score: ``judge_weight`` · the judge (``rm:DIR`` a
reward model that sees the image, ``world`` the world's ground truth, or a Python function) + the symbolic terms
(yes/no correctness against ``meta.label``, a length term, a missing-end-of-sequence penalty). Then, with every
prompt and its images encoded once for all its replies (``mmalign.forward.TokenScorer``):

- ``grpo`` / ``rloo``: the KL to the frozen reference either in the reward (``kl_in=reward``: k1 summed over the
  reply) or as a loss term (``kl_in=loss``: k3 per token, TRL's GRPO ``beta``) → group advantages (``grpo``: centred
  and scaled per prompt; ``rloo``: leave-one-out) → the on-policy policy gradient (``mmalign.rl_losses``);
- ``ppo``: a value head on the policy's hidden states (``forward.VALUE_HEAD``; trained with the policy, kept in the
  checkpoints, left out of the saved model) → per-token rewards (−``kl_coef`` · k1 per token, the score at the last
  token) → GAE over each reply, advantages whitened over the step → ``ppo_epochs`` clipped updates on the same
  samples (the clipped surrogate + ``vf_coef`` · the clipped value loss), each but the last an optimizer step of its
  own → the shared step end (the last update).

Metric names as TRL's GRPO / PPO trainers (``reward``, ``reward_std``, ``kl``, ``completions/mean_length``,
``completions/clipped_ratio``; PPO: ``objective/kl``, ``objective/scores``, ``objective/rlhf_reward``,
``policy/clipfrac_avg``, ``policy/approxkl_avg``, ``loss/policy_avg``, ``loss/value_avg``, ``val/clipfrac_avg``).
Sampling is seeded by (seed, step), so a resumed run samples what the uninterrupted one did.
"""

from __future__ import annotations

import copy
import logging
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from mmalign.config import FreezeConfig, TrainConfig
from mmalign.data.lengths import fit_lengths
from mmalign.data.loaders import load_samples
from mmalign.data.pair_inputs import Continuations, encode_reply_ids
from mmalign.forward import VALUE_HEAD, TokenScorer, TokenScores
from mmalign.generation.hf import HFGenerator
from mmalign.generation.sampling import SamplingParams
from mmalign.judges import Judge, check_prompts, load_judge
from mmalign.models.load import count_parameters, load_model
from mmalign.reward import attach_head
from mmalign.rl_losses import (
    gae,
    group_advantages,
    kl_penalty,
    kl_shaped,
    masked_mean,
    policy_gradient_loss,
    ppo_loss,
    symbolic_reward,
    token_rewards,
    whiten,
)
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
    """GRPO / RLOO / PPO settings; defaults from TRL's GRPO and PPO trainers and Fact-RLHF where they exist."""

    algo: Literal["grpo", "rloo", "ppo"] = Field("grpo", description="grpo / rloo: group advantages; ppo: value + GAE")
    lr: float = Field(1e-6, gt=0)
    batch_size: int = Field(4, ge=1, description="prompts per step (per process when launched with torchrun)")
    samples_per_prompt: int = Field(4, ge=1, description="replies sampled per prompt (the group; grpo/rloo: >= 2)")
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
    kl_coef: float = Field(0.05, ge=0, description="weight of the KL to the reference (0: no reference model)")
    kl_in: Literal["reward", "loss"] = Field(
        "reward", description="reward: −kl_coef · k1 in the reward; loss: +kl_coef · k3 per token in the loss (not ppo)"
    )
    scale_rewards: bool = Field(True, description="grpo: divide by the group's reward std")
    normalize: Literal["auto", "mean", "sum"] = Field(
        "auto", description="reply log-prob: mean over tokens (grpo), sum (rloo, as TRL); auto picks by algo"
    )
    ppo_epochs: int = Field(2, ge=1, description="ppo: updates on each step's samples")
    clip_range: float = Field(0.2, gt=0, description="ppo: ratio clip ε")
    value_clip_range: float = Field(0.2, gt=0, description="ppo: value clip")
    vf_coef: float = Field(0.1, ge=0, description="ppo: weight of the value loss")
    gamma: float = Field(1.0, ge=0, le=1, description="ppo: discount")
    lam: float = Field(0.95, ge=0, le=1, description="ppo: GAE λ")
    whiten_advantages: bool = Field(True, description="ppo: whiten the advantages over the step's tokens")
    value_lr: float | None = Field(None, gt=0, description="ppo: the value head's learning rate (default: lr)")
    freeze: FreezeConfig = Field(default_factory=lambda: FreezeConfig(vision=True, projector=False, llm=False))

    @model_validator(mode="after")
    def _algo_settings(self) -> RlConfig:
        if self.algo != "ppo" and self.samples_per_prompt < 2:
            raise ValueError(f"algo={self.algo} needs samples_per_prompt >= 2 (a group), got {self.samples_per_prompt}")
        if self.algo == "ppo" and self.kl_in == "loss":
            raise ValueError("algo=ppo puts the KL in the per-token reward; kl_in=loss is for grpo and rloo")
        return self


@dataclass
class _Samples:
    """One micro-batch's sampled replies, encoded, with their scores [B*k] and what was measured on the way."""

    cont: Continuations
    scores: torch.Tensor
    stats: dict[str, float]


def _rewards(
    cfg: RlConfig, judge: Judge | None, prompts: list[Sample], groups: list[list[Rollout]]
) -> tuple[torch.Tensor, dict[str, float]]:
    """Scores [B*k] of the sampled replies and their parts' means."""
    flat = [(p, r) for p, group in zip(prompts, groups) for r in group]
    symbolic = [
        symbolic_reward(r.text, len(r.token_ids), r.finished, (p.meta or {}).get("label"),
                        correct_bonus=cfg.correct_bonus, length_penalty=cfg.length_penalty,
                        max_new_tokens=cfg.max_new_tokens, missing_eos_penalty=cfg.missing_eos_penalty)
        for p, r in flat
    ]  # fmt: skip
    scores = judge.score([p for p, _ in flat], [r.text for _, r in flat]) if judge is not None else [0.0] * len(flat)
    total = torch.tensor([cfg.judge_weight * s + y for s, y in zip(scores, symbolic)])
    stats = {"rewards/judge/mean": sum(scores) / len(scores), "rewards/symbolic/mean": sum(symbolic) / len(symbolic)}
    return total, stats


def train(cfg: RlConfig) -> Path:
    """Run GRPO / RLOO / PPO; returns the final model directory (``<out>/model``)."""
    accelerator, out = start_run(cfg)
    data = load_samples(cfg.data, on_bad_record=cfg.on_bad_record, limit=cfg.max_samples)
    prompts = [replace(s, messages=s.prompt_messages) for s in data.samples]
    world = Path(cfg.world) if cfg.world else Path(cfg.data).parent
    judge = None
    if cfg.judge:
        judge = load_judge(cfg.judge, world, batch_size=cfg.batch_size * cfg.samples_per_prompt,
                           device=accelerator.device)  # fmt: skip
    if judge is not None:
        check_prompts(judge, prompts)  # e.g. a fact-augmented reward model's facts, before any model is loaded
    loaded = load_model(cfg.model)
    prompts = fit_lengths(
        loaded.processor, prompts, data.rows, data.path, cfg.max_length, cfg.truncation, reserve=cfg.max_new_tokens
    ).items
    reference = None  # the model as loaded, frozen; only the KL term reads it
    if cfg.kl_coef > 0:
        reference = TokenScorer(copy.deepcopy(loaded.model).eval().requires_grad_(False)).to(accelerator.device)
    policy = TokenScorer(trainable_model(loaded, cfg))
    value_head: tuple[torch.nn.Parameter, ...] = ()
    if cfg.algo == "ppo":
        value_head = tuple(attach_head(policy.vlm, seed=cfg.seed, name=VALUE_HEAD).parameters())
        _disable_dropout(policy)  # the old and new log-probs of a step must come from the same function
    if accelerator.is_main_process:
        log.info("%s", data.summary())
        log.info("trainable parameters: %d / %d", *count_parameters(policy))
    value_scale = (cfg.value_lr or cfg.lr) / cfg.lr
    optimizer = make_optimizer(policy, cfg.lr, cfg.weight_decay, value_head, value_scale)
    policy, optimizer = accelerator.prepare(policy, optimizer)
    start, metrics = resume_and_log(accelerator, policy, optimizer, cfg)
    generator = HFGenerator(unwrapped(accelerator, policy), loaded.processor, batch_size=cfg.batch_size)
    warmup = int(cfg.warmup_ratio * cfg.steps)
    bar = progress_bar(
        cfg.steps, desc=f"{cfg.algo} {out.name}", initial=start, enabled=cfg.progress and accelerator.is_main_process
    )
    end_step = StepEnd(cfg, optimizer, metrics, bar, model=policy, accelerator=accelerator, show=("loss", "reward"))

    def sample(m: int) -> _Samples:
        """Micro-batch ``m``'s prompts, their sampled replies (seeded by (seed, m, process)) and scores."""
        idx = batch_indices(len(prompts), cfg.batch_size, m, cfg.seed, accelerator.process_index,
                            accelerator.num_processes)  # fmt: skip
        batch = [prompts[i] for i in idx]
        seed = (cfg.seed * 1_000_003 + m) * 1_009 + accelerator.process_index  # each process its own draws
        params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                top_k=cfg.top_k, top_p=cfg.top_p, seed=seed)  # fmt: skip
        t0 = time.perf_counter()
        policy.eval()
        with accelerator.autocast():  # sampled in the precision it is trained in
            groups = generator.generate(batch, cfg.samples_per_prompt, params=params)
        policy.train()
        t1 = time.perf_counter()
        scores, stats = _rewards(cfg, judge, batch, groups)
        t2 = time.perf_counter()
        cont = encode_reply_ids(loaded.processor, batch, [[r.token_ids for r in g] for g in groups], cfg.max_length)
        lengths = [len(r.token_ids) for g in groups for r in g]
        stats |= {
            "reward": scores.mean().item(),
            "completions/mean_length": sum(lengths) / len(lengths),
            "completions/clipped_ratio": sum(not r.finished for g in groups for r in g) / len(lengths),
            "time/generation_s": t1 - t0,
            "time/rewards_s": t2 - t1,
        }
        if cfg.samples_per_prompt > 1:
            stats["reward_std"] = scores.view(len(batch), -1).std(-1).mean().item()
        return _Samples(cont.to(accelerator.device), scores.to(accelerator.device), stats)

    def reference_logps(cont: Continuations) -> torch.Tensor | None:
        if reference is None:
            return None
        with torch.no_grad(), accelerator.autocast():
            return reference(cont).logps

    for step in range(start, cfg.steps):
        lr = cfg.lr * lr_factor(step, cfg.steps, warmup, cfg.schedule)
        set_lr(optimizer, lr)
        logged: dict[str, float] = {}
        if cfg.algo == "ppo":
            samples = [sample(step * cfg.grad_accum + micro) for micro in range(cfg.grad_accum)]
            logged = _ppo_update(cfg, policy, samples, reference_logps, accelerator, end_step)
        else:
            for micro in range(cfg.grad_accum):
                drawn = sample(step * cfg.grad_accum + micro)
                t0 = time.perf_counter()
                loss, stats = _group_loss(cfg, policy(drawn.cont), reference_logps(drawn.cont), drawn.scores)
                accelerator.backward(loss / cfg.grad_accum)
                stats |= drawn.stats | {"time/update_s": time.perf_counter() - t0}
                _accumulate(logged, stats, 1 / cfg.grad_accum)
        end_step(step, logged, lr)
    bar.close()
    training_only = (VALUE_HEAD,) if cfg.algo == "ppo" else ()
    return finish_run(accelerator, policy, optimizer, loaded.processor, cfg, metrics, training_only)


def _group_loss(
    cfg: RlConfig, scores: TokenScores, ref_logps: torch.Tensor | None, rewards: torch.Tensor
) -> tuple[torch.Tensor, dict[str, float]]:
    """GRPO / RLOO: the loss of one micro-batch (with grad) and its values."""
    logps, tokens = scores.sums()
    stats: dict[str, float] = {}
    if ref_logps is not None:
        ref_sums = ref_logps.sum(-1)
        stats["kl"] = (logps.detach() - ref_sums).mean().item()
        if cfg.kl_in == "reward":
            rewards = kl_shaped(rewards, logps, ref_sums, cfg.kl_coef)
    advantages = group_advantages(rewards.view(-1, cfg.samples_per_prompt), cfg.algo, scale=cfg.scale_rewards)
    per_token = cfg.normalize == "mean" or (cfg.normalize == "auto" and cfg.algo == "grpo")
    losses = policy_gradient_loss(logps, tokens if per_token else None, advantages.flatten())
    if ref_logps is not None and cfg.kl_in == "loss":
        k3 = kl_penalty(scores.logps, ref_logps)
        penalty = masked_mean(k3, scores.mask, dim=-1) if per_token else (k3 * scores.mask).sum(-1)
        losses = losses + cfg.kl_coef * penalty
        stats["kl_penalty"] = penalty.mean().item()
    loss = losses.mean()
    return loss, {**stats, "loss": loss.item()}


def _ppo_update(
    cfg: RlConfig,
    policy: Any,
    samples: list[_Samples],
    reference_logps: Any,
    accelerator: Any,
    end_step: StepEnd,
) -> dict[str, float]:
    """PPO on one step's samples: old log-probs and values, token rewards, GAE and whitening, then ``ppo_epochs``
    clipped updates (each but the last stepped here; the last by the step end). Returns the step's values."""
    t0 = time.perf_counter()
    old, advantages, returns = [], [], []
    values: dict[str, float] = {}
    n = len(samples)
    for s in samples:
        with torch.no_grad():
            before = policy(s.cont)
        ref = reference_logps(s.cont)
        kl = torch.zeros_like(before.logps) if ref is None else (before.logps - ref) * before.mask
        rewards = token_rewards(s.scores, kl, before.mask, cfg.kl_coef)
        adv, ret = gae(rewards, before.values, before.mask, cfg.gamma, cfg.lam)
        old.append(before)
        advantages.append(adv)
        returns.append(ret)
        seq_kl = kl.sum(-1)
        measured = {
            **s.stats,
            "objective/scores": s.scores.mean().item(),
            "objective/rlhf_reward": (s.scores - cfg.kl_coef * seq_kl).mean().item(),
            "val/mean": masked_mean(before.values, before.mask).item(),
        }
        if ref is not None:
            measured["kl"] = measured["objective/kl"] = seq_kl.mean().item()
        _accumulate(values, measured, 1 / n)
    if cfg.whiten_advantages:  # over every token of the step (the micro-batches' widths differ)
        width = max(a.shape[1] for a in advantages)
        padded = torch.cat([torch.nn.functional.pad(a, (0, width - a.shape[1])) for a in advantages])
        mask = torch.cat([torch.nn.functional.pad(o.mask, (0, width - o.mask.shape[1])) for o in old])
        flat = whiten(padded, mask).split([a.shape[0] for a in advantages])
        advantages = [f[:, : a.shape[1]] for f, a in zip(flat, advantages)]
    norms: list[float] = []
    for epoch in range(cfg.ppo_epochs):
        for s, before, adv, ret in zip(samples, old, advantages, returns):
            now = policy(s.cont)
            terms = ppo_loss(now.logps, before.logps, adv, now.values, before.values, ret, now.mask,
                             cfg.clip_range, cfg.value_clip_range)  # fmt: skip
            loss = terms.policy + cfg.vf_coef * terms.value
            accelerator.backward(loss / n)
            measured = {
                "loss": loss.item(),
                "loss/policy_avg": terms.policy.item(),
                "loss/value_avg": terms.value.item(),
                "policy/clipfrac_avg": terms.clipfrac.item(),
                "policy/approxkl_avg": terms.approx_kl.item(),
                "val/clipfrac_avg": terms.value_clipfrac.item(),
            }
            _accumulate(values, measured, 1 / (n * cfg.ppo_epochs))
        if epoch < cfg.ppo_epochs - 1:
            norm = end_step.update()
            if norm is not None:
                norms.append(norm)
    values["time/update_s"] = time.perf_counter() - t0
    if norms:  # the last epoch's norm joins as the step end's grad_norm
        values["grad_norm/earlier_epochs"] = sum(norms) / len(norms)
    return values


def _accumulate(into: dict[str, float], measured: dict[str, float], weight: float) -> None:
    """Add ``weight`` × each measured value to ``into`` (a mean over micro-batches and epochs as they come)."""
    for key, value in measured.items():
        into[key] = into.get(key, 0.0) + value * weight


def _disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off everywhere in ``model`` (as TRL does for PPO), logged when there was any."""
    changed = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout) and module.p > 0:
            module.p, changed = 0.0, changed + 1
    if changed:
        log.info("ppo: dropout turned off in %d modules", changed)


RECIPE = Recipe(
    "rl", RlConfig, train, "on-policy RL: GRPO / RLOO / PPO with a reward model, a judge and symbolic rewards"
)

if __name__ == "__main__":
    sys.exit(launch_main(RECIPE, sys.argv[1:]))
