"""Tests of nthr_book.stats: every interval, test and power formula against a hand computation or
an exact enumeration on a tiny table."""

from __future__ import annotations

import itertools
import math
from collections import Counter
from statistics import NormalDist

import numpy as np
import pandas as pd
import pytest

from nthr_book.stats import (
    bootstrap_interval,
    mcnemar,
    mean,
    normal_interval,
    paired_accuracy,
    paired_differences,
    pairs_needed,
    ratio_of_sums,
    resolvable_difference,
    resolved,
    t975,
    t_interval,
    verdict,
    wilson_interval,
)

EPS64 = float(np.finfo(np.float64).eps)  # n additions and a division: within n·eps·Σ|x| / n


@pytest.mark.parametrize(
    "df,table", [(1, 12.706), (2, 4.303), (10, 2.228), (15, 2.131), (20, 2.086), (30, 2.042)]
)
def test_t_quantile(df, table):
    # Up to df = 10 t975 reads the same printed table: equal. Beyond, it sums the first three terms
    # of the
    # Cornish-Fisher expansion in 1/df: off by about the first omitted term, (3z^7 + 19z^5 + 17z^3 -
    # 15z)
    # / (384 df^3), plus half a unit in the table's third decimal.
    z = 1.959964
    omitted = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3)
    tol = 0.0 if df <= 10 else omitted + 0.5e-3
    assert abs(t975(df) - table) <= tol


def test_bootstrap_interval_matches_the_exact_bootstrap_distribution():
    # Seven distinct values: the exact bootstrap distribution of the median enumerates all 7^7
    # resamples. The seeded percentile interval must sit on the exact quantiles; we first check
    # that each quantile is far (> 5 Monte Carlo sd) from a jump of the exact CDF, so the check is
    # not luck.
    values = [0.3, -1.0, 2.5, 0.0, 4.0, 1.2, -0.4]
    n, n_boot = len(values), 4000
    counts = Counter(
        sorted(values[i] for i in idx)[n // 2] for idx in itertools.product(range(n), repeat=n)
    )
    support = sorted(counts)
    cdf = np.cumsum([counts[v] for v in support]) / n**n
    exact = []
    for q in (0.025, 0.975):
        k = int(np.searchsorted(cdf, q))  # the smallest value whose CDF reaches q
        mc_sd = math.sqrt(q * (1 - q) / n_boot)
        assert min(abs(cdf[k] - q), abs(q - (cdf[k - 1] if k else 0.0))) > 5 * mc_sd  # margin
        exact.append(support[k])
    median, low, high = bootstrap_interval(values, n_boot=n_boot, seed=3)
    assert median == float(np.median(values)) and [low, high] == exact
    # a statistic of one's own, and the input checks
    mean, low, high = bootstrap_interval(values, lambda x, axis: x.mean(axis=axis))
    assert low < mean < high
    assert mean == pytest.approx(sum(values) / n, abs=EPS64 * sum(map(abs, values)))
    # paired values are resampled by row: with b = 2a on every row, every resample's ratio of
    # medians is exactly 1/2 (resampling the columns apart would scatter it)
    a = np.array(values) + 5.0  # positive: no median of 0 in a resample
    ratio = lambda x, axis: np.median(x[..., 0], axis=axis) / np.median(x[..., 1], axis=axis)  # noqa: E731
    assert bootstrap_interval(np.stack([a, 2 * a], 1), ratio) == (0.5, 0.5, 0.5)
    assert math.isnan(bootstrap_interval([1.0])[1])
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_interval([])
    with pytest.raises(ValueError, match="level"):
        bootstrap_interval(values, level=1.5)


def test_t_interval_hand_values():
    # values 1, 2, 3, 6: mean 3, sample sd sqrt(14/3), half-width t975(3)·sd/2 with t975(3) = 3.182
    mean, sd, low, high = t_interval([1.0, 2.0, 3.0, 6.0])
    assert mean == 3.0
    assert abs(sd - math.sqrt(14 / 3)) <= 4 * 2**-52 * sd  # a few roundings of float64
    half = 3.182 * math.sqrt(14 / 3) / 2
    assert abs((high - low) / 2 - half) <= 16 * 2**-52 * half and abs(
        (high + low) / 2 - 3.0
    ) <= 16 * 2**-52 * (3.0 + half)
    one = t_interval([0.5])
    assert one[0] == 0.5 and all(math.isnan(v) for v in one[1:])


def test_paired_differences_by_hand():
    """NTHR − GRPO per seed by hand: 0.05, 0.00, 0.10 -> mean 0.05, sd 0.05, half-width
    t(2) 4.303 · 0.05 / √3 = 0.1242: unresolved. A seed only GRPO ran and the base row are left
    out; a constant +0.1 with some spread is resolved."""
    results = pd.DataFrame(
        {
            "method": ["base", "grpo", "grpo", "grpo", "grpo", "nthr", "nthr", "nthr"],
            "seed": [-1, 0, 1, 2, 3, 0, 1, 2],
            "accuracy": [0.4, 0.5, 0.6, 0.7, 0.9, 0.55, 0.6, 0.8],
        }
    )
    row = paired_differences(results).iloc[0]
    assert row["method"] == "nthr" and row["baseline"] == "grpo" and row["seeds"] == 3
    half = 4.302653 * 0.05 / math.sqrt(3)  # t975(2); the library's table keeps 3 decimals:
    tol = 0.0005 * 0.05 / math.sqrt(3)  # its rounding, carried through the half-width
    # three differences of numbers below 1 (one rounding each), their mean and sample sd: each
    # within a few roundings of values below 1, 8·eps
    assert row["diff_mean"] == pytest.approx(0.05, rel=0.0, abs=8 * EPS64)
    assert row["diff_std"] == pytest.approx(0.05, rel=0.0, abs=8 * EPS64)
    assert row["t95_low"] == pytest.approx(0.05 - half, abs=tol)
    assert row["t95_high"] == pytest.approx(0.05 + half, abs=tol)
    assert not row["resolved"]
    shifted = results.assign(
        accuracy=[0.4, 0.5, 0.6, 0.7, 0.9, 0.61, 0.69, 0.81]  # +0.11, +0.09, +0.11
    )
    assert paired_differences(shifted).iloc[0]["resolved"]
    with pytest.raises(ValueError, match="no 'grpo' runs"):
        paired_differences(results[results.method != "grpo"])


def wilson_by_roots(k: int, n: int, z: float) -> tuple[float, float]:
    """Wilson endpoints as the roots in p of (k/n - p)^2 = z^2 p (1 - p) / n."""
    ph = k / n
    a = 1 + z * z / n
    b = -(2 * ph + z * z / n)
    c = ph * ph
    roots = np.sort(np.roots([a, b, c]).real)
    return float(roots[0]), float(roots[1])


def test_wilson_hand_values():
    # 2/5: p=0.4, centre (0.4 + 0.38416)/1.76832, half 1.96/1.76832 * sqrt(0.048 + 0.038416)
    centre = (0.4 + 1.96**2 / 10) / (1 + 1.96**2 / 5)
    half = 1.96 / (1 + 1.96**2 / 5) * math.sqrt(0.4 * 0.6 / 5 + 1.96**2 / 100)
    # each side is about ten float64 operations on numbers below 2: 16·eps covers both
    hand = 16 * EPS64
    assert wilson_interval(2, 5) == pytest.approx((centre - half, centre + half), abs=hand)
    printed = 0.5e-4  # the published values carry 4 decimals: half a unit of the last one
    assert wilson_interval(2, 5) == pytest.approx((0.1176, 0.7693), abs=printed)
    # 0/10: upper bound z^2/n / (1 + z^2/n)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.38416 / 1.38416), abs=hand)
    assert wilson_interval(10, 10) == pytest.approx((1 - 0.38416 / 1.38416, 1.0), abs=hand)
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=printed)


@pytest.mark.parametrize(
    "k,n,z", [(0, 1, 1.96), (1, 3, 1.96), (7, 30, 1.96), (13, 40, 2.576), (250, 500, 1.0)]
)
def test_wilson_matches_quadratic_roots(k, n, z):
    # np.roots is backward stable: its roots are exact for coefficients off by a few eps·max|coef|,
    # which moves a simple root p by that over |f'(p)| = a·(p2 - p1); the library's closed form adds
    # a dozen roundings of numbers below 2. 64·eps covers the solver's constant and both sides.
    low, high = wilson_by_roots(k, n, z)
    a, ph = 1 + z * z / n, k / n
    coef = max(a, 2 * ph + z * z / n, ph * ph)
    tol = 64 * EPS64 * (coef / (a * (high - low)) + 1)
    assert wilson_interval(k, n, z) == pytest.approx((low, high), abs=tol)


def test_wilson_rejects_bad_arguments():
    with pytest.raises(ValueError, match="n must be"):
        wilson_interval(0, 0)
    with pytest.raises(ValueError, match="k must be"):
        wilson_interval(6, 5)
    with pytest.raises(TypeError):
        wilson_interval(1.5, 5)


def test_normal_interval_hand_values():
    # per-problem means 0.5, 0.5, 0, 0, 0: mean 0.2, sd sqrt(0.3/4), half 1.96*sd/sqrt(5); low
    # clipped at 0
    half = 1.96 * math.sqrt(0.075) / math.sqrt(5)
    hand = 16 * EPS64  # a mean, a variance and a square root of numbers below 1, on each side
    assert normal_interval([0.5, 0.5, 0, 0, 0]) == pytest.approx((0.0, 0.2 + half), abs=hand)
    assert normal_interval([0.25, 0.75]) == pytest.approx(
        (0.5 - 1.96 * math.sqrt(0.125 / 2), 0.5 + 1.96 * math.sqrt(0.125 / 2)), abs=hand
    )
    assert normal_interval([0.5]) == (0.0, 1.0)


def test_stratified_bootstrap_matches_the_exact_distribution():
    """Rows resampled within strata: stratum "a" holds 1, 2, 4 and stratum "b" holds 10, 30, so
    every resample's mean is (three draws from a + two from b) / 5, and the exact distribution
    enumerates the 3^3 · 2^2 equally likely resamples. Resampling across strata would let a
    resample hold five rows of "b" (mean 30), which stratified resampling never draws."""
    values = [1.0, 10.0, 2.0, 30.0, 4.0]
    strata = ["a", "b", "a", "b", "a"]
    a, b = [1.0, 2.0, 4.0], [10.0, 30.0]
    means = Counter(
        (sum(x) + sum(y)) / 5
        for x in itertools.product(a, repeat=3)
        for y in itertools.product(b, repeat=2)
    )
    support = sorted(means)
    cdf = np.cumsum([means[v] for v in support]) / (27 * 4)
    n_boot = 20_000
    exact = []
    for q in (0.025, 0.975):
        k = int(np.searchsorted(cdf, q))  # the smallest value whose CDF reaches q
        mc_sd = math.sqrt(q * (1 - q) / n_boot)
        assert min(abs(cdf[k] - q), abs(q - (cdf[k - 1] if k else 0.0))) > 5 * mc_sd  # margin
        exact.append(support[k])
    est, low, high = bootstrap_interval(values, mean, strata=strata, n_boot=n_boot, seed=1)
    assert est == pytest.approx(47 / 5, abs=8 * EPS64 * 47)
    # each resample's mean is a sum of 5 exact binary fractions / 5: compare within its rounding
    assert [low, high] == pytest.approx(exact, abs=8 * EPS64 * 30)
    with pytest.raises(ValueError, match="strata"):
        bootstrap_interval(values, strata=["a", "b"])


def test_ratio_of_sums_weighs_rows_by_their_units():
    # questions with (answers with Δ ≤ 0, answers): (1, 2), (0, 3), (3, 3): 4 of 8 answers
    x = np.array([[1.0, 2.0], [0.0, 3.0], [3.0, 3.0]])
    assert float(ratio_of_sums(x, axis=0)) == 0.5
    est, low, high = bootstrap_interval(x, ratio_of_sums)
    assert est == 0.5 and 0.0 <= low <= 0.5 <= high <= 1.0


@pytest.mark.parametrize(
    "only_a,only_b,p",
    [
        (1, 5, 2 * (1 + 6) / 2**6),  # m = 6: P(X <= 1) = (C(6,0) + C(6,1)) / 64, doubled
        (0, 0, 1.0),  # no discordant item: no evidence either way
        (3, 3, 1.0),  # balanced: the doubled tail exceeds 1
        (0, 7, 2 / 2**7),
    ],
)
def test_mcnemar_exact_binomial_by_hand(only_a, only_b, p):
    both = 4  # concordant items do not enter the test
    a = [True] * only_a + [False] * only_b + [True] * both + [False] * 2
    b = [False] * only_a + [True] * only_b + [True] * both + [False] * 2
    out = mcnemar(a, b)
    assert (out["only_a"], out["only_b"], out["n"]) == (only_a, only_b, len(a))
    assert out["p_value"] == pytest.approx(p, rel=4 * EPS64)
    with pytest.raises(ValueError, match="one length"):
        mcnemar([True], [True, False])


def _graded(table: dict[str, list[list[int]]]) -> pd.DataFrame:
    """One row per (method, seed, question) from {method: [[0/1 per question] per seed]}."""
    rows = [
        {"method": m, "seed": s, "question": f"q{q}", "correct": bool(v)}
        for m, seeds in table.items()
        for s, row in enumerate(seeds)
        for q, v in enumerate(row)
    ]
    return pd.DataFrame(rows)


def test_paired_accuracy_by_hand():
    # 2 seeds × 4 questions; nthr − grpo per (seed, question): seed 0: +1, 0, 0, −1;
    # seed 1: +1, +1, 0, 0 → mean 2/8; discordant: nthr only 3, grpo only 1
    table = {
        "grpo": [[0, 1, 1, 1], [0, 0, 1, 0]],
        "nthr": [[1, 1, 1, 0], [1, 1, 1, 0]],
    }
    out = paired_accuracy(_graded(table), "nthr", "grpo", n_boot=4000)
    assert (out["seeds"], out["questions"]) == (2, 4)
    assert out["accuracy"] == 6 / 8 and out["accuracy_baseline"] == 4 / 8
    assert out["diff"] == 0.25 and out["low"] <= 0.25 <= out["high"]
    assert (out["only_method"], out["only_baseline"]) == (3, 1)
    assert out["mcnemar_p"] == pytest.approx(2 * (1 + 4) / 16, rel=4 * EPS64)
    # every resample of a constant difference is that constant: the interval is a point
    same = {"grpo": [[0, 0, 0], [0, 0, 0]], "nthr": [[1, 1, 1], [1, 1, 1]]}
    shifted = paired_accuracy(_graded(same), "nthr", "grpo")
    assert shifted["low"] == shifted["high"] == shifted["diff"] == 1.0
    assert shifted["resolved"]
    with pytest.raises(ValueError, match="no answers of 'pos_only'"):
        paired_accuracy(_graded(table), "pos_only", "grpo")


def test_paired_accuracy_resamples_seeds_and_questions():
    """With one seed the bootstrap can only resample questions: on 4 questions with differences
    +1, +1, 0, 0 the exact distribution of the mean has P(mean = 1) = P(mean = 0) = 1/16, so the
    95% interval spans [0.25, 0.75] or wider but never a point."""
    table = {"grpo": [[0, 0, 1, 0]], "nthr": [[1, 1, 1, 0]]}
    out = paired_accuracy(_graded(table), "nthr", "grpo", n_boot=4000)
    assert out["diff"] == 0.5 and out["low"] <= 0.25 and out["high"] >= 0.75


def test_power_formulas_by_hand():
    z80 = NormalDist().inv_cdf(0.8)  # 0.8416
    # n = 3 seeds, sd 0.1: (t975(2) + z80) · 0.1 / √3 with t975(2) = 4.303 from the table
    assert resolvable_difference(0.1, 3) == pytest.approx((4.303 + z80) * 0.1 / math.sqrt(3))
    # pairs_needed returns the first n whose resolvable difference reaches the target
    n = pairs_needed(0.5, 0.2)
    assert resolvable_difference(0.5, n) <= 0.2 < resolvable_difference(0.5, n - 1)
    # the large-n limit: about ((1.96 + 0.84) · sd / d)^2 pairs
    assert abs(pairs_needed(1.0, 0.1) - ((1.959964 + z80) / 0.1) ** 2) < 5
    assert pairs_needed(1.0, 0.0) > 100_000
    with pytest.raises(ValueError, match="n must be"):
        resolvable_difference(1.0, 1)


def test_verdicts():
    assert resolved(0.1, 0.3) and resolved(-0.3, -0.1) and not resolved(-0.1, 0.3)
    assert not resolved(math.nan, math.nan)
    assert resolved(1.1, 1.4, null=1.0)
    assert verdict(0.342, 0.08, 0.605) == "+0.342 [+0.080, +0.605], resolved (above 0)"
    assert verdict(-0.2, -0.5, 0.1).endswith("not resolved (the interval contains 0)")
    assert verdict(0.5, 0.2, 0.9, null=1).endswith(", resolved (below 1)")
    assert verdict(0.5, 0.2, 1.9, null=1).endswith("not resolved (the interval contains 1)")
    assert (
        verdict(0.3, math.nan, math.nan)
        == "+0.300 [nan, nan], not resolved (no interval: too few pairs)"
    )
