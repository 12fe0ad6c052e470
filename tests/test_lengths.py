"""Sequence lengths at load time: exact token counts, and the error / truncate_prompt / skip policies."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from mmalign.cli import main
from mmalign.data.collate import encode_prompts, encode_sft
from mmalign.data.lengths import TokenCounter, fit_lengths
from mmalign.data.loaders import load_samples
from mmalign.data.pair_inputs import encode_pairs
from mmalign.data.preference import load_pairs
from mmalign.errors import DataError
from mmalign.lab.world.pairs import write_world_pairs
from mmalign.models.load import load_model


@pytest.fixture(scope="module")
def processor(llava_dir: Path):
    return load_model(llava_dir).processor


def _rows(world_dir: Path, n: int) -> list[dict]:
    return [json.loads(line) for line in (world_dir / "sft.jsonl").read_text().splitlines()[:n]]


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_counts_equal_the_encoded_lengths(world_dir: Path, tmp_path: Path, processor) -> None:
    samples = load_samples(world_dir / "sft.jsonl", limit=12).samples
    counter = TokenCounter(processor)
    counted = counter.lengths([s.messages for s in samples], [s.images for s in samples], samples[0].root)
    encoded = [int(encode_sft(processor, [s])["attention_mask"].sum()) for s in samples]
    assert counted == encoded
    # A pair's length is its longest encoded sequence: the encoder accepts exactly that limit, not one less.
    write_world_pairs(world_dir, tmp_path / "pairs.jsonl", seed=0)
    pairs = load_pairs(tmp_path / "pairs.jsonl", root=world_dir, limit=6).pairs
    longest = fit_lengths(processor, pairs, [], "pairs.jsonl", max_length=10_000).longest
    encode_pairs(processor, pairs, share_prompt=False, max_length=longest)
    with pytest.raises(ValueError, match=f"has {longest} tokens > max_length={longest - 1}"):
        encode_pairs(processor, pairs, share_prompt=False, max_length=longest - 1)


def test_over_long_sample_policies(world_dir: Path, tmp_path: Path, processor) -> None:
    rows = _rows(world_dir, 4)
    long_question = "is there a star " * 60
    rows[2]["messages"][0]["content"][-1]["text"] = long_question
    rows[2]["messages"].append({"role": "user", "content": "and?"})
    rows[2]["messages"].append({"role": "assistant", "content": "No."})
    path = _write(world_dir / "long_rows.jsonl", rows)
    try:
        data = load_samples(path)
        counter = TokenCounter(processor)
        lengths = counter.lengths(
            [s.messages for s in data.samples], [s.images for s in data.samples], data.samples[0].root
        )
        limit = sorted(lengths)[-2] + 1  # every row fits but the long one
        assert lengths[2] > limit
        with pytest.raises(
            DataError, match=rf"long_rows\.jsonl row 3 field 'messages': {lengths[2]} tokens .*> max_length={limit}"
        ):
            fit_lengths(processor, data.samples, data.rows, path, limit, "error")
        skipped = fit_lengths(processor, data.samples, data.rows, path, limit, "skip")
        assert (skipped.skipped, skipped.rows) == (1, [1, 2, 4])
        cut = fit_lengths(processor, data.samples, data.rows, path, limit, "truncate_prompt")
        assert cut.truncated == 1 and cut.rows == [1, 2, 3, 4]
        short = cut.items[2]
        n = counter.lengths([short.messages], [short.images], short.root)[0]
        assert n <= limit
        # The images and every reply are kept; only the first user turn's text lost its start, keeping its end.
        assert short.images == data.samples[2].images
        assert [m.text for m in short.messages if m.role == "assistant"] == [
            m.text for m in data.samples[2].messages if m.role == "assistant"
        ]
        first = short.messages[0].text
        assert len(first) < len(long_question) and long_question.rstrip().endswith(first.strip())
        # A limit that the images and replies alone exceed cannot be met by cutting the prompt.
        with pytest.raises(DataError, match="even with the prompt's text cut"):
            fit_lengths(processor, data.samples, data.rows, path, 20, "truncate_prompt")
        with pytest.raises(DataError, match="every example is longer"):
            fit_lengths(processor, data.samples, data.rows, path, 20, "skip")
    finally:
        path.unlink()


def test_sft_refuses_an_over_long_sample_before_training(
    world_dir: Path, llava_dir: Path, tmp_path: Path, capsys
) -> None:
    rows = _rows(world_dir, 6)
    rows[4]["messages"][0]["content"][-1]["text"] = "is there a star " * 80
    path = _write(world_dir / "long_sft.jsonl", rows)
    try:
        out = tmp_path / "run"
        args = ["train", "sft", "--model", str(llava_dir), "--data", str(path), "--out", str(out), "--steps", "1",
                "--batch-size", "2", "max_length=200", "progress=false"]  # fmt: skip
        assert main(args) == 2
        err = capsys.readouterr().err
        assert "long_sft.jsonl row 5 field 'messages'" in err and "> max_length=200" in err
        assert not (out / "model").exists() and not (out / "checkpoints").exists()
        assert main([*args, "truncation=skip"]) == 0
        assert (out / "model" / "model.safetensors").is_file()
    finally:
        path.unlink()


def test_prompts_keep_room_for_the_sampled_reply(world_dir: Path, processor) -> None:
    data = load_samples(world_dir / "sft.jsonl", limit=8)
    prompts = [dataclasses.replace(s, messages=s.prompt_messages) for s in data.samples]
    encoded = encode_prompts(processor, prompts)["attention_mask"].sum(1).tolist()
    longest = max(encoded)
    # Counted with the generation prompt, exactly as the sampler encodes them: a prompt fits when it and
    # max_new_tokens fit in max_length.
    fitted = fit_lengths(processor, prompts, data.rows, data.path, longest + 16, reserve=16)
    assert fitted.longest == longest and fitted.rows == data.rows
    row = data.rows[encoded.index(longest)]
    with pytest.raises(DataError, match=rf"row {row} field 'messages': {longest} tokens .* \+ max_new_tokens=17 > "):
        fit_lengths(processor, prompts, data.rows, data.path, longest + 16, reserve=17)
    with pytest.raises(DataError, match="leaves no room"):
        fit_lengths(processor, prompts, data.rows, data.path, 16, reserve=16)


def test_critique_pairs_count_the_request_and_the_critique(world_dir: Path, tmp_path: Path, processor) -> None:
    from mmalign.reward import CRITIQUE_REQUEST, encode_pair_critiques

    write_world_pairs(world_dir, tmp_path / "pairs.jsonl", seed=0)
    pairs = [
        dataclasses.replace(p, chosen_critique="It names what is there.", rejected_critique="It invents a moon " * 3)
        for p in load_pairs(tmp_path / "pairs.jsonl", root=world_dir, limit=4).pairs
    ]
    plain = fit_lengths(processor, pairs, [], "p", max_length=10_000).longest
    longest = fit_lengths(processor, pairs, [], "p", max_length=10_000, critique_request=CRITIQUE_REQUEST).longest
    assert longest > plain
    encode_pair_critiques(processor, pairs, longest)
    with pytest.raises(ValueError, match=f"> max_length={longest - 1}"):
        encode_pair_critiques(processor, pairs, longest - 1)
