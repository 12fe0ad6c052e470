"""Typed run configuration: YAML files, command-line flags and ``key=value`` overrides.

Precedence: defaults < YAML file (``--config``) < explicit flags < ``key=value`` overrides. Unknown keys are
errors that name the closest valid key, so a typo never silently does nothing. YAML is plain data: no dotted
class paths, nothing is instantiated from it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
from pathlib import Path
from types import UnionType
from typing import Any, ClassVar, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mmalign.errors import ConfigError
from mmalign.losses import LOSSES, LossConfig


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are validated on assignment."""

    # Infinite or NaN numbers (``lr=.inf``, ``beta=nan``) are refused: they would train every weight to NaN.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class FreezeConfig(Section):
    """Which parts of the VLM are frozen (not trained)."""

    vision: bool = True
    projector: bool = False
    llm: bool = True


class LoraConfig(Section):
    """LoRA adapters on the language model (through ``peft``)."""

    enabled: bool = False
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    targets: list[str] | None = None


class TrainConfig(Section):
    """Settings shared by every training recipe.

    ``model``, ``data`` and ``out`` are required (from the command line or the YAML file).
    """

    model: str = Field("", description="model directory (a local Hugging Face checkpoint)")
    data: str = Field("", description="data file (JSONL, JSON array, Parquet) or saved HF dataset directory")
    out: str = Field("", description="run directory")
    steps: int = Field(200, ge=1, description="optimizer steps")
    batch_size: int = Field(16, ge=1, description="examples per step and process")
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.03, ge=0, le=1)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    max_grad_norm: float = Field(1.0, ge=0)
    seed: int = 0
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    log_every: int = Field(10, ge=1)
    save_every: int = Field(0, ge=0)
    keep_checkpoints: int = Field(2, ge=1)
    on_bad_record: Literal["fail", "skip"] = "fail"
    max_samples: int | None = Field(None, ge=1)
    resume: bool = Field(False, description="continue from the last checkpoint in the run directory")
    freeze: FreezeConfig = Field(default_factory=FreezeConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    # How the loss is averaged: over all target tokens of the batch, or per sample first (so that a three-token
    # answer weighs as much as a sixty-token caption).
    loss_per: Literal["token", "sample"] = "token"
    # Where the sequence is cut; image tokens are never truncated (an over-long sample is an error).
    max_length: int = Field(2048, ge=16, description="longest sequence in tokens, image tokens included")
    truncation: Literal["error", "truncate_prompt", "skip"] = Field(
        "error", description="examples over max_length, found at load time: error, cut the prompt's text, or skip"
    )
    # Batch examples of similar length together (``runtime.batching.length_grouped_indices``): on a CPU, where
    # compute is paid per padded token, the world's mix of yes/no answers and long captions pads half of every
    # batch without it. Off by default: it changes which examples share a batch.
    group_by_length: bool = False
    # Pack each batch's samples end to end into rows of ``pack_length`` tokens (``mmalign.data.packing``): the same
    # batches and loss with much less padding (families with ``packable``; supervised recipes).
    pack: bool = False
    pack_length: int = Field(128, ge=16)
    # Keep preprocessed pixel values of images seen earlier in the run, up to this many MiB
    # (``mmalign.data.pixel_cache``; 0 turns it off): an SFT set asks several questions about each image.
    pixel_cache_mb: int = Field(1024, ge=0)
    # ``torch.compile`` the language model (dynamic shapes): a one-off compile (shorter when the on-disk inductor
    # cache already holds the graphs) for fewer, fused kernels (timings: docs/results.md).
    compile: bool = False
    progress: bool = True

    # Whether the recipe writes checkpoints that ``resume`` continues from.
    resumable: ClassVar[bool] = True

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.resume and not self.resumable:
            raise ValueError("this recipe writes no checkpoints, so resume has nothing to continue; run it again")
        if self.lora.enabled and not self.freeze.llm:
            raise ValueError("lora.enabled needs freeze.llm=true (LoRA adapts a frozen language model)")
        if self.freeze.vision and self.freeze.projector and self.freeze.llm and not self.lora.enabled:
            raise ValueError("every part is frozen and LoRA is off: nothing would be trained")
        return self


def _attribute_docs(cls: type) -> dict[str, str]:
    """``name: text`` entries of the ``Attributes:`` section of a class docstring, continuation lines joined. An
    entry starts at the section's indentation with an identifier and a colon; deeper lines continue it."""
    docs: dict[str, str] = {}
    lines = (cls.__doc__ or "").splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == "Attributes:"), None)
    if start is None:
        return docs
    indent, name = None, None
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        depth = len(line) - len(line.lstrip())
        head, sep, rest = line.strip().partition(":")
        indent = depth if indent is None else indent
        if depth < indent:
            break
        if depth == indent:
            name = head if sep and head.isidentifier() else None
            if name:
                docs[name] = rest.strip()
        elif name:
            docs[name] += " " + line.strip()
    return docs


_LOSS_DOCS = _attribute_docs(LossConfig)


def _loss_field(name: str) -> Any:
    """A configuration field of the loss hyper-parameter ``name``: ``LossConfig``'s default and meaning."""
    return Field(getattr(LossConfig, name), description=_LOSS_DOCS.get(name))


# The loss names, as the type of ``PreferenceConfig.loss`` (a value outside them is a validation error).
LossName = Literal[tuple(sorted(LOSSES))]  # type: ignore[valid-type]


class PreferenceConfig(TrainConfig):
    """Settings every preference recipe shares: the loss and its hyper-parameters.

    The hyper-parameters are ``mmalign.losses.LossConfig``'s, declared there once (defaults, meaning, valid ranges);
    here they only become configuration keys and command-line flags (``--beta``).
    """

    loss: LossName = Field("dpo", description="the preference loss (mmalign.losses.LOSSES)")
    beta: float = _loss_field("beta")
    label_smoothing: float = _loss_field("label_smoothing")
    ipo_tau: float | None = _loss_field("ipo_tau")
    simpo_gamma: float = _loss_field("simpo_gamma")
    rpo_alpha: float = _loss_field("rpo_alpha")
    mdpo_anchor: float = _loss_field("mdpo_anchor")
    mm_w: float = _loss_field("mm_w")
    mm_k: float = _loss_field("mm_k")

    @model_validator(mode="after")
    def _check_loss(self) -> PreferenceConfig:
        self.loss_config()  # LossConfig's own checks; its ValueError becomes a validation error
        return self

    def loss_config(self) -> LossConfig:
        """The loss functions' hyper-parameters."""
        names = [f.name for f in dataclasses.fields(LossConfig) if f.name in type(self).model_fields]
        return LossConfig(**{name: getattr(self, name) for name in names})


C = TypeVar("C", bound=BaseModel)


def _parse_scalar(text: str) -> Any:
    """Parse an override value the way YAML would (``true``, ``3``, ``1e-4``, ``[a, b]``, ``null``)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key!r}: {part!r} is not a section")
    node[parts[-1]] = value


def _defaults_tree(cls: type[BaseModel]) -> dict[str, Any]:
    """The class's defaults as plain data, so a partial section (``freeze.vision=false``) keeps the
    recipe's defaults for its other keys instead of the section class's."""
    tree: dict[str, Any] = {}
    for name, info in cls.model_fields.items():
        value = info.get_default(call_default_factory=True)
        tree[name] = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
    return tree


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


def _known_keys(cls: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, info in cls.model_fields.items():
        keys.append(prefix + name)
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys.extend(_known_keys(ann, prefix + name + "."))
    return keys


def _explain(cls: type[BaseModel], err: ValidationError, source: str) -> ConfigError:
    lines = []
    known = _known_keys(cls)
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        if e["type"] == "extra_forbidden":
            close = difflib.get_close_matches(loc, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            lines.append(f"unknown key {loc!r}{hint}")
        else:
            lines.append(f"{loc or 'config'}: {e['msg']}")
    return ConfigError(f"invalid configuration from {source}: " + "; ".join(lines))


def _python_judge(value: Any) -> str | None:
    """The first term of a judge spec that names Python code (``module:function`` / ``file.py:function``), else None;
    ``world`` and ``rm:DIR`` (optionally weighted, ``0.5*rm:DIR+world``) are data."""
    if not isinstance(value, str):
        return None
    for term in value.split("+"):
        name = term.split("*", 1)[-1].strip()
        if name and name != "world" and not name.startswith("rm:"):
            return name
    return None


def load_config(
    cls: type[C],
    path: str | Path | None = None,
    flags: dict[str, Any] | None = None,
    overrides: list[str] | None = None,
) -> C:
    """Build a config of type ``cls`` from a YAML file, explicit flags and ``key=value`` overrides.

    Args:
        cls: the config model.
        path: optional YAML file (a mapping at the top level).
        flags: explicit command-line values; ``None`` values mean "not given" and are ignored.
        overrides: ``key=value`` strings; dotted keys reach nested sections (``freeze.vision=false``).

    Raises:
        ConfigError: unreadable YAML, unknown keys (with the closest valid key), invalid values.
    """
    tree = _defaults_tree(cls)
    source = "defaults"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError:
            raise ConfigError(f"{p}: not a text file (a YAML config is UTF-8 text)") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError(f"{p}: not valid YAML{where}: {problem}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping, got {type(loaded).__name__}")
        code = _python_judge(loaded.get("judge"))
        if code is not None:
            raise ConfigError(
                f"{p}: judge {code!r} runs Python code, which a config file may not name (it is plain data); "
                "give it on the command line: --judge or judge=..."
            )
        _merge(tree, loaded)
    for key, value in (flags or {}).items():
        if value is not None:
            _set_dotted(tree, key, value)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, _, text = item.partition("=")
        _set_dotted(tree, key.strip(), _parse_scalar(text.strip()))
        source = f"{source} + overrides" if "overrides" not in source else source
    try:
        return cls.model_validate(tree)
    except ValidationError as err:
        raise _explain(cls, err, source) from None


def _flag_type(annotation: Any) -> tuple[Any, tuple[Any, ...] | None] | None:
    """(argparse type, choices) of a scalar field's annotation; ``None`` for sections and lists."""
    args = [a for a in get_args(annotation) if a is not type(None)]
    if get_origin(annotation) is Literal:
        return type(args[0]), tuple(args)
    if get_origin(annotation) in (Union, UnionType) and len(args) == 1:
        return _flag_type(args[0])
    if annotation in (int, float, str, bool):
        return annotation, None
    return None


def _config_fields(cls: type) -> list[tuple[str, Any, Any, str]]:
    """(name, annotation, default, description) of a pydantic model's or a dataclass's fields."""
    if dataclasses.is_dataclass(cls):
        hints, docs = get_type_hints(cls), _attribute_docs(cls)
        return [(f.name, hints[f.name], f.default, docs.get(f.name, "")) for f in dataclasses.fields(cls)]
    return [
        (name, info.annotation, info.get_default(call_default_factory=True), info.description or "")
        for name, info in cls.model_fields.items()
    ]


def add_config_flags(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> list[str]:
    """Add one flag per scalar field of ``cls`` (a pydantic model or a dataclass; ``batch_size`` → ``--batch-size``,
    booleans get ``--x/--no-x``), each with its type, choices, description and default; returns the field names.
    Sections (``freeze``, ``lora``) and lists are set with ``key=value`` overrides. Flags default to ``None``:
    "not given", so that a YAML file's value is kept."""
    names = []
    if not getattr(cls, "resumable", True):
        skip = (*skip, "resume")
    for name, annotation, default, description in _config_fields(cls):
        found = _flag_type(annotation)
        if found is None or name in skip:
            continue
        kind, choices = found
        shown = f" (default: {default})" if default not in ("", None, dataclasses.MISSING) else ""
        text = f"{description}{shown}".strip().replace("%", "%%")  # argparse formats help with %
        kwargs: dict[str, Any] = {"dest": name, "default": None, "help": text}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif choices:
            kwargs.update(type=kind, choices=choices)
        else:
            kwargs.update(type=kind, metavar=name.upper())
        parser.add_argument("--" + name.replace("_", "-"), **kwargs)
        names.append(name)
    return names


def given(args: argparse.Namespace, names: list[str]) -> dict[str, Any]:
    """The flags among ``names`` that were given on the command line."""
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


D = TypeVar("D")


def override_dataclass(obj: D, overrides: list[str] | tuple[str, ...], what: str) -> tuple[D, dict[str, Any]]:
    """A copy of the dataclass ``obj`` with ``key=value`` overrides, parsed as training overrides are (YAML
    scalars) and checked against the field's type; returns (copy, the changes). ``what`` names the object in errors.

    Raises:
        ConfigError: not ``key=value``, an unknown key (with the closest one), or a value of the wrong type; or the
            dataclass's own validation failing.
    """
    hints = get_type_hints(type(obj))
    changes: dict[str, Any] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep:
            raise ConfigError(f"{what}: override {item!r} is not of the form key=value")
        if key not in hints:
            close = difflib.get_close_matches(key, list(hints), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{what}: unknown key {key!r}{hint}")
        value = _parse_scalar(text.strip())
        kind = _flag_type(hints[key])
        if kind is None:
            raise ConfigError(f"{what}: {key} is not a single value and cannot be set with key=value")
        if value is None and type(None) in get_args(hints[key]):
            changes[key] = None
            continue
        if kind[0] is float and isinstance(value, (int, str)) and not isinstance(value, bool):
            with contextlib.suppress(ValueError):
                value = float(value)
        elif kind[0] is str and not isinstance(value, str):
            value = text.strip()
        if type(value) is not kind[0] or (kind[1] and value not in kind[1]):
            expected = (
                f"one of {', '.join(map(str, kind[1]))}" if kind and kind[1] else kind[0].__name__ if kind else "?"
            )
            raise ConfigError(f"{what}: {key}={text.strip()!r} is not {expected}")
        changes[key] = value
    try:
        return (dataclasses.replace(obj, **changes) if changes else obj), changes  # type: ignore[type-var]
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{what}: {exc}") from None


def dump_config(cfg: BaseModel, path: str | Path) -> None:
    """Write the resolved config next to a run's outputs, so the run can be reproduced."""
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
