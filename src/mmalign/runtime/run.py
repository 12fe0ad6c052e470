"""Steps every training recipe shares: freezing/LoRA, resuming, and finishing a run."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from mmalign.config import TrainConfig
from mmalign.models.load import LoadedModel, apply_freeze, apply_lora
from mmalign.runtime.checkpoint import (
    checkpoint_run,
    latest_checkpoint,
    load_checkpoint,
    remove_orphans,
    save_checkpoint,
    save_model_atomic,
)
from mmalign.runtime.locks import lock_run_dir, release_run_dir
from mmalign.runtime.metrics import MetricsLog

log = logging.getLogger(__name__)


def make_accelerator(cfg: TrainConfig) -> Any:
    """An ``Accelerator`` for the run; several processes without a GPU (``torchrun`` on CPU) use gloo on the CPU."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # accelerate keeps its settings in a process-wide singleton; several runs in one process (the demo, a notebook)
    # may each ask for their own mixed precision. The process group (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=several and not torch.cuda.is_available())
    _fit_engine(accelerator, cfg)
    return accelerator


def sharded(accelerator: Any) -> bool:
    """Whether the engine shards the parameters across processes (FSDP, DeepSpeed ZeRO-3): saving gathers them."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return accelerator.distributed_type == DistributedType.DEEPSPEED and plugin is not None and plugin.zero_stage == 3


def _fit_engine(accelerator: Any, cfg: TrainConfig) -> None:
    """What the sharded engines need from a run, refused in one line when a run asks for more.

    DeepSpeed steps its optimizer inside every ``backward`` and sizes its batch from its config: the micro-batch is
    the run's ``batch_size`` and ``grad_accum`` must be 1. Under FSDP / ZeRO-3 the final model is gathered and saved;
    periodic checkpoints, ``--resume`` and LoRA are not supported there yet.
    """
    from accelerate.utils import DistributedType

    from mmalign.errors import ConfigError

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        if cfg.grad_accum > 1:
            raise ConfigError("DeepSpeed steps inside every backward: set grad_accum=1 and raise batch_size instead")
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.batch_size
    if sharded(accelerator):
        asked = [k for k, on in (("save_every", cfg.save_every), ("resume", cfg.resume), ("lora", cfg.lora.enabled))
                 if on]  # fmt: skip
        if asked:
            raise ConfigError(
                f"{', '.join(asked)} under a sharded engine (FSDP, ZeRO-3) is not supported yet: the final model is "
                "gathered and saved, but checkpoints and adapters are not; use ddp.yaml or zero2.yaml for them"
            )


def start_run(cfg: TrainConfig) -> tuple[Any, Path]:
    """The run's accelerator, every generator seeded with ``cfg.seed``, and its directory (``open_run_dir``)."""
    from accelerate.utils import set_seed

    accelerator = make_accelerator(cfg)
    set_seed(cfg.seed)
    return accelerator, open_run_dir(cfg, accelerator)


# Settings that change nothing a run computes (where it writes, how often it reports, caches and memory shares):
# they may differ between a run and its resumption.
NOT_IDENTITY = frozenset({"out", "resume", "save_every", "keep_checkpoints", "log_every", "progress", "pixel_cache_mb",
                          "ref_cache_dir", "vllm_gpu_memory"})  # fmt: skip
PATH_SETTINGS = ("model", "data", "offline_data", "world", "reward_model")


def run_identity(cfg: TrainConfig) -> dict[str, Any]:
    """What makes a run itself: the recipe and every setting that changes what it computes (model, data, seed,
    hyper-parameters), with the model and data as absolute paths; stored in the run directory and its checkpoints."""
    settings = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in NOT_IDENTITY}
    for key in PATH_SETTINGS:
        if isinstance(settings.get(key), str) and settings[key]:
            settings[key] = os.path.abspath(settings[key])
    return {"recipe": type(cfg).__name__, "settings": settings}


def _differences(old: dict[str, Any], new: dict[str, Any]) -> str:
    """``lr 0.001 -> 0.002, seed 0 -> 1`` (the first few settings that differ)."""
    if old.get("recipe") != new.get("recipe"):
        return f"recipe {old.get('recipe')} -> {new.get('recipe')}"
    a, b = old.get("settings", {}), new.get("settings", {})
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    shown = ", ".join(f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in keys[:4])
    return shown + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")


def open_run_dir(cfg: TrainConfig, accelerator: Any) -> Path:
    """Make the run directory and claim it for this run (main process; the others wait for it).

    The directory is locked for the life of the run (a second run into it is refused). Checkpoints of another run
    are never used or overwritten: ``--resume`` refuses a checkpoint written with other settings, and a new run
    into a directory holding one is refused (checkpoints of a run with the same settings are cleared: it starts
    again from step 0). Half-written checkpoints left by a killed run are deleted. Writes ``config.yaml``.

    Raises:
        ConfigError: the directory is in use, or holds another run's checkpoints.
    """
    from mmalign.config import dump_config
    from mmalign.errors import ConfigError

    out = Path(cfg.out)
    if accelerator.is_main_process:
        lock_run_dir(out)
        ckpt_root = out / "checkpoints"
        remove_orphans(ckpt_root)
        found = latest_checkpoint(ckpt_root)
        identity = run_identity(cfg)
        if found is not None and (written := checkpoint_run(found)) != identity:
            what = "a checkpoint of an older version" if written is None else "another run's checkpoint"
            how = f" (it differs in: {_differences(written, identity)})" if written is not None else ""
            advice = "resume it with the same settings" if cfg.resume else "use --resume with its settings"
            release_run_dir(out)
            raise ConfigError(f"{out} holds {what}, {found.name}{how}; {advice}, or choose another --out")
        if found is not None and not cfg.resume:
            log.info("%s: starting again from step 0; clearing the checkpoints of the earlier run", out)
            shutil.rmtree(ckpt_root)
        dump_config(cfg, out / "config.yaml")
    accelerator.wait_for_everyone()
    return out


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
                run=run_identity(cfg),
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
    # Sharded parameters are gathered to the main process, by every process (a collective).
    full = _gathered_state(accelerator, model, training_only) if sharded(accelerator) else None
    if accelerator.is_main_process:
        inner = unwrapped(accelerator, model)
        if full is None:
            save_checkpoint(
                out / "checkpoints", cfg.steps, inner, optimizer, keep=cfg.keep_checkpoints, run=run_identity(cfg)
            )
        base = inner.get_base_model() if callable(getattr(inner, "get_base_model", None)) else inner
        for name in training_only:
            delattr(base, name)
        if cfg.lora.enabled:
            inner.save_pretrained(out / "adapter")
            inner = inner.merge_and_unload()
        save_model_atomic(inner, processor, final, state_dict=full)
        if metrics is not None:
            metrics.close()
        release_run_dir(out)
    return final


def _gathered_state(accelerator: Any, model: Any, training_only: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The full state dict of a sharded model (on the main process), with the names the saved VLM has."""
    state = accelerator.get_state_dict(model)
    if getattr(type(accelerator.unwrap_model(model)), "wraps_vlm", False):
        state = {k.removeprefix("vlm."): v for k, v in state.items() if k.startswith("vlm.")}
    return {k: v for k, v in state.items() if not any(k.startswith(f"{name}.") for name in training_only)}
