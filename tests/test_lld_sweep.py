"""Tests for nthr_book.lld_sweep: Δ(x) over many questions and rules, and its summaries."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from torch.testing import assert_close

import nthr_book.rewards as rewards_mod
import nthr_book.rollout as rollout_mod
from nthr_book import lld
from nthr_book.groups import balanced_group, load_groups
from nthr_book.lld import one_step_displacement
from nthr_book.lld_sweep import displacement_summary, lld_experiment, paired_comparison

torch.set_num_threads(1)

EPS64 = torch.finfo(torch.float64).eps


@pytest.fixture(scope="module")
def tiny_policy():
    from nthr_book.models import load_policy

    return load_policy("tiny-random", device="cpu")


def _fake_grader(completions, golds, *, require_boxed=True, **kwargs):
    """ALL -> every response right, NONE -> every one wrong, otherwise even batch indices right."""
    return [
        1.0 if g == "ALL" else 0.0 if g == "NONE" else float(i % 2 == 0)
        for i, g in enumerate(golds)
    ]


PROBLEMS = [
    {"id": "a", "problem": "What is 1 + 1?", "answer": "2"},
    {"id": "b", "problem": "What is 2 + 2?", "answer": "ALL"},
    {"id": "c", "problem": "What is 3 + 3?", "answer": "6"},
    {"id": "d", "problem": "What is 4 + 4?", "answer": "NONE"},
]


def test_lld_experiment_rows_drops_and_reuses_saved_groups(
    tiny_policy, tmp_path, monkeypatch, capsys
):
    model, tokenizer = tiny_policy
    monkeypatch.setattr(rewards_mod, "math_rewards", _fake_grader)
    path = tmp_path / "groups.pt"
    kwargs = dict(
        methods=("random", "grpo", "pos_only", "nthr"),
        group_size=4,
        max_new_tokens=5,
        lr=1e-3,
        seed=11,
        beta=0.0,
        groups_path=path,
        progress=False,
    )
    df = lld_experiment(model, tokenizer, PROBLEMS, **kwargs)
    assert "4 questions" in capsys.readouterr().out
    assert list(df.columns) == list(lld.ROW_COLUMNS)
    assert len(df) == 2 * 4  # two mixed questions x four methods
    assert (df["grad_norm"] > 0).all()  # every rule took a step of some length
    assert df["id"].tolist() == ["a"] * 4 + ["c"] * 4
    assert (
        df["method"].tolist() == ["random", "grpo", "pos_only", "nthr"] * 2
    )  # the order asked for
    assert (df["n_correct"] == 2).all() and (df["p"] == 0.5).all()
    assert (df["seed"] == 11).all() and (df["lr"] == 1e-3).all()
    assert df.attrs["dropped"] == {"all_correct": ["b"], "all_wrong": ["d"]}
    for qid in ("a", "c"):
        rows = df[df["id"] == qid].set_index("method")
        assert rows.loc["random", "n_selected"] == rows.loc["nthr", "n_selected"]
        assert pd.isna(rows.loc["grpo", "n_selected"])
        per = rows.loc["grpo", "per_response_delta"]
        # a float64 mean of 2 terms: at most 2 roundings of values of size max|per|
        assert_close(
            rows.loc["grpo", "delta"], sum(per) / 2, rtol=0.0, atol=2 * EPS64 * max(map(abs, per))
        )
        assert (
            pd.isna(rows.loc["grpo", "tau"])
            and rows.loc["nthr", "tau"] == rows.loc["random", "tau"]
        )
    # the shared initial pass and selection give exactly what a standalone call gives
    group = next(g for g in load_groups(path) if g.question_id == "c")
    for method in ("grpo", "nthr", "random"):
        alone = one_step_displacement(model, group, update=method, lr=1e-3, beta=0.0, seed=11)
        row = df[(df["id"] == "c") & (df["method"] == method)].iloc[0]
        assert row["delta"] == alone.delta and row["per_response_delta"] == alone.per_response_delta
    assert path.is_file()

    def no_sampling(*args, **kw):
        raise AssertionError("generate_groups must not be called when groups_path exists")

    monkeypatch.setattr(rollout_mod, "generate_groups", no_sampling)
    again = lld_experiment(model, tokenizer, PROBLEMS, **kwargs)
    assert "loaded from" in capsys.readouterr().out
    pd.testing.assert_frame_equal(again, df, check_exact=True)  # the same groups, the same steps
    with pytest.raises(ValueError, match="groups file .*group_size"):
        lld_experiment(model, tokenizer, PROBLEMS, **(kwargs | {"group_size": 6}))


def test_lld_experiment_rejects_bad_methods(tiny_policy):
    model, tokenizer = tiny_policy
    with pytest.raises(ValueError, match="methods item"):
        lld_experiment(
            model, tokenizer, PROBLEMS, methods=("grpo", "dpo"), max_new_tokens=4, lr=0.1, seed=0
        )
    with pytest.raises(ValueError, match="duplicates"):
        lld_experiment(
            model, tokenizer, PROBLEMS, methods=("grpo", "grpo"), max_new_tokens=4, lr=0.1, seed=0
        )
    with pytest.raises(ValueError, match=r"problems\[1\].*answer"):
        lld_experiment(
            model,
            tokenizer,
            [PROBLEMS[0], {"id": "z", "problem": "?"}],
            max_new_tokens=4,
            lr=0.1,
            seed=0,
        )


def test_displacement_summary_hand_values():
    df = pd.DataFrame(
        {
            "id": ["a", "a", "b", "b", "c", "c"],
            "method": ["grpo", "pos_only"] * 3,
            "delta": [-0.2, 0.3, 0.1, 0.5, 0.0, 0.4],
            "per_response_delta": [[-0.2], [0.3], [0.1, 0.1], [0.5, 0.5], [0.0], [0.4]],
        }
    )
    s = displacement_summary(df)
    assert s.index.tolist() == ["grpo", "pos_only"]
    # the median's bootstrap interval is experiments.bootstrap_interval's (tested there); it holds
    # the median and lies within the values
    assert (s.median_low <= s.median_delta).all() and (s.median_delta <= s.median_high).all()
    assert s.loc["grpo", "median_low"] >= -0.2 and s.loc["pos_only", "median_high"] <= 0.5
    s = s.drop(columns=["median_low", "median_high"])
    tol = 4 * EPS64  # float64 means of 3 values below 1: 3 additions and a division, 4 roundings
    assert s.loc["grpo"].to_dict() == pytest.approx(
        {
            "n_questions": 3,
            "median_delta": 0.0,
            "mean_delta": (-0.2 + 0.1 + 0.0) / 3,
            "frac_delta_le_0": 2 / 3,
            "lld_rate": 2 / 4,
        },
        rel=0,
        abs=tol,
    )
    assert s.loc["pos_only"].to_dict() == pytest.approx(
        {
            "n_questions": 3,
            "median_delta": 0.4,
            "mean_delta": 0.4,
            "frac_delta_le_0": 0.0,
            "lld_rate": 0.0,
        },
        rel=0,
        abs=tol,
    )
    with pytest.raises(ValueError, match="delta"):
        displacement_summary(df.drop(columns="delta"))
    empty = displacement_summary(df.iloc[:0])  # every group dropped: an empty table, not an error
    assert len(empty) == 0 and "median_delta" in empty.columns


def test_paired_comparison_hand_values():
    df = pd.DataFrame(
        {
            "id": ["a", "a", "a", "b", "b", "b", "c", "c"],
            "method": ["grpo", "pos_only", "nthr", "grpo", "pos_only", "nthr", "grpo", "pos_only"],
            "delta": [-0.2, 0.3, -0.1, 0.5, 0.4, 0.6, 0.0, 0.1],
            "seed": [0] * 8,
        }
    )
    p = paired_comparison(df)
    assert p.index.tolist() == ["pos_only", "nthr"]
    # pos_only - grpo: 0.5, -0.1, 0.1 -> 2 of 3 above; nthr - grpo: 0.1, 0.1 (c has no nthr row)
    tol = 5 * EPS64  # float64 differences, then a median or mean of <= 3: <= 5 roundings below 1
    assert p.loc["pos_only"].to_dict() == pytest.approx(
        {"n_pairs": 3, "frac_above": 2 / 3, "median_diff": 0.1, "mean_diff": 0.5 / 3},
        rel=0,
        abs=tol,
    )
    assert p.loc["nthr"].to_dict() == pytest.approx(
        {"n_pairs": 2, "frac_above": 1.0, "median_diff": 0.1, "mean_diff": 0.1}, rel=0, abs=tol
    )
    # the same id under another seed is another question, not a duplicate
    two = pd.concat([df, df.assign(seed=1, delta=-df["delta"])])
    assert paired_comparison(two).loc["pos_only", "n_pairs"] == 6
    # 1 of 3 above: a ratio of small integers, exact
    assert paired_comparison(df, baseline="pos_only").loc["grpo", "frac_above"] == 1 / 3
    with pytest.raises(ValueError, match="baseline"):
        paired_comparison(df, baseline="random")
    with pytest.raises(ValueError, match="id"):
        paired_comparison(df.drop(columns="id"))


def test_lld_experiment_balance_uses_balanced_groups(tiny_policy, tmp_path, monkeypatch, capsys):
    model, tokenizer = tiny_policy
    monkeypatch.setattr(rewards_mod, "math_rewards", _fake_grader)
    kwargs = dict(
        methods=("grpo", "pos_only"),
        group_size=6,
        max_new_tokens=5,
        lr=1e-3,
        seed=3,
        groups_path=tmp_path / "groups.pt",
        progress=False,
    )
    df = lld_experiment(
        model, tokenizer, PROBLEMS, balance=2, **kwargs
    )  # the fake grader gives 3 of 6 right
    assert "2 mixed kept" in capsys.readouterr().out
    assert (df["group_size"] == 4).all() and (df["n_correct"] == 2).all()
    assert df.attrs["settings"]["balance"] == 2 and df.attrs["dropped"]["unbalanced"] == []
    group = next(g for g in load_groups(tmp_path / "groups.pt") if g.question_id == "a")
    alone = one_step_displacement(model, balanced_group(group, 2), update="grpo", lr=1e-3, seed=3)
    assert df[(df["id"] == "a") & (df["method"] == "grpo")].iloc[0]["delta"] == alone.delta
    with pytest.raises(ValueError, match="balance"):
        lld_experiment(model, tokenizer, PROBLEMS, balance=4, **kwargs)


def test_lld_experiment_balance_drops_groups_short_of_k(tiny_policy, monkeypatch, capsys):
    model, tokenizer = tiny_policy

    def one_right_for_c(
        completions, golds, **kwargs
    ):  # question c: a single right answer in its group
        return [
            float(i % 6 == 0) if g == "6" else r
            for i, (g, r) in enumerate(zip(golds, _fake_grader(completions, golds)))
        ]

    monkeypatch.setattr(rewards_mod, "math_rewards", one_right_for_c)
    df = lld_experiment(
        model,
        tokenizer,
        PROBLEMS,
        methods=("grpo",),
        group_size=6,
        max_new_tokens=5,
        lr=1e-3,
        seed=3,
        balance=2,
        progress=False,
    )
    assert df["id"].tolist() == ["a"] and df.attrs["dropped"]["unbalanced"] == ["c"]
    assert "1 more dropped with fewer than 2 right or wrong" in capsys.readouterr().out


def test_lld_experiment_runs_the_family(tiny_policy, monkeypatch):
    """Rules with their own settings (nthr_all's β) beside the experiment's; entropies shared."""
    model, tokenizer = tiny_policy
    monkeypatch.setattr(rewards_mod, "math_rewards", _fake_grader)
    methods = ("nthr", "nthr_all", "nsr", "high_entropy", "dr_grpo", "llds")
    df = lld_experiment(
        model,
        tokenizer,
        PROBLEMS,
        methods=methods,
        group_size=4,
        max_new_tokens=5,
        lr=1e-3,
        seed=11,
        beta=0.0,
        progress=False,
    )
    assert df["method"].tolist() == list(methods) * 2 and df["delta"].notna().all()
    rows = df[df["method"] == "nthr_all"]
    assert (rows["tau"] == -math.inf).all()
    assert (rows["n_selected"] == rows["n_incorrect_tokens"]).all()
    assert df.attrs["settings"]["rule_settings"]["nthr_all"] == {"nthr_beta": -math.inf}


def test_first_order_table_rows_are_the_two_measurements(tiny_policy, tmp_path, monkeypatch):
    model, tokenizer = tiny_policy
    monkeypatch.setattr(rewards_mod, "math_rewards", _fake_grader)
    df = lld_experiment(
        model,
        tokenizer,
        PROBLEMS,
        methods=("grpo",),
        group_size=4,
        max_new_tokens=5,
        lr=1e-3,
        seed=0,
        groups_path=tmp_path / "g.pt",
        progress=False,
    )
    mixed = [g for g in load_groups(tmp_path / "g.pt") if g.status == "mixed"]
    from nthr_book.lld_sweep import first_order_table

    table = first_order_table(model, mixed, lr=1e-3, progress=False)
    assert list(table["id"]) == [g.question_id for g in mixed]
    for g, row in zip(mixed, table.itertuples()):
        fo = lld.first_order_displacement(model, g, update="grpo", lr=1e-3)
        assert (row.predicted, row.right, row.wrong) == (fo.predicted, fo.right, fo.wrong)
        # the measured column is the sweep's GRPO Δ on the same group (same weights, same step)
        assert row.measured == df[(df["id"] == g.question_id)].iloc[0]["delta"]
        assert row.residual == row.measured - row.predicted
