"""Preference-optimisation losses: the DPO family, mDPO and MM-DPO dynamic β.

Every loss is a pure function ``(PairLogps, LossConfig) -> LossOutput`` on per-example *sequence* log-probs, so
the same code serves offline DPO, online DPO and any model family. Losses come back unreduced ([B]); the recipe
reduces them, which keeps gradient accumulation and per-example weighting its decision.

Notation (shared/specs/algorithms.md): ``log π(y|x)`` is the summed log-prob of the response tokens,
``Δ(y) = log π_θ(y|x) − log π_ref(y|x)``, the DPO margin is ``h = Δ(y_w) − Δ(y_l)``, σ is the logistic function
and ``−log σ(z)`` is computed with ``logsigmoid`` for stability. Implicit rewards ``β·Δ(y)`` are returned detached
for logging.

Pick a loss by name from ``LOSSES`` or with ``compute_loss(name, logps, cfg)``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class PairLogps:
    """Per-example log-probs of a batch of preference pairs; every tensor has shape [B].

    Attributes:
        policy_chosen: log π_θ(y_w|x), summed over response tokens.
        policy_rejected: log π_θ(y_l|x).
        ref_chosen: log π_ref(y_w|x) (no gradient expected; pass zeros when there is no reference).
        ref_rejected: log π_ref(y_l|x).
        chosen_tokens: |y_w|, response token counts as floats (IPO, length-normalised DPO, SimPO).
        rejected_tokens: |y_l|.
        policy_chosen_corrupt: log π_θ(y_w | m_l, q), the chosen response under the corrupted image (mDPO).
        ref_chosen_corrupt: log π_ref(y_w | m_l, q) under the *same* corrupted image (mDPO).
        margin: reward margin δ = r(y_w) − r(y_l) from a reward model (MM-DPO).
        policy_chosen_nll: mean per-token NLL of y_w under the policy (RPO / SFT term, ``rpo_alpha``).
    """

    policy_chosen: torch.Tensor
    policy_rejected: torch.Tensor
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor
    chosen_tokens: torch.Tensor | None = None
    rejected_tokens: torch.Tensor | None = None
    policy_chosen_corrupt: torch.Tensor | None = None
    ref_chosen_corrupt: torch.Tensor | None = None
    margin: torch.Tensor | None = None
    policy_chosen_nll: torch.Tensor | None = None

    def __post_init__(self) -> None:
        shape = self.policy_chosen.shape
        if len(shape) != 1:
            raise ValueError(f"PairLogps.policy_chosen must have shape [B], got {tuple(shape)}")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None and value.shape != shape:
                raise ValueError(f"PairLogps.{f.name} has shape {tuple(value.shape)}, expected {tuple(shape)}")


@dataclass(frozen=True)
class LossOutput:
    """What every loss returns.

    Attributes:
        loss: [B] unreduced per-example loss (carries the graph).
        chosen_rewards: [B] detached implicit reward of y_w, β·Δ(y_w) unless the loss documents otherwise.
        rejected_rewards: [B] detached implicit reward of y_l.
        extra: detached [B] per-example terms worth logging (mDPO's three terms, MM-DPO's per-pair β, the NLL).
    """

    loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class LossConfig:
    """Hyper-parameters shared by the losses; each loss reads only the fields it needs.

    Attributes:
        beta: β, the KL/temperature coefficient (TRL and the mDPO paper use 0.1; SimPO wants ~2.0–2.5).
        label_smoothing: ε, the assumed label-flip rate, 0 ≤ ε < 0.5. It is the cDPO ε for every loss built on
            one −log σ(z) (dpo, cdpo, reference_free, dpo_norm, simpo, mm_dpo), the rDPO ε for ``robust``, and
            ignored by ipo, hinge and mdpo.
        ipo_tau: τ for IPO; None uses ``beta`` (as TRL does). The Apple study searched τ ∈ {0.8, 0.9, 1.0}.
        simpo_gamma: γ, SimPO's target margin (SimPO/TRL default 0.5).
        rpo_alpha: weight of the chosen-response NLL added to every loss (RPO; MM-RLHF's script uses 0.25).
        mdpo_anchor: δ of mDPO's anchor term −log σ(β·Δ(y_w) − δ); the paper's default is 0.
        mm_w: w in MM-DPO's β(δ) = β·(1 + w·(1 − e^{−kδ})). The paper's value is unverified; 1.0 keeps the
            per-pair β within [β, 2β], so the most confident pairs get at most twice the base sharpness.
        mm_k: k in the same formula, unverified too; 1.0 makes the scaling reach 63% of its range at a margin
            of one reward unit and 95% at three, i.e. it saturates at margins of a few reward units. Retune it
            to the spread of your reward model's margins.
        reference_free: drop the reference (uniform reference) in every reference-based loss; see ``mdpo``.
    """

    beta: float = 0.1
    label_smoothing: float = 0.0
    ipo_tau: float | None = None
    simpo_gamma: float = 0.5
    rpo_alpha: float = 0.0
    mdpo_anchor: float = 0.0
    mm_w: float = 1.0
    mm_k: float = 1.0
    reference_free: bool = False

    def __post_init__(self) -> None:
        # Written as `not (ok)` so that NaN fails every check.
        checks = {
            "beta must be > 0": self.beta > 0,
            "label_smoothing must be in [0, 0.5) (cDPO/robust ε)": 0 <= self.label_smoothing < 0.5,
            "ipo_tau must be > 0 or None": self.ipo_tau is None or self.ipo_tau > 0,
            "simpo_gamma must be finite": math.isfinite(self.simpo_gamma),
            "rpo_alpha must be >= 0": self.rpo_alpha >= 0,
            "mdpo_anchor must be finite": math.isfinite(self.mdpo_anchor),
            "mm_w must be >= 0": self.mm_w >= 0,
            "mm_k must be > 0": self.mm_k > 0,
        }
        failed = [msg for msg, ok in checks.items() if not ok]
        if failed:
            raise ValueError(f"invalid LossConfig: {'; '.join(failed)}")


LossFn = Callable[[PairLogps, LossConfig], LossOutput]


def _require(logps: PairLogps, loss: str, *names: str, why: str) -> tuple[torch.Tensor, ...]:
    """Return the optional fields ``names`` of ``logps``, or raise a ValueError naming all missing ones."""
    missing = [n for n in names if getattr(logps, n) is None]
    if missing:
        fields = ", ".join(f"PairLogps.{n}" for n in missing)
        raise ValueError(f"loss {loss!r} needs {fields} ({why})")
    return tuple(getattr(logps, n) for n in names)


def _log_ratios(logps: PairLogps, cfg: LossConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Δ(y_w), Δ(y_l) [B]; with ``reference_free`` the reference log-probs count as zero."""
    if cfg.reference_free:
        return logps.policy_chosen, logps.policy_rejected
    return logps.policy_chosen - logps.ref_chosen, logps.policy_rejected - logps.ref_rejected


def _smoothed_nls(z: torch.Tensor, eps: float) -> torch.Tensor:
    """cDPO's −(1−ε)·log σ(z) − ε·log σ(−z); exactly −log σ(z) when ε = 0."""
    loss = -F.logsigmoid(z)
    if eps > 0:
        loss = (1 - eps) * loss - eps * F.logsigmoid(-z)
    return loss


def _output(
    loss: torch.Tensor,
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    logps: PairLogps,
    cfg: LossConfig,
    loss_name: str,
    **extra: torch.Tensor,
) -> LossOutput:
    """Add the RPO term α·NLL(y_w) when ``rpo_alpha > 0`` and detach everything but the loss."""
    if cfg.rpo_alpha > 0:
        (nll,) = _require(
            logps, loss_name, "policy_chosen_nll", why=f"rpo_alpha={cfg.rpo_alpha} adds the chosen response's NLL"
        )
        loss = loss + cfg.rpo_alpha * nll
        extra["nll"] = nll
    return LossOutput(
        loss=loss,
        chosen_rewards=chosen_rewards.detach(),
        rejected_rewards=rejected_rewards.detach(),
        extra={k: v.detach() for k, v in extra.items()},
    )


def dpo_sigmoid(logps: PairLogps, cfg: LossConfig) -> LossOutput:
    """Sigmoid DPO (Rafailov et al. 2023, arXiv 2305.18290, Eq. 7) with cDPO label smoothing (Mitchell's note).

    ``L = −(1−ε)·log σ(β·h) − ε·log σ(−β·h)``, ``h = Δ(y_w) − Δ(y_l)``; ε = ``label_smoothing`` (0 gives DPO).
    Unlike TRL ≥ 0.29, ε is honoured here (spec §1.2).

    Args:
        logps: [B] policy/reference log-probs of chosen and rejected.
        cfg: uses ``beta``, ``label_smoothing``, ``reference_free``, ``rpo_alpha``.

    Returns:
        loss [B]; rewards β·Δ(y_w), β·Δ(y_l) [B].
    """
    d_w, d_l = _log_ratios(logps, cfg)
    loss = _smoothed_nls(cfg.beta * (d_w - d_l), cfg.label_smoothing)
    return _output(loss, cfg.beta * d_w, cfg.beta * d_l, logps, cfg, "dpo")


def dpo_robust(logps: PairLogps, cfg: LossConfig) -> LossOutput:
    """Robust DPO (Chowdhury et al. 2024, arXiv 2403.00409, Eq. 8), unbiased under label-flip rate ε.

    ``L = [−(1−ε)·log σ(β·h) + ε·log σ(−β·h)] / (1 − 2ε)``; ε = ``label_smoothing`` must be in [0, 0.5), which
    ``LossConfig`` checks. ε = 0 gives DPO.

    Args:
        logps: [B] policy/reference log-probs of chosen and rejected.
        cfg: uses ``beta``, ``label_smoothing``, ``reference_free``, ``rpo_alpha``.

    Returns:
        loss [B]; rewards β·Δ(y_w), β·Δ(y_l) [B].
    """
    eps = cfg.label_smoothing
    d_w, d_l = _log_ratios(logps, cfg)
    z = cfg.beta * (d_w - d_l)
    loss = (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
    return _output(loss, cfg.beta * d_w, cfg.beta * d_l, logps, cfg, "robust")


def ipo(logps: PairLogps, cfg: LossConfig) -> LossOutput:
    """IPO (Azar et al. 2023, arXiv 2310.12036, Eq. 17), length-averaged as in TRL (spec §1.3).

    ``L = (h̄ − 1/(2τ))²`` with ``h̄ = Δ(y_w)/|y_w| − Δ(y_l)/|y_l|`` (per-token log-ratios, counts clamped ≥ 1).
    We always average (TRL's online trainer does not): h̄ then does not grow with response length.
    τ = ``ipo_tau`` or ``beta`` when None.

    Args:
        logps: [B] log-probs plus ``chosen_tokens`` and ``rejected_tokens`` [B] (required).
        cfg: uses ``ipo_tau``/``beta``, ``reference_free``, ``rpo_alpha``.

    Returns:
        loss [B]; rewards β·Δ(y_w), β·Δ(y_l) [B] (summed log-ratios, as for DPO).
    """
    n_w, n_l = _require(logps, "ipo", "chosen_tokens", "rejected_tokens", why="token counts for length averaging")
    tau = cfg.beta if cfg.ipo_tau is None else cfg.ipo_tau
    d_w, d_l = _log_ratios(logps, cfg)
    h_bar = d_w / n_w.clamp(min=1) - d_l / n_l.clamp(min=1)
    loss = (h_bar - 1 / (2 * tau)) ** 2
    return _output(loss, cfg.beta * d_w, cfg.beta * d_l, logps, cfg, "ipo")


def hinge(logps: PairLogps, cfg: LossConfig) -> LossOutput:
    """Hinge / SLiC-style loss (Zhao et al. 2023, arXiv 2305.10425, Eq. 3 with the reference; TRL "hinge").

    ``L = relu(1 − β·h)``, ``h = Δ(y_w) − Δ(y_l)``.

    Args:
        logps: [B] policy/reference log-probs of chosen and rejected.
        cfg: uses ``beta``, ``reference_free``, ``rpo_alpha``.

    Returns:
        loss [B]; rewards β·Δ(y_w), β·Δ(y_l) [B].
    """
    d_w, d_l = _log_ratios(logps, cfg)
    loss = torch.relu(1 - cfg.beta * (d_w - d_l))
    return _output(loss, cfg.beta * d_w, cfg.beta * d_l, logps, cfg, "hinge")


def dpo_length_normalized(logps: PairLogps, cfg: LossConfig) -> LossOutput:
    """Length-normalised DPO (TRL ``sigmoid_norm``, spec §1.5a), with cDPO ε.

    ``L = −log σ(β·[Δ(y_w)/|y_w| − Δ(y_l)/|y_l|])`` (token counts clamped ≥ 1). β is per token here, so it
    must be retuned (much larger than DPO's 0.1).

    Args:
        logps: [B] log-probs plus ``chosen_tokens`` and ``rejected_tokens`` [B] (required).
        cfg: uses ``beta``, ``label_smoothing``, ``reference_free``, ``rpo_alpha``.

    Returns:
        loss [B]; rewards β·Δ(y)/|y| [B], the quantities the loss compares, so accuracies match the objective.
    """
    n_w, n_l = _require(
        logps, "dpo_norm", "chosen_tokens", "rejected_tokens", why="token counts for length normalisation"
    )
    d_w, d_l = _log_ratios(logps, cfg)
    r_w, r_l = cfg.beta * d_w / n_w.clamp(min=1), cfg.beta * d_l / n_l.clamp(min=1)
    loss = _smoothed_nls(r_w - r_l, cfg.label_smoothing)
    return _output(loss, r_w, r_l, logps, cfg, "dpo_norm")


def simpo(logps: PairLogps, cfg: LossConfig) -> LossOutput:
    """SimPO (Meng et al. 2024, arXiv 2405.14734, Eq. 6): reference-free, length-normalised, target margin γ.

    ``L = −log σ(β/|y_w|·log π_θ(y_w|x) − β/|y_l|·log π_θ(y_l|x) − γ)``, with cDPO ε when ``label_smoothing``
    > 0 (as TRL's CPO trainer). The reference log-probs are never read. This is pure SimPO: add an NLL term
    with ``rpo_alpha`` to get CPO-SimPO.

    Args:
        logps: [B] policy log-probs plus ``chosen_tokens`` and ``rejected_tokens`` [B] (required).
        cfg: uses ``beta``, ``simpo_gamma``, ``label_smoothing``, ``rpo_alpha``.

    Returns:
        loss [B]; rewards β·log π_θ(y)/|y| [B].
    """
    n_w, n_l = _require(logps, "simpo", "chosen_tokens", "rejected_tokens", why="token counts for length normalisation")
    r_w = cfg.beta * logps.policy_chosen / n_w.clamp(min=1)
    r_l = cfg.beta * logps.policy_rejected / n_l.clamp(min=1)
    loss = _smoothed_nls(r_w - r_l - cfg.simpo_gamma, cfg.label_smoothing)
    return _output(loss, r_w, r_l, logps, cfg, "simpo")


def mdpo(logps: PairLogps, cfg: LossConfig) -> LossOutput:
    """mDPO (Wang et al. 2024, arXiv 2406.11839, §3, Eqs. 2–4): DPO + conditional image term + anchor, weights 1.

    With m_w the original image and m_l the corrupted one (spec §2.1)::

        dpo         = −log σ(β·[Δ(y_w|m_w) − Δ(y_l|m_w)])
        conditional = −log σ(β·[Δ(y_w|m_w) − Δ(y_w|m_l)])
        anchor      = −log σ(β·Δ(y_w|m_w) − δ)            δ = ``mdpo_anchor`` (paper default 0)
        L = dpo + conditional + anchor

    ``reference_free`` zeroes the reference in the dpo and conditional terms but keeps it in the anchor, as the
    reference trainer (luka-group/mDPO ``mdpo_trainer.py``) does: an anchor without a reference would just push
    log π_θ(y_w) up without bound. ``label_smoothing`` is ignored (the paper has none).

    Args:
        logps: [B] log-probs plus ``policy_chosen_corrupt`` and ``ref_chosen_corrupt`` [B] (required).
        cfg: uses ``beta``, ``mdpo_anchor``, ``reference_free``, ``rpo_alpha``.

    Returns:
        loss [B]; rewards β·Δ(y_w|m_w), β·Δ(y_l|m_w) [B] with the dpo term's reference; extra "dpo",
        "conditional", "anchor" (which sum to the loss when ``rpo_alpha`` = 0) and "corrupt_rewards"
        β·Δ(y_w|m_l), all [B].
    """
    pol_corrupt, ref_corrupt = _require(
        logps,
        "mdpo",
        "policy_chosen_corrupt",
        "ref_chosen_corrupt",
        why="log-probs of the chosen response under the corrupted image",
    )
    d_w, d_l = _log_ratios(logps, cfg)
    d_corrupt = pol_corrupt if cfg.reference_free else pol_corrupt - ref_corrupt
    dpo_term = -F.logsigmoid(cfg.beta * (d_w - d_l))
    conditional = -F.logsigmoid(cfg.beta * (d_w - d_corrupt))
    anchor = -F.logsigmoid(cfg.beta * (logps.policy_chosen - logps.ref_chosen) - cfg.mdpo_anchor)
    return _output(
        dpo_term + conditional + anchor,
        cfg.beta * d_w,
        cfg.beta * d_l,
        logps,
        cfg,
        "mdpo",
        dpo=dpo_term,
        conditional=conditional,
        anchor=anchor,
        corrupt_rewards=cfg.beta * d_corrupt,
    )


def mm_dpo(logps: PairLogps, cfg: LossConfig) -> LossOutput:
    """MM-DPO with dynamic reward scaling (MM-RLHF, Zhang et al. 2025, arXiv 2502.10391, §5; spec §5.3).

    ``β_i = β·(1 + w·(1 − e^{−k·δ_i}))`` per pair, then ``L = −(1−ε)·log σ(β_i·h) − ε·log σ(−β_i·h)``.
    δ = ``margin`` is clamped at ≥ 0 (our choice): the formula assumes the reward model agrees with the label,
    and a negative δ would shrink β_i below β and, for large |δ|, make it negative and flip the preference.
    So β_i ∈ [β, (1+w)·β] always. δ is detached (it is data, not a model output). This is the paper's
    per-pair formula, not the released code's batch-level β. Add the paper's SFT term with ``rpo_alpha``.

    Args:
        logps: [B] policy/reference log-probs plus ``margin`` [B] (required).
        cfg: uses ``beta``, ``mm_w``, ``mm_k``, ``label_smoothing``, ``reference_free``, ``rpo_alpha``.

    Returns:
        loss [B]; rewards β·Δ(y) [B] with the *base* β, so they compare across pairs and with DPO runs;
        extra "beta" = β_i [B].
    """
    (margin,) = _require(logps, "mm_dpo", "margin", why="reward margin δ = r(y_w) − r(y_l) that scales β")
    delta = margin.detach().clamp(min=0)
    # 1 − e^{−kδ} written as −expm1(−kδ), exact for small δ.
    beta_i = cfg.beta * (1 + cfg.mm_w * -torch.expm1(-cfg.mm_k * delta))
    d_w, d_l = _log_ratios(logps, cfg)
    loss = _smoothed_nls(beta_i * (d_w - d_l), cfg.label_smoothing)
    return _output(loss, cfg.beta * d_w, cfg.beta * d_l, logps, cfg, "mm_dpo", beta=beta_i)


def dpo_reference_free(logps: PairLogps, cfg: LossConfig) -> LossOutput:
    """Reference-free sigmoid DPO (spec §1.4): ``L = −log σ(β·[log π_θ(y_w|x) − log π_θ(y_l|x)])`` (cDPO ε).

    ``dpo_sigmoid`` with ``reference_free`` forced on, whatever ``cfg`` says.

    Args:
        logps: [B] log-probs; the reference fields are ignored.
        cfg: uses ``beta``, ``label_smoothing``, ``rpo_alpha``.

    Returns:
        loss [B]; rewards β·log π_θ(y_w|x), β·log π_θ(y_l|x) [B].
    """
    return dpo_sigmoid(logps, dataclasses.replace(cfg, reference_free=True))


LOSSES: dict[str, LossFn] = {
    "dpo": dpo_sigmoid,
    "cdpo": dpo_sigmoid,  # alias: cDPO is sigmoid DPO with ε = label_smoothing > 0
    "robust": dpo_robust,
    "ipo": ipo,
    "hinge": hinge,
    "dpo_norm": dpo_length_normalized,
    "simpo": simpo,
    "mdpo": mdpo,
    "mm_dpo": mm_dpo,
    "reference_free": dpo_reference_free,
}


def compute_loss(name: str, logps: PairLogps, cfg: LossConfig) -> LossOutput:
    """Look up ``name`` in ``LOSSES`` and apply it.

    Args:
        name: a key of ``LOSSES``.
        logps: [B] per-example log-probs.
        cfg: loss hyper-parameters.

    Returns:
        The loss's ``LossOutput`` (loss [B] unreduced).

    Raises:
        ValueError: for an unknown name (the message lists the valid ones) or a missing required field.
    """
    fn = LOSSES.get(name)
    if fn is None:
        raise ValueError(f"unknown loss {name!r}; valid names: {', '.join(LOSSES)}")
    return fn(logps, cfg)


def dpo_metrics(out: LossOutput, logps: PairLogps) -> dict[str, float]:
    """Batch means under TRL's metric names, plus ``extra/<key>`` for each entry of ``out.extra``.

    ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins`` (chosen − rejected),
    ``rewards/accuracies`` (fraction with chosen reward > rejected reward), ``logps/chosen``, ``logps/rejected``
    (policy log-probs) and ``loss``.

    Args:
        out: a loss's output, [B] tensors.
        logps: the [B] log-probs it was computed from.

    Returns:
        Metric name → Python float.
    """
    chosen, rejected = out.chosen_rewards, out.rejected_rewards
    values = {
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/margins": chosen - rejected,
        "rewards/accuracies": (chosen > rejected).float(),
        "logps/chosen": logps.policy_chosen.detach(),
        "logps/rejected": logps.policy_rejected.detach(),
        "loss": out.loss.detach(),
        **{f"extra/{k}": v for k, v in out.extra.items()},
    }
    # Average in float32 at least (bf16 means are coarse), float64 when any input is; one stack and one
    # .tolist() make a single device sync instead of one per metric.
    dtype = torch.float32
    for v in values.values():
        dtype = torch.promote_types(dtype, v.dtype)
    means = torch.stack([v.to(dtype).mean() for v in values.values()]).tolist()
    return dict(zip(values, means))
