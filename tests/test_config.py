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

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("**/*.yaml"))
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
