"""Tests for nthr_book.similarity: GWHES against a naive float64 pairwise loop, the top-K overlap by
hand.

Tolerances are rounding bounds from the unit roundoff (F32, F64) and the number of terms
(``naive_scores.score_atol``); the references are float64.
"""

from __future__ import annotations

import math

import pytest
import torch
from naive_scores import F32, F64, generated_ids, make_group, naive_pair_sums, score_atol

from nthr_book.similarity import (
    gwhes,
    gwhes_question,
    random_topk_overlap_expectation,
    topk_overlap,
)

torch.set_num_threads(1)


def gwhes_atol(hidden, logits, tokens, mask, correct, eps, vocab_ids=None):
    """Bound of GWHES_i = p-/sd·Σ_t s_t(incorrect k) - p+/sd·Σ_t s_t(correct k), from scores'."""
    p = correct.double().mean().item()
    sd = math.sqrt(p * (1 - p))
    to_pos = score_atol(hidden, logits, tokens, mask, correct, eps, vocab_ids=vocab_ids)
    to_neg = score_atol(hidden, logits, tokens, mask, ~correct, eps, vocab_ids=vocab_ids)
    return mask.shape[1] * ((p / sd) * to_neg + ((1 - p) / sd) * to_pos)  # <= T tokens a response


@pytest.mark.parametrize("vocab", ["full", "generated"])
@pytest.mark.parametrize(
    "correct", [[True, False, False, True, False], [False, True, False, False, False]]
)
def test_gwhes_matches_naive(vocab, correct):
    hidden, logits, tokens, mask, correct = make_group(
        5, 4, 3, 8, seed=21, correct=correct, lengths=[4, 3, 4, 1, 2], id_range=6
    )
    ids = None if vocab == "full" else generated_ids(tokens, mask)
    to_pos = naive_pair_sums(hidden, logits, tokens, mask, correct, vocab_ids=ids).sum(-1)[correct]
    to_neg = naive_pair_sums(hidden, logits, tokens, mask, ~correct, vocab_ids=ids).sum(-1)[correct]
    p = correct.double().mean().item()
    sd = math.sqrt(p * (1 - p))
    expected = (p / sd) * to_neg - ((1 - p) / sd) * to_pos
    got = gwhes(
        hidden, logits, tokens, mask, correct, vocab=vocab, dtype=torch.float64, chunk_size=3
    )
    tol64 = 2 * gwhes_atol(hidden, logits, tokens, mask, correct, F64, ids)  # both sides round
    torch.testing.assert_close(got, expected, rtol=0, atol=tol64)
    tol32 = gwhes_atol(hidden, logits, tokens, mask, correct, F32, ids)  # a mean of values in it
    assert gwhes_question(hidden, logits, tokens, mask, correct, vocab=vocab) == pytest.approx(
        expected.mean().item(), rel=0, abs=tol32
    )


def test_gwhes_defaults_to_the_full_vocabulary():
    hidden, logits, tokens, mask, correct = make_group(
        5,
        4,
        3,
        8,
        seed=21,
        correct=[True, False, False, True, False],
        lengths=[4, 3, 4, 1, 2],
        id_range=3,
    )
    assert generated_ids(tokens, mask).numel() <= 3  # V* is a strict subset: the two modes differ
    to_pos = naive_pair_sums(hidden, logits, tokens, mask, correct).sum(-1)[correct]
    to_neg = naive_pair_sums(hidden, logits, tokens, mask, ~correct).sum(-1)[correct]
    sd = math.sqrt(0.4 * 0.6)
    expected = (0.4 / sd) * to_neg - (0.6 / sd) * to_pos  # full vocabulary, the paper's GWHES
    tol32 = gwhes_atol(hidden, logits, tokens, mask, correct, F32)
    group = (hidden, logits, tokens, mask, correct)
    torch.testing.assert_close(gwhes(*group).double(), expected, rtol=0, atol=tol32)
    assert gwhes_question(*group) == pytest.approx(expected.mean().item(), rel=0, abs=tol32)
    generated = gwhes(hidden, logits, tokens, mask, correct, vocab="generated").double()
    assert (generated - expected).abs().max() > 10 * tol32


def test_gwhes_homogeneous_groups():
    hidden, logits, tokens, mask, _ = make_group(3, 4, 3, 8, seed=2, correct=[True, True, True])
    assert gwhes(hidden, logits, tokens, mask, torch.ones(3, dtype=torch.bool)).isnan().all()
    assert math.isnan(gwhes_question(hidden, logits, tokens, mask, torch.ones(3, dtype=torch.bool)))
    assert gwhes(hidden, logits, tokens, mask, torch.zeros(3, dtype=torch.bool)).numel() == 0
    assert math.isnan(
        gwhes_question(hidden, logits, tokens, mask, torch.zeros(3, dtype=torch.bool))
    )


def test_topk_overlap_by_hand():
    a = [5.0, 4.0, 3.0, 2.0, 1.0]
    assert topk_overlap(a, a, 2) == 1.0
    assert topk_overlap(a, [1.0, 2.0, 3.0, 4.0, 5.0], 2) == 0.0
    assert topk_overlap(a, [1.0, 2.0, 3.0, 4.0, 5.0], 3) == 1 / 3
    assert topk_overlap(a, torch.tensor([0.9, -1.0, 0.8, 0.0, 3.0]), 3) == 2 / 3
    assert topk_overlap(a, [0.0, 0.0, 0.0, 0.0, 0.0], 1) == 1.0  # ties: lower index first
    assert topk_overlap(a, [9.0, 0.0, 0.0, 0.0, 0.0], 5) == 1.0
    with pytest.raises(ValueError, match="same items"):
        topk_overlap(a, a[:4], 2)
    with pytest.raises(ValueError, match="k must lie"):
        topk_overlap(a, a, 6)


def test_random_topk_overlap_expectation_matches_paper_baselines():
    # the paper prints three decimals: half a unit of the last one (k / n is rounded once, 1e-16)
    printed = 0.5e-3 + F64
    assert random_topk_overlap_expectation(57, 10) == pytest.approx(0.175, rel=0, abs=printed)
    assert random_topk_overlap_expectation(47, 10) == pytest.approx(0.213, rel=0, abs=printed)
    assert random_topk_overlap_expectation(57, 15) == pytest.approx(0.263, rel=0, abs=printed)
    assert random_topk_overlap_expectation(47, 15) == pytest.approx(0.319, rel=0, abs=printed)
    gen = torch.Generator().manual_seed(0)
    fixed = torch.arange(20.0)
    mean = (
        sum(topk_overlap(fixed, torch.randperm(20, generator=gen).double(), 5) for _ in range(2000))
        / 2000
    )
    # overlap/5 is hypergeometric (sd 0.172 a draw): the mean of 2000 has sd 0.0038; 0.02 ≈ 5 sd
    assert mean == pytest.approx(5 / 20, abs=0.02)
