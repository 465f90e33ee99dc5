"""Tests for nthr_book.nthr: every score against a naive float64 pairwise loop (arXiv 2505.18830, §3)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from nthr_book.nthr import (
    ETA_SCHEDULES,
    NTHRConfig,
    eta_for,
    gwhes,
    gwhes_question,
    nthr_advantage_fn,
    random_selection,
    random_topk_overlap_expectation,
    reweight_advantages,
    select_tokens,
    self_influence,
    threshold,
    token_scores,
    token_scores_from_hidden,
    topk_overlap,
)

torch.set_num_threads(1)


# --------------------------------------------------------------------------------------------
# Naive references (float64, explicit loops over token pairs)
# --------------------------------------------------------------------------------------------


def _g_h(hidden, logits, tokens, vocab_ids=None):
    """Float64 g = onehot(y) - softmax(logits) (optionally restricted to vocab_ids) and h."""
    V = logits.shape[-1]
    q = torch.softmax(logits.double(), dim=-1)
    g = torch.nn.functional.one_hot(tokens.clamp(0, V - 1), V).double() - q
    if vocab_ids is not None:
        g = g[..., vocab_ids]
    return g, hidden.double()


def naive_pair_sums(hidden, logits, tokens, mask, source_rows, vocab_ids=None, skip_self=False):
    """(G, T) Σ_{k in valid tokens of source_rows} <g_t,g_k><h_t,h_k>, by a double loop over tokens."""
    g, h = _g_h(hidden, logits, tokens, vocab_ids)
    G, T = mask.shape
    out = torch.zeros(G, T, dtype=torch.float64)
    for i in range(G):
        for t in range(T):
            if not mask[i, t]:
                continue
            total = 0.0
            for j in range(G):
                if not source_rows[j]:
                    continue
                for k in range(T):
                    if not mask[j, k] or (skip_self and (i, t) == (j, k)):
                        continue
                    total += float(g[i, t] @ g[j, k]) * float(h[i, t] @ h[j, k])
            out[i, t] = total
    return out


def generated_ids(tokens, mask):
    """Sorted token ids occurring under the mask (V*)."""
    return torch.unique(tokens[mask.bool()])


def make_group(G, T, d, V, seed, correct, lengths=None, id_range=None):
    """Random group: hidden (G,T,d), logits (G,T,V), tokens, right-padded mask, correct."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(G, T, d, generator=gen)
    logits = 2.0 * torch.randn(G, T, V, generator=gen)
    tokens = torch.randint(0, id_range or V, (G, T), generator=gen)
    if lengths is None:
        lengths = torch.randint(1, T + 1, (G,), generator=gen).tolist()
    mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    tokens = tokens.masked_fill(~mask, 0)  # padding id
    return hidden, logits, tokens, mask, torch.tensor(correct, dtype=torch.bool)


def rel_err(a, b):
    """max |a - b| / max |b| (0 when both vanish)."""
    scale = b.abs().max().item()
    return (a.double() - b).abs().max().item() / scale if scale > 0 else a.abs().max().item()


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
    (8, 6, [True, False, True, True, False, False, True, False], [6, 5, 0, 6, 2, 6, 1, 3]),  # empty row
]


# --------------------------------------------------------------------------------------------
# token_scores
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", range(len(GROUP_CASES)))
def test_token_scores_full_vocab_matches_naive(case):
    G, T, correct, lengths = GROUP_CASES[case]
    hidden, logits, tokens, mask, correct = make_group(G, T, 5, 11, seed=case, correct=correct, lengths=lengths)
    expected = naive_pair_sums(hidden, logits, tokens, mask, correct)
    got = token_scores(hidden, logits, tokens, mask, correct, vocab="full")
    assert got.shape == (G, T) and got.dtype == torch.float32
    assert not got.isnan().any()
    assert (got[~mask] == 0).all()
    if correct.any():
        assert expected.abs().max() > 0
        assert rel_err(got, expected) <= 1e-5
    else:
        assert (got == 0).all()
    got64 = token_scores(hidden, logits, tokens, mask, correct, vocab="full", dtype=torch.float64, chunk_size=2)
    torch.testing.assert_close(got64, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", range(len(GROUP_CASES)))
def test_token_scores_generated_vocab_matches_naive_restriction(case):
    G, T, correct, lengths = GROUP_CASES[case]
    # ids drawn from 0..6 of a 13-word vocabulary, so V* is a strict subset and q is not renormalised
    hidden, logits, tokens, mask, correct = make_group(G, T, 4, 13, seed=100 + case, correct=correct,
                                                       lengths=lengths, id_range=7)
    ids = generated_ids(tokens, mask)
    assert ids.numel() < 13
    expected = naive_pair_sums(hidden, logits, tokens, mask, correct, vocab_ids=ids)
    got = token_scores(hidden, logits, tokens, mask, correct, vocab="generated", dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    got32 = token_scores(hidden, logits, tokens, mask, correct)  # default vocab is "generated"
    if correct.any():
        assert rel_err(got32, expected) <= 1e-5
        full = naive_pair_sums(hidden, logits, tokens, mask, correct)
        assert (full - expected).abs().max() > 1e-6  # the restriction is an approximation


def test_token_scores_hand_example():
    # G=2, T=1, V=2, d=1, uniform logits: q = (1/2, 1/2); y = (0, 1); both correct.
    hidden = torch.tensor([[[1.0]], [[2.0]]])
    logits = torch.zeros(2, 1, 2)
    tokens = torch.tensor([[0], [1]])
    mask = torch.ones(2, 1, dtype=torch.bool)
    # g_0 = (1/2, -1/2), g_1 = (-1/2, 1/2): <g0,g0> = 1/2, <g0,g1> = -1/2; h products 1, 2, 4
    # s_0 = 1/2·1 - 1/2·2 = -1/2 ; s_1 = -1/2·2 + 1/2·4 = 1
    got = token_scores(hidden, logits, tokens, mask, torch.tensor([True, True]), vocab="full")
    torch.testing.assert_close(got, torch.tensor([[-0.5], [1.0]]))
    only_first = token_scores(hidden, logits, tokens, mask, torch.tensor([True, False]), vocab="full")
    torch.testing.assert_close(only_first, torch.tensor([[0.5], [-1.0]]))


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
    logits = (hidden @ weight.T + bias) / temperature
    expected = token_scores(hidden, logits, tokens, mask, correct, vocab=vocab, dtype=torch.float64)
    got = token_scores_from_hidden(hidden, weight, tokens, mask, correct, temperature=temperature,
                                   lm_head_bias=bias, vocab=vocab, chunk_size=chunk_size)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    chunked = token_scores(hidden, logits, tokens, mask, correct, vocab=vocab, dtype=torch.float64,
                           chunk_size=chunk_size)
    torch.testing.assert_close(chunked, expected, rtol=1e-12, atol=1e-12)


def test_token_scores_from_hidden_without_bias_and_low_precision_inputs():
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(3, 4, 6, generator=gen)
    weight = torch.randn(10, 6, generator=gen)
    tokens = torch.randint(0, 10, (3, 4), generator=gen)
    mask = torch.ones(3, 4, dtype=torch.bool)
    correct = torch.tensor([True, False, True])
    logits = hidden.bfloat16().double() @ weight.bfloat16().double().T
    expected = token_scores(hidden.bfloat16(), logits, tokens, mask, correct, vocab="full", dtype=torch.float64)
    got = token_scores_from_hidden(hidden.bfloat16(), weight.bfloat16(), tokens, mask, correct, vocab="full",
                                   dtype=torch.float64)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


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


# --------------------------------------------------------------------------------------------
# Self pairs and self-influence
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("vocab", ["full", "generated"])
def test_self_pairs_and_self_influence_exclusion(vocab):
    G, T = 4, 5
    hidden, logits, tokens, mask, correct = make_group(G, T, 3, 9, seed=11, correct=[True, False, True, True],
                                                       lengths=[5, 4, 2, 3], id_range=6)
    ids = None if vocab == "full" else generated_ids(tokens, mask)
    scores, self_pairs = token_scores(hidden, logits, tokens, mask, correct, vocab=vocab, dtype=torch.float64,
                                      return_self_pairs=True)
    g, h = _g_h(hidden, logits, tokens, ids)
    torch.testing.assert_close(self_pairs, (g.square().sum(-1) * h.square().sum(-1)) * mask)
    with_self = naive_pair_sums(hidden, logits, tokens, mask, correct, vocab_ids=ids)
    without_self = naive_pair_sums(hidden, logits, tokens, mask, correct, vocab_ids=ids, skip_self=True)
    lengths = mask.sum(-1).double()
    expected_in = with_self.sum(-1)[correct] / lengths[correct]
    expected_ex = without_self.sum(-1)[correct] / lengths[correct]
    torch.testing.assert_close(self_influence(scores, mask, correct), expected_in)
    torch.testing.assert_close(self_influence(scores, mask, correct, exclude_self=True, self_pairs=self_pairs),
                               expected_ex)
    from_inputs = self_influence(scores, mask, correct, exclude_self=True, hidden=hidden, logits=logits,
                                 tokens=tokens, vocab=vocab)
    torch.testing.assert_close(from_inputs, expected_ex)
    with pytest.raises(ValueError, match="exclude_self=True needs"):
        self_influence(scores, mask, correct, exclude_self=True)
    with pytest.raises(ValueError, match="exclude_self=False"):
        self_influence(scores, mask, correct, self_pairs=self_pairs)


# --------------------------------------------------------------------------------------------
# Threshold and selection (hand-computed)
# --------------------------------------------------------------------------------------------

PAD = 100.0  # scores under padding must be ignored
HAND_SCORES = torch.tensor([
    [2.0, 4.0, PAD],  # correct, mean 3
    [1.0, 2.0, 3.0],  # correct, mean 2 -> min 2
    [2.5, 1.9, -0.5],  # incorrect
    [0.0, 5.0, PAD],  # incorrect
])
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
    torch.testing.assert_close(self_influence(HAND_SCORES, HAND_MASK, HAND_CORRECT), torch.tensor([3.0, 2.0]))
    assert threshold(HAND_SCORES, HAND_MASK, HAND_CORRECT, beta) == tau
    expected = torch.tensor([[0, 0, 0], [0, 0, 0], row2, row3], dtype=torch.bool)
    assert torch.equal(select_tokens(HAND_SCORES, HAND_MASK, HAND_CORRECT, beta), expected)


def test_threshold_negative_minimum_and_edge_cases():
    scores = torch.tensor([[-3.0, -1.0], [-4.0, 0.5], [-2.5, -1.5]])
    mask = torch.ones(3, 2, dtype=torch.bool)
    correct = torch.tensor([True, False, False])
    assert threshold(scores, mask, correct, 1.0) == -2.0
    assert threshold(scores, mask, correct, 0.0) == 0.0
    assert threshold(scores, mask, correct, -math.inf) == -math.inf  # not IEEE's (-inf)·(-2) = +inf
    assert torch.equal(select_tokens(scores, mask, correct, 1.0),
                       torch.tensor([[False, False], [False, True], [False, True]]))
    assert torch.equal(select_tokens(scores, mask, correct, -math.inf), torch.tensor([[0, 0], [1, 1], [1, 1]]).bool())
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
    expected = ETA_TABLE_G8[schedule]
    for n_pos in range(9):
        assert eta_for(n_pos / 8, schedule) == pytest.approx(expected[n_pos], abs=1e-12)
    p = torch.arange(9, dtype=torch.float64) / 8
    torch.testing.assert_close(eta_for(p, schedule), torch.tensor(expected, dtype=torch.float64))


def test_eta_constant_and_errors():
    assert eta_for(0.375, 0.0) == 0.0
    assert eta_for(0.375, 0.3) == 0.3
    torch.testing.assert_close(eta_for(torch.tensor([0.25, 0.5]), 0.5), torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="'sqrt'"):
        eta_for(0.5, "sqrt")
    with pytest.raises(ValueError, match="p must lie"):
        eta_for(1.5)


def test_reweight_advantages():
    adv = torch.tensor([[1.0, 1.0, 0.0], [-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]])
    sel = torch.tensor([[0, 0, 0], [1, 0, 1], [0, 1, 0]], dtype=torch.bool)
    expected = torch.tensor([[1.0, 1.0, 0.0], [-0.5, -2.0, -1.5], [-1.0, -0.5, -1.0]])
    torch.testing.assert_close(reweight_advantages(adv, sel, 0.5), expected)
    per_row = torch.tensor([9.0, 0.0, 0.25])
    expected_rows = torch.tensor([[1.0, 1.0, 0.0], [0.0, -2.0, 0.0], [-1.0, -0.25, -1.0]])
    torch.testing.assert_close(reweight_advantages(adv, sel, per_row), expected_rows)
    torch.testing.assert_close(reweight_advantages(adv, sel, per_row[:, None]), expected_rows)
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
        random_selection(selected | torch.tensor([[0] * T] * 3 + [[1] + [0] * (T - 1)]).bool(), mask, seed=0)


def test_random_selection_is_uniform_over_valid_tokens():
    mask = torch.tensor([[1, 1, 1, 1, 0]], dtype=torch.bool)
    selected = torch.tensor([[1, 0, 0, 0, 0]], dtype=torch.bool)
    counts = sum(random_selection(selected, mask, seed=s).long() for s in range(800))
    assert counts[0, 4] == 0
    assert (counts[0, :4] > 150).all() and (counts[0, :4] < 250).all()  # 200 each expected


# --------------------------------------------------------------------------------------------
# GWHES and top-K overlap
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("vocab", ["full", "generated"])
@pytest.mark.parametrize("correct", [[True, False, False, True, False], [False, True, False, False, False]])
def test_gwhes_matches_naive(vocab, correct):
    hidden, logits, tokens, mask, correct = make_group(5, 4, 3, 8, seed=21, correct=correct,
                                                       lengths=[4, 3, 4, 1, 2], id_range=6)
    ids = None if vocab == "full" else generated_ids(tokens, mask)
    to_pos = naive_pair_sums(hidden, logits, tokens, mask, correct, vocab_ids=ids).sum(-1)[correct]
    to_neg = naive_pair_sums(hidden, logits, tokens, mask, ~correct, vocab_ids=ids).sum(-1)[correct]
    p = correct.double().mean().item()
    sd = math.sqrt(p * (1 - p))
    expected = (p / sd) * to_neg - ((1 - p) / sd) * to_pos
    got = gwhes(hidden, logits, tokens, mask, correct, vocab=vocab, dtype=torch.float64, chunk_size=3)
    torch.testing.assert_close(got, expected)
    assert gwhes_question(hidden, logits, tokens, mask, correct, vocab=vocab) == pytest.approx(
        expected.mean().item(), rel=1e-5)


def test_gwhes_homogeneous_groups():
    hidden, logits, tokens, mask, _ = make_group(3, 4, 3, 8, seed=2, correct=[True, True, True])
    assert gwhes(hidden, logits, tokens, mask, torch.ones(3, dtype=torch.bool)).isnan().all()
    assert math.isnan(gwhes_question(hidden, logits, tokens, mask, torch.ones(3, dtype=torch.bool)))
    assert gwhes(hidden, logits, tokens, mask, torch.zeros(3, dtype=torch.bool)).numel() == 0
    assert math.isnan(gwhes_question(hidden, logits, tokens, mask, torch.zeros(3, dtype=torch.bool)))


def test_topk_overlap_by_hand():
    a = [5.0, 4.0, 3.0, 2.0, 1.0]
    assert topk_overlap(a, a, 2) == 1.0
    assert topk_overlap(a, [1.0, 2.0, 3.0, 4.0, 5.0], 2) == 0.0
    assert topk_overlap(a, [1.0, 2.0, 3.0, 4.0, 5.0], 3) == pytest.approx(1 / 3)
    assert topk_overlap(a, torch.tensor([0.9, -1.0, 0.8, 0.0, 3.0]), 3) == pytest.approx(2 / 3)
    assert topk_overlap(a, [0.0, 0.0, 0.0, 0.0, 0.0], 1) == 1.0  # ties: lower index first
    assert topk_overlap(a, [9.0, 0.0, 0.0, 0.0, 0.0], 5) == 1.0
    with pytest.raises(ValueError, match="same items"):
        topk_overlap(a, a[:4], 2)
    with pytest.raises(ValueError, match="k must lie"):
        topk_overlap(a, a, 6)


def test_random_topk_overlap_expectation_matches_paper_baselines():
    assert random_topk_overlap_expectation(57, 10) == pytest.approx(0.175, abs=6e-4)
    assert random_topk_overlap_expectation(47, 10) == pytest.approx(0.213, abs=6e-4)
    assert random_topk_overlap_expectation(57, 15) == pytest.approx(0.263, abs=6e-4)
    assert random_topk_overlap_expectation(47, 15) == pytest.approx(0.319, abs=6e-4)
    gen = torch.Generator().manual_seed(0)
    fixed = torch.arange(20.0)
    mean = sum(topk_overlap(fixed, torch.randperm(20, generator=gen).double(), 5) for _ in range(2000)) / 2000
    assert mean == pytest.approx(5 / 20, abs=0.02)


# --------------------------------------------------------------------------------------------
# The trainer hook
# --------------------------------------------------------------------------------------------


def _hook_batch():
    """Two groups of 4: group 0 mixed (2 right), group 1 all wrong, with nonzero advantages everywhere."""
    G, T, d, V = 4, 6, 5, 13
    gen = torch.Generator().manual_seed(4)
    hidden = torch.randn(2 * G, T, d, generator=gen)
    weight = torch.randn(V, d, generator=gen)
    bias = torch.randn(V, generator=gen) / 4
    ids = torch.randint(0, V, (2 * G, T), generator=gen)
    lengths = torch.tensor([6, 4, 5, 6, 3, 6, 2, 5])
    mask = torch.arange(T)[None, :] < lengths[:, None]
    rewards = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    advantages = (torch.randn(2 * G, 1, generator=gen) * mask).float()
    return SimpleNamespace(advantages=advantages, rewards=rewards, group_size=G, completion_ids=ids,
                           completion_mask=mask.long(), hidden=hidden, lm_head_weight=weight,
                           lm_head_bias=bias, temperature=0.8)


@pytest.mark.parametrize("config", [NTHRConfig(), NTHRConfig(beta=0.0, eta="p", vocab="full"),
                                    NTHRConfig(beta=0.5, eta=0.0, exclude_self=True)])
def test_hook_matches_manual_composition(config):
    ctx = _hook_batch()
    hook = nthr_advantage_fn(config)
    assert hook.needs_hidden is True
    assert "beta=" in repr(hook) and config.vocab in repr(hook)
    new_adv, metrics = hook(ctx)
    # homogeneous group untouched
    assert torch.equal(new_adv[4:], ctx.advantages[4:])
    # manual composition for the mixed group
    rows = slice(0, 4)
    mask = ctx.completion_mask[rows].bool()
    correct = ctx.rewards[0] > 0.5
    logits = (ctx.hidden[rows] @ ctx.lm_head_weight.T + ctx.lm_head_bias) / ctx.temperature
    scores, self_pairs = token_scores(ctx.hidden[rows], logits, ctx.completion_ids[rows], mask, correct,
                                      vocab=config.vocab, return_self_pairs=True)
    sp = self_pairs if config.exclude_self else None
    selected = select_tokens(scores, mask, correct, config.beta, self_pairs=sp)
    negative = (~correct)[:, None] & mask
    assert 0 < selected.sum() < negative.sum()  # the example selects some, not all
    eta = eta_for(0.5, config.eta)
    expected = reweight_advantages(ctx.advantages[rows], selected, eta)
    torch.testing.assert_close(new_adv[rows], expected)
    assert not torch.equal(new_adv[rows], ctx.advantages[rows]) or eta == 1.0
    assert metrics["nthr/mixed_groups"] == 1.0
    assert metrics["nthr/selected_frac"] == pytest.approx(selected.sum().item() / negative.sum().item())
    assert metrics["nthr/tau_mean"] == pytest.approx(threshold(scores, mask, correct, config.beta, self_pairs=sp),
                                                     rel=1e-5)
    assert metrics["nthr/score_mean"] == pytest.approx(scores[negative].mean().item(), rel=1e-5)
    assert metrics["nthr/eta_mean"] == eta


def test_hook_keyword_form_and_no_mixed_group():
    hook = nthr_advantage_fn(beta=-math.inf, eta="one_minus_p", vocab="full")
    assert hook.config == NTHRConfig(beta=-math.inf, eta="one_minus_p", vocab="full")
    ctx = _hook_batch()
    new_adv, metrics = hook(ctx)
    negative = (ctx.rewards[0] < 0.5)[:, None] & ctx.completion_mask[:4].bool()
    assert metrics["nthr/selected_frac"] == 1.0  # beta = -inf selects every incorrect token
    torch.testing.assert_close(new_adv[:4], torch.where(negative, 0.5 * ctx.advantages[:4], ctx.advantages[:4]))
    ctx.rewards = torch.zeros(2, 4)
    new_adv, metrics = hook(ctx)
    assert torch.equal(new_adv, ctx.advantages)
    assert metrics["nthr/mixed_groups"] == 0.0 and math.isnan(metrics["nthr/selected_frac"])
    with pytest.raises(ValueError, match="vocab='x'"):
        NTHRConfig(vocab="x")
    with pytest.raises(ValueError, match="'bad'"):
        nthr_advantage_fn(eta="bad")


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
    # independent reference: the naive pair loop on q = full softmax, g restricted to V* (no renormalising)
    logits = (hidden.double() @ weight.double().T + (0 if b is None else b.double())) / temp
    expected = naive_pair_sums(hidden, logits, tokens, mask, correct, vocab_ids=generated_ids(tokens, mask))
    kw = dict(temperature=temp, lm_head_bias=b, chunk_size=chunk_size, return_self_pairs=True)
    got, sp = token_scores_from_hidden(hidden, weight, tokens, mask, correct, logps=logps, dtype=torch.float64, **kw)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    ref, ref_sp = token_scores_from_hidden(hidden, weight, tokens, mask, correct, dtype=torch.float64, **kw)
    torch.testing.assert_close(sp, ref_sp, rtol=1e-10, atol=1e-10)
    got32 = token_scores_from_hidden(hidden, weight, tokens, mask, correct, logps=logps.float(), **kw)[0]
    assert rel_err(got32, expected) <= 1e-5
    # "full" ignores the log-probs (exact): the same result with nonsense logps
    full = token_scores_from_hidden(hidden, weight, tokens, mask, correct, vocab="full", temperature=temp,
                                    lm_head_bias=b, dtype=torch.float64)
    full_junk = token_scores_from_hidden(hidden, weight, tokens, mask, correct, vocab="full", temperature=temp,
                                         lm_head_bias=b, dtype=torch.float64, logps=torch.zeros_like(logps))
    torch.testing.assert_close(full_junk, full, rtol=0, atol=0)


class _TinyLM(torch.nn.Module):
    """A causal LM as grpo.per_token_logps sees one: a backbone (mixing earlier tokens) and a biased head."""

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
    completion_ids = torch.randint(0, 40, (G, T), generator=gen)  # V* a small part of the vocabulary
    completion_mask = torch.arange(T)[None, :] < torch.tensor([7, 4, 6, 2])[:, None]
    completion_ids = completion_ids.masked_fill(~completion_mask, 0)
    input_ids = torch.cat([prompt_ids, completion_ids], 1)
    attention_mask = torch.cat([torch.ones(G, P, dtype=torch.long), completion_mask.long()], 1)
    with torch.no_grad():
        logps, hidden = per_token_logps(model, input_ids, attention_mask, completion_mask, temperature=temp,
                                        return_hidden=True)
    head = model.get_output_embeddings()
    correct = torch.tensor([True, False, True, False])
    kw = dict(temperature=temp, lm_head_bias=head.bias.detach())
    with_logps = token_scores_from_hidden(hidden, head.weight.detach(), completion_ids, completion_mask, correct,
                                          logps=logps, **kw)
    without = token_scores_from_hidden(hidden, head.weight.detach(), completion_ids, completion_mask, correct, **kw)
    assert without.abs().max() > 0
    assert rel_err(with_logps, without.double()) <= 1e-5
    # and both against the naive pair loop on the full softmax, g restricted to V*
    logits = (hidden.double() @ head.weight.detach().double().T + head.bias.detach().double()) / temp
    expected = naive_pair_sums(hidden, logits, completion_ids, completion_mask, correct,
                               vocab_ids=generated_ids(completion_ids, completion_mask))
    assert rel_err(with_logps, expected) <= 1e-5


class _LargestOutput(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_generated_path_with_logps_never_touches_the_whole_vocabulary():
    # V = 50 000 is far above every other size here (n = 22 tokens, V* <= 12, d = 7): an op output with
    # V elements (a (n, V) logit block, a (V,) bias, a converted (V, d) head) shows up as largest >= V.
    hidden, weight, b, tokens, mask, correct, temp = _head_group(V=50_000)
    logps = _hand_logps(hidden, weight, b, tokens, mask, temp).float()
    kw = dict(temperature=temp, lm_head_bias=b)
    with _LargestOutput() as probe:
        with_logps = token_scores_from_hidden(hidden, weight, tokens, mask, correct, logps=logps, **kw)
    assert probe.largest < 1000
    with _LargestOutput() as probe:  # the check can fail: the path without logps forms (c, V) logits
        without = token_scores_from_hidden(hidden, weight, tokens, mask, correct, **kw)
    assert probe.largest >= mask.sum() * 50_000
    assert rel_err(with_logps, without.double()) <= 1e-5


def test_logps_too_large_are_capped_at_the_generated_log_sum_exp():
    # logps = 0 claims p(y_t) = 1, i.e. lse_t = z_t[y_t] <= logsumexp over V*: the cap raises it to the
    # V* log-sum-exp, so q is the softmax renormalised over V* and never sums above 1.
    hidden, weight, b, tokens, mask, correct, temp = _head_group(seed=5)
    ids = generated_ids(tokens, mask)
    logits = (hidden.double() @ weight.double().T + b.double()) / temp
    pos = torch.searchsorted(ids, tokens.clamp(max=int(ids.max())))
    expected = naive_pair_sums(hidden, logits[..., ids], pos, mask, correct)  # softmax over V* only
    got = token_scores_from_hidden(hidden, weight, tokens, mask, correct, temperature=temp, lm_head_bias=b,
                                   logps=torch.zeros(mask.shape), dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_logps_errors():
    hidden, weight, b, tokens, mask, correct, temp = _head_group()
    with pytest.raises(ValueError, match="`logps` must be None or have shape"):
        token_scores_from_hidden(hidden, weight, tokens, mask, correct, logps=torch.zeros(5, 5))
    bad = torch.zeros(mask.shape)
    bad[2, 4] = math.nan
    with pytest.raises(ValueError, match=r"`logps` is NaN under `mask` at \(row, column\) \(2, 4\)"):
        token_scores_from_hidden(hidden, weight, tokens, mask, correct, logps=bad)
    bad[2, 4], bad[1, 5] = 0.0, math.nan  # NaN under padding is ignored
    token_scores_from_hidden(hidden, weight, tokens, mask, correct, logps=bad)


def test_hook_uses_old_logps_when_present():
    ctx = _hook_batch()
    V = ctx.lm_head_weight.shape[0]
    hook = nthr_advantage_fn(NTHRConfig(beta=0.0))
    plain_adv, plain_metrics = hook(ctx)
    ctx.old_logps = _hand_logps(ctx.hidden, ctx.lm_head_weight, ctx.lm_head_bias, ctx.completion_ids,
                                ctx.completion_mask.bool(), ctx.temperature).float()
    assert V > int(ctx.completion_ids[:4][ctx.completion_mask[:4].bool()].unique().numel())  # V* is a strict subset
    adv, metrics = hook(ctx)
    torch.testing.assert_close(adv, plain_adv)
    assert metrics["nthr/score_mean"] == pytest.approx(plain_metrics["nthr/score_mean"], rel=1e-5)
    ctx.old_logps = torch.zeros_like(ctx.old_logps)  # wrong log-probs change the scores: they are read
    _, junk_metrics = hook(ctx)
    assert abs(junk_metrics["nthr/score_mean"] - plain_metrics["nthr/score_mean"]) > 1e-3
    off = nthr_advantage_fn(NTHRConfig(beta=0.0), use_logps=False)
    assert "use_logps=False" in repr(off) and "use_logps" not in repr(hook)
    assert off(ctx)[1]["nthr/score_mean"] == plain_metrics["nthr/score_mean"]
    ctx.old_logps = torch.zeros(8, 5)
    with pytest.raises(ValueError, match="ctx.old_logps must be"):
        hook(ctx)
