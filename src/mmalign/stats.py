"""Statistics for quality figures reported over several seeds: Student-t intervals and a two-level bootstrap.

A quality figure (CHAIR_i, POPE F1, a win rate) is a mean over training seeds with an interval (STYLE.md, rule 12).
Two tools cover the usual cases:

- ``mean_interval(values)``: one number per seed → mean ± t·s/√n, the textbook interval when only per-seed
  figures are kept.
- ``hierarchical_bootstrap(tables, statistic)``: one *table* per seed (per-item columns, e.g. one row per caption or
  per POPE question) → a percentile interval that resamples seeds and, within each drawn seed, items. It accounts
  for both sources of noise, works for any statistic (ratios, F1, relative changes) and for a single seed.

Statistics are plain functions ``Table -> float``, built by the small factories below (``ratio``, ``column_mean``,
``binary_f1``, ``accuracy``) and combined by ``difference`` and ``relative_change``. Comparing two models on the
same items is a *paired* statistic on one table holding both models' columns; the bootstrap resamples rows jointly,
so the pairing survives.

Only the standard library and numpy are used; the Student t quantile is computed from the regularized incomplete
beta function (Numerical Recipes, 3rd ed., §6.4), not read from a table.
"""

from __future__ import annotations

import math
import statistics
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

Table = Mapping[str, np.ndarray]
"""Per-item columns of one seed; every column has the same length (one row per item)."""

# Above this many degrees of freedom the t quantile comes from the Cornish–Fisher expansion, whose truncation error
# (order df⁻⁵) is far below 1e-9 there, while the incomplete-beta route would lose digits to lgamma of huge numbers.
_LARGE_DF = 100_000
_MAX_DROPPED_FRACTION = 0.1


@dataclass(frozen=True)
class Interval:
    """A point estimate with an interval.

    Attributes:
        mean: point estimate.
        low: lower end of the interval.
        high: upper end of the interval.
        n: number of seeds (or values) it came from.
    """

    mean: float
    low: float
    high: float
    n: int

    def excludes_zero(self) -> bool:
        """True when the whole interval lies strictly above or strictly below zero (False for a NaN interval)."""
        return self.low > 0 or self.high < 0

    def to_dict(self) -> dict[str, float | int]:
        """The interval as ``{"mean", "low", "high", "n"}`` for JSON reports."""
        return {"mean": self.mean, "low": self.low, "high": self.high, "n": self.n}


# --------------------------------------------------------------------------------------------- Student t quantile


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """Continued fraction of I_x(a, b) by the modified Lentz method (Numerical Recipes ``betacf``).

    It converges fast for x < (a + 1) / (a + b + 2); the iteration count grows like √max(a, b), hence the generous
    cap (df ≤ ``_LARGE_DF`` keeps it below a few hundred).
    """
    tiny, eps = 1e-300, 1e-16
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c = 1.0
    d = 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 100_000):
        m2 = 2 * m
        for aa in (
            m * (b - m) * x / ((qam + m2) * (a + m2)),
            -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2)),
        ):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            delta = d * c
            h *= delta
        if abs(delta - 1.0) < eps:
            return h
    raise ArithmeticError(f"incomplete beta continued fraction did not converge for a={a}, b={b}, x={x}")


def _regularized_beta(a: float, b: float, x: float, y: float) -> float:
    """I_x(a, b), the regularized incomplete beta function, with ``y = 1 - x`` passed in to avoid cancellation."""
    if x <= 0.0:
        return 0.0
    if y <= 0.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(y)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, y) / b


def _t_upper_tail(t: float, df: float) -> float:
    """P(T > t) for t ≥ 0: ½·I_{df/(df+t²)}(df/2, ½)."""
    t2 = t * t
    return 0.5 * _regularized_beta(0.5 * df, 0.5, df / (df + t2), t2 / (df + t2))


def _t_density(t: float, df: float) -> float:
    """Density of Student's t with ``df`` degrees of freedom."""
    log_norm = math.lgamma(0.5 * (df + 1.0)) - math.lgamma(0.5 * df) - 0.5 * math.log(df * math.pi)
    return math.exp(log_norm - 0.5 * (df + 1.0) * math.log1p(t * t / df))


def _cornish_fisher(p: float, df: float) -> float:
    """Asymptotic t quantile from the normal one (Abramowitz & Stegun 26.7.5, terms up to df⁻⁴)."""
    z = statistics.NormalDist().inv_cdf(p)
    z2 = z * z
    g1 = z * (z2 + 1.0) / 4.0
    g2 = z * ((5.0 * z2 + 16.0) * z2 + 3.0) / 96.0
    g3 = z * (((3.0 * z2 + 19.0) * z2 + 17.0) * z2 - 15.0) / 384.0
    g4 = z * ((((79.0 * z2 + 776.0) * z2 + 1482.0) * z2 - 1920.0) * z2 - 945.0) / 92160.0
    return z + g1 / df + g2 / df**2 + g3 / df**3 + g4 / df**4


def t_quantile(p: float, df: int) -> float:
    """Quantile of Student's t distribution: the t with P(T ≤ t) = p.

    Solves P(T > t) = 1 - p by Newton steps safeguarded by bisection, with the tail from the regularized incomplete
    beta function; for df > 100,000 it uses the Cornish–Fisher expansion (error far below 1e-9 there). Accurate to
    about 1e-9 for p in (0.5, 0.9999); t_quantile(p, df) = -t_quantile(1 - p, df).

    Args:
        p: probability in (0, 1), e.g. 0.975 for a two-sided 95% interval.
        df: degrees of freedom, ≥ 1 (n - 1 for a mean over n values).

    Returns:
        The quantile, e.g. t_quantile(0.975, 2) = 4.302653.

    Raises:
        ValueError: if p is not in (0, 1) or df < 1.
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"t_quantile: p must be in (0, 1), got {p}")
    if not df >= 1:
        raise ValueError(f"t_quantile: df must be >= 1, got {df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    if p == 0.5:
        return 0.0
    df = float(df)
    if df > _LARGE_DF:
        return _cornish_fisher(p, df)
    tail = 1.0 - p
    lo, hi = 0.0, 1.0
    while _t_upper_tail(hi, df) > tail:  # grow the bracket; df = 1 and p = 0.9999 needs t ≈ 3183
        lo, hi = hi, 2.0 * hi
    guess = _cornish_fisher(p, df)
    t = guess if lo < guess < hi else 0.5 * (lo + hi)
    for _ in range(200):
        excess = _t_upper_tail(t, df) - tail  # > 0: t is still too small
        if excess == 0.0:
            return t
        if excess > 0.0:
            lo = t
        else:
            hi = t
        newton = t + excess / _t_density(t, df)
        newton = newton if lo < newton < hi else 0.5 * (lo + hi)
        if abs(newton - t) <= 1e-15 * max(1.0, t):
            return newton
        t = newton
    return t


# ------------------------------------------------------------------------------------------------------ intervals


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")


def mean_interval(values: Sequence[float], level: float = 0.95) -> Interval:
    """Mean over seeds with a Student-t interval: mean ± t_{(1+level)/2, n-1} · s / √n, s the sample std (ddof=1).

    With one value no spread can be estimated and the interval collapses to the value itself (low = high = mean);
    such an interval is not evidence of anything, even though ``excludes_zero()`` may say True.

    Args:
        values: one figure per seed, shape [n].
        level: coverage of the interval, e.g. 0.95.

    Returns:
        The interval, with ``n = len(values)``.

    Raises:
        ValueError: if ``values`` is empty, holds a NaN or infinite value (the index is named), or level ∉ (0, 1).
    """
    _check_level(level)
    array = np.asarray(values, dtype=float)
    if array.ndim != 1:
        raise ValueError(f"mean_interval: expected a flat sequence of values, got shape {array.shape}")
    if array.size == 0:
        raise ValueError("mean_interval: need at least one value")
    bad = np.flatnonzero(~np.isfinite(array))
    if bad.size:
        raise ValueError(f"mean_interval: value at index {int(bad[0])} is {array[bad[0]]}, expected a finite number")
    n = int(array.size)
    mean = float(array.mean())
    if n == 1:
        return Interval(mean=mean, low=mean, high=mean, n=1)
    half = t_quantile(0.5 * (1.0 + level), n - 1) * float(array.std(ddof=1)) / math.sqrt(n)
    return Interval(mean=mean, low=mean - half, high=mean + half, n=n)


def _validated_table(index: int, table: Table) -> dict[str, np.ndarray]:
    """The table's columns as arrays, after checking they share one length ≥ 1 (errors name table and column)."""
    if len(table) == 0:
        raise ValueError(f"table {index} has no columns")
    columns: dict[str, np.ndarray] = {}
    first = ""
    for name, values in table.items():
        array = np.asarray(values)
        if array.ndim == 0:
            raise ValueError(f"table {index}, column {name!r}: expected one value per item, got a scalar")
        if not columns:
            first = name
        elif len(array) != len(columns[first]):
            raise ValueError(
                f"table {index}, column {name!r} has {len(array)} rows but column {first!r} has {len(columns[first])}"
            )
        columns[name] = array
    if len(columns[first]) == 0:
        raise ValueError(f"table {index}, column {first!r} is empty; every column needs at least one row")
    return columns


def hierarchical_bootstrap(
    tables: Sequence[Table],
    statistic: Callable[[Table], float],
    *,
    level: float = 0.95,
    n_boot: int = 2000,
    seed: int = 0,
) -> Interval:
    """Two-level percentile bootstrap for the mean over seeds of a per-seed statistic.

    Point estimate: the average of ``statistic(table)`` over the original tables. Each replicate draws
    ``len(tables)`` seeds with replacement; for each drawn seed it draws that table's rows with replacement (the same
    row indices for every column, so paired columns stay paired), evaluates the statistic on the resampled table and
    averages over the drawn seeds. With one table this is the ordinary within-seed (item) bootstrap.

    Replicates whose average is not finite (e.g. a 0/0 ratio on an unlucky resample) are dropped; a RuntimeWarning
    is raised when more than 10% are, and when all are the interval is NaN.

    Args:
        tables: one table per seed; each maps column name → per-item array of shape [n_items] (n_items may differ
            between seeds).
        statistic: ``Table -> float``, e.g. ``ratio("hallucinated", "mentioned")``.
        level: coverage of the interval, e.g. 0.95.
        n_boot: number of bootstrap replicates.
        seed: seed of ``numpy.random.default_rng``; equal inputs and seed give equal results.

    Returns:
        The interval: low/high are the (1-level)/2 and (1+level)/2 percentiles (numpy's linear interpolation) of the
        replicate averages; ``n = len(tables)``.

    Raises:
        ValueError: if there is no table, a table has no columns, a column's length differs from the others in its
            table or is 0 (the table index and column are named), level ∉ (0, 1), or n_boot < 1.
    """
    _check_level(level)
    if n_boot < 1:
        raise ValueError(f"hierarchical_bootstrap: n_boot must be >= 1, got {n_boot}")
    if len(tables) == 0:
        raise ValueError("hierarchical_bootstrap: need at least one table")
    columns = [_validated_table(i, table) for i, table in enumerate(tables)]
    n_rows = [len(next(iter(table.values()))) for table in columns]
    n_seeds = len(columns)
    mean = float(np.mean([statistic(table) for table in columns]))

    rng = np.random.default_rng(seed)
    drawn_seeds = rng.integers(0, n_seeds, size=(n_boot, n_seeds))
    averages = np.empty(n_boot)
    # Non-finite replicates are expected and handled below; numpy's 0/0 warnings would only be noise.
    with np.errstate(divide="ignore", invalid="ignore"):
        for b in range(n_boot):
            total = 0.0
            for s in drawn_seeds[b]:
                rows = rng.integers(0, n_rows[s], size=n_rows[s])
                total += float(statistic({name: values[rows] for name, values in columns[s].items()}))
            averages[b] = total / n_seeds

    kept = averages[np.isfinite(averages)]
    dropped = n_boot - kept.size
    if dropped > _MAX_DROPPED_FRACTION * n_boot:
        warnings.warn(
            f"hierarchical_bootstrap: {dropped} of {n_boot} replicates gave a non-finite statistic and were dropped;"
            " the interval is unreliable",
            RuntimeWarning,
            stacklevel=2,
        )
    if kept.size == 0:
        return Interval(mean=mean, low=math.nan, high=math.nan, n=n_seeds)
    low, high = np.percentile(kept, [50.0 * (1.0 - level), 50.0 * (1.0 + level)])
    return Interval(mean=mean, low=float(low), high=float(high), n=n_seeds)


# ----------------------------------------------------------------------------------------------------- statistics


def ratio(numerator: str, denominator: str) -> Callable[[Table], float]:
    """Statistic sum(t[numerator]) / sum(t[denominator]); NaN when the denominator sums to 0.

    Example: CHAIR_i = ratio("hallucinated_objects", "mentioned_objects") over one row per caption.
    """

    def statistic(table: Table) -> float:
        den = float(np.sum(table[denominator]))
        return float(np.sum(table[numerator])) / den if den != 0.0 else math.nan

    return statistic


def column_mean(column: str) -> Callable[[Table], float]:
    """Statistic mean(t[column]), e.g. CHAIR_s from a 0/1 column "caption_hallucinates"."""

    def statistic(table: Table) -> float:
        return float(np.mean(table[column]))

    return statistic


def relative_change(new: Callable[[Table], float], base: Callable[[Table], float]) -> Callable[[Table], float]:
    """Statistic new(t) / base(t) - 1; NaN when base(t) == 0. On a paired table this is e.g. DPO vs SFT CHAIR_i."""

    def statistic(table: Table) -> float:
        reference = base(table)
        return new(table) / reference - 1.0 if reference != 0.0 else math.nan

    return statistic


def difference(new: Callable[[Table], float], base: Callable[[Table], float]) -> Callable[[Table], float]:
    """Statistic new(t) - base(t)."""

    def statistic(table: Table) -> float:
        return new(table) - base(table)

    return statistic


def binary_f1(label: str, pred: str) -> Callable[[Table], float]:
    """Statistic F1 of the positive class, 2TP / (2TP + FP + FN), from 0/1 columns (nonzero counts as 1).

    NaN when there is neither a positive label nor a positive prediction (2TP + FP + FN == 0).
    """

    def statistic(table: Table) -> float:
        truth = np.asarray(table[label]).astype(bool)
        guess = np.asarray(table[pred]).astype(bool)
        tp = int(np.count_nonzero(truth & guess))
        wrong = int(np.count_nonzero(truth != guess))  # FP + FN
        den = 2 * tp + wrong
        return 2.0 * tp / den if den else math.nan

    return statistic


def accuracy(label: str, pred: str) -> Callable[[Table], float]:
    """Statistic mean(t[label] == t[pred])."""

    def statistic(table: Table) -> float:
        return float(np.mean(np.asarray(table[label]) == np.asarray(table[pred])))

    return statistic


# ------------------------------------------------------------------------------------------------------ reporting


def _format_value(value: float, unit: str) -> str:
    text = f"{100.0 * value:.0f}" if unit == "%" else f"{value:.3f}"
    if text.startswith("-") and float(text) == 0.0:  # "-0%" would claim a sign that rounding erased
        text = text[1:]
    return text + unit


def describe_effect(name: str, interval: Interval, unit: str = "") -> str:
    """One plain-English sentence for a report.

    Example: ``"DPO vs SFT, relative CHAIR_i change: -41% [-55%, -27%] over 3 seeds: distinguishable from zero
    (lower)."``, or ``"...: not distinguishable from zero."`` when the interval contains 0.

    Args:
        name: what was measured, e.g. "DPO vs SFT, relative CHAIR_i change".
        interval: from ``mean_interval`` or ``hierarchical_bootstrap``.
        unit: "%" formats values as percentages of 1 (×100, no decimals); anything else is appended to values
            printed with 3 decimals.

    Returns:
        The sentence.
    """
    mean, low, high = (_format_value(v, unit) for v in (interval.mean, interval.low, interval.high))
    seeds = "seed" if interval.n == 1 else "seeds"
    if interval.excludes_zero():
        verdict = f"distinguishable from zero ({'higher' if interval.low > 0 else 'lower'})."
    else:
        verdict = "not distinguishable from zero."
    return f"{name}: {mean} [{low}, {high}] over {interval.n} {seeds}: {verdict}"
