"""Reward, reply length and KL curves of RL runs (``mmalign train rl`` metrics), each line the mean over the runs a
pattern matches (seeds), side by side: how reward hacking looks.

Usage: ``python benchmarks/rl_curves.py --out docs/img/rl_hacking.png "KL off=runs/rl_study/seed-*/grpo-rm-nokl"
"KL 0.05=runs/rl_study/seed-*/grpo-rm" "ground truth=runs/rl_study/seed-*/grpo-world"``
"""

from __future__ import annotations

import argparse
import glob
import json
from pathlib import Path

KEYS = (
    ("reward", "reward (judge + symbolic)"),
    ("completions/mean_length", "reply tokens"),
    ("kl", "KL to SFT (nats)"),
)


def plot(runs: dict[str, list[Path]], path: Path) -> Path:
    """One line per label: each metric's mean over its runs at every logged step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(KEYS), figsize=(5 * len(KEYS), 3.6))
    for n, (name, dirs) in enumerate(runs.items()):
        logs = [[json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in dirs]
        steps = [r["step"] for r in logs[0]]
        for ax, (key, _) in zip(axes, KEYS):
            if all(key in log[0] for log in logs):
                mean = [sum(log[i][key] for log in logs) / len(logs) for i in range(len(steps))]
                ax.plot(steps, mean, label=name, color=f"C{n}")  # one colour per line in every panel
    for ax, (_, title) in zip(axes, KEYS):
        ax.set_title(title)
        ax.set_xlabel("step")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("lines", nargs="+", help="LABEL=GLOB of run directories (each holding metrics.jsonl)")
    ap.add_argument("--out", default="runs/rl_curves.png")
    args = ap.parse_args()
    runs: dict[str, list[Path]] = {}
    for line in args.lines:
        label, _, pattern = line.partition("=")
        found = sorted(Path(p) for p in glob.glob(pattern) if (Path(p) / "metrics.jsonl").is_file())
        if not found:
            raise SystemExit(f"{line!r}: no run directory with a metrics.jsonl matches {pattern!r}")
        runs[label] = found
        print(f"{label}: {len(found)} runs")
    print(f"wrote {plot(runs, Path(args.out))}")


if __name__ == "__main__":
    main()
