"""run_experiment: method labels, the t quantile, and a real (tiny) two-method two-seed
experiment."""

from __future__ import annotations

import math
import sys

import numpy as np
import pandas as pd
import pytest

from nthr_book import experiments
from nthr_book.experiments import (
    ablation_methods,
    method_overrides,
    run_experiment,
    summarize,
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
    # notebook 06 reads every run back question by question from the same records (no generation)
    correct, evaluated, problems = experiments.heldout_answers("tiny")
    assert problems == held
    assert set(evaluated) == {"base", "grpo/seed0", "grpo/seed1", "nthr/seed0", "nthr/seed1"}
    assert len(correct) == 5 * 4 and set(correct["correct"]) <= {0.0, 1.0}
    per_run = correct.groupby(["method", "seed"])["correct"].mean()
    for row in res.itertuples():  # the mean of the same 0/1 answers: equal to the last bit
        assert per_run[(row.method, row.seed)] == row.accuracy
    assert set(correct["question"]) == {p["id"] for p in held}
    # n_eval=0: the same finished runs, no evaluation at all (no base row, no accuracy column)
    unevaluated = run_experiment(
        "tiny", methods=("grpo",), seeds=(0,), config=cfg, n_eval=0, progress=False
    )
    assert list(unevaluated["method"]) == ["grpo"] and "accuracy" not in unevaluated
    with pytest.raises(ValueError, match="n_eval must be an int >= 0"):
        run_experiment("tiny", methods=("grpo",), seeds=(0,), config=cfg, n_eval=-1)
    with pytest.raises(ValueError, match="not evaluated on held-out questions"):
        experiments.heldout_answers("tiny")  # results.csv now holds the run without n_eval
    with pytest.raises(FileNotFoundError, match="run run_experiment"):
        experiments.heldout_answers("never_ran")
