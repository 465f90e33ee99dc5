"""NTHR: token scores, self-influence threshold, token selection and advantage reweighting.

Implements docs/method.md §3, reconstructed from arXiv 2505.18830 (Deng et al., "On the
Effect of Negative Gradient in Group Relative Deep Reinforcement Optimization"). Per group, with
``g_t = onehot(y_t) - softmax(logits_t)`` and ``h_t`` the last hidden state that predicts token t:

    token_scores  s_t   = Σ_{k ∈ correct tokens} <g_t, g_k> <h_t, h_k>
    self-influence s̄+_i = mean over the tokens t of correct response i of s_t   (anchor "all")
    threshold      tau  = beta · min_i s̄+_i          (beta = -inf selects every incorrect token)
    selection           = tokens t of incorrect responses with s_t > tau
    reweighting         : the advantage of a selected token becomes eta · A

The module reads top-down as the method: ``token_scores_reference`` (the formula pair by pair in
float64, the definition), ``token_scores`` / ``token_scores_from_hidden`` (the same scores computed
fast by ``score_kernel``: sum-first, chunked, never a (T, T) or a whole group's (T, V) tensor),
``self_influence`` and ``threshold``, ``select_tokens``, ``eta_for``, ``reweight_advantages``, the
per-group step ``apply_to_scores`` / ``apply_to_group`` under an ``NTHRConfig``, and the trainer
hook ``nthr_advantage_fn``. ``vocab="generated"`` restricts ``g`` to V*, the token ids occurring in
the group's responses, without renormalising ``q`` (the paper's speed-up, a choice);
``vocab="full"`` is exact. GWHES and the top-K overlap are in ``similarity``.

The paper defines the self-influence as the influence of a correct response's tokens on the
likelihoods of *other* correct responses; whether the pairs inside one response count is left
open, so ``anchor`` offers "all" (every correct token k, the self pair k == t included: the
default), "other_responses" (only the other correct responses' tokens) and "no_self_token" (all
but k == t). It changes s̄+ and so tau, never the incorrect tokens' scores.

Every function works on one group of G responses unless it says otherwise; ``nthr_advantage_fn``
builds the trainer hook that applies NTHR to a whole rollout batch. The module is longer than the
book's ~500-line guide because it is the whole method in that reading order, each step next to the
one it feeds; what can be read apart (the fast kernel, GWHES) lives in its own module.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from nthr_book.rewards import is_correct
from nthr_book.score_kernel import (
    VOCAB_MODES,
    HiddenSource,
    LogitsSource,
    check_group,
    check_head,
    check_logits,
    check_vocab,
    score_pairs,
    shape_of,
)

__all__ = [
    "ANCHORS",
    "ETA_SCHEDULES",
    "VOCAB_MODES",
    "GroupNTHR",
    "NTHRAdvantageHook",
    "NTHRConfig",
    "apply_to_group",
    "apply_to_scores",
    "eta_for",
    "group_selection",
    "nthr_advantage_fn",
    "random_selection",
    "reweight_advantages",
    "select_tokens",
    "self_influence",
    "threshold",
    "token_scores",
    "token_scores_from_hidden",
    "token_scores_reference",
]

# VOCAB_MODES ("generated", "full") comes from score_kernel, which implements both.
# Which correct tokens k count in the self-influence s̄+ of a correct token t (default "all").
ANCHORS = ("all", "other_responses", "no_self_token")
ETA_SCHEDULES = ("two_abs", "p", "one_minus_p")


# --------------------------------------------------------------------------------------------
# Input checks (those of hidden, tokens, logits and vocab are score_kernel's)
# --------------------------------------------------------------------------------------------


def _check_scores(scores: Tensor, mask: Tensor, correct: Tensor) -> tuple[Tensor, Tensor]:
    """Validate (G, T) scores, (G, T) mask and (G,) correct; return bool mask, correct."""
    if not isinstance(scores, Tensor) or scores.dim() != 2:
        raise ValueError(f"`scores` must be a (G, T) tensor, got {shape_of(scores)}")
    if not isinstance(mask, Tensor) or mask.shape != scores.shape:
        raise ValueError(
            f"`mask` must have the shape of `scores` {tuple(scores.shape)}, got {shape_of(mask)}"
        )
    if not isinstance(correct, Tensor) or tuple(correct.shape) != (scores.shape[0],):
        raise ValueError(
            f"`correct` must have shape (G,) = ({scores.shape[0]},), got {shape_of(correct)}"
        )
    return mask.bool(), correct.bool()


def _check_anchor(anchor: str) -> None:
    """Raise unless ``anchor`` is one of ANCHORS."""
    if anchor not in ANCHORS:
        raise ValueError(f"anchor={anchor!r}: expected one of {ANCHORS}")


# --------------------------------------------------------------------------------------------
# Token scores: the definition, then the same numbers fast
# --------------------------------------------------------------------------------------------


def token_scores_reference(
    hidden: Tensor,
    logits: Tensor,
    tokens: Tensor,
    mask: Tensor,
    correct: Tensor,
    *,
    vocab: str = "full",
) -> Tensor:
    """(G, T) float64 s_t = Σ_{correct k} <g_t,g_k><h_t,h_k>, pair by pair (nb 03's check)."""
    mask, correct = check_group(hidden, tokens, mask, correct)
    check_vocab(vocab)
    q = torch.softmax(logits.double(), dim=-1)  # (G, T, V) predicted next-token distributions
    y = tokens.masked_fill(~mask, 0).long()  # (G, T) token ids, padding read as id 0
    g = torch.nn.functional.one_hot(y, q.shape[-1]) - q  # (G, T, V) g_t = onehot(y_t) - q_t
    if vocab == "generated":
        g = g[..., torch.unique(tokens[mask])]  # (G, T, |V*|): restricted to V*, q not renormalised
    h = hidden.double()  # (G, T, d)
    gg = torch.einsum("itv,jkv->itjk", g, g)  # (G, T, G, T) <g_t, g_k> for every pair of tokens
    hh = torch.einsum("itd,jkd->itjk", h, h)  # (G, T, G, T) <h_t, h_k>
    k_counts = (mask & correct[:, None]).double()  # (G, T): the tokens k of correct responses
    return (gg * hh * k_counts).sum((-2, -1)) * mask  # (G, T), 0 off mask


def _anchor_arg(
    anchor: str | Sequence[str] | None, return_self_pairs: bool
) -> str | tuple[str, ...] | None:
    """The anchor(s) whose pairs a token_scores call returns (None: scores only); validated."""
    if return_self_pairs:
        if anchor not in (None, "no_self_token"):
            raise ValueError(
                f"return_self_pairs=True means anchor='no_self_token', got anchor={anchor!r}"
            )
        return "no_self_token"
    if anchor is None or isinstance(anchor, str):
        if anchor is not None:
            _check_anchor(anchor)
        return anchor
    anchor = tuple(anchor)
    for name in anchor:
        _check_anchor(name)
    return anchor


def token_scores(
    hidden: Tensor,
    logits: Tensor,
    tokens: Tensor,
    mask: Tensor,
    correct: Tensor,
    *,
    vocab: str = "generated",
    dtype: torch.dtype = torch.float32,
    chunk_size: int | None = None,
    return_self_pairs: bool = False,
    anchor: str | Sequence[str] | None = None,
) -> Tensor | tuple[Tensor, Any]:
    """(G, T) token_scores s_t = Σ_{correct k} <g_t,g_k><h_t,h_k> of a group, 0 off mask (nb 03).

    ``anchor`` (one of ANCHORS) returns ``(scores, anchor_pairs)``: the (G, T) part of each correct
    token's score that the self-influence leaves out under that anchor (see ``self_influence``);
    several anchors return ``(scores, {anchor: anchor_pairs})`` from one scoring pass.
    ``return_self_pairs=True`` is anchor="no_self_token".
    """
    mask, correct = check_group(hidden, tokens, mask, correct)
    check_logits(logits, mask)
    make = lambda rows, cols, h, ids: LogitsSource(logits, rows, cols, ids, dtype)
    return score_pairs(
        hidden,
        tokens,
        mask,
        correct,
        logits.shape[-1],
        make,
        vocab=vocab,
        dtype=dtype,
        chunk_size=chunk_size,
        anchor=_anchor_arg(anchor, return_self_pairs),
    )


def token_scores_from_hidden(
    hidden: Tensor,
    lm_head_weight: Tensor,
    tokens: Tensor,
    mask: Tensor,
    correct: Tensor,
    *,
    temperature: float = 1.0,
    lm_head_bias: Tensor | None = None,
    vocab: str = "generated",
    dtype: torch.dtype = torch.float32,
    chunk_size: int | None = None,
    return_self_pairs: bool = False,
    logps: Tensor | None = None,
    softcap: float | None = None,
    anchor: str | Sequence[str] | None = None,
) -> Tensor | tuple[Tensor, Any]:
    """token_scores with logits (hidden @ Wᵀ + b) / temperature made chunk by chunk, never (G, T,
    V).

    ``softcap`` c (a model's ``config.final_logit_softcapping``) makes the logits
    c·tanh((hidden @ Wᵀ + b) / c) / temperature, as ``grpo.per_token_logps`` does; g_t stays the
    prediction error onehot(y_t) - q_t of that distribution (notebook 03). ``logps`` (G, T), the
    log-probs of ``tokens`` under the same logits (e.g. ``old_logps`` from
    ``grpo.per_token_logps``), lets ``vocab="generated"`` skip the full vocabulary altogether: the
    log-sum-exp is lse_t = z_t[y_t] - logps_t with z_t[y_t] made from row y_t of W alone (exact
    with a cap too, which acts on each logit separately), so only the |V*| rows of W are
    multiplied (cost G·T·|V*|·d instead of G·T·V·d). They must come from float32 logits: bf16
    logits shift lse_t by up to about 2⁻⁹·|z|. ``vocab="full"`` ignores them (exact).
    ``anchor`` and ``return_self_pairs`` as in ``token_scores``.
    """
    mask, correct = check_group(hidden, tokens, mask, correct)
    cap = check_head(lm_head_weight, lm_head_bias, hidden.shape[-1], temperature, softcap)
    if logps is not None and (
        not isinstance(logps, Tensor) or tuple(logps.shape) != tuple(mask.shape)
    ):
        raise ValueError(
            f"`logps` must be None or have shape (G, T) = {tuple(mask.shape)}, got "
            f"{shape_of(logps)}"
        )
    make = lambda rows, cols, h, ids: HiddenSource(
        h, lm_head_weight, lm_head_bias, temperature, ids, dtype, cap
    )
    anchor = _anchor_arg(anchor, return_self_pairs)
    return score_pairs(
        hidden,
        tokens,
        mask,
        correct,
        lm_head_weight.shape[0],
        make,
        vocab=vocab,
        dtype=dtype,
        chunk_size=chunk_size,
        anchor=anchor,
        logps=logps,
    )


# --------------------------------------------------------------------------------------------
# Self-influence, threshold, selection
# --------------------------------------------------------------------------------------------


def self_influence(
    scores: Tensor,
    mask: Tensor,
    correct: Tensor,
    *,
    anchor: str = "all",
    anchor_pairs: Tensor | None = None,
    hidden: Tensor | None = None,
    logits: Tensor | None = None,
    tokens: Tensor | None = None,
    vocab: str = "generated",
    exclude_self: bool = False,
    self_pairs: Tensor | None = None,
) -> Tensor:
    """(N+,) s̄+_i: mean over the valid tokens t of correct response i of s_t minus anchor pairs.

    NaN for a response without tokens; rows in order.
    ``anchor`` says which correct tokens k count for t: "all" (every one, the self pair k == t
    included: the book's default), "no_self_token" (all but k == t, whose term is |g_t|²|h_t|²) or
    "other_responses" (only the tokens of the other correct responses: the paper's "influence on the
    likelihoods of other correct responses"). The left-out pairs are ``anchor_pairs`` (the second
    output of ``token_scores(..., anchor=...)``) or else computed from ``hidden``, ``logits``,
    ``tokens`` with the scores' ``vocab``. ``exclude_self=True`` and ``self_pairs`` are the older
    spelling of anchor="no_self_token" and ``anchor_pairs`` (deprecated).
    """
    mask, correct = _check_scores(scores, mask, correct)
    _check_anchor(anchor)
    if exclude_self:
        if anchor not in ("all", "no_self_token"):
            raise ValueError(f"exclude_self=True means anchor='no_self_token', got {anchor=}")
        anchor = "no_self_token"
    if self_pairs is not None:
        if anchor == "all":
            raise ValueError(
                "`self_pairs` was given with exclude_self=False; pass exclude_self=True to use it"
            )
        if anchor_pairs is not None:
            raise ValueError("pass `anchor_pairs` or its older name `self_pairs`, not both")
        anchor_pairs = self_pairs
    if anchor_pairs is None and anchor != "all":
        if hidden is None or logits is None or tokens is None:
            raise ValueError(
                f"anchor={anchor!r} needs `anchor_pairs`, or `hidden`, `logits` and `tokens`"
            )
        _, anchor_pairs = token_scores(
            hidden, logits, tokens, mask, correct, vocab=vocab, dtype=scores.dtype, anchor=anchor
        )
    if anchor_pairs is not None:
        if anchor_pairs.shape != scores.shape:
            raise ValueError(
                f"`anchor_pairs` must be shaped like `scores` {tuple(scores.shape)}, "
                f"got {tuple(anchor_pairs.shape)}"
            )
        scores = scores - anchor_pairs.to(scores.dtype)  # (G, T) s_t over the anchor's k only
    m = mask[correct].to(scores.dtype)  # (N+, T)
    return (scores[correct] * m).sum(-1) / m.sum(-1)  # 0/0 = NaN for an empty response


def threshold(
    scores: Tensor,
    mask: Tensor,
    correct: Tensor,
    beta: float,
    *,
    anchor_pairs: Tensor | None = None,
    self_pairs: Tensor | None = None,
) -> float:
    """tau = beta · min_i s̄+_i over correct responses; -inf when beta = -inf, +inf when none is
    correct.

    beta = -inf is taken literally as "select every incorrect token" (IEEE would give +inf for a
    negative minimum). With no correct response (or only empty ones) tau = +inf, which selects
    nothing. ``anchor_pairs`` (or their older name ``self_pairs``) given: the self-influence leaves
    them out (see ``self_influence``); the default is anchor "all".
    """
    beta = float(beta)
    if math.isnan(beta):
        raise ValueError("beta must be a number or -inf, got nan")
    if beta == -math.inf:
        return -math.inf
    if anchor_pairs is not None and self_pairs is not None:
        raise ValueError("pass `anchor_pairs` or its older name `self_pairs`, not both")
    pairs = self_pairs if anchor_pairs is None else anchor_pairs
    s_bar = self_influence(scores, mask, correct, anchor_pairs=pairs)
    s_bar = s_bar[~s_bar.isnan()]  # responses without tokens have no self-influence
    if s_bar.numel() == 0:
        return math.inf
    return beta * float(s_bar.min())


def select_tokens(
    scores: Tensor,
    mask: Tensor,
    correct: Tensor,
    beta: float,
    *,
    anchor_pairs: Tensor | None = None,
    self_pairs: Tensor | None = None,
) -> Tensor:
    """(G, T) bool: tokens of incorrect responses, inside ``mask``, whose score exceeds tau
    (strictly)."""
    tau = threshold(scores, mask, correct, beta, anchor_pairs=anchor_pairs, self_pairs=self_pairs)
    return _select(scores, mask, correct, tau)


def _select(scores: Tensor, mask: Tensor, correct: Tensor, tau: float) -> Tensor:
    """(G, T) bool: incorrect-response tokens inside ``mask`` with score > tau."""
    return (~correct.bool())[:, None] & mask.bool() & (scores > tau)


# --------------------------------------------------------------------------------------------
# eta, reweighting, the random control
# --------------------------------------------------------------------------------------------


def eta_for(p: float | Tensor, schedule: str | float = "two_abs") -> float | Tensor:
    """eta from p = N+/G: "two_abs" 2|0.5-p| (paper), "p", "one_minus_p", or a constant number."""
    if isinstance(p, Tensor):
        if bool(((p < 0) | (p > 1) | p.isnan()).any()):
            raise ValueError(f"p must lie in [0, 1], got values {p.flatten()[:8].tolist()}")
    elif not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"p must lie in [0, 1], got {p}")
    if isinstance(schedule, bool) or not isinstance(schedule, (str, int, float)):
        raise ValueError(f"eta schedule {schedule!r}: expected one of {ETA_SCHEDULES} or a number")
    if not isinstance(schedule, str):
        c = float(schedule)
        return (
            torch.full_like(p, c, dtype=p.dtype if p.is_floating_point() else torch.float32)
            if isinstance(p, Tensor)
            else c
        )
    if schedule == "two_abs":
        return 2 * (0.5 - p).abs() if isinstance(p, Tensor) else 2 * abs(0.5 - float(p))
    if schedule == "p":
        return p * 1.0 if isinstance(p, Tensor) else float(p)
    if schedule == "one_minus_p":
        return 1.0 - p if isinstance(p, Tensor) else 1.0 - float(p)
    raise ValueError(f"eta schedule {schedule!r}: expected one of {ETA_SCHEDULES} or a number")


def reweight_advantages(advantages: Tensor, selected: Tensor, eta: float | Tensor) -> Tensor:
    """New (G, T) advantages: eta · A on selected tokens, A elsewhere; eta a number, (G,) or (G,
    1)."""
    if selected.shape != advantages.shape:
        raise ValueError(
            f"`selected` must have the shape of `advantages` {tuple(advantages.shape)}, "
            f"got {tuple(selected.shape)}"
        )
    if isinstance(eta, Tensor):
        if eta.dim() == 1 and advantages.dim() == 2 and eta.shape[0] == advantages.shape[0]:
            eta = eta[:, None]  # (G,) -> (G, 1), one eta per response
        try:
            torch.broadcast_shapes(eta.shape, advantages.shape)
        except RuntimeError as err:
            raise ValueError(
                f"`eta` of shape {tuple(eta.shape)} does not broadcast to advantages "
                f"{tuple(advantages.shape)}"
            ) from err
        eta = eta.to(device=advantages.device, dtype=advantages.dtype)
    return torch.where(selected.bool(), eta * advantages, advantages)


def random_selection(selected: Tensor, mask: Tensor, seed: int) -> Tensor:
    """(G, T) bool: per row, as many tokens as ``selected`` has there, uniform among the row's
    mask tokens."""
    if selected.shape != mask.shape or selected.dim() != 2:
        raise ValueError(
            f"`selected` and `mask` must both be (G, T), got {tuple(selected.shape)} "
            f"and {tuple(mask.shape)}"
        )
    selected, mask = selected.bool(), mask.bool()
    outside = (selected & ~mask).any(-1)
    if bool(outside.any()):
        raise ValueError(
            "`selected` marks tokens outside `mask` in row(s) "
            f"{outside.nonzero().flatten().tolist()}"
        )
    counts = selected.sum(-1, keepdim=True)  # (G, 1)
    gen = torch.Generator().manual_seed(int(seed))
    keys = torch.rand(mask.shape, generator=gen).to(mask.device)  # (G, T) uniform keys, CPU-seeded
    keys = keys.masked_fill(~mask, 2.0)  # padding sorts last
    rank = keys.argsort(-1).argsort(-1)  # (G, T) rank of each key within its row
    return (rank < counts) & mask


# --------------------------------------------------------------------------------------------
# The per-group step: NTHRConfig, apply_to_scores, apply_to_group
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NTHRConfig:
    """NTHR settings for the trainer hook (notebook 03); equal settings compare equal."""

    beta: float = 1.0
    """Threshold scale: tau = beta · min_i s̄+_i; -inf selects every incorrect token, 0 positive
    scores."""
    eta: str | float = "two_abs"
    """Advantage factor of selected tokens: "two_abs" 2|0.5-p| (paper), "p", "one_minus_p" or a
    number."""
    vocab: str = "generated"
    """"generated": g restricted to the group's token ids (paper's speed-up); "full": exact."""
    exclude_self: bool = False
    """Deprecated spelling of anchor="no_self_token"; always equals anchor == "no_self_token"."""
    anchor: str = "all"
    """Tokens k in the self-influence s̄+: "all", "other_responses", "no_self_token" (ANCHORS)."""

    def __post_init__(self) -> None:
        check_vocab(self.vocab)
        _check_anchor(self.anchor)
        if math.isnan(float(self.beta)):
            raise ValueError("NTHRConfig.beta must be a number or -inf, got nan")
        eta_for(0.5, self.eta)  # validates the schedule
        if self.exclude_self and self.anchor == "all":
            warnings.warn(
                "NTHRConfig(exclude_self=True) is deprecated: use anchor='no_self_token'",
                DeprecationWarning,
                stacklevel=3,
            )
            object.__setattr__(self, "anchor", "no_self_token")
        elif self.exclude_self and self.anchor != "no_self_token":
            raise ValueError(
                "NTHRConfig: exclude_self=True means anchor='no_self_token', "
                f"got anchor={self.anchor!r}"
            )
        object.__setattr__(self, "exclude_self", self.anchor == "no_self_token")  # spellings agree

    @classmethod
    def paper(cls) -> NTHRConfig:
        """The paper's training setting: beta = 1, eta = 2|0.5 - p|, generated vocabulary."""
        return cls()

    @classmethod
    def lld_diagnostic(cls) -> NTHRConfig:
        """The paper's per-question LLD diagnostic (Figure 4): beta = 1, eta = 0."""
        return cls(eta=0.0)


@dataclass(frozen=True)
class GroupNTHR:
    """NTHR's result on one group (``apply_to_group`` / ``apply_to_scores``; notebook 03)."""

    new_advantages: Tensor  # (G, T) eta·A on selected tokens, A elsewhere
    selected: Tensor  # (G, T) bool: incorrect tokens with s_t > tau and A < 0
    tau: float  # beta · min_i s̄+_i
    scores: Tensor  # (G, T) token_scores, 0 off mask
    eta: float  # eta_for(p, config.eta), p = N+/G
    stats: dict[str, float]  # n_selected, n_incorrect_tokens, score_sum (over incorrect tokens)


def apply_to_scores(
    scores: Tensor,
    mask: Tensor,
    correct: Tensor,
    advantages: Tensor,
    config: NTHRConfig,
    anchor_pairs: Tensor | None = None,
) -> GroupNTHR:
    """NTHR on one group's (G, T) scores: tau, selection, eta and the new advantages (nb 03).

    The one place the step after the scores happens: ``threshold`` (``anchor_pairs`` are the pairs
    that ``config.anchor`` leaves out of s̄+, needed unless the anchor is "all" or beta = -inf), the
    selection s_t > tau of incorrect tokens inside ``mask`` whose advantage is negative (eta·A
    dampens a push-down, never a push-up: a no-op for binary rewards, where every incorrect response
    of a mixed group has A < 0), eta = ``eta_for(N+/G, config.eta)`` and ``reweight_advantages``.
    ``advantages`` are (G, T) per token or (G,) per response (then broadcast over T, padding
    included). A homogeneous group selects nothing.
    """
    mask, correct = _check_scores(scores, mask, correct)
    G, T = mask.shape
    if not isinstance(advantages, Tensor) or tuple(advantages.shape) not in ((G, T), (G,)):
        raise ValueError(
            f"`advantages` must have shape (G, T) = {(G, T)} or (G,), got {shape_of(advantages)}"
        )
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand(G, T)  # one advantage per response
    if anchor_pairs is None and config.anchor != "all" and float(config.beta) != -math.inf:
        raise ValueError(f"anchor={config.anchor!r} needs `anchor_pairs` (see token_scores)")
    tau = threshold(scores, mask, correct, config.beta, anchor_pairs=anchor_pairs)
    selected = _select(scores, mask, correct, tau) & (advantages < 0).to(mask.device)  # (G, T)
    eta = float(eta_for(int(correct.sum()) / G, config.eta))
    incorrect = (~correct)[:, None] & mask  # (G, T) tokens of the incorrect responses
    stats = {
        "n_selected": float(selected.sum()),
        "n_incorrect_tokens": float(incorrect.sum()),
        "score_sum": float(scores[incorrect].sum()),
    }
    return GroupNTHR(
        new_advantages=reweight_advantages(advantages, selected, eta),
        selected=selected,
        tau=tau,
        scores=scores,
        eta=eta,
        stats=stats,
    )


def _scores_and_pairs(
    hidden: Tensor,
    lm_head_weight: Tensor,
    tokens: Tensor,
    mask: Tensor,
    correct: Tensor,
    config: NTHRConfig,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """(G, T) scores and the anchor pairs ``config`` needs for tau (None when it needs none)."""
    skip_pairs = config.anchor == "all" or float(config.beta) == -math.inf  # tau needs no pairs
    out = token_scores_from_hidden(
        hidden,
        lm_head_weight,
        tokens,
        mask,
        correct,
        vocab=config.vocab,
        anchor=None if skip_pairs else config.anchor,
        **kwargs,
    )
    return (out, None) if skip_pairs else out


def apply_to_group(
    hidden: Tensor,
    lm_head_weight: Tensor,
    tokens: Tensor,
    mask: Tensor,
    correct: Tensor,
    advantages: Tensor,
    config: NTHRConfig,
    *,
    temperature: float = 1.0,
    lm_head_bias: Tensor | None = None,
    softcap: float | None = None,
    logps: Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    chunk_size: int | None = None,
) -> GroupNTHR:
    """NTHR on one group from its hidden states: ``token_scores_from_hidden``, then
    ``apply_to_scores`` (notebook 03). The trainer hook, TRL and LLD go through it.
    """
    scores, pairs = _scores_and_pairs(
        hidden,
        lm_head_weight,
        tokens,
        mask,
        correct,
        config,
        temperature=temperature,
        lm_head_bias=lm_head_bias,
        dtype=dtype,
        chunk_size=chunk_size,
        logps=logps,
        softcap=softcap,
    )
    return apply_to_scores(scores, mask, correct, advantages, config, anchor_pairs=pairs)


def group_selection(
    hidden: Tensor,
    lm_head_weight: Tensor,
    tokens: Tensor,
    mask: Tensor,
    correct: Tensor,
    config: NTHRConfig,
    **kwargs: Any,
) -> tuple[Tensor, float, Tensor]:
    """(G, T) token_scores, tau and (G, T) selection of one group under an NTHRConfig (notebook 03).

    ``apply_to_group`` (same keyword arguments) with the advantages' signs of binary rewards (every
    incorrect response negative), so the selection is every incorrect token with s_t > tau.
    """
    mask_b, correct_b = check_group(hidden, tokens, mask, correct)
    signs = torch.where(correct_b, 1.0, -1.0)  # (G,) the sign of a binary reward's advantage
    res = apply_to_group(hidden, lm_head_weight, tokens, mask_b, correct_b, signs, config, **kwargs)
    return res.scores, res.tau, res.selected


# --------------------------------------------------------------------------------------------
# The trainer hook
# --------------------------------------------------------------------------------------------


class NTHRAdvantageHook:
    """Trainer hook: ``hook(ctx) -> (advantages, metrics)`` applying NTHR to every mixed group of a
    batch.

    ``ctx`` has ``advantages`` (N, T), ``rewards`` (num_groups, G), ``group_size``,
    ``completion_ids`` (N, T), ``completion_mask`` (N, T), ``hidden`` (N, T, d), ``lm_head_weight``
    (V, d), ``lm_head_bias`` (V,) or None and ``temperature``, and optionally ``softcap`` (the
    model's ``final_logit_softcapping``) and ``old_logps`` (N, T), the float32 token log-probs of
    the pass that produced ``hidden``: when present (and ``use_logps``) the generated-vocabulary
    scores take their log-sum-exp from them and never multiply by the whole head (see
    ``token_scores_from_hidden``). A response is correct when ``rewards.is_correct`` (reward > 0.5).
    Each mixed group goes through ``apply_to_group``.
    Metrics: ``nthr/selected_frac`` (selected / all incorrect tokens of mixed groups),
    ``nthr/tau_mean``, ``nthr/score_mean`` (mean incorrect-token score), ``nthr/eta_mean`` (means
    over mixed groups; NaN when there is none; tau_mean is -inf for beta = -inf) and
    ``nthr/mixed_groups``.
    """

    needs_hidden = True

    def __init__(
        self,
        config: NTHRConfig,
        *,
        dtype: torch.dtype = torch.float32,
        chunk_size: int | None = None,
        use_logps: bool = True,
    ):
        self.config, self.dtype, self.chunk_size, self.use_logps = (
            config,
            dtype,
            chunk_size,
            bool(use_logps),
        )

    def __repr__(self) -> str:
        settings = asdict(self.config)
        if settings["anchor"] != "other_responses":  # spelled exclude_self=False / True, as older
            del settings["anchor"]  # runs recorded them
        fields = ", ".join(f"{k}={v!r}" for k, v in settings.items())
        extra = "" if self.use_logps else ", use_logps=False"  # the default keeps older runs' repr
        return f"NTHRAdvantageHook({fields}{extra})"

    @torch.no_grad()
    def __call__(self, ctx: Any) -> tuple[Tensor, dict[str, float]]:
        cfg = self.config
        advantages, rewards, G = ctx.advantages, ctx.rewards, int(ctx.group_size)
        if rewards.dim() != 2 or rewards.shape[1] != G:
            raise ValueError(
                f"ctx.rewards must be (num_groups, group_size={G}), got {tuple(rewards.shape)}"
            )
        N, T = rewards.numel(), advantages.shape[-1]
        for name in ("advantages", "completion_ids", "completion_mask"):
            if tuple(getattr(ctx, name).shape) != (N, T):
                raise ValueError(
                    f"ctx.{name} must be (N, T) = {(N, T)}, got {tuple(getattr(ctx, name).shape)}"
                )
        if ctx.hidden.dim() != 3 or tuple(ctx.hidden.shape[:2]) != (N, T):
            raise ValueError(
                f"ctx.hidden must be (N, T, d) with (N, T) = {(N, T)}, got "
                f"{tuple(ctx.hidden.shape)}"
            )
        old_logps = getattr(ctx, "old_logps", None) if self.use_logps else None
        softcap = getattr(ctx, "softcap", None)
        if old_logps is not None and tuple(old_logps.shape) != (N, T):
            raise ValueError(
                f"ctx.old_logps must be (N, T) = {(N, T)}, got {tuple(old_logps.shape)}"
            )
        correct_all = is_correct(rewards).to(advantages.device)  # (num_groups, G)
        mask_all = ctx.completion_mask.bool()
        new_adv = advantages.clone()
        n_sel = n_neg = score_sum = 0.0
        taus, etas = [], []
        for g in range(rewards.shape[0]):
            correct = correct_all[g]
            if int(correct.sum()) in (0, G):
                continue  # homogeneous group: untouched
            rows = slice(g * G, (g + 1) * G)
            res = apply_to_group(
                ctx.hidden[rows],
                ctx.lm_head_weight,
                ctx.completion_ids[rows],
                mask_all[rows],
                correct,
                advantages[rows],
                cfg,
                temperature=ctx.temperature,
                lm_head_bias=ctx.lm_head_bias,
                softcap=softcap,
                logps=None if old_logps is None else old_logps[rows],
                dtype=self.dtype,
                chunk_size=self.chunk_size,
            )
            new_adv[rows] = res.new_advantages
            n_sel += res.stats["n_selected"]
            n_neg += res.stats["n_incorrect_tokens"]
            score_sum += res.stats["score_sum"]
            taus.append(res.tau)
            etas.append(res.eta)
        nan = math.nan
        metrics = {
            "nthr/selected_frac": n_sel / n_neg if n_neg else nan,
            "nthr/tau_mean": sum(taus) / len(taus) if taus else nan,
            "nthr/score_mean": score_sum / n_neg if n_neg else nan,
            "nthr/eta_mean": sum(etas) / len(etas) if etas else nan,
            "nthr/mixed_groups": float(len(taus)),
        }
        return new_adv, metrics


def nthr_advantage_fn(
    beta: float | NTHRConfig = 1.0,
    eta: str | float = "two_abs",
    vocab: str = "generated",
    *,
    anchor: str = "all",
    exclude_self: bool = False,
    dtype: torch.dtype = torch.float32,
    chunk_size: int | None = None,
    use_logps: bool = True,
) -> NTHRAdvantageHook:
    """The NTHR trainer hook: an ``NTHRConfig`` as ``beta``, or its fields one by one (nb 05)."""
    if isinstance(beta, NTHRConfig):
        config = beta
    else:
        config = NTHRConfig(
            beta=float(beta), eta=eta, vocab=vocab, exclude_self=exclude_self, anchor=anchor
        )
    return NTHRAdvantageHook(config, dtype=dtype, chunk_size=chunk_size, use_logps=use_logps)
