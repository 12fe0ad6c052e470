"""A VLM reward model: a scalar head on the decoder's hidden state at a reply's last token (Bradley–Terry).

The head is a submodule of the VLM (``vlm.reward_head``, one ``Linear(H, 1)``), so that checkpoints, LoRA merging
and ``save_pretrained`` carry it with the weights; ``reward.json`` beside the weights marks a reward model.
``RewardScorer`` scores a batch of pairs in one ``forward`` with the pair forward's layout: each prompt and its
images encoded once, both replies continued from its cache (``mmalign.forward.continuation_hidden``); an
architecture without the shared-prompt forward is scored on full sequences.

A fact-augmented reward model (Fact-RLHF, shared/specs/algorithms.md §4.1) reads each pair's ``facts`` (reference
statements about the image) after the question: ``with_facts`` writes them into the prompt, in training and in
every later use, as ``reward.json`` records.

A critique reward model (MM-RLHF, §5.2) writes a critique of the reply (a user turn ``CRITIQUE_REQUEST``, then the
critique as the assistant's turn) and reads its reward after the critique: ``critique_scores`` returns the rewards and
the language-model loss on the critique tokens (teacher-forced on the data's critiques in training); at scoring time
``write_critiques`` has the model write them first.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from mmalign.data.pair_inputs import Continuations, EncodedPairs
from mmalign.errors import ConfigError, ModelError
from mmalign.forward import continuation_hidden, decoder_hidden, inner_model, unsupported_reason
from mmalign.logprobs import IGNORE_INDEX
from mmalign.models.load import LoadedModel
from mmalign.types import Message, Part, PreferencePair

HEAD = "reward_head"
MARKER = "reward.json"
FACTS_HEADER = "In the image:"
CRITIQUE_REQUEST = "What is wrong in the description?"


def attach_head(model: torch.nn.Module, seed: int = 0, name: str = HEAD) -> torch.nn.Linear:
    """Add a zero-bias scalar head to ``model`` (as ``model.<name>``: the reward head, or PPO's value head),
    initialised from ``seed``."""
    hidden = inner_model(model).config.get_text_config().hidden_size
    generator = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(hidden, 1)
    with torch.no_grad():
        head.weight.copy_(torch.randn(1, hidden, generator=generator) / hidden**0.5)
        head.bias.zero_()
    like = inner_model(model).get_output_embeddings().weight  # the decoder's own dtype and device
    head.to(device=like.device, dtype=like.dtype)
    inner_model(model).add_module(name, head)
    return head


def write_marker(out: str | Path, facts: bool = False, critique: bool = False) -> None:
    """Mark a saved model directory as a reward model (``facts``: it reads each pair's facts; ``critique``: it writes
    a critique before it scores)."""
    record = {"head": HEAD, "reads": "hidden state of the reply's last token", "facts": facts, "critique": critique}
    (Path(out) / MARKER).write_text(json.dumps(record))


def reads_facts(path: str | Path) -> bool:
    """Whether the reward model saved at ``path`` was trained on prompts with facts."""
    return bool(_marker(path).get("facts", False))


def writes_critiques(path: str | Path) -> bool:
    """Whether the reward model saved at ``path`` scores after writing a critique."""
    return bool(_marker(path).get("critique", False))


def _marker(path: str | Path) -> dict[str, Any]:
    marker = Path(path) / MARKER
    try:
        return dict(json.loads(marker.read_text()))
    except (OSError, ValueError, AttributeError) as exc:
        raise ModelError(
            f"{marker}: not a readable reward-model marker ({exc}); train one with `mmalign train rm`"
        ) from None


def facts_missing(pairs: list[PreferencePair], source: str | Path) -> None:
    """Raise ``ConfigError`` naming the first pair of ``source`` without facts."""
    missing = next((p.id for p in pairs if not p.facts), None)
    if missing is not None:
        raise ConfigError(f"a fact-augmented reward model needs facts, and pair {missing!r} of {source} has none")


def with_facts(pair: PreferencePair) -> PreferencePair:
    """The pair with its facts written after the last user turn's text: ``In the image: f1. f2.``

    Raises:
        ValueError: the pair has no facts (``facts_missing`` finds such pairs first).
    """
    if not pair.facts:
        raise ValueError(f"pair {pair.id!r} has no facts for a fact-augmented reward model")
    return replace(pair, prompt=facts_in_prompt(pair.prompt, pair.facts))


def facts_in_prompt(turns: tuple[Message, ...], facts: tuple[str, ...] | list[str]) -> tuple[Message, ...]:
    """``turns`` with ``In the image: f1. f2.`` after the last user turn's text (how a fact-augmented reward model
    reads facts, in training and whenever it scores)."""
    turns_ = list(turns)
    last = max(i for i, m in enumerate(turns_) if m.role == "user")
    note = Part("text", f" {FACTS_HEADER} " + " ".join(str(f).rstrip(".") + "." for f in facts))
    turns_[last] = Message(turns_[last].role, (*turns_[last].content, note))
    return tuple(turns_)


def load_head(loaded: LoadedModel) -> torch.nn.Linear:
    """Attach the reward head saved with the model at ``loaded.path``.

    Raises:
        ModelError: the directory is not a reward model (no ``reward.json`` or no head weights).
    """
    path = loaded.path
    if not (path / MARKER).is_file():
        raise ModelError(f"{path}: not a reward model (no {MARKER}); train one with `mmalign train rm`")
    head = attach_head(loaded.model)
    found: dict[str, list[torch.Tensor]] = {"weight": [], "bias": []}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                if key.endswith((f"{HEAD}.weight", f"{HEAD}.bias")):
                    found[key.rsplit(".", 1)[-1]].append(f.get_tensor(key))
    if any(len(v) != 1 for v in found.values()):
        counts = ", ".join(f"{len(v)} {k}" for k, v in found.items())
        raise ModelError(f"{path}: expected one {HEAD} weight and bias in the safetensors files, found {counts}")
    head.load_state_dict({k: v[0] for k, v in found.items()})
    return head


class RewardScorer(torch.nn.Module):
    """Scores pairs: ``forward(EncodedPairs) -> (r_chosen [B], r_rejected [B])`` in float32.

    Keeps the VLM as ``.vlm`` (marked ``wraps_vlm``, so runs save the VLM with its head).
    """

    wraps_vlm = True

    def __init__(self, vlm: torch.nn.Module) -> None:
        super().__init__()
        self.vlm = vlm
        self.share_prompt = unsupported_reason(vlm) is None

    def forward(self, batch: EncodedPairs | Continuations) -> tuple[torch.Tensor, torch.Tensor]:
        """(r_chosen, r_rejected) of encoded pairs; for ``encode_critiques`` rows, (rewards, critique NLLs)."""
        if isinstance(batch, Continuations):
            return self.critique(batch)
        if batch.shared is not None:  # rows: (chosen, rejected) of pair 0, then of pair 1, ...
            rewards = self.reply_rewards(batch.shared)
            return rewards[0::2], rewards[1::2]
        if batch.full is not None:  # rows: every chosen sequence, then every rejected one
            rewards = self.sequence_rewards(batch.full)
            return rewards[: batch.n], rewards[batch.n :]
        raise ValueError("the batch holds no pairs to score")

    def reply_rewards(self, cont: Continuations) -> torch.Tensor:
        """The reward [B*k] of every reply of ``cont``, each prompt encoded once."""
        hidden = continuation_hidden(self.vlm, cont, cont.replies.shape[1])
        # Column 0 is the prompt's last token; a reply of n tokens ends at column n.
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return self._head(hidden[rows, cont.reply_mask.sum(-1)])

    def sequence_rewards(self, enc: dict[str, torch.Tensor]) -> torch.Tensor:
        """The reward [N] of full sequences (``encode_sft`` outputs), read at each one's last labelled token."""
        return self._head(_full_last_hidden(self.vlm, enc))

    def critique(self, cont: Continuations) -> tuple[torch.Tensor, torch.Tensor]:
        """(reward [B*k] read after each critique, mean NLL [B*k] of each critique's tokens) of ``encode_critiques``
        rows; the language-model head runs only on the critique positions."""
        inner = inner_model(self.vlm)
        hidden = continuation_hidden(self.vlm, cont, cont.replies.shape[1])
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        rewards = self._head(hidden[rows, cont.reply_mask.sum(-1)])
        targets = cont.target_mask
        if targets is None:
            raise ValueError("critique scoring needs encode_critiques rows (a target_mask)")
        # Column t of ``hidden`` predicts reply token t (column 0 is the prompt's last token).
        logits = inner.lm_head(hidden[:, :-1][targets]).float()
        nll = torch.nn.functional.cross_entropy(logits, cont.replies[targets], reduction="none")
        per_row = torch.zeros(hidden.shape[0], device=hidden.device).index_add(
            0, rows.unsqueeze(-1).expand_as(targets)[targets], nll
        )
        return rewards, per_row / targets.sum(-1).clamp_min(1)

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        return getattr(inner_model(self.vlm), HEAD)(hidden).squeeze(-1).float()


def _full_last_hidden(model: Any, enc: dict[str, torch.Tensor]) -> torch.Tensor:
    """Final hidden state [N, H] at each full sequence's last labelled token."""
    inputs = dict(enc)
    labels = inputs.pop("labels")
    hidden = decoder_hidden(model, inputs)
    positions = torch.arange(labels.shape[1], device=labels.device).expand_as(labels)
    last = torch.where(labels != IGNORE_INDEX, positions, -1).amax(-1).clamp_min(0)
    return hidden[torch.arange(labels.shape[0], device=labels.device), last]


def encode_pair_critiques(processor: Any, pairs: list[PreferencePair], max_length: int | None = None) -> Continuations:
    """Both replies of each pair with their critiques (rows: chosen, rejected of pair 0, then of pair 1, ...)."""
    from mmalign.data.pair_inputs import encode_critiques, prompt_sample

    return encode_critiques(
        processor,
        [prompt_sample(p) for p in pairs],
        [(p.chosen, p.rejected) for p in pairs],
        [(p.chosen_critique or "", p.rejected_critique or "") for p in pairs],
        CRITIQUE_REQUEST,
        max_length,
    )


def critiques_missing(pairs: list[PreferencePair], source: str | Path) -> None:
    """Raise ``ConfigError`` naming the first pair of ``source`` without both critiques."""
    missing = next((p.id for p in pairs if not (p.chosen_critique and p.rejected_critique)), None)
    if missing is not None:
        raise ConfigError(f"a critique reward model trains on critiques, and pair {missing!r} of {source} lacks one")


def write_critiques(
    model: Any, processor: Any, pairs: list[PreferencePair], max_new_tokens: int = 32, batch_size: int = 16
) -> list[PreferencePair]:
    """The pairs with the model's own greedy critique of each reply (a critique reward model at scoring time)."""
    from mmalign.generation.hf import HFGenerator
    from mmalign.generation.sampling import SamplingParams
    from mmalign.types import Sample

    asks = [
        Sample(id=f"{p.id}/{side}", messages=(*p.prompt, Message.assistant(reply), Message.user(CRITIQUE_REQUEST)),
               images=p.images, root=p.root)
        for p in pairs
        for side, reply in (("chosen", p.chosen), ("rejected", p.rejected))
    ]  # fmt: skip
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    written = [
        g[0].text or "-" for g in HFGenerator(model, processor, batch_size=batch_size).generate(asks, 1, params=params)
    ]
    return [
        replace(p, chosen_critique=written[2 * i], rejected_critique=written[2 * i + 1]) for i, p in enumerate(pairs)
    ]
