"""Naive float64 references (explicit loops over token pairs) and rounding bounds for the score
tests.

Shared by ``tests/test_nthr.py`` (token scores, self-influence, threshold, ``apply_to_group``),
``tests/test_similarity.py`` (GWHES), which check nthr_book's sum-first kernel against them, and
``tests/test_lld.py`` (the NTHR selection inside ``one_step_displacement``, by ``naive_nthr``).
"""

from __future__ import annotations

import math

import torch

F32, F64 = 2.0**-24, 2.0**-53  # unit roundoffs of float32 and float64


def g_and_h(hidden, logits, tokens, vocab_ids=None):
    """Float64 g = onehot(y) - softmax(logits) (optionally restricted to vocab_ids) and h."""
    V = logits.shape[-1]
    q = torch.softmax(logits.double(), dim=-1)
    g = torch.nn.functional.one_hot(tokens.clamp(0, V - 1), V).double() - q
    if vocab_ids is not None:
        g = g[..., vocab_ids]
    return g, hidden.double()


def naive_pair_sums(hidden, logits, tokens, mask, source_rows, vocab_ids=None, skip_self=False):
    """(G, T) Σ_{k in valid tokens of source_rows} <g_t,g_k><h_t,h_k>, by a double loop over
    tokens."""
    g, h = g_and_h(hidden, logits, tokens, vocab_ids)
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


def pair_scale(hidden, logits, tokens, mask, source_rows, vocab_ids=None):
    """(G, T) Σ_{valid k of source_rows} <|g_t|,|g_k|><|h_t|,|h_k|> (float64): the terms' size."""
    g, h = g_and_h(hidden, logits, tokens, vocab_ids)
    gg = torch.einsum("itv,jkv->itjk", g.abs(), g.abs())  # (G, T, G, T)
    hh = torch.einsum("itd,jkd->itjk", h.abs(), h.abs())  # (G, T, G, T)
    k = (mask.bool() & torch.as_tensor(source_rows).bool()[:, None]).double()  # (G, T)
    return (gg * hh * k).sum((-2, -1)) * mask


def score_atol(
    hidden, logits, tokens, mask, source_rows, eps, *, vocab_ids=None, logit_err=0.0, lse_err=0.0
):
    """Absolute rounding bound of scores made in precision eps from these inputs (a tolerance).

    A score sums n pair terms, each a product of inner products over |V'| and d coordinates: its
    error is at most m·eps·Σ|terms| with m = n + |V'| + d (Higham, Accuracy and Stability of
    Numerical Algorithms, §3.1), plus 16 ulps for the softmax's exp, log and division. Logits off
    by at most ``logit_err`` move each g_v by a relative 2·logit_err at most (q_v and its
    normaliser), two g's per term: 4·logit_err/eps ulps more. A log-sum-exp off by ``lse_err``
    (read from rounded log-probs) moves q_y by a relative lse_err, i.e. g_y = 1 - q_y by up to
    q_y/(1 - q_y) times that.
    """
    n = int(mask.sum())
    cols = logits.shape[-1] if vocab_ids is None else len(vocab_ids)
    q_y = torch.softmax(logits.double(), -1).gather(-1, tokens[..., None]).squeeze(-1)[mask.bool()]
    lse_factor = max(1.0, float((q_y / (1 - q_y)).max())) if lse_err else 0.0
    m = n + cols + hidden.shape[-1] + 16 + (4 * logit_err + 2 * lse_factor * lse_err) / eps
    return m * eps * float(pair_scale(hidden, logits, tokens, mask, source_rows, vocab_ids).max())


def logit_err(hidden, weight, bias, temperature, eps):
    """Bound of logits (h·W_v + b_v) / T rounded in precision eps: (d+4)·eps·max(|h||W_v|+|b_v|)/T.

    d + 2 for the inner product, the bias and the scaling; 2 more for a soft-cap (tanh, whose slope
    is at most 1, and its two scalings).
    """
    h = hidden.double().abs().reshape(-1, hidden.shape[-1])  # (n, d)
    scale = h @ weight.double().abs().T  # (n, V)
    if bias is not None:
        scale = scale + bias.double().abs()
    return (hidden.shape[-1] + 4) * eps * float(scale.max()) / temperature


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


def naive_nthr(hidden, logits, tokens, mask, correct, advantages, *, beta, eta, anchor, vocab):
    """NTHR on one group by its definition, in float64 loops (docs/method.md §3): a reference for
    ``nthr.apply_to_group`` and for the selection inside ``lld.one_step_displacement``.

    s_t = Σ_k <g_t,g_k><h_t,h_k> over the valid tokens k of the correct responses
    (``naive_pair_sums``); s̄+_i the mean over the valid tokens t of correct response i of s_t over
    the anchor's k only ("all": every correct token, "no_self_token": all but k = t,
    "other_responses": the tokens of the other correct responses); tau = beta · min_i s̄+_i (-inf
    for beta = -inf, +inf without a correct token); selected: valid tokens of incorrect responses
    with s_t > tau and A < 0; eta from p = N+/G ("two_abs" 2|0.5 - p|, "p", "one_minus_p", or a
    number); new advantages eta·A on the selected tokens, A elsewhere. ``advantages`` (G,) or
    (G, T). Returns a dict: scores, s_bar (N+,), tau, selected, eta, new_advantages (float64).
    """
    G, T = mask.shape
    mask, correct = mask.bool(), torch.as_tensor(correct).bool()
    ids = generated_ids(tokens, mask) if vocab == "generated" else None
    scores = naive_pair_sums(hidden, logits, tokens, mask, correct, ids)
    s_bar = []
    for i in range(G):
        if not correct[i] or not mask[i].any():
            continue
        if anchor == "all":
            row = scores[i]
        elif anchor == "no_self_token":
            row = naive_pair_sums(hidden, logits, tokens, mask, correct, ids, skip_self=True)[i]
        else:  # "other_responses": k runs over the other correct responses only
            others = correct.clone()
            others[i] = False
            row = naive_pair_sums(hidden, logits, tokens, mask, others, ids)[i]
        s_bar.append(sum(float(row[t]) for t in range(T) if mask[i, t]) / int(mask[i].sum()))
    if beta == -math.inf:
        tau = -math.inf
    else:
        tau = beta * min(s_bar) if s_bar else math.inf
    adv = torch.as_tensor(advantages, dtype=torch.float64)
    adv = adv[:, None].expand(G, T) if adv.dim() == 1 else adv
    selected = torch.zeros(G, T, dtype=torch.bool)
    for i in range(G):
        for t in range(T):
            selected[i, t] = bool(
                not correct[i] and mask[i, t] and scores[i, t] > tau and adv[i, t] < 0
            )
    p = int(correct.sum()) / G
    schedules = {"two_abs": 2 * abs(0.5 - p), "p": p, "one_minus_p": 1 - p}
    eta_value = schedules[eta] if isinstance(eta, str) else float(eta)
    new = torch.where(selected, eta_value * adv, adv)
    return {
        "scores": scores,
        "s_bar": s_bar,
        "tau": tau,
        "selected": selected,
        "eta": eta_value,
        "new_advantages": new,
    }
