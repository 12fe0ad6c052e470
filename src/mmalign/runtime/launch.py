"""Run training jobs on the cores a machine has: a recipe in N data-parallel processes, or whole jobs side by side.

``run_recipe(recipe, flags, overrides, processes=N)`` trains in this process (N = 1) or in N processes under
``torchrun`` (DDP; gloo on a CPU): the standard ``torch.distributed`` launcher and the recipes' own accelerate
set-up, nothing home-made. ``batch_size`` in the flags is the *global* batch; each process takes ``batch_size / N``
(the recipes count ``batch_size`` per process). A recipe is a ``Recipe`` record its module declares; each process
runs ``python -m <the recipe's module> key=value ...``, whose ``__main__`` block calls ``main(RECIPE, argv)``.

``run_side_by_side(fn, jobs, processes)`` runs independent jobs (a preference run and its evaluation) in a pool of
single-thread processes: on a small CPU, small models gain little from a second thread or a second data-parallel
process, while two single-thread jobs each run at nearly full speed (docs/results.md).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recipe:
    """A training recipe: its command name, its config class and its ``train(cfg) -> final model directory``."""

    name: str
    config: type
    train: Callable[[Any], Path]
    help: str = ""
    # Trains data-parallel under torchrun (accelerate); a single-process recipe refuses ``processes > 1``.
    distributed: bool = True

    @property
    def module(self) -> str:
        """The module whose ``python -m`` runs one process of this recipe."""
        return self.train.__module__


class LaunchError(RuntimeError):
    """A multi-process run exited with an error (its own log, printed above, says why)."""


def default_processes() -> int:
    """Processes a CPU job should train with: two where there are two cores (one process per GPU is the user's
    ``accelerate launch``/``torchrun`` choice), else one."""
    import torch

    if torch.cuda.is_available():
        return 1
    return max(1, min(2, os.cpu_count() or 1))


def single_thread_worker() -> None:
    """Initializer for worker processes that run whole jobs side by side (one thread each, logging on)."""
    import torch

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")


def run_side_by_side(
    fn: Callable[..., Any], jobs: dict[str, tuple[Any, ...]], processes: int
) -> Iterator[tuple[str, Any]]:
    """Yield ``(name, fn(*args))`` for every job, as each finishes.

    With ``processes`` > 1 the jobs run in a pool of that many spawned processes, one thread each (``fn`` and its
    arguments must pickle); otherwise one after another in this process, in order.
    """
    if processes <= 1:
        for name, args in jobs.items():
            yield name, fn(*args)
        return
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from multiprocessing import get_context

    log.info("%s: %d side by side, one thread each", ", ".join(jobs), processes)
    with ProcessPoolExecutor(processes, mp_context=get_context("spawn"), initializer=single_thread_worker) as pool:
        futures = {pool.submit(fn, *args): name for name, args in jobs.items()}
        for future in as_completed(futures):
            yield futures[future], future.result()


def _as_override(key: str, value: Any) -> str:
    if isinstance(value, bool):
        return f"{key}={'true' if value else 'false'}"
    return f"{key}={value}"


def run_recipe(recipe: Recipe, flags: dict[str, Any], overrides: Sequence[str] = (), processes: int = 1) -> Path:
    """Train with ``recipe``; returns the final model directory.

    Args:
        flags: config values (``batch_size`` is the global batch); ``None`` values are ignored.
        overrides: extra ``key=value`` strings (dotted keys for sections).
        processes: 1 runs in this process; N > 1 runs N processes under ``torch.distributed.run``, each with one
            thread, and waits for them.

    Raises:
        ValueError: the global batch does not split evenly over the processes.
        LaunchError: the processes exited with an error.
    """
    from mmalign.config import load_config

    cls, name = recipe.config, recipe.name
    if processes > 1 and not recipe.distributed:
        raise ValueError(f"recipe {name} runs in one process; run it with processes=1")
    if processes <= 1:
        return recipe.train(load_config(cls, flags=flags, overrides=list(overrides)))
    flags = {k: v for k, v in flags.items() if v is not None}
    batch = int(flags.get("batch_size", cls().batch_size))
    if batch % processes:
        raise ValueError(f"batch_size {batch} does not split over {processes} processes")
    flags["batch_size"] = batch // processes
    # Validate here, so that a bad value fails once with a clear message instead of once per process.
    cfg = load_config(cls, flags=flags, overrides=list(overrides))
    args = [_as_override(k, v) for k, v in flags.items()] + list(overrides)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
        "-m", recipe.module, *args,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    log.info("%s: %d processes (torchrun, one thread each)", name, processes)
    done = subprocess.run(cmd, env=env, check=False)
    if done.returncode != 0:
        raise LaunchError(f"{name} with {processes} processes failed (exit {done.returncode}); see its log above")
    return Path(cfg.out) / "model"


def main(recipe: Recipe, argv: Sequence[str]) -> int:
    """Entry point of one process of ``recipe``: ``key=value ...`` (a recipe module's ``__main__`` block)."""
    from mmalign.config import load_config
    from mmalign.errors import ConfigError, DataError, ModelError, TrainingError

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        recipe.train(load_config(recipe.config, overrides=list(argv)))
    except (DataError, ConfigError, ModelError, TrainingError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0
