"""Reward-model training throughput: mmalign's shared-prompt pair scoring against the naive path, side by side.

Setup: the model, world pairs and batch of ``dpo_throughput.py`` (a tiny random-init LLaVA with a 336 px / 14 px
CLIP tower: 577 image tokens per image, a 32,000-word vocabulary). Both variants train ``mmalign train rm`` with the
same settings; ``naive`` (``share_prompt=false``) runs each pair as two full sequences, so the image goes through the
vision tower and its tokens through the decoder once per reply, as a reward trainer without a shared prompt does
(TRL's ``RewardTrainer`` has no image path at all). Each variant runs in its own process (its own peak RSS).

Usage: ``python benchmarks/rm_throughput.py [--steps 6] [--warmup 2] [--batch 4]``. Prints the table and the
speed-up of the shared prompt over the naive path.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dpo_throughput import _peak_mb, _rss_mb, prepare, seq_stats, torch_threads

VARIANTS = {"naive (two full sequences)": False, "mmalign (shared prompt)": True}


def run(model: Path, pairs: Path, out: Path, steps: int, batch: int, share: bool) -> dict:
    from mmalign.config import load_config
    from mmalign.recipes import rm

    cfg = load_config(
        rm.RewardConfig,
        flags={"model": str(model), "data": str(pairs), "out": str(out)},
        overrides=[f"steps={steps}", f"batch_size={batch}", "log_every=1", "progress=false", "warmup_ratio=0",
                   f"share_prompt={str(share).lower()}"],
    )  # fmt: skip
    t0 = time.perf_counter()
    rm.train(cfg)
    total = time.perf_counter() - t0
    ends = [json.loads(x)["elapsed_s"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {"step_times": [b - a for a, b in zip([0.0, *ends[:-1]], ends)], "setup_s": total - ends[-1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4, help="pairs per step")
    ap.add_argument("--scenes", type=int, default=32)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:  # one variant, in its own process
        work = Path(args.work)
        import mmalign.recipes.rm  # noqa: F401  (imports count in the baseline)

        base = _rss_mb()
        res = run(work / "model", work / "pairs.jsonl", work / args.variant, args.steps, args.batch,
                  VARIANTS[args.variant])  # fmt: skip
        res.update(base_mb=base, peak_mb=_peak_mb())
        (work / f"{args.variant}.json").write_text(json.dumps(res))
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(tempfile.mkdtemp(prefix="rm_bench_"))
    pairs, model = prepare(work, args.scenes)
    stats = seq_stats(model, pairs)
    print(f"model: {stats['patches']} image tokens, vocab {stats['vocab']}, {stats['layers']} decoder layers; mean "
          f"prompt {stats['prompt']:.0f} tokens, reply {stats['reply']:.1f}; batch {args.batch} pairs; "
          f"torch threads {torch_threads()}")  # fmt: skip
    med = {}
    print("\n| variant | step s | pairs/s | peak RSS MB | Δ RSS MB | setup s |\n|---|---|---|---|---|---|")
    for name in VARIANTS:
        cmd = [sys.executable, __file__, "--variant", name, "--work", str(work), "--steps",
               str(args.steps + args.warmup), "--batch", str(args.batch)]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{name}: failed\n{done.stderr[-2000:]}")
            continue
        res = json.loads((work / f"{name}.json").read_text())
        med[name] = statistics.median(res["step_times"][args.warmup :])
        print(f"| {name} | {med[name]:.3f} | {args.batch / med[name]:.2f} | {res['peak_mb']:.0f} | "
              f"{res['peak_mb'] - res['base_mb']:.0f} | {res['setup_s']:.1f} |")  # fmt: skip
    if len(med) == 2:
        naive, shared = med.values()
        print(f"\nshared prompt: {naive / shared:.2f}x the naive path's steps/s")


if __name__ == "__main__":
    main()
