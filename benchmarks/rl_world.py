"""RL on the synthetic world over seeds: GRPO / RLOO / PPO with a reward model or the ground-truth judge, next to the
demo's DPO and mDPO models, as the study's table has them.

For each seed of a finished ``mmalign demo --seeds`` directory (its world, SFT, DPO and mDPO models) and the reward
models of that seed (``benchmarks/reward_world.py``), ``mmalign train rl --algo A`` runs from the SFT model on the
world's describe requests for every algorithm of ``--algos`` and every judge of ``--judges``: ``rm`` (the plain reward
model, ``judge=rm:DIR``), ``rm-facts`` (the fact-augmented one, reading each prompt's scene facts as Fact-RLHF's reward
model reads the image's captions) and ``world`` (the world's ground-truth rule judge: an upper bound, it counts
invented and missed objects exactly). Every model, and the SFT / DPO / mDPO models, captions the held-out scenes;
printed: CHAIR_i, recall and mean length, the change against the same seed's SFT model, mean over seeds with a 95%
t-interval. With ``--plot`` the runs' reward, caption length and KL curves (mean over seeds) go to
``<out>/curves-<tag>.png``.

``--set key=value`` (repeatable) adds training overrides to every run and ``--tag`` names the variant, e.g. reward
hacking with the KL off: ``--set kl_coef=0 --tag nokl``.

Usage: ``python benchmarks/rl_world.py --demo runs/demo3 --rm runs/rm_world --seeds 0,1,2 --algos grpo,rloo,ppo
--out runs/rl_world``
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from mmalign.config import load_config
from mmalign.data.loaders import iter_jsonl
from mmalign.eval.chair import evaluate_chair
from mmalign.lab.world.config import load_world_config
from mmalign.lab.world.scenes import load_scenes
from mmalign.lab.world.text import scene_facts
from mmalign.models.load import load_model
from mmalign.recipes import rl
from mmalign.stats import mean_interval
from rl_curves import plot

JUDGES = {"rm": "reward model", "rm-facts": "fact-augmented reward model", "world": "ground-truth judge"}
PPO = ["value_lr=1e-3", "ppo_epochs=2"]  # a linear value head learns nothing at the policy's learning rate


def _chair(model_dir: Path, world: Path, limit: int) -> dict[str, float]:
    """CHAIR of a model on the held-out scenes, cached beside it (``chair-<limit>.json``)."""
    cached = model_dir.parent / f"chair-{limit}.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    loaded = load_model(model_dir)
    r = evaluate_chair(loaded.model.eval(), loaded.processor, world, max_new_tokens=80, limit=limit, progress=False)
    result = {"chair_i": r["chair_i"], "recall": r["recall"], "length": r["mean_length"]}
    cached.write_text(json.dumps(result))
    return result


def _train(
    run: Path, sft: Path, prompts: Path, world: Path, judge: str, algo: str, seed: int, args: argparse.Namespace
) -> None:
    if (run / "model" / "config.json").is_file():
        return
    cfg = load_config(
        rl.RlConfig,
        flags={"model": str(sft), "data": str(prompts), "out": str(run)},
        overrides=[f"steps={args.steps}", f"lr={args.lr}", "batch_size=8", "samples_per_prompt=4",
                   "max_new_tokens=80", "kl_coef=0.05", f"judge={judge}", f"world={world}", f"algo={algo}",
                   f"seed={seed}", "progress=false", "log_every=5", *(PPO if algo == "ppo" else []), *args.set],
    )  # fmt: skip
    rl.train(cfg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", required=True)
    ap.add_argument("--rm", required=True, help="reward_world.py output: seed-S/plain-*/model (and facts-*/model)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--algos", default="grpo", help="comma list of grpo, rloo, ppo")
    ap.add_argument(
        "--judges", default="rm,world", help="comma list of rm, rm-facts (reward models), world (ground truth)"
    )
    ap.add_argument("--baselines", default="dpo,mdpo", help="the demo's models evaluated beside SFT (may be empty)")
    ap.add_argument("--set", action="append", default=[], help="a training override for every run (repeatable)")
    ap.add_argument("--tag", default="", help="appended to the run names (a variant made with --set)")
    ap.add_argument("--out", default="runs/rl_world")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--eval-limit", type=int, default=400, help="held-out scenes captioned")
    ap.add_argument("--plot", action="store_true", help="write <out>/curves.png")
    args = ap.parse_args()
    out = Path(args.out)
    algos, judges = args.algos.split(","), args.judges.split(",")
    baselines = [b for b in args.baselines.split(",") if b]
    rows: dict[str, list[dict[str, float]]] = {"sft": [], **{b: [] for b in baselines}}
    runs: dict[str, list[Path]] = {}
    tag = f", {args.tag}" if args.tag else ""
    for seed in (int(s) for s in args.seeds.split(",")):
        demo = Path(args.demo) / f"seed-{seed}"
        world, sft = demo / "world", demo / "runs/sft/model"
        prompts = world / "rl_prompts.jsonl"
        describe = [r for _, r in iter_jsonl(world / "sft.jsonl") if r["meta"].get("task", "").startswith("describe")]
        facts = {s.image_id: list(scene_facts(s, load_world_config(world))) for s in load_scenes(world, "train")}
        rows_with_facts = [{**r, "meta": {**r["meta"], "facts": facts[r["meta"]["image_id"]]}} for r in describe[:2000]]
        prompts.write_text("".join(json.dumps(r) + "\n" for r in rows_with_facts))
        reward_models = {
            "rm": next((Path(args.rm) / f"seed-{seed}").glob("plain-*/model"), None),
            "rm-facts": next((Path(args.rm) / f"seed-{seed}").glob("facts-*/model"), None),
        }
        for name in ("sft", *baselines):
            rows[name].append(_chair(demo / "runs" / name / "model", world, args.eval_limit))
        for algo in algos:
            for judge in judges:
                name = f"{algo}, {JUDGES[judge]}{tag}"
                run = out / f"seed-{seed}" / f"{algo}-{judge}{'-' + args.tag if args.tag else ''}"
                t0 = time.perf_counter()
                if judge != "world" and reward_models[judge] is None:
                    raise SystemExit(f"{args.rm}/seed-{seed}: no {judge} reward model (run benchmarks/reward_world.py)")
                _train(run, sft, prompts, world, f"rm:{reward_models[judge]}" if judge != "world" else "world", algo,
                       seed, args)  # fmt: skip
                rows.setdefault(name, []).append(_chair(run / "model", world, args.eval_limit))
                runs.setdefault(name, []).append(run)
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
    (out / f"summary{'-' + args.tag if args.tag else ''}.json").write_text(json.dumps(rows, indent=2) + "\n")
    if args.plot and runs:
        suffix = f"-{args.tag}" if args.tag else ""
        print(f"curves: {plot(runs, out / f'curves{suffix}.png')}")


if __name__ == "__main__":
    main()
