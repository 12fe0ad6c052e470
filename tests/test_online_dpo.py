"""Judges and online / hybrid DPO: ranking by the judge, EOS penalty, mixing, γ-weights, and the recipe end to end."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from mmalign.config import load_config
from mmalign.errors import ConfigError
from mmalign.judges.python import FunctionJudge
from mmalign.judges.rules import ObjectJudge
from mmalign.lab.world.pairs import write_world_pairs
from mmalign.recipes import online_dpo
from mmalign.recipes.online_dpo import OnlineDpoConfig, sampled_pairs, step_pairs
from mmalign.types import Message, PreferencePair, Rollout, Sample


def _sample(objects: list[str]) -> Sample:
    return Sample(id="s", messages=(Message.user("Describe.", images=1),), meta={"objects": objects})


def test_object_judge_counts_hallucinated_and_missed(world_dir: Path) -> None:
    judge = ObjectJudge.for_world(world_dir)
    s = _sample(["star", "circle"])
    assert judge.counts(s, "A red star and a blue moon.") == (1, 1)
    assert judge.counts(s, "Two stars and a circle.") == (0, 0)
    assert judge.score([s, s], ["A red star and a blue moon.", "A star."]) == [-1.5, -0.5]


def test_function_judge_loads_from_a_file(tmp_path: Path) -> None:
    f = tmp_path / "myjudge.py"
    f.write_text("def length(prompt, reply):\n    return -len(reply.split())\n")
    judge = FunctionJudge.load(f"{f}:length")
    assert judge.score([_sample([])] * 2, ["a b c", "a"]) == [-3.0, -1.0]
    with pytest.raises(ConfigError, match="no function 'nope'"):
        FunctionJudge.load(f"{f}:nope")
    with pytest.raises(ConfigError, match="expected 'module:function'"):
        FunctionJudge.load("justaname")


def test_a_weighted_sum_of_judges(world_dir: Path, tmp_path: Path) -> None:
    from mmalign.judges import load_judge

    f = tmp_path / "myjudge.py"
    f.write_text("def length(prompt, reply):\n    return -len(reply.split())\n")
    judge = load_judge(f"0.5*{f}:length + 2*world", world_dir)
    s = _sample(["star", "circle"])
    # 0.5·(−7 words) + 2·(−1.5) and 0.5·(−2) + 2·(−0.5)
    assert judge.score([s, s], ["A red star and a blue moon.", "A star."]) == [-6.5, -2.0]
    assert load_judge(f"{f}:length+world", world_dir).score([s], ["A star."]) == [-2.5]
    with pytest.raises(ConfigError, match="an empty term"):
        load_judge("world+", world_dir)


def test_judges_check_their_prompts_before_any_sampling() -> None:
    from mmalign.judges import WeightedJudges, check_prompts

    class NeedsObjects:
        def score(self, prompts, replies):
            return [0.0] * len(replies)

        def check_prompts(self, prompts):
            for p in prompts:
                if "objects" not in p.meta:
                    raise ConfigError(f"prompt {p.id!r} has no objects")

    good, bad = _sample(["star"]), Sample(id="bare", messages=(Message.user("Describe.", images=1),))
    check_prompts(NeedsObjects(), [good])
    with pytest.raises(ConfigError, match="prompt 'bare'"):
        check_prompts(WeightedJudges([(1.0, ObjectJudgeStub()), (0.5, NeedsObjects())]), [good, bad])


class ObjectJudgeStub:
    def score(self, prompts, replies):
        return [1.0] * len(replies)


class FixedGenerator:
    def __init__(self, replies: list[tuple[str, bool]]) -> None:
        self.replies = replies

    def generate(self, prompts: Sequence[Sample], n: int = 1, *, params, prefixes=None, image_drop=0.0):
        return [[Rollout(p.id, t, (1,), 0.0, fin) for t, fin in self.replies[:n]] for p in prompts]


def test_sampled_pairs_rank_by_judge_and_penalise_missing_eos(world_dir: Path) -> None:
    judge = ObjectJudge.for_world(world_dir)
    cfg = OnlineDpoConfig(samples_per_prompt=3)
    gen = FixedGenerator([("A star and a moon.", True), ("A star and a circle.", True), ("A star.", True)])
    pairs, stats = sampled_pairs(gen, judge, [_sample(["star", "circle"])], cfg, seed=0)
    assert pairs[0].chosen == "A star and a circle." and pairs[0].rejected == "A star and a moon."
    assert stats["objective/scores_margin"] == pytest.approx(1.5)
    assert stats["val/contain_eos_token"] == 1.0
    # The best reply did not stop: with a penalty of 2 it drops below the others.
    gen = FixedGenerator([("A star and a circle.", False), ("A star.", True)])
    cfg = OnlineDpoConfig(missing_eos_penalty=2.0)
    pairs, stats = sampled_pairs(gen, judge, [_sample(["star", "circle"])], cfg, seed=0)
    assert pairs[0].chosen == "A star." and stats["val/contain_eos_token"] == 0.5
    # Ties go to the earlier sample.
    gen = FixedGenerator([("A star.", True), ("One star.", True)])
    pairs, _ = sampled_pairs(gen, judge, [_sample(["star"])], OnlineDpoConfig(), seed=0)
    assert pairs[0].chosen == "A star." and pairs[0].rejected == "One star."


def _offline(i: int) -> PreferencePair:
    return PreferencePair(id=f"o{i}", prompt=(Message.user("Describe."),), chosen="A star.", rejected="A moon.")


def test_mixing_and_gamma_weights() -> None:
    gen = FixedGenerator([("A star.", True), ("A moon.", True)])
    prompts = [_sample(["star"]) for _ in range(8)]
    offline = [_offline(i) for i in range(3)]
    cfg = OnlineDpoConfig(mix_p=1.0, offline_data="x")
    pairs, weights, stats = step_pairs(gen, None, prompts, offline, cfg, m=0)
    assert stats["mix/offline_fraction"] == 1.0 and all(p.id.startswith("o") for p in pairs)
    assert weights.sum().item() == pytest.approx(1.0)

    class Judge:
        def score(self, prompts, replies):
            return [-len(r) for r in replies]

    cfg = OnlineDpoConfig(mix_p=0.5, offline_data="x")
    pairs, _, stats = step_pairs(gen, Judge(), prompts * 8, offline, cfg, m=3)
    assert 0.2 < stats["mix/offline_fraction"] < 0.8
    assert {p.id[0] for p in pairs} == {"o", "s"}


def test_online_dpo_recipe_runs_and_logs_trl_names(llava_dir: Path, world_dir: Path, tmp_path: Path) -> None:
    cfg = load_config(
        OnlineDpoConfig,
        flags={"model": str(llava_dir), "data": str(world_dir / "captions.jsonl"), "out": str(tmp_path / "on")},
        overrides=["steps=2", "batch_size=2", "max_new_tokens=6", "progress=false", "log_every=1", "lr=1e-3"],
    )
    online_dpo.train(cfg)
    rows = [json.loads(x) for x in (tmp_path / "on" / "metrics.jsonl").read_text().splitlines()]
    first = rows[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)
    for key in (
        "objective/kl",
        "objective/scores",
        "objective/scores_margin",
        "objective/rlhf_reward",
        "objective/non_score_reward",
        "val/contain_eos_token",
        "rewards/margins",
        "logps/chosen",
    ):
        assert key in first, key
    assert first["objective/scores_margin"] >= 0
    assert (tmp_path / "on" / "model" / "model.safetensors").exists()


def test_online_bdhs_and_gamma_recipe_run(llava_dir: Path, world_dir: Path, tmp_path: Path) -> None:
    pairs = world_dir / "pairs_online.jsonl"
    if not pairs.exists():
        write_world_pairs(world_dir, pairs, seed=0)
    base = ["steps=1", "batch_size=2", "max_new_tokens=4", "progress=false", "log_every=1"]
    flags = {"model": str(llava_dir), "data": str(world_dir / "captions.jsonl")}
    for name, extra in (("bdhs", ["rejected=bdhs"]), ("gamma", [f"offline_data={pairs}", "gamma=0.5"])):
        cfg = load_config(OnlineDpoConfig, flags={**flags, "out": str(tmp_path / name)}, overrides=base + extra)
        online_dpo.train(cfg)
        row = json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[0])
        assert row["loss"] == pytest.approx(math.log(2), abs=1e-4)
    with pytest.raises(ConfigError, match="offline_data"):
        online_dpo.train(
            load_config(OnlineDpoConfig, flags={**flags, "out": str(tmp_path / "x")}, overrides=["gamma=0.5"])
        )


def test_online_dpo_resume_matches_uninterrupted(llava_dir: Path, world_dir: Path, tmp_path: Path) -> None:
    import shutil

    import torch
    from safetensors.torch import load_file

    def run(out: Path, *extra: str) -> None:
        cfg = load_config(
            OnlineDpoConfig,
            flags={"model": str(llava_dir), "data": str(world_dir / "captions.jsonl"), "out": str(out)},
            overrides=[
                "steps=4",
                "batch_size=2",
                "max_new_tokens=5",
                "progress=false",
                "lr=1e-3",
                "save_every=2",
                *extra,
            ],
        )
        online_dpo.train(cfg)

    run(tmp_path / "full")
    run(tmp_path / "part")
    shutil.rmtree(tmp_path / "part" / "model")
    shutil.rmtree(tmp_path / "part" / "checkpoints" / "step-00000004")
    (tmp_path / "part" / "checkpoints" / "latest.json").write_text(json.dumps({"step": 2, "dir": "step-00000002"}))
    run(tmp_path / "part", "resume=true")
    a = load_file(str(tmp_path / "full" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "part" / "model" / "model.safetensors"))
    moved = load_file(str(llava_dir / "model.safetensors"))
    assert max((a[k] - moved[k]).abs().max().item() for k in a) > 1e-4
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)


def test_vllm_engine_is_refused_for_bdhs_pairs_and_asks_for_vllm(tmp_path: Path) -> None:
    """BDHS pairs mask image tokens, which vLLM cannot: refused when the config loads. vLLM missing is refused when
    the run starts, before any model or data is read."""
    from mmalign.generation.vllm import vllm_available

    for extra in (["rejected=bdhs"], ["gamma=0.5", "offline_data=x"]):
        with pytest.raises(ConfigError, match=r"^online-dpo: engine=vllm cannot hide image tokens") as err:
            load_config(OnlineDpoConfig, overrides=["engine=vllm", *extra])
        assert "\n" not in str(err.value) and "rejected=sampled" in str(err.value)
    load_config(OnlineDpoConfig, overrides=["engine=vllm", "rejected=bdhs", "bdhs_rho=0"])  # nothing hidden
    cfg = load_config(
        OnlineDpoConfig,
        flags={"model": str(tmp_path / "none"), "data": str(tmp_path / "none.jsonl"), "out": str(tmp_path / "o")},
        overrides=["engine=vllm"],
    )
    if vllm_available():
        pytest.skip("vLLM is installed here")
    with pytest.raises(ConfigError, match=r"^online-dpo: engine=vllm needs vLLM.*pip install 'mmalign\[vllm\]'"):
        online_dpo.train(cfg)
    assert not (tmp_path / "o").exists()


def test_sharded_engines_are_refused_because_the_policy_samples() -> None:
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    def accelerator(kind: DistributedType, stage: int = 0) -> SimpleNamespace:
        return SimpleNamespace(
            distributed_type=kind, state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=stage))
        )

    for kind, stage in ((DistributedType.NO, 0), (DistributedType.MULTI_GPU, 0), (DistributedType.DEEPSPEED, 2)):
        online_dpo._check_whole_weights(accelerator(kind, stage))
    for kind, stage, name in ((DistributedType.FSDP, 0, "FSDP"), (DistributedType.DEEPSPEED, 3, "ZeRO-3")):
        with pytest.raises(ConfigError, match=rf"{name} shards them: launch with configs/accelerate/ddp.yaml"):
            online_dpo._check_whole_weights(accelerator(kind, stage))


def test_policy_weights_for_vllm_carry_hugging_face_names_with_lora_merged(llava_dir: Path) -> None:
    """What ``engine=vllm`` pushes each step: the plain model's state dict; for LoRA, the merged weights under the
    base model's names (what ``merge_and_unload`` would save), the adapters left unmerged for training."""
    import copy

    import torch

    from mmalign.models.load import apply_lora, load_model

    loaded = load_model(llava_dir)
    plain = online_dpo.policy_weights(loaded.model)
    assert plain.keys() == loaded.model.state_dict().keys()
    peft = apply_lora(copy.deepcopy(loaded.model), loaded.family, r=4, alpha=8, dropout=0.0, targets=None)
    with torch.no_grad():  # adapters that change the weights (peft starts B at zero)
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    before = {k: v.clone() for k, v in peft.state_dict().items()}
    pushed = online_dpo.policy_weights(peft)
    merged = copy.deepcopy(peft).merge_and_unload().state_dict()
    assert pushed.keys() == merged.keys() == plain.keys()
    for key in merged:
        torch.testing.assert_close(pushed[key], merged[key], msg=key)
    assert any(not torch.equal(pushed[k], plain[k]) for k in plain)
    for key, value in peft.state_dict().items():
        torch.testing.assert_close(value, before[key], msg=key)  # unmerged again (to rounding)


def test_online_dpo_pushes_the_policy_into_vllm_every_step(
    llava_dir: Path, world_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wiring of ``engine=vllm``, on a CPU with a stand-in ``vllm`` (``test_generation.fake_vllm``): one engine,
    built in this process from the starting checkpoint with the configured memory share; before each step's sampling
    it receives the policy's weights under their Hugging Face names (the second push holds the first step's update);
    the samples it returns are judged and trained on."""
    import os

    from test_generation import fake_vllm

    fake = fake_vllm(monkeypatch)
    cfg = load_config(
        OnlineDpoConfig,
        flags={"model": str(llava_dir), "data": str(world_dir / "captions.jsonl"), "out": str(tmp_path / "on")},
        overrides=["engine=vllm", "vllm_gpu_memory=0.25", "steps=2", "batch_size=2", "progress=false", "lr=1e-3",
                   "log_every=1", "samples_per_prompt=3"],
    )  # fmt: skip
    online_dpo.train(cfg)
    [llm] = fake.built
    assert llm.model == str(llava_dir) and llm.kwargs == {"gpu_memory_utilization": 0.25}
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert len(llm.pushed) == 2 and len(llm.requests) == 4  # two prompts per step
    from mmalign.models.load import load_model

    start = load_model(llava_dir).model.state_dict()
    first, second = llm.pushed
    assert first.keys() == start.keys()
    assert all(torch.equal(first[k], start[k]) for k in start)
    assert any(not torch.equal(second[k], first[k]) for k in first)
    rows = [json.loads(x) for x in (tmp_path / "on" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["val/contain_eos_token"] == 1.0


def online_dpo_on_vllm(model: str, data: str, out: str) -> None:
    """Run in its own process (``test_generation.run_isolated``): two steps of online DPO with ``engine=vllm``."""
    from test_generation import small_vllm

    online_dpo.make_generator = small_vllm(online_dpo.make_generator)
    cfg = load_config(
        OnlineDpoConfig,
        flags={"model": model, "data": data, "out": out},
        overrides=["engine=vllm", "steps=2", "batch_size=2", "max_new_tokens=6", "progress=false", "log_every=1"],
    )
    online_dpo.train(cfg)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_online_dpo_samples_with_vllm(world_dir: Path, tmp_path: Path) -> None:
    """Two steps of online DPO whose samples come from vLLM: the engine gets the policy's weights each step, the
    judge ranks its samples, the model saves."""
    from mmalign.generation.vllm import vllm_available

    if not vllm_available():
        pytest.skip("needs vLLM: pip install 'mmalign[vllm]'")
    from test_generation import run_isolated, vllm_sized_model

    model = vllm_sized_model(world_dir, tmp_path / "model")
    out = tmp_path / "run"
    run_isolated("test_online_dpo", "online_dpo_on_vllm", str(model), str(world_dir / "captions.jsonl"), str(out))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)
    assert rows[0]["objective/scores_margin"] >= 0 and 0 <= rows[0]["val/contain_eos_token"] <= 1
    assert (out / "model" / "model.safetensors").exists()
