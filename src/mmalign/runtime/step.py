"""The end of a training step, one implementation for every recipe.

``StepEnd(...)(step, values, lr)`` takes the values a step measured (its loss and metrics, already averaged over the
step's micro-batches) and does what follows the backward passes, in this order: the values' mean over processes
(each process saw its own slice of the batch), gradient clipping (``grad_norm`` joins the values), the optimizer step,
the progress bar, a metrics line every ``log_every`` steps and at the last step (the mean of the values over the steps
since the previous line, with ``lr`` and ``elapsed_s``), and the periodic checkpoint.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import torch

from mmalign.config import TrainConfig
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
        self._window: dict[str, float] = {}
        self._steps = 0

    def elapsed(self) -> float:
        """Seconds since the run's steps began."""
        return time.perf_counter() - self.t0

    def __call__(self, step: int, values: dict[str, float], lr: float) -> dict[str, float]:
        """Finish step ``step`` (0-based); returns the step's values as logged (reduced, with ``grad_norm``)."""
        acc, cfg = self.accelerator, self.cfg
        if acc is not None and acc.num_processes > 1 and values:
            keys = sorted(values)
            reduced = acc.reduce(torch.tensor([values[k] for k in keys], device=acc.device), "mean")
            values = dict(zip(keys, reduced.tolist()))
        if cfg.max_grad_norm:
            clip = acc.clip_grad_norm_ if acc is not None else torch.nn.utils.clip_grad_norm_
            values = {**values, "grad_norm": float(clip(self.params, cfg.max_grad_norm))}
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.bar.update(1)
        self.bar.set_postfix({k: f"{values[k]:.3f}" for k in self.show if k in values})
        for key, value in values.items():
            self._window[key] = self._window.get(key, 0.0) + value
        self._steps += 1
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            if self.metrics is not None:
                mean = {k: v / self._steps for k, v in self._window.items()}
                self.metrics.write(done, {**mean, "lr": lr, "elapsed_s": self.elapsed()})
            self._window, self._steps = {}, 0
        if acc is not None and self.model is not None:
            maybe_checkpoint(acc, self.model, self.optimizer, cfg, done)
        return values
