"""Tests of the regime map (nthr_book.regime) and its resemblance measures: hand values on tiny
tables, and one small map on a tiny random model."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from nthr_book import regime
from nthr_book.groups import Group
from nthr_book.similarity import shared_prefix_mask, shared_prefix_share

EPS64 = float(np.finfo(np.float64).eps)


def test_shared_prefix_share_by_hand():
    rows = [[1, 2, 3, 4], [1, 2, 9], [1, 2, 3, 7], [5, 6]]  # right, right, wrong, wrong
    ids = torch.tensor([r + [0] * (4 - len(r)) for r in rows])  # (4, 4) right-padded
    mask = torch.tensor([[1] * len(r) + [0] * (4 - len(r)) for r in rows]).bool()
    correct = torch.tensor([True, True, False, False])
    # wrong 1: 3 tokens shared with the first right answer of its 4 -> 3/4; wrong 2: none -> 0
    assert shared_prefix_share(ids, mask, correct) == (3 / 4 + 0) / 2
    assert math.isnan(shared_prefix_share(ids, mask, torch.ones(4, dtype=torch.bool)))
    assert math.isnan(shared_prefix_share(ids, mask, torch.zeros(4, dtype=torch.bool)))
    with pytest.raises(ValueError, match="must be"):
        shared_prefix_share(ids, mask[:, :2], correct)
    # the same prefix token by token: wrong 1's first three tokens, nothing of wrong 2 or the rights
    shared = shared_prefix_mask(ids, mask, correct)
    assert shared.tolist() == [[False] * 4, [False] * 4, [True, True, True, False], [False] * 4]
    left = torch.tensor([[0, 1, 2, 3], [0, 1, 2, 9], [7, 1, 2, 5], [0, 0, 5, 6]])  # left-padded
    lmask = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 1], [0, 1, 1, 1], [0, 0, 1, 1]]).bool()
    # wrong [1, 2, 5] shares [1, 2] with both right answers: its 2nd and 3rd positions
    assert shared_prefix_mask(left, lmask, correct)[2].tolist() == [False, True, True, False]


def _average_ranks(values: list[float]) -> list[float]:
    """1-based ranks, ties sharing the mean of theirs, by sorting (independent of the library)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def test_spearman_is_pearson_of_average_ranks():
    a = [0.3, 0.1, 0.1, 0.9, 0.5, 0.5, 0.5]
    b = [2.0, 1.0, 3.0, 7.0, 7.0, 0.0, 4.0]
    ra, rb = np.array(_average_ranks(a)), np.array(_average_ranks(b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    by_hand = float((ra * rb).sum() / math.sqrt((ra**2).sum() * (rb**2).sum()))
    got = float(regime.spearman(np.stack([a, b], 1), axis=0))
    # sums of 7 products of ranks <= 7: a few dozen roundings at the scale of the sums (< 100)
    assert got == pytest.approx(by_hand, abs=64 * EPS64 * 100)
    batch = regime.spearman(np.stack([np.stack([a, b], 1)] * 3), axis=1)  # (3,) the same thrice
    np.testing.assert_array_equal(batch, [got] * 3)
    assert float(regime.spearman(np.stack([a, a], 1), axis=0)) == pytest.approx(1.0, abs=8 * EPS64)


def _map_table() -> pd.DataFrame:
    """Two conditions, three questions, three rules; Δ values chosen by hand."""
    rows = []
    deltas = {
        ("f=0.00", "grpo"): [0.4, 0.2, 0.6],
        ("f=0.00", "pos_only"): [0.2, 0.1, 0.4],
        ("f=0.00", "nthr"): [0.5, 0.3, 0.6],
        ("near-miss", "grpo"): [0.1, -0.1, 0.05],
        ("near-miss", "pos_only"): [0.2, 0.1, 0.4],
        ("near-miss", "nthr"): [0.3, 0.0, 0.2],
    }
    gwhes = {"f=0.00": [1.0, 2.0, 3.0], "near-miss": [5.0, 9.0, 7.0]}
    for (cond, method), values in deltas.items():
        for q, d in enumerate(values):
            rows.append(
                {
                    "id": f"q{q}" if cond == "f=0.00" else f"q{q}/near-miss",
                    "question": f"q{q}",
                    "negatives": cond,
                    "fraction": 0.0 if cond == "f=0.00" else math.nan,
                    "method": method,
                    "delta": d,
                    "per_response_delta": [d, d - 0.15],
                    "n_selected": 2 if method == "nthr" else None,
                    "n_incorrect_tokens": 8,
                    "group_size": 4 if cond == "f=0.00" else 3 + q % 2,
                    "gwhes": gwhes[cond][q],
                    "shared_prefix": 0.1 if cond == "f=0.00" else 0.9,
                }
            )
    return pd.DataFrame(rows)


def test_regime_summary_by_hand():
    s = regime.regime_summary(_map_table()).set_index(["negatives", "method"])
    near = s.loc[("near-miss", "grpo")]
    assert near.n_questions == 3 and near.median_delta == 0.05
    assert near.mean_group_size == (3 + 4 + 3) / 3  # group sizes 3, 4, 3: one slot dropped twice
    assert near.median_low <= 0.05 <= near.median_high
    # ratio of medians to Pos Only on the same questions: 0.05 / 0.2 (one division)
    assert near.ratio_to_pos_only == pytest.approx(0.05 / 0.2, rel=2 * EPS64)
    assert near.frac_delta_le_0 == 1 / 3
    # per-response Δ: (0.1, -0.05), (-0.1, -0.25), (0.05, -0.1): 4 of 6 are <= 0
    assert near.lld_rate == 4 / 6
    assert s.loc[("near-miss", "nthr")].spared_share == 6 / 24  # 3 groups × 2 of 8 tokens
    assert math.isnan(near.spared_share)  # GRPO spares nothing by construction
    assert s.loc[("f=0.00", "pos_only")].ratio_to_pos_only == 1.0
    assert near.gwhes == 7.0 and near.shared_prefix == 0.9
    assert list(s.index.get_level_values(0).unique()) == ["f=0.00", "near-miss"]  # map order


def test_delta_per_step_by_hand():
    """Δ / (lr · grad_norm) per question, its median per rule, and that over Pos Only's: a rule
    whose step is twice as long with the same Δ rises half as much per unit of step."""
    table = _map_table().assign(lr=0.5)
    # grad norms per question: GRPO 1, 2, 4; Pos Only 2 on every question; NTHR 1, 1, 1
    norms = {"grpo": [1.0, 2.0, 4.0], "pos_only": [2.0, 2.0, 2.0], "nthr": [1.0, 1.0, 1.0]}
    table["grad_norm"] = [norms[m][int(q[1])] for m, q in zip(table.method, table.question)]
    s = regime.regime_summary(table, n_boot=200).set_index(["negatives", "method"])
    # near-miss GRPO: 0.1 / 0.5, −0.1 / 1, 0.05 / 2 = 0.2, −0.1, 0.025 → median 0.025
    grpo = s.loc[("near-miss", "grpo")]
    assert grpo.delta_per_step == pytest.approx(0.05 / 2.0, rel=2 * EPS64)
    # Pos Only: 0.2, 0.1, 0.4 over 0.5·2 = 1 → median 0.2; the ratio 0.025 / 0.2
    pos = s.loc[("near-miss", "pos_only")]
    assert pos.delta_per_step == pytest.approx(0.2, rel=2 * EPS64)
    assert grpo.per_step_ratio_to_pos_only == pytest.approx(0.025 / 0.2, rel=4 * EPS64)
    assert pos.per_step_ratio_to_pos_only == 1.0
    # the paired test at equal step length: per question (0.2 − 0.2, −0.1 − 0.1, 0.025 − 0.4)
    assert grpo.step_diff_mean == pytest.approx((0.0 - 0.2 - 0.375) / 3, rel=8 * EPS64)
    assert grpo.step_diff_low <= grpo.step_diff_mean <= grpo.step_diff_high
    assert math.isnan(pos.step_diff_mean)  # the baseline against itself
    # NTHR at f = 0: 0.5, 0.3, 0.6 over 0.5 → median 1.0; Pos Only: 0.2, 0.1, 0.4 → 0.2
    assert s.loc[("f=0.00", "nthr")].delta_per_step == pytest.approx(1.0, rel=2 * EPS64)
    assert s.loc[("f=0.00", "nthr")].per_step_ratio_to_pos_only == pytest.approx(5.0, rel=4 * EPS64)
    # the raw ratio is unchanged: median Δ over Pos Only's, 0.05 / 0.2
    assert grpo.ratio_to_pos_only == pytest.approx(0.05 / 0.2, rel=2 * EPS64)
    assert "delta_per_step" not in regime.regime_summary(_map_table(), n_boot=200)


def test_gwhes_ranking_by_hand():
    table = _map_table()
    out = regime.gwhes_ranking(table, k=2)
    # six groups: gap = Δ_GRPO − Δ_PosOnly and GWHES per group
    # (the differences in float64, as the table's: 0.6 - 0.4 is not 0.4 - 0.2 to the bit)
    gap = [0.4 - 0.2, 0.2 - 0.1, 0.6 - 0.4, 0.1 - 0.2, -0.1 - 0.1, 0.05 - 0.4]
    score = [1.0, 2.0, 3.0, 5.0, 9.0, 7.0]
    rg, rs = np.array(_average_ranks(gap)), np.array(_average_ranks(score))
    rg, rs = rg - rg.mean(), rs - rs.mean()
    rho = float((rg * rs).sum() / math.sqrt((rg**2).sum() * (rs**2).sum()))
    assert out["n_groups"] == 6 and out["k"] == 2
    assert out["spearman"] == pytest.approx(rho, abs=64 * EPS64 * 100)
    assert out["spearman_low"] <= out["spearman"] <= out["spearman_high"]
    # lazy = −gap: top 2 are the near-miss q2 (0.35) and q1 (0.2); GWHES's top 2: q1 (9), q2 (7)
    assert out["topk_overlap"] == 1.0 and out["random_overlap"] == 2 / 6


@pytest.fixture(scope="module")
def tiny_policy():
    from nthr_book.models import load_policy

    return load_policy("tiny-random", device="cpu")


def _mixed_group(tok, question_id: str) -> Group:
    def enc(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]

    answers = ["2 + 3 = 5. So \\boxed{5}.", "no idea", "It is \\boxed{5}.", "\\boxed{6}"]
    return Group.from_token_lists(
        enc("What is 2 + 3?"),
        [enc(a) for a in answers],
        [1.0, 0.0, 1.0, 0.0],
        pad_id=tok.pad_token_id,
        question_id=question_id,
        answer="5",
        problem="What is 2 + 3?",
        texts=answers,
    )


def test_regime_map_runs_every_condition_on_the_same_questions(tiny_policy):
    model, tok = tiny_policy
    mixed = [_mixed_group(tok, "q0"), _mixed_group(tok, "q1")]
    kw = dict(lr=1e-3, temperature=1.0, max_new_tokens=24, seed=0, progress=False)
    df = regime.regime_map(
        model, tok, mixed, methods=("grpo", "pos_only"), fractions=(0.0, 0.5), **kw
    )
    assert list(pd.unique(df.negatives)) == ["f=0.00", "f=0.50", "near-miss"]
    assert df.attrs["unfilled"] == {"f=0.00": 0, "f=0.50": 0, "near-miss": 0}
    assert len(df) == 3 * 2 * 2  # conditions × questions × rules
    assert set(df.question) == {"q0", "q1"} and df.fraction.isna().sum() == 4
    # the resemblance rises along the map: natural wrong answers share no prefix here, near-miss
    # ones all but their final number
    by_cond = df.groupby("negatives").shared_prefix.mean()
    assert by_cond["f=0.00"] == 0.0 and by_cond["near-miss"] > 0.5
    assert df.gwhes.notna().all() and np.isfinite(df.delta).all()
    # the same groups measured again (reused columns) give the same Δ to the bit
    columns, _ = regime.regime_groups(
        mixed,
        model,
        tok,
        fractions=(0.5,),
        near_miss=False,
        **{k: kw[k] for k in ("temperature", "max_new_tokens", "seed")},
        progress=False,
    )
    again = regime.regime_map(model, tok, mixed, methods=("grpo",), columns=columns, **kw)
    first = df[(df.negatives == "f=0.50") & (df.method == "grpo")].delta.to_numpy()
    np.testing.assert_array_equal(again.delta.to_numpy(), first)


def test_plot_regime_map_draws_each_rule_against_the_baseline(tmp_path):
    from nthr_book import viz

    summary = regime.regime_summary(_map_table())
    ax = viz.plot_regime_map(summary, save=tmp_path / "map.png")
    assert (tmp_path / "map.png").is_file()
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["GRPO", "GRPO + NTHR"]
    # the GRPO line's y values are the summary's ratios, in map order
    grpo = summary[summary.method == "grpo"]["ratio_to_pos_only"].to_numpy()
    np.testing.assert_array_equal(ax.containers[0].lines[0].get_ydata(), grpo)
    assert ax.get_xticklabels()[1].get_text() == "near-miss\nGWHES 7"
    with pytest.raises(ValueError, match="dpo"):
        viz.plot_regime_map(summary, methods=("dpo",))


def test_regime_map_is_saved_and_read_back(tiny_policy, tmp_path, monkeypatch):
    model, tok = tiny_policy
    mixed = [_mixed_group(tok, "q0")]
    kw = dict(lr=1e-3, temperature=1.0, max_new_tokens=24, seed=0, progress=False)
    path = tmp_path / "map.jsonl"
    first = regime.regime_map(model, tok, mixed, fractions=(0.5,), path=path, **kw)

    def no_work(*args, **kwargs):
        raise AssertionError("a saved map is read back: no group sampled, no Δ measured")

    monkeypatch.setattr(regime, "regime_groups", no_work)
    monkeypatch.setattr(regime.lld_sweep, "displacement_table", no_work)
    again = regime.regime_map(model, tok, mixed, fractions=(0.5,), path=path, **kw)
    pd.testing.assert_frame_equal(first, again, check_exact=True)
    assert again.attrs["unfilled"] == first.attrs["unfilled"]
    with pytest.raises(ValueError, match="fractions"):
        regime.regime_map(model, tok, mixed, fractions=(0.25,), path=path, **kw)


def test_a_killed_regime_map_resumes_after_its_last_finished_column(
    tiny_policy, tmp_path, monkeypatch
):
    """Branched columns and measured columns are checkpointed as they finish: a map killed while
    measuring its second column branches nothing again and measures only the columns left, and
    gives the map an uninterrupted run gives."""
    model, tok = tiny_policy
    mixed = [_mixed_group(tok, "q0"), _mixed_group(tok, "q1")]
    kw = dict(lr=1e-3, temperature=1.0, max_new_tokens=24, seed=0, progress=False)
    kw |= dict(methods=("grpo", "pos_only"), fractions=(0.0, 0.5))
    whole = regime.regime_map(model, tok, mixed, path=tmp_path / "whole.jsonl", **kw)
    path = tmp_path / "map.jsonl"
    measure, measured = regime.lld_sweep.displacement_table, []

    def killed_on_the_second(model_, column, **k):
        if len(measured) == 1:
            raise KeyboardInterrupt("killed")
        measured.append(k["desc"])
        return measure(model_, column, **k)

    monkeypatch.setattr(regime.lld_sweep, "displacement_table", killed_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        regime.regime_map(model, tok, mixed, path=path, **kw)
    assert not path.exists() and measured == ["Δ(x) f=0.00"]
    assert (tmp_path / "map.jsonl.f0.50.groups.pt").is_file()  # the branched column, saved
    assert not (tmp_path / "map.jsonl.f0.00.groups.pt").exists()  # f = 0: the groups themselves

    def counted(model_, column, **k):
        measured.append(k["desc"])
        return measure(model_, column, **k)

    branch = regime._groups.branched_groups

    def no_branching(mixed_, model_, tok_, fraction, **kwargs):
        if fraction > 0:  # f = 0 is the natural groups themselves: nothing to branch or save
            raise AssertionError("a saved branched column is read back, not branched again")
        return branch(mixed_, model_, tok_, fraction, **kwargs)

    monkeypatch.setattr(regime.lld_sweep, "displacement_table", counted)
    monkeypatch.setattr(regime._groups, "branched_groups", no_branching)
    resumed = regime.regime_map(model, tok, mixed, path=path, **kw)
    assert measured == ["Δ(x) f=0.00", "Δ(x) f=0.50", "Δ(x) near-miss"]  # f = 0 not measured again
    pd.testing.assert_frame_equal(resumed, whole, check_exact=True)
    assert not list(tmp_path.glob("map.jsonl.*.delta.jsonl*"))  # the parts, folded into the map


def test_regime_summary_paired_difference_by_hand():
    s = regime.regime_summary(_map_table(), n_boot=4000).set_index(["negatives", "method"])
    near = s.loc[("near-miss", "grpo")]
    # Δ_GRPO − Δ_PosOnly on the near-miss questions: −0.1, −0.2, −0.35 → mean −0.65 / 3
    diffs = [0.1 - 0.2, -0.1 - 0.1, 0.05 - 0.4]
    assert near.diff_mean == pytest.approx(sum(diffs) / 3, abs=8 * EPS64)
    # every resample of three negative differences is negative: resolved below 0
    assert near.diff_high < 0 and near.diff_resolved and near.frac_below == 1.0
    natural = s.loc[("f=0.00", "grpo")]  # +0.2, +0.1, +0.2: resolved above 0
    assert natural.diff_low > 0 and natural.diff_resolved and natural.frac_below == 0.0
    assert math.isnan(s.loc[("f=0.00", "pos_only")].diff_mean)  # the baseline is not tested
    # the paper's LLD measure with its interval: 4 of 6 answers, resampled by question
    assert near.lld_rate == 4 / 6 and 0 <= near.lld_low <= 4 / 6 <= near.lld_high <= 1


def test_regime_summary_resamples_within_seeds():
    """Two seeds' questions: seed 0's differences are all +1 and seed 1's all −1, three each.
    Resampling within seeds keeps three of each in every resample (the mean is always 0), while
    pooled resampling would scatter it."""
    rows = []
    for seed, sign in ((0, 1.0), (1, -1.0)):
        for q in range(3):
            for method, delta in (("grpo", 1.0 + sign), ("pos_only", 1.0)):
                rows.append(
                    {
                        "seed": seed,
                        "question": f"q{q}",
                        "negatives": "f=0.00",
                        "fraction": 0.0,
                        "method": method,
                        "delta": delta,
                        "per_response_delta": [delta],
                        "n_selected": None,
                        "n_incorrect_tokens": 4,
                        "group_size": 4,
                        "gwhes": 0.0,
                        "shared_prefix": 0.0,
                    }
                )
    row = regime.regime_summary(pd.DataFrame(rows)).set_index("method").loc["grpo"]
    assert row.n_questions == 6  # (seed, question) pairs: q0 of seed 0 is not q0 of seed 1
    assert row.diff_mean == row.diff_low == row.diff_high == 0.0


def test_regime_shift_by_hand():
    out = regime.regime_shift(_map_table()).set_index("negatives").loc["near-miss"]
    # per question, (Δ_GRPO − Δ_PosOnly) near-miss minus natural: −0.3, −0.3, −0.55
    shifts = [(0.1 - 0.2) - (0.4 - 0.2), (-0.1 - 0.1) - (0.2 - 0.1), (0.05 - 0.4) - (0.6 - 0.4)]
    assert out.reference == "f=0.00" and out.n_questions == 3
    assert out.shift_mean == pytest.approx(sum(shifts) / 3, abs=16 * EPS64)
    assert out.shift_high < 0 and out.resolved and out.frac_fell == 1.0
    with pytest.raises(ValueError, match="reference"):
        regime.regime_shift(_map_table(), reference="f=0.50")


def test_gwhes_ranking_within_one_column():
    out = regime.gwhes_ranking(_map_table(), condition="near-miss", k=1)
    # near-miss: GWHES 5, 9, 7; laziness Δ_PosOnly − Δ_GRPO 0.1, 0.2, 0.35: top-1 9 vs 0.35
    assert out["condition"] == "near-miss" and out["n_groups"] == 3
    assert out["topk_overlap"] == 0.0 and out["random_overlap"] == 1 / 3
    gap = [0.1 - 0.2, -0.1 - 0.1, 0.05 - 0.4]
    rg, rs = np.array(_average_ranks(gap)), np.array(_average_ranks([5.0, 9.0, 7.0]))
    rg, rs = rg - rg.mean(), rs - rs.mean()
    rho = float((rg * rs).sum() / math.sqrt((rg**2).sum() * (rs**2).sum()))
    assert out["spearman"] == pytest.approx(rho, abs=64 * EPS64 * 10)
    with pytest.raises(ValueError, match="not a column"):
        regime.gwhes_ranking(_map_table(), condition="f=0.50")


def _slots_group(tok, question_id: str, texts: list[str], rewards: list[float], slots) -> Group:
    ids = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
    g = Group.from_token_lists(
        [5, 6],
        ids,
        rewards,
        pad_id=tok.pad_token_id,
        question_id=question_id,
        answer="5",
        texts=texts,
    )
    if slots is not None:
        g.rollouts.meta = {"source_question_id": question_id.split("/")[0], "slot_rows": slots}
    return g


def test_common_columns_keep_the_questions_and_slots_filled_everywhere(tiny_policy):
    """q0 sampled 2 right (rows 0, 2) and 3 wrong (rows 1, 3, 4); its f = 0.5 column filled only
    slots 1 and 4 (row 3 dropped), so every column keeps rows {0, 1, 2, 4}: the same G and p. q1
    could not be filled at f = 0.5 and leaves every column; q2 is in every column."""
    _, tok = tiny_policy
    natural = [
        _slots_group(tok, "q0", ["a", "x", "b", "y", "z"], [1, 0, 1, 0, 0], None),
        _slots_group(tok, "q1", ["a", "x"], [1, 0], None),
        _slots_group(tok, "q2", ["a", "x"], [1, 0], None),
    ]
    half = [
        _slots_group(tok, "q0/b", ["a", "x5", "b", "z5"], [1, 0, 1, 0], [0, 1, 2, 4]),
        _slots_group(tok, "q2/b", ["a", "x5"], [1, 0], [0, 1]),
    ]
    near = [
        _slots_group(tok, f"{g.question_id}/n", g.rollouts.texts, g.rewards.tolist(), None)
        for g in natural
    ]
    for g in near:  # near-miss groups keep every slot of their source
        g.rollouts.meta = {"source_question_id": g.question_id.split("/")[0]}
    columns = {"f=0.00": natural, "f=0.50": half, "near-miss": near}
    out, held = regime.common_columns(columns)
    assert held == {"f=0.00": 3, "f=0.50": 2, "near-miss": 3}
    for name, col in out.items():
        assert [g.question_id.split("/")[0] for g in col] == ["q0", "q2"], name
        q0 = col[0]
        assert q0.group_size == 4 and q0.n_correct == 2, name
    assert out["f=0.00"][0].rollouts.texts == ["a", "x", "b", "z"]  # row 3 ("y") left out
    assert out["f=0.50"][0].rollouts.texts == ["a", "x5", "b", "z5"]
    assert out["near-miss"][0].rollouts.meta["slot_rows"] == [0, 1, 2, 4]
    assert out["f=0.50"][1] is half[1]  # nothing to restrict: the group itself
