"""Steps every training recipe shares: freezing/LoRA, resuming, and finishing a run."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from mmalign.config import TrainConfig
from mmalign.models.load import LoadedModel, apply_freeze, apply_lora
from mmalign.runtime.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, save_model_atomic
from mmalign.runtime.metrics import MetricsLog

log = logging.getLogger(__name__)


def make_accelerator(cfg: TrainConfig) -> Any:
    """An ``Accelerator`` for the run; several processes without a GPU (``torchrun`` on CPU) use gloo on the CPU."""
    import os

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # accelerate keeps its settings in a process-wide singleton; several runs in one process (the demo, a notebook)
    # may each ask for their own mixed precision. The process group (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(mixed_precision=cfg.mixed_precision, cpu=several and not torch.cuda.is_available())


def start_run(cfg: TrainConfig) -> tuple[Any, Path]:
    """The run's accelerator, every generator seeded with ``cfg.seed``, and its directory (made, with the resolved
    ``config.yaml``, by the main process)."""
    from accelerate.utils import set_seed

    from mmalign.config import dump_config

    out = Path(cfg.out)
    accelerator = make_accelerator(cfg)
    set_seed(cfg.seed)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, out / "config.yaml")
    return accelerator, out


def unwrapped(accelerator: Any, model: Any) -> torch.nn.Module:
    """The model to save: accelerate's wrappers removed, and the VLM inside a scoring wrapper (a module marked
    ``wraps_vlm`` that keeps it as ``.vlm``, as ``mmalign.forward.PairScorer`` does)."""
    inner = accelerator.unwrap_model(model)
    return inner.vlm if getattr(type(inner), "wraps_vlm", False) else inner


def trainable_model(loaded: LoadedModel, cfg: TrainConfig) -> torch.nn.Module:
    """Apply the config's freezing policy and, if enabled, LoRA; returns the model to optimise."""
    model = loaded.model
    f = cfg.freeze
    apply_freeze(model, loaded.family, vision=f.vision, projector=f.projector, llm=f.llm)
    if cfg.lora.enabled:
        lc = cfg.lora
        model = apply_lora(model, loaded.family, r=lc.r, alpha=lc.alpha, dropout=lc.dropout, targets=lc.targets)
    if cfg.compile and can_compile():
        # The decoder in place (``Module.compile`` keeps parameter names, so checkpoints are unchanged); the vision
        # path runs as it is. Unknown architectures compile whole.
        name = loaded.family.language_modules[0] if loaded.family else ""
        (loaded.model.get_submodule(name) if name else model).compile(dynamic=True)
    return model


def can_compile() -> bool:
    """Whether ``torch.compile`` can build kernels here: on a CPU it needs a C++ compiler. Logs why not."""
    import shutil

    if torch.cuda.is_available() or any(shutil.which(cc) for cc in ("c++", "g++", "clang++")):
        return True
    log.warning("compile=true but no C++ compiler (c++, g++, clang++) is on PATH; training without torch.compile")
    return False


def resume_and_log(
    accelerator: Any, model: Any, optimizer: torch.optim.Optimizer, cfg: TrainConfig
) -> tuple[int, MetricsLog | None]:
    """Restore the last checkpoint when ``cfg.resume`` asks for it; open the metrics log (main process only).

    Returns:
        (the step to start from, the metrics log or ``None`` on other processes).
    """
    out = Path(cfg.out)
    ckpt_root = out / "checkpoints"
    start = 0
    if cfg.resume:
        found = latest_checkpoint(ckpt_root)
        if found is None:
            log.warning("--resume: no checkpoint in %s; starting from step 0", ckpt_root)
        else:
            start = load_checkpoint(found, unwrapped(accelerator, model), optimizer).step
            log.info("resumed from %s (step %d)", found, start)
    metrics = None
    if accelerator.is_main_process:
        metrics = MetricsLog(
            out / "metrics.jsonl", resume_step=start if cfg.resume else None, tensorboard_dir=out / "tb"
        )
    return start, metrics


def maybe_checkpoint(
    accelerator: Any, model: Any, optimizer: torch.optim.Optimizer, cfg: TrainConfig, done: int
) -> None:
    """Write a periodic checkpoint after ``done`` steps when ``save_every`` says so."""
    if cfg.save_every and done % cfg.save_every == 0 and done < cfg.steps:
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            save_checkpoint(
                Path(cfg.out) / "checkpoints",
                done,
                unwrapped(accelerator, model),
                optimizer,
                keep=cfg.keep_checkpoints,
            )


def finish_run(
    accelerator: Any,
    model: Any,
    optimizer: torch.optim.Optimizer,
    processor: Any,
    cfg: TrainConfig,
    metrics: MetricsLog | None,
    training_only: tuple[str, ...] = (),
) -> Path:
    """Final checkpoint, LoRA adapter (and merged weights), and the model saved atomically to ``<out>/model``.

    ``training_only``: submodules of the VLM that the final checkpoint keeps but the saved model leaves out (PPO's
    value head).
    """
    accelerator.wait_for_everyone()
    out = Path(cfg.out)
    final = out / "model"
    if accelerator.is_main_process:
        inner = unwrapped(accelerator, model)
        save_checkpoint(out / "checkpoints", cfg.steps, inner, optimizer, keep=cfg.keep_checkpoints)
        base = inner.get_base_model() if callable(getattr(inner, "get_base_model", None)) else inner
        for name in training_only:
            delattr(base, name)
        if cfg.lora.enabled:
            inner.save_pretrained(out / "adapter")
            inner = inner.merge_and_unload()
        save_model_atomic(inner, processor, final)
        if metrics is not None:
            metrics.close()
    return final
