"""BDHS — bias-driven hallucination sampling (Amirloo et al., arXiv 2407.02477, §3.4): rejected replies without
annotators.

For a prompt with a ground-truth answer y⁺, the model itself writes the rejected reply ỹ⁻ while it can barely see
the image, so what it writes comes from its language prior — the hallucinations DPO should then push down:

* the image is hidden by masking each image token from attention with probability ρ (default 0.99; §3.4.1), or, as
  variants, noised (BDHS_noise, App. E.1) or removed altogether;
* reference-guided generation (§3.4.2, Alg. 1): y⁺ is split into sentences; for each sentence a random word boundary
  is drawn, the ground-truth words before it (after the ground-truth earlier sentences) are forced, and the model
  continues to the end of the sentence; a sentence starting with yes/no has that word swapped with probability 0.5;
  the continued sentences are joined;
* similarity filter (§3.4.3): ỹ⁻ is accepted when its cosine similarity to y⁺ is below ε (default 0.97); otherwise a
  new mask and new split points are drawn, up to N iterations (default 5), the last one without guidance, whose
  output is kept whatever its similarity.

Choices the paper leaves open (ours): word-boundary split points, uniform over 0..words−1 (at least one word is
generated); sentences split after ".", "!" or "?" followed by white space; greedy continuations (the prior's most
likely words; retries differ through the new mask and split points).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from mmalign.generation import Generator
from mmalign.generation.embed import Embedder, cosine
from mmalign.generation.sampling import SamplingParams
from mmalign.types import ImageRef, PreferencePair, Sample

Guidance = Literal["reference", "none"]
Corruption = Literal["mask", "noise", "remove"]

_SENTENCE = re.compile(r"(?<=[.!?])\s+")
_YES_NO = re.compile(r"^\s*(Yes|yes|No|no)\b")
_SWAP = {"Yes": "No", "yes": "no", "No": "Yes", "no": "yes"}


@dataclass(frozen=True)
class BdhsConfig:
    """BDHS settings (defaults from the paper where it gives them).

    Attributes:
        rho: probability that each image token is hidden (``corruption="mask"``).
        epsilon: accept a rejected reply whose cosine similarity to the chosen one is below this.
        iterations: most generation rounds per example; with more than one, the last is unguided.
        guidance: ``reference`` (continue ground-truth prefixes) or ``none`` (write the whole reply).
        corruption: how the image is hidden: ``mask`` (attention), ``noise`` (diffusion noise, ``noise_steps``),
            or ``remove`` (no image at all; a baseline).
        noise_steps: diffusion steps for ``corruption="noise"`` (paper: 500).
        temperature: sampling temperature of the continuations (0 = greedy).
        max_new_tokens: per continued sentence; an unguided reply may use twice the chosen reply's words + 16.
        seed: seed of split points, swaps, masks and noise.
    """

    rho: float = 0.99
    epsilon: float = 0.97
    iterations: int = 5
    guidance: Guidance = "reference"
    corruption: Corruption = "mask"
    noise_steps: int = 500
    temperature: float = 0.0
    max_new_tokens: int = 48
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.rho <= 1:
            raise ValueError(f"rho must be in [0, 1], got {self.rho}")
        if self.iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {self.iterations}")
        if self.guidance not in ("reference", "none"):
            raise ValueError(f"guidance must be 'reference' or 'none', got {self.guidance!r}")
        if self.corruption not in ("mask", "noise", "remove"):
            raise ValueError(f"corruption must be 'mask', 'noise' or 'remove', got {self.corruption!r}")

    @property
    def method(self) -> str:
        return {"mask": "bdhs_attn", "noise": "bdhs_noise", "remove": "bdhs_no_image"}[self.corruption]


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text``: split after ".", "!" or "?" followed by white space."""
    return [s for s in (p.strip() for p in _SENTENCE.split(text.strip())) if s]


def guided_prefix(sentence: str, rng: random.Random) -> str:
    """The ground-truth words kept before the model continues ``sentence`` (§3.2 steps 2–3).

    A split point is drawn uniformly over word boundaries 0..words−1, so at least one word is left to generate. A
    sentence starting with yes/no keeps at least that word, and with probability 0.5 it is swapped (yes↔no).
    """
    words = sentence.split()
    cut = rng.randrange(len(words)) if words else 0
    if _YES_NO.match(sentence) and rng.random() < 0.5:
        cut = max(cut, 1)
        words = [_SWAP.get(words[0].rstrip(",.!?"), words[0]) + words[0][len(words[0].rstrip(",.!?")) :], *words[1:]]
    return " ".join(words[:cut])


@dataclass
class Attempt:
    """One example's state across iterations."""

    sample: Sample
    chosen: str
    rejected: str = ""
    similarity: float = 1.0
    iteration: int = 0
    accepted: bool = False
    history: list[float] = field(default_factory=list)


def corrupt_sample(sample: Sample, cfg: BdhsConfig, rng: random.Random) -> Sample:
    """The prompt the model sees: noised images (``noise``), no images (``remove``), or as is (``mask``)."""
    if cfg.corruption == "mask":
        return sample
    if cfg.corruption == "remove":
        msgs = tuple(
            replace(m, content=tuple(p for p in m.content if p.type != "image")) for m in sample.prompt_messages
        )
        return replace(sample, messages=msgs, images=())
    import io

    from mmalign.data.corruption import diffusion_noise

    refs = []
    for img in sample.load_images():
        buf = io.BytesIO()
        diffusion_noise(img, rng, cfg.noise_steps).save(buf, format="PNG")
        refs.append(ImageRef(data=buf.getvalue()))
    return replace(sample, messages=sample.prompt_messages, images=tuple(refs))


def _round(
    generator: Generator, todo: list[Attempt], cfg: BdhsConfig, iteration: int, unguided: bool, seed: int
) -> list[str]:
    """One generation round for every example in ``todo``: the rejected reply of each."""
    rngs = [random.Random(f"{cfg.seed}:{a.sample.id}:{iteration}") for a in todo]
    drop = cfg.rho if cfg.corruption == "mask" else 0.0
    seen = [corrupt_sample(a.sample, cfg, rng) for a, rng in zip(todo, rngs)]
    if unguided:
        longest = max(len(a.chosen.split()) for a in todo)
        params = SamplingParams(max_new_tokens=2 * longest + 16, temperature=cfg.temperature, seed=seed)
        return [g[0].text for g in generator.generate(seen, params=params, image_drop=drop)]
    prompts: list[Sample] = []
    prefixes: list[str] = []
    kept: list[str] = []
    owner: list[int] = []
    for i, (a, rng, s) in enumerate(zip(todo, rngs, seen)):
        sentences = split_sentences(a.chosen)
        for k, sentence in enumerate(sentences):
            prefix = guided_prefix(sentence, rng)
            context = " ".join(sentences[:k])
            prompts.append(s)
            prefixes.append(f"{context} {prefix}".strip())
            kept.append(prefix)
            owner.append(i)
    params = SamplingParams(
        max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, stop_at_sentence_end=True, seed=seed
    )
    rollouts = generator.generate(prompts, params=params, prefixes=prefixes, image_drop=drop)
    parts: list[list[str]] = [[] for _ in todo]
    for i, prefix, group in zip(owner, kept, rollouts):
        parts[i].append(f"{prefix}{group[0].continuation}".strip() if prefix else group[0].continuation.strip())
    return [" ".join(p for p in ps if p) for ps in parts]


def bdhs_pairs(
    generator: Generator,
    embedder: Embedder | None,
    samples: Sequence[Sample],
    cfg: BdhsConfig,
    *,
    seed: int = 0,
) -> tuple[list[PreferencePair], list[int]]:
    """BDHS pairs for ``samples`` (each with a final assistant turn: its ground-truth answer).

    Args:
        embedder: embeds replies for the similarity filter; ``None`` accepts every reply (one round is then enough).
        seed: seed of this batch's generation (the caller derives it from the run seed and the batch index).

    Returns:
        (pairs in the order of ``samples``, number of examples accepted at each iteration).
    """
    attempts = [Attempt(s, s.target) for s in samples]
    accepted_at = [0] * cfg.iterations
    todo = list(attempts)
    for it in range(cfg.iterations):
        if not todo:
            break
        unguided = cfg.guidance == "none" or (cfg.iterations > 1 and it == cfg.iterations - 1)
        rejected = _round(generator, todo, cfg, it, unguided, seed * 1_000 + it)
        if embedder is None:
            sims = [float("nan")] * len(todo)
        else:
            sims = cosine(embedder, [a.chosen for a in todo], rejected)
        last = it == cfg.iterations - 1
        still = []
        for a, text, sim in zip(todo, rejected, sims):
            a.rejected, a.similarity, a.iteration = text, sim, it + 1
            a.history.append(sim)
            if text and (embedder is None or sim < cfg.epsilon):
                a.accepted = True
                accepted_at[it] += 1
            elif not last:
                still.append(a)
        todo = still
    return [_to_pair(a, cfg) for a in attempts], accepted_at


def _to_pair(a: Attempt, cfg: BdhsConfig) -> PreferencePair:
    s = a.sample
    meta: dict[str, Any] = {
        "method": cfg.method,
        "guidance": cfg.guidance,
        "rho": cfg.rho if cfg.corruption == "mask" else None,
        "iteration": a.iteration,
        "similarity": round(a.similarity, 6),
        "similarities": [round(x, 6) for x in a.history],
        "accepted": a.accepted,
        "source": s.id,
    }
    return PreferencePair(
        id=f"{s.id}/bdhs",
        prompt=tuple(m for m in s.prompt_messages),
        chosen=a.chosen,
        rejected=a.rejected,
        images=s.images,
        root=s.root,
        meta=meta,
    )


__all__ = ["BdhsConfig", "bdhs_pairs", "guided_prefix", "split_sentences"]
