"""A reward-model judge: online DPO ranks its samples by a reward model that sees the image (``mmalign train rm``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from mmalign.data.collate import encode_sft
from mmalign.data.pair_inputs import encode_continuations
from mmalign.errors import ConfigError
from mmalign.models.load import load_model
from mmalign.reward import RewardScorer, load_head, reads_facts, writes_critiques
from mmalign.types import Message, Sample


class RewardModelJudge:
    """score = the reward model's reward of each (prompt with its images, reply), in batches of ``batch_size``."""

    def __init__(self, scorer: RewardScorer, processor: Any, batch_size: int = 16) -> None:
        self.scorer, self.processor, self.batch_size = scorer, processor, batch_size

    @classmethod
    def load(cls, path: str | Path, batch_size: int = 16, device: torch.device | str = "cpu") -> RewardModelJudge:
        """The judge of the reward model saved at ``path``, on ``device`` (the training process's).

        Raises:
            ModelError: not a reward model. ConfigError: a fact-augmented one (online prompts carry no facts).
        """
        if reads_facts(path):
            raise ConfigError(f"{path}: a fact-augmented reward model needs facts, which online prompts do not carry")
        if writes_critiques(path):
            raise ConfigError(f"{path}: a critique reward model cannot judge samples yet (use a plain one)")
        loaded = load_model(path)
        load_head(loaded)
        return cls(RewardScorer(loaded.model.eval().to(device)), loaded.processor, batch_size)

    def score(self, prompts: Sequence[Sample], replies: Sequence[str]) -> list[float]:
        out: list[float] = []
        device = next(self.scorer.parameters()).device
        with torch.no_grad():
            for start in range(0, len(prompts), self.batch_size):
                chunk = [replace(p, messages=p.prompt_messages) for p in prompts[start : start + self.batch_size]]
                texts = replies[start : start + self.batch_size]
                if self.scorer.share_prompt:
                    cont = encode_continuations(self.processor, chunk, [[t] for t in texts]).to(device)
                    rewards = self.scorer.reply_rewards(cont)
                else:
                    whole = [replace(p, messages=(*p.messages, Message.assistant(t))) for p, t in zip(chunk, texts)]
                    enc = {k: v.to(device) for k, v in encode_sft(self.processor, whole).items()}
                    rewards = self.scorer.sequence_rewards(enc)
                out.extend(rewards.tolist())
        return out
