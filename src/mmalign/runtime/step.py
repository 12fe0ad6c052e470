"""The end of a training step, one implementation for every recipe.

``StepEnd(...)(step, values, lr)`` takes the values a step measured (its loss and metrics, already averaged over the
step's micro-batches) and does what follows the backward passes, in this order: the values' mean over processes
(each process saw its own slice of the batch; a value only some processes measured is the mean over those), a check
that the loss is finite (else ``TrainingError``, before any weight changes), gradient clipping (``grad_norm`` joins
the values; a non-finite norm stops the run the same way), the optimizer step, the progress bar, a metrics line every
``log_every`` steps and at the last step (each value's mean over the steps since the previous line that measured it,
with ``lr`` and ``elapsed_s``), and the periodic checkpoint.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from typing import Any

import torch

from mmalign.config import TrainConfig
from mmalign.errors import TrainingError
from mmalign.runtime.metrics import MetricsLog
from mmalign.runtime.run import maybe_checkpoint


class StepEnd:
    """The shared end of a step (see the module docstring).

    Args:
        cfg: the run's config (``steps``, ``log_every``, ``max_grad_norm``, ``save_every``).
        optimizer: stepped and zeroed.
        metrics: the run's metrics log (``None`` on processes that do not write it).
        bar: the run's progress bar.
        model: the trained model (accelerate-wrapped); with ``accelerator``, its periodic checkpoints are written.
        params: the parameters whose gradients are clipped (default: ``model``'s).
        accelerator: reduces over processes and clips (``None``: a single-process recipe on plain torch).
        show: values shown on the progress bar.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        optimizer: torch.optim.Optimizer,
        metrics: MetricsLog | None,
        bar: Any,
        *,
        model: Any = None,
        params: Iterable[torch.nn.Parameter] | None = None,
        accelerator: Any = None,
        show: tuple[str, ...] = ("loss",),
    ) -> None:
        self.cfg, self.optimizer, self.model = cfg, optimizer, model
        self.params = list(params if params is not None else model.parameters())
        self.metrics, self.bar, self.accelerator, self.show = metrics, bar, accelerator, show
        self.t0 = time.perf_counter()
        self._window: dict[str, list[float]] = {}  # key → [sum, steps that measured it]

    def elapsed(self) -> float:
        """Seconds since the run's steps began."""
        return time.perf_counter() - self.t0

    def update(self) -> float | None:
        """Gradient clipping and one optimizer step (the step's, or one of several in a step, as PPO's epochs take);
        returns the gradient norm before clipping when ``max_grad_norm`` is set."""
        acc, grad_norm = self.accelerator, None
        if self.cfg.max_grad_norm:
            clip = acc.clip_grad_norm_ if acc is not None else torch.nn.utils.clip_grad_norm_
            grad_norm = float(clip(self.params, self.cfg.max_grad_norm))
            if not math.isfinite(grad_norm):
                self.optimizer.zero_grad(set_to_none=True)
                raise TrainingError(f"the gradient norm is {grad_norm}; stopped before the step (lower lr?)")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def __call__(self, step: int, values: dict[str, float], lr: float) -> dict[str, float]:
        """Finish step ``step`` (0-based); returns the step's values as logged (reduced, with ``grad_norm``)."""
        acc, cfg = self.accelerator, self.cfg
        if acc is not None and acc.num_processes > 1:
            values = _mean_over_processes(acc, values)
        if not math.isfinite(values.get("loss", 0.0)):
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingError(
                f"step {step + 1}: the loss is {values['loss']}; stopped before the step, the weights are the last "
                "good step's (lower lr or beta, or look for a broken row)"
            )
        grad_norm = self.update()
        if grad_norm is not None:
            values = {**values, "grad_norm": grad_norm}
        self.bar.update(1)
        self.bar.set_postfix({k: _short(values[k]) for k in self.show if k in values}, refresh=False)
        for key, value in values.items():
            total = self._window.setdefault(key, [0.0, 0])
            total[0] += value
            total[1] += 1
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            if self.metrics is not None:
                mean = {k: s / n for k, (s, n) in self._window.items()}
                self.metrics.write(done, {**mean, "lr": lr, "elapsed_s": self.elapsed()})
            self._window = {}
        if acc is not None and self.model is not None:
            maybe_checkpoint(acc, self.model, self.optimizer, cfg, done)
        return values


def _short(value: float) -> str:
    return f"{value:.3f}" if abs(value) < 1000 else f"{value:.0f}"


def _mean_over_processes(accelerator: Any, values: dict[str, float]) -> dict[str, float]:
    """Each value's mean over the processes that measured it (the key sets may differ between processes)."""
    from accelerate.utils import gather_object

    keys = sorted({k for ks in gather_object([sorted(values)]) for k in ks})
    if not keys:
        return values
    local = torch.tensor(
        [[values.get(k, 0.0) for k in keys], [float(k in values) for k in keys]], device=accelerator.device
    )
    sums, counts = accelerator.reduce(local, "sum").tolist()
    return {k: s / n for k, s, n in zip(keys, sums, counts) if n}
