"""Tests for nthr_book.evaluate: intervals, records and resume, settings checks, the results
table."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from nthr_book import evaluate as ev
from nthr_book.evaluate import (
    PAPER_BENCHMARKS,
    PAPER_TABLE2,
    RECORD_FIELDS,
    EvalResult,
    evaluate,
    evaluate_suite,
    results_table,
)
from nthr_book.io import read_jsonl
from nthr_book.models import load_policy
from nthr_book.stats import normal_interval, wilson_interval

TOKENS = 8  # max_new_tokens for the tiny model
EPS64 = 2.0**-52  # float64 machine epsilon: tolerances below are counts of its roundings


@pytest.fixture(scope="module")
def policy():
    """The tiny random model and the embedded tokenizer."""
    torch.set_num_threads(1)
    return load_policy("tiny-random", device="cpu")


def make_problems(n: int) -> list[dict]:
    """n problems with distinct ids and distinct gold answers."""
    return [
        {"id": f"p{i}", "problem": f"What is {i} + 1?", "answer": str(100 + i)} for i in range(n)
    ]


def fake_grader(
    correct_golds: set[str], *, correct_samples: set[int] | None = None, group_size: int = 1
):
    """A math_rewards stand-in: 1 for the listed golds (and, if given, only those sample
    indices)."""
    calls = []

    def grade(completions, golds, *, require_boxed=True):
        calls.append(list(golds))
        assert len(completions) == len(golds)
        return [
            float(
                g in correct_golds
                and (correct_samples is None or i % group_size in correct_samples)
            )
            for i, g in enumerate(golds)
        ]

    grade.calls = calls
    return grade


def counting_generate(monkeypatch):
    """Wrap generate_groups in the evaluate module and record the prompts of each call."""
    calls = []
    real = ev.generate_groups

    def wrapped(model, tokenizer, prompts, group_size, **kwargs):
        calls.append(list(prompts))
        return real(model, tokenizer, prompts, group_size, **kwargs)

    monkeypatch.setattr(ev, "generate_groups", wrapped)
    return calls


# ---------------------------------------------------------------------------------------------
# Intervals
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# evaluate: accuracy, records
# ---------------------------------------------------------------------------------------------


def test_pass1_accuracy_wilson_and_records(policy, tmp_path, monkeypatch):
    model, tok = policy
    grader = fake_grader({"101", "103"})
    monkeypatch.setattr(ev, "math_rewards", grader)
    res = evaluate(
        model,
        tok,
        make_problems(5),
        max_new_tokens=TOKENS,
        batch_size=2,
        out_dir=tmp_path,
        label="base",
        benchmark_name="toy",
        progress=False,
    )
    assert (res.n, res.n_samples, res.metric, res.ci_method) == (5, 1, "pass@1", "wilson")
    # a count over n, and the same interval function on the same counts: exact
    assert res.accuracy == 2 / 5
    assert (res.ci_low, res.ci_high) == wilson_interval(2, 5)
    assert res.per_problem == {"p0": 0.0, "p1": 1.0, "p2": 0.0, "p3": 1.0, "p4": 0.0}
    assert len(grader.calls) == 3  # batches of 2, 2, 1 problems
    assert res.records_path == tmp_path / "base" / "toy.jsonl"
    recs = read_jsonl(res.records_path)
    assert len(recs) == 5
    assert all(set(r) == set(RECORD_FIELDS) for r in recs)
    assert [r["id"] for r in recs] == [f"p{i}" for i in range(5)]
    assert [r["correct"] for r in recs] == [False, True, False, True, False]
    assert all(r["gold"] == str(100 + i) and r["sample"] == 0 for i, r in enumerate(recs))
    assert all("What is" in r["prompt"] and isinstance(r["completion"], str) for r in recs)
    assert 0.0 <= res.truncated <= 1.0
    assert res.truncated == sum(r["truncated"] for r in recs) / 5  # a count over n: exact
    side = json.loads((tmp_path / "base" / "toy.settings.json").read_text())
    assert side["settings"]["max_new_tokens"] == TOKENS and side["settings"]["label"] == "base"
    assert "torch" in side["versions"]
    row = res.as_row()
    # percentages: one product or quotient each, one rounding
    assert row["accuracy_pct"] == pytest.approx(40.0, rel=EPS64, abs=0.0)
    assert row["points_per_problem"] == pytest.approx(20.0, rel=EPS64, abs=0.0)


def test_correct_means_reward_above_one_half(policy, tmp_path, monkeypatch):
    """Like the trainer and lld (reward > 0.5): a reward of exactly 0.5 is not a right answer."""
    model, tok = policy
    rewards = [0.5, 1.0, 0.0]
    monkeypatch.setattr(ev, "math_rewards", lambda completions, golds, **_: rewards[: len(golds)])
    res = evaluate(
        model,
        tok,
        make_problems(3),
        max_new_tokens=2,
        batch_size=3,
        out_dir=tmp_path,
        benchmark_name="toy",
        progress=False,
    )
    assert [r["correct"] for r in read_jsonl(res.records_path)] == [False, True, False]
    assert res.per_problem == {"p0": 0.0, "p1": 1.0, "p2": 0.0}


def test_avg_at_k_per_sample_records_and_normal_interval(policy, tmp_path, monkeypatch):
    model, tok = policy
    # problems 101 and 102 are solved by sample 0 only: per-problem means 0, .5, .5, 0, 0
    monkeypatch.setattr(
        ev, "math_rewards", fake_grader({"101", "102"}, correct_samples={0}, group_size=2)
    )
    res = evaluate(
        model,
        tok,
        make_problems(5),
        n_samples=2,
        temperature=1.0,
        max_new_tokens=TOKENS,
        batch_size=3,
        out_dir=tmp_path,
        benchmark_name="toy",
        progress=False,
    )
    assert res.metric == "avg@2" and res.ci_method == "normal"
    # per-problem means 0.5, 0.5, 0, 0, 0 (exact halves): their mean is 1/5, rounded once
    assert res.accuracy == 1 / 5
    assert (res.ci_low, res.ci_high) == normal_interval([0.5, 0.5, 0, 0, 0])
    recs = read_jsonl(res.records_path)
    assert len(recs) == 10
    assert sorted((r["id"], r["sample"]) for r in recs) == [
        (f"p{i}", s) for i in range(5) for s in range(2)
    ]
    assert sum(r["correct"] for r in recs) == 2


def test_avg_at_k_all_or_nothing_uses_wilson(policy, tmp_path, monkeypatch):
    model, tok = policy
    monkeypatch.setattr(ev, "math_rewards", fake_grader({"100"}))
    res = evaluate(
        model,
        tok,
        make_problems(3),
        n_samples=2,
        temperature=1.0,
        max_new_tokens=TOKENS,
        batch_size=3,
        out_dir=tmp_path,
        benchmark_name="toy",
        progress=False,
    )
    assert res.ci_method == "wilson" and res.accuracy == 1 / 3  # a count over n: exact
    assert (res.ci_low, res.ci_high) == wilson_interval(1, 3)


def test_benchmark_by_name_goes_through_load_benchmark(policy, tmp_path, monkeypatch):
    import datasets

    model, tok = policy
    asked = []

    def fake_load(name, data_dir=None):
        asked.append((name, data_dir))
        return datasets.Dataset.from_list(make_problems(6))

    monkeypatch.setattr(ev, "load_benchmark", fake_load)
    monkeypatch.setattr(ev, "math_rewards", fake_grader(set()))
    res = evaluate(
        model,
        tok,
        "gsm8k",
        max_new_tokens=TOKENS,
        batch_size=4,
        limit=2,
        out_dir=tmp_path,
        label="x",
        data_dir=tmp_path,
        progress=False,
    )
    assert asked == [("gsm8k", tmp_path)]
    assert res.benchmark == "gsm8k" and res.n == 2 and res.accuracy == 0.0
    assert res.records_path == tmp_path / "x" / "gsm8k.jsonl"


def test_evaluate_suite_loads_each_model_once_and_skips_unreachable(policy, tmp_path, monkeypatch):
    from nthr_book.data import DataNotAvailableError

    model, tok = policy
    loads = []

    def load(source):
        loads.append(source)
        return model, tok

    def fake_load_benchmark(name, data_dir=None):
        if name == "aime24":
            raise DataNotAvailableError("aime24 is not here")
        return make_problems(3)

    monkeypatch.setattr(ev, "load_benchmark", fake_load_benchmark)
    monkeypatch.setattr(ev, "math_rewards", fake_grader({"100"}))
    lines: list[str] = []
    results = evaluate_suite(
        {"base": "m0", "grpo": "m1"},
        ["aime24", "gsm8k"],
        load=load,
        log=lines.append,
        max_new_tokens=TOKENS,
        batch_size=4,
        out_dir=tmp_path,
        progress=False,
    )
    assert loads == ["m0", "m1"]
    assert [(r.label, r.benchmark) for r in results] == [("base", "gsm8k"), ("grpo", "gsm8k")]
    assert all(r.n == 3 and r.accuracy == 1 / 3 for r in results)  # a count over n: exact
    assert sum(line.startswith("aime24: skipped") for line in lines) == 1, (
        "said once, not once per model"
    )
    assert sum("gsm8k" in line for line in lines) == 2
    assert (tmp_path / "grpo" / "gsm8k.jsonl").exists()

    mine = evaluate_suite(
        {"x": "m2"},
        {"mine": make_problems(2)},
        load=load,
        log=None,
        max_new_tokens=TOKENS,
        batch_size=4,
        out_dir=tmp_path,
        progress=False,
    )
    assert [(r.label, r.benchmark, r.n) for r in mine] == [("x", "mine", 2)]
    assert (tmp_path / "x" / "mine.jsonl").exists()


# ---------------------------------------------------------------------------------------------
# Resume
# ---------------------------------------------------------------------------------------------


def test_resume_after_interruption_generates_only_missing(policy, tmp_path, monkeypatch):
    model, tok = policy
    problems = make_problems(6)
    kw = dict(max_new_tokens=TOKENS, batch_size=2, limit=4, benchmark_name="toy", progress=False)
    monkeypatch.setattr(ev, "math_rewards", fake_grader({"100", "103"}))
    full = evaluate(model, tok, problems, out_dir=tmp_path / "full", **kw)
    assert full.accuracy == 2 / 4

    # Interrupted run: the grader of the second batch raises, so only batch 1 (p0, p1) is on disk.
    good = fake_grader({"100", "103"})

    def dies_on_second_call(completions, golds, *, require_boxed=True):
        if good.calls:
            raise KeyboardInterrupt
        return good(completions, golds, require_boxed=require_boxed)

    monkeypatch.setattr(ev, "math_rewards", dies_on_second_call)
    with pytest.raises(KeyboardInterrupt):
        evaluate(model, tok, problems, out_dir=tmp_path / "resumed", **kw)
    path = tmp_path / "resumed" / "model" / "toy.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    assert len(lines) == 2
    # ... plus a torn half line, as if the kill came in the middle of an append of p2
    torn = json.dumps({"id": "p2", "sample": 0, "prompt": "x", "completion": "y"})
    path.write_text("".join(lines) + torn[: len(torn) // 2])

    calls = counting_generate(monkeypatch)
    monkeypatch.setattr(ev, "math_rewards", fake_grader({"100", "103"}))
    res = evaluate(model, tok, problems, out_dir=tmp_path / "resumed", **kw)
    generated = [p for call in calls for p in call]
    assert len(calls) == 1 and len(generated) == 2
    assert "What is 2 + 1?" in generated[0] and "What is 3 + 1?" in generated[1]
    assert res.accuracy == full.accuracy and res.per_problem == full.per_problem
    assert (res.ci_low, res.ci_high) == (full.ci_low, full.ci_high)
    recs = read_jsonl(path)  # strict read: the torn line is gone, every line is valid
    assert [r["id"] for r in recs] == ["p0", "p1", "p2", "p3"]
    full_recs = read_jsonl(full.records_path)
    assert [r["completion"] for r in recs] == [
        r["completion"] for r in full_recs
    ]  # greedy: same text

    # A second rerun has nothing left to do; a larger limit generates only the new problems.
    calls.clear()
    evaluate(model, tok, problems, out_dir=tmp_path / "resumed", **kw)
    assert calls == []
    res6 = evaluate(model, tok, problems, out_dir=tmp_path / "resumed", **(kw | {"limit": None}))
    assert [len(c) for c in calls] == [2] and res6.n == 6 and res6.accuracy == 2 / 6
    assert len(read_jsonl(path)) == 6


def test_resume_fills_missing_samples_of_a_problem(policy, tmp_path, monkeypatch):
    model, tok = policy
    monkeypatch.setattr(ev, "math_rewards", fake_grader(set()))
    kw = dict(
        n_samples=2,
        temperature=1.0,
        max_new_tokens=TOKENS,
        batch_size=2,
        out_dir=tmp_path,
        benchmark_name="toy",
        progress=False,
    )
    res = evaluate(model, tok, make_problems(2), **kw)
    path = res.records_path
    recs = read_jsonl(path)
    kept = [r for r in recs if not (r["id"] == "p1" and r["sample"] == 1)]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    calls = counting_generate(monkeypatch)
    evaluate(model, tok, make_problems(2), **kw)
    assert len(calls) == 1 and len(calls[0]) == 1 and "What is 1 + 1?" in calls[0][0]
    after = read_jsonl(path)
    assert (
        len(after) == 4 and after[:3] == kept and (after[3]["id"], after[3]["sample"]) == ("p1", 1)
    )


def test_changed_settings_raise(policy, tmp_path, monkeypatch):
    model, tok = policy
    monkeypatch.setattr(ev, "math_rewards", fake_grader(set()))
    kw = dict(batch_size=2, out_dir=tmp_path, benchmark_name="toy", progress=False)
    evaluate(model, tok, make_problems(2), max_new_tokens=TOKENS, **kw)
    with pytest.raises(ValueError, match=r"max_new_tokens: 8 on disk vs 9 now"):
        evaluate(model, tok, make_problems(2), max_new_tokens=TOKENS + 1, **kw)
    with pytest.raises(ValueError, match="template"):
        evaluate(model, tok, make_problems(2), max_new_tokens=TOKENS, template="plain", **kw)
    # batch_size and limit may change
    evaluate(model, tok, make_problems(2), max_new_tokens=TOKENS, **(kw | {"batch_size": 1}))
    # the data changed under the same ids
    changed = make_problems(2)
    changed[1]["answer"] = "7"
    with pytest.raises(ValueError, match=r"record 2 \(id 'p1'\) has gold '101'"):
        evaluate(model, tok, changed, max_new_tokens=TOKENS, **kw)
    # records without their settings file
    (tmp_path / "model" / "toy.settings.json").unlink()
    with pytest.raises(ValueError, match="settings file .* is missing"):
        evaluate(model, tok, make_problems(2), max_new_tokens=TOKENS, **kw)


def test_bad_inputs_raise(policy, tmp_path):
    model, tok = policy
    kw = dict(max_new_tokens=TOKENS, batch_size=2, out_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="row 1: needs keys"):
        evaluate(
            model, tok, [{"id": 1, "problem": "a", "answer": "1"}, {"id": 2, "problem": "b"}], **kw
        )
    with pytest.raises(ValueError, match="duplicate id '1'"):
        evaluate(model, tok, [{"id": 1, "problem": "a", "answer": "1"}] * 2, **kw)
    with pytest.raises(ValueError, match="n_samples"):
        evaluate(model, tok, make_problems(1), n_samples=0, **kw)
    with pytest.raises(ValueError, match="label"):
        evaluate(model, tok, make_problems(1), label="../x", **kw)


# ---------------------------------------------------------------------------------------------
# Paper table and results table
# ---------------------------------------------------------------------------------------------


def test_paper_table2_transcription():
    assert list(PAPER_TABLE2.columns) == ["model", "method", *PAPER_BENCHMARKS, "avg"]
    assert len(PAPER_TABLE2) == 11
    means = PAPER_TABLE2[list(PAPER_BENCHMARKS)].mean(axis=1)
    # the paper's avg is the mean of its five printed values, printed with 2 decimals: half a unit
    # of the last one (plus the float64 mean's few roundings of numbers below 100)
    printed = 0.005 + 8 * EPS64 * 100
    np.testing.assert_allclose(
        means.to_numpy(), PAPER_TABLE2["avg"].to_numpy(), rtol=0, atol=printed
    )
    nthr = PAPER_TABLE2[
        (PAPER_TABLE2["model"] == "Qwen2.5-3B") & (PAPER_TABLE2["method"] == "NTHR")
    ]
    assert nthr[["amc23", "avg"]].to_numpy().tolist() == [[47.5, 36.30]]


def fake_result(label: str, benchmark: str, k: int, n: int) -> EvalResult:
    low, high = wilson_interval(k, n)
    return EvalResult(
        benchmark=benchmark,
        n=n,
        n_samples=1,
        accuracy=k / n,
        ci_low=low,
        ci_high=high,
        records_path=None,
        label=label,
    )


def test_results_table_layout_and_numbers():
    sizes = {"aime24": 30, "amc23": 40, "math500": 20, "minerva_math": 10, "olympiadbench": 8}
    correct = {"aime24": 0, "amc23": 2, "math500": 8, "minerva_math": 1, "olympiadbench": 2}
    results = [fake_result("grpo", b, correct[b], n) for b, n in sizes.items()]
    results.append(fake_result("nthr", "math500", 9, 20))  # only one benchmark: no avg
    results.append(fake_result("grpo", "gsm8k", 1, 4))  # not a paper benchmark: extra column
    num = results_table(results, numeric=True)
    assert list(num.columns) == [*PAPER_BENCHMARKS, "gsm8k", "avg"]
    assert list(num.index) == [
        ("paper", "base"),
        ("paper", "GRPO"),
        ("paper", "NTHR"),
        ("ours", "grpo"),
        ("ours", "nthr"),
        ("noise", "1 problem = pts"),
    ]
    assert num.index.names == ["source", "method"]
    # ours: 0/30, 2/40, 8/20, 1/10, 2/8 -> 0, 5, 40, 10, 25 %, avg 16
    grpo = num.loc[("ours", "grpo")]
    pct = dict(rel=2 * EPS64, abs=0.0)  # 100 · k / n: a quotient and a product, two roundings
    assert grpo[list(PAPER_BENCHMARKS)].tolist() == pytest.approx(
        [0.0, 5.0, 40.0, 10.0, 25.0], **pct
    )
    # the avg adds 5 such percentages and divides: 8 roundings
    assert grpo["avg"] == pytest.approx(16.0, rel=8 * EPS64, abs=0.0)
    assert grpo["gsm8k"] == pytest.approx(25.0, **pct)
    nthr = num.loc[("ours", "nthr")]
    assert (
        nthr["math500"] == pytest.approx(45.0, **pct)
        and math.isnan(nthr["avg"])
        and math.isnan(nthr["aime24"])
    )
    assert (
        num.loc[("paper", "NTHR")]["math500"] == 36.6 and num.loc[("paper", "GRPO")]["avg"] == 11.72
    )
    assert math.isnan(num.loc[("paper", "base")]["gsm8k"])
    noise = num.loc[("noise", "1 problem = pts")]
    assert noise[
        ["aime24", "amc23", "math500", "minerva_math", "olympiadbench", "gsm8k"]
    ].tolist() == [100 / 30, 2.5, 5.0, 10.0, 12.5, 25.0]  # 100 / n: one rounding, as here
    assert num.attrs["points_per_problem"]["amc23"] == 100 / 40

    txt = results_table(results)
    lo, hi = wilson_interval(8, 20)
    assert txt.loc[("ours", "grpo"), "math500"] == f"40.0 [{100 * lo:.1f}, {100 * hi:.1f}]"
    assert txt.loc[("ours", "grpo"), "olympiadbench"] == "25.0 [7.1, 59.1]"  # Wilson 2/8 by hand
    assert txt.loc[("ours", "grpo"), "avg"] == "16.00"
    assert txt.loc[("ours", "nthr"), "avg"] == "" and txt.loc[("paper", "NTHR"), "avg"] == "12.66"
    assert txt.loc[("paper", "base"), "amc23"] == "2.5"
    assert txt.loc[("noise", "1 problem = pts"), "aime24"] == "3.33"


def test_results_table_options_and_errors():
    # without our results the noise row uses the full benchmark sizes
    num = results_table([], paper_model="Qwen2.5-Math-1.5B", numeric=True)
    assert [m for s, m in num.index if s == "paper"] == ["base", "GRPO", "Pos Only", "NTHR"]
    assert num.loc[("noise", "1 problem = pts")]["olympiadbench"] == 100 / 675
    only_ours = results_table([fake_result("a", "amc23", 1, 4)], paper_model=None)
    assert list(only_ours.index) == [("ours", "a"), ("noise", "1 problem = pts")]
    with pytest.raises(ValueError, match="not in PAPER_TABLE2"):
        results_table([], paper_model="GPT-9")
    with pytest.raises(ValueError, match="both label 'a' on 'amc23'"):
        results_table([fake_result("a", "amc23", 1, 4), fake_result("a", "amc23", 2, 4)])
    assert isinstance(results_table([]), pd.DataFrame)
