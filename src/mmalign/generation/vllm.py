"""The ``Generator`` on vLLM, for fast sampling from a checkpoint directory when vLLM is installed (optional extra).

vLLM cannot hide single image tokens from attention, so image-attention masking (BDHS) stays with ``HFGenerator``;
this backend serves unmasked sampling (offline rollouts, unguided or image-removed BDHS variants). ``vllm`` is
imported when the generator is built, never at package import.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmalign.data.collate import render
from mmalign.generation.sampling import DEFAULT_SAMPLING, SamplingParams
from mmalign.types import Rollout, Sample

SENTENCE_END = (".", "!", "?")


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


class VllmGenerator:
    """Samples with ``vllm.LLM`` from a local checkpoint (chat template from its processor)."""

    def __init__(self, model_dir: str | Path, *, seed: int = 0, **llm_kwargs: Any) -> None:
        from transformers import AutoProcessor
        from vllm import LLM

        self.processor = AutoProcessor.from_pretrained(model_dir)
        self.llm = LLM(model=str(model_dir), seed=seed, **llm_kwargs)

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
            raise ValueError("image-attention masking needs the Hugging Face generator (HFGenerator)")
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
