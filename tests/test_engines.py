"""The accelerate configs of configs/accelerate (DDP, FSDP2, DeepSpeed ZeRO-2/3): they load, the docs launch each,
DDP trains two CPU processes to the weights of one, and on GPUs every config trains like a single process.

FSDP2 has no CPU test: accelerate 1.16 selects FSDP only for accelerator process groups (``AcceleratorState`` turns
``distributed_type: FSDP`` into FSDP inside its multi-GPU branch). CPU processes (``cpu=True``, as the recipes ask
when there is no GPU) stay ``MULTI_CPU`` and the model is wrapped in ``DistributedDataParallel`` instead, so
``fsdp2.yaml`` on two CPU processes trains DDP (docs/scale.md has the measurement).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).parent.parent
CONFIGS = ROOT / "configs" / "accelerate"
EXPECTED = {  # name → (distributed_type, extra settings that must hold)
    "ddp": ("MULTI_GPU", {}),
    "fsdp2": ("FSDP", {"fsdp_version": 2, "fsdp_state_dict_type": "FULL_STATE_DICT"}),
    "zero2": ("DEEPSPEED", {"zero_stage": 2, "gradient_accumulation_steps": 1}),
    "zero3": ("DEEPSPEED", {"zero_stage": 3, "gradient_accumulation_steps": 1, "zero3_save_16bit_model": True}),
}
# Three SFT steps on the tiny model: enough to move every trained weight, seconds on a CPU.
TRAIN = ["steps=3", "lr=2e-3", "max_samples=24", "progress=false", "log_every=1", "warmup_ratio=0"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_every_config_loads_with_accelerate_and_says_what_it_is() -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    assert sorted(p.stem for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)
    for name, (kind, settings) in EXPECTED.items():
        cfg = load_config_from_file(str(CONFIGS / f"{name}.yaml"))
        assert cfg.distributed_type.value == kind, name
        assert cfg.num_machines == 1 and not cfg.use_cpu, name
        # The run's own config sets the precision (the recipes pass mixed_precision to the Accelerator).
        assert cfg.mixed_precision == "no", name
        section = cfg.fsdp_config if kind == "FSDP" else cfg.deepspeed_config
        for key, value in settings.items():
            assert section[key] == value, (name, key)


def test_scale_doc_gives_each_configs_launch_command() -> None:
    doc = (ROOT / "docs" / "scale.md").read_text()
    for name in EXPECTED:
        assert f"accelerate launch --config_file configs/accelerate/{name}.yaml -m mmalign.cli train" in doc, name
    assert "benchmarks/gpu_check.sh" in doc and "engine=vllm" in doc


def _launch(config: str, processes: int, args: list[str], *, cpu: bool) -> subprocess.CompletedProcess:
    """``accelerate launch --config_file configs/accelerate/<config>.yaml -m mmalign.cli train ...``, as documented."""
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / f"{config}.yaml"),
        "--num_processes", str(processes), "--main_process_port", str(_free_port()),
        "-m", "mmalign.cli", "train", *args,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    for _ in range(3):  # the free port may be taken between the probe and the launch: try another
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
        if done.returncode == 0 or "address already in use" not in done.stderr.lower():
            return done
        cmd[cmd.index("--main_process_port") + 1] = str(_free_port())
    return done


def _losses(run: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]


def _check_same_training(one: Path, many: Path, start: Path, atol: float) -> None:
    """Both runs moved the weights, to the same place, with a falling loss; the saved model loads."""
    from mmalign.models.load import load_model

    w1 = load_file(str(one / "model" / "model.safetensors"))
    w2 = load_file(str(many / "model" / "model.safetensors"))
    w0 = load_file(str(start / "model.safetensors"))
    assert max((w1[k] - w0[k]).abs().max().item() for k in w1) > 1e-3
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=atol, msg=k)
    losses = _losses(many)
    assert len(losses) == 3 and losses[-1] < losses[0]
    # Each process logs its own token mean and the log holds their mean: close to, not equal to, the global mean.
    assert _losses(one) == pytest.approx(losses, rel=1e-2)
    loaded = load_model(many / "model")
    assert sum(p.numel() for p in loaded.model.parameters()) == sum(p.numel() for p in w0.values())


def test_ddp_config_trains_two_cpu_processes_like_one(llava_dir: Path, world_dir: Path, tmp_path: Path) -> None:
    """``ddp.yaml`` with two CPU processes (gloo) and a batch of 2 each reaches the weights of one process with a
    batch of 4 (the recipe averages over processes; 2e-5 is float32 summation-order noise)."""
    from mmalign.recipes import recipes
    from mmalign.runtime.launch import run_recipe

    data = world_dir / "sft.jsonl"
    flags = {"model": str(llava_dir), "data": str(data), "out": str(tmp_path / "one"), "batch_size": 4}
    run_recipe(recipes()["sft"], flags, TRAIN, processes=1)
    args = ["sft", "--model", str(llava_dir), "--data", str(data), "--out", str(tmp_path / "two"), "batch_size=2"]
    done = _launch("ddp", 2, [*args, *TRAIN], cpu=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "batch_size: 2" in (tmp_path / "two" / "config.yaml").read_text()
    _check_same_training(tmp_path / "one", tmp_path / "two", llava_dir, atol=2e-5)


GPU_NEEDS = {"ddp": None, "fsdp2": None, "zero2": "deepspeed", "zero3": "deepspeed"}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", list(GPU_NEEDS))
def test_config_trains_on_gpus_like_one_process(name: str, llava_dir: Path, world_dir: Path, tmp_path: Path) -> None:
    """Each config on up to two GPUs (one process each, a global batch of 4) against one plain GPU process.

    With one GPU the sharded engines still shard, over a world of one (FSDP2's DTensors, ZeRO's partitions), which
    is what the save path must undo. The tolerance is wider than on a CPU: ZeRO keeps its own fp32 partitions and
    the GPUs' reductions run in another order. Before the runtime changes docs/scale.md lists (a full state dict
    gathered by every process at save; DeepSpeed's micro-batch size), FSDP2 and ZeRO-3 fail at save and both ZeRO
    stages at ``accelerator.prepare``: this test says so on a GPU machine.
    """
    module = GPU_NEEDS[name]
    if module is not None and find_spec(module) is None:
        pytest.skip(f"{name} needs {module}: pip install 'mmalign[{module}]'")
    from mmalign.recipes import recipes
    from mmalign.runtime.launch import run_recipe

    n = min(2, torch.cuda.device_count())
    data = world_dir / "sft.jsonl"
    flags = {"model": str(llava_dir), "data": str(data), "out": str(tmp_path / "one"), "batch_size": 4}
    run_recipe(recipes()["sft"], flags, TRAIN, processes=1)
    args = ["sft", "--model", str(llava_dir), "--data", str(data), "--out", str(tmp_path / name)]
    done = _launch(name, n, [*args, f"batch_size={4 // n}", *TRAIN], cpu=False)
    assert done.returncode == 0, done.stderr[-3000:]
    _check_same_training(tmp_path / "one", tmp_path / name, llava_dir, atol=2e-4)


def test_eval_commands_refuse_vllm_when_it_cannot_serve(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--engine vllm`` on the evaluation commands: one-line errors before any model is loaded."""
    from mmalign.cli import main
    from mmalign.generation.vllm import vllm_available

    logits = ["eval", "pope", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "q.jsonl"), "--out",
              str(tmp_path / "r.json"), "--engine", "vllm", "--method", "logits"]  # fmt: skip
    assert main(logits) == 2
    err = capsys.readouterr().err
    if not vllm_available():
        assert "needs vLLM, which is not installed" in err
    else:
        assert "--method logits reads the Hugging Face model's logits" in err
    chair = ["eval", "chair", "--model", str(tmp_path / "m"), "--data", str(tmp_path), "--out",
             str(tmp_path / "c.json"), "--engine", "vllm"]  # fmt: skip
    if not vllm_available():
        assert main(chair) == 2
        assert "pip install 'mmalign[vllm]'" in capsys.readouterr().err


class _StubState:
    def __init__(self, stage: int) -> None:
        from types import SimpleNamespace

        self.deepspeed_plugin = SimpleNamespace(zero_stage=stage, deepspeed_config={})


class _StubAccelerator:
    """What ``runtime.run`` reads of an accelerator under DeepSpeed or FSDP (no GPU needed)."""

    def __init__(self, kind: str, stage: int = 0, state_dict: dict | None = None, wrapped: object = None) -> None:
        from accelerate.utils import DistributedType

        self.distributed_type = DistributedType[kind]
        self.state = _StubState(stage)
        self._state_dict, self._wrapped = state_dict or {}, wrapped

    def get_state_dict(self, model: object) -> dict:
        return self._state_dict

    def unwrap_model(self, model: object) -> object:
        return self._wrapped


def test_sharded_engines_get_what_they_need_or_a_one_line_refusal() -> None:
    from mmalign.config import TrainConfig
    from mmalign.errors import ConfigError
    from mmalign.forward import PairScorer
    from mmalign.runtime.run import _fit_engine, _gathered_state, sharded

    zero2, zero3, fsdp = _StubAccelerator("DEEPSPEED", 2), _StubAccelerator("DEEPSPEED", 3), _StubAccelerator("FSDP")
    assert (sharded(zero2), sharded(zero3), sharded(fsdp), sharded(_StubAccelerator("MULTI_GPU"))) == (
        False, True, True, False)  # fmt: skip
    _fit_engine(zero2, TrainConfig(batch_size=6, save_every=5, resume=True))  # ZeRO-2 keeps whole parameters
    assert zero2.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] == 6
    with pytest.raises(ConfigError, match="set grad_accum=1"):
        _fit_engine(zero2, TrainConfig(grad_accum=2))
    for engine in (zero3, fsdp):
        _fit_engine(engine, TrainConfig())
        with pytest.raises(ConfigError, match="save_every, resume under a sharded engine"):
            _fit_engine(engine, TrainConfig(save_every=5, resume=True))
    # The gathered state of a scorer-wrapped VLM: the VLM's own names, training-only heads left out.
    state = {"vlm.model.w": torch.ones(1), "vlm.value_head.weight": torch.ones(1), "vlm.lm_head.weight": torch.ones(1)}
    wrapped = PairScorer.__new__(PairScorer)
    gathered = _gathered_state(_StubAccelerator("FSDP", state_dict=state, wrapped=wrapped), None, ("value_head",))
    assert sorted(gathered) == ["lm_head.weight", "model.w"]
