"""Held-out accuracy of a reward model: the share of pairs whose chosen reply it scores above the rejected one.

``evaluate_reward_model`` reports it over all pairs and per pair kind (``meta.kind``, e.g. the world's oracle kinds,
or ``meta.method``), with the mean reward margin and the number of pairs.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from mmalign.data.pair_inputs import encode_pairs
from mmalign.data.preference import load_pairs
from mmalign.models.load import load_model
from mmalign.reward import (
    RewardScorer,
    encode_pair_critiques,
    facts_missing,
    load_head,
    reads_facts,
    with_facts,
    write_critiques,
    writes_critiques,
)
from mmalign.runtime.progress import progress_bar
from mmalign.types import PreferencePair


def evaluate_reward_model(
    model_dir: str | Path, data: str | Path, *, batch_size: int = 16, limit: int | None = None, progress: bool = True
) -> dict[str, Any]:
    """Accuracy, mean margin and count over the pairs in ``data``, overall (``all``) and per kind.

    Raises:
        ModelError: ``model_dir`` is not a reward model. DataError: a bad pair file.
    """
    pairs = load_pairs(data, limit=limit).pairs
    margins = pair_margins(model_dir, pairs, str(data), batch_size=batch_size, progress=progress)
    groups: dict[str, list[float]] = defaultdict(list)
    for pair, margin in zip(pairs, margins):
        groups["all"].append(margin)
        groups[str(pair.meta.get("kind", pair.meta.get("method", "unknown")))].append(margin)
    return {name: _summary(values) for name, values in sorted(groups.items(), key=lambda kv: kv[0] != "all")}


def pair_margins(
    model_dir: str | Path, pairs: list[PreferencePair], source: str, *, batch_size: int = 16, progress: bool = True
) -> list[float]:
    """r(chosen) − r(rejected) of every pair under the reward model at ``model_dir`` (with the pairs' facts when it
    reads facts; ``source`` names the pairs in errors)."""
    loaded = load_model(model_dir)
    load_head(loaded)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    scorer = RewardScorer(loaded.model.eval().to(device))
    if reads_facts(model_dir):
        facts_missing(pairs, source)
        pairs = [with_facts(p) for p in pairs]
    critique = writes_critiques(model_dir)
    if critique:  # the model writes its own critique of each reply first
        pairs = write_critiques(scorer.vlm, loaded.processor, pairs, batch_size=batch_size)
    margins: list[float] = []
    bar = progress_bar(len(pairs), desc="eval rm", enabled=progress)
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            batch = pairs[start : start + batch_size]
            if critique:
                rewards, _ = scorer(encode_pair_critiques(loaded.processor, batch).to(device))
                chosen, rejected = rewards[0::2], rewards[1::2]
            else:
                enc = encode_pairs(loaded.processor, batch, share_prompt=scorer.share_prompt).to(device)
                chosen, rejected = scorer(enc)
            margins.extend((chosen - rejected).tolist())
            bar.update(len(batch))
    bar.close()
    return margins


def _summary(margins: list[float]) -> dict[str, float]:
    return {
        "accuracy": sum(m > 0 for m in margins) / len(margins),
        "margin": sum(margins) / len(margins),
        "n": len(margins),
    }


def reward_markdown_table(result: dict[str, dict[str, float]]) -> str:
    """The result as a markdown table, one row per group."""
    lines = ["| pairs | n | accuracy | mean margin |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['n']} | {v['accuracy']:.3f} | {v['margin']:+.3f} |" for k, v in result.items()]
    return "\n".join(lines)
