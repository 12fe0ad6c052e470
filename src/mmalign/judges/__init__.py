"""Judges: score replies to prompts, higher is better. Online DPO ranks its samples with one; RL rewards them with one.

The role is one method, ``score(prompts, replies) -> list[float]``, so a rule judge from ground truth, a user's Python
function and a reward model (``judges.reward``) are interchangeable, and a weighted sum of them is a judge too
(``0.5*rm:runs/rm_a/model+rm:runs/rm_b/model+0.2*world``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from mmalign.errors import ConfigError
from mmalign.types import Sample

if TYPE_CHECKING:
    import torch


class Judge(Protocol):
    """Scores ``replies[i]`` as an answer to ``prompts[i]`` (higher is better)."""

    def score(self, prompts: Sequence[Sample], replies: Sequence[str]) -> list[float]: ...


class WeightedJudges:
    """score = Σ weight_i · judge_i(prompt, reply): several reward models (and rule or function judges) in one."""

    def __init__(self, parts: Sequence[tuple[float, Judge]]) -> None:
        self.parts = list(parts)

    def score(self, prompts: Sequence[Sample], replies: Sequence[str]) -> list[float]:
        totals = [0.0] * len(replies)
        for weight, judge in self.parts:
            for i, value in enumerate(judge.score(prompts, replies)):
                totals[i] += weight * value
        return totals


_WEIGHT = re.compile(r"^\s*(-?(?:\d+\.?\d*|\.\d+))\s*\*\s*(.+?)\s*$")  # "0.5*spec" (no exponent: "+" splits)


def check_prompts(judge: Judge, prompts: Sequence[Sample]) -> None:
    """Raise ``ConfigError`` now if ``judge`` cannot score replies to some of ``prompts`` (a fact-augmented reward
    model and a prompt without facts), rather than at the first scoring, after sampling."""
    for part in [j for _, j in judge.parts] if isinstance(judge, WeightedJudges) else [judge]:
        check = getattr(part, "check_prompts", None)
        if callable(check):
            check(prompts)


def load_judge(spec: str, world: str | Path, batch_size: int = 16, device: torch.device | str = "cpu") -> Judge:
    """The judge ``spec`` names: ``world`` (the rule judge of the world at ``world``, from its ground truth),
    ``rm:DIR`` (a reward model from ``mmalign train rm``, which sees the image), ``module:function`` /
    ``file.py:function`` (a user's Python function, named on the command line), or a weighted sum of those:
    ``W*SPEC+W*SPEC+...`` (a weight is a plain decimal, 1 when left out; a path holding ``+`` cannot be part of a sum).

    Raises:
        ConfigError: ``world`` without a world's ``chair_vocab.json``, an empty part of a sum; ModelError: ``rm:DIR``
            is not a reward model.
    """
    terms = spec.split("+")
    if len(terms) > 1 or _WEIGHT.match(spec):
        parts: list[tuple[float, Judge]] = []
        for term in terms:
            found = _WEIGHT.match(term)
            weight, name = (float(found.group(1)), found.group(2)) if found else (1.0, term.strip())
            if not name:
                raise ConfigError(f"judge {spec!r}: an empty term in the sum")
            parts.append((weight, load_judge(name, world, batch_size, device)))
        return WeightedJudges(parts)
    if spec == "world":
        from mmalign.judges.rules import ObjectJudge

        if not (Path(world) / "chair_vocab.json").exists():
            raise ConfigError(f"judge=world: {world} holds no chair_vocab.json (set world=DIR)")
        return ObjectJudge.for_world(world)
    if spec.startswith("rm:"):
        from mmalign.judges.reward import RewardModelJudge

        return RewardModelJudge.load(spec.removeprefix("rm:"), batch_size=batch_size, device=device)
    from mmalign.judges.python import FunctionJudge

    return FunctionJudge.load(spec)
