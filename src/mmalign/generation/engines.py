"""Which engine writes the replies: the Hugging Face loop (``hf``, the default) or vLLM (``vllm``, optional extra).

The three places that generate (``mmalign pairs bdhs``, ``mmalign train online-dpo`` and evaluation's greedy answers)
pick their ``Generator`` here, so that they refuse the same things in the same words, before any model is loaded:

* an unknown engine name;
* ``engine=vllm`` with BDHS's image-attention masking: vLLM cannot hide single image tokens from attention while
  keeping every position id where it was (``generation/hf.py`` explains why that needs our own loop);
* ``engine=vllm`` where vLLM is not installed.

Each is a one-line ``ConfigError``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from mmalign.errors import ConfigError
from mmalign.generation import Generator

Engine = Literal["hf", "vllm"]
ENGINES: tuple[str, ...] = ("hf", "vllm")
INSTALL_VLLM = "pip install 'mmalign[vllm]'"


def check_engine(
    engine: str,
    *,
    image_masking: bool = False,
    where: str = "",
    installed: bool = True,
    instead: str = "corruption=noise or corruption=remove",
) -> None:
    """Refuse an engine that cannot serve the request (see the module docstring).

    Args:
        engine: ``"hf"`` or ``"vllm"``.
        image_masking: the caller hides image tokens from attention (BDHS with ``corruption=mask`` and ``rho > 0``).
        where: the command or config the message names first (e.g. ``"mmalign pairs bdhs: "``).
        installed: also check that vLLM is installed (a config check at load time leaves that to the run).
        instead: what the masking error suggests besides ``engine=hf``.

    Raises:
        ConfigError: an unknown engine, image masking on vLLM, or vLLM not installed.
    """
    if engine not in ENGINES:
        raise ConfigError(f"{where}engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine != "vllm":
        return
    if image_masking:
        raise ConfigError(
            f"{where}engine=vllm cannot hide image tokens from attention (BDHS's image-attention masking); "
            f"use engine=hf, or {instead}"
        )
    from mmalign.generation.vllm import vllm_available

    if installed and not vllm_available():
        raise ConfigError(f"{where}engine=vllm needs vLLM, which is not installed: {INSTALL_VLLM} (or use engine=hf)")


def make_generator(
    engine: str,
    *,
    model: Any = None,
    processor: Any = None,
    model_dir: str | Path | None = None,
    batch_size: int = 16,
    seed: int = 0,
    **vllm_kwargs: Any,
) -> Generator:
    """The ``Generator`` of ``engine``.

    Args:
        model, processor: the loaded policy (``hf``: it samples from this very object, so a training loop's updates
            are seen at once).
        model_dir: the checkpoint directory (``vllm``: the engine loads its own copy).
        batch_size: prompts per forward pass (``hf``; vLLM schedules its own batches).
        seed: vLLM's engine seed (per-call seeds come with the sampling parameters either way).
        vllm_kwargs: passed to ``vllm.LLM`` (``gpu_memory_utilization``, ``max_model_len``, ``enforce_eager`` ...).

    Raises:
        ConfigError: as ``check_engine``, or ``vllm`` without ``model_dir``.
    """
    check_engine(engine)
    if engine == "hf":
        if model is None or processor is None:
            raise ValueError("engine=hf samples from a loaded model: pass model= and processor=")
        from mmalign.generation.hf import HFGenerator

        return HFGenerator(model, processor, batch_size=batch_size)
    if model_dir is None:
        raise ConfigError("engine=vllm loads the model from its directory: pass model_dir=")
    from mmalign.generation.vllm import VllmGenerator

    return VllmGenerator(model_dir, seed=seed, **vllm_kwargs)


__all__ = ["ENGINES", "INSTALL_VLLM", "Engine", "check_engine", "make_generator"]
