"""Preference losses on hand-worked 2–3 element batches; the arithmetic is in each docstring.

Notation: sp(z) = log(1 + e^z), so −log σ(z) = sp(−z) and sp(z) − sp(−z) = z.
"""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from mmalign.losses import (
    LOSSES,
    LossConfig,
    LossOutput,
    PairLogps,
    compute_loss,
    dpo_metrics,
    dpo_sigmoid,
    mdpo,
    mm_dpo,
)


def sp(z: float) -> float:
    """Softplus log(1 + e^z); −log σ(z) = sp(−z)."""
    return math.log1p(math.exp(z))


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def close(got: torch.Tensor, expected: list[float]) -> None:
    torch.testing.assert_close(got, torch.tensor(expected, dtype=got.dtype), rtol=1e-9, atol=1e-12)


def example() -> PairLogps:
    """Three pairs. Δ(y_w) = pc − rc = [2, 0, −1]; Δ(y_l) = pr − rr = [−2, −1, 2]; h = [4, 1, −3]."""
    return PairLogps(
        policy_chosen=t(-10, -8, -12),
        policy_rejected=t(-14, -9, -11),
        ref_chosen=t(-12, -8, -11),
        ref_rejected=t(-12, -8, -13),
    )


def full_example(requires_grad: bool = False) -> PairLogps:
    """``example()`` plus every optional field, so each loss can run on it."""
    base = example()
    logps = dataclasses.replace(
        base,
        chosen_tokens=t(2, 4, 5),
        rejected_tokens=t(4, 3, 5),
        policy_chosen_corrupt=t(-13, -9, -12),
        ref_chosen_corrupt=t(-12, -10, -12),
        margin=t(0.0, 1.0, 3.0),
        policy_chosen_nll=t(1.5, 2.0, 2.5),
    )
    if requires_grad:
        for name in ("policy_chosen", "policy_rejected", "policy_chosen_corrupt"):
            getattr(logps, name).requires_grad_(True)
    return logps


def test_dpo_by_hand() -> None:
    """β = 0.1, h = [4, 1, −3] → βh = [0.4, 0.1, −0.3]; loss = sp(−βh) = [sp(−0.4), sp(−0.1), sp(0.3)]
    = [0.51302, 0.64440, 0.85436]. Rewards β·Δ(y_w) = [0.2, 0, −0.1], β·Δ(y_l) = [−0.2, −0.1, 0.2]."""
    out = compute_loss("dpo", example(), LossConfig(beta=0.1))
    close(out.loss, [sp(-0.4), sp(-0.1), sp(0.3)])
    assert out.loss[0].item() == pytest.approx(0.5130152524, abs=1e-9)
    close(out.chosen_rewards, [0.2, 0.0, -0.1])
    close(out.rejected_rewards, [-0.2, -0.1, 0.2])
    assert out.extra == {}


def test_dpo_equals_trl_sigmoid_formula() -> None:
    """TRL's sigmoid DPO, −log σ(β·((π_c − r_c) − (π_r − r_r))), written out here, on random log-probs."""
    gen = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (-20 * torch.rand(8, generator=gen, dtype=torch.float64) for _ in range(4))
    beta = 0.3
    trl = -F.logsigmoid(beta * ((pc - rc) - (pr - rr)))
    out = compute_loss("dpo", PairLogps(pc, pr, rc, rr), LossConfig(beta=beta))
    torch.testing.assert_close(out.loss, trl, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.chosen_rewards, beta * (pc - rc))
    torch.testing.assert_close(out.rejected_rewards, beta * (pr - rr))


def test_cdpo_by_hand_and_zero_eps_is_dpo() -> None:
    """ε = 0.1, z = βh = [0.4, 0.1, −0.3]: L = 0.9·sp(−z) + 0.1·sp(z) = sp(−z) + 0.1·z
    = [0.51302 + 0.04, 0.64440 + 0.01, 0.85436 − 0.03] = [0.55302, 0.65440, 0.82436]."""
    out = compute_loss("cdpo", example(), LossConfig(label_smoothing=0.1))
    close(out.loss, [sp(-0.4) + 0.04, sp(-0.1) + 0.01, sp(0.3) - 0.03])
    assert out.loss[0].item() == pytest.approx(0.5530152524, abs=1e-9)
    dpo = compute_loss("dpo", example(), LossConfig())
    for name in ("dpo", "cdpo"):
        torch.testing.assert_close(compute_loss(name, example(), LossConfig(label_smoothing=0.0)).loss, dpo.loss)


def test_robust_by_hand_and_zero_eps_is_dpo() -> None:
    """ε = 0.1, z = [0.4, 0.1, −0.3]: L = (0.9·sp(−z) − 0.1·sp(z)) / 0.8 = (0.8·sp(−z) − 0.1·z) / 0.8 = sp(−z) − z/8
    = [0.51302 − 0.05, 0.64440 − 0.0125, 0.85436 + 0.0375]. ε = 0.5 divides by zero: rejected by LossConfig."""
    out = compute_loss("robust", example(), LossConfig(label_smoothing=0.1))
    close(out.loss, [sp(-0.4) - 0.05, sp(-0.1) - 0.0125, sp(0.3) + 0.0375])
    zero = compute_loss("robust", example(), LossConfig(label_smoothing=0.0))
    torch.testing.assert_close(zero.loss, compute_loss("dpo", example(), LossConfig()).loss)
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 0.5\)"):
        LossConfig(label_smoothing=0.5)


def ipo_pairs(scale: float = 1.0) -> PairLogps:
    """Δ(y_w) = [4, 3]·s, |y_w| = [2, 3]·s; Δ(y_l) = [−2, 0]·s, |y_l| = [4, 5]·s (reference all zero)."""
    return PairLogps(
        policy_chosen=t(4, 3) * scale,
        policy_rejected=t(-2, 0) * scale,
        ref_chosen=t(0, 0),
        ref_rejected=t(0, 0),
        chosen_tokens=t(2, 3) * scale,
        rejected_tokens=t(4, 5) * scale,
    )


def test_ipo_by_hand_and_length_averaged() -> None:
    """τ = 0.5 → 1/(2τ) = 1. h̄ = [4/2 − (−2/4), 3/3 − 0/5] = [2.5, 1.0]; L = [(2.5 − 1)², (1 − 1)²] = [2.25, 0].
    Doubling every log-ratio and every length leaves h̄, hence L, unchanged. τ = None uses β: β = 0.25 → 1/(2τ) = 2,
    L = [0.25, 1]. Rewards stay β·Δ summed: [0.1·4, 0.1·3]."""
    cfg = LossConfig(beta=0.1, ipo_tau=0.5)
    out = compute_loss("ipo", ipo_pairs(), cfg)
    close(out.loss, [2.25, 0.0])
    close(out.chosen_rewards, [0.4, 0.3])
    torch.testing.assert_close(compute_loss("ipo", ipo_pairs(scale=2.0), cfg).loss, out.loss)
    close(compute_loss("ipo", ipo_pairs(), LossConfig(beta=0.25)).loss, [0.25, 1.0])


def test_hinge_by_hand() -> None:
    """β = 0.5, h = [4, 1, −3] → βh = [2, 0.5, −1.5]; L = relu(1 − βh) = [0, 0.5, 2.5]."""
    close(compute_loss("hinge", example(), LossConfig(beta=0.5)).loss, [0.0, 0.5, 2.5])


def test_dpo_norm_by_hand() -> None:
    """β = 1 on ``ipo_pairs``: per-token Δ(y_w)/|y_w| = [2, 1], Δ(y_l)/|y_l| = [−0.5, 0]; z = [2.5, 1];
    L = [sp(−2.5), sp(−1)] = [0.07889, 0.31326]; rewards are the per-token terms."""
    out = compute_loss("dpo_norm", ipo_pairs(), LossConfig(beta=1.0))
    close(out.loss, [sp(-2.5), sp(-1.0)])
    close(out.chosen_rewards, [2.0, 1.0])
    close(out.rejected_rewards, [-0.5, 0.0])


def test_simpo_by_hand_ignores_reference() -> None:
    """β = 2, γ = 0.5. log π(y_w)/|y_w| = [−4/2, −9/3] = [−2, −3]; log π(y_l)/|y_l| = [−12/4, −10/5] = [−3, −2].
    z = [2·(−2) − 2·(−3) − 0.5, 2·(−3) − 2·(−2) − 0.5] = [1.5, −2.5]; L = [sp(−1.5), sp(2.5)] = [0.20141, 2.57889].
    Rewards β·log π/|y|: chosen [−4, −6], rejected [−6, −4]. Any reference gives the same loss."""
    logps = PairLogps(
        policy_chosen=t(-4, -9),
        policy_rejected=t(-12, -10),
        ref_chosen=t(-1, -2),
        ref_rejected=t(-30, 7),
        chosen_tokens=t(2, 3),
        rejected_tokens=t(4, 5),
    )
    out = compute_loss("simpo", logps, LossConfig(beta=2.0, simpo_gamma=0.5))
    close(out.loss, [sp(-1.5), sp(2.5)])
    close(out.chosen_rewards, [-4.0, -6.0])
    close(out.rejected_rewards, [-6.0, -4.0])
    no_ref = dataclasses.replace(logps, ref_chosen=t(0, 0), ref_rejected=t(0, 0))
    torch.testing.assert_close(compute_loss("simpo", no_ref, LossConfig(beta=2.0)).loss, out.loss)


def mdpo_pairs() -> PairLogps:
    """Δ(y_w|m_w) = [−10 + 12, −8 + 7] = [2, −1]; Δ(y_l|m_w) = [−14 + 12, −6 + 8] = [−2, 2];
    Δ(y_w|m_l) = [−15 + 12, −9 + 10] = [−3, 1]."""
    return PairLogps(
        policy_chosen=t(-10, -8),
        policy_rejected=t(-14, -6),
        ref_chosen=t(-12, -7),
        ref_rejected=t(-12, -8),
        policy_chosen_corrupt=t(-15, -9),
        ref_chosen_corrupt=t(-12, -10),
    )


def test_mdpo_by_hand_terms_sum_and_anchor_uses_delta() -> None:
    """β = 0.1, δ = 0.05.
    dpo = sp(−β[Δ_w − Δ_l]) = [sp(−0.4), sp(0.3)]; conditional = sp(−β[Δ_w − Δ_w|m_l]) = [sp(−0.5), sp(0.2)];
    anchor = sp(−(βΔ_w − δ)) = [sp(−(0.2 − 0.05)), sp(−(−0.1 − 0.05))] = [sp(−0.15), sp(0.15)]; L = sum of the three.
    Rewards β·Δ_w = [0.2, −0.1], β·Δ_l = [−0.2, 0.2]; corrupt_rewards β·Δ(y_w|m_l) = [−0.3, 0.1]."""
    out = mdpo(mdpo_pairs(), LossConfig(beta=0.1, mdpo_anchor=0.05))
    close(out.extra["dpo"], [sp(-0.4), sp(0.3)])
    close(out.extra["conditional"], [sp(-0.5), sp(0.2)])
    close(out.extra["anchor"], [sp(-0.15), sp(0.15)])
    close(out.loss, [sp(-0.4) + sp(-0.5) + sp(-0.15), sp(0.3) + sp(0.2) + sp(0.15)])
    torch.testing.assert_close(out.loss, out.extra["dpo"] + out.extra["conditional"] + out.extra["anchor"])
    close(out.chosen_rewards, [0.2, -0.1])
    close(out.rejected_rewards, [-0.2, 0.2])
    close(out.extra["corrupt_rewards"], [-0.3, 0.1])
    # Only the anchor depends on δ: with δ = 0 it is sp(−βΔ_w) = [sp(−0.2), sp(0.1)].
    zero = compute_loss("mdpo", mdpo_pairs(), LossConfig(beta=0.1))
    close(zero.extra["anchor"], [sp(-0.2), sp(0.1)])
    torch.testing.assert_close(zero.extra["dpo"], out.extra["dpo"])
    torch.testing.assert_close(zero.extra["conditional"], out.extra["conditional"])


def test_mdpo_reference_free_keeps_the_anchor_reference() -> None:
    """β = 0.1, reference_free: dpo = sp(−β[π_w − π_l]) = [sp(−0.4), sp(0.2)] (π_w − π_l = [4, −2]);
    conditional = sp(−β[π_w − π_w|m_l]) = [sp(−0.5), sp(−0.1)] (π_w − π_w|m_l = [5, 1]);
    anchor keeps the reference: sp(−βΔ_w) = [sp(−0.2), sp(0.1)]."""
    out = mdpo(mdpo_pairs(), LossConfig(beta=0.1, reference_free=True))
    close(out.extra["dpo"], [sp(-0.4), sp(0.2)])
    close(out.extra["conditional"], [sp(-0.5), sp(-0.1)])
    close(out.extra["anchor"], [sp(-0.2), sp(0.1)])


def test_mm_dpo_by_hand_and_zero_margin_is_dpo() -> None:
    """β = 0.1, w = 1, k = 1, δ = [0, ln 2]: β_i = 0.1·(1 + (1 − e^{−δ})) = [0.1, 0.1·(1 + 1/2)] = [0.1, 0.15].
    On the first two pairs of ``example()`` (h = [4, 1]): L = [sp(−0.4), sp(−0.15)]. Rewards use the base β."""
    logps = PairLogps(t(-10, -8), t(-14, -9), t(-12, -8), t(-12, -8), margin=t(0.0, math.log(2)))
    out = mm_dpo(logps, LossConfig(beta=0.1, mm_w=1.0, mm_k=1.0))
    close(out.extra["beta"], [0.1, 0.15])
    close(out.loss, [sp(-0.4), sp(-0.15)])
    close(out.chosen_rewards, [0.2, 0.0])
    zero = dataclasses.replace(example(), margin=t(0, 0, 0))
    torch.testing.assert_close(
        compute_loss("mm_dpo", zero, LossConfig()).loss, compute_loss("dpo", example(), LossConfig()).loss
    )


def test_mm_dpo_beta_monotone_and_bounded() -> None:
    """β_i rises with δ from β at δ = 0 towards (1 + w)·β and never exceeds it; δ < 0 is clamped to 0 (β_i = β)."""
    margins = t(-5.0, 0.0, 0.1, 0.5, 1.0, 2.0, 5.0, 50.0)
    n = len(margins)
    logps = PairLogps(torch.zeros(n), torch.zeros(n), torch.zeros(n), torch.zeros(n), margin=margins)
    cfg = LossConfig(beta=0.1, mm_w=0.5, mm_k=2.0)
    beta = mm_dpo(logps, cfg).extra["beta"]
    assert beta[0].item() == pytest.approx(0.1) and beta[1].item() == pytest.approx(0.1)
    assert torch.all(beta[2:] > beta[1:-1])
    assert torch.all(beta <= (1 + cfg.mm_w) * cfg.beta)
    assert beta[-1].item() == pytest.approx(0.15)


def test_reference_free_ignores_reference() -> None:
    """β = 0.1: π_w − π_l = [−10 + 14, −8 + 9, −12 + 11] = [4, 1, −1]; L = [sp(−0.4), sp(−0.1), sp(0.1)];
    rewards β·π = [−1.0, −0.8, −1.2] and [−1.4, −0.9, −1.1]. Other references, or ``reference_free`` on "dpo",
    give the same."""
    out = compute_loss("reference_free", example(), LossConfig(beta=0.1))
    close(out.loss, [sp(-0.4), sp(-0.1), sp(0.1)])
    close(out.chosen_rewards, [-1.0, -0.8, -1.2])
    close(out.rejected_rewards, [-1.4, -0.9, -1.1])
    other = dataclasses.replace(example(), ref_chosen=t(3, -50, 7), ref_rejected=t(-1, 2, 0))
    torch.testing.assert_close(compute_loss("reference_free", other, LossConfig()).loss, out.loss)
    torch.testing.assert_close(compute_loss("dpo", other, LossConfig(reference_free=True)).loss, out.loss)


@pytest.mark.parametrize("name", list(LOSSES))
def test_rpo_adds_alpha_times_nll(name: str) -> None:
    """α = 0.5, NLL = [1.5, 2.0, 2.5]: loss grows by [0.75, 1.0, 1.25] for every loss; the NLL goes to extra."""
    logps = full_example()
    base = compute_loss(name, logps, LossConfig())
    with_rpo = compute_loss(name, logps, LossConfig(rpo_alpha=0.5))
    close(with_rpo.loss - base.loss, [0.75, 1.0, 1.25])
    close(with_rpo.extra["nll"], [1.5, 2.0, 2.5])
    missing = dataclasses.replace(logps, policy_chosen_nll=None)
    with pytest.raises(ValueError, match=r"PairLogps\.policy_chosen_nll"):
        compute_loss(name, missing, LossConfig(rpo_alpha=0.5))


@pytest.mark.parametrize("name", list(LOSSES))
def test_gradients_reach_policy_and_rewards_are_detached(name: str) -> None:
    logps = full_example(requires_grad=True)
    out = compute_loss(name, logps, LossConfig(label_smoothing=0.1, rpo_alpha=0.0))
    out.loss.sum().backward()
    for field in ("policy_chosen", "policy_rejected"):
        grad = getattr(logps, field).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, field
    if name == "mdpo":
        assert logps.policy_chosen_corrupt.grad is not None and logps.policy_chosen_corrupt.grad.abs().sum() > 0
    assert out.loss.requires_grad
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad
    assert not any(v.requires_grad for v in out.extra.values())


@pytest.mark.parametrize("name", list(LOSSES))
def test_per_example_losses_do_not_depend_on_batch(name: str) -> None:
    """Splitting the batch gives the same per-example losses (no batch-level statistics)."""
    logps = full_example()
    whole = compute_loss(name, logps, LossConfig()).loss
    parts = []
    for idx in (slice(0, 1), slice(1, 3)):
        fields = {f.name: getattr(logps, f.name) for f in dataclasses.fields(logps)}
        parts.append(compute_loss(name, PairLogps(**{k: v[idx] for k, v in fields.items()}), LossConfig()).loss)
    torch.testing.assert_close(torch.cat(parts), whole)


def test_metrics_by_hand() -> None:
    """DPO on ``example()`` with β = 0.1: rewards chosen [0.2, 0, −0.1] → mean 1/30; rejected [−0.2, −0.1, 0.2] →
    mean −1/30; margins [0.4, 0.1, −0.3] → 1/15; accuracies [1, 1, 0] → 2/3; logps/chosen mean(−10, −8, −12) = −10;
    logps/rejected mean(−14, −9, −11) = −34/3; loss mean (sp(−0.4) + sp(−0.1) + sp(0.3))/3."""
    logps = example()
    metrics = dpo_metrics(dpo_sigmoid(logps, LossConfig(beta=0.1)), logps)
    expected = {
        "rewards/chosen": 1 / 30,
        "rewards/rejected": -1 / 30,
        "rewards/margins": 1 / 15,
        "rewards/accuracies": 2 / 3,
        "logps/chosen": -10.0,
        "logps/rejected": -34 / 3,
        "loss": (sp(-0.4) + sp(-0.1) + sp(0.3)) / 3,
    }
    assert set(metrics) == set(expected)
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, abs=1e-12), key
    assert all(isinstance(v, float) for v in metrics.values())


def test_metrics_include_extra_terms() -> None:
    out = LossOutput(t(1.0, 3.0), t(0.0, 0.0), t(0.0, 0.0), {"anchor": t(0.5, 1.5)})
    metrics = dpo_metrics(out, PairLogps(t(0, 0), t(0, 0), t(0, 0), t(0, 0)))
    assert metrics["extra/anchor"] == pytest.approx(1.0)
    assert metrics["rewards/accuracies"] == 0.0


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="unknown loss 'dpoo'; valid names: dpo, cdpo, robust") as err:
        compute_loss("dpoo", example(), LossConfig())
    for name in LOSSES:
        assert name in str(err.value)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("ipo", r"loss 'ipo' needs PairLogps\.chosen_tokens, PairLogps\.rejected_tokens \(token counts"),
        ("dpo_norm", r"loss 'dpo_norm' needs PairLogps\.chosen_tokens, PairLogps\.rejected_tokens"),
        ("simpo", r"loss 'simpo' needs PairLogps\.chosen_tokens, PairLogps\.rejected_tokens"),
        ("mdpo", r"loss 'mdpo' needs PairLogps\.policy_chosen_corrupt, PairLogps\.ref_chosen_corrupt \(log-probs"),
        ("mm_dpo", r"loss 'mm_dpo' needs PairLogps\.margin \(reward margin"),
    ],
)
def test_missing_fields_raise(name: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        compute_loss(name, example(), LossConfig())


def test_only_the_missing_field_is_named() -> None:
    logps = dataclasses.replace(example(), chosen_tokens=t(1, 1, 1))
    with pytest.raises(ValueError, match=r"needs PairLogps\.rejected_tokens \("):
        compute_loss("ipo", logps, LossConfig())


def test_records_and_config_are_validated() -> None:
    with pytest.raises(ValueError, match=r"PairLogps\.ref_rejected has shape \(2,\), expected \(3,\)"):
        PairLogps(t(0, 0, 0), t(0, 0, 0), t(0, 0, 0), t(0, 0))
    with pytest.raises(ValueError, match=r"must have shape \[B\]"):
        PairLogps(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"beta must be > 0.*mm_k must be > 0"):
        LossConfig(beta=0.0, mm_k=0.0)
    with pytest.raises(ValueError, match="beta must be > 0"):
        LossConfig(beta=float("nan"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        LossConfig().beta = 1.0  # type: ignore[misc]


def test_import_does_not_pull_transformers() -> None:
    code = "import sys, mmalign.losses; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
