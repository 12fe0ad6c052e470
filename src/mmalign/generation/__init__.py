"""Sampling replies from a VLM: the ``Generator`` role, its Hugging Face implementation, and vLLM when installed."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from mmalign.generation.sampling import GREEDY, SamplingParams
from mmalign.types import Rollout, Sample

__all__ = ["GREEDY", "Generator", "SamplingParams"]


class Generator(Protocol):
    """Anything that samples ``n`` replies per prompt (the HF loop, vLLM, a stub in tests)."""

    def generate(
        self,
        prompts: Sequence[Sample],
        n: int = 1,
        *,
        params: SamplingParams = ...,
        prefixes: Sequence[str] | None = None,
        image_drop: float = 0.0,
    ) -> list[list[Rollout]]: ...
