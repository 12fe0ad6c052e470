"""The sampling loop: greedy equals ``model.generate``, seeds reproduce, image masking hides exactly the image; the
engine choice (``hf`` or ``vllm``) and, on a GPU with vLLM, the vLLM engine against the Hugging Face model."""

from __future__ import annotations

import functools
import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest
import torch

from conftest import TEST_SIZE, build_model
from mmalign.errors import ConfigError
from mmalign.eval.generate import generate_answers
from mmalign.generation.hf import HFGenerator, image_keep_mask
from mmalign.generation.sampling import SamplingParams, filter_logits, sample_next
from mmalign.models.load import load_model
from mmalign.types import ImageRef, Message, Sample


def _prompts(world: Path, images: tuple[int, ...] = (0, 1, 2)) -> list[Sample]:
    questions = ["Describe the image in detail.", "Is there a star?", "What colour is the circle in the image?"]
    return [
        Sample(
            id=f"s{i}",
            messages=(Message.user(questions[k % 3], images=1),),
            images=(ImageRef(path=f"images/train/{i:06d}.png"),),
            root=str(world),
        )
        for k, i in enumerate(images)
    ]


def test_top_k_and_top_p_keep_the_right_tokens() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    # Mass before each token: 0, .5, .8, .95 -> with p = .8 the first two survive (the second reaches .8).
    assert torch.isinf(filter_logits(logits, top_p=0.8)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.81)).tolist() == [[False, False, False, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.3)).tolist() == [[False, True, True, True]]
    greedy = sample_next(logits, SamplingParams(temperature=0), None)
    assert greedy.tolist() == [0]
    g = torch.Generator().manual_seed(0)
    draws = [int(sample_next(logits, SamplingParams(top_k=1), g)) for _ in range(20)]
    assert set(draws) == {0}


def test_image_keep_mask_hides_only_image_tokens_at_rate_rho() -> None:
    ids = torch.tensor([[1, 2] + [7] * 4000 + [3]])
    keep = image_keep_mask(ids, image_token_id=7, drop=0.99, generator=torch.Generator().manual_seed(0))
    assert keep[0, :2].all() and keep[0, -1]
    visible = keep[0, 2:-1].float().mean().item()
    assert abs(visible - 0.01) < 0.005


@pytest.mark.parametrize(
    "family", ["llava", "qwen2-vl", "idefics3", "smolvlm", "qwen2.5-vl", "llava-next", "llava-onevision"]
)
def test_greedy_matches_model_generate(family: str, world_dir: Path, tmp_path: Path) -> None:
    loaded = load_model(build_model(family, world_dir, tmp_path / family))
    prompts = _prompts(world_dir)
    gen = HFGenerator(loaded.model, loaded.processor, batch_size=2)
    ours = [g[0].text for g in gen.generate(prompts, params=SamplingParams(temperature=0, max_new_tokens=10))]
    theirs = generate_answers(loaded.model, loaded.processor, prompts, max_new_tokens=10, batch_size=2, progress=False)
    assert ours == theirs


def test_sampling_is_seeded_and_logps_are_model_logps(llava_dir: Path, world_dir: Path) -> None:
    loaded = load_model(llava_dir)
    gen = HFGenerator(loaded.model, loaded.processor)
    params = SamplingParams(temperature=1.0, max_new_tokens=6, seed=3)
    a = gen.generate(_prompts(world_dir), 3, params=params)
    b = gen.generate(_prompts(world_dir), 3, params=params)
    c = gen.generate(_prompts(world_dir), 3, params=SamplingParams(temperature=1.0, max_new_tokens=6, seed=4))
    assert [[r.token_ids for r in g] for g in a] == [[r.token_ids for r in g] for g in b]
    assert [[r.token_ids for r in g] for g in a] != [[r.token_ids for r in g] for g in c]
    assert all(len(g) == 3 for g in a)
    # Rollout.logp is the model's log-prob of the sampled tokens: rescore one reply with a full forward pass.
    r = a[0][0]
    from mmalign.data.collate import encode_prompts

    enc = encode_prompts(loaded.processor, _prompts(world_dir)[:1])
    ids = torch.cat([enc["input_ids"], torch.tensor([r.token_ids])], dim=1)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        logits = loaded.model(input_ids=ids, attention_mask=mask, pixel_values=enc["pixel_values"]).logits
    p = enc["input_ids"].shape[1]
    logps = torch.log_softmax(logits[0, p - 1 : -1].float(), -1).gather(-1, torch.tensor(r.token_ids)[:, None])
    assert r.logp == pytest.approx(logps.sum().item(), abs=1e-3)


def test_full_image_masking_makes_replies_independent_of_the_image(llava_dir: Path, world_dir: Path) -> None:
    loaded = load_model(llava_dir)
    gen = HFGenerator(loaded.model, loaded.processor)
    params = SamplingParams(temperature=0, max_new_tokens=6)
    two_images = _prompts(world_dir, images=(0, 3))
    two_images = [two_images[0], Sample(**{**two_images[1].__dict__, "messages": two_images[0].messages})]
    seen = gen.generate(two_images, params=params)
    hidden = gen.generate(two_images, params=params, image_drop=1.0)
    assert seen[0][0].logp != pytest.approx(seen[1][0].logp, abs=1e-4)
    assert hidden[0][0].logp == pytest.approx(hidden[1][0].logp, abs=1e-5)
    assert hidden[0][0].meta["image_tokens_visible"] == 0.0
    # A negligible masking rate takes the per-reply path yet changes nothing: positions are left as they were.
    almost = gen.generate(two_images, params=params, image_drop=1e-12)
    assert [g[0].logp for g in almost] == pytest.approx([g[0].logp for g in seen], abs=1e-5)
    assert all(math.isfinite(g[0].logp) for g in hidden)


def test_prefix_is_continued_and_kept(llava_dir: Path, world_dir: Path) -> None:
    loaded = load_model(llava_dir)
    gen = HFGenerator(loaded.model, loaded.processor)
    out = gen.generate(
        _prompts(world_dir)[:1],
        params=SamplingParams(temperature=0, max_new_tokens=4, stop_at_sentence_end=True),
        prefixes=["There are two"],
    )
    assert out[0][0].text.startswith("There are two")


def test_engine_choice_is_checked_before_any_model_loads() -> None:
    """Unknown engines, and vLLM asked to mask image tokens, are one-line errors wherever vLLM is installed or not;
    vLLM missing is one too, with the command that installs it. Looking vLLM up does not import it."""
    from mmalign.generation.engines import check_engine, make_generator
    from mmalign.generation.vllm import VllmGenerator, vllm_available

    with pytest.raises(ConfigError, match=r"^engine must be one of hf, vllm, got 'vlm'$"):
        check_engine("vlm")
    with pytest.raises(ConfigError, match=r"cannot hide image tokens from attention") as err:
        check_engine("vllm", image_masking=True)
    assert "\n" not in str(err.value)
    check_engine("vllm", installed=False)
    check_engine("hf", image_masking=True)
    if vllm_available():
        pytest.skip("vLLM is installed here")
    assert "vllm" not in sys.modules
    for build in (
        lambda: VllmGenerator("/nonexistent"),
        lambda: make_generator("vllm", model_dir="/nonexistent"),
        lambda: generate_answers(None, None, [], engine="vllm", model_dir="/nonexistent"),
    ):
        with pytest.raises(
            ConfigError, match=r"^engine=vllm needs vLLM, which is not installed: pip install 'mmalign\[vllm\]'"
        ):
            build()
    assert "vllm" not in sys.modules


class FakeLLM:
    """Stands in for ``vllm.LLM`` on a CPU: records how it was built, every request and every weight push, and
    answers each request with ``n`` fixed replies."""

    built: ClassVar[list[FakeLLM]] = []

    def __init__(self, model: str, seed: int = 0, **kwargs: Any) -> None:
        self.model, self.seed, self.kwargs = model, seed, kwargs
        self.requests: list[dict[str, Any]] = []
        self.pushed: list[dict[str, torch.Tensor]] = []
        self.llm_engine = SimpleNamespace(
            model_executor=SimpleNamespace(driver_worker=SimpleNamespace(model_runner=SimpleNamespace(model=self)))
        )
        FakeLLM.built.append(self)

    def load_weights(self, weights: Any) -> None:  # the model inside the engine
        self.pushed.append({k: v.clone() for k, v in weights})

    def reset_prefix_cache(self) -> None:
        pass

    def generate(self, inputs: list[dict[str, Any]], sampling: Any, use_tqdm: bool = False) -> list[Any]:
        self.requests.extend(inputs)
        replies = [f" A star {j}." for j in range(sampling.n)]
        outputs = [
            SimpleNamespace(text=t, token_ids=[1, 2], cumulative_logprob=-1.5, finish_reason="stop") for t in replies
        ]
        return [SimpleNamespace(outputs=outputs) for _ in inputs]


def fake_vllm(monkeypatch: pytest.MonkeyPatch) -> type[FakeLLM]:
    """Install a stand-in ``vllm`` module (``LLM``, ``SamplingParams``) for this test: the wiring of
    ``engine=vllm`` runs on a CPU, every call to vLLM recorded."""
    import importlib.machinery
    import types

    module = types.ModuleType("vllm")
    module.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    module.LLM = FakeLLM
    module.SamplingParams = lambda **kw: SimpleNamespace(**kw)
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    FakeLLM.built = []
    return FakeLLM


def test_vllm_engine_wiring_with_a_stand_in_vllm(
    llava_dir: Path, world_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Evaluation's greedy answers with ``engine=vllm``: one engine per directory, reused; greedy requests with the
    chat-template prompt and the image; replies stripped."""
    from mmalign.data.collate import render
    from mmalign.eval import generate as evalgen

    fake = fake_vllm(monkeypatch)
    evalgen._vllm_engine.cache_clear()
    prompts = _prompts(world_dir)
    try:
        for _ in range(2):
            answers = generate_answers(None, None, prompts, max_new_tokens=7, engine="vllm", model_dir=llava_dir)
            assert answers == ["A star 0."] * 3
    finally:
        evalgen._vllm_engine.cache_clear()
    [llm] = fake.built
    assert llm.model == str(llava_dir) and len(llm.requests) == 6
    processor = load_model(llava_dir).processor
    first = llm.requests[0]
    assert first["prompt"] == render(processor, prompts[0].prompt_messages, generation_prompt=True)
    assert first["multi_modal_data"]["image"].size == prompts[0].load_images()[0].size
    with pytest.raises(ConfigError, match="cannot hide image tokens"):
        evalgen.make_generator("vllm", model_dir=llava_dir).generate(prompts, image_drop=0.5)


def vllm_sized_model(world: Path, out: Path, seed: int = 0) -> Path:
    """A tiny LLaVA whose attention heads are 64 (language model) and 32 (vision tower) wide: sizes vLLM's attention
    kernels take, which the test size's 16-wide heads are not."""
    from mmalign.data.corpus import corpus_texts
    from mmalign.models.build import build_tiny, save_model
    from mmalign.models.families import TinySize

    size = TinySize(**{**TEST_SIZE, "text_hidden": 128, "text_heads": 2, "text_intermediate": 256, "vision_heads": 1})
    model, processor = build_tiny("llava", corpus_texts([world]), size=size, seed=seed)
    return save_model(model, processor, out)


def run_isolated(module: str, function: str, *args: str, timeout: int = 420) -> str:
    """``module.function(*args)`` (a tests/ module) in a fresh Python process, which holds its own vLLM engine and
    frees its GPU memory on exit; returns its stdout."""
    tests = str(Path(__file__).parent)
    code = f"import sys; sys.path.insert(0, {tests!r}); import {module}; {module}.{function}(*sys.argv[1:])"
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


def small_vllm(make_generator: Callable[..., Any]) -> Callable[..., Any]:
    """``make_generator`` with a test-sized vLLM engine: no compilation or CUDA graphs (a start-up in seconds),
    a third of the GPU's memory."""
    return functools.partial(make_generator, enforce_eager=True, gpu_memory_utilization=0.3)


def _hf_logp(loaded, prompt: Sample, token_ids: tuple[int, ...]) -> float:
    """Summed log-prob of ``token_ids`` after ``prompt`` under the Hugging Face model (one full forward)."""
    from mmalign.data.collate import encode_prompts

    enc = encode_prompts(loaded.processor, [prompt])
    ids = torch.cat([enc["input_ids"], torch.tensor([token_ids])], dim=1)
    with torch.no_grad():
        logits = loaded.model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=enc["pixel_values"])
    p = enc["input_ids"].shape[1]
    logps = torch.log_softmax(logits.logits[0, p - 1 : -1].float(), -1)
    return logps.gather(-1, torch.tensor(token_ids)[:, None]).sum().item()


def vllm_matches_hf(model_dir: str, other_dir: str, world: str) -> None:
    """Run in its own process (``run_isolated``): evaluation's greedy answers on vLLM, the replies' log-probs under
    the Hugging Face model, seeded sampling, and weights pushed in from another model."""
    from mmalign.eval import generate as evalgen
    from mmalign.recipes.online_dpo import policy_weights

    evalgen.make_generator = small_vllm(evalgen.make_generator)
    prompts = _prompts(Path(world))
    greedy = SamplingParams(temperature=0, max_new_tokens=8)
    answers = generate_answers(None, None, prompts, max_new_tokens=8, engine="vllm", model_dir=model_dir)
    engine = evalgen._vllm_engine(model_dir)  # the engine generate_answers built, kept for the next call
    rollouts = [g[0] for g in engine.generate(prompts, params=greedy)]
    assert answers == [r.text for r in rollouts] and all(answers)
    hf = load_model(model_dir)
    for prompt, r in zip(prompts, rollouts):
        assert r.logp == pytest.approx(_hf_logp(hf, prompt, r.token_ids), abs=1e-2)
    sampled = SamplingParams(temperature=1.0, max_new_tokens=8, seed=3)
    a, b = (engine.generate(prompts, 3, params=sampled) for _ in range(2))
    assert [[r.token_ids for r in g] for g in a] == [[r.token_ids for r in g] for g in b]
    assert all(len(g) == 3 for g in a)
    other = load_model(other_dir)
    engine.load_weights(policy_weights(other.model).items())
    for prompt, r in zip(prompts, (g[0] for g in engine.generate(prompts, params=greedy))):
        assert r.logp == pytest.approx(_hf_logp(other, prompt, r.token_ids), abs=1e-2)
    print("ok")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_vllm_engine_samples_the_hugging_face_model(world_dir: Path, tmp_path: Path) -> None:
    from mmalign.generation.vllm import vllm_available

    if not vllm_available():
        pytest.skip("needs vLLM: pip install 'mmalign[vllm]'")
    model = vllm_sized_model(world_dir, tmp_path / "a", seed=0)
    other = vllm_sized_model(world_dir, tmp_path / "b", seed=1)
    assert run_isolated("test_generation", "vllm_matches_hf", str(model), str(other), str(world_dir)).endswith("ok\n")
