"""Quality figures over several seeds: per-seed values, means with 95% intervals, and paired changes.

Each seed is a full draw (world, SFT model, every alignment row), evaluated on its own held-out captions and POPE
questions. A figure is reported as the mean over seeds with a two-level bootstrap interval (seeds drawn with
replacement, then captions or questions within each drawn seed; ``mmalign.stats.hierarchical_bootstrap``). A row's
change against SFT is *paired*: the same seed's SFT model, the same captions' images and the same questions, resampled
together, so the interval reflects the change itself and not the spread between seeds.

Inputs are ``results.json`` dictionaries of ``mmalign demo`` (``pope``, ``chair``, ``alignment.<row>``) or of the
study (``<row>.pope``, ``<row>.chair``): each row's CHAIR result carries ``per_caption`` counts and each POPE split
its per-question ``items``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mmalign.stats import (
    Interval,
    Table,
    accuracy,
    binary_f1,
    column_mean,
    describe_effect,
    difference,
    hierarchical_bootstrap,
    ratio,
    relative_change,
)

SPLITS = ("random", "popular", "adversarial")
CAPTION_COLUMNS = ("n_mentions", "n_hallucinated", "n_truth", "n_correct", "n_words")

Statistic = Callable[[Table], float]


@dataclass(frozen=True)
class Metric:
    """One reported figure: a label, the unit it is computed on (``captions`` or ``questions``), how to compute it
    from a row's columns, and whether the report shows it as a percentage."""

    key: str
    label: str
    unit: str
    of_row: Callable[[str], Statistic]
    percent: bool = False


def _chair_i(row: str) -> Statistic:
    return ratio(f"{row}.n_hallucinated", f"{row}.n_mentions")


def _chair_s(row: str) -> Statistic:
    return column_mean(f"{row}.any_hallucinated")


def _recall(row: str) -> Statistic:
    return ratio(f"{row}.n_correct", f"{row}.n_truth")


def _length(row: str) -> Statistic:
    return column_mean(f"{row}.n_words")


def _acc(split: str) -> Callable[[str], Statistic]:
    return lambda row: accuracy(f"{row}.{split}.label", f"{row}.{split}.pred")


def _f1(split: str) -> Callable[[str], Statistic]:
    return lambda row: binary_f1(f"{row}.{split}.label", f"{row}.{split}.pred")


def _f1_gap(row: str) -> Statistic:
    return difference(_f1("random")(row), _f1("adversarial")(row))


METRICS: tuple[Metric, ...] = (
    Metric("pope_acc_random", "POPE acc random", "questions", _acc("random")),
    Metric("f1_random", "F1 random", "questions", _f1("random")),
    Metric("f1_popular", "F1 popular", "questions", _f1("popular")),
    Metric("f1_adversarial", "F1 adversarial", "questions", _f1("adversarial")),
    Metric("f1_gap", "F1 gap (random − adversarial)", "questions", _f1_gap),
    Metric("chair_i", "CHAIR_i", "captions", _chair_i),
    Metric("chair_s", "CHAIR_s", "captions", _chair_s),
    Metric("recall", "recall", "captions", _recall),
    Metric("length", "length (words)", "captions", _length),
)
METRIC_BY_KEY = {m.key: m for m in METRICS}

# Paired changes of a row against a baseline row: (key, label, metric, relative?). Relative changes are
# ``row / base − 1``; the others are differences in the metric's own unit.
CHANGES: tuple[tuple[str, str, str, bool], ...] = (
    ("chair_i_rel", "CHAIR_i, relative change", "chair_i", True),
    ("chair_s", "CHAIR_s change", "chair_s", False),
    ("recall", "recall change", "recall", False),
    ("pope_acc_random", "POPE random accuracy change", "pope_acc_random", False),
    ("f1_adversarial", "F1 adversarial change", "f1_adversarial", False),
    ("f1_gap_rel", "F1 gap, relative change", "f1_gap", True),
    ("length", "length change (words)", "length", False),
)


def rows_of(results: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """Row name → ``{"pope", "chair"}`` of one seed's results (demo: ``sft`` and ``alignment.*``; study: its rows)."""
    if "alignment" in results and "chair" in results:
        return {"sft": results, **results["alignment"]}
    return {k: v for k, v in results.items() if not k.startswith("_") and isinstance(v, Mapping) and "chair" in v}


def seed_tables(results: Mapping[str, Any]) -> dict[str, Table]:
    """One seed's per-item tables: ``captions`` (one row per held-out caption, columns ``<row>.<count>``) and
    ``questions`` (one row per POPE question index, columns ``<row>.<split>.label|pred``).

    Rows are joined by position: every model of a seed captions the same images in the same order and answers the
    same questions, so resampling a position resamples that item for every model at once (a paired bootstrap).

    Raises:
        ValueError: a row without per-item data, or rows whose item counts differ.
    """
    captions: dict[str, np.ndarray] = {}
    questions: dict[str, np.ndarray] = {}
    for name, row in rows_of(results).items():
        per_caption = row["chair"].get("per_caption")
        if not per_caption or "n_mentions" not in per_caption[0]:
            raise ValueError(f"row {name!r} has no per-caption counts (results written by an older mmalign)")
        for col in CAPTION_COLUMNS:
            captions[f"{name}.{col}"] = np.array([c[col] for c in per_caption], dtype=np.float64)
        captions[f"{name}.any_hallucinated"] = (captions[f"{name}.n_hallucinated"] > 0).astype(np.float64)
        for split in SPLITS:
            items = row["pope"][split].get("items")
            if items is None:
                raise ValueError(f"row {name!r}, POPE {split}: no per-question items")
            for col in ("label", "pred"):
                questions[f"{name}.{split}.{col}"] = np.frombuffer(items[col].encode(), dtype=np.uint8) - ord("0")
    for unit, table in (("captions", captions), ("questions", questions)):
        lengths = {len(v) for v in table.values()}
        if len(lengths) > 1:
            raise ValueError(f"{unit}: the rows of one seed hold different numbers of items ({sorted(lengths)})")
    return {"captions": captions, "questions": questions}


def _interval(tables: Sequence[Mapping[str, Table]], unit: str, stat: Statistic, n_boot: int) -> Interval:
    return hierarchical_bootstrap([t[unit] for t in tables], stat, n_boot=n_boot, seed=0)


def summarize(
    per_seed: Mapping[int, Mapping[str, Any]],
    baseline: str = "sft",
    n_boot: int = 2000,
    tables: Sequence[Mapping[str, Table]] | None = None,
) -> dict[str, Any]:
    """Means, intervals and paired changes over seeds.

    Args:
        per_seed: seed → that seed's ``results.json`` content.
        baseline: the row every other row is compared with.
        n_boot: bootstrap replicates per interval.
        tables: ``seed_tables`` of each seed in seed order, when the caller has them already.

    Returns:
        ``{"seeds", "rows": {row: {metric: {"per_seed": [...], "mean", "low", "high", "n"}}},
        "changes": {row: {change: {...}}}}`` (changes against ``baseline``, per seed and with the interval).
    """
    seeds = sorted(per_seed)
    tables = tables if tables is not None else [seed_tables(per_seed[s]) for s in seeds]
    names = list(rows_of(per_seed[seeds[0]]))
    rows: dict[str, Any] = {}
    for name in names:
        rows[name] = {}
        for m in METRICS:
            stat = m.of_row(name)
            interval = _interval(tables, m.unit, stat, n_boot)
            rows[name][m.key] = {"per_seed": [stat(t[m.unit]) for t in tables], **interval.to_dict()}
    changes = {name: paired_changes(tables, name, baseline, n_boot) for name in names if name != baseline}
    return {"seeds": seeds, "baseline": baseline, "rows": rows, "changes": changes}


def paired_changes(
    tables: Sequence[Mapping[str, Table]], row: str, base: str, n_boot: int = 2000
) -> dict[str, dict[str, Any]]:
    """Every ``CHANGES`` entry of ``row`` against ``base`` (same seeds, same items): per seed, mean and interval."""
    out: dict[str, dict[str, Any]] = {}
    for key, _label, metric, relative in CHANGES:
        m = METRIC_BY_KEY[metric]
        stat = (relative_change if relative else difference)(m.of_row(row), m.of_row(base))
        interval = _interval(tables, m.unit, stat, n_boot)
        out[key] = {"per_seed": [stat(t[m.unit]) for t in tables], **interval.to_dict()}
    return out


def gap_closed(tables: Sequence[Mapping[str, Table]], row: str, n_boot: int = 2000) -> dict[str, Any]:
    """Share of the SFT → oracle-DPO CHAIR_i reduction that ``row`` achieves: (SFT − row) / (SFT − oracle), per seed
    and over seeds (nan in a seed whose oracle run did not lower CHAIR_i: there is no gap to close)."""
    sft, oracle, other = _chair_i("sft"), _chair_i("dpo_oracle"), _chair_i(row)

    def closed(t: Table) -> float:
        gap = sft(t) - oracle(t)
        return (sft(t) - other(t)) / gap if gap > 0 else float("nan")

    per_seed = [closed(t["captions"]) for t in tables]
    finite = [i for i, v in enumerate(per_seed) if np.isfinite(v)]
    if not finite:
        return {"per_seed": per_seed, "mean": float("nan"), "low": float("nan"), "high": float("nan"), "n": 0}
    interval = _interval([tables[i] for i in finite], "captions", closed, n_boot)
    return {"per_seed": per_seed, **interval.to_dict()}


def _fmt(value: float, percent: bool) -> str:
    if not np.isfinite(value):
        return "n/a"
    return f"{100 * value:+.0f}%" if percent else f"{value:.3f}"


def _cell(entry: Mapping[str, Any], percent: bool = False) -> str:
    """``mean [low, high]``."""
    return f"{_fmt(entry['mean'], percent)} [{_fmt(entry['low'], percent)}, {_fmt(entry['high'], percent)}]"


def summary_markdown(summary: Mapping[str, Any], labels: Mapping[str, str] | None = None) -> list[str]:
    """The report's tables: every metric of every row (mean [95% interval] and per-seed values), then every paired
    change against the baseline with a sentence saying whether it is distinguishable from zero."""
    labels = labels or {}
    seeds = summary["seeds"]
    lines = [
        f"Seeds {', '.join(map(str, seeds))}: mean [95% interval: seeds, then captions or questions within a seed, "
        "resampled]; per-seed values below each table.",
        "",
        "| row | " + " | ".join(m.label for m in METRICS) + " |",
        "|---|" + "---|" * len(METRICS),
    ]
    for name, metrics in summary["rows"].items():
        lines.append(f"| {labels.get(name, name)} | " + " | ".join(_cell(metrics[m.key]) for m in METRICS) + " |")
    lines += ["", "Per seed (" + ", ".join(map(str, seeds)) + "):", ""]
    lines += ["| row | " + " | ".join(m.label for m in METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    for name, metrics in summary["rows"].items():
        cells = [" / ".join(f"{v:.3f}" for v in metrics[m.key]["per_seed"]) for m in METRICS]
        lines.append(f"| {labels.get(name, name)} | " + " | ".join(cells) + " |")
    base = labels.get(summary["baseline"], summary["baseline"])
    lines += ["", f"Paired changes against {base} (same seed, same items):", ""]
    lines += ["| row | " + " | ".join(c[1] for c in CHANGES) + " |", "|---|" + "---|" * len(CHANGES)]
    for name, changes in summary["changes"].items():
        cells = [_cell(changes[key], percent=relative) for key, _, _, relative in CHANGES]
        lines.append(f"| {labels.get(name, name)} | " + " | ".join(cells) + " |")
    lines.append("")
    for name, changes in summary["changes"].items():
        for key, label, _, relative in CHANGES:
            if key in ("chair_i_rel", "recall", "pope_acc_random", "f1_gap_rel"):
                entry = changes[key]
                interval = Interval(entry["mean"], entry["low"], entry["high"], entry["n"])
                lines.append(
                    "- "
                    + describe_effect(f"{labels.get(name, name)} vs {base}, {label}", interval, "%" if relative else "")
                )
    return lines


def plot_summary(summary: Mapping[str, Any], path: Any, labels: Mapping[str, str] | None = None) -> Any:
    """Bar charts of CHAIR_i and POPE adversarial F1 per row: the mean over seeds with its 95% interval as error
    bars, and each seed's value as a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = labels or {}
    names = list(summary["rows"])
    fig, axes = plt.subplots(1, 3, figsize=(14, 0.5 * len(names) + 2.2))
    for ax, key, colour in zip(axes, ("chair_i", "recall", "f1_adversarial"), ("tab:red", "tab:green", "tab:blue")):
        entries = [summary["rows"][n][key] for n in names]
        means = np.array([e["mean"] for e in entries])
        err = np.array([[e["mean"] - e["low"], e["high"] - e["mean"]] for e in entries]).T
        ys = np.arange(len(names))
        ax.barh(ys, means, xerr=np.nan_to_num(err), color=colour, alpha=0.6, capsize=4)
        for y, e in zip(ys, entries):
            ax.plot(e["per_seed"], [y] * len(e["per_seed"]), "k.", markersize=5)
        ax.set_yticks(ys, [labels.get(n, n) for n in names] if ax is axes[0] else [""] * len(names))
        ax.invert_yaxis()
        ax.set_xlabel(METRIC_BY_KEY[key].label + " (mean, 95% interval; dots: seeds)")
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
