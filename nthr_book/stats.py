"""The statistics every comparison of nthr_book reports with (docs/method.md §7).

What is paired with what. A training comparison pairs runs by seed (the same data order and
sampling seeds) and held-out answers by question and seed; a Δ(x) comparison pairs rules on the
same question (the same group and initial weights). Every interval is 95% unless asked otherwise,
and a comparison is *resolved* only when its interval excludes the null value (``verdict``).

- Student-t over seeds: ``t975``, ``t_interval``, ``paired_differences`` (one row per run).
- A proportion: ``wilson_interval`` (k of n), ``normal_interval`` (per-problem scores).
- The percentile bootstrap: ``bootstrap_interval``, which resamples rows (source questions) within
  strata (seeds) and keeps a row's paired columns together; its statistics ``median``, ``mean``,
  ``ratio_of_medians``, ``ratio_of_sums`` and ``spearman``.
- Accuracy paired by question and seed: ``mcnemar`` (exact) and ``paired_accuracy`` (a bootstrap
  over questions and seeds).
- Power: ``resolvable_difference`` (what n pairs can resolve) and ``pairs_needed`` (the n that
  resolves a difference).

This module is the bottom layer of the analysis: it imports numpy and pandas only, so that the
modules that measure (``lld``, ``regime``, ``experiments``, ``evaluate``) all import it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from statistics import NormalDist
from typing import Any

import numpy as np
import pandas as pd

__all__ = [
    "bootstrap_interval",
    "mcnemar",
    "mean",
    "median",
    "normal_interval",
    "paired_accuracy",
    "paired_differences",
    "pairs_needed",
    "ratio_of_medians",
    "ratio_of_sums",
    "resolvable_difference",
    "resolved",
    "spearman",
    "t975",
    "t_interval",
    "verdict",
    "wilson_interval",
]

# ---------------------------------------------------------------------------------------------
# Student-t over seeds
# ---------------------------------------------------------------------------------------------

# Two-sided 95% Student-t quantiles t_{0.975, df} for df = 1..10 (beyond: Cornish-Fisher expansion).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def t975(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom (table, then a 3-term
    expansion)."""
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def t_interval(values: Sequence[float]) -> tuple[float, float, float, float]:
    """(mean, std, low, high): 95% Student-t interval of the mean over seeds."""
    x = np.asarray(values, dtype=np.float64)
    mean = float(x.mean())
    if len(x) < 2:
        return mean, math.nan, math.nan, math.nan
    std = float(x.std(ddof=1))
    half = t975(len(x) - 1) * std / math.sqrt(len(x))
    return mean, std, mean - half, mean + half


def paired_differences(
    results: pd.DataFrame, baseline: str = "grpo", value: str = "accuracy"
) -> pd.DataFrame:
    """Per method other than ``baseline``: the mean over seeds of (method − baseline) on ``value``,
    paired by seed (same data order and sampling seed), with its 95% Student-t interval and
    ``resolved``: whether the interval excludes 0. Seeds that only one of the two ran are left out.
    Notebook 05."""
    table = results[results["method"] != "base"].pivot(index="seed", columns="method", values=value)
    if baseline not in table:
        raise ValueError(f"paired_differences: no {baseline!r} runs among {list(table.columns)}")
    rows = []
    for method in [m for m in table.columns if m != baseline]:
        diff = (table[method] - table[baseline]).dropna()  # (seeds run by both,)
        mean_, std, low, high = t_interval(diff.tolist()) if len(diff) else (math.nan,) * 4
        rows.append(
            {
                "method": method,
                "baseline": baseline,
                "seeds": len(diff),
                "diff_mean": mean_,
                "diff_std": std,
                "t95_low": low,
                "t95_high": high,
                "resolved": resolved(low, high),
            }
        )
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------
# A proportion
# ---------------------------------------------------------------------------------------------


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for ``k`` successes in ``n`` trials (95%: z=1.96); notebook 06."""
    if isinstance(k, bool) or isinstance(n, bool) or int(k) != k or int(n) != n:
        raise TypeError(f"k and n must be integers, got k={k!r}, n={n!r}")
    k, n = int(k), int(n)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, n={n}], got {k}")
    if z <= 0:
        raise ValueError(f"z must be > 0, got {z}")
    p = k / n
    z2 = z * z
    denom = 1.0 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    # exact endpoints at k=0 and k=n (the formula gives them up to rounding)
    low = 0.0 if k == 0 else max(0.0, center - half)
    high = 1.0 if k == n else min(1.0, center + half)
    return low, high


def normal_interval(values: Sequence[float], z: float = 1.96) -> tuple[float, float]:
    """``mean ± z * sd / sqrt(n)`` of per-problem scores (ddof=1), in [0, 1]; notebook 06."""
    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        raise ValueError("values is empty")
    if n == 1:
        return 0.0, 1.0  # one problem: no spread estimate, the honest interval is everything
    mean_ = sum(values) / n
    sd = math.sqrt(sum((v - mean_) ** 2 for v in values) / (n - 1))
    half = z * sd / math.sqrt(n)
    return max(0.0, mean_ - half), min(1.0, mean_ + half)


# ---------------------------------------------------------------------------------------------
# The bootstrap and its statistics
# ---------------------------------------------------------------------------------------------
# A statistic is ``stat(x, axis)``: it reduces the sample axis of x, shaped (..., n) or (..., n, k)
# (k paired columns of one row), to one number per leading index.


def median(x: np.ndarray, axis: int) -> np.ndarray:
    """The median of (..., n) values along the sample axis."""
    return np.median(x, axis=axis)


def mean(x: np.ndarray, axis: int) -> np.ndarray:
    """The mean of (..., n) values along the sample axis."""
    return np.mean(x, axis=axis)


def ratio_of_medians(x: np.ndarray, axis: int) -> np.ndarray:
    """median(column 0) / median(column 1) of (..., n, 2) paired rows: a description of how two
    rules compare on the same questions, not a paired test."""
    return np.median(x[..., 0], axis=axis) / np.median(x[..., 1], axis=axis)


def ratio_of_sums(x: np.ndarray, axis: int) -> np.ndarray:
    """sum(column 0) / sum(column 1) of (..., n, 2) rows: a share of units clustered in rows (e.g.
    the correct answers with Δ ≤ ε of each question over its correct answers)."""
    return np.sum(x[..., 0], axis=axis) / np.sum(x[..., 1], axis=axis)


def spearman(x: Any, axis: int) -> Any:
    """Spearman's rank correlation of the two columns of (..., n, 2) paired values along the sample
    ``axis`` (-2 or its positive index): the Pearson correlation of their average ranks (ties, as
    in a bootstrap resample, share the mean of their ranks)."""
    x = np.moveaxis(np.asarray(x, dtype=np.float64), axis, -2)  # (..., n, 2)
    below = (x[..., None, :, :] < x[..., :, None, :]).sum(-2)  # (..., n, 2) values below each
    equal = (x[..., None, :, :] == x[..., :, None, :]).sum(-2)  # (..., n, 2) itself included
    ranks = below + (equal + 1) / 2  # (..., n, 2) average 1-based ranks
    ranks = ranks - ranks.mean(-2, keepdims=True)
    cov = (ranks[..., 0] * ranks[..., 1]).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):  # a constant column: NaN, undefined
        return cov / np.sqrt((ranks[..., 0] ** 2).sum(-1) * (ranks[..., 1] ** 2).sum(-1))


def _resample_indices(
    strata: np.ndarray | None, n: int, n_boot: int, rng: np.random.Generator
) -> np.ndarray:
    """(n_boot, n) row indices: n rows drawn with replacement, or within each stratum as many rows
    as it holds, drawn from it (the strata keep their sizes in every resample)."""
    if strata is None:
        return rng.integers(0, n, size=(n_boot, n))
    parts = []
    for label in pd.unique(strata):
        rows = np.flatnonzero(strata == label)  # (n_s,) the stratum's rows
        parts.append(rows[rng.integers(0, len(rows), size=(n_boot, len(rows)))])
    return np.concatenate(parts, axis=1)


def bootstrap_interval(
    values: Sequence[float] | np.ndarray,
    statistic: Callable[[np.ndarray, int], Any] | None = None,
    *,
    strata: Sequence[Any] | None = None,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """(estimate, low, high): the statistic (default: the median) and its percentile-bootstrap
    interval, seeded so a rerun gives the same.

    A row is the unit of resampling (a source question). ``values`` may be (n, k): the k paired
    measurements of each row (two rules' Δ on one question), resampled together. ``strata`` (n,)
    labels the rows' strata (the seed that sampled them): each resample then draws every stratum's
    rows from that stratum alone, so a seed with more questions keeps its weight and the interval
    holds the seeds fixed. Each of ``n_boot`` resamples draws n rows with replacement; the interval
    is the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of the statistic over the resamples
    where it is defined (NaN where none is).
    """
    stat = statistic or median
    x = np.asarray(values, dtype=np.float64)
    if x.ndim not in (1, 2) or len(x) == 0:
        raise ValueError(f"bootstrap_interval: values must be non-empty, (n,) or (n, k): {x.shape}")
    if not 0 < level < 1:
        raise ValueError(f"bootstrap_interval: level={level} must lie in (0, 1)")
    labels = None
    if strata is not None:
        labels = np.asarray(strata)
        if labels.shape != (len(x),):
            raise ValueError(
                f"bootstrap_interval: strata has shape {labels.shape}, values {len(x)} rows"
            )
    estimate = float(stat(x, axis=0))
    if len(x) < 2:
        return estimate, math.nan, math.nan
    rng = np.random.default_rng(seed)
    resamples = x[_resample_indices(labels, len(x), n_boot, rng)]  # (n_boot, n[, k]) by row
    stats = np.asarray(stat(resamples, axis=1), dtype=np.float64)  # (n_boot,)
    if np.isnan(stats).all():
        return estimate, math.nan, math.nan
    # a resample where the statistic is undefined (a rank correlation of tied values) is left out
    low, high = np.nanquantile(stats, [(1 - level) / 2, (1 + level) / 2])
    return estimate, float(low), float(high)


# ---------------------------------------------------------------------------------------------
# Accuracy paired by question and seed
# ---------------------------------------------------------------------------------------------


def mcnemar(a: Sequence[bool], b: Sequence[bool]) -> dict[str, float]:
    """McNemar's exact test of two rules graded on the same items (question, seed): ``only_a`` items
    a got right and b wrong, ``only_b`` the reverse, and the two-sided p-value of the binomial test
    that a discordant item is equally likely either way:
    p = min(1, 2 · Σ_{i ≤ min(only_a, only_b)} C(m, i) / 2^m), m = only_a + only_b (1 when m = 0).
    """
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"mcnemar: a and b must be 1-D of one length, got {a.shape}, {b.shape}")
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    m = only_a + only_b
    tail = sum(math.comb(m, i) for i in range(min(only_a, only_b) + 1))
    p = min(1.0, 2 * tail / 2**m) if m else 1.0
    return {"n": int(a.size), "only_a": only_a, "only_b": only_b, "p_value": p}


def paired_accuracy(
    correct: pd.DataFrame,
    method: str,
    baseline: str = "grpo",
    *,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """``method`` against ``baseline`` on held-out answers graded for both on the same (seed,
    question): accuracy of each, their difference with a 95% bootstrap interval that resamples
    seeds and questions independently (the two ways the result could have come out otherwise),
    ``resolved``, and McNemar's exact test on the (seed, question) pairs.

    ``correct`` has one row per graded answer: columns ``method``, ``seed``, ``question`` and
    ``correct`` (bool or 0/1). Pairs where either rule is missing are left out.
    """
    missing = {"method", "seed", "question", "correct"} - set(correct.columns)
    if missing:
        raise ValueError(f"paired_accuracy: `correct` lacks column(s) {sorted(missing)}")
    wide = correct[correct["method"].isin([method, baseline])].pivot_table(
        index=["seed", "question"], columns="method", values="correct", aggfunc="first"
    )
    for name in (method, baseline):
        if name not in wide:
            raise ValueError(f"paired_accuracy: no answers of {name!r}")
    wide = wide[[method, baseline]].dropna().astype(float)
    diff = (wide[method] - wide[baseline]).unstack("question")  # (seeds, questions)
    d = diff.to_numpy(dtype=np.float64)
    if np.isnan(d).any():
        raise ValueError("paired_accuracy: every seed must grade the same questions")
    n_seeds, n_questions = d.shape
    rng = np.random.default_rng(seed)
    si = rng.integers(0, n_seeds, size=(n_boot, n_seeds))  # seeds drawn per resample
    qi = rng.integers(0, n_questions, size=(n_boot, n_questions))  # questions drawn per resample
    boot = d[si[:, :, None], qi[:, None, :]].mean(axis=(1, 2))  # (n_boot,)
    low, high = (math.nan, math.nan)
    if d.size > 1:
        low, high = (float(v) for v in np.quantile(boot, [0.025, 0.975]))
    test = mcnemar(wide[method].to_numpy() > 0.5, wide[baseline].to_numpy() > 0.5)
    return {
        "method": method,
        "baseline": baseline,
        "seeds": n_seeds,
        "questions": n_questions,
        "accuracy": float(wide[method].mean()),
        "accuracy_baseline": float(wide[baseline].mean()),
        "diff": float(d.mean()),
        "low": low,
        "high": high,
        "resolved": resolved(low, high),
        "only_method": test["only_a"],
        "only_baseline": test["only_b"],
        "mcnemar_p": test["p_value"],
    }


# ---------------------------------------------------------------------------------------------
# Power
# ---------------------------------------------------------------------------------------------


def resolvable_difference(sd: float, n: int, power: float = 0.8) -> float:
    """The smallest true mean difference that a 95% interval over ``n`` paired differences of
    standard deviation ``sd`` excludes 0 for, with probability ``power``:
    (t975(n − 1) + z_power) · sd / √n (the normal approximation of the t test's power)."""
    if n < 2:
        raise ValueError(f"resolvable_difference: n must be >= 2 pairs, got {n}")
    if not 0 < power < 1:
        raise ValueError(f"resolvable_difference: power={power} must lie in (0, 1)")
    return (t975(n - 1) + NormalDist().inv_cdf(power)) * sd / math.sqrt(n)


def pairs_needed(sd: float, difference: float, power: float = 0.8, max_n: int = 100_000) -> int:
    """The fewest pairs n whose ``resolvable_difference`` is at most |difference| (``max_n`` + 1
    when even ``max_n`` pairs do not reach it)."""
    if difference == 0:
        return max_n + 1
    target = abs(difference)
    for n in range(2, max_n + 1):
        if resolvable_difference(sd, n, power) <= target:
            return n
    return max_n + 1


# ---------------------------------------------------------------------------------------------
# Verdicts
# ---------------------------------------------------------------------------------------------


def resolved(low: float, high: float, null: float = 0.0) -> bool:
    """Whether the interval [low, high] excludes ``null`` (False when it is NaN)."""
    return bool(low > null or high < null)


def verdict(estimate: float, low: float, high: float, *, null: float = 0.0, digits: int = 3) -> str:
    """The sentence a notebook prints for a comparison: "+0.342 [+0.080, +0.605], resolved (above
    0)", "... not resolved (the interval contains 0)" or, where there is no interval (one
    question), "... not resolved (no interval: too few pairs)"."""
    f = lambda v: f"{v:+.{digits}f}" if math.isfinite(v) else "nan"  # noqa: E731
    text = f"{f(estimate)} [{f(low)}, {f(high)}]"
    ref = f"{null:g}"
    if not (math.isfinite(low) and math.isfinite(high)):
        return f"{text}, not resolved (no interval: too few pairs)"
    if not resolved(low, high, null):
        return f"{text}, not resolved (the interval contains {ref})"
    return f"{text}, resolved ({'above' if low > null else 'below'} {ref})"
