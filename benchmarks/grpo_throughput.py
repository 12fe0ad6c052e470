"""GRPO step throughput and peak memory: ``mmalign train rl --algo grpo`` against TRL's ``GRPOTrainer``, side by side.

Setup (same on both sides): the model of ``dpo_throughput.py`` (a tiny random-init LLaVA, 336 px / 14 px CLIP tower:
577 image tokens per image, 32,000-word vocabulary, 4 decoder layers), float32 on the CPU, vision tower frozen;
4 prompts × 4 sampled replies per step, exactly 64 new tokens each (the random model rarely stops), temperature 1;
the same reward (a Python function: minus the reply's length in characters); no KL term (TRL's default ``beta=0``,
mmalign ``kl_coef=0``), one update per batch of samples. TRL runs at its VLM defaults otherwise (``loss_type="dapo"``
— a per-token mean over the batch where mmalign averages per reply; the work per step is the same —,
``scale_rewards="group"``, its own generation through ``model.generate``).

Columns: median step time after the warm-up steps, steps/s, the process's peak RSS and what training adds to its
baseline after imports and data loading. Each side runs in its own process.

Usage: ``pip install -e .[bench]`` then ``python benchmarks/grpo_throughput.py [--steps 4] [--warmup 1]``.
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
from typing import Any

from dpo_throughput import _peak_mb, _rss_mb, prepare, torch_threads

PROMPTS, GENERATIONS, NEW_TOKENS = 4, 4, 64
REWARD = "def short(prompt, reply):\n    return -len(reply) / 10\n"


def write_prompts(world: Path, n: int) -> None:
    """``n`` of the world's describe requests (their image and question; the answer is dropped when sampling)."""
    from mmalign.data.loaders import iter_jsonl

    rows = [row for _, row in iter_jsonl(world / "sft.jsonl") if row["meta"].get("task", "").startswith("describe")]
    (world / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:n]))


def run_mmalign(work: Path, steps: int) -> dict:
    from mmalign.config import load_config
    from mmalign.recipes import rl

    (work / "short.py").write_text(REWARD)
    base = _rss_mb()
    cfg = load_config(
        rl.RlConfig,
        flags={"model": str(work / "model"), "data": str(work / "world" / "prompts.jsonl"), "out": str(work / "mm")},
        overrides=[f"steps={steps}", f"batch_size={PROMPTS}", f"samples_per_prompt={GENERATIONS}",
                   f"max_new_tokens={NEW_TOKENS}", "kl_coef=0", f"judge={work / 'short.py'}:short", "log_every=1",
                   "progress=false", "warmup_ratio=0", "lr=1e-6", "max_length=4096"],
    )  # fmt: skip
    rl.train(cfg)
    rows = [json.loads(x) for x in (work / "mm" / "metrics.jsonl").read_text().splitlines()]
    ends = [r["elapsed_s"] for r in rows]
    steps_s = [b - a for a, b in zip([0.0, *ends[:-1]], ends)]
    return {
        "step_times": steps_s,
        "base_mb": base,
        "mean_length": statistics.mean(r["completions/mean_length"] for r in rows),
        "split": {k: statistics.median(r[k] for r in rows[1:] or rows) for k in rows[0] if k.startswith("time/")},
    }


def run_trl(work: Path, steps: int) -> dict:
    import datasets
    from transformers import AutoProcessor, LlavaForConditionalGeneration, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from mmalign.data.loaders import load_samples

    samples = load_samples(work / "world" / "prompts.jsonl").samples
    ds = datasets.Dataset.from_dict(
        {
            "prompt": [[m.to_hf() for m in s.prompt_messages] for s in samples],
            "image": [s.load_images()[0] for s in samples],
        }
    )
    base = _rss_mb()
    vlm = LlavaForConditionalGeneration.from_pretrained(work / "model")
    vlm.model.vision_tower.requires_grad_(False)
    processor = AutoProcessor.from_pretrained(work / "model")

    def short(completions: list[Any], **_: Any) -> list[float]:
        texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
        return [-len(t) / 10 for t in texts]

    args = GRPOConfig(
        output_dir=str(work / "trl"), per_device_train_batch_size=PROMPTS * GENERATIONS, num_generations=GENERATIONS,
        max_completion_length=NEW_TOKENS, max_steps=steps, learning_rate=1e-6, lr_scheduler_type="constant",
        logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, bf16=False, seed=0,
        gradient_checkpointing=False, dataloader_num_workers=0, disable_tqdm=True,
    )  # fmt: skip
    marks: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a: Any, **k: Any) -> None:
            marks.append(time.perf_counter())

        def on_step_end(self, *a: Any, **k: Any) -> None:
            marks.append(time.perf_counter())

    trainer = GRPOTrainer(model=vlm, reward_funcs=short, args=args, train_dataset=ds, processing_class=processor,
                          callbacks=[Clock()])  # fmt: skip
    trainer.train()
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    steps_s = [marks[i + 1] - marks[i] for i in range(0, len(marks) - 1, 2)]
    return {"step_times": steps_s, "base_mb": base, "mean_length": sum(lengths) / max(1, len(lengths))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--side", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        work = Path(args.work)
        res = (run_trl if args.side == "trl" else run_mmalign)(work, args.steps)
        res["peak_mb"] = _peak_mb()
        (work / f"{args.side}.json").write_text(json.dumps(res))
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(tempfile.mkdtemp(prefix="grpo_bench_"))
    prepare(work, 32)
    write_prompts(work / "world", 64)
    print(f"{PROMPTS} prompts x {GENERATIONS} replies, {NEW_TOKENS} new tokens; torch threads {torch_threads()}")
    med: dict[str, float] = {}
    print("\n| side | step s | steps/s | peak RSS MB | Δ RSS MB | reply tokens |\n|---|---|---|---|---|---|")
    for side in ("trl", "mmalign"):
        cmd = [sys.executable, __file__, "--side", side, "--work", str(work), "--steps", str(args.steps + args.warmup)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{side}: failed\n{done.stderr[-3000:]}")
            continue
        res = json.loads((work / f"{side}.json").read_text())
        med[side] = statistics.median(res["step_times"][args.warmup :])
        print(f"| {side} | {med[side]:.2f} | {1 / med[side]:.3f} | {res['peak_mb']:.0f} | "
              f"{res['peak_mb'] - res['base_mb']:.0f} | {res['mean_length']:.1f} |")  # fmt: skip
        if "split" in res:
            print(
                "  mmalign's median seconds per phase: "
                + ", ".join(f"{k[5:]} {v:.2f}" for k, v in res["split"].items())
            )
    if len(med) == 2:
        print(f"\nmmalign: {med['trl'] / med['mmalign']:.2f}x TRL's steps/s")


if __name__ == "__main__":
    main()
