"""DPO step throughput and peak memory: mmalign's pair forward against TRL's ``DPOTrainer``, side by side in one run.

Setup (same for every variant): a tiny random-init ``LlavaForConditionalGeneration`` with a 336 px / 14 px CLIP tower
(576 patches + CLS = 577 image tokens per image), a 32,000-word vocabulary, a few decoder layers; the same world
pairs; the same batch (pairs per step); vision tower frozen on both sides (the projector and the decoder train);
gradient checkpointing off; float32 on CPU. TRL runs at its default VLM settings (``max_length=None``; it refuses
cached reference log-probs for vision data, so its reference model runs every step).

Each variant runs in its own process so that peak RSS is its own. Columns:

* ``step s``: median wall time of a training step after the warm-up steps;
* ``tokens/s``: sequence tokens a step processes as TRL lays them out (prompt with image tokens, once per reply, plus
  the reply), divided by the step time, so the column is comparable across variants;
* ``peak RSS`` and ``Δ RSS``: the process's peak resident memory, absolute and above its baseline after imports and
  data loading (the part the training itself adds);
* ``setup s``: one-off work before the first step (mmalign: scoring the reference log-probs into the cache).

The mmalign optimisations are also switched on one at a time (``share``: one image encoding and one prompt pass per
pair; ``logits``: LM head only on reply tokens; ``cache``: reference log-probs precomputed), and each measured speed-up
over mmalign's all-off path is printed beside the speed-up its FLOP count predicts.

Usage: ``pip install -e .[bench]`` then ``python benchmarks/dpo_throughput.py [--steps 6] [--warmup 2] [--batch 2]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

VARIANTS = {
    "trl": {},
    "mmalign naive": {"share_prompt": False, "response_logits_only": False, "ref_cache": False},
    "+ share only": {"share_prompt": True, "response_logits_only": False, "ref_cache": False},
    "+ logits only": {"share_prompt": False, "response_logits_only": True, "ref_cache": False},
    "+ cache only": {"share_prompt": False, "response_logits_only": False, "ref_cache": True},
    "mmalign, live reference": {"share_prompt": True, "response_logits_only": True, "ref_cache": False},
    "mmalign": {"share_prompt": True, "response_logits_only": True, "ref_cache": True},
    "mmalign mDPO": {"share_prompt": True, "response_logits_only": True, "ref_cache": True, "loss": "mdpo"},
}
SIZE = {
    "image_size": 336,
    "patch_size": 14,
    "vision_hidden": 64,
    "vision_layers": 2,
    "vision_heads": 4,
    "text_hidden": 256,
    "text_layers": 4,
    "text_heads": 4,
    "text_intermediate": 688,
    "max_positions": 2048,
}
VOCAB = 32_000


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def prepare(work: Path, n_pairs: int) -> tuple[Path, Path]:
    """The world (336 px images), its oracle pairs, and the tiny LLaVA with a 32k vocabulary."""
    from mmalign.data.corpus import corpus_texts
    from mmalign.lab.world import make_world
    from mmalign.lab.world.pairs import write_world_pairs
    from mmalign.models.build import build_tiny, save_model
    from mmalign.models.families import TinySize

    world = work / "world"
    make_world(world, n_train=n_pairs, n_eval=4, seed=0, image_size=336, progress=False)
    pairs = work / "pairs.jsonl"
    write_world_pairs(world, pairs, seed=0, kinds=("partner",))
    texts = corpus_texts([world])
    from mmalign.models.tokenizer import words_of

    # Pad the vocabulary with filler words to a Llama-sized 32,000 entries (the LM head cost depends on it).
    size = replace(TinySize(), **SIZE)
    n = max(0, VOCAB - len(words_of(texts)))
    for _ in range(3):
        filler = " ".join(f"w{i:05d}" for i in range(n))
        model, processor = build_tiny("llava", [*texts, filler], size=size, seed=0)
        got = model.config.text_config.vocab_size
        if got == VOCAB:
            break
        n += VOCAB - got
    return pairs, save_model(model, processor, work / "model")


def run_mmalign(model: Path, pairs: Path, out: Path, steps: int, batch: int, settings: dict[str, Any]) -> dict:
    from mmalign.config import load_config
    from mmalign.recipes import dpo

    overrides = [f"{k}={str(v).lower()}" for k, v in settings.items()]
    cfg = load_config(
        dpo.DpoConfig,
        flags={"model": str(model), "data": str(pairs), "out": str(out)},
        overrides=[
            f"steps={steps}",
            f"batch_size={batch}",
            "lr=1e-6",
            "log_every=1",
            "progress=false",
            "warmup_ratio=0",
            f"ref_cache_dir={out / 'cache'}",
            "save_every=0",
            *overrides,
        ],
    )
    t0 = time.perf_counter()
    dpo.train(cfg)
    total = time.perf_counter() - t0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    ends = [r["elapsed_s"] for r in rows]
    step_times = [b - a for a, b in zip([0.0, *ends[:-1]], ends)]
    # elapsed_s starts when the loop starts: everything before it is setup (model load, reference scoring, saving).
    return {"step_times": step_times, "setup_s": total - ends[-1], "first": rows[0]}


def run_trl(model: Path, pairs: Path, out: Path, steps: int, batch: int) -> dict:
    import datasets
    from transformers import AutoProcessor, LlavaForConditionalGeneration, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from mmalign.data.preference import load_pairs

    records = load_pairs(pairs).pairs
    rows = {
        "images": [[p.as_samples()[0].load_images()[0]] for p in records],
        "prompt": [[m.to_hf() for m in p.prompt] for p in records],
        "chosen": [[{"role": "assistant", "content": [{"type": "text", "text": p.chosen}]}] for p in records],
        "rejected": [[{"role": "assistant", "content": [{"type": "text", "text": p.rejected}]}] for p in records],
    }
    features = datasets.Features(
        {
            "images": datasets.Sequence(datasets.Image()),
            "prompt": datasets.List(
                {
                    "role": datasets.Value("string"),
                    "content": datasets.List({"type": datasets.Value("string"), "text": datasets.Value("string")}),
                }
            ),
            "chosen": datasets.List(
                {
                    "role": datasets.Value("string"),
                    "content": datasets.List({"type": datasets.Value("string"), "text": datasets.Value("string")}),
                }
            ),
            "rejected": datasets.List(
                {
                    "role": datasets.Value("string"),
                    "content": datasets.List({"type": datasets.Value("string"), "text": datasets.Value("string")}),
                }
            ),
        }
    )
    ds = datasets.Dataset.from_dict(rows, features=features)
    base = _rss_mb()
    vlm = LlavaForConditionalGeneration.from_pretrained(model)
    vlm.model.vision_tower.requires_grad_(False)
    processor = AutoProcessor.from_pretrained(model)
    args = DPOConfig(
        output_dir=str(out),
        per_device_train_batch_size=batch,
        max_steps=steps,
        learning_rate=1e-6,
        lr_scheduler_type="constant",
        gradient_checkpointing=False,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
        max_length=None,
        bf16=False,  # TRL defaults to bf16 autocast; both sides run float32 here
        dataloader_num_workers=0,
        train_sampling_strategy="sequential",
        disable_tqdm=True,
    )
    marks: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a: Any, **k: Any) -> None:
            marks.append(time.perf_counter())

        def on_step_end(self, *a: Any, **k: Any) -> None:
            marks.append(time.perf_counter())

    trainer = DPOTrainer(model=vlm, args=args, train_dataset=ds, processing_class=processor, callbacks=[Clock()])
    t0 = time.perf_counter()
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    step_times = [marks[i + 1] - marks[i] for i in range(0, len(marks) - 1, 2)]
    return {
        "step_times": step_times,
        "setup_s": 0.0,
        "first": logs[0],
        "base_mb": base,
        "total_s": time.perf_counter() - t0,
    }


def step0_mmalign(model: Path, pairs: Path, batch: int) -> dict:
    """mmalign's step-0 log-probs on TRL's first batch (the first ``batch`` pairs, TRL reads them in order)."""
    import torch

    from mmalign.data.pair_inputs import encode_pairs
    from mmalign.data.preference import load_pairs
    from mmalign.forward import PairScorer
    from mmalign.models.load import load_model

    loaded = load_model(model)
    scorer = PairScorer(loaded.model.eval())
    first = load_pairs(pairs).pairs[:batch]
    with torch.no_grad():
        chosen, rejected, *_ = scorer(encode_pairs(loaded.processor, first, share_prompt=True))
    return {"logps/chosen": chosen.mean().item(), "logps/rejected": rejected.mean().item(), "loss": math.log(2)}


def seq_stats(model: Path, pairs: Path) -> dict:
    """Mean prompt length (image tokens included) and mean reply length, in tokens."""
    from mmalign.data.pair_inputs import encode_continuations, prompt_sample
    from mmalign.data.preference import load_pairs
    from mmalign.models.load import load_model

    loaded = load_model(model)
    records = load_pairs(pairs).pairs[:8]
    enc = encode_continuations(
        loaded.processor, [prompt_sample(p) for p in records], [(p.chosen, p.rejected) for p in records]
    )
    prompt = enc.prompt["attention_mask"].sum(-1).float().mean().item()
    reply = enc.reply_mask.sum(-1).float().mean().item()
    text, vision = loaded.model.config.text_config, loaded.model.config.vision_config
    return {
        "prompt": prompt,
        "reply": reply,
        "hidden": text.hidden_size,
        "vocab": text.vocab_size,
        "layers": text.num_hidden_layers,
        "inter": text.intermediate_size,
        "v_hidden": vision.hidden_size,
        "v_layers": vision.num_hidden_layers,
        "v_inter": vision.intermediate_size,
        "patches": (vision.image_size // vision.patch_size) ** 2 + 1,
    }


def predicted_flops(s: dict, share: bool, logits: bool, cache: bool) -> float:
    """Forward+backward FLOPs of one pair under the given optimisations (matmuls only; backward = 2x forward).

    Vision tower: forward only (frozen). Decoder and projector: forward + backward for the policy, forward for the
    reference unless it is cached. LM head: at every position of the full sequences, or only at reply positions —
    with a shared prompt the prompt's hidden states never reach the head, so ``share`` alone already skips them.
    """
    h, v, layers, inter = s["hidden"], s["vocab"], s["layers"], s["inter"]
    per_tok = layers * (2 * 4 * h * h + 2 * 3 * h * inter)
    vis = s["patches"] * s["v_layers"] * (2 * 4 * s["v_hidden"] ** 2 + 2 * 2 * s["v_hidden"] * s["v_inter"])
    p, r = s["prompt"], s["reply"]
    tokens = p + 2 * r if share else 2 * (p + r)
    images = 1 if share else 2
    head = 2 * h * v * (2 * r if logits or share else tokens)
    fwd = tokens * per_tok + head
    return images * vis + 3 * fwd + (0 if cache else images * vis + fwd)


def child(args: argparse.Namespace) -> None:
    out = Path(args.out)
    name = args.variant
    if name == "trl":
        res = run_trl(Path(args.model), Path(args.pairs_file), out, args.steps, args.batch)
    else:
        import mmalign.recipes.dpo  # noqa: F401  (imports count in the baseline, as TRL's do)

        base = _rss_mb()
        res = run_mmalign(Path(args.model), Path(args.pairs_file), out, args.steps, args.batch, VARIANTS[name])
        res["base_mb"] = base
    res["peak_mb"] = _peak_mb()
    Path(args.result).write_text(json.dumps(res))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6, help="measured steps per variant")
    ap.add_argument("--warmup", type=int, default=2, help="steps run first and not measured")
    ap.add_argument("--batch", type=int, default=2, help="pairs per step")
    ap.add_argument("--scenes", type=int, default=32, help="world scenes to build pairs from")
    ap.add_argument("--only", nargs="*", default=None, help="variants to run (default: all)")
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--pairs-file", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        child(args)
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(tempfile.mkdtemp(prefix="dpo_bench_"))
    pairs, model = prepare(work, args.scenes)
    stats = seq_stats(model, pairs)
    print(
        f"model: {stats['patches']} image tokens, vocab {stats['vocab']}, {stats['layers']} decoder layers,"
        f" hidden {stats['hidden']}; mean prompt {stats['prompt']:.0f} tokens, mean reply {stats['reply']:.1f} tokens;"
        f" batch {args.batch} pairs; torch threads {torch_threads()}"
    )
    results: dict[str, dict] = {}
    for name in args.only or list(VARIANTS):
        result = work / f"{name.replace(' ', '_')}.json"
        cmd = [
            sys.executable,
            __file__,
            "--variant",
            name,
            "--model",
            str(model),
            "--pairs-file",
            str(pairs),
            "--out",
            str(work / name.replace(" ", "_")),
            "--result",
            str(result),
            "--steps",
            str(args.steps + args.warmup),
            "--batch",
            str(args.batch),
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{name}: failed\n{done.stderr[-2000:]}")
            continue
        results[name] = json.loads(result.read_text())
    tokens = args.batch * 2 * (stats["prompt"] + stats["reply"])
    print("\n| variant | step s | steps/s | tokens/s | peak RSS MB | Δ RSS MB | setup s |")
    print("|---|---|---|---|---|---|---|")
    med: dict[str, float] = {}
    for name, res in results.items():
        med[name] = statistics.median(res["step_times"][args.warmup :])
        print(
            f"| {name} | {med[name]:.3f} | {1 / med[name]:.2f} | {tokens / med[name]:.0f} | {res['peak_mb']:.0f} |"
            f" {res['peak_mb'] - res['base_mb']:.0f} | {res['setup_s']:.1f} |"
        )
    if "trl" in results and "mmalign" in results:
        t, m = results["trl"], results["mmalign"]
        speed = med["trl"] / med["mmalign"]
        delta = (m["peak_mb"] - m["base_mb"]) / (t["peak_mb"] - t["base_mb"])
        print(
            f"\nmmalign vs TRL: {speed:.2f}x steps/s; peak RSS {m['peak_mb'] / t['peak_mb']:.2f}x; Δ RSS {delta:.2f}x"
        )
        ours0 = step0_mmalign(model, pairs, args.batch)
        print("step-0 agreement on TRL's first batch (mmalign vs TRL):")
        for key in ("loss", "logps/chosen", "logps/rejected"):
            a, b = ours0[key], t["first"].get(key, float("nan"))
            print(f"  {key}: {a:.5f} vs {b:.5f} (|diff| {abs(a - b):.2e})")
    if "mmalign mDPO" in med and "mmalign" in med:
        print(f"mDPO step / DPO step (cached reference): {med['mmalign mDPO'] / med['mmalign']:.2f}x")
    if "mmalign mDPO" in med and "mmalign, live reference" in med:
        print(f"mDPO step / DPO step (live reference): {med['mmalign mDPO'] / med['mmalign, live reference']:.2f}x")
    if "mmalign naive" in med:
        print("\n| optimisation alone | measured speed-up | FLOP-predicted speed-up |")
        print("|---|---|---|")
        base = predicted_flops(stats, False, False, False)
        for name, flags in (
            ("+ share only", (True, False, False)),
            ("+ logits only", (False, True, False)),
            ("+ cache only", (False, False, True)),
            ("mmalign, live reference", (True, True, False)),
            ("mmalign", (True, True, True)),
        ):
            if name in med:
                pred = base / predicted_flops(stats, *flags)
                print(f"| {name} | {med['mmalign naive'] / med[name]:.2f}x | {pred:.2f}x |")
    print(f"\nwork dir: {work}")


if __name__ == "__main__":
    main()
