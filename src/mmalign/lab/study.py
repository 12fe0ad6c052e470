"""``mmalign study``: the alignment study's grid on the world, from one SFT model, same prompts, same budget.

Rows (Amirloo et al., "Understanding Alignment in Multimodal LLMs", reproduced on the synthetic world):

* SFT — the starting point;
* DPO on oracle pairs — chosen = ground-truth caption, rejected = a planted partner inserted or an attribute swapped;
* DPO on BDHS pairs — the same prompts and chosen captions, rejected written by the SFT model under image-attention
  masking (no ground-truth rejected answer anywhere);
* DPO on image-removed generations — the same, with the image removed instead of masked;
* online DPO — two samples per prompt from the current policy, ranked by the world's rule judge;
* mixed DPO — per example, the oracle pair with probability 0.5, else an online pair;
* mDPO on BDHS pairs.

Every preference run starts from the same SFT model, sees the same training prompts (the first ``prompts`` scenes of
the world's caption oracle pairs) and has the same steps, batch, learning rate, β and RPO weight (those of the demo
profile).
Columns: POPE F1 on the three splits, CHAIR_i, CHAIR_s, object recall (the helpfulness proxy: how many true objects
the captions name) and mean caption length. The study reuses an earlier ``mmalign demo`` output directory (its world,
SFT model and SFT evaluation) or runs the demo first.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmalign.runtime.launch import default_processes, run_side_by_side

log = logging.getLogger(__name__)

SPLITS = ("random", "popular", "adversarial")
ROWS = (
    ("sft", "SFT"),
    ("dpo_oracle", "DPO, oracle pairs"),
    ("dpo_bdhs", "DPO, BDHS pairs"),
    ("dpo_no_image", "DPO, image-removed generations"),
    ("online_dpo", "online DPO"),
    ("mixed_dpo", "mixed DPO (p = 0.5)"),
    ("mdpo_bdhs", "mDPO, BDHS pairs"),
)


# Oracle pair kinds whose prompt is the describe request on the scene's own image (``mmalign.lab.world.pairs``).
CAPTION_KINDS = ("prior_tail", "partner", "attribute")


def prompts_from_pairs(pairs_file: Path, out: Path, limit: int) -> Path:
    """The oracle pairs' prompts and chosen captions as SFT-style samples (the BDHS and online-DPO inputs)."""
    rows = []
    for line in pairs_file.read_text(encoding="utf-8").splitlines()[:limit]:
        pair = json.loads(line)
        rows.append(
            {
                "id": pair["id"],
                "images": pair["images"],
                "messages": [
                    *pair["prompt"],
                    {"role": "assistant", "content": [{"type": "text", "text": pair["chosen"]}]},
                ],
                "meta": {"objects": pair.get("objects", [])},
            }
        )
    out.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return out


def demo_profile_of(demo: dict[str, Any], source: Path) -> Any:
    """The ``DemoProfile`` a demo's ``results.json`` records.

    Raises:
        ConfigError: the record lacks fields of the present profile or has fields it does not know (a demo run by
            another version of mmalign, whose world the present defaults would not describe).
    """
    from dataclasses import fields

    from mmalign.errors import ConfigError
    from mmalign.lab.demo import DemoProfile

    recorded = demo.get("profile")
    if not isinstance(recorded, dict):
        raise ConfigError(f"{source}: no 'profile' record; run `mmalign demo` into a new directory")
    known = {f.name for f in fields(DemoProfile)}
    missing, unknown = sorted(known - set(recorded)), sorted(set(recorded) - known)
    if missing or unknown:
        raise ConfigError(
            f"{source}: its profile was written by another version of mmalign (missing fields: "
            f"{', '.join(missing) or 'none'}; unknown fields: {', '.join(unknown) or 'none'}); run `mmalign demo` "
            "into a new directory"
        )
    return DemoProfile(**recorded)


def _row(result: dict[str, Any]) -> dict[str, float]:
    chair = result["chair"]
    row = {f"f1_{s}": result["pope"][s]["f1"] for s in SPLITS}
    row.update(chair_i=chair["chair_i"], chair_s=chair["chair_s"], recall=chair["recall"], length=chair["mean_length"])
    return row


def study_table(results: dict[str, dict[str, Any]]) -> list[str]:
    """Markdown rows of the study table."""
    lines = [
        "| run | F1 random | F1 popular | F1 adversarial | CHAIR_i | CHAIR_s | recall (helpfulness) | mean length |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, label in ROWS:
        if key in results:
            r = _row(results[key])
            lines.append(
                f"| {label} | {r['f1_random']:.3f} | {r['f1_popular']:.3f} | {r['f1_adversarial']:.3f} | "
                f"{r['chair_i']:.3f} | {r['chair_s']:.3f} | {r['recall']:.3f} | {r['length']:.1f} |"
            )
    return lines


def gap_closed(results: dict[str, dict[str, Any]], run: str = "dpo_bdhs") -> float | None:
    """Share of the SFT → oracle-DPO CHAIR_i reduction that ``run`` achieves (1 = all of it)."""
    try:
        sft = results["sft"]["chair"]["chair_i"]
        oracle = results["dpo_oracle"]["chair"]["chair_i"]
        other = results[run]["chair"]["chair_i"]
    except KeyError:
        return None
    gap = sft - oracle
    return (sft - other) / gap if gap > 0 else None


def _plot(out: Path, results: dict[str, dict[str, Any]]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k, _ in ROWS if k in results]
    labels = [dict(ROWS)[k] for k in keys]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    axes[0].barh(labels, [results[k]["chair"]["chair_i"] for k in keys], color="tab:red")
    axes[0].set_xlabel("CHAIR_i (lower is better)")
    axes[0].invert_yaxis()
    axes[1].barh(labels, [results[k]["pope"]["adversarial"]["f1"] for k in keys], color="tab:blue")
    axes[1].set_xlabel("POPE adversarial F1 (higher is better)")
    axes[1].invert_yaxis()
    axes[1].set_yticklabels([])
    fig.tight_layout()
    path = out / "study.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_study(
    out: Path,
    *,
    demo_dir: Path | None = None,
    quick: bool = False,
    seed: int = 0,
    prompts: int | None = None,
    processes: int | None = None,
    overrides: Sequence[str] = (),
) -> Path:
    """Run the grid into ``out``; returns ``out/study.md``.

    The preference runs take the profile of the demo they start from (``overrides`` apply when the study runs the
    demo itself) and the demo's seed.

    Every preference run sees the same ``prompts`` training scenes (default: 800, quick: 80): the oracle pairs'
    prompts, the BDHS and image-removed pairs written for them, the online runs' prompts. Finished rows are kept in
    ``out/study.json`` after each run and skipped when the study is started again (BDHS files continue too).
    ``processes`` rows run side by side (default: as ``mmalign demo``: two on a CPU with two or more cores, one for
    ``quick``).
    """
    from mmalign.data.preference import write_pairs
    from mmalign.generation.bdhs import BdhsConfig
    from mmalign.generation.bdhs_run import run_bdhs
    from mmalign.generation.embed import SentenceEmbedder
    from mmalign.lab.demo import run_demo, train_and_evaluate
    from mmalign.lab.world.pairs import world_pairs
    from mmalign.models.load import load_model
    from mmalign.runtime.checkpoint import atomic_write_text

    if processes is None:
        processes = 1 if quick else default_processes()
    out.mkdir(parents=True, exist_ok=True)
    demo_dir = demo_dir or out / "demo"
    if not (demo_dir / "results.json").exists():
        run_demo(demo_dir, quick=quick, seed=seed, processes=processes, overrides=overrides)
    demo = json.loads((demo_dir / "results.json").read_text())
    # The preference runs take the demo's own profile (its steps, batch, learning rate, β, pair kinds).
    profile = demo_profile_of(demo, demo_dir / "results.json")
    seed = demo.get("seed", seed)
    world, sft_model = demo_dir / "world", demo_dir / "runs" / "sft" / "model"
    n_prompts = prompts or (80 if quick else 800)
    state_file = out / "study.json"
    setup = {"prompts": n_prompts, "seed": seed, "sft_model": str(sft_model)}
    results: dict[str, Any] = json.loads(state_file.read_text()) if state_file.exists() else {}
    if results and results.get("_setup") != setup:
        log.warning("%s was made with other settings; starting the study over", state_file)
        results = {}
        for name in ("bdhs", "no_image"):
            for path in (world / f"study_{name}_pairs.jsonl", world / f"study_{name}_pairs.jsonl.stats.json"):
                path.unlink(missing_ok=True)
    results["_setup"] = setup
    results["sft"] = {"pope": demo["pope"], "chair": demo["chair"]}
    timings: dict[str, float] = results.setdefault("_timings_s", {})

    def save() -> None:
        atomic_write_text(state_file, json.dumps(results, indent=2) + "\n")

    # Caption pairs on the training images only (the profile's caption kinds, else partner and attribute), so that
    # every row learns from the same describe prompts.
    oracle_pairs = world / "study_oracle_pairs.jsonl"
    kinds = tuple(k for k in profile.pair_kinds.split(",") if k in CAPTION_KINDS) or CAPTION_KINDS[1:]
    write_pairs(world_pairs(world, seed=seed, max_scenes=n_prompts, kinds=kinds), oracle_pairs)
    prompt_file = prompts_from_pairs(oracle_pairs, world / "study_prompts.jsonl", n_prompts)
    pair_files = {}
    loaded = None
    for name, corruption in (("bdhs", "mask"), ("no_image", "remove")):
        pair_files[name] = world / f"study_{name}_pairs.jsonl"
        if name in results.get("_bdhs", {}):
            continue
        if loaded is None:
            loaded, embedder = load_model(sft_model), SentenceEmbedder()
        t0 = time.perf_counter()
        cfg = BdhsConfig(corruption=corruption, seed=seed, max_new_tokens=24)
        made = run_bdhs(loaded.model, loaded.processor, prompt_file, pair_files[name], cfg, embedder=embedder)
        timings[f"pairs {name}"] = time.perf_counter() - t0
        results.setdefault("_bdhs", {})[name] = {"accepted_by_iteration": made.accepted_by_iteration}
        save()
    common = {
        "model": str(sft_model),
        "steps": profile.dpo_steps,
        "lr": profile.dpo_lr,
        "beta": profile.dpo_beta,
        "rpo_alpha": profile.dpo_rpo_alpha,
        "seed": seed,
        "log_every": 10,
    }
    freeze = ["freeze.vision=true", "freeze.projector=true", "freeze.llm=false"]
    runs: dict[str, tuple[str, dict[str, Any], list[str]]] = {
        "dpo_oracle": ("dpo", {"data": str(oracle_pairs)}, []),
        "dpo_bdhs": ("dpo", {"data": str(pair_files["bdhs"])}, []),
        "dpo_no_image": ("dpo", {"data": str(pair_files["no_image"])}, []),
        "mdpo_bdhs": ("dpo", {"data": str(pair_files["bdhs"])}, ["loss=mdpo"]),
        "online_dpo": ("online-dpo", {"data": str(prompt_file)}, [f"world={world}"]),
        "mixed_dpo": (
            "online-dpo",
            {"data": str(prompt_file)},
            [f"world={world}", f"offline_data={oracle_pairs}", "mix_p=0.5"],
        ),
    }
    jobs = {
        name: (recipe, name, {**common, **flags, "out": str(out / "runs" / name), "progress": processes <= 1},
               freeze + overrides, world, profile.chair_max_new_tokens)
        for name, (recipe, flags, overrides) in runs.items()
        if name not in results
    }  # fmt: skip
    # The rows are independent: with several processes they run side by side, one thread each (same numbers).
    for name, (row, row_timings) in run_side_by_side(train_and_evaluate, jobs, processes):
        results[name], timings[name] = row, row_timings[name]
        save()
    # The demo's key shape (``pope``, ``chair``, ``alignment.<row>.pope|chair``) for tools that read one seed.
    rows = {k: v for k, v in results.items() if not k.startswith("_") and k != "sft"}
    shaped = {"seed": seed, "profile": demo["profile"], **results["sft"], "alignment": rows, "timings_s": timings}
    atomic_write_text(out / "results.json", json.dumps(shaped, indent=2) + "\n")
    closed = gap_closed(results)
    report_lines = [
        "# The alignment study on the world",
        "",
        f"{n_prompts} training prompts, {profile.dpo_steps} steps per run, from `{sft_model}`.",
        "",
        *study_table(results),
        "",
    ]
    if closed is not None:
        report_lines.append(
            f"DPO on BDHS pairs closes {closed:.0%} of the CHAIR_i gap between SFT and DPO on oracle pairs."
        )
    for name, info in results["_bdhs"].items():
        rates = ", ".join(f"{r:.0%}" for r in info["accepted_by_iteration"])
        report_lines.append(f"BDHS ({name}) accepted after each iteration: {rates}.")
    report_lines.append("")
    report_lines.append("| stage | seconds |")
    report_lines.append("|---|---|")
    report_lines += [f"| {k} | {v:.0f} |" for k, v in timings.items()]
    report_lines += ["", f"![study]({_plot(out, results).name})", ""]
    report = out / "study.md"
    report.write_text("\n".join(report_lines) + "\n")
    return report


def run_study_seeds(
    out: Path,
    seeds: Sequence[int],
    *,
    demo_dir: Path | None = None,
    quick: bool = False,
    prompts: int | None = None,
    processes: int | None = None,
    overrides: Sequence[str] = (),
) -> Path:
    """The study for each seed (``out/seed-<s>``, from ``demo_dir/seed-<s>`` of ``mmalign demo --seeds`` or a demo it
    runs itself), then ``out/summary.json`` and ``out/study.md``: every row's figures over seeds with 95% intervals,
    paired changes against the same seed's SFT model, and the share of the SFT → oracle-DPO CHAIR_i gap that the
    rows without ground-truth rejections close. Finished seeds and rows are kept when started again."""
    from mmalign.lab.multiseed import gap_closed as gap_over_seeds
    from mmalign.lab.multiseed import plot_summary, seed_tables, summarize, summary_markdown
    from mmalign.runtime.checkpoint import atomic_write_text

    t0 = time.perf_counter()
    per_seed = {}
    for s in seeds:
        own = out / f"seed-{s}"
        demo = demo_dir / f"seed-{s}" if demo_dir else own / "demo"
        run_study(own, demo_dir=demo, quick=quick, seed=s, prompts=prompts, processes=processes, overrides=overrides)
        state = json.loads((own / "study.json").read_text())
        order = [k for k, _ in ROWS if k in state]  # the table's row order, not the order the rows finished in
        per_seed[s] = {**{k: state[k] for k in order}, **{k: v for k, v in state.items() if k not in order}}
    tables = [seed_tables(per_seed[s]) for s in sorted(per_seed)]
    summary = summarize(per_seed, tables=tables)
    summary["gap_closed"] = {row: gap_over_seeds(tables, row) for row in ("dpo_bdhs", "dpo_no_image", "mdpo_bdhs",
                                                                            "online_dpo", "mixed_dpo")
                             if row in summary["rows"]}  # fmt: skip
    summary["wall_s"] = time.perf_counter() - t0
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    labels = dict(ROWS)
    plot_summary(summary, out / "study.png", labels)
    lines = [f"# The alignment study on the world, {len(seeds)} seeds", "", *summary_markdown(summary, labels), ""]
    lines += ["Share of the SFT → oracle-DPO CHAIR_i gap closed (mean [95% interval]; per seed):", ""]
    for row, e in summary["gap_closed"].items():
        per = " / ".join(f"{v:.0%}" if v == v else "no gap" for v in e["per_seed"])
        lines.append(f"- {labels[row]}: {e['mean']:.0%} [{e['low']:.0%}, {e['high']:.0%}] ({per})")
    lines += ["", "![study over seeds](study.png)", ""]
    report = out / "study.md"
    report.write_text("\n".join(lines) + "\n")
    return report
