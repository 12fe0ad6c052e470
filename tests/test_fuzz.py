"""Fuzzing every reader: malformed records give a clean one-line error or a documented acceptance.

Each case starts from a valid record of one reader (SFT rows, each preference schema, POPE questions, CHAIR captions
and annotations, the benchmark files (AMBER responses, MMHal templates, Object HalBench questions and answers), YAML
configs, ``key=value`` overrides, world options), applies a few random mutations (fields
deleted, retyped, emptied, made huge or non-finite; media paths that escape the root, through a symlink, name a
FIFO, a directory, an empty or non-image file or a too large image; torn, binary or non-UTF-8 lines) and reads the
file. The outcome must be the data read (an acceptance), or one of the toolkit's errors with a one-line message:
never another exception (a traceback), never a hang (each case has a time limit), and nothing written outside the
case's own directory. The default suite runs ``FUZZ_CASES`` cases per reader (each one a test, so pytest counts
them); ``-m slow`` runs ``MMALIGN_FUZZ_CASES`` (default 2000) more per reader.
"""

from __future__ import annotations

import base64
import copy
import io
import json
import math
import os
import random
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from mmalign.cli import main
from mmalign.config import load_config
from mmalign.data import media
from mmalign.data.loaders import load_samples
from mmalign.data.preference import load_pairs
from mmalign.errors import ConfigError, DataError, MediaError
from mmalign.eval.amber import read_amber_responses
from mmalign.eval.coco_vocab import ChairVocab
from mmalign.eval.io import read_captions, read_object_annotations
from mmalign.eval.mmhal import read_mmhal_template
from mmalign.eval.objhal import read_objhal_answers, read_objhal_questions
from mmalign.eval.pope import load_pope_sets
from mmalign.limits import MAX_PIXELS_ENV, MAX_TEXT_ENV
from mmalign.recipes.dpo import DpoConfig
from mmalign.recipes.sft import SftConfig

FUZZ_CASES = 60  # per reader in the default suite
LONG_CASES = int(os.environ.get("MMALIGN_FUZZ_CASES", "2000"))
CLEAN = (DataError, ConfigError, MediaError)
TIME_LIMIT_S = 20

IMAGE_PATHS = [
    "img/a.png", "../outside.png", "img/../../outside.png", "/etc/passwd", "img/link_out.png", "img/fifo.png",
    "img", "img/empty.png", "img/text.png", "img/big.png", "img/nope.png", "img/a\u0000.png", "", " ", "img/ä ü.png",
    "img/" + "x" * 300 + ".png", "img/\ud800.png", "C:\\\\img\\\\a.png", "img/a.png/", "~/a.png", "file:///etc/passwd",
]  # fmt: skip
WEIRD = [
    None, 0, -1, 1.5, math.inf, -math.inf, math.nan, True, False, "", " ", "\n", "x" * 200_001, "\u0000", "\ud800",
    [], [None], {}, {"a": 1}, [[[]]], 10**40, -(10**40), "1e999", "nan", "<image>", "<image><image><image>",
    {"type": "image"}, [{"type": "text"}], {"bytes": "!!notbase64"}, {"bytes": ""}, {"path": None}, "\u202e\u200b",
]  # fmt: skip


def _tree(root: Path) -> None:
    """The data root of a case: one good image and every kind of bad media file."""
    (root / "img").mkdir(parents=True)
    Image.new("RGB", (8, 8), "red").save(root / "img" / "a.png")
    Image.new("RGB", (8, 8), "blue").save(root.parent / "outside.png")
    (root / "img" / "link_out.png").symlink_to(root.parent / "outside.png")
    os.mkfifo(root / "img" / "fifo.png")
    (root / "img" / "empty.png").write_bytes(b"")
    (root / "img" / "text.png").write_text("not an image")
    Image.new("L", (400, 300)).save(root / "img" / "big.png")  # over the case's pixel limit


def _png64() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


_PNG64 = _png64()


def _user(text: str = "What is this?") -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}


VALID: dict[str, Callable[[], Any]] = {
    "sft": lambda: {"id": "s1", "images": ["img/a.png"],
                    "messages": [_user(), {"role": "assistant", "content": "A star."}]},
    "sharegpt": lambda: {"id": 7, "image": "img/a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A star."}]},
    "pairs-mmalign": lambda: {"id": "p1", "images": ["img/a.png"], "prompt": [_user()], "chosen": "A star.",
                              "rejected": "A moon.", "margin": 1.0, "objects": ["star"], "meta": {"k": 1}},
    "pairs-trl": lambda: {"images": ["img/a.png"], "prompt": [_user()],
                          "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "A star."}]}],
                          "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "No."}]}]},
    "pairs-rlaif-v": lambda: {"idx": 3, "ds_name": "vqa", "image": "img/a.png", "question": "Q?",
                              "chosen": "Yes.", "rejected": "No."},
    "pairs-vlfeedback": lambda: {"id": "v", "image": "img/a.png", "prompt": "Describe it.", "completions": [
        {"model": "m1", "response": "Middling.", "score": 3}, {"model": "m2", "text": "Best.", "rating": "4.5"}]},
    "pairs-llamafactory": lambda: {"conversations": [{"from": "human", "value": "<image>What is this?"}],
                                   "chosen": {"from": "gpt", "value": "A star."},
                                   "rejected": {"from": "gpt", "value": "A moon."}, "images": ["img/a.png"]},
    "pope": lambda: {"question_id": 1, "image": "img/a.png", "text": "Is there a star in the image?",
                     "label": "yes", "category": "random"},
    "chair-captions": lambda: {"image_id": 1, "caption": "A dog sits next to a cat on a couch."},
    "chair-annotations": lambda: {"image_id": 1, "objects": ["dog", "cat", "couch"]},
    "amber-responses": lambda: {"id": 1, "response": "A dog on a couch."},
    "mmhal-template": lambda: {"question_type": "attribute", "question_topic": "animal", "image_id": "a1",
                               "image_src": "https://example.org/a_o.jpg", "image_content": ["dog", "couch"],
                               "question": "What colour is the dog?", "gt_answer": "Brown."},
    "objhal-questions": lambda: {"image_id": 1, "question": "Describe the image in detail.", "image": _PNG64},
    "objhal-answers": lambda: {"image_id": 1, "question": "Describe the image.", "text": "Assistant: A dog."},
}  # fmt: skip


def _paths(value: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Every (dotted path, value) inside a JSON value."""
    yield prefix, value
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, f"{prefix}[{i}]")


def _set(record: Any, path: str, new: Any, rng: random.Random) -> Any:
    """``record`` with the value at ``path`` replaced by ``new`` (or deleted when ``new`` is ``_DELETE``)."""
    if not path:
        return new
    steps = [s for s in path.replace("[", ".[").split(".") if s]
    node = record
    for step in steps[:-1]:
        node = node[int(step[1:-1])] if step.startswith("[") else node[step]
    last = steps[-1]
    key: Any = int(last[1:-1]) if last.startswith("[") else last
    if new is _DELETE:
        del node[key]
    else:
        node[key] = new
    return record


_DELETE = object()


def _mutate(record: Any, rng: random.Random) -> Any:
    record = copy.deepcopy(record)
    for _ in range(rng.randint(1, 3)):
        paths = list(_paths(record))
        path, value = rng.choice(paths)
        roll = rng.random()
        if isinstance(value, str) and ("img" in value or value.endswith(".png")) and roll < 0.6:
            new: Any = rng.choice(IMAGE_PATHS)
        elif roll < 0.25 and path:
            new = _DELETE
        elif roll < 0.35 and isinstance(value, str):
            new = value * rng.randint(2, 5) if value else "x"
        elif roll < 0.45 and isinstance(value, dict | list):
            new = copy.deepcopy(value) if not isinstance(value, dict) else {**value, "extra": rng.choice(WEIRD)}
            if isinstance(new, list):
                new = new + copy.deepcopy(new[:1]) if new else [rng.choice(WEIRD)]
        else:
            new = copy.deepcopy(rng.choice(WEIRD))
        record = _set(record, path, new, rng)
    return record


def _line(record: Any, rng: random.Random) -> bytes:
    """One JSONL line, sometimes torn, binary, or not UTF-8."""
    text = json.dumps(record, allow_nan=True).encode("utf-8", "surrogatepass")
    roll = rng.random()
    if roll < 0.04:
        return text[: rng.randint(0, len(text))]
    if roll < 0.06:
        return bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 40)))
    if roll < 0.08:
        return text.replace(b'"', b"\xff", 1)
    return text


def _write_case(kind: str, root: Path, rng: random.Random) -> Path:
    """A data file of one good row and a few mutated ones (sometimes a JSON array, sometimes empty)."""
    rows = [VALID[kind]()] + [_mutate(VALID[kind](), rng) for _ in range(rng.randint(1, 3))]
    rng.shuffle(rows)
    path = root / ("data.json" if rng.random() < 0.15 else "data.jsonl")
    if path.suffix == ".json":
        path.write_text(json.dumps(rows, allow_nan=True, ensure_ascii=False), errors="surrogatepass")
    elif rng.random() < 0.03:
        path.write_bytes(b"")
    else:
        path.write_bytes(b"\n".join(_line(r, rng) for r in rows) + b"\n")
    return path


def _read(kind: str, path: Path) -> Any:
    if kind == "amber-responses":
        return read_amber_responses(path, n_annotations=3)
    if kind == "mmhal-template":
        return read_mmhal_template(path)
    if kind == "objhal-questions":
        return read_objhal_questions(path, need_images=True)
    if kind == "objhal-answers":
        return read_objhal_answers(path)
    if kind in ("sft", "sharegpt"):
        return load_samples(path, needs_reply=True)
    if kind.startswith("pairs-"):
        return load_pairs(path)
    if kind == "pope":
        return load_pope_sets(path)
    if kind == "chair-captions":
        return read_captions(path)
    return read_object_annotations(path, ChairVocab.coco())


@contextmanager
def _time_limit(seconds: int) -> Iterator[None]:
    def fail(*_: Any) -> None:
        raise TimeoutError(f"hang: over {seconds} s")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _check(outcome: Callable[[], Any], case_dir: Path) -> str:
    """Run one case: 'accepted' or 'error'; anything else fails the test."""
    before = _snapshot(case_dir.parent)
    try:
        with _time_limit(TIME_LIMIT_S):
            outcome()
        result = "accepted"
    except CLEAN as err:
        message = str(err)
        assert message and "\n" not in message, f"error message is not one line: {message!r}"
        assert "Traceback" not in message
        result = "error"
    written = {p for p in _snapshot(case_dir.parent) - before if not p.startswith(case_dir.name)}
    assert not written, f"wrote outside the case directory: {sorted(written)[:3]}"
    return result


def _data_case(kind: str, seed: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(MAX_PIXELS_ENV, "100000")
    monkeypatch.setenv(MAX_TEXT_ENV, "200000")
    monkeypatch.delenv(media.ALLOW_OUTSIDE_ENV, raising=False)
    root = tmp_path / "case"
    _tree(root)
    path = _write_case(kind, root, random.Random(f"{kind}-{seed}"))
    return _check(lambda: _read(kind, path), root)


CONFIG_KEYS = ["model", "data", "out", "steps", "batch_size", "lr", "beta", "loss", "seed", "freeze", "lora",
               "freeze.llm", "lora.r", "lora.enabled", "max_length", "truncation", "judge", "mixed_precision",
               "warmup_ratio", "label_smoothing", "ipo_tau", "unknown_key", "", ".", "lora..r",
               "freeze.llm.x"]  # fmt: skip
CONFIG_VALUES = ["1", "-1", "0", "1e-3", ".inf", "-.inf", ".nan", "nan", "inf", "true", "yes", "null", "~", "[]",
                 "{}", "[1, 2]", "{a: 1}", "'x'", "dpo", "bogus", "ipo", "mm_dpo", "x.py:f", "1e999", "9" * 40,
                 "\"\\x00\"", "&a [*a]", "!!python/object:os.system", "'", "\"", ": :", "- - -"]  # fmt: skip


def _config_case(seed: int, tmp_path: Path) -> str:
    rng = random.Random(f"config-{seed}")
    root = tmp_path / "case"
    root.mkdir()
    path = root / "config.yaml"
    lines = [f"{rng.choice(CONFIG_KEYS)}: {rng.choice(CONFIG_VALUES)}" for _ in range(rng.randint(1, 5))]
    roll = rng.random()
    if roll < 0.1:
        path.write_bytes(bytes(rng.getrandbits(8) for _ in range(64)))
    elif roll < 0.2:
        path.write_text("\n".join("  " * rng.randint(0, 3) + line for line in lines))
    else:
        path.write_text("\n".join(lines) + "\n")
    cls = rng.choice([SftConfig, DpoConfig])
    return _check(lambda: load_config(cls, str(path), {"out": str(root / "out")}, []), root)


def _override_case(seed: int, tmp_path: Path) -> str:
    rng = random.Random(f"override-{seed}")
    root = tmp_path / "case"
    root.mkdir()
    overrides = []
    for _ in range(rng.randint(1, 4)):
        roll = rng.random()
        if roll < 0.1:
            overrides.append(rng.choice(["novalue", "=", "==1", "=1", "a=b=c", " lr = 1"]))
        else:
            overrides.append(f"{rng.choice(CONFIG_KEYS)}={rng.choice(CONFIG_VALUES)}")
    return _check(lambda: load_config(DpoConfig, None, {"out": str(root / "out")}, overrides), root)


WORLD_FLAGS = {
    "--train": ["-3", "-1", "x", "1.5", "nan", ""], "--eval": ["-1", "abc", "1e3"],
    "--image-size": ["0", "-64", "7", "31", "1000000", "x"], "--min-objects": ["-1", "0", "99"],
    "--max-objects": ["0", "-2", "x"], "--pair-prob": ["-0.1", "1.5", "nan", "inf"],
    "--synonym-prob": ["0.9", "-1", "nan"], "--seed": ["x", "1.5"], "--detailed-intro": ["bogus", ""],
}  # fmt: skip


def _world_case(seed: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    rng = random.Random(f"world-{seed}")
    root = tmp_path / "case"
    root.mkdir()
    flags = rng.sample(sorted(WORLD_FLAGS), rng.randint(1, 3))
    argv = ["world", "--out", str(root / "w"), "--train", "4", "--eval", "2"]
    for flag in flags:
        argv += [flag, rng.choice(WORLD_FLAGS[flag])]

    def run() -> None:
        try:
            code = main(argv)
        except SystemExit as exit_:  # argparse's own one-line usage error
            code = exit_.code
        err = capsys.readouterr().err
        assert "Traceback" not in err
        if code:
            assert code == 2 and err.strip(), (argv, err)
            raise ConfigError(err.strip().splitlines()[-1])

    return _check(run, root)


DATA_KINDS = sorted(VALID)


@pytest.mark.parametrize("seed", range(FUZZ_CASES))
@pytest.mark.parametrize("kind", DATA_KINDS)
def test_fuzz_data_readers(kind: str, seed: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _data_case(kind, seed, tmp_path, monkeypatch)


@pytest.mark.parametrize("seed", range(FUZZ_CASES))
def test_fuzz_config_files(seed: int, tmp_path: Path) -> None:
    _config_case(seed, tmp_path)


@pytest.mark.parametrize("seed", range(FUZZ_CASES))
def test_fuzz_overrides(seed: int, tmp_path: Path) -> None:
    _override_case(seed, tmp_path)


@pytest.mark.parametrize("seed", range(FUZZ_CASES // 3))
def test_fuzz_world_options(seed: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _world_case(seed, tmp_path, capsys)


@pytest.mark.slow
def test_fuzz_long(tmp_path_factory: pytest.TempPathFactory, capsys: pytest.CaptureFixture[str]) -> None:
    """``MMALIGN_FUZZ_CASES`` cases per reader (seeds after the default suite's); prints the outcome counts."""
    counts: dict[str, dict[str, int]] = {}
    with pytest.MonkeyPatch.context() as monkeypatch:
        for seed in range(FUZZ_CASES, FUZZ_CASES + LONG_CASES):
            for kind in [*DATA_KINDS, "config", "overrides"]:
                tmp = tmp_path_factory.mktemp("fuzz")
                if kind == "config":
                    outcome = _config_case(seed, tmp)
                elif kind == "overrides":
                    outcome = _override_case(seed, tmp)
                else:
                    outcome = _data_case(kind, seed, tmp, monkeypatch)
                counts.setdefault(kind, {"accepted": 0, "error": 0})[outcome] += 1
    with capsys.disabled():
        total = sum(sum(c.values()) for c in counts.values())
        print(f"\nfuzz: {total} cases, 0 tracebacks, 0 hangs")
        for kind, c in counts.items():
            print(f"  {kind:20s} accepted {c['accepted']:5d}  clean errors {c['error']:5d}")
