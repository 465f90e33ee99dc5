"""Tests for nthr_book.explorer: a group's scores against a pairwise brute force, the state by hand.

Headless. Tolerances are rounding bounds derived from the unit roundoff (F32) and the term count.
The model, groups and scores are ``tests/explorer_cases.py``'s (fixtures in ``tests/conftest.py``).
"""

from __future__ import annotations

import math

import pytest
import torch
from explorer_cases import V, interior_beta

from nthr_book import explorer, grpo, nthr
from nthr_book.models import tiny_random_model

F32 = 2.0**-24  # float32 unit roundoff

torch.set_num_threads(1)


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
        out = model(
            input_ids=r.input_ids, attention_mask=r.attention_mask, output_hidden_states=True
        )
    P, T = r.prompt_ids.shape[1], r.completion_ids.shape[1]
    h = out.hidden_states[-1][
        :, P - 1 : P - 1 + T
    ].double()  # (G, T, d): states predicting completion tokens
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
def test_compute_group_scores_matches_pairwise_brute_force(explorer_model, explorer_groups, vocab):
    g = explorer_groups[0]
    gs = explorer.compute_group_scores(explorer_model, g, vocab=vocab, temperature=0.7)
    pairs, tol = _brute_force(explorer_model, g, vocab, 0.7)
    mask, correct = g.rollouts.completion_mask, g.correct
    expected = (pairs * (mask & correct[:, None])).sum((-2, -1)) * mask  # (G, T) s_t
    torch.testing.assert_close(gs.scores(vocab).double(), expected, rtol=0, atol=tol)
    for anchor in nthr.ANCHORS:  # s̄+ under each anchor (3 sums within the bound: s, pairs, mean)
        st = explorer.explorer_state(gs, beta=1.0, vocab=vocab, anchor=anchor)
        sbar = _anchor_sbar(pairs, mask, correct, anchor)
        got = torch.tensor(st.self_influence, dtype=torch.float64)
        torch.testing.assert_close(got, sbar, rtol=0, atol=3 * tol)
        assert st.tau == pytest.approx(float(sbar.min()), rel=0, abs=3 * tol)
    assert set(gs.anchor_pairs[vocab]) == {"other_responses", "no_self_token"}
    assert gs.vocab_modes == (vocab,)


def test_compute_group_scores_applies_the_models_softcap(explorer_groups):
    capped = tiny_random_model(V, seed=0).eval()
    with torch.no_grad():
        capped.model.norm.weight.mul_(64.0)  # logits of several units, which a cap of 2 bends
    capped.config.final_logit_softcapping = 2.0
    g = explorer_groups[0]
    gs = explorer.compute_group_scores(capped, g, vocab="full", temperature=0.7)
    pairs, tol = _brute_force(capped, g, "full", 0.7, softcap=2.0)
    mask, correct = g.rollouts.completion_mask, g.correct
    expected = (pairs * (mask & correct[:, None])).sum((-2, -1)) * mask  # (G, T) s_t
    torch.testing.assert_close(gs.scores("full").double(), expected, rtol=0, atol=tol)
    uncapped, _ = _brute_force(capped, g, "full", 0.7)
    without_cap = (uncapped * (mask & correct[:, None])).sum((-2, -1)) * mask
    assert (without_cap - expected).abs().max() > 100 * tol  # the test sees a missing cap
    assert [len(t) for t in gs.tokens] == mask.sum(1).tolist()
    assert gs.tokens[0][0] == "⟨10⟩"  # no tokenizer: ids in brackets


def test_group_scores_validation_and_merge(explorer_scores, explorer_groups):
    gs = explorer_scores[0]
    with pytest.raises(KeyError, match="no 'x' scores"):
        gs.scores("x")
    with pytest.raises(ValueError, match="token_scores key 'bad'"):
        explorer.GroupScores.from_group(explorer_groups[0], {"bad": gs.scores("full")})
    with pytest.raises(ValueError, match=r"must be \(G, T\)"):
        explorer.GroupScores.from_group(explorer_groups[0], {"full": gs.scores("full")[:, :2]})
    only_gen = explorer.GroupScores.from_group(
        explorer_groups[0], {"generated": gs.scores("generated")}
    )
    merged = only_gen.with_scores(
        explorer.GroupScores.from_group(explorer_groups[0], {"full": gs.scores("full")})
    )
    assert set(merged.vocab_modes) == {"generated", "full"}
    with pytest.raises(ValueError, match="cannot merge"):
        only_gen.with_scores(explorer_scores[1])
    with pytest.raises(KeyError, match="no 'other_responses' anchor pairs"):
        only_gen.pairs("generated", "other_responses")  # scores given without anchor pairs
    s = gs.scores("generated")
    with pytest.raises(ValueError, match="anchor_pairs key 'mine'"):
        explorer.GroupScores.from_group(
            explorer_groups[0], {"generated": s}, anchor_pairs={"generated": {"mine": s}}
        )


# --------------------------------------------------------------------------------------------
# explorer_state: tau, selection, eta and the reweighted advantages by hand
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eta", ["two_abs", "p", "one_minus_p", 0.0])
def test_explorer_state_matches_hand_computation(explorer_scores, eta):
    gs = explorer_scores[0]
    beta = interior_beta(gs)
    st = explorer.explorer_state(gs, beta=beta, eta=eta, vocab="generated")
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
    assert st.mean_incorrect_advantage == pytest.approx(
        float(new[wrong].double().mean()), rel=0, abs=(n_wrong + 7) * F32
    )
    assert st.summary()["selected_frac"] == st.selected_frac


def test_explorer_state_eta_depends_on_p(explorer_scores):
    gs = explorer_scores[1]  # q1: N+ = 1 of 4
    for eta, hand in (("two_abs", 2 * abs(0.5 - 0.25)), ("p", 0.25), ("one_minus_p", 0.75)):
        st = explorer.explorer_state(gs, beta=-math.inf, eta=eta)
        assert st.eta == hand  # 0.5, 0.25, 0.75: exact in binary
        wrong = (~gs.correct)[:, None] & gs.completion_mask
        torch.testing.assert_close(
            st.new_advantages[wrong], hand * st.advantages[wrong], rtol=0, atol=0
        )


def test_default_response_is_the_most_selected_incorrect_one(explorer_scores):
    gs = explorer_scores[1]  # q1: incorrect rows 0, 2, 3
    st = explorer.explorer_state(gs, beta=-math.inf)
    assert st.n_selected == [3, 0, 3, 2]  # every token of each incorrect response
    assert explorer.default_response(st) == 0  # rows 0 and 2 tie: the first
    st0 = explorer.explorer_state(gs, beta=1e9)  # nothing selected: the first incorrect row
    assert explorer.default_response(st0) == 0 and st0.n_selected_group == 0


def test_explorer_state_neg_inf_selects_every_incorrect_token(explorer_scores):
    gs = explorer_scores[0]
    st = explorer.explorer_state(gs, beta=-math.inf, eta=0.0)
    assert st.tau == -math.inf
    wrong = (~gs.correct)[:, None] & gs.completion_mask
    assert torch.equal(st.selected, wrong)
    assert st.selected_frac == 1.0
    assert st.mean_incorrect_advantage == 0.0  # eta = 0 zeroes every incorrect token's advantage
    with pytest.raises(ValueError, match="beta must be"):
        explorer.explorer_state(gs, beta=math.nan)


def test_grpo_advantages_used_by_the_state_are_the_library_ones(explorer_scores):
    gs = explorer_scores[1]
    st = explorer.explorer_state(gs, beta=0.0)
    ref = grpo.expand_advantages(grpo.group_advantages(gs.rewards[None]), gs.completion_mask)
    torch.testing.assert_close(st.advantages, ref, rtol=0, atol=0)  # same functions: bit for bit
