"""Online and hybrid DPO: pairs made from the current policy during training, ranked by a judge.

accelerator → prompts (samples with ground truth) → policy, frozen reference, judge → an explicit loop; per step and
per example, the pair comes from one of:

* ``rejected="sampled"`` (online DPO, OAIF / TRL's OnlineDPOTrainer): ``k`` replies sampled from the current policy
  (temperature 0.9), scored by the judge minus ``missing_eos_penalty`` for a reply that did not stop; best vs worst
  (ties go to the earlier sample);
* ``rejected="bdhs"`` (online BDHS, Amirloo et al. §3.4): the ground-truth answer vs a BDHS reply written by the
  current policy with the image masked;
* with probability ``mix_p``, an offline pair from ``offline_data`` instead (Mixed-DPO, §3.5);
* ``gamma`` set: every example is an offline pair and also yields a BDHS pair from its chosen reply;
  L = γ·L_DPO(y⁺, y⁻_offline) + (1−γ)·L_DPO(y⁺, ỹ⁻_BDHS) (§3.4, Eq. 5).

The pairs are then scored by the shared-prompt pair forward (policy with grad, reference without) and the DPO or IPO
loss is taken; metrics use TRL's online-DPO names. Generation is seeded by (seed, micro-step), so ``--resume``
reproduces an uninterrupted run.

``engine=vllm`` samples with a vLLM engine in each process (TRL's colocated mode): it loads the starting checkpoint
and receives the policy's weights before the first sampling of every step. It serves ``rejected=sampled`` only:
BDHS pairs (``rejected=bdhs``, ``gamma``) hide image tokens from attention, which vLLM cannot do. Sampling from the
policy between steps needs its whole weights in every process, so FSDP and DeepSpeed ZeRO-3 (which shard them) are
refused; DDP and ZeRO-2 run it (docs/scale.md).
"""

from __future__ import annotations

import copy
import logging
import random
import sys
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from mmalign.config import FreezeConfig, PreferenceConfig
from mmalign.data.lengths import fit_lengths
from mmalign.data.loaders import load_samples
from mmalign.data.pair_inputs import encode_pairs
from mmalign.data.preference import load_pairs
from mmalign.errors import ConfigError
from mmalign.forward import ForwardOptions, PairScorer, pair_logps
from mmalign.generation import Generator
from mmalign.generation.bdhs import BdhsConfig, bdhs_pairs
from mmalign.generation.engines import Engine, check_engine, make_generator
from mmalign.generation.sampling import SamplingParams
from mmalign.judges import Judge, check_prompts, load_judge
from mmalign.losses import compute_loss, dpo_metrics
from mmalign.models.load import count_parameters, load_model
from mmalign.runtime.batching import batch_indices
from mmalign.runtime.launch import Recipe
from mmalign.runtime.launch import main as launch_main
from mmalign.runtime.optim import lr_factor, make_optimizer, set_lr
from mmalign.runtime.progress import progress_bar
from mmalign.runtime.run import (
    finish_run,
    make_accelerator,
    open_run_dir,
    resume_and_log,
    sharded,
    trainable_model,
)
from mmalign.runtime.step import StepEnd
from mmalign.types import PreferencePair, Sample

log = logging.getLogger(__name__)


class OnlineDpoConfig(PreferenceConfig):
    """Online / hybrid DPO; defaults from TRL's OnlineDPOConfig and the Apple study where they exist."""

    loss: Literal["dpo", "ipo"] = "dpo"
    lr: float = Field(5e-7, gt=0)
    batch_size: int = Field(8, ge=1)
    samples_per_prompt: int = Field(2, ge=2)
    temperature: float = Field(0.9, ge=0)
    top_k: int = Field(0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(64, ge=1)
    missing_eos_penalty: float | None = None
    # "world" (the rule judge of the world the data comes from), "rm:DIR" (a reward model from ``mmalign train rm``,
    # which sees the image), or "module:function" / "file.py:function".
    judge: str = "world"
    world: str | None = None
    rejected: Literal["sampled", "bdhs"] = "sampled"
    bdhs_rho: float = Field(0.99, ge=0, le=1)
    offline_data: str | None = None
    mix_p: float = Field(0.0, ge=0, le=1)
    gamma: float | None = Field(None, ge=0, le=1)
    engine: Engine = Field(
        "hf",
        description="what samples the replies: hf (the policy itself) or vllm (a vLLM engine in each process that "
        "gets the policy's weights every step; pip install 'mmalign[vllm]'; rejected=sampled only)",
    )
    vllm_gpu_memory: float = Field(0.3, gt=0, lt=1, description="share of the GPU's memory the vLLM engine takes")
    freeze: FreezeConfig = Field(default_factory=lambda: FreezeConfig(vision=True, projector=False, llm=False))

    @model_validator(mode="after")
    def _check_engine(self) -> OnlineDpoConfig:
        bdhs = (self.rejected == "bdhs" or self.gamma is not None) and self.bdhs_rho > 0
        check_engine(
            self.engine, image_masking=bdhs, where="online-dpo: ", installed=False,
            instead="rejected=sampled without gamma (BDHS pairs mask the image)",
        )  # fmt: skip
        return self


def make_judge(cfg: OnlineDpoConfig) -> Judge:
    """The judge named by ``cfg.judge`` (``mmalign.judges.load_judge``)."""
    world = Path(cfg.world) if cfg.world else Path(cfg.data).parent
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return load_judge(cfg.judge, world, batch_size=cfg.batch_size, device=device)


def _pair(sample: Sample, chosen: str, rejected: str, meta: dict[str, Any]) -> PreferencePair:
    return PreferencePair(
        id=sample.id,
        prompt=sample.prompt_messages,
        chosen=chosen,
        rejected=rejected,
        images=sample.images,
        root=sample.root,
        meta=meta,
    )


def sampled_pairs(
    generator: Generator, judge: Judge, samples: list[Sample], cfg: OnlineDpoConfig, seed: int
) -> tuple[list[PreferencePair], dict[str, float]]:
    """Online pairs: ``k`` policy samples per prompt, judged; best vs worst. Also the online metrics."""
    params = SamplingParams(
        max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, seed=seed
    )
    groups = generator.generate(samples, cfg.samples_per_prompt, params=params)
    pairs, margins, scores_all, eos = [], [], [], []
    for sample, group in zip(samples, groups):
        scores = judge.score([sample] * len(group), [r.text for r in group])
        if cfg.missing_eos_penalty is not None:
            scores = [s - (0.0 if r.finished else cfg.missing_eos_penalty) for s, r in zip(scores, group)]
        best = max(range(len(group)), key=lambda j: (scores[j], -j))
        worst = min(range(len(group)), key=lambda j: (scores[j], -j))
        if best == worst:
            worst = (best + 1) % len(group)
        pairs.append(_pair(sample, group[best].text, group[worst].text, {"source": "online"}))
        margins.append(scores[best] - scores[worst])
        scores_all.extend(scores)
        eos.extend(float(r.finished) for r in group)
    stats = {
        "objective/scores": sum(scores_all) / len(scores_all),
        "objective/scores_margin": sum(margins) / len(margins),
        "val/contain_eos_token": sum(eos) / len(eos),
    }
    return pairs, stats


def bdhs_online_pairs(
    generator: Generator, samples: list[Sample], cfg: OnlineDpoConfig, seed: int
) -> list[PreferencePair]:
    """Ground truth vs a BDHS reply written now by the current policy (one guided round, no similarity filter)."""
    bcfg = BdhsConfig(rho=cfg.bdhs_rho, iterations=1, max_new_tokens=cfg.max_new_tokens, seed=seed)
    made, _ = bdhs_pairs(generator, None, samples, bcfg, seed=seed)
    return [_pair(s, p.chosen, p.rejected, {"source": "bdhs"}) for s, p in zip(samples, made)]


def _from_offline(pair: PreferencePair) -> Sample:
    from mmalign.types import Message

    return Sample(
        id=pair.id,
        messages=(*pair.prompt, Message.assistant(pair.chosen)),
        images=pair.images,
        root=pair.root,
        meta={"objects": list(pair.objects)} if pair.objects else {},
    )


def step_pairs(
    generator: Generator,
    judge: Judge | None,
    prompts: list[Sample],
    offline: list[PreferencePair],
    cfg: OnlineDpoConfig,
    m: int,
) -> tuple[list[PreferencePair], torch.Tensor, dict[str, float]]:
    """The pairs of micro-step ``m`` and their loss weights (summing to 1)."""
    seed = cfg.seed * 1_000_003 + m
    if cfg.gamma is not None:
        rng = random.Random(f"{cfg.seed}:{m}:gamma")
        ext = [offline[rng.randrange(len(offline))] for _ in prompts]
        bdhs = bdhs_online_pairs(generator, [_from_offline(p) for p in ext], cfg, seed)
        n = len(ext)
        weights = torch.tensor([cfg.gamma] * n + [1 - cfg.gamma] * n) / n
        return [*ext, *bdhs], weights, {}
    rng = random.Random(f"{cfg.seed}:{m}:mix")
    use_offline = [bool(offline) and rng.random() < cfg.mix_p for _ in prompts]
    fresh = [s for s, off in zip(prompts, use_offline) if not off]
    stats: dict[str, float] = {}
    made: list[PreferencePair] = []
    if fresh:
        if cfg.rejected == "bdhs":
            made = bdhs_online_pairs(generator, fresh, cfg, seed)
        else:
            assert judge is not None
            made, stats = sampled_pairs(generator, judge, fresh, cfg, seed)
    it = iter(made)
    pairs = [offline[rng.randrange(len(offline))] if off else next(it) for off in use_offline]
    stats["mix/offline_fraction"] = sum(use_offline) / len(use_offline)
    return pairs, torch.full((len(pairs),), 1.0 / len(pairs)), stats


def _check_whole_weights(accelerator: Any) -> None:
    """Refuse engines that shard the policy's weights (the policy samples between steps; see the module docstring)."""
    if sharded(accelerator):
        name = "FSDP" if "FSDP" in str(accelerator.distributed_type) else "ZeRO-3"
        raise ConfigError(
            "online-dpo samples from the policy between steps, which needs its whole weights in every process; "
            f"{name} shards them: launch with configs/accelerate/ddp.yaml or zero2.yaml"
        )


def _fit_prompts(processor: Any, data: Any, cfg: OnlineDpoConfig) -> list[Sample]:
    """The prompts whose sampled replies fit in ``max_length`` (their prompt with ``max_new_tokens`` to spare),
    under the run's truncation policy; a truncated prompt keeps its ground-truth answer."""
    prompts = [replace(s, messages=s.prompt_messages) for s in data.samples]
    fitted = fit_lengths(
        processor, prompts, data.rows, data.path, cfg.max_length, cfg.truncation, reserve=cfg.max_new_tokens
    )
    by_row = dict(zip(data.rows, data.samples, strict=True))
    out = []
    for short, row in zip(fitted.items, fitted.rows, strict=True):
        full = by_row[row]
        out.append(replace(full, messages=(*short.messages, *full.messages[len(full.prompt_messages) :])))
    return out


def push_policy(model: torch.nn.Module, load: Callable[[Iterable[tuple[str, torch.Tensor]]], Any]) -> None:
    """Hand the VLM's weights to ``load`` (``engine=vllm``'s ``load_weights``) under their Hugging Face names, LoRA
    adapters merged in for the call and unmerged after it, so training goes on with the adapters apart. No copy is
    made: ``load`` copies what it keeps."""
    if not callable(getattr(model, "merge_adapter", None)):
        load((k, v.detach()) for k, v in model.state_dict().items())
        return
    model.merge_adapter()
    try:
        load(
            (name.removeprefix("base_model.model.").replace(".base_layer.", "."), value.detach())
            for name, value in model.state_dict().items()
            if "lora_" not in name and "modules_to_save" not in name
        )
    finally:
        model.unmerge_adapter()


def policy_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of what ``push_policy`` hands over: the VLM's weights under their Hugging Face names, LoRA merged."""
    weights: dict[str, torch.Tensor] = {}
    push_policy(model, lambda items: weights.update((k, v.clone()) for k, v in items))
    return weights


def train(cfg: OnlineDpoConfig) -> Path:
    """Run online / hybrid DPO; returns the final model directory (``<out>/model``)."""
    if (cfg.mix_p > 0 or cfg.gamma is not None) and not cfg.offline_data:
        raise ConfigError("mix_p > 0 and gamma need offline_data=PAIRS")
    check_engine(cfg.engine, where="online-dpo: ")
    accelerator = make_accelerator(cfg)
    _check_whole_weights(accelerator)
    torch.manual_seed(cfg.seed)
    out = open_run_dir(cfg, accelerator)
    data = load_samples(cfg.data, on_bad_record=cfg.on_bad_record, limit=cfg.max_samples)
    prompts = data.samples
    offline = load_pairs(cfg.offline_data, on_bad_record=cfg.on_bad_record).pairs if cfg.offline_data else []
    judge = make_judge(cfg) if cfg.rejected == "sampled" and cfg.gamma is None else None
    if judge is not None:
        check_prompts(judge, prompts)
    loaded = load_model(cfg.model)
    prompts = _fit_prompts(loaded.processor, data, cfg)
    options = ForwardOptions()
    reference = PairScorer(copy.deepcopy(loaded.model).eval().requires_grad_(False), options).to(accelerator.device)
    policy = PairScorer(trainable_model(loaded, cfg), options)
    if accelerator.is_main_process:
        log.info("%s; %d offline pairs", data.summary(), len(offline))
        log.info("trainable parameters: %d / %d", *count_parameters(policy))
    optimizer = make_optimizer(policy, cfg.lr, cfg.weight_decay)
    policy, optimizer = accelerator.prepare(policy, optimizer)
    start, metrics = resume_and_log(accelerator, policy, optimizer, cfg)
    vlm = accelerator.unwrap_model(policy).vlm
    engine_kwargs: dict[str, Any] = {}
    if cfg.engine == "vllm":
        engine_kwargs = {"in_process": True, "gpu_memory_utilization": cfg.vllm_gpu_memory}
        if accelerator.num_processes > 1:  # one engine per process, in torchrun's process group (as TRL does)
            engine_kwargs["distributed_executor_backend"] = "external_launcher"
    generator = make_generator(
        cfg.engine, model=vlm, processor=loaded.processor, model_dir=cfg.model, batch_size=cfg.batch_size * 4,
        seed=cfg.seed + accelerator.process_index, **engine_kwargs,
    )  # fmt: skip
    sync = getattr(generator, "load_weights", None) if cfg.engine == "vllm" else None
    share = accelerator.unwrap_model(policy).options.share_prompt
    loss_cfg, warmup = cfg.loss_config(), int(cfg.warmup_ratio * cfg.steps)
    policy.train()
    bar = progress_bar(
        cfg.steps, desc=f"online {out.name}", initial=start, enabled=cfg.progress and accelerator.is_main_process
    )
    end_step = StepEnd(cfg, optimizer, metrics, bar, model=policy, accelerator=accelerator)
    for step in range(start, cfg.steps):
        lr = cfg.lr * lr_factor(step, cfg.steps, warmup, cfg.schedule)
        set_lr(optimizer, lr)
        logged: dict[str, float] = {}
        if sync is not None:
            push_policy(vlm, sync)  # the policy as the last step left it
        for micro in range(cfg.grad_accum):
            m = step * cfg.grad_accum + micro
            idx = batch_indices(
                len(prompts), cfg.batch_size, m, cfg.seed, accelerator.process_index, accelerator.num_processes
            )
            pairs, weights, stats = step_pairs(generator, judge, [prompts[i] for i in idx], offline, cfg, m)
            enc = encode_pairs(loaded.processor, pairs, share_prompt=share, max_length=cfg.max_length)
            enc = enc.to(accelerator.device)
            scores = policy(enc)
            with torch.no_grad():
                ref = reference(enc)
            logps = pair_logps(scores, ref.chosen, ref.rejected)
            result = compute_loss(cfg.loss, logps, loss_cfg)
            loss = (result.loss * weights.to(result.loss.device)).sum()
            accelerator.backward(loss / cfg.grad_accum)
            kl = (
                (logps.policy_chosen - ref.chosen) + (logps.policy_rejected - ref.rejected)
            ).detach().mean().item() / 2
            step_stats = {**dpo_metrics(result, logps), **stats, "objective/kl": kl}
            step_stats["loss"] = loss.item()
            step_stats["objective/non_score_reward"] = -cfg.beta * kl
            if "objective/scores" in stats:
                step_stats["objective/rlhf_reward"] = stats["objective/scores"] - cfg.beta * kl
            for key, value in step_stats.items():
                logged[key] = logged.get(key, 0.0) + value / cfg.grad_accum
        end_step(step, logged, lr)
    bar.close()
    return finish_run(accelerator, policy, optimizer, loaded.processor, cfg, metrics)


RECIPE = Recipe(
    "online-dpo",
    OnlineDpoConfig,
    train,
    "online / hybrid DPO: pairs sampled from the current policy and ranked by a judge, or BDHS",
)

if __name__ == "__main__":
    sys.exit(launch_main(RECIPE, sys.argv[1:]))
