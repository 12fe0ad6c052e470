"""The demo's report: a markdown file with metric tables, hallucination analysis and PNG plots."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmalign.runtime.metrics import read_metrics

SPLITS = ("random", "popular", "adversarial")
PAIR_KIND_TEXT = {
    "removed": "a scene holding both members of a planted pair, redrawn without one of them, described truthfully "
    "against its original caption (which names the missing member)",
    "attribute": "a detailed caption against the same caption with an attribute swapped",
    "removed_existence": "on such a redrawn image, a yes/no question about either member against the wrong answer",
    "prior_tail": "a detailed caption against the same caption ending with one more sentence that names an absent "
    "object (a lone member's partner where there is one), as the training descriptions' invented tails do",
    "partner": "a detailed caption against the caption of the scene with a missing partner added",
    "existence": "a yes/no question about a present or absent object against the wrong answer",
}


def partner_share(
    chair: dict[str, Any], truth: dict[str, set[str]], partner: dict[str, str], shapes: Sequence[str]
) -> dict[str, Any]:
    """How many hallucinated mentions are the planted partner of an object truly in the image.

    Also returns the share expected by chance: for each hallucinated mention, the probability that an object drawn
    uniformly from the shapes absent from that image is a missing partner.

    Args:
        chair: a CHAIR result with ``per_caption`` entries (``image_id``, ``hallucinated``).
        truth: ground-truth objects per image id.
        partner: planted pair partner of each paired object.
        shapes: every object category of the world.
    """
    total = partnered = 0
    chance = 0.0
    for row in chair.get("per_caption", []):
        gt = truth.get(str(row["image_id"]), set())
        absent = [s for s in shapes if s not in gt]
        missing_partners = {partner[g] for g in gt if g in partner and partner[g] not in gt}
        for obj in row["hallucinated"]:
            total += 1
            partnered += obj in missing_partners
            chance += len(missing_partners) / max(1, len(absent))
    return {
        "hallucinated": total,
        "planted_partner": partnered,
        "share": partnered / total if total else 0.0,
        "chance_share": chance / total if total else 0.0,
    }


def _plot_losses(out: Path, runs: dict[str, Path]) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(4 * len(runs), 3.2))
    for ax, (name, run) in zip(axes, runs.items()):
        rows = read_metrics(run / "metrics.jsonl")
        if rows:
            ax.plot([r["step"] for r in rows], [r["loss"] for r in rows])
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / "loss_curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_pope(out: Path, pope: dict[str, dict[str, float]]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = [s for s in SPLITS if s in pope]
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    width = 0.38
    xs = range(len(splits))
    ax.bar([x - width / 2 for x in xs], [pope[s]["accuracy"] for s in splits], width, label="accuracy")
    ax.bar([x + width / 2 for x in xs], [pope[s]["f1"] for s in splits], width, label="F1")
    ax.set_xticks(list(xs), splits)
    ax.set_ylim(0, 1)
    ax.set_title("POPE after SFT")
    ax.legend(loc="lower left")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = out / "pope_splits.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _pope_rows(pope: dict[str, dict[str, float]]) -> list[str]:
    lines = ["| split | accuracy | precision | recall | F1 | yes ratio | n |", "|---|---|---|---|---|---|---|"]
    for split in SPLITS:
        if split in pope:
            r = pope[split]
            lines.append(
                f"| {split} | {r['accuracy']:.3f} | {r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} "
                f"| {r['yes_ratio']:.3f} | {r['n']} |"
            )
    return lines


def alignment_rows(results: dict[str, Any]) -> list[str]:
    """Markdown table comparing SFT with each preference run (POPE F1 per split, accuracy, CHAIR)."""
    rows = {"SFT": {"pope": results["pope"], "chair": results["chair"]}, **results.get("alignment", {})}
    base = results["chair"]["chair_i"]
    lines = [
        "| model | POPE acc (random) | F1 random | F1 popular | F1 adversarial | CHAIR_i | ΔCHAIR_i vs SFT "
        "| CHAIR_s | recall | mean length |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        p, c = r["pope"], r["chair"]
        rel = (c["chair_i"] - base) / base if base else 0.0
        lines.append(
            f"| {name} | {p['random']['accuracy']:.3f} | {p['random']['f1']:.3f} | {p['popular']['f1']:.3f} "
            f"| {p['adversarial']['f1']:.3f} | {c['chair_i']:.3f} | {100 * rel:+.0f}% | {c['chair_s']:.3f} "
            f"| {c['recall']:.3f} | {c['mean_length']:.1f} |"
        )
    return lines


def write_report(out: Path, results: dict[str, Any], world: Path) -> Path:
    """Write ``out/report.md`` (and its plots) from the demo's results."""
    from mmalign.eval.chair_score import ChairVocab
    from mmalign.eval.io import read_object_annotations
    from mmalign.lab.world import load_world_config

    cfg = load_world_config(world)
    vocab = ChairVocab.from_file(world / "chair_vocab.json")
    truth = read_object_annotations(world / "chair_annotations.jsonl", vocab)
    pope, chair = results["pope"], results["chair"]
    share = partner_share(chair, truth, cfg.partner, cfg.shapes)
    runs = {name: out / "runs" / name for name in ("pretrain", "sft")}
    _plot_losses(out, runs)
    _plot_pope(out, pope)
    gap = pope["random"]["f1"] - pope["adversarial"]["f1"]
    top = list(chair["hallucinated_objects"].items())[:5]
    lines = [
        f"# mmalign demo report ({results['profile']['name']} profile)",
        "",
        f"World: {cfg.n_train} training / {cfg.n_eval} held-out scenes at {cfg.image_size}px; planted pairs "
        f"{', '.join('/'.join(p) for p in cfg.pairs)} co-occur with p={cfg.pair_prob} in training and never in "
        "evaluation.",
        "",
        "## POPE after SFT (greedy generation, official parsing)",
        "",
        *_pope_rows(pope),
        "",
        f"Bias gap: F1(random) − F1(adversarial) = {gap:+.3f}.",
        "",
        "One-forward Yes/No logit fast path on the same questions:",
        "",
        *_pope_rows(results["pope_logits"]),
        "",
        '## CHAIR after SFT ("Describe the image in detail.")',
        "",
        "| CHAIR_i | CHAIR_s | recall | mean length (words) | captions | mentions |",
        "|---|---|---|---|---|---|",
        f"| {chair['chair_i']:.3f} | {chair['chair_s']:.3f} | {chair['recall']:.3f} | {chair['mean_length']:.1f} "
        f"| {chair['n']} | {chair['n_mentions']} |",
        "",
        "Top hallucinated objects: " + (", ".join(f"{k} ({v})" for k, v in top) or "none") + ".",
        "",
        f"{share['planted_partner']} of {share['hallucinated']} hallucinated mentions "
        f"({100 * share['share']:.0f}%) are the planted partner of an object that is in the image "
        f"(chance, drawing uniformly from each image's absent objects: {100 * share['chance_share']:.0f}%).",
        "",
        *(
            [
                "## Preference optimisation on world pairs (after SFT)",
                "",
                "Oracle pairs from the training scenes (`mmalign world pairs --kinds "
                f"{results['profile'].get('pair_kinds', 'removed,attribute,removed_existence')}`), a share each "
                "of: "
                + "; ".join(
                    PAIR_KIND_TEXT[k]
                    for k in results["profile"].get("pair_kinds", "removed,attribute,removed_existence").split(",")
                    if k in PAIR_KIND_TEXT
                )
                + ". `dpo_no_image` is DPO on the same pairs with the images removed.",
                "",
                *alignment_rows(results),
                "",
                "Pairs without annotators (BDHS, image-removed generations), online and mixed DPO, and mDPO on "
                f"BDHS pairs start from this SFT model in the alignment study: `mmalign study --demo {out}`.",
                "",
            ]
            if results.get("alignment")
            else []
        ),
        "## Plots",
        "",
        "![loss curves](loss_curves.png)",
        "",
        "![POPE per split](pope_splits.png)",
        "",
        "## Time per stage (seconds)",
        "",
        f"Processes for the world's images, the SFT evaluation and the preference runs: "
        f"{results.get('processes', 1)} (with more than one, the evaluation and the preference runs go side by "
        "side, so their own times overlap; `evaluation and alignment (wall)` is that stage's wall time).",
        "",
        "| stage | seconds |",
        "|---|---|",
        *[f"| {k} | {v:.1f} |" for k, v in results["timings_s"].items()],
        "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    results["partner_share"] = share
    return path
