"""Write a whole world to disk: images, scenes, training data, eval sets and ``world.json``.

Layout under ``out`` (every path stored in a file is relative to ``out``, with forward slashes)::

    world.json                 config, counts, object frequencies, training co-occurrence, pairs
    images/{train,eval}/000000.png
    scenes.jsonl               ground truth of every scene
    captions.jsonl             projector pretraining (training scenes, one row each)
    sft.jsonl                  instruction tuning (training scenes, several rows each)
    eval_describe.jsonl        "Describe the image in detail." with ground-truth captions (eval scenes)
    pope_{random,popular,adversarial}.jsonl   POPE questions (eval scenes)
    chair_annotations.jsonl    distinct ground-truth shapes per eval image
    chair_vocab.json           canonical shape → synonyms and plurals

Every random choice comes from a ``random.Random`` seeded by the config seed and a purpose string, so the
same config gives byte-identical files. Files are written to a temporary name and renamed into place.
"""

from __future__ import annotations

import io
import json
import os
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from tqdm import tqdm

from mmalign.lab.world.config import WORLD_JSON, WorldConfig
from mmalign.lab.world.pope import POPE_SPLITS, pope_questions
from mmalign.lab.world.qa import CAPTION_PROMPTS, exchanges
from mmalign.lab.world.render import render_scene
from mmalign.lab.world.scenes import (
    SCENES_JSONL,
    Scene,
    cooccurrence_matrix,
    object_frequency,
    sample_scenes,
)
from mmalign.lab.world.text import caption, chair_vocab, detailed_caption

FORMAT_VERSION = 1
CAPTIONS_JSONL = "captions.jsonl"
SFT_JSONL = "sft.jsonl"
EVAL_DESCRIBE_JSONL = "eval_describe.jsonl"
CHAIR_ANNOTATIONS_JSONL = "chair_annotations.jsonl"
CHAIR_VOCAB_JSON = "chair_vocab.json"
EVAL_DESCRIBE_PROMPT = "Describe the image in detail."

T = TypeVar("T")


def pope_file(split: str) -> str:
    return f"pope_{split}.jsonl"


@dataclass(frozen=True)
class WorldSummary:
    """What ``write_world`` wrote: absolute paths and row counts."""

    root: Path
    world_json: Path
    scenes: Path
    captions: Path
    sft: Path
    eval_describe: Path
    pope: dict[str, Path]
    chair_annotations: Path
    chair_vocab: Path
    n_train: int
    n_eval: int
    n_captions: int
    n_sft: int
    n_pope: dict[str, int]


def write_world(cfg: WorldConfig, out: str | Path, progress: bool = True, processes: int = 1) -> WorldSummary:
    """Generate and write the world described by ``cfg`` under ``out``.

    ``out`` is created if needed; files of an earlier world there are overwritten, but images beyond
    the new counts are left in place, so use a fresh directory when shrinking a world.

    Args:
        cfg: the world config.
        out: output directory.
        progress: show a progress bar over scenes (only on a terminal).
        processes: render the images in this many processes (the bytes written are the same).

    Returns:
        Paths and counts of what was written.
    """
    out = Path(out)
    train, evals = sample_scenes(cfg, "train"), sample_scenes(cfg, "eval")

    def texts() -> tuple[Any, ...]:
        frequency = {"train": object_frequency(train, cfg.shapes), "eval": object_frequency(evals, cfg.shapes)}
        cooc = cooccurrence_matrix(train, cfg.shapes)
        pope = {split: pope_questions(evals, cfg, split, frequency["eval"], cooc) for split in POPE_SPLITS}
        return frequency, cooc, caption_rows(train, cfg), sft_rows(train, cfg), pope

    # The texts are built here while the other processes render the images.
    frequency, cooc, captions, sft, pope = render_images(
        cfg, out, [(s, s.image) for s in train + evals], progress, processes, meanwhile=texts
    )

    write_jsonl(out / SCENES_JSONL, (s.to_dict() for s in train + evals))
    write_jsonl(out / CAPTIONS_JSONL, captions)
    write_jsonl(out / SFT_JSONL, sft)
    write_jsonl(out / EVAL_DESCRIBE_JSONL, eval_describe_rows(evals, cfg))
    for split, rows in pope.items():
        write_jsonl(out / pope_file(split), rows)
    write_jsonl(out / CHAIR_ANNOTATIONS_JSONL, ({"image_id": s.image_id, "objects": list(s.shapes)} for s in evals))
    write_json(out / CHAIR_VOCAB_JSON, chair_vocab(cfg))
    # world.json last: its presence says the rest is complete.
    write_json(out / WORLD_JSON, world_info(cfg, train, evals, frequency, cooc))
    return WorldSummary(
        root=out,
        world_json=out / WORLD_JSON,
        scenes=out / SCENES_JSONL,
        captions=out / CAPTIONS_JSONL,
        sft=out / SFT_JSONL,
        eval_describe=out / EVAL_DESCRIBE_JSONL,
        pope={split: out / pope_file(split) for split in POPE_SPLITS},
        chair_annotations=out / CHAIR_ANNOTATIONS_JSONL,
        chair_vocab=out / CHAIR_VOCAB_JSON,
        n_train=len(train),
        n_eval=len(evals),
        n_captions=len(captions),
        n_sft=len(sft),
        n_pope={split: len(rows) for split, rows in pope.items()},
    )


def _render_chunk(cfg: WorldConfig, out: Path, items: list[tuple[Scene, str]]) -> int:
    for scene, path in items:
        buf = io.BytesIO()
        render_scene(scene, cfg).save(buf, format="PNG")
        atomic_write(out / path, buf.getvalue())
    return len(items)


def render_images(
    cfg: WorldConfig,
    out: Path,
    items: list[tuple[Scene, str]],
    progress: bool = False,
    processes: int = 1,
    meanwhile: Callable[[], T] | None = None,
) -> T | None:
    """Render each ``(scene, path)`` to the PNG ``out / path`` (atomically), in chunks, side by side when
    ``processes`` > 1 (the bytes are the same).

    ``meanwhile`` runs in this process while the other processes render (after rendering with one process);
    its result is returned.
    """
    for folder in {(out / path).parent for _, path in items}:
        folder.mkdir(parents=True, exist_ok=True)
    chunk = 500
    chunks = [items[i : i + chunk] for i in range(0, len(items), chunk)]
    # disable=None lets tqdm switch itself off when stderr is not a terminal.
    bar = tqdm(total=len(items), desc="world", unit="scene", disable=None if progress else True)
    result = None
    if processes <= 1 or len(chunks) <= 1:
        for part in chunks:
            bar.update(_render_chunk(cfg, out, part))
        result = meanwhile() if meanwhile is not None else None
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(min(processes, len(chunks)), mp_context=context) as pool:
            futures = [pool.submit(_render_chunk, cfg, out, part) for part in chunks]
            result = meanwhile() if meanwhile is not None else None
            for done in as_completed(futures):
                bar.update(done.result())
    bar.close()
    return result


def make_world(
    out: str | Path,
    n_train: int = 2000,
    n_eval: int = 200,
    seed: int = 0,
    image_size: int = 64,
    pair_prob: float = 0.9,
    progress: bool = True,
) -> WorldSummary:
    """Write a default world with the commonly changed fields overridden (tests, the tiny model's vocabulary)."""
    cfg = replace(WorldConfig(), n_train=n_train, n_eval=n_eval, seed=seed, image_size=image_size, pair_prob=pair_prob)
    return write_world(cfg, out, progress=progress)


def sample_row(row_id: str, scene: Scene, prompt: str, answer: str, meta: dict[str, Any]) -> dict[str, Any]:
    """One ``Sample`` row: a user turn (image, then ``prompt``) and an assistant turn (``answer``)."""
    return {
        "id": row_id,
        "images": [scene.image],
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ],
        "meta": {"image_id": scene.image_id, "objects": list(scene.shapes), **meta},
    }


def caption_rows(scenes: list[Scene], cfg: WorldConfig) -> list[dict[str, Any]]:
    """Projector-pretraining rows: one caption request per scene, answered short or detailed."""
    rows = []
    for i, scene in enumerate(scenes):
        rng = random.Random(f"{cfg.seed}/captions/{scene.image_id}")
        prompt = rng.choice(CAPTION_PROMPTS)
        rows.append(sample_row(f"caption-{i:06d}", scene, prompt, caption(scene, cfg, rng), {"task": "caption"}))
    return rows


def sft_rows(scenes: list[Scene], cfg: WorldConfig) -> list[dict[str, Any]]:
    """Instruction-tuning rows: every exchange of every scene, one exchange per row."""
    rows: list[dict[str, Any]] = []
    for scene in scenes:
        rng = random.Random(f"{cfg.seed}/sft/{scene.image_id}")
        for ex in exchanges(scene, cfg, rng):
            meta = {"task": ex.task, **ex.meta}
            rows.append(sample_row(f"sft-{len(rows):06d}", scene, ex.question, ex.answer, meta))
    return rows


def eval_describe_rows(scenes: list[Scene], cfg: WorldConfig) -> list[dict[str, Any]]:
    """Eval rows: the detailed description request with the canonical ground-truth caption."""
    return [
        sample_row(
            f"describe-{i:06d}",
            scene,
            EVAL_DESCRIBE_PROMPT,
            detailed_caption(scene, cfg),
            {"task": "describe"},
        )
        for i, scene in enumerate(scenes)
    ]


def world_info(
    cfg: WorldConfig,
    train: list[Scene],
    evals: list[Scene],
    frequency: dict[str, dict[str, int]],
    cooc: list[list[int]],
) -> dict[str, Any]:
    """The ``world.json`` content."""
    index = {s: i for i, s in enumerate(cfg.shapes)}
    # Measured P(partner | member) over training scenes: the strength of the planted bias.
    pair_rates = {
        f"{b}|{a}": round(cooc[index[a]][index[b]] / max(1, cooc[index[a]][index[a]]), 4)
        for pair in cfg.pairs
        for a, b in (pair, pair[::-1])
    }
    return {
        "version": FORMAT_VERSION,
        "config": cfg.to_dict(),
        "counts": {"train": len(train), "eval": len(evals)},
        "frequency": frequency,
        "cooccurrence": {"shapes": list(cfg.shapes), "counts": cooc},
        "pairs": [list(p) for p in cfg.pairs],
        "pair_rates": pair_rates,
        "files": {
            "scenes": SCENES_JSONL,
            "captions": CAPTIONS_JSONL,
            "sft": SFT_JSONL,
            "eval_describe": EVAL_DESCRIBE_JSONL,
            "pope": {split: pope_file(split) for split in POPE_SPLITS},
            "chair_annotations": CHAIR_ANNOTATIONS_JSONL,
            "chair_vocab": CHAIR_VOCAB_JSON,
        },
    }


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """One ``json.dumps(row, sort_keys=True)`` per line, atomically."""
    text = "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows)
    atomic_write(path, text.encode("utf-8"))


def write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write(path, (json.dumps(data, sort_keys=True, indent=2) + "\n").encode("utf-8"))
