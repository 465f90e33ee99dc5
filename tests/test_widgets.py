"""Tests for nthr_book.widgets: the threshold explorer, checked by setting its controls' .value.

Headless. Tolerances are rounding bounds derived from the unit roundoff (F32) and the term count.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

from nthr_book import grpo, lld, nthr, widgets
from nthr_book.groups import Group
from nthr_book.models import tiny_random_model

V = 64  # tiny vocabulary: the full-vocabulary brute force stays cheap
F32 = 2.0**-24  # float32 unit roundoff


@pytest.fixture(scope="module", autouse=True)
def _few_threads():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _group(qid: str, responses: list[list[int]], rewards: list[float], prompt: list[int]) -> Group:
    """A Group from token-id lists (right-padded with id 2, masked)."""
    return Group.from_token_lists(prompt, responses, rewards, pad_id=2, question_id=qid,
                                  problem=f"problem {qid}", answer="7")


@pytest.fixture(scope="module")
def model():
    return tiny_random_model(V, seed=0).eval()


@pytest.fixture(scope="module")
def groups():
    # q0: incorrect responses reuse the correct ones' tokens (high scores) and add others (low scores)
    q0 = _group("q0", [[10, 11, 12, 13, 14], [10, 11, 12, 20, 21, 22], [10, 11, 12, 15],
                       [30, 31, 10, 11, 12, 13, 32]], [1.0, 0.0, 1.0, 0.0], [5, 6, 7])
    q1 = _group("q1", [[40, 41, 42], [40, 41, 43, 44], [45, 40, 41], [46, 47]], [0.0, 1.0, 0.0, 0.0], [8, 9])
    homogeneous = _group("q2", [[10, 11], [12, 13]], [1.0, 1.0], [5])
    return [q0, homogeneous, q1]


@pytest.fixture(scope="module")
def scores(model, groups):
    mixed = [g for g in groups if g.status == "mixed"]
    return [widgets.compute_group_scores(model, g, vocab=("generated", "full")) for g in mixed]


def _n_selected_spans(text: str) -> int:
    return len(re.findall(r'class="nthr-token nthr-selected"', text))


def _most_selected_row(gs: widgets.GroupScores, beta: float, vocab: str = "generated") -> int:
    """By hand: the incorrect row with the most selected tokens, the first one on ties."""
    sel = nthr.select_tokens(gs.scores(vocab), gs.completion_mask, gs.correct, beta).sum(1).tolist()
    rows = gs.incorrect_rows
    best = max(sel[r] for r in rows)
    return next(r for r in rows if sel[r] == best)


def _interior_beta(gs: widgets.GroupScores, vocab: str = "generated") -> float:
    """A β whose τ falls strictly inside the incorrect tokens' scores (so the selection is non-trivial)."""
    s, mask, correct = gs.scores(vocab), gs.completion_mask, gs.correct
    neg = s[(~correct)[:, None] & mask].sort().values
    target = float((neg[len(neg) // 2 - 1] + neg[len(neg) // 2]) / 2)
    min_sbar = float(nthr.self_influence(s, mask, correct).min())
    return target / min_sbar


# --------------------------------------------------------------------------------------------
# compute_group_scores against a pairwise brute force from the model's own hidden states
# --------------------------------------------------------------------------------------------


def _brute_force(model, g, vocab, temperature, softcap=None):
    """Float64 pair terms P[i,t,j,k] = <g_it,g_jk><h_it,h_jk> of a group, and float32 scores' bound.

    h from the model's forward (output_hidden_states), logits h·Wᵀ / temperature in float64. The
    bound: a score sums n pair terms of inner products over |V'| and d coordinates, so it is off by
    at most m·F32·Σ|terms| with m = n + |V'| + d + 16 (16 for the softmax); float32 logits h·W (d
    terms, error (d + 2)·F32·max|h|·|W|/T) move each g by a relative 2× that, 4× per term.
    """
    r = g.rollouts
    with torch.no_grad():
        out = model(input_ids=r.input_ids, attention_mask=r.attention_mask, output_hidden_states=True)
    P, T = r.prompt_ids.shape[1], r.completion_ids.shape[1]
    h = out.hidden_states[-1][:, P - 1 : P - 1 + T].double()  # (G, T, d): states predicting completion tokens
    W = model.get_output_embeddings().weight.detach().double()  # (V, d)
    z = h @ W.T if softcap is None else torch.tanh(h @ W.T / softcap) * softcap  # capped before T
    q = torch.softmax(z / temperature, -1)  # (G, T, V)
    y, mask = r.completion_ids, r.completion_mask
    grad = torch.nn.functional.one_hot(y, V).double() - q  # (G, T, V)
    if vocab == "generated":
        grad = grad[..., torch.unique(y[mask])]  # V* columns, q not renormalised
    pair = lambda a, b: torch.einsum("itv,jkv->itjk", a, a) * torch.einsum("itd,jkd->itjk", b, b)
    pairs = pair(grad, h)  # (G, T, G, T)
    scale = pair(grad.abs(), h.abs())  # (G, T, G, T) the terms' sizes
    k_valid = (mask & g.correct[:, None]).double()  # (G, T) correct tokens k
    logit_err = (h.shape[-1] + 2) * F32 * float((h.abs() @ W.abs().T).max()) / temperature
    m = int(mask.sum()) + grad.shape[-1] + h.shape[-1] + 16 + 4 * logit_err / F32
    return pairs, m * F32 * float((scale * k_valid).sum((-2, -1)).max())


def _anchor_sbar(pairs, mask, correct, anchor):
    """(N+,) s̄+_i from the pair terms, keeping the (t, k) pairs of the anchor (float64)."""
    out = []
    for i in correct.nonzero().flatten().tolist():
        keep = (mask & correct[:, None])[None].repeat(mask.shape[1], 1, 1)  # (T, G, T): k per t
        if anchor == "other_responses":
            keep[:, i] = False
        if anchor == "no_self_token":
            keep[torch.arange(mask.shape[1]), i, torch.arange(mask.shape[1])] = False
        per_token = (pairs[i] * keep).sum((-2, -1))  # (T,)
        out.append(per_token[mask[i]].mean())
    return torch.stack(out)


@pytest.mark.parametrize("vocab", ["generated", "full"])
def test_compute_group_scores_matches_pairwise_brute_force(model, groups, vocab):
    g = groups[0]
    gs = widgets.compute_group_scores(model, g, vocab=vocab, temperature=0.7)
    pairs, tol = _brute_force(model, g, vocab, 0.7)
    mask, correct = g.rollouts.completion_mask, g.correct
    expected = (pairs * (mask & correct[:, None])).sum((-2, -1)) * mask  # (G, T) s_t
    torch.testing.assert_close(gs.scores(vocab).double(), expected, rtol=0, atol=tol)
    for anchor in nthr.ANCHORS:  # s̄+ under each anchor (3 sums within the bound: s, pairs, mean)
        st = widgets.explorer_state(gs, beta=1.0, vocab=vocab, anchor=anchor)
        sbar = _anchor_sbar(pairs, mask, correct, anchor)
        got = torch.tensor(st.self_influence, dtype=torch.float64)
        torch.testing.assert_close(got, sbar, rtol=0, atol=3 * tol)
        assert st.tau == pytest.approx(float(sbar.min()), rel=0, abs=3 * tol)
    assert set(gs.anchor_pairs[vocab]) == {"other_responses", "no_self_token"}
    assert gs.vocab_modes == (vocab,)


def test_compute_group_scores_applies_the_models_softcap(groups):
    capped = tiny_random_model(V, seed=0).eval()
    with torch.no_grad():
        capped.model.norm.weight.mul_(64.0)  # logits of several units, which a cap of 2 bends
    capped.config.final_logit_softcapping = 2.0
    g = groups[0]
    gs = widgets.compute_group_scores(capped, g, vocab="full", temperature=0.7)
    pairs, tol = _brute_force(capped, g, "full", 0.7, softcap=2.0)
    mask, correct = g.rollouts.completion_mask, g.correct
    expected = (pairs * (mask & correct[:, None])).sum((-2, -1)) * mask  # (G, T) s_t
    torch.testing.assert_close(gs.scores("full").double(), expected, rtol=0, atol=tol)
    uncapped, _ = _brute_force(capped, g, "full", 0.7)
    without_cap = (uncapped * (mask & correct[:, None])).sum((-2, -1)) * mask
    assert (without_cap - expected).abs().max() > 100 * tol  # the test sees a missing cap
    assert [len(t) for t in gs.tokens] == mask.sum(1).tolist()
    assert gs.tokens[0][0] == "⟨10⟩"  # no tokenizer: ids in brackets


def test_group_scores_validation_and_merge(scores, groups):
    gs = scores[0]
    with pytest.raises(KeyError, match="no 'x' scores"):
        gs.scores("x")
    with pytest.raises(ValueError, match="token_scores key 'bad'"):
        widgets.GroupScores.from_group(groups[0], {"bad": gs.scores("full")})
    with pytest.raises(ValueError, match=r"must be \(G, T\)"):
        widgets.GroupScores.from_group(groups[0], {"full": gs.scores("full")[:, :2]})
    only_gen = widgets.GroupScores.from_group(groups[0], {"generated": gs.scores("generated")})
    merged = only_gen.with_scores(widgets.GroupScores.from_group(groups[0], {"full": gs.scores("full")}))
    assert set(merged.vocab_modes) == {"generated", "full"}
    with pytest.raises(ValueError, match="cannot merge"):
        only_gen.with_scores(scores[1])


# --------------------------------------------------------------------------------------------
# explorer_state: tau, selection, eta and the reweighted advantages by hand
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eta", ["two_abs", "p", "one_minus_p", 0.0])
def test_explorer_state_matches_hand_computation(scores, eta):
    gs = scores[0]
    beta = _interior_beta(gs)
    st = widgets.explorer_state(gs, beta=beta, eta=eta, vocab="generated")
    s, mask = gs.scores("generated"), gs.completion_mask
    correct = torch.tensor([True, False, True, False])
    # tau = beta * min over correct responses of the mean score of their tokens; float32 means of at
    # most T values in another order: (T + 2)·F32·max|s| apart at most
    sbar = [float(s[i][mask[i]].double().mean()) for i in (0, 2)]
    tol = (s.shape[1] + 2) * F32 * float(s.abs().max())
    assert st.tau == pytest.approx(beta * min(sbar), rel=0, abs=abs(beta) * tol)
    assert st.self_influence == pytest.approx(sbar, rel=0, abs=tol)
    sel = (~correct)[:, None] & mask & (s > st.tau)
    assert torch.equal(st.selected, sel)
    assert 0 < st.n_selected_group < st.n_incorrect_tokens  # non-trivial by construction of beta
    assert st.n_selected == sel.sum(1).tolist()
    assert st.selected_frac == sel.sum().item() / mask[[1, 3]].sum().item()  # same integer ratio
    p = 0.5
    eta_hand = {"two_abs": 2 * abs(0.5 - p), "p": p, "one_minus_p": 1 - p, 0.0: 0.0}[eta]
    assert st.eta == eta_hand  # 0, 0.5 or 0.5 at p = 1/2: exact in binary
    # GRPO advantages with p = 1/2: ±0.5 / (0.5 + 1e-6) (population std 0.5, group_advantages' eps
    # 1e-6), in float32: four roundings (mean, centring, std, division), one more for η·A
    a = torch.where(correct, 1.0, -1.0)[:, None].expand_as(s) * mask * (0.5 / (0.5 + 1e-6))
    torch.testing.assert_close(st.advantages.double(), a.double(), rtol=0, atol=4 * F32)
    new = torch.where(sel, eta_hand * a, a)
    torch.testing.assert_close(st.new_advantages.double(), new.double(), rtol=0, atol=5 * F32)
    wrong = (~correct)[:, None] & mask
    n_wrong = int(wrong.sum())  # a float32 mean of n values near 1: (n + 7)·F32
    assert st.mean_incorrect_advantage == pytest.approx(float(new[wrong].double().mean()), rel=0,
                                                        abs=(n_wrong + 7) * F32)
    assert st.summary()["selected_frac"] == st.selected_frac


def test_explorer_state_eta_depends_on_p(scores):
    gs = scores[1]  # q1: N+ = 1 of 4
    for eta, hand in (("two_abs", 2 * abs(0.5 - 0.25)), ("p", 0.25), ("one_minus_p", 0.75)):
        st = widgets.explorer_state(gs, beta=-math.inf, eta=eta)
        assert st.eta == hand  # 0.5, 0.25, 0.75: exact in binary
        wrong = (~gs.correct)[:, None] & gs.completion_mask
        torch.testing.assert_close(st.new_advantages[wrong], hand * st.advantages[wrong],
                                   rtol=0, atol=0)


def test_default_response_is_the_most_selected_incorrect_one(scores):
    gs = scores[1]  # q1: incorrect rows 0, 2, 3
    st = widgets.explorer_state(gs, beta=-math.inf)
    assert st.n_selected == [3, 0, 3, 2]  # every token of each incorrect response
    assert widgets.default_response(st) == 0  # rows 0 and 2 tie: the first
    st0 = widgets.explorer_state(gs, beta=1e9)  # nothing selected: the first incorrect row
    assert widgets.default_response(st0) == 0 and st0.n_selected_group == 0


def test_explorer_state_neg_inf_selects_every_incorrect_token(scores):
    gs = scores[0]
    st = widgets.explorer_state(gs, beta=-math.inf, eta=0.0)
    assert st.tau == -math.inf
    wrong = (~gs.correct)[:, None] & gs.completion_mask
    assert torch.equal(st.selected, wrong)
    assert st.selected_frac == 1.0
    assert st.mean_incorrect_advantage == 0.0  # eta = 0 zeroes every incorrect token's advantage
    with pytest.raises(ValueError, match="beta must be"):
        widgets.explorer_state(gs, beta=math.nan)


# --------------------------------------------------------------------------------------------
# The widget, by setting its controls
# --------------------------------------------------------------------------------------------


def _check_view(ex: widgets.ThresholdExplorer, gs: widgets.GroupScores, beta: float, eta,
                vocab: str, response: int, anchor: str = "all"):
    """The explorer's state and HTML against nthr.threshold / select_tokens / eta_for at these settings."""
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
    assert ("data-tau=\"-inf\"" if tau == -math.inf else f'data-tau="{tau!r}"') in text
    assert 'src="data:image/png;base64,' in text  # the histogram
    assert f"<b>{int(sel.sum())}</b> of {int(((~correct)[:, None] & mask).sum())} incorrect tokens" in text
    return st


def test_widget_controls_drive_tau_counts_and_html(groups, scores):
    ex = widgets.threshold_explorer(groups, scores=scores, beta=1.0, eta="two_abs")
    c = ex.controls
    assert isinstance(ex, widgets.ThresholdExplorer)
    assert set(c) == {"question", "response", "beta_neg_inf", "beta", "eta", "vocab", "anchor",
                      "run"}
    assert [label for label, _ in c["question"].options][0].startswith("q0")
    assert len(c["question"].options) == 2  # the homogeneous group is left out
    assert c["run"].disabled  # no model: no Δ(x) button
    assert c["response"].options == (("#1 (6 tokens)", 1), ("#3 (7 tokens)", 3))
    assert c["response"].value == _most_selected_row(scores[0], 1.0)
    _check_view(ex, scores[0], 1.0, "two_abs", "generated", c["response"].value)
    c["response"].value = 1
    _check_view(ex, scores[0], 1.0, "two_abs", "generated", 1)

    beta = round(_interior_beta(scores[0]), 2)
    c["beta"].value = beta
    st = _check_view(ex, scores[0], beta, "two_abs", "generated", 1)
    assert 0 < st.n_selected_group < st.n_incorrect_tokens
    c["response"].value = 3
    _check_view(ex, scores[0], beta, "two_abs", "generated", 3)
    c["eta"].value = "one_minus_p"
    _check_view(ex, scores[0], beta, "one_minus_p", "generated", 3)
    c["vocab"].value = "full"
    beta_full = round(_interior_beta(scores[0], "full"), 2)
    c["beta"].value = beta_full
    _check_view(ex, scores[0], beta_full, "one_minus_p", "full", 3)

    # β = -∞: every incorrect token, slider disabled; off again: back to the slider's β
    c["beta_neg_inf"].value = True
    assert c["beta"].disabled
    st = _check_view(ex, scores[0], -math.inf, "one_minus_p", "full", 3)
    assert _n_selected_spans(ex.view_html) == 7 and st.selected_frac == 1.0
    c["beta_neg_inf"].value = False
    assert not c["beta"].disabled
    _check_view(ex, scores[0], beta_full, "one_minus_p", "full", 3)

    # another question: the response picker offers its incorrect rows and the view follows
    c["question"].value = 1
    assert [v for _, v in c["response"].options] == [0, 2, 3]
    assert c["response"].value == _most_selected_row(scores[1], beta_full, "full")
    c["eta"].value = 0.0
    for row in (0, 2, 3):
        c["response"].value = row
        _check_view(ex, scores[1], beta_full, 0.0, "full", row)


def test_widget_anchor_control_moves_tau_only(groups, scores):
    ex = widgets.threshold_explorer(groups, scores=scores, beta=1.0, eta="two_abs")
    c = ex.controls
    assert c["anchor"].options == nthr.ANCHORS and c["anchor"].value == "all"
    base = ex.state()
    for anchor in ("other_responses", "no_self_token", "all"):
        c["anchor"].value = anchor
        st = _check_view(ex, scores[0], 1.0, "two_abs", "generated", c["response"].value, anchor)
        kept = ex.current_scores().scores("generated")  # the scores stay as they are
        assert torch.equal(kept, scores[0].scores("generated"))
        if anchor != "all":
            assert st.tau != base.tau  # leaving pairs out moves s̄+ and τ
    c["vocab"].value = "full"
    c["anchor"].value = "other_responses"
    _check_view(ex, scores[0], 1.0, "two_abs", "full", c["response"].value, "other_responses")
    other = widgets.explorer_state(scores[0], anchor="other_responses")
    assert other.summary()["anchor"] == "other_responses"
    snap = widgets.explorer_snapshot(groups, beta=1.0, scores=scores, anchor="other_responses")
    assert f'data-tau="{other.tau!r}"' in snap.data
    with pytest.raises(ValueError, match="anchor='x'"):
        widgets.threshold_explorer(groups, scores=scores, anchor="x")


def test_widget_computes_scores_once_per_question_and_vocab(model, groups, scores):
    ex = widgets.threshold_explorer(groups, model=model, lr=1e-2)
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
        torch.testing.assert_close(ex.current_scores().scores(vocab), scores[0].scores(vocab),
                                   rtol=0, atol=0)
    assert not c["run"].disabled


def test_run_button_shows_nthr_and_grpo_delta(model, groups, scores):
    ex = widgets.threshold_explorer(groups, scores=scores, model=model, lr=1e-2, eta=0.0)
    c = ex.controls
    c["beta"].value = round(_interior_beta(scores[0]), 2)
    st = ex.state()
    c["run"].click()
    assert not c["run"].disabled and ex.outputs["progress"].value == 2
    result = ex.outputs["result"].value
    assert "Δ(x)" in result and "GRPO" in result, ex.outputs["status"].value
    ref_nthr = lld.one_step_displacement(model, groups[0], update="nthr", lr=1e-2, eta=0.0, beta=st.beta,
                                         selected=st.selected)
    ref_grpo = lld.one_step_displacement(model, groups[0], update="grpo", lr=1e-2)
    assert f"<b>{ref_nthr.delta:+.4g}</b>" in result
    assert f"<b>{ref_grpo.delta:+.4g}</b>" in result
    assert ref_nthr.n_selected_tokens == st.n_selected_group
    assert ref_nthr.delta != ref_grpo.delta


def test_snapshot_shows_the_same_counts(groups, scores):
    ex = widgets.threshold_explorer(groups, scores=scores)
    beta = round(_interior_beta(scores[0]), 2)
    ex.controls["beta"].value = beta
    ex.controls["eta"].value = "p"
    snap = widgets.explorer_snapshot(groups, beta=beta, eta="p", scores=scores)
    st = ex.state()
    assert "nthr-explorer-snapshot" in snap.data and "nthr-explorer-live" not in snap.data
    ex.controls["response"].value = widgets.default_response(st)  # the snapshot's default response
    assert _n_selected_spans(snap.data) == _n_selected_spans(ex.view_html) == max(st.n_selected)
    assert f'data-n-selected-group="{st.n_selected_group}"' in snap.data
    assert f'data-tau="{st.tau!r}"' in snap.data
    neg = widgets.explorer_snapshot(groups, beta=-math.inf, eta=0.0, scores=scores, question="q1", response=3,
                                    vocab="full")
    assert _n_selected_spans(neg.data) == 2 and 'data-tau="-inf"' in neg.data


def test_explorer_errors_are_clear(groups, scores, model):
    with pytest.raises(ValueError, match="none of the 1 groups is mixed"):
        widgets.threshold_explorer([groups[1]], scores=scores)
    with pytest.raises(ValueError, match="pass model="):
        widgets.threshold_explorer(groups)
    with pytest.raises(TypeError, match=r"groups\[0\] must be an nthr_book.groups.Group"):
        widgets.threshold_explorer(["q0"], model=model)
    with pytest.raises(ValueError, match="not an incorrect response"):
        widgets.explorer_snapshot(groups, scores=scores, response=0)
    with pytest.raises(ValueError, match="not a mixed question"):
        widgets.explorer_snapshot(groups, scores=scores, question="q2")
    wrong = widgets.GroupScores.from_group(groups[2], {"generated": scores[1].scores("generated")})
    with pytest.raises(ValueError, match="does not match"):
        widgets.threshold_explorer(groups, scores=[scores[0], wrong.__class__(
            **{**wrong.__dict__, "question_id": "q0"})])
    # precomputed generated scores only, no model: the full view says what is missing
    only_gen = [widgets.GroupScores.from_group(g, {"generated": s.scores("generated")})
                for g, s in zip([groups[0], groups[2]], scores)]
    ex = widgets.threshold_explorer(groups, scores=only_gen)
    ex.controls["anchor"].value = "no_self_token"  # scores given without anchor pairs
    assert "no 'generated' scores with 'no_self_token' pairs" in ex.view_html
    ex.controls["anchor"].value = "all"
    ex.controls["vocab"].value = "full"
    assert "no 'full' scores" in ex.view_html
    with pytest.raises(LookupError, match="pass model="):
        ex.state()
    with pytest.raises(KeyError, match="no 'other_responses' anchor pairs"):
        only_gen[0].pairs("generated", "other_responses")
    with pytest.raises(ValueError, match="anchor_pairs key 'mine'"):
        s = scores[0].scores("generated")
        widgets.GroupScores.from_group(groups[0], {"generated": s},
                                       anchor_pairs={"generated": {"mine": s}})


def test_grpo_advantages_used_by_the_state_are_the_library_ones(scores):
    gs = scores[1]
    st = widgets.explorer_state(gs, beta=0.0)
    ref = grpo.expand_advantages(grpo.group_advantages(gs.rewards[None]), gs.completion_mask)
    torch.testing.assert_close(st.advantages, ref, rtol=0, atol=0)  # same functions: bit for bit
