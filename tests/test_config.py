"""Config loading: every shipped YAML loads; precedence; clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmalign.config import TrainConfig, load_config
from mmalign.errors import ConfigError
from mmalign.lab.recipes.contrastive import ContrastiveConfig
from mmalign.recipes.dpo import DpoConfig
from mmalign.recipes.pretrain import PretrainConfig
from mmalign.recipes.sft import SftConfig

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))  # training configs (accelerate/: launchers)
KINDS = {"pretrain": PretrainConfig, "sft": SftConfig, "contrastive": ContrastiveConfig, "dpo": DpoConfig}


def test_there_are_configs() -> None:
    assert len(CONFIGS) >= 3


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_yaml_loads(path: Path) -> None:
    cls = next((c for k, c in KINDS.items() if path.stem.startswith(k)), TrainConfig)
    cfg = load_config(cls, path)
    assert cfg.steps >= 1


def test_precedence_defaults_yaml_flags_overrides(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("steps: 5\nlr: 0.5\nbatch_size: 3\nfreeze:\n  vision: false\n")
    cfg = load_config(SftConfig, f, {"steps": 7, "batch_size": None}, ["lr=0.25"])
    assert (cfg.steps, cfg.lr, cfg.batch_size) == (7, 0.25, 3)
    # A partial section keeps the recipe's defaults for the other keys (SFT trains the LLM).
    assert (cfg.freeze.vision, cfg.freeze.projector, cfg.freeze.llm) == (False, False, False)
    assert load_config(PretrainConfig).freeze.llm is True


def test_unknown_key_names_the_closest(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'batchsize'.*'batch_size'"):
        load_config(SftConfig, overrides=["batchsize=4"])
    with pytest.raises(ConfigError, match=r"unknown key 'freeze\.visoin'"):
        load_config(SftConfig, overrides=["freeze.visoin=false"])


def test_bad_values_and_cross_checks(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="steps"):
        load_config(SftConfig, overrides=["steps=0"])
    with pytest.raises(ConfigError, match="nothing would be trained"):
        load_config(SftConfig, overrides=["freeze.llm=true", "freeze.projector=true"])
    with pytest.raises(ConfigError, match="LoRA"):
        load_config(SftConfig, overrides=["lora.enabled=true"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(SftConfig, bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(SftConfig, tmp_path / "missing.yaml")


def test_command_line_flags_are_generated_from_the_config(tmp_path: Path) -> None:
    """`mmalign train dpo --beta 0.2 --lr 5e-5 --no-share-prompt` reaches the config; flags not given keep YAML."""
    from mmalign.cli import build_parser
    from mmalign.config import given

    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("beta: 0.3\nsteps: 7\nshare_prompt: true\n")
    argv = ["train", "dpo", "--config", str(yaml_file), "--beta", "0.2", "--lr", "5e-5", "--no-share-prompt"]
    argv = [*argv, "--loss", "ipo", "rpo_alpha=0.5"]
    args = build_parser(argv).parse_args(argv)
    flags = given(args, args.config_fields)
    assert flags == {"beta": 0.2, "lr": 5e-5, "share_prompt": False, "loss": "ipo"}
    cfg = load_config(DpoConfig, args.config, flags, args.overrides)
    assert (cfg.beta, cfg.lr, cfg.share_prompt, cfg.loss, cfg.steps, cfg.rpo_alpha) == (0.2, 5e-5, False, "ipo", 7, 0.5)
    assert cfg.loss_config().beta == 0.2 and cfg.loss_config().rpo_alpha == 0.5
    with pytest.raises(SystemExit):  # a choice outside the Literal's values is argparse's error (exit 2)
        build_parser(["train"]).parse_args(["train", "sft", "--schedule", "bogus"])


def test_loss_hyperparameters_are_declared_once() -> None:
    """The preference recipes' defaults and checks are LossConfig's."""
    import dataclasses

    from mmalign.losses import LossConfig
    from mmalign.recipes.online_dpo import OnlineDpoConfig

    for cls in (DpoConfig, OnlineDpoConfig):
        cfg = load_config(cls)
        for f in dataclasses.fields(LossConfig):
            if f.name in cls.model_fields:
                assert getattr(cfg, f.name) == f.default, (cls.__name__, f.name)
        with pytest.raises(ConfigError, match="beta must be > 0"):
            load_config(cls, overrides=["beta=0"])
    with pytest.raises(ConfigError, match="loss: Input should be 'cdpo', 'dpo', 'dpo_norm'"):
        load_config(DpoConfig, overrides=["loss=bogus"])


def test_recipes_without_checkpoints_refuse_resume() -> None:
    from mmalign.lab.recipes.vision import VisionConfig

    for cls in (VisionConfig, ContrastiveConfig):
        with pytest.raises(ConfigError, match="writes no checkpoints"):
            load_config(cls, flags={"resume": True})
    assert load_config(SftConfig, flags={"resume": True}).resume is True


def test_dataclass_overrides_parse_and_check_like_training_overrides() -> None:
    from mmalign.config import override_dataclass
    from mmalign.models.families import TinySize

    size, changes = override_dataclass(TinySize(), ["text_layers=2", "tie_embeddings=false", "text_hidden=64"], "size")
    assert (size.text_layers, size.tie_embeddings, size.text_hidden) == (2, False, 64)
    assert changes == {"text_layers": 2, "tie_embeddings": False, "text_hidden": 64}
    with pytest.raises(ConfigError, match="did you mean 'text_layers'"):
        override_dataclass(TinySize(), ["text_layer=2"], "size")
    with pytest.raises(ConfigError, match="text_layers='two' is not int"):
        override_dataclass(TinySize(), ["text_layers=two"], "size")
    with pytest.raises(ConfigError, match="sizes must be >= 1: text_layers=-1"):
        override_dataclass(TinySize(), ["text_layers=-1"], "size")
    with pytest.raises(ConfigError, match="not a multiple of text_heads"):
        override_dataclass(TinySize(), ["text_hidden=130"], "size")


def test_a_config_file_may_not_name_python_code_or_be_binary(tmp_path: Path) -> None:
    """A YAML config is plain data: a Python judge (which runs the file's code) is named on the command line only."""
    from mmalign.recipes.rl import RlConfig

    flags = {"model": "m", "data": "d", "out": "o"}
    cfg = tmp_path / "rl.yaml"
    for spec in ("world", "0.5*rm:runs/rm/model+world"):
        cfg.write_text(f"judge: '{spec}'\n")
        assert load_config(RlConfig, cfg, flags=flags).judge == spec
    cfg.write_text("judge: 'my_judges.py:score'\n")
    with pytest.raises(ConfigError, match=r"judge 'my_judges\.py:score' runs Python code"):
        load_config(RlConfig, cfg, flags=flags)
    cfg.write_text("judge: 'world+pkg.mod:fn'\n")
    with pytest.raises(ConfigError, match=r"'pkg\.mod:fn' runs Python code"):
        load_config(RlConfig, cfg, flags=flags)
    # The same judge on the command line is the user's choice.
    assert load_config(RlConfig, flags={**flags, "judge": "my_judges.py:score"}).judge == "my_judges.py:score"
    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes(range(256)))
    with pytest.raises(ConfigError, match="not a text file"):
        load_config(RlConfig, binary, flags=flags)
