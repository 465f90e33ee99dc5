"""run_experiment: method labels, the t quantile, and a real (tiny) two-method two-seed
experiment."""

from __future__ import annotations

import math
import sys
from collections import Counter

import numpy as np
import pandas as pd
import pytest

from nthr_book import experiments
from nthr_book.experiments import (
    ablation_methods,
    bootstrap_interval,
    method_overrides,
    paired_differences,
    run_experiment,
    summarize,
    t975,
    t_interval,
)
from nthr_book.trainer import TrainConfig

EPS64 = float(np.finfo(np.float64).eps)  # n additions and a division: within n·eps·Σ|x| / n


@pytest.mark.parametrize(
    "label,expected",
    [
        ("grpo", {"method": "grpo"}),
        ("pos_only", {"method": "pos_only"}),
        ("nthr_beta=-inf", {"method": "nthr", "nthr_beta": -math.inf}),
        ("nthr_beta=0.1", {"method": "nthr", "nthr_beta": 0.1}),
        ("nthr_eta=p", {"method": "nthr", "nthr_eta": "p"}),
        (
            "nthr_beta=0_eta=one_minus_p",
            {"method": "nthr", "nthr_beta": 0.0, "nthr_eta": "one_minus_p"},
        ),
    ],
)
def test_method_labels(label, expected):
    assert method_overrides(label) == expected
    TrainConfig(**method_overrides(label))  # every label makes a valid config


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="unknown method 'ppo'"):
        method_overrides("ppo")


def test_ablation_grid_matches_the_paper():
    labels = ablation_methods()
    assert labels[:2] == ["grpo", "pos_only"]
    assert {
        "nthr_beta=-inf",
        "nthr_beta=0",
        "nthr_beta=0.1",
        "nthr_beta=1",
        "nthr_eta=p",
        "nthr_eta=one_minus_p",
    } <= set(labels)


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


def test_summary_by_hand():
    results = pd.DataFrame(
        {
            "method": ["a", "a", "a"],
            "seed": [0, 1, 2],
            "accuracy": [0.5, 0.25, 0.75],
            "n_eval": [4, 4, 4],
            "train_reward_first5": 0.1,
            "train_reward_last5": 0.2,
            "lld_rate_mean": 0.3,
            "selected_frac_mean": math.nan,
        }
    )
    row = summarize(results).iloc[0]
    # 0.5, 0.25 and 0.75 are exact in binary, and so are their mean and (ddof=1) standard deviation
    assert row["accuracy_mean"] == 0.5
    assert row["accuracy_std"] == 0.25
    # mean + t·sd/sqrt(3), minus the mean again: one rounding at the scale of t95_high
    half = 4.303 * 0.25 / math.sqrt(3)
    eps = sys.float_info.epsilon
    atol = 2 * eps * row["t95_high"]
    assert row["t95_high"] - row["accuracy_mean"] == pytest.approx(half, rel=0.0, abs=atol)
    assert (row["pooled_k"], row["pooled_n"]) == (6, 12)


@pytest.mark.slow
def test_run_experiment_tiny(tmp_path, monkeypatch):
    monkeypatch.setenv("NTHR_BOOK_RUNS", str(tmp_path))
    monkeypatch.setattr(
        "nthr_book.trainer.default_reward_fn",
        lambda boxed: lambda c, a: [float(len(x) % 2 == 0) for x in c],
    )
    cfg = TrainConfig(
        model="tiny-random",
        num_problems=16,
        steps=2,
        prompts_per_step=2,
        group_size=4,
        max_new_tokens=4,
        lr=1e-3,
        kl_coef=0.0,
        checkpoint_every=1,
    )
    calls = []
    real_train = experiments.train
    monkeypatch.setattr(
        experiments, "train", lambda c, **kw: calls.append(c) or real_train(c, **kw)
    )
    res = run_experiment(
        "tiny",
        methods=("grpo", "nthr"),
        seeds=(0, 1),
        config=cfg,
        n_eval=4,
        eval_max_new_tokens=4,
        progress=False,
    )
    assert list(res["method"]) == ["base", "grpo", "grpo", "nthr", "nthr"]
    assert {c.method for c in calls} == {"grpo", "nthr"} and {c.seed for c in calls} == {0, 1}
    assert (tmp_path / "tiny" / "nthr" / "seed1" / "model" / "config.json").exists()
    assert (tmp_path / "tiny" / "summary.csv").exists() and res["accuracy"].between(0, 1).all()
    # per-run means of the metrics, read back from each run's metrics.csv
    exact = dict(rel=0.0, abs=0.0, nan_ok=True)  # the same mean of the same column: bit for bit
    for run in res[res.method != "base"].itertuples():
        metrics = pd.read_csv(f"{run.run_dir}/metrics.csv")
        assert run.lld_rate_mean == pytest.approx(metrics["lld/rate"].mean(), **exact)
        assert run.lld_delta_mean == pytest.approx(metrics["lld/delta_mean"].mean(), **exact)
        shared = metrics["negatives/shared_prefix"].mean()
        assert run.shared_prefix_mean == pytest.approx(shared, **exact)
    held = experiments.heldout_problems(cfg, 4)
    train_texts = {
        p["problem"] for s in range(3) for p in experiments.training_problems(cfg.replace(seed=s))
    }
    assert not {p["problem"] for p in held} & train_texts

    # A second call skips the finished runs (train returns at once) and reuses the eval records:
    # building a trainer or generating an answer now raises
    def no_work(*args, **kwargs):
        raise AssertionError("a second run_experiment must train and generate nothing")

    monkeypatch.setattr("nthr_book.trainer.GRPOTrainer", no_work)
    monkeypatch.setattr("nthr_book.evaluate.generate_groups", no_work)
    again = run_experiment(
        "tiny",
        methods=("grpo", "nthr"),
        seeds=(0, 1),
        config=cfg,
        n_eval=4,
        eval_max_new_tokens=4,
        progress=False,
    )
    pd.testing.assert_series_equal(res["accuracy"], again["accuracy"], check_exact=True)
    # n_eval=0: the same finished runs, no evaluation at all (no base row, no accuracy column)
    unevaluated = run_experiment(
        "tiny", methods=("grpo",), seeds=(0,), config=cfg, n_eval=0, progress=False
    )
    assert list(unevaluated["method"]) == ["grpo"] and "accuracy" not in unevaluated
    with pytest.raises(ValueError, match="n_eval must be an int >= 0"):
        run_experiment("tiny", methods=("grpo",), seeds=(0,), config=cfg, n_eval=-1)


def test_bootstrap_interval_matches_the_exact_bootstrap_distribution():
    # Seven distinct values: the exact bootstrap distribution of the median enumerates all 7^7
    # resamples. The seeded percentile interval must sit on the exact quantiles; we first check
    # that each quantile is far (> 5 Monte Carlo sd) from a jump of the exact CDF, so the check is
    # not luck.
    import itertools

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
