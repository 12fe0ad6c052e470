"""Pluggable judges for the benchmarks whose papers asked GPT-4 for a score (MMHal-Bench, LLaVA-Bench).

Nothing here calls a network: a judge is either

* a local model directory (``ModelJudge``): an image-text model loaded with ``mmalign.models.load.load_model``, or a
  text-only causal LM loaded with transformers from the directory (``local_files_only``); it gets the benchmark's
  judge prompt as one user turn, decodes greedily, and its text is parsed by the benchmark; or
* the user's own Python function (``FunctionBenchJudge``), named ``FILE.py:function`` or ``module:function`` and
  loaded as the RL and online-DPO judges are (``mmalign.userfn``). It is called as ``fn(prompt, reply)`` with
  ``prompt`` a ``Sample`` (one user turn holding the judge prompt; ``meta`` holds the benchmark's fields and
  ``"benchmark"``) and ``reply`` the answer under judgement, and returns the judge's text (parsed like a model's), a
  number (the score itself) or, for LLaVA-Bench, a pair ``(reference score, answer score)``.

An output that is none of these counts as unparsed; the benchmark reports how many there were.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from mmalign.errors import ConfigError, ModelError
from mmalign.types import Message, Sample

log = logging.getLogger(__name__)

# Text to parse, one score, a (reference, answer) pair of scores, or None when the output was none of these.
JudgeOutput = str | float | tuple[float, float] | None


@dataclass(frozen=True)
class JudgeRequest:
    """One item to judge.

    Attributes:
        id: the item's id in its benchmark (question index or ``question_id``).
        prompt: the benchmark's judge prompt, filled in.
        answer: the answer being judged.
        fields: the benchmark fields the prompt was built from (question, human answer, ...).
    """

    id: str
    prompt: str
    answer: str
    fields: Mapping[str, Any] = field(default_factory=dict)


class BenchJudge(Protocol):
    """Scores judge requests; ``name`` goes into the results (the papers ask to report which judge was used)."""

    name: str

    def judge(self, requests: Sequence[JudgeRequest]) -> list[JudgeOutput]: ...


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _output(value: Any) -> JudgeOutput:
    """A function's return value as a judge output (None for anything unusable)."""
    if isinstance(value, str):
        return value
    if _is_number(value):
        return float(value)
    if isinstance(value, list | tuple) and len(value) == 2 and all(_is_number(v) for v in value):
        return (float(value[0]), float(value[1]))
    return None


@dataclass
class FunctionBenchJudge:
    """The user's function ``fn(prompt: Sample, reply: str)`` as a judge."""

    fn: Callable[[Sample, str], Any]
    name: str
    benchmark: str = ""

    def judge(self, requests: Sequence[JudgeRequest]) -> list[JudgeOutput]:
        outputs = []
        for r in requests:
            sample = Sample(id=r.id, messages=(Message.user(r.prompt),), meta={**r.fields, "benchmark": self.benchmark})
            try:
                value = self.fn(sample, r.answer)
            except Exception as exc:  # the user's code: report it as one line, with the item
                raise ConfigError(f"judge {self.name}: {type(exc).__name__}: {exc} (item {r.id})") from None
            outputs.append(_output(value))
        return outputs


@dataclass
class ModelJudge:
    """A local model that reads the judge prompt and writes its verdict (greedy decoding)."""

    model: Any
    processor: Any
    name: str
    max_new_tokens: int = 256
    batch_size: int = 4
    text_only: bool = False
    progress: bool = True

    def judge(self, requests: Sequence[JudgeRequest]) -> list[JudgeOutput]:
        if self.text_only:
            return list(_generate_text(self, [r.prompt for r in requests]))
        from mmalign.eval.generate import generate_answers

        samples = [Sample(id=r.id, messages=(Message.user(r.prompt),)) for r in requests]
        answers = generate_answers(
            self.model,
            self.processor,
            samples,
            max_new_tokens=self.max_new_tokens,
            batch_size=self.batch_size,
            desc="judge",
            progress=self.progress,
        )
        return list(answers)


def _generate_text(judge: ModelJudge, prompts: Sequence[str]) -> list[str]:
    """Greedy replies of a text-only causal LM to each prompt as a single user turn (its chat template)."""
    import torch

    tok = judge.processor
    device = next(judge.model.parameters()).device
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    out: list[str] = []
    for i in range(0, len(prompts), judge.batch_size):
        chunk = prompts[i : i + judge.batch_size]
        texts = [
            tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            if getattr(tok, "chat_template", None)
            else p
            for p in chunk
        ]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        with torch.no_grad():
            gen = judge.model.generate(
                **enc, max_new_tokens=judge.max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id
            )
        out.extend(t.strip() for t in tok.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True))
    return out


def load_judge(spec: str, *, benchmark: str, max_new_tokens: int = 256, batch_size: int = 4) -> BenchJudge:
    """The judge named on the command line: a model directory, or ``FILE.py:function`` / ``module:function``.

    Raises:
        ConfigError: neither a directory nor a function spec, or the function cannot be loaded.
        ModelError: the directory holds no model that loads.
    """
    path = Path(spec)
    if path.is_dir():
        return _load_model_judge(path, max_new_tokens=max_new_tokens, batch_size=batch_size)
    if ":" not in spec:
        raise ConfigError(f"judge {spec!r}: not a model directory, and not 'FILE.py:function' or 'module:function'")
    from mmalign.userfn import load_function

    return FunctionBenchJudge(load_function(spec, "judge"), name=spec, benchmark=benchmark)


def _load_model_judge(path: Path, *, max_new_tokens: int, batch_size: int) -> ModelJudge:
    """An image-text model through ``load_model``; failing that, a text-only causal LM (local files only)."""
    from mmalign.models.load import load_model

    try:
        loaded = load_model(path)
        return ModelJudge(loaded.model, loaded.processor, str(path), max_new_tokens, batch_size)
    except ModelError as first:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (ValueError, OSError, KeyError) as exc:
            raise ModelError(f"{path}: cannot load as a judge ({first}; as a causal LM: {exc})") from None
        log.info("judge %s: loaded as a text-only causal LM", path)
        return ModelJudge(model.eval(), tokenizer, str(path), max_new_tokens, batch_size, text_only=True)
