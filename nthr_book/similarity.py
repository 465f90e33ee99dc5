"""GWHES and the top-K overlap: how well the theory's score predicts which questions displace (nb
03).

Implements the end of docs/method.md §3 for arXiv 2505.18830 (Deng et al., "On the Effect of
Negative Gradient in Group Relative Deep Reinforcement Optimization"): the measures of the paper's
Table 1, which ranks questions by GWHES (``gwhes_question``, larger means lazier) and by Δ(x)
(``lld``) and reports how many of the top K the two rankings share (``topk_overlap``) against a
random ranking's expectation (``random_topk_overlap_expectation``). GWHES sums NTHR's token-pair
terms <g_t,g_k><h_t,h_k> against two buckets of tokens, the correct and the wrong responses, with
``score_kernel`` (as ``nthr.token_scores`` does with one). Notebook 03 compares the rankings.
``shared_prefix_share`` is the plainest measure of resemblance: how much of a wrong answer repeats a
right one from its start (the regime map, ``nthr_book.regime``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from nthr_book.score_kernel import LogitsSource, check_group, check_logits, group_pairs

__all__ = [
    "gwhes",
    "gwhes_question",
    "random_topk_overlap_expectation",
    "shared_prefix_mask",
    "shared_prefix_share",
    "topk_overlap",
]


def gwhes(
    hidden: Tensor,
    logits: Tensor,
    tokens: Tensor,
    mask: Tensor,
    correct: Tensor,
    *,
    vocab: str = "full",
    dtype: torch.dtype = torch.float32,
    chunk_size: int | None = None,
) -> Tensor:
    """(N+,) GWHES_i = p- Σ_{t∈y+_i} Σ_{k incorrect} <.,.><.,.> - p+ Σ_{t∈y+_i} Σ_{k correct}
    <.,.><.,.>.

    p = N+/G, p+ = (1-p)/sqrt(p(1-p)), p- = p/sqrt(p(1-p)); larger means lazier. Computed
    sum-first with M_correct and M_incorrect, over the full vocabulary as the paper's theorem has it
    (``vocab="generated"``: g restricted to V* like the NTHR speed-up). All-correct groups give NaN
    (p+ undefined); all-wrong groups give an empty tensor. Notebook 03.
    """
    mask, correct = check_group(hidden, tokens, mask, correct)
    check_logits(logits, mask)
    G = correct.numel()
    n_pos = int(correct.sum())
    if n_pos == 0:
        return torch.zeros(0, dtype=dtype, device=hidden.device)
    if n_pos == G:
        return torch.full((G,), math.nan, dtype=dtype, device=hidden.device)
    bucket = torch.where(correct, 0, 1).to(hidden.device)  # 0: correct rows, 1: incorrect rows
    make = lambda rows, cols, h, ids: LogitsSource(logits, rows, cols, ids, dtype)
    s, _ = group_pairs(
        hidden,
        tokens,
        mask,
        logits.shape[-1],
        make,
        bucket,
        2,
        correct.to(hidden.device),
        vocab=vocab,
        dtype=dtype,
        chunk_size=chunk_size,
    )
    per_row = s.sum(1)[correct]  # (N+, 2): Σ_t s_t against correct (0) and incorrect (1) tokens
    p = n_pos / G
    sd = math.sqrt(p * (1 - p))
    return (p / sd) * per_row[:, 1] - ((1 - p) / sd) * per_row[:, 0]


def gwhes_question(
    hidden: Tensor, logits: Tensor, tokens: Tensor, mask: Tensor, correct: Tensor, **kwargs: Any
) -> float:
    """Per-question GWHES: mean of ``gwhes`` over the correct responses (default: full vocabulary).

    NaN for homogeneous groups. Notebook 03.
    """
    values = gwhes(hidden, logits, tokens, mask, correct, **kwargs)
    return float(values.mean()) if values.numel() else math.nan


def topk_overlap(
    rank_a: Sequence[float] | Tensor, rank_b: Sequence[float] | Tensor, k: int
) -> float:
    """Fraction of shared items in the top-k of two score sequences over the same items (larger =
    lazier).

    ``rank_a[j]`` and ``rank_b[j]`` are two scores of item j (e.g. GWHES and -Δ(x) of question j:
    negate Δ so that larger means lazier); the top-k are the k largest, ties broken by lower index.
    """
    a = torch.as_tensor(rank_a, dtype=torch.float64).flatten()
    b = torch.as_tensor(rank_b, dtype=torch.float64).flatten()
    if a.numel() != b.numel():
        raise ValueError(
            f"rank_a and rank_b must score the same items, got lengths {a.numel()} and {b.numel()}"
        )
    if not 1 <= int(k) <= a.numel():
        raise ValueError(f"k must lie in [1, {a.numel()}] (number of items), got {k}")
    if bool(a.isnan().any() | b.isnan().any()):
        raise ValueError(
            "rank_a and rank_b must not contain NaN (drop homogeneous questions first)"
        )
    top_a = set(torch.sort(a, descending=True, stable=True).indices[: int(k)].tolist())
    top_b = set(torch.sort(b, descending=True, stable=True).indices[: int(k)].tolist())
    return len(top_a & top_b) / int(k)


def random_topk_overlap_expectation(n: int, k: int) -> float:
    """Expected top-k overlap of a uniformly random ranking of n items with a fixed one: k / n."""
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
    return k / n


def shared_prefix_mask(tokens: Tensor, mask: Tensor, correct: Tensor) -> Tensor:
    """(G, T) bool: the tokens of each wrong response that lie in its longest common prefix with any
    correct response (the text it shares with a right answer from the start); False on the correct
    responses and on padding. Notebook 03 asks whether NTHR's selected tokens lie there.

    ``tokens``/``mask`` (G, T) right-padded completions, ``correct`` (G,) bool.
    """
    if tokens.shape != mask.shape or correct.shape != tokens.shape[:1]:
        raise ValueError(
            f"tokens {tuple(tokens.shape)}, mask {tuple(mask.shape)} and correct "
            f"{tuple(correct.shape)} must be (G, T), (G, T) and (G,)"
        )
    shared = torch.zeros(tokens.shape, dtype=torch.bool, device=tokens.device)
    rows = [tokens[i][mask[i].bool()].tolist() for i in range(tokens.shape[0])]
    right = [rows[i] for i in range(len(rows)) if bool(correct[i])]
    for i, wrong in enumerate(rows):
        if bool(correct[i]):
            continue
        longest = 0
        for other in right:  # the common prefix with each correct response
            n = 0
            while n < min(len(wrong), len(other)) and wrong[n] == other[n]:
                n += 1
            longest = max(longest, n)
        shared[i, mask[i].bool().nonzero().flatten()[:longest]] = True
    return shared


def shared_prefix_share(tokens: Tensor, mask: Tensor, correct: Tensor) -> float:
    """Mean over the wrong responses of (the longest common prefix with any correct response) /
    (the wrong response's length), in tokens: 0 for answers that differ from the first token, near
    1 for a correct answer with only its end changed. NaN for homogeneous groups.

    ``tokens``/``mask`` (G, T) right-padded completions, ``correct`` (G,) bool.
    """
    shared = shared_prefix_mask(tokens, mask, correct)  # checks the shapes
    if bool(correct.all()) or not bool(correct.any()):
        return math.nan
    lengths = mask.bool().sum(1)
    shares = [
        float(shared[i].sum()) / int(lengths[i]) if int(lengths[i]) else 0.0
        for i in range(tokens.shape[0])
        if not bool(correct[i])
    ]
    return sum(shares) / len(shares)
