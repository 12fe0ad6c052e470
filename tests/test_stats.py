"""Statistics helpers on hand-worked numbers; the arithmetic is in each docstring or comment.

Reference t quantiles are the standard table values (e.g. t_{0.975, 2} = 4.302653); df = 1 and df = 2 also have closed
forms, t = tan(π(p − ½)) and t = (2p − 1)/√(2p(1 − p)), checked across p.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from mmalign.stats import (
    Interval,
    accuracy,
    binary_f1,
    column_mean,
    describe_effect,
    difference,
    hierarchical_bootstrap,
    mean_interval,
    ratio,
    relative_change,
    t_quantile,
)

# ------------------------------------------------------------------------------------------------------ t_quantile


@pytest.mark.parametrize(
    ("p", "df", "expected"),
    [
        (0.975, 1, 12.706205),
        (0.975, 2, 4.302653),
        (0.975, 4, 2.776445),
        (0.975, 30, 2.042272),
        (0.95, 5, 2.015048),
        (0.995, 10, 3.169273),
        (0.9995, 3, 12.923979),
    ],
)
def test_t_quantile_table_values(p: float, df: int, expected: float) -> None:
    assert t_quantile(p, df) == pytest.approx(expected, abs=1e-6)


def test_t_quantile_large_df_is_normal() -> None:
    """t_{0.975, 10⁶} = 1.959966 → z_{0.975} = 1.959964 as df → ∞; both sides of the df = 100,000 switch agree."""
    assert t_quantile(0.975, 10**6) == pytest.approx(1.959964, abs=1e-4)
    assert t_quantile(0.975, 10**12) == pytest.approx(1.959964, abs=1e-6)
    assert t_quantile(0.9999, 100_000) == pytest.approx(t_quantile(0.9999, 100_001), abs=1e-6)


@pytest.mark.parametrize("p", [0.5001, 0.6, 0.9, 0.975, 0.999, 0.9999])
def test_t_quantile_closed_forms(p: float) -> None:
    """df = 1 (Cauchy): F(t) = ½ + atan(t)/π ⇒ t = tan(π(p − ½)); at p = 0.9999 that is ≈ 3183.1.

    df = 2: F(t) = ½ + t / (2√(2 + t²)) ⇒ with a = 2p − 1, t² = 2a²/(1 − a²) = a²/(2p(1 − p)).
    """
    assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), abs=1e-6)
    assert t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), abs=1e-6)


def test_t_quantile_symmetry_and_median() -> None:
    assert t_quantile(0.025, 2) == pytest.approx(-4.302653, abs=1e-6)
    assert t_quantile(0.025, 7) == -t_quantile(0.975, 7)
    assert t_quantile(0.5, 3) == 0.0


@pytest.mark.parametrize(("p", "df"), [(0.0, 3), (1.0, 3), (-0.1, 3), (1.5, 3), (0.975, 0), (0.975, -2)])
def test_t_quantile_rejects_bad_arguments(p: float, df: int) -> None:
    with pytest.raises(ValueError, match="t_quantile"):
        t_quantile(p, df)


# ---------------------------------------------------------------------------------------------------- mean_interval


def test_mean_interval_by_hand() -> None:
    """[1, 2, 3]: mean 2; s² = (1 + 0 + 1)/2 = 1; half-width t_{0.975,2}·1/√3 = 4.302653/1.732051 = 2.484138."""
    interval = mean_interval([1.0, 2.0, 3.0])
    assert interval.mean == 2.0
    assert interval.n == 3
    assert interval.low == pytest.approx(2.0 - 2.484138, abs=1e-6)
    assert interval.high == pytest.approx(2.0 + 2.484138, abs=1e-6)


def test_mean_interval_level() -> None:
    """[0, 2]: mean 1, s = √2, half-width t_{0.95,1}·√2/√2 = t_{0.95,1} = tan(0.45π) = 6.313752 at level 0.90."""
    interval = mean_interval([0.0, 2.0], level=0.90)
    assert interval.high - interval.mean == pytest.approx(6.313752, abs=1e-6)
    assert interval.mean - interval.low == pytest.approx(6.313752, abs=1e-6)


def test_mean_interval_single_value_has_no_spread() -> None:
    assert mean_interval([0.42]) == Interval(mean=0.42, low=0.42, high=0.42, n=1)


def test_mean_interval_rejects_empty_and_nan() -> None:
    with pytest.raises(ValueError, match="at least one"):
        mean_interval([])
    with pytest.raises(ValueError, match="index 2"):
        mean_interval([1.0, 2.0, float("nan")])
    with pytest.raises(ValueError, match="level"):
        mean_interval([1.0, 2.0], level=1.0)


def test_interval_helpers() -> None:
    assert Interval(0.5, 0.1, 0.9, 3).excludes_zero()
    assert Interval(-0.5, -0.9, -0.1, 3).excludes_zero()
    assert not Interval(0.1, 0.0, 0.9, 3).excludes_zero()  # strictly: touching zero is not excluding it
    assert not Interval(0.1, math.nan, math.nan, 3).excludes_zero()
    assert Interval(0.5, 0.1, 0.9, 3).to_dict() == {"mean": 0.5, "low": 0.1, "high": 0.9, "n": 3}


# -------------------------------------------------------------------------------------------- hierarchical_bootstrap


def test_bootstrap_identical_items_gives_zero_width() -> None:
    """Every row is 0.25 in both seeds, so every resample's mean is exactly 0.25."""
    tables = [{"x": np.full(50, 0.25)}, {"x": np.full(30, 0.25)}]
    interval = hierarchical_bootstrap(tables, column_mean("x"), n_boot=200)
    assert interval == Interval(mean=0.25, low=0.25, high=0.25, n=2)


def test_bootstrap_point_estimate_is_mean_of_per_seed_statistics() -> None:
    """Seed 0: 1 hallucinated / 4 mentioned = 0.25; seed 1: 3/6 = 0.5; mean (0.25 + 0.5)/2 = 0.375.

    Pooling the counts first would give 4/10 = 0.4 instead.
    """
    tables = [
        {"h": np.array([1, 0, 0, 0]), "m": np.ones(4)},
        {"h": np.array([1, 1, 1, 0, 0, 0]), "m": np.ones(6)},
    ]
    interval = hierarchical_bootstrap(tables, ratio("h", "m"), n_boot=200)
    assert interval.mean == pytest.approx(0.375, abs=1e-12)
    assert interval.n == 2


def test_bootstrap_seed_level_by_hand() -> None:
    """Two seeds, constant 1 and constant 3: a replicate draws 2 seeds, so its average is 1 (p = ¼), 2 (½) or 3 (¼).

    With 2000 replicates the 2.5% and 97.5% percentiles are 1 and 3 (P(fewer than 50 replicates at 1) ≈ 0).
    """
    tables = [{"x": np.ones(10)}, {"x": np.full(10, 3.0)}]
    interval = hierarchical_bootstrap(tables, column_mean("x"))
    assert (interval.mean, interval.low, interval.high) == (2.0, 1.0, 3.0)


def test_bootstrap_item_level_by_hand() -> None:
    """One seed with items [0, 1]: a resample's mean is 0 (p = ¼), ½ (½) or 1 (¼) ⇒ percentiles 0 and 1."""
    interval = hierarchical_bootstrap([{"x": np.array([0.0, 1.0])}], column_mean("x"))
    assert (interval.mean, interval.low, interval.high) == (0.5, 0.0, 1.0)


def _varied_tables() -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(123)
    return [{"x": rng.normal(loc, 1.0, size=200)} for loc in (0.9, 1.0, 1.2)]


def test_bootstrap_is_reproducible_and_brackets_the_mean() -> None:
    tables = _varied_tables()
    first = hierarchical_bootstrap(tables, column_mean("x"), n_boot=500, seed=7)
    again = hierarchical_bootstrap(tables, column_mean("x"), n_boot=500, seed=7)
    other = hierarchical_bootstrap(tables, column_mean("x"), n_boot=500, seed=8)
    assert first == again
    assert other != first
    assert first.low < first.mean < first.high
    assert first.mean == pytest.approx(np.mean([t["x"].mean() for t in tables]))


def test_bootstrap_keeps_rows_paired() -> None:
    """Columns a and b are equal row by row but vary between rows: resampled jointly, mean(a) − mean(b) is exactly 0
    in every replicate; a resample that drew a's and b's rows independently would spread around 0 with the width
    that column_mean("a") alone shows (checked > 0 here so the first assertion can fail)."""
    rng = np.random.default_rng(0)
    tables = []
    for _ in range(3):
        a = rng.normal(size=100)
        tables.append({"a": a, "b": a.copy(), "id": np.arange(100), "id_copy": np.arange(100)})
    paired = hierarchical_bootstrap(tables, difference(column_mean("a"), column_mean("b")), n_boot=300)
    assert (paired.mean, paired.low, paired.high) == (0.0, 0.0, 0.0)
    rows_match = hierarchical_bootstrap(tables, lambda t: float(np.all(t["id"] == t["id_copy"])), n_boot=300)
    assert (rows_match.low, rows_match.high) == (1.0, 1.0)
    single = hierarchical_bootstrap(tables, column_mean("a"), n_boot=300)
    assert single.high - single.low > 0.1


def test_bootstrap_matches_normal_approximation_for_a_proportion() -> None:
    """400 Bernoulli(0.3) draws, p̂ their mean: the 95% percentile bootstrap of the mean should be close to
    p̂ ± 1.96·√(p̂(1 − p̂)/400) ≈ p̂ ± 0.045 (each end within 0.01)."""
    x = (np.random.default_rng(2024).random(400) < 0.3).astype(float)
    p_hat = x.mean()
    half = 1.959964 * math.sqrt(p_hat * (1 - p_hat) / 400)
    interval = hierarchical_bootstrap([{"x": x}], column_mean("x"), seed=1)
    assert interval.mean == pytest.approx(p_hat)
    assert interval.low == pytest.approx(p_hat - half, abs=0.01)
    assert interval.high == pytest.approx(p_hat + half, abs=0.01)


def test_bootstrap_drops_non_finite_replicates() -> None:
    """Denominator [1, 0, 0, 0, 0, 0, 0, 0]: a resample of 8 rows misses row 0 with probability (7/8)⁸ ≈ 0.34,
    giving 0/0; those replicates are dropped with a warning (> 10%) and the rest all equal 1/1 = 1."""
    table = {"num": np.array([1, 0, 0, 0, 0, 0, 0, 0]), "den": np.array([1, 0, 0, 0, 0, 0, 0, 0])}
    with pytest.warns(RuntimeWarning, match="dropped"):
        interval = hierarchical_bootstrap([table], ratio("num", "den"), n_boot=500)
    assert (interval.mean, interval.low, interval.high) == (1.0, 1.0, 1.0)


def test_bootstrap_all_replicates_dropped_gives_nan_interval() -> None:
    with pytest.warns(RuntimeWarning, match="500 of 500"):
        interval = hierarchical_bootstrap([{"x": np.zeros(5)}], ratio("x", "x"), n_boot=500)
    assert math.isnan(interval.low)
    assert math.isnan(interval.high)
    assert interval.n == 1


@pytest.mark.parametrize(
    ("tables", "message"),
    [
        ([], "at least one table"),
        ([{"x": np.ones(3)}, {}], "table 1 has no columns"),
        ([{"x": np.ones(3), "y": np.ones(2)}], "table 0, column 'y' has 2 rows"),
        ([{"x": np.ones(3)}, {"x": np.array([])}], "table 1, column 'x' is empty"),
        ([{"x": np.float64(1.0)}], "table 0, column 'x'"),
    ],
)
def test_bootstrap_validation(tables: list[dict[str, np.ndarray]], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        hierarchical_bootstrap(tables, column_mean("x"), n_boot=10)


def test_bootstrap_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="n_boot"):
        hierarchical_bootstrap([{"x": np.ones(3)}], column_mean("x"), n_boot=0)
    with pytest.raises(ValueError, match="level"):
        hierarchical_bootstrap([{"x": np.ones(3)}], column_mean("x"), level=0.0)


# ------------------------------------------------------------------------------------------------------- statistics

# Row:    0  1  2  3  4  5  6  7
# label:  1  1  1  0  0  0  1  0
# pred:   1  0  1  1  0  0  0  0
# TP = rows 0, 2 → 2;  FP = row 3 → 1;  FN = rows 1, 6 → 2;  TN = rows 4, 5, 7 → 3.
_CLASSIFIED = {"label": np.array([1, 1, 1, 0, 0, 0, 1, 0]), "pred": np.array([1, 0, 1, 1, 0, 0, 0, 0])}


def test_binary_f1_and_accuracy_by_hand() -> None:
    """F1 = 2·2 / (2·2 + 1 + 2) = 4/7; accuracy = (TP + TN)/8 = (2 + 3)/8 = 5/8."""
    assert binary_f1("label", "pred")(_CLASSIFIED) == pytest.approx(4 / 7)
    assert accuracy("label", "pred")(_CLASSIFIED) == 5 / 8


def test_binary_f1_without_positives_is_nan() -> None:
    """All-negative labels and predictions: 2TP + FP + FN = 0 ⇒ NaN."""
    assert math.isnan(binary_f1("y", "p")({"y": np.zeros(4), "p": np.zeros(4)}))


def test_ratio_mean_and_changes_by_hand() -> None:
    """h = [1, 0, 2], m = [2, 2, 4]: CHAIR_i-style ratio 3/8 = 0.375; mean(h) = 1.

    new = ratio(h2, m) = [0, 0, 1]/8 = 0.125: relative change 0.125/0.375 − 1 = −2/3; difference −0.25.
    """
    table = {"h": np.array([1, 0, 2]), "h2": np.array([0, 0, 1]), "m": np.array([2, 2, 4])}
    assert ratio("h", "m")(table) == 0.375
    assert column_mean("h")(table) == 1.0
    assert relative_change(ratio("h2", "m"), ratio("h", "m"))(table) == pytest.approx(-2 / 3)
    assert difference(ratio("h2", "m"), ratio("h", "m"))(table) == pytest.approx(-0.25)


def test_zero_denominators_give_nan() -> None:
    table = {"h": np.array([1, 2]), "z": np.array([0, 0])}
    assert math.isnan(ratio("h", "z")(table))
    assert math.isnan(relative_change(column_mean("h"), column_mean("z"))(table))


# --------------------------------------------------------------------------------------------------- describe_effect


def test_describe_effect_distinguishable() -> None:
    interval = Interval(mean=-0.41, low=-0.55, high=-0.27, n=3)
    assert describe_effect("DPO vs SFT, relative CHAIR_i change", interval, unit="%") == (
        "DPO vs SFT, relative CHAIR_i change: -41% [-55%, -27%] over 3 seeds: distinguishable from zero (lower)."
    )
    assert describe_effect("POPE F1 gain", Interval(0.0123, 0.004, 0.0206, 5)) == (
        "POPE F1 gain: 0.012 [0.004, 0.021] over 5 seeds: distinguishable from zero (higher)."
    )


def test_describe_effect_not_distinguishable() -> None:
    """−0.002 rounds to "-0%"; the sign is dropped so the text reads 0%."""
    assert describe_effect("win rate change", Interval(-0.002, -0.08, 0.07, 1), unit="%") == (
        "win rate change: 0% [-8%, 7%] over 1 seed: not distinguishable from zero."
    )
