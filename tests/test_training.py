"""The training loop: determinism, exact resume after a crash, gradient-accumulation invariance, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmalign.config import load_config
from mmalign.errors import DataError
from mmalign.recipes import sft
from mmalign.recipes.sft import SftConfig
from mmalign.runtime.batching import Batches, batch_indices, length_grouped_indices


def _cfg(model: Path, data: Path, out: Path, *extra: str) -> SftConfig:
    return load_config(
        SftConfig,
        flags={"model": str(model), "data": str(data), "out": str(out)},
        overrides=["steps=6", "batch_size=4", "lr=1e-3", "progress=false", "log_every=1", *extra],
    )


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model" / "model.safetensors"))


def test_same_seed_same_weights(llava_dir: Path, world_dir: Path, tmp_path: Path) -> None:
    data = world_dir / "sft.jsonl"
    sft.train(_cfg(llava_dir, data, tmp_path / "a", "steps=3"))
    sft.train(_cfg(llava_dir, data, tmp_path / "b", "steps=3"))
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_after_crash_reaches_the_same_weights(
    llava_dir: Path, world_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = world_dir / "sft.jsonl"
    sft.train(_cfg(llava_dir, data, tmp_path / "full", "save_every=2"))

    calls = {"n": 0}
    real = sft.encode_sft

    def crash_at_step_5(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(sft, "encode_sft", crash_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        sft.train(_cfg(llava_dir, data, tmp_path / "resumed", "save_every=2"))
    monkeypatch.setattr(sft, "encode_sft", real)
    assert (tmp_path / "resumed" / "checkpoints" / "step-00000004").is_dir()
    assert not (tmp_path / "resumed" / "model").exists()
    sft.train(_cfg(llava_dir, data, tmp_path / "resumed", "save_every=2", "resume=true"))

    full, resumed = _weights(tmp_path / "full"), _weights(tmp_path / "resumed")
    assert full.keys() == resumed.keys()
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], rtol=0, atol=1e-6)
    rows = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 6  # no duplicated steps after the resume


def test_gradient_accumulation_matches_one_big_batch(llava_dir: Path, world_dir: Path, tmp_path: Path) -> None:
    data = world_dir / "sft.jsonl"
    sft.train(_cfg(llava_dir, data, tmp_path / "big", "steps=2", "batch_size=8", "max_grad_norm=0"))
    sft.train(_cfg(llava_dir, data, tmp_path / "acc", "steps=2", "batch_size=4", "grad_accum=2", "max_grad_norm=0"))
    big, acc = _weights(tmp_path / "big"), _weights(tmp_path / "acc")
    for k in big:
        torch.testing.assert_close(acc[k], big[k], rtol=1e-4, atol=1e-6)


def test_batch_order_is_a_pure_function_of_the_step() -> None:
    epoch = [i for m in range(5) for i in batch_indices(20, 4, m, seed=3)]
    assert sorted(epoch) == list(range(20))
    assert batch_indices(20, 4, 7, seed=3) == batch_indices(20, 4, 7, seed=3)
    assert batch_indices(20, 4, 0, seed=3) != batch_indices(20, 4, 0, seed=4)
    two_procs = batch_indices(20, 2, 1, seed=3, rank=0, world=2) + batch_indices(20, 2, 1, seed=3, rank=1, world=2)
    assert two_procs == batch_indices(20, 4, 1, seed=3)


def test_length_grouped_batches_pad_less_and_stay_a_pure_function_of_the_step() -> None:
    # Two kinds of example, as in the world's SFT data: short yes/no answers and long captions, interleaved.
    lengths = [10 if i % 2 else 100 for i in range(64)]
    batches = [length_grouped_indices(lengths, 4, m, seed=1, group=8) for m in range(16)]
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(64))  # one epoch: every example once
    # Sorted chunks of 32: every batch holds one kind only, so nothing is padded.
    assert all(len({lengths[i] for i in b}) == 1 for b in batches)
    plain = [batch_indices(64, 4, m, seed=1) for m in range(16)]
    assert sum(len({lengths[i] for i in b}) > 1 for b in plain) > 8  # the plain order mixes them
    # Stateless (resume rebuilds the same batch), seeded, and two processes split one global batch.
    assert length_grouped_indices(lengths, 4, 21, seed=1, group=8) == length_grouped_indices(
        lengths, 4, 21, seed=1, group=8
    )
    assert [length_grouped_indices(lengths, 4, m, seed=2, group=8) for m in range(16)] != batches
    two = [length_grouped_indices(lengths, 2, 3, seed=1, rank=r, world=2, group=8) for r in (0, 1)]
    assert two[0] + two[1] == batches[3]
    # The 3 examples that do not fill a last batch sit the epoch out; the next epoch is a new order.
    odd = list(range(67))
    seen = {i for m in range(16) for i in length_grouped_indices(odd, 4, m, seed=0, group=2)}
    assert len(seen) == 64
    assert length_grouped_indices(odd, 4, 16, seed=0, group=2) != length_grouped_indices(odd, 4, 0, seed=0, group=2)
    with pytest.raises(ValueError, match="full batch"):
        length_grouped_indices([1, 2], 4, 0, seed=0)


def test_batches_follow_the_config(world_dir: Path) -> None:
    from mmalign.config import TrainConfig
    from mmalign.data.loaders import load_samples

    samples = load_samples(world_dir / "sft.jsonl", limit=96).samples
    plain = Batches.for_run(samples, TrainConfig(batch_size=8))
    grouped = Batches.for_run(samples, TrainConfig(batch_size=8, group_by_length=True))
    assert plain(2) == batch_indices(96, 8, 2, seed=0)

    def spread(b: Batches) -> float:
        return sum(
            max(samples[i].text_length for i in b(m)) - min(samples[i].text_length for i in b(m)) for m in range(12)
        )

    assert spread(grouped) < 0.5 * spread(plain)


def test_bad_data_is_reported_or_skipped(llava_dir: Path, world_dir: Path, tmp_path: Path) -> None:
    rows = (world_dir / "sft.jsonl").read_text().splitlines()[:6]
    rows[2] = rows[2].replace('"images": ["images/', '"images": ["missing/')
    bad = world_dir / "bad_sft.jsonl"
    bad.write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match=r"bad_sft.jsonl row 3 field 'images\[0\]'"):
        sft.train(_cfg(llava_dir, bad, tmp_path / "fail", "steps=1"))
    final = sft.train(_cfg(llava_dir, bad, tmp_path / "skip", "steps=1", "on_bad_record=skip"))
    assert (final / "config.json").is_file()


def test_rows_with_nothing_to_learn_are_refused(llava_dir: Path, world_dir: Path, tmp_path: Path) -> None:
    """A row whose assistant turn is empty, or that has none, names its file, row and field (it used to train on
    nothing and save the untrained weights); with on_bad_record=skip it is dropped."""
    rows = [json.loads(x) for x in (world_dir / "sft.jsonl").read_text().splitlines()[:6]]
    rows[1]["messages"][-1]["content"] = [{"type": "text", "text": "  "}]
    rows[3]["messages"] = rows[3]["messages"][:-1]
    data = world_dir / "no_reply.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"no_reply.jsonl row 2 field 'messages': no assistant turn with text"):
        sft.train(_cfg(llava_dir, data, tmp_path / "fail", "steps=1"))
    data.write_text("".join(json.dumps(r) + "\n" for r in rows[3:4]))
    with pytest.raises(DataError, match=r"row 1 field 'messages'"):
        sft.train(_cfg(llava_dir, data, tmp_path / "none", "steps=1", "on_bad_record=skip"))  # nothing left


@pytest.mark.slow
def test_compiled_decoder_trains_like_eager(llava_dir: Path, world_dir: Path, tmp_path: Path) -> None:
    data = world_dir / "sft.jsonl"
    sft.train(_cfg(llava_dir, data, tmp_path / "eager", "steps=3", "max_grad_norm=0"))
    sft.train(_cfg(llava_dir, data, tmp_path / "compiled", "steps=3", "max_grad_norm=0", "compile=true"))
    eager, compiled = _weights(tmp_path / "eager"), _weights(tmp_path / "compiled")
    start = load_file(str(llava_dir / "model.safetensors"))
    assert max((eager[k] - start[k]).abs().max().item() for k in eager) > 1e-3
    assert set(compiled) == set(eager)  # parameter names unchanged by the in-place compile
    for k in eager:
        torch.testing.assert_close(compiled[k], eager[k], rtol=1e-3, atol=1e-4, msg=k)


def test_compile_is_skipped_with_a_warning_without_a_cpp_compiler(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import shutil

    from mmalign.runtime import run

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with caplog.at_level("WARNING"):
        assert run.can_compile() is False
    assert "no C++ compiler" in caplog.text
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/g++" if name == "g++" else None)
    assert run.can_compile() is True
