"""GRPO on the synthetic world over seeds: does RL with a reward model cut hallucination against the SFT model?

For each seed of a finished ``mmalign demo --seeds`` directory (its world and SFT model) and a reward model of that
seed (``benchmarks/reward_world.py``'s plain model), ``mmalign train rl --algo grpo`` runs on the world's describe
requests with, as the judge, (a) the reward model (``rm:DIR``) and (b) the world's ground-truth rule judge (an upper
bound: it counts invented and missed objects exactly). Each model, and the SFT model, captions the held-out scenes;
printed: CHAIR_i, recall and mean length, the change against the same seed's SFT model, mean over seeds with a 95%
t-interval.

Usage: ``python benchmarks/rl_world.py --demo runs/demo3 --rm runs/rm_world --seeds 0,1,2 --out runs/rl_world``
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from mmalign.config import load_config
from mmalign.data.loaders import iter_jsonl
from mmalign.eval.chair import evaluate_chair
from mmalign.models.load import load_model
from mmalign.recipes import rl
from mmalign.stats import mean_interval


def _chair(model_dir: Path, world: Path, limit: int) -> dict[str, float]:
    loaded = load_model(model_dir)
    r = evaluate_chair(loaded.model.eval(), loaded.processor, world, max_new_tokens=80, limit=limit, progress=False)
    return {"chair_i": r["chair_i"], "recall": r["recall"], "length": r["mean_length"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", required=True)
    ap.add_argument("--rm", required=True, help="reward_world.py output: seed-S/plain-*/model")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", default="runs/rl_world")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--eval-limit", type=int, default=400, help="held-out scenes captioned")
    args = ap.parse_args()
    out = Path(args.out)
    rows: dict[str, list[dict[str, float]]] = {"sft": [], "grpo, reward model": [], "grpo, ground-truth judge": []}
    for seed in (int(s) for s in args.seeds.split(",")):
        world, sft = Path(args.demo) / f"seed-{seed}" / "world", Path(args.demo) / f"seed-{seed}" / "runs/sft/model"
        prompts = world / "rl_prompts.jsonl"
        describe = [r for _, r in iter_jsonl(world / "sft.jsonl") if r["meta"].get("task", "").startswith("describe")]
        prompts.write_text("".join(json.dumps(r) + "\n" for r in describe[:2000]))
        reward_model = next((Path(args.rm) / f"seed-{seed}").glob("plain-*/model"))
        rows["sft"].append(_chair(sft, world, args.eval_limit))
        for name, judge in (("grpo, reward model", f"rm:{reward_model}"), ("grpo, ground-truth judge", "world")):
            run = out / f"seed-{seed}" / name.split(", ")[1].replace(" ", "_")
            t0 = time.perf_counter()
            if not (run / "model" / "config.json").is_file():
                cfg = load_config(
                    rl.RlConfig,
                    flags={"model": str(sft), "data": str(prompts), "out": str(run)},
                    overrides=[f"steps={args.steps}", f"lr={args.lr}", "batch_size=8", "samples_per_prompt=4",
                               "max_new_tokens=80", "kl_coef=0.05", f"judge={judge}", f"world={world}",
                               f"seed={seed}", "progress=false", "log_every=10"],
                )  # fmt: skip
                rl.train(cfg)
            rows[name].append(_chair(run / "model", world, args.eval_limit))
            print(f"seed {seed} {name}: {time.perf_counter() - t0:.0f} s, {rows[name][-1]}", flush=True)
        print(f"seed {seed} sft: {rows['sft'][-1]}", flush=True)
    lines = [
        "| model | CHAIR_i | CHAIR_i change vs SFT | recall | recall change | mean length |",
        "|---|---|---|---|---|---|",
    ]
    for name, per_seed in rows.items():
        chair = mean_interval([r["chair_i"] for r in per_seed])
        recall = mean_interval([r["recall"] for r in per_seed])
        length = sum(r["length"] for r in per_seed) / len(per_seed)
        change = recall_change = ""
        if name != "sft":
            rel = mean_interval([r["chair_i"] / s["chair_i"] - 1 for r, s in zip(per_seed, rows["sft"])])
            d_rec = mean_interval([r["recall"] - s["recall"] for r, s in zip(per_seed, rows["sft"])])
            change = f"{100 * rel.mean:+.0f}% [{100 * rel.low:+.0f}%, {100 * rel.high:+.0f}%]"
            recall_change = f"{100 * d_rec.mean:+.1f} [{100 * d_rec.low:+.1f}, {100 * d_rec.high:+.1f}] pts"
        lines.append(f"| {name} | {chair.mean:.3f} [{chair.low:.3f}, {chair.high:.3f}] | {change} | "
                     f"{recall.mean:.3f} | {recall_change} | {length:.1f} |")  # fmt: skip
    print("\n".join(lines))
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
