"""BDHS pair generation: batched against one example at a time, side by side in one run.

The same tiny random-init LLaVA (the demo's architecture and size), the same world captions, the same BDHS settings
(ρ = 0.99, reference guidance, similarity filter with all-MiniLM-L6-v2 when installed); only the number of examples
generated together changes. A random model rarely stops by itself, so every continuation runs to
``--max-new-tokens``: the numbers measure the generation machinery, not a trained model's reply lengths.

Usage: ``python benchmarks/bdhs_throughput.py [--samples 32] [--batch 16] [--max-new-tokens 12]``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch


class LengthEmbedder:
    """Fallback when all-MiniLM-L6-v2 is not installed: a bag-of-characters vector (cheap, deterministic)."""

    def encode(self, texts: list[str]) -> torch.Tensor:
        out = torch.zeros(len(texts), 128)
        for i, t in enumerate(texts):
            for ch in t.encode()[:512]:
                out[i, ch % 128] += 1
        return torch.nn.functional.normalize(out + 1e-6, dim=-1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument("--iterations", type=int, default=2)
    args = ap.parse_args()

    from mmalign.data.corpus import corpus_texts
    from mmalign.generation.bdhs import BdhsConfig
    from mmalign.generation.bdhs_run import run_bdhs
    from mmalign.lab.world import make_world
    from mmalign.models.build import build_tiny

    work = Path(tempfile.mkdtemp(prefix="bdhs_bench_"))
    make_world(work / "world", n_train=args.samples, n_eval=4, seed=0, image_size=48, progress=False)
    model, processor = build_tiny("llava", corpus_texts([work / "world"]), seed=0)
    from mmalign.errors import ModelError
    from mmalign.generation.embed import SentenceEmbedder

    try:
        embedder, name = SentenceEmbedder(), "all-MiniLM-L6-v2"
    except ModelError:  # the optional package is missing: say so and use the fallback
        embedder, name = LengthEmbedder(), "character-count fallback"
    cfg = BdhsConfig(iterations=args.iterations, max_new_tokens=args.max_new_tokens)
    data = work / "world" / "captions.jsonl"
    rows = []
    for batch in (1, args.batch):
        run = run_bdhs(
            model,
            processor,
            data,
            work / f"bdhs_b{batch}.jsonl",
            cfg,
            embedder=embedder,
            batch_size=batch,
            max_samples=args.samples,
            progress=False,
        )
        rows.append((batch, run.pairs_per_s, run.seconds, run.accepted_by_iteration))
    print(
        f"BDHS on {args.samples} world captions, {args.iterations} iterations, embedder: {name}, threads "
        f"{torch.get_num_threads()}\n"
    )
    print("| examples per batch | pairs/s | seconds | accepted after each iteration |")
    print("|---|---|---|---|")
    for batch, pps, sec, acc in rows:
        print(f"| {batch} | {pps:.2f} | {sec:.1f} | {', '.join(f'{a:.0%}' for a in acc)} |")
    print(f"\nbatched / one at a time: {rows[1][1] / rows[0][1]:.2f}x pairs/s")


if __name__ == "__main__":
    main()
