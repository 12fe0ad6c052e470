"""Projector pretraining (modality alignment): caption data, vision tower and language model frozen.

The training loop is the supervised one of ``recipes/sft.py``; only the defaults differ (the first of the usual two
stages: projector only, high learning rate).
"""

from __future__ import annotations

import sys
from pathlib import Path

from pydantic import Field

from mmalign.config import FreezeConfig, TrainConfig
from mmalign.recipes import sft
from mmalign.runtime.launch import Recipe
from mmalign.runtime.launch import main as launch_main


class PretrainConfig(TrainConfig):
    """Projector alignment on captions: only the projector trains."""

    lr: float = Field(1e-3, gt=0)
    freeze: FreezeConfig = Field(default_factory=lambda: FreezeConfig(vision=True, projector=False, llm=True))


def train(cfg: TrainConfig) -> Path:
    """Run projector pretraining; returns the final model directory."""
    return sft.train(cfg)


RECIPE = Recipe("pretrain", PretrainConfig, train, "projector alignment on captions")

if __name__ == "__main__":
    sys.exit(launch_main(RECIPE, sys.argv[1:]))
