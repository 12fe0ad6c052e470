"""``mmalign demo``: the main job, end to end on a laptop CPU.

world → tiny model of the default family (random CLIP tower, projector standardised on the world's images) → the
tower pretrained on the world's per-cell labels → pretrain on captions → SFT on instructions → POPE (three splits) and
CHAIR → preference runs → ``report.md`` with tables and plots. Every stage is the same code a user runs from the
command line; the demo only chains them with a profile of sizes.

The tiny model's vision path (tower + calibrated projector) stays frozen in the decoder stages and only the decoder
learns: a random decoder trained jointly with the projector collapses the projector's output to a constant and never
reads the image (docs/design.md, docs/results.md).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from mmalign.config import override_dataclass
from mmalign.errors import ConfigError
from mmalign.lab.recipes import recipe as lab_recipe
from mmalign.lab.world.config import WorldConfig
from mmalign.losses import LossConfig
from mmalign.runtime.launch import default_processes, run_recipe, run_side_by_side

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
    # (docs/world-regime.md).
    pair_prob: float = 0.9
    caption_order: str = "grouped"
    # How a training description opens (``WorldConfig.detailed_intro``): ``open`` (no count, no list) was measured
    # against ``count`` over three seeds and hallucinated less on average (docs/world-regime.md).
    detailed_intro: str = "count"
    partner_question_prob: float = 0.0
    partner_small_prob: float = 0.9
    # Training descriptions of a scene with 2+ objects and a lone pair member end with a sentence naming the absent
    # partner (``WorldConfig.caption_prior_prob``): the late, prior-driven hallucination of real VLMs, which a model
    # that sees learns to write (docs/world-regime.md: the measurements that chose these values). The previous
    # default, every training caption true: ``caption_prior_prob=0 pair_kinds=removed,attribute,removed_existence``.
    caption_prior_prob: float = 1.0
    caption_prior_min_objects: int = 2
    # Oracle pair kinds of the preference runs (``mmalign.lab.world.pairs.KINDS``), comma-separated, a share each.
    pair_kinds: str = "prior_tail,removed,removed_existence"
    batch_size: int = 16
    # Batches of similar length (``TrainConfig.group_by_length``) for pretraining and SFT: faster, but it learns
    # less (docs/results.md).
    group_by_length: bool = False
    # Each batch packed into fewer rows (``TrainConfig.pack``) for pretraining and SFT: same batches and loss,
    # less compute per SFT step (docs/results.md).
    pack: bool = True
    # ``torch.compile`` the decoder for pretraining and SFT (``TrainConfig.compile``): faster (docs/results.md), off
    # so that the measured numbers do not depend on a C++ compiler.
    compile: bool = False
    lr: float = 1e-3
    # Supervised pretraining of the random vision tower (``mmalign train vision``) on the per-cell labels of
    # ``vision_scenes`` training scenes before the decoder stages, as a real VLM inherits a tower that sees; 0 steps
    # keeps the random tower, whose SFT model's POPE accuracy swings with the seed and even the CPU's rounding
    # (docs/results.md).
    vision_steps: int = 200
    vision_scenes: int = 8000
    chair_max_new_tokens: int = 80
    dpo_steps: int = 200
    dpo_batch_size: int = 8
    dpo_lr: float = 1e-4
    dpo_beta: float = LossConfig.beta
    # NLL on the chosen reply beside the preference loss (RPO): without it the rejected captions' extra sentence
    # teaches the model to stop early (docs/results.md).
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
            caption_prior_prob=self.caption_prior_prob,
            caption_prior_min_objects=self.caption_prior_min_objects,
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
    fields_only = [o for o in overrides if o.partition("=")[0].strip() != "name"]
    if len(fields_only) != len(overrides):
        raise ConfigError("demo override 'name=...': the profile's name is not a setting")
    _, changes = override_dataclass(profile, fields_only, "demo profile")
    if not changes:
        return profile
    label = f"{name}, " + " ".join(f"{k}={v}" for k, v in changes.items())
    try:
        changed = replace(profile, name=label, **changes)
        changed.world_config(0)
        _check_pair_kinds(changed.pair_kinds)
    except ValueError as exc:
        raise ConfigError(f"demo overrides {' '.join(overrides)}: {exc}") from None
    return changed


def _check_pair_kinds(text: str) -> None:
    from mmalign.lab.world.pairs import KINDS

    unknown = [k for k in text.split(",") if k not in KINDS]
    if unknown:
        raise ValueError(f"pair_kinds: unknown kind(s) {', '.join(unknown)}; known: {', '.join(KINDS)}")


def _timed(timings: dict[str, float], name: str, fn: Callable[[], T]) -> T:
    t0 = time.perf_counter()
    result = fn()
    timings[name] = time.perf_counter() - t0
    log.info("stage %s done in %.1fs", name, timings[name])
    return result


# Preference runs after SFT: DPO, mDPO, and DPO with the images removed from the pairs (the mDPO paper's
# "unconditional preference" diagnostic: if it matches DPO with images, the image is being ignored).
# The oracle pairs' kinds are the profile's ``pair_kinds`` (why these: docs/world-regime.md).
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
    model_dir = _timed(timings, name, lambda: run_recipe(lab_recipe(recipe), flags, overrides))
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
    from mmalign.lab.world.pairs import write_world_pairs
    from mmalign.runtime.checkpoint import atomic_write_text

    pairs = world / "pairs.jsonl"
    _timed(
        timings,
        "world pairs",
        lambda: write_world_pairs(
            world,
            pairs,
            seed=seed,
            kinds=tuple(profile.pair_kinds.split(",")),
            max_scenes=profile.dpo_pairs,
            processes=processes,
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
    # Finished rows are kept (``eval/rows/<name>.json``) and not run again when the demo is started again.
    kept = out / "eval" / "rows"
    done = {name: json.loads((kept / f"{name}.json").read_text()) for name in jobs if (kept / f"{name}.json").exists()}
    if "dpo" in done and "mdpo" in done:
        done.setdefault("reference", [{}, {}])
    t0 = time.perf_counter()
    for name, result in run_side_by_side(_job, {k: v for k, v in jobs.items() if k not in done}, processes):
        done[name] = result
        kept.mkdir(parents=True, exist_ok=True)
        atomic_write_text(kept / f"{name}.json", json.dumps(result) + "\n")
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
    return _timed(
        timings, "vision", lambda: run_recipe(lab_recipe("vision"), flags, [f"max_samples={profile.vision_scenes}"])
    )


def _resumable(timings: dict[str, float], name: str, model_dir: Path, fn: Callable[[], Path]) -> Path:
    """A training stage, skipped when an earlier start of this demo left its final model (written atomically)."""
    if (model_dir / "config.json").exists():
        log.info("stage %s: kept from an earlier start (%s)", name, model_dir)
        return model_dir
    return _timed(timings, name, fn)


def _claim(out: Path, profile: DemoProfile, seed: int) -> None:
    """Record which profile and seed ``out`` holds; refuse to mix another one's stages into it.

    Raises:
        ConfigError: ``out`` holds an earlier demo of another profile or seed.
    """
    from mmalign.runtime.checkpoint import atomic_write_text

    path = out / "profile.json"
    wanted = {"profile": asdict(profile), "seed": seed}
    if path.exists():
        found = json.loads(path.read_text())
        if found != wanted:
            raise ConfigError(
                f"{out} holds a demo of another profile or seed ({found.get('profile', {}).get('name')!r}, seed "
                f"{found.get('seed')}); give another --out, or remove it to start over"
            )
        return
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(wanted, indent=2) + "\n")


def run_demo(
    out: Path,
    *,
    quick: bool = False,
    seed: int = 0,
    processes: int | None = None,
    overrides: Sequence[str] = (),
) -> Path:
    """Run the whole pipeline into ``out``; returns the path of ``report.md``.

    Started again on the same ``out`` (same profile and seed), it keeps what an interrupted start finished: the
    world, the trained stages' final models and the evaluated alignment rows.

    Args:
        overrides: ``key=value`` changes of the profile's fields (``demo_profile``).
        processes: CPU processes for rendering the world's images and for the preference runs, which run side by
            side (default: two on a CPU with two or more cores, one for ``quick``, whose runs are too short to repay
            starting them). Pretraining and SFT run in this process with all its threads: packed rows gain from
            a second thread, a second data-parallel process does not (docs/results.md).

    Raises:
        ConfigError: a bad override, or ``out`` holding a demo of another profile or seed.
    """
    from mmalign.data.corpus import corpus_images, corpus_texts
    from mmalign.lab.report import write_report
    from mmalign.lab.world import write_world
    from mmalign.models.build import build_tiny, save_model
    from mmalign.models.families import DEFAULT_FAMILY, TinySize
    from mmalign.runtime.checkpoint import atomic_write_text

    profile = demo_profile("quick" if quick else "default", overrides)
    if processes is None:
        processes = 1 if quick else default_processes()
    _claim(out, profile, seed)
    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    world = out / "world"
    if not (world / "world.json").exists():
        _timed(timings, "world", lambda: write_world(profile.world_config(seed), world, processes=processes))

    def init() -> Path:
        model, processor = build_tiny(
            DEFAULT_FAMILY, corpus_texts([world]), size=TinySize(), seed=seed, calibration_images=corpus_images([world])
        )
        return save_model(model, processor, out / "models" / "init")

    vision_dir = out / "runs" / "vision" / "model"
    if profile.vision_steps and (vision_dir / "config.json").exists():
        init_dir = vision_dir
    else:
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

    def stage(name: str, model: Path, data: str, steps: int) -> Path:
        flags = {**common, "model": str(model), "data": str(world / data), "out": str(out / "runs" / name)}
        flags.update(steps=steps, log_every=10)
        return _resumable(
            timings, name, out / "runs" / name / "model", lambda: run_recipe(lab_recipe(name), flags, frozen_vision)
        )

    stage1 = stage("pretrain", init_dir, "captions.jsonl", profile.pretrain_steps)
    stage2 = stage("sft", stage1, "sft.jsonl", profile.sft_steps)

    (out / "eval").mkdir(parents=True, exist_ok=True)
    sft_eval, alignment = _alignment_stage(out, world, stage2, profile, seed, timings, processes)
    timings["total"] = time.perf_counter() - t_start

    results = {
        "profile": asdict(profile),
        "seed": seed,
        "processes": processes,
        **sft_eval,
        "alignment": alignment,
        "timings_s": timings,
    }
    report = write_report(out, results, world)
    # Written last and atomically: its presence marks the seed as finished for ``run_demo_seeds``.
    atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    return report


def parse_seeds(text: str) -> list[int]:
    """``0,1,2`` or ``0-4`` (or a mix) → distinct seeds in order.

    Raises:
        ConfigError: anything else.
    """
    seeds: list[int] = []
    try:
        for part in text.split(","):
            lo, sep, hi = part.strip().partition("-")
            seeds += list(range(int(lo), int(hi) + 1)) if sep else [int(lo)]
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: expected seeds like 0,1,2 or 0-2") from None
    if not seeds or any(s < 0 for s in seeds):
        raise ConfigError(f"--seeds {text!r}: expected non-negative seeds like 0,1,2 or 0-2")
    return list(dict.fromkeys(seeds))


def seed_dir(out: Path, seed: int) -> Path:
    return out / f"seed-{seed}"


def _demo_in_subprocess(out: Path, seed: int, quick: bool, overrides: Sequence[str], threads: int) -> None:
    """One seed's demo as its own ``mmalign demo`` process with ``threads`` threads (its log in ``out/demo.log``)."""
    import os
    import subprocess
    import sys

    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "mmalign.cli", "demo", "--seed", str(seed), "--out", str(out), *overrides]
    if quick:
        cmd.insert(4, "--quick")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with (out / "demo.log").open("a") as logf:
        done = subprocess.run(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        raise ConfigError(f"the demo of seed {seed} failed (exit {done.returncode}); see {out / 'demo.log'}")


def run_demo_seeds(
    out: Path,
    seeds: Sequence[int],
    *,
    quick: bool = False,
    processes: int | None = None,
    overrides: Sequence[str] = (),
    side_by_side: int | None = None,
) -> Path:
    """The demo for each seed (``out/seed-<s>``), then the summary over seeds: ``summary.json`` and ``report.md``.

    Each seed is a full draw (world, SFT model, every alignment row). A seed whose ``results.json`` exists is kept,
    so an interrupted run resumes (within a seed, ``run_demo`` keeps its finished stages and rows).

    Args:
        side_by_side: seeds run at once, each in its own process with an equal share of the cores' threads (default:
            one per two cores, so on 2 cores the seeds run one after another, each with both threads, and give the
            numbers ``mmalign demo --seed S`` gives).
    """
    import os

    from mmalign.lab.multiseed import paired_changes, plot_summary, seed_tables, summarize, summary_markdown
    from mmalign.runtime.checkpoint import atomic_write_text

    profile = demo_profile("quick" if quick else "default", overrides)
    cores = os.cpu_count() or 1
    side_by_side = side_by_side or max(1, min(len(seeds), cores // 2))
    for s in seeds:  # a kept seed must be a draw of this very profile: refuse before any work starts
        if (seed_dir(out, s) / "profile.json").exists():
            _claim(seed_dir(out, s), profile, s)
    todo = [s for s in seeds if not (seed_dir(out, s) / "results.json").exists()]
    t0 = time.perf_counter()
    if side_by_side <= 1:
        for s in todo:
            log.info("seed %d of %s", s, ",".join(map(str, seeds)))
            run_demo(seed_dir(out, s), quick=quick, seed=s, processes=processes, overrides=overrides)
    else:
        from concurrent.futures import ThreadPoolExecutor

        threads = max(1, cores // side_by_side)
        with ThreadPoolExecutor(side_by_side) as pool:
            for future in [
                pool.submit(_demo_in_subprocess, seed_dir(out, s), s, quick, overrides, threads) for s in todo
            ]:
                future.result()
    per_seed = {s: json.loads((seed_dir(out, s) / "results.json").read_text()) for s in seeds}
    tables = [seed_tables(per_seed[s]) for s in sorted(per_seed)]
    summary = summarize(per_seed, tables=tables)
    summary["profile"] = asdict(profile)
    summary["wall_s"] = time.perf_counter() - t0
    summary["seed_wall_s"] = {s: per_seed[s]["timings_s"].get("total") for s in seeds}
    mdpo_lines = []
    if {"dpo", "mdpo"} <= set(summary["rows"]):
        summary["mdpo_vs_dpo"] = paired_changes(tables, "mdpo", "dpo")
        mdpo_lines = _mdpo_vs_dpo_lines(summary["mdpo_vs_dpo"])
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    labels = {"sft": "SFT", "dpo": "+ DPO (oracle)", "mdpo": "+ mDPO", "dpo_no_image": "+ DPO, images removed"}
    plot_summary(summary, out / "summary.png", labels)
    lines = [
        f"# mmalign demo over {len(seeds)} seeds ({profile.name} profile)",
        "",
        *summary_markdown(summary, labels),
        "",
        *mdpo_lines,
        "![CHAIR_i, recall and adversarial F1 over seeds](summary.png)",
        "",
        "Each seed's own report: " + ", ".join(f"[seed {s}](seed-{s}/report.md)" for s in seeds) + ".",
        "",
        "| seed | wall time (s) |",
        "|---|---|",
        *[f"| {s} | {v:.0f} |" for s, v in summary["seed_wall_s"].items() if v is not None],
        "",
    ]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report


def _mdpo_vs_dpo_lines(changes: dict[str, Any]) -> list[str]:
    """mDPO against DPO on the same seeds and items (the mDPO paper's claim, reproduced or refuted), in words."""
    from mmalign.stats import Interval, describe_effect

    out = ["mDPO against DPO (paired):", ""]
    for key, label, unit in (
        ("chair_i_rel", "CHAIR_i, relative change", "%"),
        ("f1_adversarial", "F1 adversarial change", ""),
    ):
        e = changes[key]
        out.append(
            "- " + describe_effect(f"mDPO vs DPO, {label}", Interval(e["mean"], e["low"], e["high"], e["n"]), unit)
        )
    return [*out, ""]
