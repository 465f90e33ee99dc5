"""The fast evaluation of NTHR's token scores: sum-first, bucketed and chunked (arXiv 2505.18830).

The readable definition is ``nthr.token_scores_reference``: with ``g_t = onehot(y_t) -
softmax(z_t)`` and ``h_t`` the last hidden state that predicts token t, ``s_t = Σ_k <g_t, g_k> <h_t,
h_k>`` pair by pair, a (G, T, G, T) tensor. This module computes the same sums without any pair or
whole-group tensor, for ``nthr.token_scores``, ``nthr.token_scores_from_hidden`` and
``similarity.gwhes``:

- **sum first**: per bucket b of source tokens k, ``M_b = Σ_{k in b} g_k h_kᵀ`` (|V'| × d), then
  ``s[t, b] = g_tᵀ M_b h_t = (M_b h_t)[y_t] - q_tᵀ (M_b h_t)``. The source rows are split into
  buckets: NTHR's scores use one (the correct responses), the "other_responses" anchor one response
  at a time, GWHES two (correct and incorrect responses). The self pair k == t, ``|g_t|²|h_t|²``,
  comes out of the same pass.
- **chunks**: the valid tokens of a group are flattened and visited ``chunk_size`` at a time, so the
  largest temporary is (chunk, V) logits (about 2**25 elements by default), never (T, T) or (G, T,
  V). ``LargestOutput`` measures that bound (``bench/nthr_overhead.py``, ``tests/test_nthr.py``).
- **the generated vocabulary** (``vocab="generated"``, the paper's speed-up, a choice) restricts g
  to V*, the token ids occurring in the group's responses, without renormalising q; given the
  tokens' log-probs (``logps``, which the trainer's old-policy pass already has) it multiplies only
  by the
  |V*| rows of the LM head, since the full-vocabulary log-sum-exp is then lse_t = z_t[y_t] -
  logps_t. ``vocab="full"`` is exact.
- **logit sources**: ``LogitsSource`` reads a given (G, T, V) tensor, ``HiddenSource`` makes the
  logits (h Wᵀ + b) / temperature (soft-capped when the model caps them) chunk by chunk from the
  hidden states and the LM head.

The input checks of these callers (``check_group``, ``check_logits``, ``check_head``,
``check_vocab``) live here too, next to the tensors they describe.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = [
    "VOCAB_MODES",
    "HiddenSource",
    "LargestOutput",
    "LogitsSource",
    "check_group",
    "check_head",
    "check_logits",
    "check_vocab",
    "group_pairs",
    "score_pairs",
    "shape_of",
]

# "generated": g restricted to V*, the group's token ids (the paper's speed-up); "full": exact.
VOCAB_MODES = ("generated", "full")
# Default chunk: about 2**25 logits (128 MiB in float32) per (tokens × vocabulary) temporary.
_CHUNK_ELEMENTS = 2**25


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------


def shape_of(x: Any) -> str:
    """Shape of a tensor, or the type name of anything else, for error messages."""
    return f"shape {tuple(x.shape)}" if isinstance(x, Tensor) else f"a {type(x).__name__}"


def check_group(
    hidden: Tensor, tokens: Tensor, mask: Tensor, correct: Tensor
) -> tuple[Tensor, Tensor]:
    """Validate one group's (G, T, d) hidden, (G, T) tokens and mask, (G,) correct; return bool
    mask, correct."""
    if not isinstance(hidden, Tensor) or hidden.dim() != 3:
        raise ValueError(f"`hidden` must be a (G, T, d) tensor, got {shape_of(hidden)}")
    G, T = hidden.shape[:2]
    if not isinstance(tokens, Tensor) or tuple(tokens.shape) != (G, T):
        raise ValueError(
            f"`tokens` must have shape (G, T) = {(G, T)} like `hidden`, got {shape_of(tokens)}"
        )
    if tokens.is_floating_point() or tokens.is_complex():
        raise TypeError(f"`tokens` must hold integer token ids, got dtype {tokens.dtype}")
    if not isinstance(mask, Tensor) or tuple(mask.shape) != (G, T):
        raise ValueError(
            f"`mask` must have shape (G, T) = {(G, T)} like `hidden`, got {shape_of(mask)}"
        )
    if not isinstance(correct, Tensor) or tuple(correct.shape) != (G,):
        raise ValueError(f"`correct` must have shape (G,) = {(G,)}, got {shape_of(correct)}")
    return mask.bool(), correct.bool()


def check_logits(logits: Tensor, mask: Tensor) -> None:
    """Raise unless ``logits`` is (G, T, V) with the (G, T) of ``mask``."""
    if (
        not isinstance(logits, Tensor)
        or logits.dim() != 3
        or tuple(logits.shape[:2]) != tuple(mask.shape)
    ):
        raise ValueError(
            f"`logits` must have shape (G, T, V) with (G, T) = {tuple(mask.shape)}, got "
            f"{shape_of(logits)}"
        )


def check_head(
    weight: Tensor, bias: Tensor | None, d: int, temperature: float, softcap: float | None
) -> float | None:
    """Validate an LM head (V, d) ``weight``, (V,) ``bias``, ``temperature`` and ``softcap``;
    return the cap as a float."""
    if not isinstance(weight, Tensor) or weight.dim() != 2 or weight.shape[1] != d:
        raise ValueError(
            f"`lm_head_weight` must have shape (V, d) with d = {d}, got {shape_of(weight)}"
        )
    V = weight.shape[0]
    if bias is not None and (not isinstance(bias, Tensor) or tuple(bias.shape) != (V,)):
        raise ValueError(
            f"`lm_head_bias` must be None or have shape (V,) = ({V},), got {shape_of(bias)}"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if softcap is not None and not (isinstance(softcap, (int, float)) and 0 < softcap < math.inf):
        raise ValueError(
            f"softcap must be None or a positive number (final_logit_softcapping), got {softcap!r}"
        )
    return None if softcap is None else float(softcap)


def check_vocab(vocab: str) -> None:
    """Raise unless ``vocab`` is one of VOCAB_MODES."""
    if vocab not in VOCAB_MODES:
        raise ValueError(f"vocab={vocab!r}: expected one of {VOCAB_MODES}")


# --------------------------------------------------------------------------------------------
# Logit sources and the sum-first core
# --------------------------------------------------------------------------------------------


class LogitsSource:
    """Temperature-scaled logits read from a given (G, T, V) tensor, a chunk of valid tokens at a
    time."""

    def __init__(self, logits: Tensor, rows: Tensor, cols: Tensor, vocab_ids: Tensor | None, dtype):
        self.logits, self.rows, self.cols, self.vocab_ids, self.dtype = (
            logits,
            rows,
            cols,
            vocab_ids,
            dtype,
        )

    def full(self, idx: Tensor) -> Tensor:
        """(c,) token indices -> (c, V) logits over the whole vocabulary (a fresh tensor)."""
        return self.logits[self.rows[idx], self.cols[idx]].to(
            self.dtype
        )  # advanced indexing copies

    def restricted(self, idx: Tensor) -> Tensor:
        """(c,) token indices -> (c, V') logits of the kept vocabulary columns."""
        if self.vocab_ids is None:
            return self.full(idx)
        r, c = self.rows[idx, None], self.cols[idx, None]  # (c, 1) each
        return self.logits[r, c, self.vocab_ids].to(self.dtype)  # (c, V')


class HiddenSource:
    """Temperature-scaled logits (h Wᵀ + b) / temperature computed chunk by chunk from hidden
    states.

    With ``softcap`` c (Gemma's ``final_logit_softcapping``) the logits are c·tanh((h Wᵀ + b) / c) /
    temperature, as ``grpo.per_token_logps`` computes them. Only the rows of W (and b) that a call
    needs are converted to ``dtype``: the restricted path never touches, copies or multiplies by the
    other rows of a (V, d) head.
    """

    def __init__(
        self,
        h: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        temperature: float,
        vocab_ids: Tensor | None,
        dtype,
        softcap: float | None = None,
    ):
        self.h, self.dtype = h, dtype  # h: (n, d) in dtype
        self.softcap, self.inv_temperature = softcap, 1.0 / float(temperature)
        # Without a cap the temperature scales the (c, d) hidden chunk and the bias, not the logits.
        self.pre_scale = self.inv_temperature if softcap is None else 1.0
        self._weight, self._bias = weight, bias  # (V, d), (V,) as given
        self._full: tuple[Tensor, Tensor | None] | None = None
        self.weight_sub, self.bias_sub = (
            self._rows(vocab_ids) if vocab_ids is not None else self._all()
        )

    def _rows(self, ids: Tensor) -> tuple[Tensor, Tensor | None]:
        """(V', d) rows of W in dtype, and the bias of those rows times ``pre_scale``."""
        w = self._weight.index_select(0, ids.to(self._weight.device)).to(self.dtype)  # (V', d)
        if self._bias is None:
            return w, None
        b = self._bias.index_select(0, ids.to(self._bias.device)).to(self.dtype)  # (V',)
        return w, b * self.pre_scale

    def _all(self) -> tuple[Tensor, Tensor | None]:
        """The whole head in dtype; the bias times ``pre_scale``."""
        if self._full is None:
            bias = None if self._bias is None else self._bias.to(self.dtype) * self.pre_scale
            self._full = (self._weight.to(self.dtype), bias)
        return self._full

    def _logits(self, idx: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        hs = self.h[idx] if self.pre_scale == 1.0 else self.h[idx] * self.pre_scale  # (c, d)
        z = hs @ weight.T if bias is None else torch.addmm(bias, hs, weight.T)  # (c, V) or (c, V')
        if self.softcap is None:
            return z
        cap = self.softcap
        return z.div_(cap).tanh_().mul_(cap * self.inv_temperature)  # c·tanh(z / c) / T, in place

    def full(self, idx: Tensor) -> Tensor:
        """(c,) token indices -> (c, V) logits over the whole vocabulary (a fresh tensor)."""
        return self._logits(idx, *self._all())

    def restricted(self, idx: Tensor) -> Tensor:
        """(c,) token indices -> (c, V') logits of the kept vocabulary columns."""
        return self._logits(idx, self.weight_sub, self.bias_sub)


def _sum_first(
    source: LogitsSource | HiddenSource,
    h: Tensor,
    pos: Tensor,
    vocab_ids: Tensor | None,
    num_cols: int,
    buckets: Tensor,
    num_buckets: int,
    targets: Tensor,
    chunk_size: int,
    logp: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Scores s[t, b] = g_tᵀ M_b h_t, M_b = Σ_{k in bucket b} g_k h_kᵀ, and self pairs |g_t|²|h_t|²
    (targets).

    With ``logp`` (n,) given and a restricted vocabulary, the full-vocabulary log-sum-exp is read
    off the log-probs, lse_t = z_t[y_t] - logp_t, so no (c, V) logits are formed; it is raised to at
    least the log-sum-exp over V' (q restricted to V' can never sum above 1, whatever rounding logp
    carries).
    """
    n, d = h.shape  # n valid tokens of the group, flattened
    M = h.new_zeros(num_buckets, num_cols, d)  # (B, V', d)
    lse = h.new_zeros(n)  # full-vocabulary log-sum-exp per token
    from_logp = logp is not None and vocab_ids is not None
    needed = (buckets >= 0) | targets  # tokens in no bucket and not scored need no logits at all
    # Pass 1: log-sum-exp over the FULL vocabulary, and M_b = scatter_add(h_k at row y_k) - Q_bᵀ
    # H_b.
    for idx in needed.nonzero().squeeze(1).split(chunk_size):
        if from_logp:
            z = source.restricted(idx)  # (c, V'), a fresh tensor: overwritten in place below
            z_y = z.gather(1, pos[idx, None])  # (c, 1) target logits
            m = z.amax(-1, keepdim=True)  # (c, 1)
            e = z.sub_(m).exp_()  # (c, V') exp(z - m)
            lse_c = torch.maximum(
                z_y - logp[idx, None], m + e.sum(-1, keepdim=True).log()
            )  # (c, 1)
            lse[idx] = lse_c.squeeze(1)
            eb, total = e, torch.exp(lse_c - m)  # q = e / total
        else:
            z = source.full(idx)  # (c, V), a fresh tensor: overwritten in place below
            m = z.amax(-1, keepdim=True)  # (c, 1)
            e = z.sub_(m).exp_()  # (c, V) exp(z - m)
            total = e.sum(-1, keepdim=True)  # (c, 1)
            lse[idx] = (m + total.log()).squeeze(1)
            eb = e if vocab_ids is None else e.index_select(1, vocab_ids)  # (c, V')
        for b in range(num_buckets):
            in_b = buckets[idx] == b
            if not bool(in_b.any()):
                continue
            q = eb[in_b] / total[in_b]  # (c_b, V') probabilities of the kept columns
            M[b].addmm_(q.T, h[idx[in_b]], alpha=-1.0)  # M_b -= Q_bᵀ H_b
    for b in range(
        num_buckets
    ):  # M_b += Σ_k onehot(y_k) h_kᵀ (index_put_ is faster than index_add_ on CPU)
        k = (buckets == b).nonzero().squeeze(1)
        M[b].index_put_((pos[k],), h[k], accumulate=True)
    # Pass 2: s_t = (M h_t)[y_t] - q_tᵀ (M h_t) for the target tokens.
    scores = h.new_zeros(n, num_buckets)
    self_pairs = h.new_zeros(n)
    for idx in targets.nonzero().squeeze(1).split(chunk_size):
        q = torch.exp(source.restricted(idx) - lse[idx, None])  # (c, V')
        hc, pc = h[idx], pos[idx, None]  # (c, d), (c, 1)
        q_y = q.gather(1, pc).squeeze(1)  # (c,)
        for b in range(num_buckets):
            u = hc @ M[b].T  # (c, V') = M_b h_t
            scores[idx, b] = u.gather(1, pc).squeeze(1) - (q * u).sum(-1)
        g_sq = q.square().sum(-1) - 2.0 * q_y + 1.0  # |g_t|² over the kept columns
        self_pairs[idx] = g_sq * hc.square().sum(-1)
    return scores, self_pairs


def group_pairs(
    hidden: Tensor,
    tokens: Tensor,
    mask: Tensor,
    vocab_size: int,
    make_source: Callable[[Tensor, Tensor, Tensor, Tensor | None], LogitsSource | HiddenSource],
    row_bucket: Tensor,
    num_buckets: int,
    target_rows: Tensor,
    *,
    vocab: str,
    dtype,
    chunk_size: int | None,
    logps: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Flatten a group's valid tokens, run the core, scatter back: (G, T, B) scores, (G, T) self
    pairs."""
    check_vocab(vocab)
    if chunk_size is not None and int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size}")
    G, T = mask.shape
    scores = torch.zeros(G, T, num_buckets, dtype=dtype, device=hidden.device)
    self_pairs = torch.zeros(G, T, dtype=dtype, device=hidden.device)
    rows, cols = mask.nonzero(as_tuple=True)  # (n,) each
    if rows.numel() == 0:
        return scores, self_pairs
    y = tokens[rows, cols].long()  # (n,)
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(
            f"`tokens` under `mask` must lie in [0, {vocab_size}) (vocabulary size), got [{lo}, "
            f"{hi}]"
        )
    vocab_ids = None if vocab == "full" else torch.unique(y)  # sorted V*
    pos = y if vocab_ids is None else torch.searchsorted(vocab_ids, y)  # column of y_t in V'
    num_cols = vocab_size if vocab_ids is None else vocab_ids.numel()
    logp = None
    if logps is not None and vocab_ids is not None:  # "full" computes its log-sum-exp exactly
        logp = logps[rows, cols].to(device=hidden.device, dtype=dtype)  # (n,)
        bad = logp.isnan()
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"`logps` is NaN under `mask` at (row, column) ({int(rows[i])}, {int(cols[i])})"
            )
    if (
        chunk_size is None
    ):  # temporaries are (chunk, V), or (chunk, V') when the log-probs give the lse
        chunk_size = max(1, _CHUNK_ELEMENTS // max(num_cols if logp is not None else vocab_size, 1))
    h = hidden[rows, cols].to(dtype)  # (n, d)
    source = make_source(rows, cols, h, vocab_ids)
    s, sp = _sum_first(
        source,
        h,
        pos,
        vocab_ids,
        num_cols,
        row_bucket[rows],
        num_buckets,
        target_rows[rows],
        int(chunk_size),
        logp,
    )
    scores[rows, cols] = s
    self_pairs[rows, cols] = sp
    return scores, self_pairs


def score_pairs(
    hidden: Tensor,
    tokens: Tensor,
    mask: Tensor,
    correct: Tensor,
    vocab_size: int,
    make_source: Callable[..., LogitsSource | HiddenSource],
    *,
    vocab: str,
    dtype: torch.dtype,
    chunk_size: int | None,
    anchor: str | tuple[str, ...] | None,
    logps: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor | dict[str, Tensor]]:
    """token_scores on a given logit source: bucket 0 = correct responses, every token a target.

    With ``anchor`` also the (G, T) pairs that anchor leaves out of s̄+ (a dict of them for a tuple
    of anchors): none ("all"), the self pair ("no_self_token", a by-product of the scoring pass) or,
    for "other_responses", each correct token's score against its own response, one response (one
    bucket) at a time: memory stays one (V', d) matrix and the extra cost one pass over the correct
    tokens.
    """
    kw = dict(vocab=vocab, dtype=dtype, chunk_size=chunk_size, logps=logps)
    bucket = torch.where(correct, 0, -1).to(hidden.device)  # (G,) correct rows build M
    targets = torch.ones_like(correct, device=hidden.device)
    s, self_pairs = group_pairs(
        hidden, tokens, mask, vocab_size, make_source, bucket, 1, targets, **kw
    )
    scores = s[..., 0]  # (G, T)
    if anchor is None:
        return scores
    pairs = {}
    for name in (anchor,) if isinstance(anchor, str) else anchor:
        if name == "all":
            pairs[name] = torch.zeros_like(scores)
        elif name == "no_self_token":
            pairs[name] = self_pairs
        else:  # "other_responses"
            own = torch.zeros_like(scores)  # (G, T) Σ_{k in t's own response} <g_t,g_k><h_t,h_k>
            rows = torch.arange(correct.numel(), device=hidden.device)
            for i in correct.nonzero().flatten().tolist():
                only_i = rows == i  # (G,) response i is the only bucket and the only target
                s_i, _ = group_pairs(
                    hidden,
                    tokens,
                    mask,
                    vocab_size,
                    make_source,
                    torch.where(only_i, 0, -1),
                    1,
                    only_i,
                    **kw,
                )
                own[i] = s_i[i, :, 0]
            pairs[name] = own
    return scores, pairs[anchor] if isinstance(anchor, str) else pairs


# --------------------------------------------------------------------------------------------
# The probe of the chunk bound
# --------------------------------------------------------------------------------------------


class LargestOutput(TorchDispatchMode):
    """While active, the largest tensor any op returns: ``largest`` elements and
    ``largest_bytes``."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.largest_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
                self.largest_bytes = max(self.largest_bytes, t.numel() * t.element_size())
        return out
