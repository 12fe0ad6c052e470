"""``mmalign demo``: the main job, end to end on a laptop CPU.

world → tiny LLaVA (random CLIP tower, projector standardised on the world's images) → the tower pretrained on the
world's per-cell labels → pretrain on captions → SFT on instructions → POPE (three splits) and CHAIR → preference
runs → ``report.md`` with tables and plots. Every stage is the same code a user runs from the command line; the demo
only chains them with a profile of sizes.

The tiny model's vision path (tower + calibrated projector) stays frozen in the decoder stages and only the decoder
learns: a random decoder trained jointly with the projector collapses the projector's output to a constant and never
reads the image (measured; see the README's "Why the world model trains this way").
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, TypeVar

from mmalign.errors import ConfigError
from mmalign.runtime.launch import default_processes, run_recipe, run_side_by_side
from mmalign.world.config import WorldConfig

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class DemoProfile:
    """Sizes of one demo run."""

    name: str
    n_train: int
    n_eval: int
    pretrain_steps: int
    sft_steps: int
    # The world's planted bias (``WorldConfig``): co-occurrence of the pairs in training scenes, how captions order
    # a pair, how often a missing partner is asked about, how often a brought-along partner is small. A missing
    # partner never asked about (as annotators rarely ask "is there a table?" of a fork photo), partners brought
    # along drawn small 90% of the time (a barely visible table) and captions naming a pair one after the other
    # ("a fork and a table") are what make the bias show in POPE and in the captions of a model that sees
    # (measured over six draws with the pretrained tower: F1 gap random − adversarial 0.038–0.098, random accuracy
    # 0.843–0.943, missing partners 36–63% of the hallucinated mentions; README).
    pair_prob: float = 0.9
    caption_order: str = "grouped"
    detailed_intro: str = "count"
    partner_question_prob: float = 0.0
    partner_small_prob: float = 0.9
    batch_size: int = 16
    # Batches of similar length (``TrainConfig.group_by_length``) for pretraining and SFT: faster, but it learns
    # less (measured: POPE random accuracy 0.892 → 0.677 after SFT, README).
    group_by_length: bool = False
    # Each batch packed into fewer rows (``TrainConfig.pack``) for pretraining and SFT: same batches and loss,
    # about 40% less compute per SFT step.
    pack: bool = True
    # ``torch.compile`` the decoder for pretraining and SFT (``TrainConfig.compile``): about 10% off the default
    # profile's time on 2 CPU cores (README), off so that the measured numbers do not depend on a C++ compiler.
    compile: bool = False
    lr: float = 1e-3
    # Supervised pretraining of the random vision tower (``mmalign train vision``) on the per-cell labels of
    # ``vision_scenes`` training scenes before the decoder stages, as a real VLM inherits a tower that sees; 0 steps
    # keeps the random tower, whose SFT model's POPE accuracy swings with the seed and even the CPU's rounding
    # (0.67–0.89; README, "Why the world model trains this way").
    vision_steps: int = 200
    vision_scenes: int = 8000
    chair_max_new_tokens: int = 80
    dpo_steps: int = 200
    dpo_batch_size: int = 8
    dpo_lr: float = 1e-4
    dpo_beta: float = 0.1
    # NLL on the chosen reply beside the preference loss (RPO): without it the rejected captions' extra sentence
    # teaches the model to stop early (measured: caption length 27 → 6 words, recall 0.74 → 0.07).
    dpo_rpo_alpha: float = 1.0

    @property
    def dpo_pairs(self) -> int:
        """Oracle pairs written for the preference runs: as many as a run visits (one epoch)."""
        return self.dpo_steps * self.dpo_batch_size

    def world_config(self, seed: int) -> WorldConfig:
        """The world this profile trains and evaluates on."""
        return WorldConfig(
            n_train=self.n_train,
            n_eval=self.n_eval,
            seed=seed,
            pair_prob=self.pair_prob,
            caption_order=self.caption_order,
            detailed_intro=self.detailed_intro,
            partner_question_prob=self.partner_question_prob,
            partner_small_prob=self.partner_small_prob,
        )


PROFILES = {
    # 1,000 held-out scenes: 200 give 5–10 hallucinated caption mentions, too few to say what they mostly are.
    "default": DemoProfile("default", n_train=20000, n_eval=1000, pretrain_steps=500, sft_steps=3600),
    "quick": DemoProfile(
        "quick", n_train=1000, n_eval=60, pretrain_steps=150, sft_steps=600, dpo_steps=20, vision_steps=50
    ),
}


def demo_profile(name: str, overrides: Sequence[str] = ()) -> DemoProfile:
    """A named profile with ``key=value`` overrides of its fields (e.g. ``caption_order=grouped sft_steps=2400``).

    Values take the type of the field's current value (``true``/``false`` for booleans); the profile's name gains
    the overrides, so that a report says what it ran.

    Raises:
        ConfigError: an override that is not ``key=value``, an unknown field, or a value of the wrong type.
    """
    profile = PROFILES[name]
    known = {f.name for f in fields(DemoProfile)} - {"name"}
    changes: dict[str, Any] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or key not in known:
            raise ConfigError(f"demo override {item!r}: expected key=value with key one of {', '.join(sorted(known))}")
        current = getattr(profile, key)
        try:
            if isinstance(current, bool):
                if text.lower() not in ("true", "false"):
                    raise ValueError(text)
                value: Any = text.lower() == "true"
            else:
                value = type(current)(text)
        except ValueError:
            raise ConfigError(f"demo override {item!r}: {key} takes a value of type {type(current).__name__}") from None
        changes[key] = value
    if not changes:
        return profile
    label = f"{name}, " + " ".join(f"{k}={v}" for k, v in changes.items())
    try:
        changed = replace(profile, name=label, **changes)
        changed.world_config(0)
    except ValueError as exc:
        raise ConfigError(f"demo overrides {' '.join(overrides)}: {exc}") from None
    return changed


def _timed(timings: dict[str, float], name: str, fn: Callable[[], T]) -> T:
    t0 = time.perf_counter()
    result = fn()
    timings[name] = time.perf_counter() - t0
    log.info("stage %s done in %.1fs", name, timings[name])
    return result


# Preference runs after SFT: DPO, mDPO, and DPO with the images removed from the pairs (the mDPO paper's
# "unconditional preference" diagnostic: if it matches DPO with images, the image is being ignored).
# Oracle pair kinds (``mmalign.world.pairs``), a third each: counterfactual images (a scene with both members of a
# planted pair redrawn without one), with the original caption, which names the missing member, as the rejected
# reply, or a yes/no question about either member; and captions with a swapped attribute. Measured from the default
# SFT model (seed 0, DPO / mDPO on the pairs of the first 1,600 training scenes): POPE adversarial F1 0.833 → 0.889 /
# 0.876, CHAIR_i −2% / −31% (on 1,600 pairs drawn from all 20,000 scenes: −31% / −41%; README). The earlier mix
# (partner inserted into the caption, attribute, yes/no on the real image) left adversarial F1 at 0.827 / 0.828:
# without an image that shows the partner missing, few pairs teach the model to look for it (a training scene holds
# both members 90% of the time).
PAIR_KINDS = ("removed", "attribute", "removed_existence")
ALIGNMENT_RUNS = {
    "dpo": ["loss=dpo"],
    "mdpo": ["loss=mdpo"],
    "dpo_no_image": ["loss=dpo", "drop_images=true"],
}


def evaluate_on_world(model_dir: Path, world: Path, max_new_tokens: int) -> dict[str, Any]:
    """POPE (three splits, greedy generation) and CHAIR of a model on a world."""
    from mmalign.eval.chair import evaluate_chair
    from mmalign.eval.pope import evaluate_pope, load_pope_sets
    from mmalign.models.load import load_model

    loaded = load_model(model_dir)
    pope = evaluate_pope(loaded.model, loaded.processor, load_pope_sets(world), method="generate", progress=False)
    chair = evaluate_chair(loaded.model, loaded.processor, world, max_new_tokens=max_new_tokens, progress=False)
    return {"pope": pope, "chair": chair}


def train_and_evaluate(
    recipe: str, name: str, flags: dict[str, Any], overrides: list[str], world: Path, max_new_tokens: int
) -> tuple[dict[str, Any], dict[str, float]]:
    """One run of ``recipe`` in this process and its evaluation; returns (results, seconds of ``name`` and of
    ``eval name``). Picklable: the demo and the study run several side by side."""
    timings: dict[str, float] = {}
    model_dir = _timed(timings, name, lambda: run_recipe(recipe, flags, overrides))
    result = _timed(timings, f"eval {name}", lambda: evaluate_on_world(model_dir, world, max_new_tokens))
    return result, timings


def evaluate_sft(model_dir: Path, world: Path, out: Path, max_new_tokens: int) -> tuple[dict[str, Any], dict]:
    """The SFT model's evaluation for the report: POPE by generation (answers kept) and by the logit fast path,
    CHAIR (captions kept); returns (results, seconds per part)."""
    from mmalign.eval.chair import evaluate_chair
    from mmalign.eval.pope import evaluate_pope, load_pope_sets
    from mmalign.models.load import load_model

    timings: dict[str, float] = {}
    loaded = load_model(model_dir)
    model, processor = loaded.model, loaded.processor
    sets = load_pope_sets(world)
    answers, captions = out / "eval" / "pope_answers.jsonl", out / "eval" / "chair_captions.jsonl"
    results = {
        "pope": _timed(
            timings,
            "POPE (generate)",
            lambda: evaluate_pope(model, processor, sets, method="generate", answers_out=answers, progress=False),
        ),
        "pope_logits": _timed(
            timings, "POPE (logits)", lambda: evaluate_pope(model, processor, sets, method="logits", progress=False)
        ),
        "chair": _timed(
            timings,
            "CHAIR",
            lambda: evaluate_chair(
                model, processor, world, max_new_tokens=max_new_tokens, captions_out=captions, progress=False
            ),
        ),
    }
    return results, timings


def fill_reference(name: str, flags: dict[str, Any], overrides: list[str]) -> tuple[dict[str, Any], dict[str, float]]:
    """Fill the on-disk reference log-prob cache of the DPO run ``flags``/``overrides`` describe (no training);
    returns (nothing, its seconds)."""
    from mmalign.config import load_config
    from mmalign.recipes.dpo import DpoConfig, fill_reference_cache

    timings: dict[str, float] = {}
    _timed(timings, name, lambda: fill_reference_cache(load_config(DpoConfig, flags=flags, overrides=overrides)))
    return {}, timings


def _job(kind: str, *args: Any) -> tuple[dict[str, Any], dict[str, float]]:
    """One side-by-side job of the demo (picklable): a preference run with its evaluation, the SFT model's
    evaluation, or the reference log-probs that two preference runs share."""
    return {"train": train_and_evaluate, "evaluate": evaluate_sft, "reference": fill_reference}[kind](*args)


def _alignment_stage(
    out: Path,
    world: Path,
    sft_model: Path,
    profile: DemoProfile,
    seed: int,
    timings: dict[str, float],
    processes: int,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The SFT model's evaluation, and DPO, mDPO and DPO without images from it, each evaluated; returns
    (SFT evaluation, preference runs).

    The jobs are independent and short, so with several processes they run side by side, one thread each (a run
    this small gains nothing from data parallelism: its fixed costs dominate); results do not depend on that.
    """
    from mmalign.world.pairs import write_world_pairs

    pairs = world / "pairs.jsonl"
    _timed(
        timings,
        "world pairs",
        lambda: write_world_pairs(
            world, pairs, seed=seed, kinds=PAIR_KINDS, max_scenes=profile.dpo_pairs, processes=processes
        ),
    )
    # Same freezing as the world model's SFT: the decoder learns, the vision path stays as it is.
    freeze = ["freeze.vision=true", "freeze.projector=true", "freeze.llm=false"]
    runs: dict[str, tuple[dict[str, Any], list[str]]] = {}
    for name, overrides in ALIGNMENT_RUNS.items():
        flags = {
            "model": str(sft_model),
            "data": str(pairs),
            "out": str(out / "runs" / name),
            "steps": profile.dpo_steps,
            "batch_size": profile.dpo_batch_size,
            "lr": profile.dpo_lr,
            "beta": profile.dpo_beta,
            "rpo_alpha": profile.dpo_rpo_alpha,
            "seed": seed,
            "log_every": 10,
            "group_by_length": profile.group_by_length,
            "progress": processes <= 1,
        }
        runs[name] = (flags, [*freeze, *overrides])
    # DPO and mDPO read the same reference log-probs (same model, pairs, batches): one job scores them first, so that
    # neither run does (side by side, both would). The pool starts jobs in this order: the reference and the run
    # that needs another reference, then mDPO (the longest) as soon as its reference is there, then DPO, and last
    # the SFT evaluation, which the first free process takes while the longer runs go on.
    jobs: dict[str, tuple[Any, ...]] = {"reference": ("reference", "reference log-probs", *runs["dpo"])}
    for name in ("dpo_no_image", "mdpo", "dpo"):
        jobs[name] = ("train", "dpo", name, *runs[name], world, profile.chair_max_new_tokens)
    jobs["sft"] = ("evaluate", sft_model, world, out, profile.chair_max_new_tokens)
    t0 = time.perf_counter()
    done = dict(run_side_by_side(_job, jobs, processes))
    timings.update(done.pop("reference")[1])
    sft_eval, _ = done["sft"]
    timings.update(done.pop("sft")[1])
    results: dict[str, Any] = {}
    for name in ALIGNMENT_RUNS:
        results[name], run_timings = done[name]
        timings.update(run_timings)
    if processes > 1:
        timings["evaluation and alignment (wall)"] = time.perf_counter() - t0
    return sft_eval, results


def _vision_stage(
    out: Path, world: Path, init_dir: Path, profile: DemoProfile, seed: int, timings: dict[str, float]
) -> Path:
    """Pretrain the random tower on the world's training scenes (per-cell labels; the held-out scenes stay unseen
    and score it), then recalibrate the projector; returns the new model directory."""
    flags = {
        "model": str(init_dir),
        "data": str(world),
        "out": str(out / "runs" / "vision"),
        "steps": profile.vision_steps,
        "seed": seed,
        "log_every": 10,
    }
    return _timed(timings, "vision", lambda: run_recipe("vision", flags, [f"max_samples={profile.vision_scenes}"]))


def run_demo(
    out: Path,
    *,
    quick: bool = False,
    seed: int = 0,
    processes: int | None = None,
    overrides: Sequence[str] = (),
) -> Path:
    """Run the whole pipeline into ``out``; returns the path of ``report.md``.

    Args:
        overrides: ``key=value`` changes of the profile's fields (``demo_profile``).
        processes: CPU processes for rendering the world's images and for the preference runs, which run side by
            side (default: two on a CPU with two or more cores, one for ``quick``, whose runs are too short to repay
            starting them). Pretraining and SFT run in this process with all its threads: packed rows gain from
            a second thread, a second data-parallel process does not (measured; README).
    """
    from mmalign.eval.report import write_report
    from mmalign.models.build import build_tiny, save_model
    from mmalign.models.families import TinySize
    from mmalign.models.vocab import corpus_images, corpus_texts
    from mmalign.world import write_world

    profile = demo_profile("quick" if quick else "default", overrides)
    if processes is None:
        processes = 1 if quick else default_processes()
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    world = out / "world"
    _timed(timings, "world", lambda: write_world(profile.world_config(seed), world, processes=processes))

    def init() -> Path:
        model, processor = build_tiny(
            "llava", corpus_texts([world]), size=TinySize(), seed=seed, calibration_images=corpus_images([world])
        )
        return save_model(model, processor, out / "models" / "init")

    init_dir = _timed(timings, "model init", init)
    if profile.vision_steps:
        init_dir = _vision_stage(out, world, init_dir, profile, seed, timings)
    common = {
        "seed": seed,
        "batch_size": profile.batch_size,
        "lr": profile.lr,
        "group_by_length": profile.group_by_length,
        "compile": profile.compile,
        "pack": profile.pack,
    }
    # The decoder is random-init, so it is what the caption stage trains; the vision path stays frozen.
    frozen_vision = ["freeze.vision=true", "freeze.projector=true", "freeze.llm=false", "loss_per=sample"]
    stage1 = _timed(
        timings,
        "pretrain",
        lambda: run_recipe(
            "pretrain",
            {
                **common,
                "model": str(init_dir),
                "data": str(world / "captions.jsonl"),
                "out": str(out / "runs" / "pretrain"),
                "steps": profile.pretrain_steps,
                "log_every": 10,
            },
            frozen_vision,
        ),
    )
    stage2 = _timed(
        timings,
        "sft",
        lambda: run_recipe(
            "sft",
            {
                **common,
                "model": str(stage1),
                "data": str(world / "sft.jsonl"),
                "out": str(out / "runs" / "sft"),
                "steps": profile.sft_steps,
                "log_every": 10,
            },
            frozen_vision,
        ),
    )

    (out / "eval").mkdir(parents=True, exist_ok=True)
    sft_eval, alignment = _alignment_stage(out, world, stage2, profile, seed, timings, processes)
    timings["total"] = time.perf_counter() - t_start

    results = {
        "profile": asdict(profile),
        "processes": processes,
        **sft_eval,
        "alignment": alignment,
        "timings_s": timings,
    }
    report = write_report(out, results, world)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return report
