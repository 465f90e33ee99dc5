"""run_experiment: method labels, the t quantile, and a real (tiny) two-method two-seed
experiment."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pandas as pd
import pytest

from nthr_book import experiments, stats
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
            "grad_norm_mean": [1.0, 2.0, 4.5],
        }
    )
    row = summarize(results).iloc[0]
    assert row["grad_norm_mean"] == 2.5 and "rule_penalty_mean" not in row  # (1 + 2 + 4.5) / 3
    # 0.5, 0.25 and 0.75 are exact in binary, and so are their mean and (ddof=1) standard deviation
    assert row["accuracy_mean"] == 0.5
    assert row["accuracy_std"] == 0.25
    # mean + t·sd/sqrt(3), minus the mean again: one rounding at the scale of t95_high
    half = 4.303 * 0.25 / math.sqrt(3)
    eps = sys.float_info.epsilon
    atol = 2 * eps * row["t95_high"]
    assert row["t95_high"] - row["accuracy_mean"] == pytest.approx(half, rel=0.0, abs=atol)
    assert (row["pooled_k"], row["pooled_n"]) == (6, 12)


def _tiny_parity_runs(monkeypatch, tmp_path) -> TrainConfig:
    """Runs under ``tmp_path`` on the tiny random model, an answer graded right when its length is
    even; returns the two-step config of these tests."""
    monkeypatch.setenv("NTHR_BOOK_RUNS", str(tmp_path))
    monkeypatch.setattr(
        "nthr_book.trainer.default_reward_fn",
        lambda boxed: lambda c, a: [float(len(x) % 2 == 0) for x in c],
    )
    return TrainConfig(
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


@pytest.mark.slow
def test_run_experiment_tiny(tmp_path, monkeypatch):
    cfg = _tiny_parity_runs(monkeypatch, tmp_path)
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
    # heldout.csv: each run's graded answer per question, read back from its evaluation records
    heldout = pd.read_csv(tmp_path / "tiny" / "heldout.csv")
    assert list(heldout.columns) == ["method", "seed", "question", "correct"] and len(heldout) == 20
    for (method, seed), answers in heldout.groupby(["method", "seed"]):
        label = "base" if method == "base" else f"{method}/seed{seed}"
        records = tmp_path / "tiny" / "eval" / label / "arithmetic_heldout.jsonl"
        graded = {
            r["id"]: int(r["correct"]) for r in map(json.loads, records.read_text().splitlines())
        }
        assert dict(zip(answers.question, answers.correct)) == graded
        run = res[(res.method == method) & (res.seed == seed)].iloc[0]
        assert run.accuracy == sum(graded.values()) / 4
    assert set(heldout[heldout.method == "base"].seed) == {-1}
    assert experiments.load_heldout("tiny").equals(heldout)
    saved = json.loads((tmp_path / "tiny" / "experiment.json").read_text())
    assert (saved["seeds"], saved["horizon"], saved["config"]["steps"]) == ([0, 1], 2, 2)
    assert "torch" in saved["versions"] and (res[res.method != "base"].horizon == 2).all()
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
    assert not (tmp_path / "tiny" / "heldout.csv").exists()  # no answers of these runs
    with pytest.raises(ValueError, match="n_eval must be an int >= 0"):
        run_experiment("tiny", methods=("grpo",), seeds=(0,), config=cfg, n_eval=-1)
    with pytest.raises(ValueError, match="not evaluated on held-out questions"):
        experiments.heldout_answers("tiny")  # results.csv now holds the run without n_eval
    with pytest.raises(FileNotFoundError, match="run run_experiment"):
        experiments.heldout_answers("never_ran")
    with pytest.raises(ValueError, match=r"horizon must be an int in \[1, steps=2\]"):
        run_experiment("tiny", methods=("grpo",), seeds=(0,), config=cfg, n_eval=0, horizon=3)
    # a shorter horizon reads the same finished runs over their first step only
    first = run_experiment(
        "tiny", methods=("grpo",), seeds=(0,), config=cfg, n_eval=0, horizon=1, progress=False
    ).iloc[0]
    metrics = pd.read_csv(f"{first.run_dir}/metrics.csv")
    assert first.horizon == 1 and first.grad_norm_mean == metrics["grad_norm"].iloc[0]


# ---------------------------------------------------------------------------------------------
# the per-run measures over a declared horizon
# ---------------------------------------------------------------------------------------------


def _metrics_table() -> pd.DataFrame:
    """Seven steps of hand-picked metrics (multiples of 1/8: every mean below is exact)."""
    return pd.DataFrame(
        {
            "step": range(7),
            "reward_mean": [0.0, 0.25, 0.5, 0.75, 1.0, 0.5, 0.125],
            "lld/delta_mean": [0.5, -0.25, math.nan, 0.25, 0.0, 1.0, 8.0],
            "lld/rate": [0.0, 1.0, math.nan, 0.5, 0.5, 0.0, 0.0],
            "nthr/selected_frac": [math.nan] * 7,
            "clip_frac_high": [0.0, 0.125, 0.0, 0.25, 0.0, 0.0, 1.0],
            "rule/penalty": [0.0, 0.5, 0.0, 0.0, 0.25, 0.0, 0.0],
            "grad_norm": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 70.0],
            "updates": [2.0, 2.0, 1.0, 2.0, 2.0, 1.0, 2.0],
        }
    )


def test_run_measures_over_the_horizon_by_hand():
    row = experiments.run_measures(_metrics_table(), horizon=6)  # steps 0..5; step 6 is unread
    assert row["horizon"] == 6
    assert row["train_reward_first5"] == (0.0 + 0.25 + 0.5 + 0.75 + 1.0) / 5  # steps 0-4
    assert row["train_reward_last5"] == (0.25 + 0.5 + 0.75 + 1.0 + 0.5) / 5  # steps 1-5
    # step 2 has no right answer in its update (NaN): the mean of the other five
    assert row["lld_delta_mean"] == (0.5 - 0.25 + 0.25 + 0.0 + 1.0) / 5
    assert row["lld_rate_mean"] == (0.0 + 1.0 + 0.5 + 0.5 + 0.0) / 5
    assert row["clip_frac_high_mean"] == 0.375 / 6 and row["rule_penalty_mean"] == 0.75 / 6
    assert row["grad_norm_mean"] == 21.0 / 6 and row["updates_mean"] == 10.0 / 6
    assert math.isnan(row["selected_frac_mean"])  # not an NTHR run
    assert "shared_prefix_mean" not in row  # a metric the run did not log is left out
    short = experiments.run_measures(_metrics_table(), horizon=2)
    assert short["lld_delta_mean"] == 0.125 and short["train_reward_last5"] == 0.125


@pytest.mark.parametrize("horizon", [0, 8, 2.5, True])
def test_run_measures_refuse_a_horizon_the_run_cannot_give(horizon):
    with pytest.raises(ValueError, match="horizon"):
        experiments.run_measures(_metrics_table(), horizon=horizon)


# ---------------------------------------------------------------------------------------------
# the declared comparison and its power
# ---------------------------------------------------------------------------------------------


def _pilot() -> tuple[pd.DataFrame, pd.DataFrame]:
    """Three seeds of two rules (results.csv) and their answers on four questions (heldout.csv)."""
    results = pd.DataFrame(
        {
            "method": ["base", "grpo", "grpo", "grpo", "nthr", "nthr", "nthr"],
            "seed": [-1, 0, 1, 2, 0, 1, 2],
            "lld_delta_mean": [math.nan, 0.0, 0.25, -0.25, 1.0, 1.0, 1.0],
            "lld_rate_mean": [math.nan, 0.5, 0.25, 0.75, 0.0, 0.25, 0.0],
        }
    )
    grpo_answers = {0: [1, 0, 1, 0], 1: [1, 1, 0, 0], 2: [0, 0, 0, 1]}
    nthr_answers = {0: [1, 1, 1, 0], 1: [1, 1, 1, 0], 2: [0, 0, 0, 1]}
    heldout = pd.DataFrame(
        [
            {"method": m, "seed": s, "question": f"q{q}", "correct": c}
            for m, answers in (("grpo", grpo_answers), ("nthr", nthr_answers))
            for s, row in answers.items()
            for q, c in enumerate(row)
        ]
        + [{"method": "base", "seed": -1, "question": f"q{q}", "correct": 1} for q in range(4)]
    )
    return results, heldout


def test_comparison_of_a_training_measure_by_hand():
    results, _ = _pilot()
    c = experiments.comparison(results, "lld_delta_mean", "nthr")
    # per seed NTHR − GRPO: 1, 0.75, 1.25 → mean 1, sd 0.25 (exact in binary)
    assert c["per_seed"] == [1.0, 0.75, 1.25] and c["seeds"] == 3 and c["estimate"] == 1.0
    half = 4.303 * 0.25 / math.sqrt(3)  # 0.62: the interval excludes 0
    assert c["low"] == pytest.approx(1.0 - half, abs=4 * EPS64) and c["resolved"]
    assert c["high"] == pytest.approx(1.0 + half, abs=4 * EPS64)
    assert c["value"] == 1.0 and c["value_baseline"] == 0.0
    assert c["verdict"] == stats.verdict(1.0, c["low"], c["high"])
    assert c["verdict"].endswith("resolved (above 0)") and "paired by seed" in c["test"]
    rate = experiments.comparison(results, "lld_rate", "nthr")
    assert rate["per_seed"] == [-0.5, 0.0, -0.75] and not rate["resolved"]  # t95 half-width 0.98
    with pytest.raises(ValueError, match="no 'pos_only' runs"):
        experiments.comparison(results, "lld_rate", "pos_only")
    with pytest.raises(ValueError, match="measure='reward'"):
        experiments.comparison(results, "reward", "nthr")


def test_comparison_of_accuracy_is_paired_by_question_and_seed():
    results, heldout = _pilot()
    c = experiments.comparison(results, "accuracy", "nthr", heldout=heldout)
    # discordant (seed, question) pairs: (0, q1) and (1, q2), both right for NTHR only
    assert (c["only_method"], c["only_baseline"]) == (2, 0)
    assert c["estimate"] == 2 / 12 and c["value"] == 7 / 12 and c["value_baseline"] == 5 / 12
    assert c["mcnemar_p"] == 0.5  # 2 · C(2, 0) / 2² = 0.5
    assert c["verdict"] == stats.verdict(2 / 12, c["low"], c["high"])
    assert "McNemar p = 0.5" in c["test"]
    with pytest.raises(ValueError, match="pass heldout="):
        experiments.comparison(results, "accuracy", "nthr")


def test_power_plan_by_hand():
    results, heldout = _pilot()
    plan = experiments.power_plan(results, "lld_delta_mean", "nthr", seeds=5)
    # per-seed differences 1, 0.75, 1.25: mean 1, sd 0.25
    assert (plan["pilot_diff"], plan["pilot_sd"], plan["pilot_pairs"]) == (1.0, 0.25, 3)
    z80 = 0.8416212335729143  # the 80% normal quantile
    assert plan["resolvable"] == pytest.approx((2.776 + z80) * 0.25 / math.sqrt(5), rel=8 * EPS64)
    # 3 seeds resolve (4.303 + z) · 0.25 / √3 = 0.74 <= 1; 2 seeds: (12.706 + z) · 0.25 / √2 = 2.4
    assert plan["seeds_needed"] == 3
    acc = experiments.power_plan(results, "accuracy", "nthr", seeds=3, heldout=heldout)
    # 12 (seed, question) differences: two 1s, ten 0s → mean 1/6, sd √((2·(5/6)² + 10·(1/6)²)/11)
    sd = math.sqrt((2 * (5 / 6) ** 2 + 10 * (1 / 6) ** 2) / 11)
    assert acc["pilot_pairs"] == 12 and acc["pairs"] == 12
    assert acc["pilot_sd"] == pytest.approx(sd, rel=16 * EPS64)
    t11 = stats.t975(11)
    assert acc["resolvable"] == pytest.approx((t11 + z80) * sd / math.sqrt(12), rel=64 * EPS64)
    # the pairs that resolve 1/6, then seeds of 4 questions: by the formula, searched by hand
    n = next(n for n in range(2, 10_000) if (stats.t975(n - 1) + z80) * sd / math.sqrt(n) <= 1 / 6)
    assert acc["seeds_needed"] == math.ceil(n / 4)
    with pytest.raises(ValueError, match="seeds must be an int >= 2"):
        experiments.power_plan(results, "lld_rate", "nthr", seeds=1)
    with pytest.raises(ValueError, match="heldout.csv"):
        experiments.power_plan(results, "accuracy", "nthr", seeds=3)


# ---------------------------------------------------------------------------------------------
# two updates per rollout batch: the controls that act once the policy has moved
# ---------------------------------------------------------------------------------------------


def test_two_updates_per_batch_separate_clip_higher_and_llds_from_grpo(tmp_path, monkeypatch):
    """With one fused update per batch every ratio is 1: Clip-Higher's wider clip never binds and
    LLDS's penalty is 0, so both reproduce GRPO's run number for number (the point of a one-update
    run). With two mini-batches the second one's ratios have moved: the upper clip binds, the
    penalty is non-zero, and the runs part from GRPO's."""
    monkeypatch.setenv("NTHR_BOOK_RUNS", str(tmp_path))
    # every group mixed: answers 0 and 2 of each group of 4 right
    monkeypatch.setattr(
        "nthr_book.trainer.default_reward_fn",
        lambda boxed: lambda c, a: [float(i % 2 == 0) for i in range(len(c))],
    )
    cfg = TrainConfig(
        model="tiny-random",
        num_problems=16,
        steps=2,
        prompts_per_step=2,
        group_size=4,
        max_new_tokens=6,
        lr=1e-2,
        kl_coef=0.0,
        checkpoint_every=0,
    )
    rules3 = ("grpo", "clip_higher", "llds")

    def runs(name, config):
        res = run_experiment(name, rules3, (0,), config, n_eval=0, progress=False)
        return res.set_index("method"), {
            m: pd.read_csv(f"{res.set_index('method').run_dir[m]}/metrics.csv") for m in rules3
        }

    def same_numbers(a: pd.DataFrame, b: pd.DataFrame) -> bool:
        cols = [c for c in a.columns if not c.startswith(("time_", "rule/")) and c in b]
        return a[cols].equals(b[cols])

    fused, fused_metrics = runs("fused", cfg)
    two, two_metrics = runs("two", cfg.replace(mini_batch_prompts=1))
    assert (fused.updates_mean == 1).all() and (two.updates_mean == 2).all()
    for m in ("clip_higher", "llds"):
        assert same_numbers(fused_metrics[m], fused_metrics["grpo"]), m
        assert not same_numbers(two_metrics[m], two_metrics["grpo"]), m
    assert (fused.clip_frac_high_mean == 0).all() and fused.rule_penalty_mean["llds"] == 0
    assert two.clip_frac_high_mean["clip_higher"] > 0  # ratios above 1.28 with A > 0
    assert two.rule_penalty_mean["llds"] > 0
    assert (two.grad_norm_mean > 0).all() and (fused.grad_norm_mean > 0).all()
    # the per-run rows are the metrics' means over the steps
    for m in rules3:
        assert two.grad_norm_mean[m] == two_metrics[m]["grad_norm"].mean()


# ---------------------------------------------------------------------------------------------
# accuracy over training steps (the paper's Figure 5)
# ---------------------------------------------------------------------------------------------


def _records(path) -> dict[str, str]:
    """id -> greedy completion, from one evaluation's records."""
    return {r["id"]: r["completion"] for r in map(json.loads, path.read_text().splitlines())}


@pytest.mark.slow
def test_accuracy_over_training_steps(tmp_path, monkeypatch):
    """eval_every evaluates the model each run has at that step, leaves the run as it would be
    without (the metrics bit for bit), and curve.csv holds the base model at step 0, every
    evaluated step and the final model, read back from the records on a second call."""
    cfg = _tiny_parity_runs(monkeypatch, tmp_path).replace(steps=3, lr=1e-2)
    kw = dict(methods=("grpo", "nthr"), seeds=(0,), config=cfg, n_eval=4, progress=False)
    kw |= {"eval_max_new_tokens": 4}
    curved = run_experiment("curved", eval_every=2, **kw)
    plain = run_experiment("plain", eval_every=0, **kw)
    for run_a, run_b in zip(curved.itertuples(), plain.itertuples()):
        if run_a.method != "base":  # the evaluation at step 2 changed nothing in the run
            a, b = (pd.read_csv(f"{r.run_dir}/metrics.csv") for r in (run_a, run_b))
            assert a.drop(columns=[c for c in a if c.startswith("time_")]).equals(
                b.drop(columns=[c for c in b if c.startswith("time_")])
            )
    assert not (tmp_path / "plain" / "curve.csv").exists()
    curve = experiments.load_curve("curved")
    assert list(curve.columns) == ["method", "seed", "step", "question", "correct"]
    assert sorted(curve.step.unique()) == [0, 2, 3] and len(curve) == 2 * 3 * 4
    heldout = experiments.load_heldout("curved")
    for method in ("grpo", "nthr"):
        at = {k: curve[(curve.method == method) & (curve.step == k)] for k in (0, 2, 3)}
        for k, answers in ((0, "base"), (3, method)):  # step 0: the base; the last: the final
            rows = heldout[heldout.method == answers]
            assert dict(zip(at[k].question, at[k].correct)) == dict(
                zip(rows.question, rows.correct)
            )
        # step 2 is the model a run of 2 steps ends with: its greedy answers, text for text
        short = run_experiment(
            f"short_{method}", **(kw | {"methods": (method,), "config": cfg.replace(steps=2)})
        )
        assert short.iloc[-1].method == method
        two_steps = _records(
            tmp_path / f"short_{method}" / "eval" / method / "seed0" / "arithmetic_heldout.jsonl"
        )
        mid = _records(
            tmp_path / "curved" / "eval" / method / "seed0" / "step2" / "arithmetic_heldout.jsonl"
        )
        assert mid == two_steps
    # accuracy per method, seed and step: the mean over the questions, by hand
    acc = experiments.curve_accuracy(curve)
    for row in acc.itertuples():
        graded = curve[(curve.method == row.method) & (curve.step == row.step)].correct
        assert row.accuracy == graded.sum() / 4
    # a second call reads the evaluated steps back; a step whose records are short is left out
    path = tmp_path / "curved" / "eval" / "nthr" / "seed0" / "step2" / "arithmetic_heldout.jsonl"
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:2]))
    with pytest.warns(UserWarning, match="2 of 4 questions evaluated"):
        run_experiment("curved", eval_every=2, **kw)
    again = experiments.load_curve("curved")
    assert set(again[again.method == "nthr"].step) == {0, 3}
    assert (
        again[again.method == "grpo"]
        .reset_index(drop=True)
        .equals(curve[curve.method == "grpo"].reset_index(drop=True))
    )
    with pytest.raises(ValueError, match="eval_every must be an int >= 0"):
        run_experiment("curved", eval_every=-1, **kw)


@pytest.mark.slow
def test_a_run_that_keeps_no_weights_is_evaluated_in_memory(tmp_path, monkeypatch):
    """save_model=False: no model/ on disk, the final model evaluated before it is dropped, answer
    for answer what the saved model gives; a second call reads the records back."""
    cfg = _tiny_parity_runs(monkeypatch, tmp_path)
    kw = dict(methods=("grpo",), seeds=(0,), n_eval=4, eval_max_new_tokens=4, progress=False)
    saved = run_experiment("saved", config=cfg, **kw)
    light = run_experiment("light", config=cfg.replace(save_model=False), **kw)
    run = tmp_path / "light" / "grpo" / "seed0"
    assert not (run / "model").exists() and (run / "finished.json").exists()
    assert (tmp_path / "saved" / "grpo" / "seed0" / "model").exists()
    records = [
        _records(tmp_path / name / "eval" / "grpo" / "seed0" / "arithmetic_heldout.jsonl")
        for name in ("saved", "light")
    ]
    assert records[0] == records[1]  # the same weights in memory as on disk: text for text
    pd.testing.assert_series_equal(saved["accuracy"], light["accuracy"], check_exact=True)

    def no_work(*args, **kwargs):
        raise AssertionError("a finished run that kept no weights is read back, not redone")

    with monkeypatch.context() as m:
        m.setattr("nthr_book.trainer.GRPOTrainer", no_work)
        m.setattr("nthr_book.evaluate.generate_groups", no_work)
        again = run_experiment("light", config=cfg.replace(save_model=False), **kw)
        # notebook 06 reads the runs back question by question from the records alone
        correct, evaluated, _ = experiments.heldout_answers("light")
    assert set(evaluated) == {"base", "grpo/seed0"}
    for row in light.itertuples():
        assert correct[correct.method == row.method]["correct"].mean() == row.accuracy
    pd.testing.assert_series_equal(light["accuracy"], again["accuracy"], check_exact=True)
    # its records cut short: the base weights must not answer for the trained ones
    path = tmp_path / "light" / "eval" / "grpo" / "seed0" / "arithmetic_heldout.jsonl"
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:2]))
    with pytest.raises(ValueError, match="finished without its model.*2 of 4 answers"):
        experiments.heldout_answers("light")
    with pytest.raises(ValueError, match="finished without its model.*2 of 4 answers"):
        run_experiment("light", config=cfg.replace(save_model=False), **kw)


def test_curve_differences_by_hand():
    """At step 1 rule a is right on 3 of 4 questions where grpo is right on 1 (a − grpo = 0.5 on
    one seed); at step 2 both answer alike (0, no interval away from 0); step 0 is left out."""
    rows = []
    for step, a, g in (
        (0, [0, 0, 1, 1], [0, 0, 1, 1]),
        (1, [1, 1, 1, 0], [0, 0, 1, 0]),
        (2, [1, 0, 1, 0], [1, 0, 1, 0]),
    ):
        for method, answers in (("a", a), ("grpo", g)):
            rows += [
                {"method": method, "seed": 0, "step": step, "question": f"q{i}", "correct": c}
                for i, c in enumerate(answers)
            ]
    diff = experiments.curve_differences(pd.DataFrame(rows), "a").set_index("step")
    assert list(diff.index) == [1, 2]
    assert diff.estimate[1] == 0.5 and diff.estimate[2] == 0.0
    assert diff.low[2] == 0.0 and diff.high[2] == 0.0 and not diff.resolved[2]
    assert 0.0 <= diff.low[1] <= 0.5 <= diff.high[1] <= 1.0
