"""Tests for nthr_book.nthr: every score against a naive float64 pairwise loop (arXiv 2505.18830).

Tolerances are rounding bounds, derived where they are used from the unit roundoff of the precision
(F32, F64) and the number of terms (``score_atol``); the references are float64.
"""

from __future__ import annotations

import math
import warnings
from types import SimpleNamespace

import pytest
import torch
from naive_scores import (
    F32,
    F64,
    g_and_h,
    generated_ids,
    logit_err,
    make_group,
    naive_pair_sums,
    score_atol,
)

from nthr_book.nthr import (
    ANCHORS,
    ETA_SCHEDULES,
    NTHRConfig,
    eta_for,
    group_selection,
    nthr_advantage_fn,
    random_selection,
    reweight_advantages,
    select_tokens,
    self_influence,
    threshold,
    token_scores,
    token_scores_from_hidden,
    token_scores_reference,
)
from nthr_book.score_kernel import LargestOutput

torch.set_num_threads(1)


GROUP_CASES = [
    # (G, T, correct, lengths)
    (1, 5, [True], [3]),
    (2, 4, [True, False], [4, 2]),
    (3, 6, [False, True, False], [6, 1, 4]),  # N+ = 1
    (4, 5, [True, True, True, True], [5, 3, 5, 2]),  # all correct
    (4, 5, [False, False, False, False], [5, 3, 5, 2]),  # all wrong
    (5, 4, [True, False, True, False, False], [4, 4, 1, 3, 2]),
    (6, 3, [False, True, True, False, True, False], [3, 2, 3, 1, 3, 3]),
    (7, 4, [True, False, False, True, False, False, True], None),
    (
        8,
        6,
        [True, False, True, True, False, False, True, False],
        [6, 5, 0, 6, 2, 6, 1, 3],
    ),  # empty row
]


# --------------------------------------------------------------------------------------------
# token_scores
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", range(len(GROUP_CASES)))
def test_token_scores_full_vocab_matches_naive(case):
    G, T, correct, lengths = GROUP_CASES[case]
    hidden, logits, tokens, mask, correct = make_group(
        G, T, 5, 11, seed=case, correct=correct, lengths=lengths
    )
    expected = naive_pair_sums(hidden, logits, tokens, mask, correct)
    got = token_scores(hidden, logits, tokens, mask, correct, vocab="full")
    assert got.shape == (G, T) and got.dtype == torch.float32
    assert not got.isnan().any()
    assert (got[~mask] == 0).all()
    if correct.any():
        assert expected.abs().max() > 0
        tol32 = score_atol(hidden, logits, tokens, mask, correct, F32)
        torch.testing.assert_close(got.double(), expected, rtol=0, atol=tol32)
    else:
        assert (got == 0).all()
    got64 = token_scores(
        hidden, logits, tokens, mask, correct, vocab="full", dtype=torch.float64, chunk_size=2
    )
    tol64 = score_atol(hidden, logits, tokens, mask, correct, F64)
    torch.testing.assert_close(got64, expected, rtol=0, atol=2 * tol64)  # both sides round


@pytest.mark.parametrize("case", range(len(GROUP_CASES)))
def test_token_scores_generated_vocab_matches_naive_restriction(case):
    G, T, correct, lengths = GROUP_CASES[case]
    # ids drawn from 0..6 of a 13-word vocabulary, so V* is a strict subset and q is not
    # renormalised
    hidden, logits, tokens, mask, correct = make_group(
        G, T, 4, 13, seed=100 + case, correct=correct, lengths=lengths, id_range=7
    )
    ids = generated_ids(tokens, mask)
    assert ids.numel() < 13
    expected = naive_pair_sums(hidden, logits, tokens, mask, correct, vocab_ids=ids)
    got = token_scores(
        hidden, logits, tokens, mask, correct, vocab="generated", dtype=torch.float64
    )
    tol64 = score_atol(hidden, logits, tokens, mask, correct, F64, vocab_ids=ids)
    torch.testing.assert_close(got, expected, rtol=0, atol=2 * tol64)  # both sides round in float64
    got32 = token_scores(hidden, logits, tokens, mask, correct)  # default vocab is "generated"
    if correct.any():
        tol32 = score_atol(hidden, logits, tokens, mask, correct, F32, vocab_ids=ids)
        torch.testing.assert_close(got32.double(), expected, rtol=0, atol=tol32)
        full = naive_pair_sums(hidden, logits, tokens, mask, correct)
        assert (full - expected).abs().max() > 1e3 * tol32  # the restriction is an approximation


def test_token_scores_hand_example():
    # G=2, T=1, V=2, d=1, uniform logits: q = (1/2, 1/2); y = (0, 1); both correct.
    hidden = torch.tensor([[[1.0]], [[2.0]]])
    logits = torch.zeros(2, 1, 2)
    tokens = torch.tensor([[0], [1]])
    mask = torch.ones(2, 1, dtype=torch.bool)
    # g_0 = (1/2, -1/2), g_1 = (-1/2, 1/2): <g0,g0> = 1/2, <g0,g1> = -1/2; h products 1, 2, 4
    # s_0 = 1/2·1 - 1/2·2 = -1/2 ; s_1 = -1/2·2 + 1/2·4 = 1. Every step is exact in binary
    # (halves, small integers), so the kernel and the reference must give these values exactly.
    both, first = torch.tensor([True, True]), torch.tensor([True, False])
    torch.testing.assert_close(
        token_scores(hidden, logits, tokens, mask, both, vocab="full"),
        torch.tensor([[-0.5], [1.0]]),
        rtol=0,
        atol=0,
    )
    torch.testing.assert_close(
        token_scores(hidden, logits, tokens, mask, first, vocab="full"),
        torch.tensor([[0.5], [-1.0]]),
        rtol=0,
        atol=0,
    )
    torch.testing.assert_close(
        token_scores_reference(hidden, logits, tokens, mask, both),
        torch.tensor([[-0.5], [1.0]], dtype=torch.float64),
        rtol=0,
        atol=0,
    )


@pytest.mark.parametrize("case", [1, 5, 7, 8])
@pytest.mark.parametrize("vocab", ["full", "generated"])
def test_token_scores_reference_equals_the_double_loop(case, vocab):
    # token_scores_reference (einsum over all pairs) against the explicit loop: two float64 sums of
    # the same terms in different orders, so they agree to the float64 rounding bound.
    G, T, correct, lengths = GROUP_CASES[case]
    hidden, logits, tokens, mask, correct = make_group(
        G, T, 3, 9, seed=40 + case, correct=correct, lengths=lengths, id_range=6
    )
    ids = None if vocab == "full" else generated_ids(tokens, mask)
    expected = naive_pair_sums(hidden, logits, tokens, mask, correct, vocab_ids=ids)
    got = token_scores_reference(hidden, logits, tokens, mask, correct, vocab=vocab)
    assert got.dtype == torch.float64
    tol64 = score_atol(hidden, logits, tokens, mask, correct, F64, vocab_ids=ids)
    torch.testing.assert_close(got, expected, rtol=0, atol=2 * tol64)  # both sides round: twice it


@pytest.mark.parametrize("vocab", ["full", "generated"])
@pytest.mark.parametrize("chunk_size", [1, 3, None])
def test_token_scores_from_hidden_equals_token_scores(vocab, chunk_size):
    G, T, d, V = 5, 6, 7, 17
    gen = torch.Generator().manual_seed(7)
    hidden = torch.randn(G, T, d, generator=gen)
    weight = torch.randn(V, d, generator=gen) / 2
    bias = torch.randn(V, generator=gen)
    temperature = 0.7
    tokens = torch.randint(0, 9, (G, T), generator=gen)
    mask = torch.arange(T)[None, :] < torch.tensor([6, 2, 5, 6, 3])[:, None]
    correct = torch.tensor([True, False, True, False, False])
    logits64 = (hidden.double() @ weight.double().T + bias.double()) / temperature
    expected = token_scores_reference(hidden, logits64, tokens, mask, correct, vocab=vocab)
    got = token_scores_from_hidden(
        hidden,
        weight,
        tokens,
        mask,
        correct,
        temperature=temperature,
        lm_head_bias=bias,
        vocab=vocab,
        chunk_size=chunk_size,
    )
    ids = None if vocab == "full" else generated_ids(tokens, mask)
    # float32 scores from float32 logits h·W (d-term products): both roundings enter the bound
    err = logit_err(hidden, weight, bias, temperature, F32)
    tol32 = score_atol(hidden, logits64, tokens, mask, correct, F32, vocab_ids=ids, logit_err=err)
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=tol32)
    chunked = token_scores(
        hidden,
        logits64,
        tokens,
        mask,
        correct,
        vocab=vocab,
        dtype=torch.float64,
        chunk_size=chunk_size,
    )
    tol64 = score_atol(hidden, logits64, tokens, mask, correct, F64, vocab_ids=ids)
    torch.testing.assert_close(chunked, expected, rtol=0, atol=2 * tol64)  # both sides round


def test_token_scores_from_hidden_without_bias_and_low_precision_inputs():
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(3, 4, 6, generator=gen)
    weight = torch.randn(10, 6, generator=gen)
    tokens = torch.randint(0, 10, (3, 4), generator=gen)
    mask = torch.ones(3, 4, dtype=torch.bool)
    correct = torch.tensor([True, False, True])
    h16, w16 = hidden.bfloat16(), weight.bfloat16()  # bf16 values are exact in float64
    logits = h16.double() @ w16.double().T
    expected = token_scores_reference(h16, logits, tokens, mask, correct)
    got = token_scores_from_hidden(
        h16, w16, tokens, mask, correct, vocab="full", dtype=torch.float64
    )
    assert got.dtype == torch.float64
    err = logit_err(h16, w16, None, 1.0, F64)  # float64 logits on both sides
    tol64 = score_atol(h16, logits, tokens, mask, correct, F64, logit_err=2 * err)
    torch.testing.assert_close(got, expected, rtol=0, atol=2 * tol64)


def test_token_scores_errors():
    hidden, logits, tokens, mask, correct = make_group(2, 3, 4, 5, seed=0, correct=[True, False])
    with pytest.raises(ValueError, match="vocab='sparse'"):
        token_scores(hidden, logits, tokens, mask, correct, vocab="sparse")
    with pytest.raises(ValueError, match="`tokens`"):
        token_scores(hidden, logits, tokens[:, :2], mask, correct)
    with pytest.raises(ValueError, match="`correct`"):
        token_scores(hidden, logits, tokens, mask, correct[:1])
    with pytest.raises(ValueError, match="vocabulary size"):
        token_scores(hidden, logits, tokens.masked_fill(mask, 5), mask, correct)
    with pytest.raises(ValueError, match="lm_head_weight"):
        token_scores_from_hidden(hidden, torch.randn(5, 3), tokens, mask, correct)
    with pytest.raises(ValueError, match="anchor='mine'"):
        token_scores(hidden, logits, tokens, mask, correct, anchor="mine")
    with pytest.raises(ValueError, match="return_self_pairs=True means anchor='no_self_token'"):
        token_scores(hidden, logits, tokens, mask, correct, return_self_pairs=True, anchor="all")
    with pytest.raises(ValueError, match="softcap must be None or a positive number"):
        token_scores_from_hidden(hidden, torch.randn(5, 4), tokens, mask, correct, softcap=0.0)


# --------------------------------------------------------------------------------------------
# Self pairs, anchors and self-influence
# --------------------------------------------------------------------------------------------


def anchor_brute_force(hidden, logits, tokens, mask, correct, anchor, vocab_ids=None):
    """(N+,) s̄+_i summing, pair by pair, the terms <g_t,g_k><h_t,h_k> the anchor keeps (float64)"""
    g, h = g_and_h(hidden, logits, tokens, vocab_ids)
    G, T = mask.shape
    out = []
    for i in correct.nonzero().flatten().tolist():
        per_token = []
        for t in range(T):
            if not mask[i, t]:
                continue
            total = 0.0
            for j in range(G):
                if not correct[j] or (anchor == "other_responses" and j == i):
                    continue  # k in correct responses (only other ones for "other_responses")
                for k in range(T):
                    if not mask[j, k] or (anchor == "no_self_token" and (j, k) == (i, t)):
                        continue
                    total += float(g[i, t] @ g[j, k]) * float(h[i, t] @ h[j, k])
            per_token.append(total)
        out.append(sum(per_token) / len(per_token) if per_token else math.nan)
    return torch.tensor(out, dtype=torch.float64)


def self_pair_atol(hidden, logits, tokens, mask, eps, vocab_ids=None, logit_err=0.0, lse_err=0.0):
    """Rounding bound of |g_t|²|h_t|² made as (Σ q² - 2 q_y + 1)·Σ h²: m·eps·4·max |h_t|².

    The g part's terms sum to Σ q² + 2 q_y + 1 <= 4 (|V'| + 4 roundings), Σ h² has d, softmax 16;
    q off by a relative ρ (logits off by logit_err, the log-sum-exp by lse_err: ρ <= 2·logit_err +
    lse_err) moves Σ q² - 2 q_y by at most 4ρ.
    """
    cols = logits.shape[-1] if vocab_ids is None else len(vocab_ids)
    m = cols + hidden.shape[-1] + 16 + (2 * logit_err + lse_err) / eps
    h_sq = hidden.double().square().sum(-1)[mask.bool()]  # (n,) |h_t|²
    return m * eps * 4 * float(h_sq.max())


# three correct responses (5, 2 and 4 tokens), one incorrect; G=4, T=5, d=3, V=7
ANCHOR_GROUP = dict(
    G=4, T=5, d=3, V=7, seed=31, correct=[True, False, True, True], lengths=[5, 3, 2, 4], id_range=5
)


@pytest.mark.parametrize("vocab", ["full", "generated"])
def test_self_pairs_and_self_influence_exclusion(vocab):
    G, T = 4, 5
    hidden, logits, tokens, mask, correct = make_group(
        G, T, 3, 9, seed=11, correct=[True, False, True, True], lengths=[5, 4, 2, 3], id_range=6
    )
    ids = None if vocab == "full" else generated_ids(tokens, mask)
    scores, self_pairs = token_scores(
        hidden,
        logits,
        tokens,
        mask,
        correct,
        vocab=vocab,
        dtype=torch.float64,
        return_self_pairs=True,
    )
    g, h = g_and_h(hidden, logits, tokens, ids)
    torch.testing.assert_close(
        self_pairs,
        (g.square().sum(-1) * h.square().sum(-1)) * mask,
        rtol=0,
        atol=self_pair_atol(hidden, logits, tokens, mask, F64, ids),
    )
    with_self = naive_pair_sums(hidden, logits, tokens, mask, correct, vocab_ids=ids)
    without_self = naive_pair_sums(
        hidden, logits, tokens, mask, correct, vocab_ids=ids, skip_self=True
    )
    lengths = mask.sum(-1).double()
    expected_in = with_self.sum(-1)[correct] / lengths[correct]
    expected_ex = without_self.sum(-1)[correct] / lengths[correct]
    # means of scores within the bound (both sides float64), minus self pairs within theirs
    tol = 2 * score_atol(hidden, logits, tokens, mask, correct, F64, vocab_ids=ids)
    tol_ex = tol + self_pair_atol(hidden, logits, tokens, mask, F64, ids)
    torch.testing.assert_close(self_influence(scores, mask, correct), expected_in, rtol=0, atol=tol)
    no_self = self_influence(scores, mask, correct, anchor="no_self_token", anchor_pairs=self_pairs)
    torch.testing.assert_close(no_self, expected_ex, rtol=0, atol=tol_ex)
    # the older spelling: exclude_self=True with self_pairs, or computed from the inputs
    torch.testing.assert_close(
        self_influence(scores, mask, correct, exclude_self=True, self_pairs=self_pairs),
        expected_ex,
        rtol=0,
        atol=tol_ex,
    )
    from_inputs = self_influence(
        scores,
        mask,
        correct,
        exclude_self=True,
        hidden=hidden,
        logits=logits,
        tokens=tokens,
        vocab=vocab,
    )
    torch.testing.assert_close(from_inputs, expected_ex, rtol=0, atol=tol_ex)
    with pytest.raises(ValueError, match="anchor='no_self_token' needs"):
        self_influence(scores, mask, correct, exclude_self=True)
    with pytest.raises(ValueError, match="exclude_self=False"):
        self_influence(scores, mask, correct, self_pairs=self_pairs)
    with pytest.raises(ValueError, match="not both"):
        self_influence(
            scores, mask, correct, exclude_self=True, self_pairs=self_pairs, anchor_pairs=self_pairs
        )
    with pytest.raises(ValueError, match="exclude_self=True means anchor='no_self_token'"):
        self_influence(scores, mask, correct, exclude_self=True, anchor="other_responses")
    with pytest.raises(ValueError, match="shaped like `scores`"):
        self_influence(scores, mask, correct, anchor_pairs=self_pairs[:, :2])


@pytest.mark.parametrize("anchor", ANCHORS)
@pytest.mark.parametrize("vocab", ["full", "generated"])
def test_anchor_self_influence_and_tau_match_pairwise_brute_force(anchor, vocab):
    cfg = dict(ANCHOR_GROUP)
    sizes = [cfg.pop(k) for k in ("G", "T", "d", "V")]
    hidden, logits, tokens, mask, correct = make_group(*sizes, **cfg)
    ids = None if vocab == "full" else generated_ids(tokens, mask)
    expected = anchor_brute_force(hidden, logits, tokens, mask, correct, anchor, ids)  # (3,)
    if anchor == "other_responses":  # the same from the pairwise reference: s_t against the others
        others = []
        for i in correct.nonzero().flatten().tolist():
            c = correct.clone()
            c[i] = False
            s_i = token_scores_reference(hidden, logits, tokens, mask, c, vocab=vocab)[i]
            others.append(s_i[mask[i]].mean())
        tol64 = 2 * score_atol(hidden, logits, tokens, mask, correct, F64, vocab_ids=ids)
        torch.testing.assert_close(torch.stack(others), expected, rtol=0, atol=tol64)
    for dtype, eps in ((torch.float64, F64), (torch.float32, F32)):
        # s̄+ = mean of s_t minus pairs: two sums within the score bound, 3 with the brute force's
        tol = 3 * score_atol(hidden, logits, tokens, mask, correct, eps, vocab_ids=ids)
        scores, pairs = token_scores(
            hidden, logits, tokens, mask, correct, vocab=vocab, dtype=dtype, anchor=anchor
        )
        s_bar = self_influence(scores, mask, correct, anchor_pairs=pairs)
        torch.testing.assert_close(s_bar.double(), expected, rtol=0, atol=tol)
        computed = self_influence(
            scores,
            mask,
            correct,
            anchor=anchor,
            hidden=hidden,
            logits=logits,
            tokens=tokens,
            vocab=vocab,
        )
        torch.testing.assert_close(computed.double(), expected, rtol=0, atol=tol)
        for beta in (1.0, 0.5, -2.0):
            tau = threshold(scores, mask, correct, beta, anchor_pairs=pairs)
            assert tau == pytest.approx(beta * float(expected.min()), rel=0, abs=abs(beta) * tol)
        # the anchor moves s̄+ only: the scores (of incorrect tokens too) are those without one
        plain = token_scores(hidden, logits, tokens, mask, correct, vocab=vocab, dtype=dtype)
        assert torch.equal(scores, plain)
    # several anchors from one scoring pass: the same pairs as one anchor at a time
    group = (hidden, logits, tokens, mask, correct)
    _, by_anchor = token_scores(*group, vocab=vocab, anchor=ANCHORS)
    assert set(by_anchor) == set(ANCHORS)
    assert torch.equal(by_anchor[anchor], token_scores(*group, vocab=vocab, anchor=anchor)[1])
    if anchor != "all":  # the anchors differ here by far more than the bound
        everything = anchor_brute_force(hidden, logits, tokens, mask, correct, "all", ids)
        tol32 = score_atol(hidden, logits, tokens, mask, correct, F32)
        assert (everything - expected).abs().min() > 1e3 * tol32


@pytest.mark.parametrize("anchor", ANCHORS)
@pytest.mark.parametrize("use_logps", [False, True])
def test_anchor_pairs_from_hidden_match_the_brute_force(anchor, use_logps):
    hidden, weight, b, tokens, mask, correct, temp = _head_group(seed=17)
    logits64 = (hidden.double() @ weight.double().T + b.double()) / temp
    ids = generated_ids(tokens, mask)
    expected = anchor_brute_force(hidden, logits64, tokens, mask, correct, anchor, ids)
    logps = _hand_logps(hidden, weight, b, tokens, mask, temp).float() if use_logps else None
    scores, pairs = token_scores_from_hidden(
        hidden,
        weight,
        tokens,
        mask,
        correct,
        temperature=temp,
        lm_head_bias=b,
        logps=logps,
        anchor=anchor,
        chunk_size=2,
    )
    err = logit_err(hidden, weight, b, temp, F32)
    lse_err = err + F32 * float(logps.abs().max()) if use_logps else 0.0  # z_y and the log-prob
    tol = 3 * score_atol(
        hidden, logits64, tokens, mask, correct, F32, vocab_ids=ids, logit_err=err, lse_err=lse_err
    )
    s_bar = self_influence(scores, mask, correct, anchor_pairs=pairs)
    torch.testing.assert_close(s_bar.double(), expected, rtol=0, atol=tol)


# --------------------------------------------------------------------------------------------
# Threshold and selection (hand-computed)
# --------------------------------------------------------------------------------------------

PAD = 100.0  # scores under padding must be ignored
HAND_SCORES = torch.tensor(
    [
        [2.0, 4.0, PAD],  # correct, mean 3
        [1.0, 2.0, 3.0],  # correct, mean 2 -> min 2
        [2.5, 1.9, -0.5],  # incorrect
        [0.0, 5.0, PAD],  # incorrect
    ]
)
HAND_MASK = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 1, 1], [1, 1, 0]], dtype=torch.bool)
HAND_CORRECT = torch.tensor([True, True, False, False])


@pytest.mark.parametrize(
    ("beta", "tau", "row2", "row3"),
    [
        (1.0, 2.0, [1, 0, 0], [0, 1, 0]),
        (0.5, 1.0, [1, 1, 0], [0, 1, 0]),
        (0.0, 0.0, [1, 1, 0], [0, 1, 0]),
        (-math.inf, -math.inf, [1, 1, 1], [1, 1, 0]),
    ],
)
def test_threshold_and_selection_by_hand(beta, tau, row2, row3):
    # means of small integers (6/2, 6/3) are exact in binary: no tolerance
    torch.testing.assert_close(
        self_influence(HAND_SCORES, HAND_MASK, HAND_CORRECT),
        torch.tensor([3.0, 2.0]),
        rtol=0,
        atol=0,
    )
    assert threshold(HAND_SCORES, HAND_MASK, HAND_CORRECT, beta) == tau
    expected = torch.tensor([[0, 0, 0], [0, 0, 0], row2, row3], dtype=torch.bool)
    assert torch.equal(select_tokens(HAND_SCORES, HAND_MASK, HAND_CORRECT, beta), expected)


def test_threshold_with_anchor_pairs_by_hand():
    # pairs [[1, 1], [0.5, 1.5, 1]] leave s̄+ = (2, 1) exactly: tau = beta · 1, the scores unchanged
    pairs = torch.tensor([[1.0, 1.0, 7.0], [0.5, 1.5, 1.0], [9.0, 9.0, 9.0], [9.0, 9.0, 9.0]])
    hand = (HAND_SCORES, HAND_MASK, HAND_CORRECT)
    torch.testing.assert_close(
        self_influence(*hand, anchor_pairs=pairs), torch.tensor([2.0, 1.0]), rtol=0, atol=0
    )
    assert threshold(*hand, 1.0, anchor_pairs=pairs) == 1.0
    assert threshold(*hand, 1.0, self_pairs=pairs) == 1.0  # the older name
    expected = torch.tensor([[0, 0, 0], [0, 0, 0], [1, 1, 0], [0, 1, 0]], dtype=torch.bool)
    assert torch.equal(select_tokens(*hand, 1.0, anchor_pairs=pairs), expected)
    with pytest.raises(ValueError, match="not both"):
        threshold(HAND_SCORES, HAND_MASK, HAND_CORRECT, 1.0, anchor_pairs=pairs, self_pairs=pairs)


def test_threshold_negative_minimum_and_edge_cases():
    scores = torch.tensor([[-3.0, -1.0], [-4.0, 0.5], [-2.5, -1.5]])
    mask = torch.ones(3, 2, dtype=torch.bool)
    correct = torch.tensor([True, False, False])
    assert threshold(scores, mask, correct, 1.0) == -2.0
    assert threshold(scores, mask, correct, 0.0) == 0.0
    assert threshold(scores, mask, correct, -math.inf) == -math.inf  # not IEEE's (-inf)·(-2) = +inf
    assert torch.equal(
        select_tokens(scores, mask, correct, 1.0),
        torch.tensor([[False, False], [False, True], [False, True]]),
    )
    assert torch.equal(
        select_tokens(scores, mask, correct, -math.inf),
        torch.tensor([[0, 0], [1, 1], [1, 1]]).bool(),
    )
    nobody = torch.zeros(3, dtype=torch.bool)
    assert threshold(scores, mask, nobody, 1.0) == math.inf
    assert not select_tokens(scores, mask, nobody, 0.0).any()
    with pytest.raises(ValueError, match="beta"):
        threshold(scores, mask, correct, math.nan)


# --------------------------------------------------------------------------------------------
# eta, reweighting, random control
# --------------------------------------------------------------------------------------------

ETA_TABLE_G8 = {  # p = 0/8 .. 8/8
    "two_abs": [1.0, 0.75, 0.5, 0.25, 0.0, 0.25, 0.5, 0.75, 1.0],
    "p": [0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0],
    "one_minus_p": [1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0.0],
}


@pytest.mark.parametrize("schedule", ETA_SCHEDULES)
def test_eta_table_for_group_of_8(schedule):
    # multiples of 1/8 and their sums and differences are exact in binary: no tolerance
    expected = ETA_TABLE_G8[schedule]
    for n_pos in range(9):
        assert eta_for(n_pos / 8, schedule) == expected[n_pos]
    p = torch.arange(9, dtype=torch.float64) / 8
    torch.testing.assert_close(
        eta_for(p, schedule), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=0
    )


def test_eta_constant_and_errors():
    assert eta_for(0.375, 0.0) == 0.0
    assert eta_for(0.375, 0.3) == 0.3
    torch.testing.assert_close(
        eta_for(torch.tensor([0.25, 0.5]), 0.5), torch.tensor([0.5, 0.5]), rtol=0, atol=0
    )
    with pytest.raises(ValueError, match="'sqrt'"):
        eta_for(0.5, "sqrt")
    with pytest.raises(ValueError, match="p must lie"):
        eta_for(1.5)


def test_reweight_advantages():
    # products by 0, 0.25, 0.5 and 9 of small integers are exact in binary: no tolerance
    adv = torch.tensor([[1.0, 1.0, 0.0], [-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]])
    sel = torch.tensor([[0, 0, 0], [1, 0, 1], [0, 1, 0]], dtype=torch.bool)
    expected = torch.tensor([[1.0, 1.0, 0.0], [-0.5, -2.0, -1.5], [-1.0, -0.5, -1.0]])
    torch.testing.assert_close(reweight_advantages(adv, sel, 0.5), expected, rtol=0, atol=0)
    per_row = torch.tensor([9.0, 0.0, 0.25])
    expected_rows = torch.tensor([[1.0, 1.0, 0.0], [0.0, -2.0, 0.0], [-1.0, -0.25, -1.0]])
    torch.testing.assert_close(
        reweight_advantages(adv, sel, per_row), expected_rows, rtol=0, atol=0
    )
    torch.testing.assert_close(
        reweight_advantages(adv, sel, per_row[:, None]), expected_rows, rtol=0, atol=0
    )
    assert torch.equal(adv[1], torch.tensor([-1.0, -2.0, -3.0]))  # input untouched
    with pytest.raises(ValueError, match="does not broadcast"):
        reweight_advantages(adv, sel, torch.ones(2))


def test_random_selection_counts_mask_and_seed():
    G, T = 4, 40
    mask = torch.arange(T)[None, :] < torch.tensor([40, 25, 3, 0])[:, None]
    gen = torch.Generator().manual_seed(0)
    selected = mask & (torch.rand(G, T, generator=gen) < 0.3)
    selected[2] = mask[2]  # a row fully selected
    a = random_selection(selected, mask, seed=5)
    assert torch.equal(a.sum(-1), selected.sum(-1))
    assert not (a & ~mask).any()
    assert torch.equal(a, random_selection(selected, mask, seed=5))
    assert not torch.equal(a, random_selection(selected, mask, seed=6))
    assert not torch.equal(a[0], selected[0])
    with pytest.raises(ValueError, match=r"row\(s\) \[3\]"):
        random_selection(
            selected | torch.tensor([[0] * T] * 3 + [[1] + [0] * (T - 1)]).bool(), mask, seed=0
        )


def test_random_selection_is_uniform_over_valid_tokens():
    mask = torch.tensor([[1, 1, 1, 1, 0]], dtype=torch.bool)
    selected = torch.tensor([[1, 0, 0, 0, 0]], dtype=torch.bool)
    counts = sum(random_selection(selected, mask, seed=s).long() for s in range(800))
    assert counts[0, 4] == 0
    # 200 each expected; ±50 is 4.1 standard deviations of Binomial(800, 1/4) (sd 12.2)
    assert (counts[0, :4] > 150).all() and (counts[0, :4] < 250).all()


# --------------------------------------------------------------------------------------------
# The trainer hook
# --------------------------------------------------------------------------------------------


def _hook_batch():
    """Two groups of 4: group 0 mixed (2 right), group 1 all wrong, with nonzero advantages
    everywhere."""
    G, T, d, V = 4, 6, 5, 13
    gen = torch.Generator().manual_seed(4)
    hidden = torch.randn(2 * G, T, d, generator=gen)
    weight = torch.randn(V, d, generator=gen)
    bias = torch.randn(V, generator=gen) / 4
    ids = torch.randint(0, V, (2 * G, T), generator=gen)
    lengths = torch.tensor([6, 4, 5, 6, 3, 6, 2, 5])
    mask = torch.arange(T)[None, :] < lengths[:, None]
    rewards = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    sign = torch.where(rewards.reshape(-1, 1) > 0.5, 1.0, -1.0)  # (2G, 1): A < 0 on wrong answers
    advantages = (torch.randn(2 * G, 1, generator=gen).abs() * sign * mask).float()
    return SimpleNamespace(
        advantages=advantages,
        rewards=rewards,
        group_size=G,
        completion_ids=ids,
        completion_mask=mask.long(),
        hidden=hidden,
        lm_head_weight=weight,
        lm_head_bias=bias,
        temperature=0.8,
    )


def _hook_reference(ctx, config, softcap=None, logps=None):
    """Float64 scores, tau, selection and the score bound of ctx's mixed group 0, pair by pair.

    ``logps``: the float32 log-probs the hook reads its log-sum-exp from (their rounding counts).
    """
    rows = slice(0, 4)
    h, ids = ctx.hidden[rows], ctx.completion_ids[rows]
    mask, correct = ctx.completion_mask[rows].bool(), ctx.rewards[0] > 0.5
    z = h.double() @ ctx.lm_head_weight.double().T + ctx.lm_head_bias.double()
    logits = (z if softcap is None else torch.tanh(z / softcap) * softcap) / ctx.temperature
    vocab_ids = None if config.vocab == "full" else generated_ids(ids, mask)
    scores = token_scores_reference(h, logits, ids, mask, correct, vocab=config.vocab)
    s_bar = anchor_brute_force(h, logits, ids, mask, correct, config.anchor, vocab_ids)
    tau = config.beta * float(s_bar.min())
    err = logit_err(h, ctx.lm_head_weight, ctx.lm_head_bias, ctx.temperature, F32)
    lse_err = 0.0 if logps is None else err + F32 * float(logps[rows].abs().max())
    tol = score_atol(
        h, logits, ids, mask, correct, F32, vocab_ids=vocab_ids, logit_err=err, lse_err=lse_err
    )
    return scores, tau, (~correct)[:, None] & mask & (scores > tau), tol


@pytest.mark.parametrize(
    "config",
    [
        NTHRConfig(),
        NTHRConfig(beta=0.0, eta="p", vocab="full"),
        NTHRConfig(beta=0.5, eta=0.0, anchor="no_self_token"),
        NTHRConfig(beta=0.5, eta=0.0, anchor="other_responses"),
        NTHRConfig(beta=0.3, eta="p", vocab="full", anchor="other_responses"),
    ],
)
def test_hook_matches_manual_composition(config):
    ctx = _hook_batch()
    hook = nthr_advantage_fn(config)
    assert hook.needs_hidden is True
    assert "beta=" in repr(hook) and config.vocab in repr(hook)
    new_adv, metrics = hook(ctx)
    # homogeneous group untouched
    assert torch.equal(new_adv[4:], ctx.advantages[4:])
    # the float64 pairwise composition for the mixed group
    rows = slice(0, 4)
    mask = ctx.completion_mask[rows].bool()
    correct = ctx.rewards[0] > 0.5
    scores, tau, selected, tol = _hook_reference(ctx, config)
    negative = (~correct)[:, None] & mask
    assert 0 < selected.sum() < negative.sum()  # the example selects some, not all
    # no incorrect score lies within the rounding bounds of tau (3: s̄+ and pairs): same selection
    assert float((scores[negative] - tau).abs().min()) > 3 * tol + 3 * abs(config.beta) * tol
    eta = eta_for(0.5, config.eta)
    expected = reweight_advantages(ctx.advantages[rows], selected, eta)
    assert torch.equal(new_adv[rows], expected)  # the same selection gives the same products
    assert not torch.equal(new_adv[rows], ctx.advantages[rows]) or eta == 1.0
    assert metrics["nthr/mixed_groups"] == 1.0
    assert metrics["nthr/selected_frac"] == selected.sum().item() / negative.sum().item()
    assert metrics["nthr/tau_mean"] == pytest.approx(tau, rel=0, abs=3 * abs(config.beta) * tol)
    score_mean = scores[negative].mean().item()
    assert metrics["nthr/score_mean"] == pytest.approx(score_mean, rel=0, abs=tol)
    assert metrics["nthr/eta_mean"] == eta


def test_group_selection_is_the_hooks_step():
    ctx = _hook_batch()
    config = NTHRConfig(beta=0.5, anchor="other_responses")
    mask, correct = ctx.completion_mask[:4].bool(), ctx.rewards[0] > 0.5
    scores, tau, selected = group_selection(
        ctx.hidden[:4],
        ctx.lm_head_weight,
        ctx.completion_ids[:4],
        mask,
        correct,
        config,
        temperature=ctx.temperature,
        lm_head_bias=ctx.lm_head_bias,
    )
    ref_scores, ref_tau, ref_selected, tol = _hook_reference(ctx, config)
    torch.testing.assert_close(scores.double(), ref_scores, rtol=0, atol=tol)
    assert tau == pytest.approx(ref_tau, rel=0, abs=3 * 0.5 * tol)
    assert torch.equal(selected, ref_selected)
    _, metrics = nthr_advantage_fn(config)(ctx)
    assert metrics["nthr/tau_mean"] == tau


def test_config_anchor_and_the_deprecated_exclude_self():
    with pytest.warns(DeprecationWarning, match="anchor='no_self_token'"):
        old = NTHRConfig(exclude_self=True)
    assert old == NTHRConfig(anchor="no_self_token")
    assert old.anchor == "no_self_token" and old.exclude_self
    assert NTHRConfig(anchor="no_self_token").exclude_self is True
    assert NTHRConfig(anchor="other_responses").exclude_self is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new spelling and copies of it do not warn
        NTHRConfig(anchor="no_self_token")
        nthr_advantage_fn(NTHRConfig(anchor="no_self_token"))
    with pytest.raises(ValueError, match="anchor='mine'"):
        NTHRConfig(anchor="mine")
    with pytest.raises(ValueError, match="exclude_self=True means anchor='no_self_token'"):
        NTHRConfig(exclude_self=True, anchor="other_responses")
    # the hook's repr is what a finished run records: "all" and "no_self_token" read as before the
    # anchor existed (exclude_self=False / True), "other_responses" is named
    assert (
        repr(nthr_advantage_fn())
        == "NTHRAdvantageHook(beta=1.0, eta='two_abs', vocab='generated', exclude_self=False)"
    )
    assert (
        repr(nthr_advantage_fn(anchor="no_self_token"))
        == "NTHRAdvantageHook(beta=1.0, eta='two_abs', vocab='generated', exclude_self=True)"
    )
    assert repr(nthr_advantage_fn(anchor="other_responses")) == (
        "NTHRAdvantageHook(beta=1.0, eta='two_abs', vocab='generated', exclude_self=False, "
        "anchor='other_responses')"
    )
    other = NTHRConfig(anchor="other_responses")
    assert nthr_advantage_fn(anchor="other_responses").config == other


def test_hook_keyword_form_and_no_mixed_group():
    hook = nthr_advantage_fn(beta=-math.inf, eta="one_minus_p", vocab="full")
    assert hook.config == NTHRConfig(beta=-math.inf, eta="one_minus_p", vocab="full")
    ctx = _hook_batch()
    new_adv, metrics = hook(ctx)
    negative = (ctx.rewards[0] < 0.5)[:, None] & ctx.completion_mask[:4].bool()
    assert metrics["nthr/selected_frac"] == 1.0  # beta = -inf selects every incorrect token
    # eta = 1 - 1/2 = 0.5 times A: exact in binary
    halved = torch.where(negative, 0.5 * ctx.advantages[:4], ctx.advantages[:4])
    torch.testing.assert_close(new_adv[:4], halved, rtol=0, atol=0)
    ctx.rewards = torch.zeros(2, 4)
    new_adv, metrics = hook(ctx)
    assert torch.equal(new_adv, ctx.advantages)
    assert metrics["nthr/mixed_groups"] == 0.0 and math.isnan(metrics["nthr/selected_frac"])
    with pytest.raises(ValueError, match="vocab='x'"):
        NTHRConfig(vocab="x")
    with pytest.raises(ValueError, match="'bad'"):
        nthr_advantage_fn(eta="bad")


# --------------------------------------------------------------------------------------------
# Soft-capped logits (Gemma's final_logit_softcapping)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("vocab", ["full", "generated"])
@pytest.mark.parametrize("use_logps", [False, True])
def test_softcap_scores_match_the_reference_on_capped_logits(vocab, use_logps):
    hidden, weight, b, tokens, mask, correct, temp = _head_group(seed=13)
    weight, cap = weight * 4, 3.0  # logits of several units: a cap of 3 bends them
    z = hidden.double() @ weight.double().T + b.double()
    capped = torch.tanh(z / cap) * cap / temp  # (G, T, V) float64, capped before the temperature
    assert (z.abs() > 2 * cap).any()
    expected = token_scores_reference(hidden, capped, tokens, mask, correct, vocab=vocab)
    logps = torch.log_softmax(capped, -1).gather(-1, tokens[..., None]).squeeze(-1) * mask
    kw = dict(temperature=temp, lm_head_bias=b, vocab=vocab)
    got = token_scores_from_hidden(
        hidden,
        weight,
        tokens,
        mask,
        correct,
        softcap=cap,
        logps=logps.float() if use_logps else None,
        **kw,
    )
    ids = None if vocab == "full" else generated_ids(tokens, mask)
    err = logit_err(hidden, weight, b, temp, F32)
    lse_err = err + F32 * float(logps.abs().max()) if use_logps else 0.0  # z_y and the log-prob
    tol = score_atol(
        hidden, capped, tokens, mask, correct, F32, vocab_ids=ids, logit_err=err, lse_err=lse_err
    )
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=tol)
    uncapped = token_scores_from_hidden(hidden, weight, tokens, mask, correct, **kw)
    assert (uncapped.double() - expected).abs().max() > 100 * tol  # the test sees a missing cap


def test_hook_reads_the_softcap_from_ctx():
    ctx = _hook_batch()
    config = NTHRConfig(beta=0.0, vocab="full")
    ctx.softcap = 2.0
    _, metrics = nthr_advantage_fn(config)(ctx)
    scores, tau, selected, tol = _hook_reference(ctx, config, softcap=2.0)
    negative = (ctx.rewards[0] < 0.5)[:, None] & ctx.completion_mask[:4].bool()
    score_mean = scores[negative].mean().item()
    assert metrics["nthr/score_mean"] == pytest.approx(score_mean, rel=0, abs=tol)
    assert metrics["nthr/selected_frac"] == selected.sum().item() / negative.sum().item()
    ctx.softcap = None
    _, plain = nthr_advantage_fn(config)(ctx)
    assert abs(plain["nthr/score_mean"] - metrics["nthr/score_mean"]) > 100 * tol


# --------------------------------------------------------------------------------------------
# The log-probs shortcut: lse_t = z_t[y_t] - logps_t, only the |V*| rows of the head
# --------------------------------------------------------------------------------------------


def _head_group(seed=9, G=5, T=6, d=7, V=40, id_range=12, bias=True):
    """hidden, weight, bias, tokens (ids < id_range), right-padded mask, correct, temperature."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(G, T, d, generator=gen)
    weight = torch.randn(V, d, generator=gen) / 2
    b = torch.randn(V, generator=gen) if bias else None
    tokens = torch.randint(0, id_range, (G, T), generator=gen)
    mask = torch.arange(T)[None, :] < torch.tensor([6, 2, 5, 6, 3])[:G, None]
    correct = torch.tensor([True, False, True, False, False])[:G]
    return hidden, weight, b, tokens, mask, correct, 0.7


def _hand_logps(hidden, weight, bias, tokens, mask, temperature):
    """log softmax((h Wᵀ + b) / temperature) at the token ids, float64, 0 off mask."""
    logits = hidden.double() @ weight.double().T
    if bias is not None:
        logits = logits + bias.double()
    logps = torch.log_softmax(logits / temperature, -1).gather(-1, tokens[..., None]).squeeze(-1)
    return logps * mask


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("chunk_size", [2, None])
def test_generated_scores_with_logps_equal_the_full_softmax_path(bias, chunk_size):
    hidden, weight, b, tokens, mask, correct, temp = _head_group(bias=bias)
    logps = _hand_logps(hidden, weight, b, tokens, mask, temp)
    # independent reference: the naive pair loop on q = full softmax, g restricted to V* (no
    # renormalising)
    logits = (hidden.double() @ weight.double().T + (0 if b is None else b.double())) / temp
    ids = generated_ids(tokens, mask)
    expected = naive_pair_sums(hidden, logits, tokens, mask, correct, vocab_ids=ids)
    kw = dict(temperature=temp, lm_head_bias=b, chunk_size=chunk_size, return_self_pairs=True)
    got, sp = token_scores_from_hidden(
        hidden, weight, tokens, mask, correct, logps=logps, dtype=torch.float64, **kw
    )
    err64 = logit_err(hidden, weight, b, temp, F64)
    tol64 = score_atol(
        hidden,
        logits,
        tokens,
        mask,
        correct,
        F64,
        vocab_ids=ids,
        logit_err=err64,
        lse_err=err64 + F64 * float(logps.abs().max()),
    )
    torch.testing.assert_close(got, expected, rtol=0, atol=2 * tol64)  # both sides round in float64
    ref, ref_sp = token_scores_from_hidden(
        hidden, weight, tokens, mask, correct, dtype=torch.float64, **kw
    )
    sp_tol = self_pair_atol(
        hidden,
        logits,
        tokens,
        mask,
        F64,
        ids,
        logit_err=err64,
        lse_err=err64 + F64 * float(logps.abs().max()),
    )
    torch.testing.assert_close(sp, ref_sp, rtol=0, atol=2 * sp_tol)  # both sides within the bound
    got32 = token_scores_from_hidden(
        hidden, weight, tokens, mask, correct, logps=logps.float(), **kw
    )[0]
    err32 = logit_err(hidden, weight, b, temp, F32)
    tol32 = score_atol(
        hidden,
        logits,
        tokens,
        mask,
        correct,
        F32,
        vocab_ids=ids,
        logit_err=err32,
        lse_err=err32 + F32 * float(logps.abs().max()),
    )
    torch.testing.assert_close(got32.double(), expected, rtol=0, atol=tol32)
    # "full" ignores the log-probs (exact): the same result with nonsense logps
    full = token_scores_from_hidden(
        hidden,
        weight,
        tokens,
        mask,
        correct,
        vocab="full",
        temperature=temp,
        lm_head_bias=b,
        dtype=torch.float64,
    )
    full_junk = token_scores_from_hidden(
        hidden,
        weight,
        tokens,
        mask,
        correct,
        vocab="full",
        temperature=temp,
        lm_head_bias=b,
        dtype=torch.float64,
        logps=torch.zeros_like(logps),
    )
    torch.testing.assert_close(full_junk, full, rtol=0, atol=0)


class _TinyLM(torch.nn.Module):
    """A causal LM as grpo.per_token_logps sees one: a backbone (mixing earlier tokens) and a
    biased head."""

    def __init__(self, V=300, d=8):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.embed = torch.nn.Parameter(torch.randn(V, d, generator=gen))
        self.mix = torch.nn.Parameter(torch.randn(d, d, generator=gen) / 3)
        self.head = torch.nn.Linear(d, V)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(V, d, generator=gen))
            self.head.bias.copy_(torch.randn(V, generator=gen))
        self.base_model = self._Backbone(self)

    class _Backbone(torch.nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = [lm]  # a list: no submodule cycle

        def forward(self, input_ids, attention_mask, position_ids, use_cache):
            lm = self.lm[0]
            x = lm.embed[input_ids] * attention_mask[..., None]  # (N, L, d)
            h = torch.tanh(x.cumsum(1) @ lm.mix)  # causal: position i sees tokens <= i
            return SimpleNamespace(last_hidden_state=h)

    def get_output_embeddings(self):
        return self.head


def test_logps_from_per_token_logps_on_a_tiny_model():
    from nthr_book.grpo import per_token_logps

    model = _TinyLM()
    G, P, T, temp = 4, 3, 7, 0.8
    gen = torch.Generator().manual_seed(1)
    prompt_ids = torch.randint(0, 300, (1, P), generator=gen).expand(G, P)
    completion_ids = torch.randint(
        0, 40, (G, T), generator=gen
    )  # V* a small part of the vocabulary
    completion_mask = torch.arange(T)[None, :] < torch.tensor([7, 4, 6, 2])[:, None]
    completion_ids = completion_ids.masked_fill(~completion_mask, 0)
    input_ids = torch.cat([prompt_ids, completion_ids], 1)
    attention_mask = torch.cat([torch.ones(G, P, dtype=torch.long), completion_mask.long()], 1)
    with torch.no_grad():
        logps, hidden = per_token_logps(
            model, input_ids, attention_mask, completion_mask, temperature=temp, return_hidden=True
        )
    head = model.get_output_embeddings()
    correct = torch.tensor([True, False, True, False])
    kw = dict(temperature=temp, lm_head_bias=head.bias.detach())
    with_logps = token_scores_from_hidden(
        hidden, head.weight.detach(), completion_ids, completion_mask, correct, logps=logps, **kw
    )
    without = token_scores_from_hidden(
        hidden, head.weight.detach(), completion_ids, completion_mask, correct, **kw
    )
    assert without.abs().max() > 0
    # both against the naive pair loop on the full softmax (float64), g restricted to V*
    W, b = head.weight.detach(), head.bias.detach()
    logits = (hidden.double() @ W.double().T + b.double()) / temp
    ids = generated_ids(completion_ids, completion_mask)
    expected = naive_pair_sums(
        hidden, logits, completion_ids, completion_mask, correct, vocab_ids=ids
    )
    # float32 logits here and in per_token_logps; its log-softmax adds a float32 log-sum-exp over V
    err = logit_err(hidden, W, b, temp, F32)
    lse_err = err + (W.shape[0] + 16) * F32 * float(logits.abs().max())
    args = (hidden, logits, completion_ids, completion_mask, correct, F32)
    tol = score_atol(*args, vocab_ids=ids, logit_err=err)
    torch.testing.assert_close(without.double(), expected, rtol=0, atol=tol)
    tol_logps = score_atol(*args, vocab_ids=ids, logit_err=err, lse_err=lse_err)
    torch.testing.assert_close(with_logps.double(), expected, rtol=0, atol=tol_logps)


def test_generated_path_with_logps_never_touches_the_whole_vocabulary():
    # V = 50 000 is far above every other size here (n = 22 tokens, V* <= 12, d = 7): an op output
    # with V elements (a (n, V) logit block, a (V,) bias, a converted (V, d) head) shows up as
    # largest >= V.
    hidden, weight, b, tokens, mask, correct, temp = _head_group(V=50_000)
    logps = _hand_logps(hidden, weight, b, tokens, mask, temp).float()
    kw = dict(temperature=temp, lm_head_bias=b)
    with LargestOutput() as probe:
        with_logps = token_scores_from_hidden(
            hidden, weight, tokens, mask, correct, logps=logps, **kw
        )
    assert probe.largest < 1000
    with LargestOutput() as probe:  # the check can fail: the path without logps forms (c, V) logits
        without = token_scores_from_hidden(hidden, weight, tokens, mask, correct, **kw)
    assert probe.largest >= mask.sum() * 50_000
    logits = (hidden.double() @ weight.double().T + b.double()) / temp  # (G, T, 50 000) float64
    expected = token_scores_reference(hidden, logits, tokens, mask, correct, vocab="generated")
    err = logit_err(hidden, weight, b, temp, F32)
    ids = generated_ids(tokens, mask)
    tol = score_atol(
        hidden,
        logits,
        tokens,
        mask,
        correct,
        F32,
        vocab_ids=ids,
        logit_err=err,
        lse_err=err + F32 * float(logps.abs().max()),
    )
    torch.testing.assert_close(with_logps.double(), expected, rtol=0, atol=tol)
    torch.testing.assert_close(without.double(), expected, rtol=0, atol=tol)


def test_logps_too_large_are_capped_at_the_generated_log_sum_exp():
    # logps = 0 claims p(y_t) = 1, i.e. lse_t = z_t[y_t] <= logsumexp over V*: the cap raises it to
    # the V* log-sum-exp, so q is the softmax renormalised over V* and never sums above 1.
    hidden, weight, b, tokens, mask, correct, temp = _head_group(seed=5)
    ids = generated_ids(tokens, mask)
    logits = (hidden.double() @ weight.double().T + b.double()) / temp
    pos = torch.searchsorted(ids, tokens.clamp(max=int(ids.max())))
    expected = naive_pair_sums(hidden, logits[..., ids], pos, mask, correct)  # softmax over V* only
    got = token_scores_from_hidden(
        hidden,
        weight,
        tokens,
        mask,
        correct,
        temperature=temp,
        lm_head_bias=b,
        logps=torch.zeros(mask.shape),
        dtype=torch.float64,
    )
    err = logit_err(hidden, weight, b, temp, F64)
    tol = score_atol(hidden, logits[..., ids], pos, mask, correct, F64, logit_err=err)
    torch.testing.assert_close(got, expected, rtol=0, atol=2 * tol)  # both sides round in float64


def test_logps_errors():
    hidden, weight, b, tokens, mask, correct, temp = _head_group()
    with pytest.raises(ValueError, match="`logps` must be None or have shape"):
        token_scores_from_hidden(hidden, weight, tokens, mask, correct, logps=torch.zeros(5, 5))
    bad = torch.zeros(mask.shape)
    bad[2, 4] = math.nan
    with pytest.raises(
        ValueError, match=r"`logps` is NaN under `mask` at \(row, column\) \(2, 4\)"
    ):
        token_scores_from_hidden(hidden, weight, tokens, mask, correct, logps=bad)
    bad[2, 4], bad[1, 5] = 0.0, math.nan  # NaN under padding is ignored
    token_scores_from_hidden(hidden, weight, tokens, mask, correct, logps=bad)


def test_hook_uses_old_logps_when_present():
    ctx = _hook_batch()
    V = ctx.lm_head_weight.shape[0]
    hook = nthr_advantage_fn(NTHRConfig(beta=0.0))
    plain_adv, plain_metrics = hook(ctx)
    ctx.old_logps = _hand_logps(
        ctx.hidden,
        ctx.lm_head_weight,
        ctx.lm_head_bias,
        ctx.completion_ids,
        ctx.completion_mask.bool(),
        ctx.temperature,
    ).float()
    assert V > int(
        ctx.completion_ids[:4][ctx.completion_mask[:4].bool()].unique().numel()
    )  # V* is a strict subset
    adv, metrics = hook(ctx)
    assert torch.equal(adv, plain_adv)  # the same selection (no score near tau), the same products
    _, _, _, lse_tol = _hook_reference(ctx, NTHRConfig(beta=0.0), logps=ctx.old_logps)  # >= plain's
    plain_mean = plain_metrics["nthr/score_mean"]
    assert metrics["nthr/score_mean"] == pytest.approx(plain_mean, rel=0, abs=2 * lse_tol)
    ctx.old_logps = torch.zeros_like(
        ctx.old_logps
    )  # wrong log-probs change the scores: they are read
    _, junk_metrics = hook(ctx)
    assert abs(junk_metrics["nthr/score_mean"] - plain_metrics["nthr/score_mean"]) > 100 * lse_tol
    off = nthr_advantage_fn(NTHRConfig(beta=0.0), use_logps=False)
    assert "use_logps=False" in repr(off) and "use_logps" not in repr(hook)
    assert off(ctx)[1]["nthr/score_mean"] == plain_metrics["nthr/score_mean"]
    ctx.old_logps = torch.zeros(8, 5)
    with pytest.raises(ValueError, match="ctx.old_logps must be"):
        hook(ctx)


# ---- apply_to_scores / apply_to_group: the one per-group step after the scores -----------------


def _hand_group():
    """G = 3 (row 0 correct, rows 1-2 incorrect), T = 3, scores chosen by hand, float64."""
    scores = torch.tensor(
        [
            [2.0, 4.0, 0.0],  # correct: s̄+ = 3 (two valid tokens)
            [5.0, 1.0, 3.5],
            [-1.0, 3.0, 9.0],
        ],
        dtype=torch.float64,
    )
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    correct = torch.tensor([True, False, False])
    return scores, mask, correct


def test_apply_to_scores_against_a_hand_computation():
    from nthr_book.nthr import apply_to_scores

    scores, mask, correct = _hand_group()
    adv = torch.tensor([1.4, -0.7, -0.7], dtype=torch.float64)  # (G,) per response
    res = apply_to_scores(scores, mask, correct, adv, NTHRConfig(beta=1.0, eta="two_abs"))
    # tau = 1 · min s̄+ = (2 + 4) / 2 = 3; incorrect valid tokens above 3: (1,0) 5, (1,2) 3.5
    assert res.tau == 3.0
    want_sel = torch.tensor([[0, 0, 0], [1, 0, 1], [0, 0, 0]], dtype=torch.bool)
    assert torch.equal(res.selected, want_sel)  # (2,2) 9.0 is padding, (2,1) 3.0 is not > 3
    # p = 1/3 and 2|0.5 - p|: a subtraction and a doubling, one rounding of a number below 1
    assert res.eta == pytest.approx(2 * abs(0.5 - 1 / 3), rel=0.0, abs=F64)
    want_adv = adv[:, None].expand(3, 3).clone()
    want_adv[1, 0] = want_adv[1, 2] = res.eta * -0.7
    # η·A: one float64 product on each side, rounded once, of size below 0.7
    torch.testing.assert_close(res.new_advantages, want_adv, rtol=0.0, atol=2 * F64 * 0.7)
    assert res.stats == {
        "n_selected": 2.0,
        "n_incorrect_tokens": 5.0,
        "score_sum": 5.0 + 1.0 + 3.5 - 1.0 + 3.0,
    }


def test_apply_to_scores_scales_only_negative_advantages():
    from nthr_book.nthr import apply_to_scores

    scores, mask, correct = _hand_group()
    # a non-binary reward: incorrect row 1 has A > 0, so its selected tokens keep A
    adv = torch.tensor([[1.0, 1.0, 0.0], [0.2, 0.2, 0.2], [-1.2, -1.2, 0.0]], dtype=torch.float64)
    res = apply_to_scores(scores, mask, correct, adv, NTHRConfig(beta=-math.inf, eta=0.0))
    assert res.tau == -math.inf  # every incorrect token is a candidate
    assert not bool(res.selected[1].any())  # A >= 0: never rescaled
    assert torch.equal(res.selected[2], torch.tensor([True, True, False]))
    want = adv.clone()
    want[2, :2] = 0.0  # eta = 0 on the selected tokens of the negative row
    torch.testing.assert_close(res.new_advantages, want, rtol=0.0, atol=0.0)
    # binary rewards: every incorrect row has A < 0, so the rule changes nothing
    binary = torch.tensor([1.4, -0.7, -0.7], dtype=torch.float64)
    res_b = apply_to_scores(scores, mask, correct, binary, NTHRConfig(beta=-math.inf))
    assert torch.equal(res_b.selected, (~correct)[:, None] & mask)


def test_apply_to_scores_needs_the_anchor_pairs():
    from nthr_book.nthr import apply_to_scores

    scores, mask, correct = _hand_group()
    adv = torch.tensor([1.0, -0.5, -0.5], dtype=torch.float64)
    with pytest.raises(ValueError, match="anchor_pairs"):
        apply_to_scores(scores, mask, correct, adv, NTHRConfig(anchor="no_self_token"))
    with pytest.raises(ValueError, match="advantages"):
        apply_to_scores(scores, mask, correct, adv[:2], NTHRConfig())
    pairs = torch.zeros_like(scores)
    pairs[0, :2] = torch.tensor([2.0, 2.0])  # s̄+ = (0 + 2) / 2 = 1 -> tau = 1
    res = apply_to_scores(
        scores, mask, correct, adv, NTHRConfig(anchor="no_self_token"), anchor_pairs=pairs
    )
    assert res.tau == 1.0 and int(res.selected.sum()) == 3  # 5, 3.5 and 3 of the valid incorrect


def _apply_group(seed: int = 3):
    """G = 5 (rows 0, 2 correct), T = 6, d = 6, V = 40 (the generated vocabulary V* is part of it),
    right-padded; a bias, and temperature 0.7."""
    gen = torch.Generator().manual_seed(seed)
    G, T, d, V = 5, 6, 6, 40
    hidden = torch.randn(G, T, d, generator=gen, dtype=torch.float64)
    weight = torch.randn(V, d, generator=gen, dtype=torch.float64)
    bias = 0.5 * torch.randn(V, generator=gen, dtype=torch.float64)
    tokens = torch.randint(0, V, (G, T), generator=gen)
    mask = torch.arange(T)[None, :] < torch.tensor([6, 4, 5, 6, 3])[:, None]
    correct = torch.tensor([True, False, True, False, False])
    return hidden, weight, bias, tokens, mask, correct


APPLY_CASES = [
    # beta, eta, anchor, vocab, dtype, advantages: per response (binary rewards, and one incorrect
    # response with A > 0 as a non-binary reward gives) or per token
    (0.0, "p", "other_responses", "generated", torch.float64, "binary"),
    (0.0, "two_abs", "all", "full", torch.float64, "positive_wrong"),
    (0.3, "one_minus_p", "no_self_token", "generated", torch.float64, "per_token"),
    (0.3, 0.25, "other_responses", "full", torch.float32, "binary"),
    (1.0, "two_abs", "all", "generated", torch.float32, "binary"),
    (-math.inf, 0.0, "no_self_token", "generated", torch.float64, "positive_wrong"),
    (-0.5, "p", "all", "full", torch.float32, "per_token"),
]
TEMPERATURE = 0.7


def _advantages(kind: str, G: int, T: int) -> torch.Tensor:
    if kind == "binary":  # p = 2/5: A± of the population std, as group_advantages gives them
        a_plus, a_minus = (1 - 0.4) / math.sqrt(0.24), -0.4 / math.sqrt(0.24)
        return torch.tensor([a_plus, a_minus, a_plus, a_minus, a_minus], dtype=torch.float64)
    if kind == "positive_wrong":  # row 3 is incorrect with A > 0: never rescaled
        return torch.tensor([1.0, -1.0, 0.7, 0.3, -0.6], dtype=torch.float64)
    gen = torch.Generator().manual_seed(5)  # per token, of either sign
    return torch.randn(G, T, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("beta,eta,anchor,vocab,dtype,adv_kind", APPLY_CASES)
def test_apply_to_group_against_the_definition_in_float64_loops(
    beta, eta, anchor, vocab, dtype, adv_kind
):
    """apply_to_group against naive_scores.naive_nthr: s_t pair by pair, s̄+ per correct response
    under the anchor, tau = beta·min s̄+, s_t > tau on incorrect tokens with A < 0, eta·A there."""
    from naive_scores import naive_nthr

    from nthr_book.nthr import apply_to_group

    hidden, weight, bias, tokens, mask, correct = _apply_group()
    G, T = mask.shape
    adv = _advantages(adv_kind, G, T)
    logits = (hidden @ weight.T + bias) / TEMPERATURE  # (G, T, V) float64
    ref = naive_nthr(
        hidden, logits, tokens, mask, correct, adv, beta=beta, eta=eta, anchor=anchor, vocab=vocab
    )
    cfg = NTHRConfig(beta=beta, eta=eta, anchor=anchor, vocab=vocab)
    h, w, b = (x.to(dtype) for x in (hidden, weight, bias))
    res = apply_to_group(
        h, w, tokens, mask, correct, adv.to(dtype), cfg, temperature=TEMPERATURE,
        lm_head_bias=b, dtype=dtype,
    )  # fmt: skip
    # the scores: each side within its rounding bound of the exact ones (naive_scores.score_atol;
    # inputs rounded to dtype move the logits by logit_err), so within the sum of both
    eps = F64 if dtype == torch.float64 else F32
    ids = generated_ids(tokens, mask) if vocab == "generated" else None
    err = logit_err(hidden, weight, bias, TEMPERATURE, eps)
    tol = score_atol(hidden, logits, tokens, mask, correct, eps, vocab_ids=ids, logit_err=err)
    tol += score_atol(hidden, logits, tokens, mask, correct, F64, vocab_ids=ids)
    torch.testing.assert_close(res.scores.double(), ref["scores"], rtol=0.0, atol=tol)
    # tau: s̄+ is a mean of scores minus the anchor's pairs, each within tol: 2·tol, times |beta|
    tau_tol = 2 * tol * abs(beta) if math.isfinite(beta) else 0.0
    if math.isfinite(beta):
        assert abs(res.tau - ref["tau"]) <= tau_tol
    else:
        assert res.tau == ref["tau"] == -math.inf
    # the selection is decided with a margin: no candidate score lies within the rounding of tau
    candidates = (~correct)[:, None] & mask & ((adv[:, None] if adv.dim() == 1 else adv) < 0)
    gaps = (ref["scores"] - ref["tau"])[candidates].abs()
    assert bool((gaps > tol + tau_tol).all()), "a score lies within rounding of tau: another seed"
    assert torch.equal(res.selected, ref["selected"])
    assert res.eta == pytest.approx(ref["eta"], rel=2 * F64, abs=0.0)  # one or two roundings of p
    # eta·A on the selected tokens: one product rounded in dtype on each side
    new_tol = 2 * eps * float(ref["new_advantages"].abs().max())
    torch.testing.assert_close(
        res.new_advantages.double(), ref["new_advantages"], rtol=0.0, atol=new_tol
    )


def test_apply_to_group_cases_select_part_of_the_tokens():
    """APPLY_CASES exercise the threshold: some select part of the candidates, not none or all."""
    from naive_scores import naive_nthr

    hidden, weight, bias, tokens, mask, correct = _apply_group()
    G, T = mask.shape
    logits = (hidden @ weight.T + bias) / TEMPERATURE
    partial = 0
    for beta, eta, anchor, vocab, _, adv_kind in APPLY_CASES:
        adv = _advantages(adv_kind, G, T)
        ref = naive_nthr(
            hidden, logits, tokens, mask, correct, adv, beta=beta, eta=eta, anchor=anchor,
            vocab=vocab,
        )  # fmt: skip
        candidates = (~correct)[:, None] & mask & ((adv[:, None] if adv.dim() == 1 else adv) < 0)
        n = int(ref["selected"].sum())
        partial += 0 < n < int(candidates.sum())
    assert partial >= 3


def test_group_selection_is_apply_to_group_with_binary_signs():
    """group_selection is apply_to_group with the advantages' signs of binary rewards (the
    definition itself is checked above, against naive_nthr)."""
    from nthr_book.nthr import apply_to_group, eta_for, group_selection

    gen = torch.Generator().manual_seed(3)
    G, T, d, V = 4, 5, 6, 11
    hidden = torch.randn(G, T, d, generator=gen, dtype=torch.float64)
    weight = torch.randn(V, d, generator=gen, dtype=torch.float64)
    tokens = torch.randint(0, V, (G, T), generator=gen)
    mask = torch.ones(G, T, dtype=torch.bool)
    mask[1, 3:] = False
    correct = torch.tensor([True, False, True, False])
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    cfg = NTHRConfig(beta=0.0, eta="p", anchor="other_responses")
    res = apply_to_group(hidden, weight, tokens, mask, correct, adv, cfg, dtype=torch.float64)
    scores, tau, selected = group_selection(
        hidden, weight, tokens, mask, correct, cfg, dtype=torch.float64
    )
    assert res.tau == tau and torch.equal(res.selected, selected)
    torch.testing.assert_close(res.scores, scores, rtol=0.0, atol=0.0)
    assert res.eta == eta_for(0.5, "p") == 0.5
    want = torch.where(selected, 0.5 * adv[:, None], adv[:, None].expand(G, T))
    torch.testing.assert_close(res.new_advantages, want, rtol=0.0, atol=0.0)
