"""Reward models on the synthetic world over seeds: plain vs fact-augmented, accuracy per pair kind on held-out scenes.

For each seed of a finished ``mmalign demo --seeds`` directory, oracle pairs (kinds ``partner``: an inserted object,
``partner_swap``: an object turned into the absent planted partner, same length, ``attribute``: a swapped colour or
shape, ``prior_tail``: an invented partner at the end of a true caption) are drawn
from the seed's world; the first ``--train-scenes`` training scenes train a reward model from the seed's SFT model,
the next ``--heldout-scenes`` are held out. Three reward models per seed, same pairs, same steps: plain,
fact-augmented (each pair's facts: the scene's objects) and critique (teacher-forced on the pairs' rule-written
critiques, writing its own at evaluation). Printed: held-out accuracy per kind, mean over seeds with a 95% interval
(two-level bootstrap: seeds, then pairs), and the paired differences facts − plain and critique − plain.

Usage: ``python benchmarks/reward_world.py --demo runs/demo3 --seeds 0,1,2 --out runs/rm_world``
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from mmalign.config import load_config
from mmalign.data.preference import load_pairs, write_pairs
from mmalign.eval.reward import pair_margins
from mmalign.lab.world.pairs import world_pairs
from mmalign.recipes import rm
from mmalign.stats import column_mean, difference, hierarchical_bootstrap

KINDS = ("partner", "partner_swap", "attribute", "prior_tail")  # --kinds may add omission
VARIANTS = {"plain": [], "facts": ["facts=true"], "critique": ["critique=true"]}


def seed_run(demo: Path, seed: int, out: Path, args: argparse.Namespace) -> dict[str, dict[str, np.ndarray]]:
    """Per kind, a table of held-out correctness (1 when the chosen reply scores higher) for each variant."""
    world, sft = demo / f"seed-{seed}" / "world", demo / f"seed-{seed}" / "runs" / "sft" / "model"
    pairs = world_pairs(world, seed=seed, kinds=args.kinds)
    ids = sorted({p.meta["image_id"] for p in pairs})
    train_ids = set(ids[: args.train_scenes])
    held_ids = set(ids[args.train_scenes : args.train_scenes + args.heldout_scenes])
    train_file, held_file = world / "rm_train.jsonl", world / "rm_heldout.jsonl"
    write_pairs([p for p in pairs if p.meta["image_id"] in train_ids], train_file)
    write_pairs([p for p in pairs if p.meta["image_id"] in held_ids], held_file)
    held = load_pairs(held_file).pairs
    correct: dict[str, np.ndarray] = {}
    for name in args.variants:
        extra = VARIANTS[name]
        run = out / f"seed-{seed}" / f"{name}-steps{args.steps}-lr{args.lr}-n{args.train_scenes}"
        t0 = time.perf_counter()
        if not (run / "model" / "reward.json").is_file():
            overrides = [f"steps={args.steps}", f"lr={args.lr}", "batch_size=16", "progress=false", f"seed={seed}"]
            cfg = load_config(
                rm.RewardConfig, flags={"model": str(sft), "data": str(train_file), "out": str(run)},
                overrides=[*overrides, *extra],
            )  # fmt: skip
            rm.train(cfg)
        margins = pair_margins(run / "model", held, str(held_file), progress=False)
        correct[name] = np.array([m > 0 for m in margins], dtype=float)
        print(f"seed {seed} {name}: {time.perf_counter() - t0:.0f} s, held-out accuracy {correct[name].mean():.3f}")
    kinds = np.array([p.meta["kind"] for p in held])
    tables = {"all": correct}
    for kind in args.kinds:
        if (kinds == kind).any():
            tables[kind] = {name: values[kinds == kind] for name, values in correct.items()}
    return tables


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", required=True, help="`mmalign demo --seeds` output: seed-S/world, seed-S/runs/sft")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", default="runs/rm_world")
    parser.add_argument("--train-scenes", type=int, default=1200)
    parser.add_argument("--heldout-scenes", type=int, default=400)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--kinds", default=",".join(KINDS), help="oracle pair kinds, in rotation over the scenes")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="reward models to train: plain,facts,critique")
    args = parser.parse_args()
    args.kinds, args.variants = tuple(args.kinds.split(",")), tuple(args.variants.split(","))
    out = Path(args.out)
    seeds = [int(s) for s in args.seeds.split(",")]
    tables = {s: seed_run(Path(args.demo), s, out, args) for s in seeds}
    diffs = [f"{v} − plain" for v in ("facts", "critique") if v in args.variants and "plain" in args.variants]
    columns = [*args.variants, *diffs]
    lines = ["| held-out pairs | n per seed | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    summary = {}
    for kind in (*args.kinds, "all"):
        per_seed = [tables[s][kind] for s in seeds if kind in tables[s]]
        stats = {name: hierarchical_bootstrap(per_seed, column_mean(name)) for name in args.variants}
        for name in [v for v in ("facts", "critique") if v in args.variants and "plain" in args.variants]:
            change = difference(column_mean(name), column_mean("plain"))
            stats[f"{name} - plain"] = hierarchical_bootstrap(per_seed, change)
        summary[kind] = {k: v.to_dict() for k, v in stats.items()}
        n = "/".join(str(len(t["plain"])) for t in per_seed)
        cells = [f"{v.mean:.3f} [{v.low:.3f}, {v.high:.3f}]" for v in stats.values()]
        lines.append(f"| {kind} | {n} | {' | '.join(cells)} |")
    print("\n".join(lines))
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
