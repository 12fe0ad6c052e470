"""Packing a batch into fewer rows: the plan by hand, the same per-sample log-likelihoods as the padded batch,
and an SFT run that trains like the unpacked one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mmalign.config import load_config
from mmalign.data.collate import encode_sft
from mmalign.data.loaders import load_samples
from mmalign.data.packing import pack_batch, pack_rows, per_sample_sums
from mmalign.logprobs import IGNORE_INDEX, sequence_logps, token_logps
from mmalign.models.load import load_model
from mmalign.recipes import sft
from mmalign.recipes.sft import SftConfig


def test_first_fit_decreasing_by_hand() -> None:
    # Longest first: 7 opens row 0 (room 3); 5 opens row 1 (room 5); 4 joins row 1 (room 1); 3 joins row 0
    # (room 0); 2 fits nowhere and opens row 2.
    assert pack_rows([3, 7, 2, 5, 4], capacity=10) == [[1, 0], [3, 4], [2]]
    # A sample longer than the capacity gets its own row.
    assert pack_rows([12, 1], capacity=10) == [[0], [1]]


def test_pack_batch_layout_by_hand() -> None:
    enc = {
        "input_ids": torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0], [1, 2, 3, 4]]),
        "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]),
        "labels": torch.tensor([[-100, 6, 7, -100], [-100, 9, -100, -100], [-100, -100, 3, 4]]),
        "pixel_values": torch.arange(3.0).reshape(3, 1),
    }
    # Sample 0 has one image, sample 1 none, sample 2 two: pixel rows [0], [], [1, 2].
    out = pack_batch(enc, [1, 0, 2], pad_id=0, row_length=6)
    # Lengths 3, 2, 4: sample 2 (4) opens row 0, sample 0 (3) opens row 1, sample 1 (2) joins row 0.
    assert out["input_ids"].tolist() == [[1, 2, 3, 4, 8, 9], [5, 6, 7, 0, 0, 0]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1], [0, 1, 2, 0, 1, 2]]
    assert out["sample_index"].tolist() == [[2, 2, 2, 2, 1, 1], [0, 0, 0, -1, -1, -1]]
    assert out["labels"].tolist() == [[-100, -100, 3, 4, -100, 9], [-100, 6, 7, -100, -100, -100]]
    assert out["pixel_values"].flatten().tolist() == [1.0, 2.0, 0.0]  # images follow the packed order
    assert "attention_mask" not in out
    with pytest.raises(ValueError, match="cannot pack"):
        pack_batch({**enc, "image_grid_thw": torch.ones(3, 3)}, [1, 0, 2], 0, 6)
    with pytest.raises(ValueError, match="images expected"):
        pack_batch(enc, [1, 1, 2], 0, 6)


def test_per_sample_sums_by_hand() -> None:
    values = torch.tensor([[1.0, 2.0, 4.0], [8.0, 16.0, 32.0]])
    mask = torch.tensor([[True, False, True], [True, True, False]])
    owner = torch.tensor([[0, 0, 1, 1], [2, 2, 2, -1]])
    sums, counts = per_sample_sums(values, mask, owner, 3)
    # Position t belongs to the sample of token t + 1: row 0 → 1.0 to sample 0, 4.0 to sample 1; row 1 → 24 to 2.
    assert sums.tolist() == [1.0, 4.0, 24.0] and counts.tolist() == [1, 1, 2]


def test_packed_log_likelihoods_equal_the_padded_ones(llava_dir: Path, world_dir: Path) -> None:
    loaded = load_model(llava_dir)
    samples = load_samples(world_dir / "sft.jsonl").samples[:12]
    enc = encode_sft(loaded.processor, samples)
    packed = pack_batch(enc, [len(s.images) for s in samples], loaded.tokenizer.pad_token_id, row_length=160)
    assert packed["input_ids"].numel() < enc["input_ids"].numel()
    with torch.no_grad():
        labels = enc.pop("labels")
        want, n_want = sequence_logps(loaded.model(**enc, use_cache=False).logits, labels)
        labels, owner = packed.pop("labels"), packed.pop("sample_index")
        logps, mask = token_logps(loaded.model(**packed, use_cache=False).logits, labels)
    got, n_got = per_sample_sums(logps, mask, owner, len(samples))
    assert torch.equal(n_got, n_want)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    assert int((labels != IGNORE_INDEX).sum()) == int(n_want.sum())


@pytest.mark.parametrize("per", ["token", "sample"])
def test_packed_sft_trains_like_unpacked(
    llava_dir: Path, world_dir: Path, tmp_path: Path, per: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows: list[int] = []

    def spy(enc: dict, *args: object) -> dict:
        packed = pack_batch(enc, *args)
        rows.append(len(packed["input_ids"]))
        return packed

    monkeypatch.setattr(sft, "pack_batch", spy)
    losses = {}
    for pack in ("false", "true"):
        out = tmp_path / pack
        cfg = load_config(
            SftConfig,
            flags={"model": str(llava_dir), "data": str(world_dir / "sft.jsonl"), "out": str(out)},
            overrides=["steps=5", "batch_size=8", "lr=1e-3", "progress=false", "log_every=1", f"loss_per={per}",
                       f"pack={pack}", "pack_length=160"],
        )  # fmt: skip
        sft.train(cfg)
        losses[pack] = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-4)
    # The packed run really packed: five batches of 8 samples, each in fewer rows.
    assert len(rows) == 5 and max(rows) < 8


def test_packing_refuses_models_with_their_own_positions(world_dir: Path, tmp_path: Path) -> None:
    from conftest import build_model
    from mmalign.errors import ConfigError

    qwen = build_model("qwen2-vl", world_dir, tmp_path / "qwen")
    cfg = load_config(
        SftConfig,
        flags={"model": str(qwen), "data": str(world_dir / "sft.jsonl"), "out": str(tmp_path / "run")},
        overrides=["steps=1", "batch_size=2", "progress=false", "pack=true"],
    )
    with pytest.raises(ConfigError, match="qwen2-vl cannot be packed"):
        sft.train(cfg)
