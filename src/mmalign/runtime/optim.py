"""Optimizer and learning-rate schedule."""

from __future__ import annotations

import math

import torch


def make_optimizer(
    model: torch.nn.Module,
    lr: float,
    weight_decay: float,
    scaled: tuple[torch.nn.Parameter, ...] = (),
    lr_scale: float = 1.0,
) -> torch.optim.Optimizer:
    """AdamW over trainable parameters; no weight decay on biases and norms (1-D tensors). The ``scaled`` parameters
    (PPO's value head) form their own group, trained at ``lr_scale`` times the learning rate (``set_lr`` keeps it)."""
    apart = {id(p) for p in scaled}
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad and id(p) not in apart:
            (no_decay if p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if scaled:
        groups.append({"params": list(scaled), "weight_decay": 0.0, "lr_scale": lr_scale, "lr": lr * lr_scale})
    # foreach: one call per step for all tensors instead of a Python loop over them (the default on GPUs). On a CPU
    # it runs the same per-tensor kernels, so the weights are bit for bit those of the loop, in less time; the fused
    # kernel would be faster still but rounds differently (docs/design.md).
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, foreach=True)


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the base learning rate at ``step`` (linear warm-up, then the schedule)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group's learning rate: ``lr``, times the group's ``lr_scale`` where it has one."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
