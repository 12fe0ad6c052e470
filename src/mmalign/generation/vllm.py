"""The ``Generator`` on vLLM, for fast sampling from a checkpoint directory when vLLM is installed (optional extra).

vLLM cannot hide single image tokens from attention, so image-attention masking (BDHS) stays with ``HFGenerator``;
this backend serves unmasked sampling (online DPO's samples, evaluation's greedy answers, the noised or image-removed
BDHS variants). ``engine=vllm`` picks it (``mmalign.generation.engines``). ``vllm`` is imported when the generator
is built, never at package import.

A training loop that samples from its current policy (online DPO) builds the engine in this process
(``in_process=True``, vLLM's ``VLLM_ENABLE_V1_MULTIPROCESSING=0``, as TRL's colocated mode does) and pushes the
policy's weights into it with ``load_weights`` before it samples.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from mmalign.data.collate import render
from mmalign.generation.sampling import DEFAULT_SAMPLING, SamplingParams
from mmalign.types import Rollout, Sample

SENTENCE_END = (".", "!", "?")


def vllm_available() -> bool:
    """Whether vLLM is installed (looked up without importing it: the import alone takes seconds)."""
    return importlib.util.find_spec("vllm") is not None


class VllmGenerator:
    """Samples with ``vllm.LLM`` from a local checkpoint (chat template from its processor).

    Args:
        model_dir: a checkpoint directory (``save_pretrained`` of model and processor).
        seed: the engine's seed.
        in_process: run vLLM's engine in this process, so that ``load_weights`` can reach the model.
        llm_kwargs: passed to ``vllm.LLM``.

    Raises:
        ConfigError: vLLM is not installed.
    """

    def __init__(self, model_dir: str | Path, *, seed: int = 0, in_process: bool = False, **llm_kwargs: Any) -> None:
        from mmalign.generation.engines import check_engine

        check_engine("vllm")
        if in_process:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from transformers import AutoProcessor
        from vllm import LLM

        self.processor = AutoProcessor.from_pretrained(model_dir)
        self.llm = LLM(model=str(model_dir), seed=seed, **llm_kwargs)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Replace the engine's weights by ``weights`` (Hugging Face parameter names, e.g. a policy's
        ``state_dict().items()``); vLLM maps the names onto its own modules. Needs ``in_process=True``."""
        model = self.llm.llm_engine.model_executor.driver_worker.model_runner.model
        model.load_weights(weights)
        # Cached prompt blocks were computed with the old weights.
        self.llm.reset_prefix_cache()

    def generate(
        self,
        prompts: Sequence[Sample],
        n: int = 1,
        *,
        params: SamplingParams = DEFAULT_SAMPLING,
        prefixes: Sequence[str] | None = None,
        image_drop: float = 0.0,
    ) -> list[list[Rollout]]:
        """``n`` rollouts per prompt; ``logp`` is vLLM's cumulative log-prob of the sampled tokens."""
        if image_drop > 0:
            from mmalign.generation.engines import check_engine

            check_engine("vllm", image_masking=True)
        from vllm import SamplingParams as VllmParams

        sampling = VllmParams(
            n=n,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k if params.top_k > 0 else -1,
            max_tokens=params.max_new_tokens,
            seed=params.seed,
            stop=list(SENTENCE_END) if params.stop_at_sentence_end else None,
            include_stop_str_in_output=True,
            logprobs=0,
        )
        prefixes = list(prefixes) if prefixes is not None else [""] * len(prompts)
        inputs = []
        for sample, prefix in zip(prompts, prefixes):
            item: dict[str, Any] = {
                "prompt": render(self.processor, sample.prompt_messages, generation_prompt=True) + prefix
            }
            images = sample.load_images()
            if images:
                item["multi_modal_data"] = {"image": images if len(images) > 1 else images[0]}
            inputs.append(item)
        results = self.llm.generate(inputs, sampling, use_tqdm=False)
        out = []
        for sample, prefix, result in zip(prompts, prefixes, results):
            group = []
            for j, o in enumerate(result.outputs):
                text = f"{prefix}{o.text}".strip() if prefix else o.text.strip()
                logp = float(o.cumulative_logprob) if o.cumulative_logprob is not None else float("nan")
                group.append(
                    Rollout(
                        sample.id,
                        text,
                        tuple(o.token_ids),
                        logp,
                        o.finish_reason == "stop",
                        prefix.strip(),
                        {"sample": j, "backend": "vllm"},
                    )
                )
            out.append(group)
        return out
