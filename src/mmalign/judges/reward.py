"""A reward-model judge: online DPO and RL score their samples with a reward model that sees the image (``mmalign
train rm``). A fact-augmented reward model (Fact-RLHF) reads each prompt's ``meta["facts"]`` (reference statements
about its image) as it did in training; a prompt without them is an error naming it."""

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
from mmalign.reward import RewardScorer, facts_in_prompt, load_head, reads_facts, writes_critiques
from mmalign.types import Message, Sample


class RewardModelJudge:
    """score = the reward model's reward of each (prompt with its images [and facts], reply), in batches of
    ``batch_size``."""

    def __init__(self, scorer: RewardScorer, processor: Any, batch_size: int = 16, facts: bool = False) -> None:
        self.scorer, self.processor, self.batch_size, self.facts = scorer, processor, batch_size, facts

    @classmethod
    def load(cls, path: str | Path, batch_size: int = 16, device: torch.device | str = "cpu") -> RewardModelJudge:
        """The judge of the reward model saved at ``path``, on ``device`` (the training process's).

        Raises:
            ModelError: not a reward model. ConfigError: a critique reward model.
        """
        if writes_critiques(path):
            raise ConfigError(f"{path}: a critique reward model cannot judge samples yet (use a plain one)")
        loaded = load_model(path)
        load_head(loaded)
        return cls(RewardScorer(loaded.model.eval().to(device)), loaded.processor, batch_size, reads_facts(path))

    def score(self, prompts: Sequence[Sample], replies: Sequence[str]) -> list[float]:
        """Consecutive replies to the same prompt (a group of samples) are scored with that prompt and its image
        encoded once."""
        runs: list[tuple[Sample, list[str]]] = []
        for prompt, reply in zip(prompts, replies):
            if runs and runs[-1][0] is prompt:
                runs[-1][1].append(reply)
            else:
                runs.append((prompt, [reply]))
        out: list[float] = []
        with torch.no_grad():
            for chunk in _chunks(runs, self.batch_size):
                out.extend(self._score_runs(chunk).tolist())
        return out

    def _score_runs(self, runs: list[tuple[Sample, list[str]]]) -> torch.Tensor:
        """Rewards of runs that all hold the same number of replies, prompt by prompt."""
        device = next(self.scorer.parameters()).device
        asks = [replace(p, messages=self._prompt(p)) for p, _ in runs]
        if self.scorer.share_prompt:
            cont = encode_continuations(self.processor, asks, [texts for _, texts in runs]).to(device)
            return self.scorer.reply_rewards(cont)
        whole = [replace(p, messages=(*p.messages, Message.assistant(t))) for p, (_, texts) in zip(asks, runs)
                 for t in texts]  # fmt: skip
        enc = {k: v.to(device) for k, v in encode_sft(self.processor, whole).items()}
        return self.scorer.sequence_rewards(enc)

    def check_prompts(self, prompts: Sequence[Sample]) -> None:
        """A fact-augmented model: raise ``ConfigError`` naming the first prompt without ``meta.facts``."""
        if self.facts:
            for sample in prompts:
                _facts(sample)

    def _prompt(self, sample: Sample) -> tuple[Message, ...]:
        """The turns the reward model reads before a reply: the prompt, with the sample's facts when it reads facts."""
        if not self.facts:
            return sample.prompt_messages
        return facts_in_prompt(sample.prompt_messages, _facts(sample))


def _facts(sample: Sample) -> list[str]:
    """The sample's ``meta.facts``; ``ConfigError`` naming it when they are missing or not a list of strings."""
    facts = sample.meta.get("facts")
    if not isinstance(facts, list) or not facts or not all(isinstance(f, str) for f in facts):
        raise ConfigError(
            f"a fact-augmented reward model needs facts: prompt {sample.id!r} has no meta.facts (a list of strings)"
        )
    return facts


def _chunks(runs: list[tuple[Sample, list[str]]], batch_size: int) -> list[list[tuple[Sample, list[str]]]]:
    """Consecutive runs of equal size, at most ``batch_size`` replies a chunk (a run is never split)."""
    chunks: list[list[tuple[Sample, list[str]]]] = []
    for run in runs:
        last = chunks[-1] if chunks else None
        if last and len(last[0][1]) == len(run[1]) and (len(last) + 1) * len(run[1]) <= batch_size:
            last.append(run)
        else:
            chunks.append([run])
    return chunks
