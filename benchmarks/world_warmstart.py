"""Why the world's tiny VLM trains the way it does: can a random decoder learn to read the image at all?

Probe: 16 training examples that all ask the same question ("Is there a star in the image?"), half yes, half no,
so the text alone carries no information and the loss cannot go below ln 2 / 3 ≈ 0.231 per target token (the
answer, ".", end-of-turn) unless the decoder reads the image. The decoder trains for a fixed number of steps under
each variant of the vision path, side by side in one run:

* patch geometry: one image token per grid cell (48 px, 16 px patches) vs 64 px with 8 px patches;
* projector: plain random init vs standardised on the world's images (``models/calibrate.py``);
* projector trained jointly with the decoder vs frozen.

Usage: ``python benchmarks/world_warmstart.py [--steps 80] [--lr 3e-3]``. Prints a table and the ratio of each
final loss to the text-only floor.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from mmalign.data.collate import encode_sft
from mmalign.data.corpus import corpus_images, corpus_texts
from mmalign.data.loaders import load_samples
from mmalign.lab.world import make_world
from mmalign.models.build import build_tiny
from mmalign.models.families import TinySize, get_family
from mmalign.models.load import apply_freeze
from mmalign.recipes.sft import sequence_nll
from mmalign.runtime.optim import make_optimizer

FLOOR = math.log(2) / 3


def probe(world: Path, size: TinySize, calibrate: bool, train_projector: bool, steps: int, lr: float) -> float:
    """Final mean loss per target token on the 16 same-question examples."""
    images = corpus_images([world]) if calibrate else []
    model, processor = build_tiny("llava", corpus_texts([world]), size=size, seed=0, calibration_images=images)
    apply_freeze(model, get_family("llava"), vision=True, projector=not train_projector, llm=False)
    rows = [s for s in load_samples(world / "sft.jsonl").samples if s.messages[0].text.startswith("Is there a star")]
    batch = encode_sft(processor, rows[:16])
    labels = batch.pop("labels")
    optimizer = make_optimizer(model, lr, 0.0)
    torch.manual_seed(0)
    loss = torch.tensor(0.0)
    for _ in range(steps):
        nll, n = sequence_nll(model(**batch, use_cache=False).logits, labels)
        loss = nll.sum() / n.sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        world = Path(tmp) / "world"
        make_world(world, n_train=400, n_eval=20, seed=0, progress=False)
        variants = [
            ("64px / 8px patches", replace(TinySize(), image_size=64, patch_size=8), False, True),
            ("48px / 16px (1 token per cell)", TinySize(), False, True),
            ("48px / 16px, calibrated", TinySize(), True, True),
            ("48px / 16px, frozen", TinySize(), False, False),
            ("48px / 16px, calibrated, frozen", TinySize(), True, False),
        ]
        print(f"| vision path | projector | final loss ({args.steps} steps) | loss / text-only floor | seconds |")
        print("|---|---|---|---|---|")
        for name, size, calibrate, train_projector in variants:
            t0 = time.perf_counter()
            loss = probe(world, size, calibrate, train_projector, args.steps, args.lr)
            mode = "trained with decoder" if train_projector else "frozen"
            print(f"| {name} | {mode} | {loss:.4f} | {loss / FLOOR:.3f} | {time.perf_counter() - t0:.1f} |")
        print(f"\ntext-only floor (ln 2 / 3): {FLOOR:.4f}; a ratio well below 1 means the decoder reads the image.")


if __name__ == "__main__":
    main()
