"""Judges: score replies to prompts, higher is better. Online DPO ranks its samples with one.

The role is one method, ``score(prompts, replies) -> list[float]``, so a rule judge from ground truth, a user's Python
function and a reward model (``judges.reward``) are interchangeable.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from mmalign.types import Sample


class Judge(Protocol):
    """Scores ``replies[i]`` as an answer to ``prompts[i]`` (higher is better)."""

    def score(self, prompts: Sequence[Sample], replies: Sequence[str]) -> list[float]: ...
