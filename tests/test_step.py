"""The shared end of a training step: clipping, the optimizer step, window-mean metrics lines, the bar."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
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


class _TwoProcesses:
    """An accelerator stand-in for two processes: this one and a peer whose values are given."""

    num_processes, device = 2, "cpu"

    def __init__(self, peer: dict[str, float]) -> None:
        self.peer = peer

    def reduce(self, tensor: torch.Tensor, reduction: str) -> torch.Tensor:
        assert reduction == "sum"
        keys = self.keys
        other = torch.tensor([[self.peer.get(k, 0.0) for k in keys], [float(k in self.peer) for k in keys]])
        return tensor + other

    def clip_grad_norm_(self, params, max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)


def test_values_some_processes_did_not_measure_are_the_mean_of_those_that_did(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Online DPO's judge scores exist only where a micro-step sampled: never averaged with absent zeros."""
    import accelerate.utils

    peer = {"loss": 3.0, "objective/scores": 0.5}
    acc = _TwoProcesses(peer)
    monkeypatch.setattr(accelerate.utils, "gather_object", lambda objs: [*objs, sorted(peer)])
    acc.keys = sorted({"loss", "objective/scores"})
    weight = torch.nn.Parameter(torch.tensor([0.0]))
    metrics = MetricsLog(tmp_path / "metrics.jsonl")
    end = StepEnd(TrainConfig(steps=2, log_every=2, max_grad_norm=0.0), torch.optim.SGD([weight], lr=1.0), metrics,
                  _Bar(), params=[weight], accelerator=acc)  # fmt: skip
    weight.grad = torch.tensor([1.0])
    assert end(0, {"loss": 1.0}, lr=1.0) == {"loss": 2.0, "objective/scores": 0.5}
    peer.pop("objective/scores")
    acc.keys = ["loss"]
    weight.grad = torch.tensor([1.0])
    assert end(1, {"loss": 5.0}, lr=1.0) == {"loss": 4.0}
    metrics.close()
    (line,) = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # loss: mean of the two steps (2, 4); the score: its one step, not halved by the step without it.
    assert line["loss"] == 3.0 and line["objective/scores"] == 0.5


def test_a_scaled_parameter_group_keeps_its_scale_through_the_schedule() -> None:
    """PPO's value head trains at ``lr_scale`` × the learning rate, whatever ``set_lr`` sets; ``StepEnd.update``
    steps every group."""
    from mmalign.runtime.optim import make_optimizer, set_lr

    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
    head = tuple(model[1].parameters())
    opt = make_optimizer(model, 1e-3, 0.01, head, lr_scale=20.0)
    assert [len(g["params"]) for g in opt.param_groups] == [1, 1, 2]  # weight, bias, the head's two tensors
    assert opt.param_groups[2]["lr"] == pytest.approx(2e-2) and opt.param_groups[2]["weight_decay"] == 0.0
    set_lr(opt, 5e-4)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([5e-4, 5e-4, 1e-2])
    model(torch.ones(1, 3)).sum().backward()
    before = model[1].weight.detach().clone()
    end = StepEnd(TrainConfig(model="m", data="d", out="o", max_grad_norm=0.0), opt, None, _Bar(), model=model)
    assert end.update() is None  # no clipping asked, no norm
    assert not torch.equal(before, model[1].weight) and model[1].weight.grad is None


def test_a_non_finite_loss_or_gradient_stops_the_run_before_the_step() -> None:
    from mmalign.errors import TrainingError

    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    end = StepEnd(TrainConfig(model="m", data="d", out="o", max_grad_norm=1.0), opt, None, _Bar(), model=model)
    before = model.weight.detach().clone()
    model(torch.ones(1, 2)).sum().backward()
    with pytest.raises(TrainingError, match="step 3: the loss is nan"):
        end(2, {"loss": float("nan")}, 0.1)
    assert torch.equal(model.weight, before) and model.weight.grad is None
    model.weight.grad = torch.full_like(model.weight, float("inf"))
    with pytest.raises(TrainingError, match="the gradient norm is"):
        end(2, {"loss": 1.0}, 0.1)
    assert torch.equal(model.weight, before)


@pytest.mark.parametrize("override", ["lr=.inf", "lr=nan", "beta=.inf", "beta=-.inf"])
def test_infinite_or_nan_settings_are_refused(override: str) -> None:
    from mmalign.config import load_config
    from mmalign.errors import ConfigError
    from mmalign.recipes.dpo import DpoConfig

    with pytest.raises(ConfigError, match="finite number"):
        load_config(DpoConfig, flags={"model": "m", "data": "d", "out": "o"}, overrides=[override])


def test_resume_drops_a_torn_metrics_line_and_later_steps(tmp_path: Path) -> None:
    """A run killed mid-write leaves half a line; resuming keeps the readable rows up to the resumed step."""
    from mmalign.runtime.metrics import read_metrics

    path = tmp_path / "metrics.jsonl"
    lines = ['{"step": 1, "loss": 1.0}', '{"step": 2, "loss": 0.9}', "[1, 2]", '{"step": 3, "loss": 0.8}']
    lines.append('{"step": 4, "lo')  # torn
    path.write_text("\n".join(lines))
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]
    log = MetricsLog(path, resume_step=2)
    log.write(3, {"loss": 0.7})
    assert [(r["step"], r["loss"]) for r in read_metrics(path)] == [(1, 1.0), (2, 0.9), (3, 0.7)]
    assert all(json.loads(line) for line in path.read_text().splitlines())
