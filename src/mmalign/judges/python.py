"""A judge that calls the user's own Python function ``fn(prompt: Sample, reply: str) -> float``."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from mmalign.errors import ConfigError
from mmalign.types import Sample


@dataclass
class FunctionJudge:
    """Scores each reply with ``fn(prompt, reply)``; any float, higher is better."""

    fn: Callable[[Sample, str], float]

    @classmethod
    def load(cls, spec: str) -> FunctionJudge:
        """``module.path:function`` or ``path/to/file.py:function``.

        Raises:
            ConfigError: the module, file or function cannot be found, or is not callable.
        """
        target, sep, name = spec.rpartition(":")
        if not sep or not target or not name:
            raise ConfigError(f"judge {spec!r}: expected 'module:function' or 'file.py:function'")
        try:
            if target.endswith(".py"):
                path = Path(target)
                if not path.exists():
                    raise ConfigError(f"judge {spec!r}: no file {path}")
                module_spec = importlib.util.spec_from_file_location(f"mmalign_judge_{path.stem}", path)
                assert module_spec is not None and module_spec.loader is not None
                module = importlib.util.module_from_spec(module_spec)
                module_spec.loader.exec_module(module)
            else:
                module = importlib.import_module(target)
        except ImportError as e:
            raise ConfigError(f"judge {spec!r}: cannot import {target}: {e}") from None
        fn = getattr(module, name, None)
        if not callable(fn):
            raise ConfigError(f"judge {spec!r}: {target} has no function {name!r}")
        return cls(fn)

    def score(self, prompts: Sequence[Sample], replies: Sequence[str]) -> list[float]:
        return [float(self.fn(p, r)) for p, r in zip(prompts, replies)]
