"""Typed records shared by every part of the toolkit.

Records are validated once, where they are loaded (``mmalign.data``); downstream code trusts the types.
``Message.content`` is a list of parts shaped like the content lists that Hugging Face chat templates
consume: ``{"type": "text", "text": ...}``, ``{"type": "image"}``, ``{"type": "audio"}``. Image and audio
parts are placeholders; the media themselves travel beside the messages in ``Sample.images`` /
``Sample.audios``, in the order the placeholders appear.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Role = Literal["system", "user", "assistant"]
PartType = Literal["text", "image", "audio"]


@dataclass(frozen=True)
class Part:
    """One element of a message's content list."""

    type: PartType
    text: str = ""

    def to_hf(self) -> dict[str, str]:
        """The dict a Hugging Face chat template expects for this part."""
        if self.type == "text":
            return {"type": "text", "text": self.text}
        return {"type": self.type}


@dataclass(frozen=True)
class Message:
    """A chat turn: a role and a list of content parts."""

    role: Role
    content: tuple[Part, ...]

    @property
    def text(self) -> str:
        """The concatenated text parts (media placeholders dropped)."""
        return "".join(p.text for p in self.content if p.type == "text")

    def to_hf(self) -> dict[str, Any]:
        return {"role": self.role, "content": [p.to_hf() for p in self.content]}

    @staticmethod
    def user(text: str, images: int = 0) -> Message:
        """A user turn with ``images`` image placeholders before the text."""
        parts = (*tuple(Part("image") for _ in range(images)), Part("text", text))
        return Message("user", parts)

    @staticmethod
    def assistant(text: str) -> Message:
        return Message("assistant", (Part("text", text),))


@functools.lru_cache(maxsize=1 << 16)
def _resolve(path: str, root: str | Path | None) -> Path:
    """``path`` against ``root`` unless absolute (remembered: an SFT run resolves each image's path many times)."""
    p = Path(path)
    if root is not None and not p.is_absolute():
        p = Path(root) / p
    return p


@dataclass(frozen=True)
class ImageRef:
    """An image given by a path (resolved against the data set root) or by encoded bytes."""

    path: str | None = None
    data: bytes | None = None

    def file(self, root: str | Path | None = None) -> Path | None:
        """The file the image is read from (``path`` resolved against ``root``), or None for an image in bytes."""
        if self.data is not None or self.path is None:
            return None
        return _resolve(self.path, root)

    def open(self, root: str | Path | None = None):  # -> PIL.Image.Image
        """Decode the image to RGB. Raises ``OSError``/``ValueError`` on unreadable data."""
        from mmalign.limits import open_image

        if self.data is not None:
            img = open_image(self.data)
        elif self.path is not None:
            img = open_image(self.file(root))
        else:
            raise ValueError("ImageRef has neither path nor data")
        with img:
            img.load()
            return img.convert("RGB")


@dataclass(frozen=True)
class AudioRef:
    """An audio clip given by a path or encoded bytes (WAV)."""

    path: str | None = None
    data: bytes | None = None


@dataclass(frozen=True)
class Sample:
    """One training or evaluation example: a conversation plus its media.

    Attributes:
        id: unique id within its data set.
        messages: the conversation; for training the assistant turns are the targets.
        images: one ``ImageRef`` per image placeholder, in order.
        audios: one ``AudioRef`` per audio placeholder, in order.
        root: directory that relative media paths resolve against.
        meta: free-form fields carried along (ground-truth objects, question type, ...).
    """

    id: str
    messages: tuple[Message, ...]
    images: tuple[ImageRef, ...] = ()
    audios: tuple[AudioRef, ...] = ()
    root: str | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def load_images(self) -> list:
        """Decode every image of the sample (RGB PIL images)."""
        return [ref.open(self.root) for ref in self.images]

    @property
    def prompt_messages(self) -> tuple[Message, ...]:
        """All turns before the final assistant turn."""
        if self.messages and self.messages[-1].role == "assistant":
            return self.messages[:-1]
        return self.messages

    @property
    def text_length(self) -> int:
        """Characters of text over all turns: a length proxy for batching by length."""
        return sum(len(m.text) for m in self.messages)

    @property
    def target(self) -> str:
        """Text of the final assistant turn ('' if the sample ends with a user turn)."""
        if self.messages and self.messages[-1].role == "assistant":
            return self.messages[-1].text
        return ""


@dataclass(frozen=True)
class PopeQuestion:
    """One POPE yes/no question (official schema: ``question_id``, ``image``, ``text``, ``label``)."""

    question_id: int
    image: str
    text: str
    label: Literal["yes", "no"]
    split: str = ""
    object: str = ""


@dataclass(frozen=True)
class ObjectAnnotation:
    """Ground-truth object categories of one image (CHAIR input)."""

    image_id: str
    objects: tuple[str, ...]


@dataclass(frozen=True)
class PreferencePair:
    """One preference example: a prompt (with its media) and a chosen and a rejected reply.

    Attributes:
        id: unique id within its data set.
        prompt: the conversation up to the reply (user turns with image placeholders).
        chosen: the preferred assistant reply (text).
        rejected: the dispreferred assistant reply (text).
        images: one ``ImageRef`` per image placeholder of the prompt.
        root: directory that relative media paths resolve against.
        margin: optional reward margin δ between chosen and rejected (MM-DPO dynamic scaling).
        corrupted_image: optional explicit rejected image for the conditional (mDPO) term.
        objects: optional ground-truth objects of the image (for judges and analysis).
        facts: optional reference statements about the image (ground-truth captions, object lists) that a
            fact-augmented reward model reads beside the prompt (Fact-RLHF).
        chosen_critique / rejected_critique: optional critiques of each reply (what is right or wrong in it) that a
            critique reward model learns to write before it scores (MM-RLHF's ``chosen_reason``/``rejected_reason``).
        meta: free-form provenance (method, source, similarity, ...).
    """

    id: str
    prompt: tuple[Message, ...]
    chosen: str
    rejected: str
    images: tuple[ImageRef, ...] = ()
    root: str | None = None
    margin: float | None = None
    corrupted_image: ImageRef | None = None
    objects: tuple[str, ...] = ()
    facts: tuple[str, ...] = ()
    chosen_critique: str | None = None
    rejected_critique: str | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def text_length(self) -> int:
        """Characters of the prompt and of the longer reply: a length proxy for batching by length."""
        return sum(len(m.text) for m in self.prompt) + max(len(self.chosen), len(self.rejected))

    def as_samples(self) -> tuple[Sample, Sample]:
        """The (chosen, rejected) conversations as ``Sample`` records sharing the prompt and images."""
        common = {"images": self.images, "root": self.root, "meta": self.meta}
        return (
            Sample(id=f"{self.id}/chosen", messages=(*self.prompt, Message.assistant(self.chosen)), **common),
            Sample(id=f"{self.id}/rejected", messages=(*self.prompt, Message.assistant(self.rejected)), **common),
        )


@dataclass(frozen=True)
class Rollout:
    """One sampled reply to a prompt.

    Attributes:
        prompt_id: id of the ``Sample`` it answers.
        text: the decoded reply (special tokens removed, the forced prefix included).
        token_ids: the generated token ids (the forced prefix excluded).
        prefix: the forced prefix as it decodes (``text`` starts with it); empty when none was given.
        logp: summed log-probability of the generated tokens under the model (temperature 1, no filtering).
        finished: True when the reply stopped by itself (end of sequence, or sentence end when asked), False when
            it hit the token limit.
        meta: provenance (sampling settings, image-masking rate, sample index ...).
    """

    prompt_id: str
    text: str
    token_ids: tuple[int, ...]
    logp: float
    finished: bool
    prefix: str = ""
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def continuation(self) -> str:
        """What the model generated after the prefix (leading whitespace kept, so ``prefix + continuation``)."""
        return self.text[len(self.prefix) :]
