"""Tests for nthr_book.widgets: the threshold explorer, checked by setting its controls' .value.

Headless. The model, groups and scores are ``tests/explorer_cases.py``'s (fixtures in
``tests/conftest.py``); the numbers behind the widget are tested in ``tests/test_explorer.py``.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from explorer_cases import interior_beta

from nthr_book import explorer, lld, nthr, widgets


@pytest.fixture(scope="module", autouse=True)
def _few_threads():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _n_selected_spans(text: str) -> int:
    return len(re.findall(r'class="nthr-token nthr-selected"', text))


def _most_selected_row(gs: explorer.GroupScores, beta: float, vocab: str = "generated") -> int:
    """By hand: the incorrect row with the most selected tokens, the first one on ties."""
    sel = nthr.select_tokens(gs.scores(vocab), gs.completion_mask, gs.correct, beta).sum(1).tolist()
    rows = gs.incorrect_rows
    best = max(sel[r] for r in rows)
    return next(r for r in rows if sel[r] == best)


# --------------------------------------------------------------------------------------------
# The widget, by setting its controls
# --------------------------------------------------------------------------------------------


def _check_view(
    ex: widgets.ThresholdExplorer,
    gs: explorer.GroupScores,
    beta: float,
    eta,
    vocab: str,
    response: int,
    anchor: str = "all",
):
    """The explorer's state and HTML against nthr.threshold / select_tokens / eta_for at these
    settings."""
    s, mask, correct = gs.scores(vocab), gs.completion_mask, gs.correct
    pairs = None if anchor == "all" else gs.anchor_pairs[vocab][anchor]
    tau = nthr.threshold(s, mask, correct, beta, anchor_pairs=pairs)
    sel = nthr.select_tokens(s, mask, correct, beta, anchor_pairs=pairs)
    st = ex.state()
    assert st.tau == tau and st.beta == beta and st.vocab == vocab and st.eta_schedule == eta
    assert st.anchor == anchor and f"anchor <b>{anchor}</b>" in ex.view_html
    assert torch.equal(st.selected, sel)
    assert st.n_selected == sel.sum(1).tolist()
    assert st.eta == float(nthr.eta_for(gs.correct.float().mean().item(), eta))
    text = ex.view_html
    assert _n_selected_spans(text) == int(sel[response].sum())
    assert f'data-response="{response}"' in text
    assert f'data-n-selected-group="{int(sel.sum())}"' in text
    assert ('data-tau="-inf"' if tau == -math.inf else f'data-tau="{tau!r}"') in text
    assert 'src="data:image/png;base64,' in text  # the histogram
    assert (
        f"<b>{int(sel.sum())}</b> of {int(((~correct)[:, None] & mask).sum())} incorrect tokens"
        in text
    )
    return st


def test_widget_controls_drive_tau_counts_and_html(explorer_groups, explorer_scores):
    ex = widgets.threshold_explorer(
        explorer_groups, scores=explorer_scores, beta=1.0, eta="two_abs"
    )
    c = ex.controls
    assert isinstance(ex, widgets.ThresholdExplorer)
    assert set(c) == {
        "question",
        "response",
        "beta_neg_inf",
        "beta",
        "eta",
        "vocab",
        "anchor",
        "run",
    }
    assert [label for label, _ in c["question"].options][0].startswith("q0")
    assert len(c["question"].options) == 2  # the homogeneous group is left out
    assert c["run"].disabled  # no model: no Δ(x) button
    assert c["response"].options == (("#1 (6 tokens)", 1), ("#3 (7 tokens)", 3))
    assert c["response"].value == _most_selected_row(explorer_scores[0], 1.0)
    _check_view(ex, explorer_scores[0], 1.0, "two_abs", "generated", c["response"].value)
    c["response"].value = 1
    _check_view(ex, explorer_scores[0], 1.0, "two_abs", "generated", 1)

    beta = round(interior_beta(explorer_scores[0]), 2)
    c["beta"].value = beta
    st = _check_view(ex, explorer_scores[0], beta, "two_abs", "generated", 1)
    assert 0 < st.n_selected_group < st.n_incorrect_tokens
    c["response"].value = 3
    _check_view(ex, explorer_scores[0], beta, "two_abs", "generated", 3)
    c["eta"].value = "one_minus_p"
    _check_view(ex, explorer_scores[0], beta, "one_minus_p", "generated", 3)
    c["vocab"].value = "full"
    beta_full = round(interior_beta(explorer_scores[0], "full"), 2)
    c["beta"].value = beta_full
    _check_view(ex, explorer_scores[0], beta_full, "one_minus_p", "full", 3)

    # β = -∞: every incorrect token, slider disabled; off again: back to the slider's β
    c["beta_neg_inf"].value = True
    assert c["beta"].disabled
    st = _check_view(ex, explorer_scores[0], -math.inf, "one_minus_p", "full", 3)
    assert _n_selected_spans(ex.view_html) == 7 and st.selected_frac == 1.0
    c["beta_neg_inf"].value = False
    assert not c["beta"].disabled
    _check_view(ex, explorer_scores[0], beta_full, "one_minus_p", "full", 3)

    # another question: the response picker offers its incorrect rows and the view follows
    c["question"].value = 1
    assert [v for _, v in c["response"].options] == [0, 2, 3]
    assert c["response"].value == _most_selected_row(explorer_scores[1], beta_full, "full")
    c["eta"].value = 0.0
    for row in (0, 2, 3):
        c["response"].value = row
        _check_view(ex, explorer_scores[1], beta_full, 0.0, "full", row)


def test_widget_anchor_control_moves_tau_only(explorer_groups, explorer_scores):
    ex = widgets.threshold_explorer(
        explorer_groups, scores=explorer_scores, beta=1.0, eta="two_abs"
    )
    c = ex.controls
    assert c["anchor"].options == nthr.ANCHORS and c["anchor"].value == "all"
    base = ex.state()
    for anchor in ("other_responses", "no_self_token", "all"):
        c["anchor"].value = anchor
        st = _check_view(
            ex, explorer_scores[0], 1.0, "two_abs", "generated", c["response"].value, anchor
        )
        kept = ex.current_scores().scores("generated")  # the scores stay as they are
        assert torch.equal(kept, explorer_scores[0].scores("generated"))
        if anchor != "all":
            assert st.tau != base.tau  # leaving pairs out moves s̄+ and τ
    c["vocab"].value = "full"
    c["anchor"].value = "other_responses"
    _check_view(
        ex, explorer_scores[0], 1.0, "two_abs", "full", c["response"].value, "other_responses"
    )
    other = explorer.explorer_state(explorer_scores[0], anchor="other_responses")
    assert other.summary()["anchor"] == "other_responses"
    snap = widgets.explorer_snapshot(
        explorer_groups, beta=1.0, scores=explorer_scores, anchor="other_responses"
    )
    assert f'data-tau="{other.tau!r}"' in snap.data
    with pytest.raises(ValueError, match="anchor='x'"):
        widgets.threshold_explorer(explorer_groups, scores=explorer_scores, anchor="x")


def test_widget_computes_scores_once_per_question_and_vocab(
    explorer_model, explorer_groups, explorer_scores
):
    ex = widgets.threshold_explorer(explorer_groups, model=explorer_model, lr=1e-2)
    assert ex.scores.computed == 1  # the first question, generated vocabulary
    c = ex.controls
    for beta in (0.0, 0.5, 2.0):
        c["beta"].value = beta
    c["beta_neg_inf"].value = True
    c["eta"].value = "p"
    c["response"].value = 3
    assert ex.scores.computed == 1  # moving controls never recomputes
    c["vocab"].value = "full"
    assert ex.scores.computed == 2
    c["vocab"].value = "generated"
    c["vocab"].value = "full"
    assert ex.scores.computed == 2
    c["anchor"].value = "other_responses"  # compute_group_scores keeps every anchor's pairs
    assert ex.scores.computed == 2
    # computed scores equal the precomputed ones: the same forward pass and kernel, so bit for bit
    for vocab in ("full", "generated"):
        torch.testing.assert_close(
            ex.current_scores().scores(vocab), explorer_scores[0].scores(vocab), rtol=0, atol=0
        )
    assert not c["run"].disabled


def test_run_button_shows_nthr_and_grpo_delta(explorer_model, explorer_groups, explorer_scores):
    ex = widgets.threshold_explorer(
        explorer_groups, scores=explorer_scores, model=explorer_model, lr=1e-2, eta=0.0
    )
    c = ex.controls
    c["beta"].value = round(interior_beta(explorer_scores[0]), 2)
    st = ex.state()
    c["run"].click()
    assert not c["run"].disabled and ex.outputs["progress"].value == 2
    result = ex.outputs["result"].value
    assert "Δ(x)" in result and "GRPO" in result, ex.outputs["status"].value
    ref_nthr = lld.one_step_displacement(
        explorer_model,
        explorer_groups[0],
        update="nthr",
        lr=1e-2,
        eta=0.0,
        beta=st.beta,
        selected=st.selected,
    )
    ref_grpo = lld.one_step_displacement(explorer_model, explorer_groups[0], update="grpo", lr=1e-2)
    assert f"<b>{ref_nthr.delta:+.4g}</b>" in result
    assert f"<b>{ref_grpo.delta:+.4g}</b>" in result
    assert ref_nthr.n_selected_tokens == st.n_selected_group
    assert ref_nthr.delta != ref_grpo.delta


def test_snapshot_shows_the_same_counts(explorer_groups, explorer_scores):
    ex = widgets.threshold_explorer(explorer_groups, scores=explorer_scores)
    beta = round(interior_beta(explorer_scores[0]), 2)
    ex.controls["beta"].value = beta
    ex.controls["eta"].value = "p"
    snap = widgets.explorer_snapshot(explorer_groups, beta=beta, eta="p", scores=explorer_scores)
    st = ex.state()
    assert "nthr-explorer-snapshot" in snap.data and "nthr-explorer-live" not in snap.data
    ex.controls["response"].value = explorer.default_response(st)  # the snapshot's default response
    assert _n_selected_spans(snap.data) == _n_selected_spans(ex.view_html) == max(st.n_selected)
    assert f'data-n-selected-group="{st.n_selected_group}"' in snap.data
    assert f'data-tau="{st.tau!r}"' in snap.data
    neg = widgets.explorer_snapshot(
        explorer_groups,
        beta=-math.inf,
        eta=0.0,
        scores=explorer_scores,
        question="q1",
        response=3,
        vocab="full",
    )
    assert _n_selected_spans(neg.data) == 2 and 'data-tau="-inf"' in neg.data


def test_explorer_errors_are_clear(explorer_groups, explorer_scores, explorer_model):
    with pytest.raises(ValueError, match="none of the 1 groups is mixed"):
        widgets.threshold_explorer([explorer_groups[1]], scores=explorer_scores)
    with pytest.raises(ValueError, match="pass model="):
        widgets.threshold_explorer(explorer_groups)
    with pytest.raises(TypeError, match=r"groups\[0\] must be an nthr_book.groups.Group"):
        widgets.threshold_explorer(["q0"], model=explorer_model)
    with pytest.raises(ValueError, match="not an incorrect response"):
        widgets.explorer_snapshot(explorer_groups, scores=explorer_scores, response=0)
    with pytest.raises(ValueError, match="not a mixed question"):
        widgets.explorer_snapshot(explorer_groups, scores=explorer_scores, question="q2")
    wrong = explorer.GroupScores.from_group(
        explorer_groups[2], {"generated": explorer_scores[1].scores("generated")}
    )
    with pytest.raises(ValueError, match="does not match"):
        widgets.threshold_explorer(
            explorer_groups,
            scores=[explorer_scores[0], wrong.__class__(**{**wrong.__dict__, "question_id": "q0"})],
        )
    # precomputed generated scores only, no model: the full view says what is missing
    only_gen = [
        explorer.GroupScores.from_group(g, {"generated": s.scores("generated")})
        for g, s in zip([explorer_groups[0], explorer_groups[2]], explorer_scores)
    ]
    ex = widgets.threshold_explorer(explorer_groups, scores=only_gen)
    ex.controls["anchor"].value = "no_self_token"  # scores given without anchor pairs
    assert "no 'generated' scores with 'no_self_token' pairs" in ex.view_html
    ex.controls["anchor"].value = "all"
    ex.controls["vocab"].value = "full"
    assert "no 'full' scores" in ex.view_html
    with pytest.raises(LookupError, match="pass model="):
        ex.state()
