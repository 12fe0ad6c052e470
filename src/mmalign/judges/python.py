"""A judge that calls the user's own Python function ``fn(prompt: Sample, reply: str) -> float``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mmalign.types import Sample
from mmalign.userfn import load_function


@dataclass
class FunctionJudge:
    """Scores each reply with ``fn(prompt, reply)``; any float, higher is better."""

    fn: Callable[[Sample, str], float]

    @classmethod
    def load(cls, spec: str) -> FunctionJudge:
        """``module.path:function`` or ``path/to/file.py:function`` (``mmalign.userfn.load_function``).

        Raises:
            ConfigError: the module, file or function cannot be found, or is not callable.
        """
        return cls(load_function(spec, "judge"))

    def score(self, prompts: Sequence[Sample], replies: Sequence[str]) -> list[float]:
        return [float(self.fn(p, r)) for p, r in zip(prompts, replies)]
