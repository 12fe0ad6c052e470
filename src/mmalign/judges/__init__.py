"""Judges: score replies to prompts, higher is better. Online DPO ranks its samples with one.

The role is one method, ``score(prompts, replies) -> list[float]``, so a rule judge from ground truth, a user's Python
function and a reward model (``judges.reward``) are interchangeable.
"""

from __future__ import annotations

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


def load_judge(spec: str, world: str | Path, batch_size: int = 16, device: torch.device | str = "cpu") -> Judge:
    """The judge ``spec`` names: ``world`` (the rule judge of the world at ``world``, from its ground truth),
    ``rm:DIR`` (a reward model from ``mmalign train rm``, which sees the image) or ``module:function`` /
    ``file.py:function`` (a user's Python function, named on the command line).

    Raises:
        ConfigError: ``world`` without a world's ``chair_vocab.json``; ModelError: ``rm:DIR`` is not a reward model.
    """
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
