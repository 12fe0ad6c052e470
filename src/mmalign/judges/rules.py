"""A rule judge from ground truth: count the objects a reply invents and the ones it leaves out."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mmalign.errors import DataError
from mmalign.eval.coco_vocab import ChairVocab, extract_mentions
from mmalign.types import Sample


@dataclass
class ObjectJudge:
    """score = −(hallucination_weight · #objects mentioned but absent + miss_weight · #objects present but unmentioned).

    Objects are matched as CHAIR matches them (synonyms, plurals) with the given vocabulary; each category counts once
    per reply. The ground truth of a prompt is ``sample.meta["objects"]`` (world samples carry it).

    The default weights make an invented object cost twice a missed one: the aim is fewer hallucinations without
    rewarding replies that say nothing.
    """

    vocab: ChairVocab
    hallucination_weight: float = 1.0
    miss_weight: float = 0.5

    @classmethod
    def for_world(cls, world: str | Path, **weights: float) -> ObjectJudge:
        """The judge for a world written by ``mmalign world`` (its ``chair_vocab.json``)."""
        return cls(ChairVocab.from_file(Path(world) / "chair_vocab.json"), **weights)

    def counts(self, prompt: Sample, reply: str) -> tuple[int, int]:
        """(hallucinated, missed) categories of ``reply``."""
        truth = prompt.meta.get("objects") if prompt.meta else None
        if truth is None:
            raise DataError(str(prompt.root or ""), None, "meta.objects", f"sample {prompt.id!r} has no ground truth")
        present = {c for c in (self.vocab.canonical(o) for o in truth) if c is not None}
        mentioned = set(extract_mentions(reply, self.vocab))
        return len(mentioned - present), len(present - mentioned)

    def score(self, prompts: Sequence[Sample], replies: Sequence[str]) -> list[float]:
        out = []
        for prompt, reply in zip(prompts, replies):
            hallucinated, missed = self.counts(prompt, reply)
            out.append(-(self.hallucination_weight * hallucinated + self.miss_weight * missed))
        return out
