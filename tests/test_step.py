"""The shared end of a training step: clipping, the optimizer step, window-mean metrics lines, the bar."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mmalign.config import TrainConfig
from mmalign.runtime.metrics import MetricsLog
from mmalign.runtime.step import StepEnd


class _Bar:
    def __init__(self) -> None:
        self.n, self.postfix = 0, {}

    def update(self, n: int) -> None:
        self.n += n

    def set_postfix(self, values: dict, **_: object) -> None:
        self.postfix = values


def test_step_end_clips_steps_and_logs_window_means(tmp_path: Path) -> None:
    weight = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
    optimizer = torch.optim.SGD([weight], lr=0.5)
    cfg = TrainConfig(steps=3, log_every=2, max_grad_norm=1.0)
    metrics, bar = MetricsLog(tmp_path / "metrics.jsonl"), _Bar()
    end = StepEnd(cfg, optimizer, metrics, bar, params=[weight])
    losses = [4.0, 2.0, 3.0]
    for step, loss in enumerate(losses):
        weight.grad = torch.tensor([3.0, 4.0])  # norm 5, clipped to norm 1: (0.6, 0.8)
        logged = end(step, {"loss": loss}, lr=0.5)
        assert logged["grad_norm"] == 5.0 and weight.grad is None  # zeroed after the step
    metrics.close()
    # Three SGD steps of 0.5 * (0.6, 0.8).
    assert torch.allclose(weight.detach(), torch.tensor([1.0 - 3 * 0.3, 1.0 - 3 * 0.4]))
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [2, 3]
    assert lines[0]["loss"] == 3.0 and lines[1]["loss"] == 3.0  # mean of 4 and 2, then 3 alone
    assert lines[0]["lr"] == 0.5 and lines[0]["grad_norm"] == 5.0 and "elapsed_s" in lines[0]
    assert bar.n == 3 and bar.postfix == {"loss": "3.000"}


def test_step_end_without_clipping_leaves_the_gradient_whole(tmp_path: Path) -> None:
    weight = torch.nn.Parameter(torch.tensor([0.0]))
    end = StepEnd(
        TrainConfig(steps=1, max_grad_norm=0.0), torch.optim.SGD([weight], lr=1.0), None, _Bar(), params=[weight]
    )
    weight.grad = torch.tensor([10.0])
    assert "grad_norm" not in end(0, {"loss": 1.0}, lr=1.0)
    assert weight.item() == -10.0
