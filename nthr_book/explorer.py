"""The threshold explorer's state: a group's token scores, then τ, selection and advantages at
settings.

Implements the computations behind notebook 04's explorer (docs/method.md §3, arXiv 2505.18830,
Deng et al., "On the Effect of Negative Gradient in Group Relative Deep Reinforcement
Optimization"): pure functions and frozen data, no widgets and no HTML.

- ``compute_group_scores``    : one forward pass per group -> ``GroupScores`` (token_scores and the
  anchor pairs of ``nthr.ANCHORS`` per vocab mode, CPU tensors, display pieces of the tokens)
- ``explorer_state``          : ``GroupScores`` + (beta, eta, vocab, anchor) -> ``ExplorerState``
  (tau, selection, counts, advantages), only through ``nthr.apply_to_scores`` (and
  ``nthr.self_influence`` for s̄+); moving a setting never runs the model
- ``default_response``        : the incorrect response worth showing first
- ``displacement_comparison`` : Δ(x) of one NTHR update at a state's settings next to GRPO's
  (``lld``)

``explorer_html`` draws an ``ExplorerState``; ``widgets`` wires both to ipywidgets controls.

Why one long module: the two dataclasses carry the validation of every setting the explorer can
take, next to the state they describe.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from nthr_book import grpo, nthr, viz
from nthr_book.models import eval_mode, lm_head
from nthr_book.rewards import is_correct
from nthr_book.score_kernel import shape_of

__all__ = [
    "ETA_CHOICES",
    "ExplorerState",
    "GroupScores",
    "compute_group_scores",
    "default_response",
    "displacement_comparison",
    "display_tokens",
    "explorer_state",
]

# (label, value) of the η schedules the explorer offers; 0 is the paper's LLD diagnostic.
ETA_CHOICES: tuple[tuple[str, str | float], ...] = (
    ("2|0.5 - p| (paper, training)", "two_abs"),
    ("p", "p"),
    ("1 - p", "one_minus_p"),
    ("0 (LLD diagnostic)", 0.0),
)


# --------------------------------------------------------------------------------------------
# Scores of one group, computed once
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GroupScores:
    """One mixed group's token_scores (per vocab mode) with what the explorer shows (CPU
    tensors)."""

    question_id: str
    completion_ids: Tensor  # (G, T) long
    completion_mask: Tensor  # (G, T) bool
    rewards: Tensor  # (G,) float, 1.0 = correct
    token_scores: Mapping[str, Tensor]  # vocab mode -> (G, T) float, 0 off mask
    tokens: list[list[str]]  # (G,) lists: display piece of every valid token of each response
    problem: str = ""
    answer: str = ""
    temperature: float = 1.0
    anchor_pairs: Mapping[str, Mapping[str, Tensor]] = field(default_factory=dict)
    """vocab mode -> anchor -> (G, T) pairs the anchor leaves out of s̄+ (token_scores(anchor=))."""

    def __post_init__(self) -> None:
        qid = self.question_id
        ids, mask = self.completion_ids, self.completion_mask
        if not isinstance(ids, Tensor) or ids.dim() != 2:
            raise ValueError(
                f"GroupScores {qid!r}: `completion_ids` must be (G, T), got {shape_of(ids)}"
            )
        G, T = ids.shape
        if not isinstance(mask, Tensor) or tuple(mask.shape) != (G, T):
            raise ValueError(
                f"GroupScores {qid!r}: `completion_mask` must be (G, T) = {(G, T)}, got "
                f"{shape_of(mask)}"
            )
        if not isinstance(self.rewards, Tensor) or tuple(self.rewards.shape) != (G,):
            raise ValueError(
                f"GroupScores {qid!r}: `rewards` must be (G,) = ({G},), got "
                f"{shape_of(self.rewards)}"
            )
        if not self.token_scores:
            raise ValueError(
                f"GroupScores {qid!r}: `token_scores` is empty (expected vocab mode -> (G, T) "
                "scores)"
            )
        for vocab, s in self.token_scores.items():
            if vocab not in nthr.VOCAB_MODES:
                raise ValueError(
                    f"GroupScores {qid!r}: token_scores key {vocab!r} is not one of "
                    f"{nthr.VOCAB_MODES}"
                )
            if not isinstance(s, Tensor) or tuple(s.shape) != (G, T):
                raise ValueError(
                    f"GroupScores {qid!r}: token_scores[{vocab!r}] must be (G, T) = {(G, T)}, "
                    f"got {shape_of(s)}"
                )
        for vocab, by_anchor in self.anchor_pairs.items():
            if vocab not in self.token_scores:
                raise ValueError(
                    f"GroupScores {qid!r}: anchor_pairs[{vocab!r}] without {vocab!r} token_scores"
                )
            for anchor, pairs in by_anchor.items():
                if anchor not in nthr.ANCHORS:
                    raise ValueError(
                        f"GroupScores {qid!r}: anchor_pairs key {anchor!r} is not "
                        f"one of {nthr.ANCHORS}"
                    )
                if not isinstance(pairs, Tensor) or tuple(pairs.shape) != (G, T):
                    where = f"anchor_pairs[{vocab!r}][{anchor!r}]"
                    raise ValueError(
                        f"GroupScores {qid!r}: {where} must be (G, T) = {(G, T)}, "
                        f"got {shape_of(pairs)}"
                    )
        lengths = mask.sum(1).tolist()
        if len(self.tokens) != G or any(len(t) != n for t, n in zip(self.tokens, lengths)):
            got = [len(t) for t in self.tokens]
            raise ValueError(
                f"GroupScores {qid!r}: `tokens` must hold one piece per valid token of each "
                f"response ({lengths}), got {got}"
            )

    @classmethod
    def from_group(
        cls,
        group: Any,
        token_scores: Mapping[str, Tensor],
        *,
        tokenizer: Any = None,
        temperature: float = 1.0,
        anchor_pairs: Mapping[str, Mapping[str, Tensor]] | None = None,
    ) -> GroupScores:
        """GroupScores of an ``groups.Group`` from precomputed (G, T) token_scores and anchor
        pairs."""
        r = group.rollouts
        ids = r.completion_ids.detach().cpu().long()  # (G, T)
        mask = r.completion_mask.detach().cpu().bool()  # (G, T)
        return cls(
            question_id=str(group.question_id),
            completion_ids=ids,
            completion_mask=mask,
            rewards=group.rewards.detach().cpu().float(),
            token_scores={k: v.detach().cpu().float() for k, v in token_scores.items()},
            tokens=display_tokens(ids, mask, tokenizer),
            problem=str(group.problem),
            answer=str(group.answer),
            temperature=float(temperature),
            anchor_pairs={
                v: {a: p.detach().cpu().float() for a, p in by.items()}
                for v, by in (anchor_pairs or {}).items()
            },
        )

    @property
    def group_size(self) -> int:
        """G, the number of responses."""
        return int(self.completion_ids.shape[0])

    @property
    def correct(self) -> Tensor:
        """(G,) bool: ``rewards.is_correct`` (reward > 0.5)."""
        return is_correct(self.rewards)

    @property
    def incorrect_rows(self) -> list[int]:
        """Row indices of the incorrect responses."""
        return (~self.correct).nonzero().flatten().tolist()

    @property
    def vocab_modes(self) -> tuple[str, ...]:
        """The vocab modes whose scores are present."""
        return tuple(self.token_scores)

    def scores(self, vocab: str) -> Tensor:
        """(G, T) token_scores of ``vocab``; KeyError naming what is present when absent."""
        if vocab not in self.token_scores:
            raise KeyError(
                f"GroupScores {self.question_id!r} has no {vocab!r} scores (present: "
                f"{list(self.token_scores)}); compute them with compute_group_scores(..., "
                f"vocab={vocab!r})"
            )
        return self.token_scores[vocab]

    def pairs(self, vocab: str, anchor: str) -> Tensor | None:
        """(G, T) pairs ``anchor`` leaves out of s̄+ (None for "all"); KeyError when absent."""
        if anchor not in nthr.ANCHORS:
            raise ValueError(f"anchor={anchor!r}: expected one of {nthr.ANCHORS}")
        if anchor == "all":
            return None
        pairs = self.anchor_pairs.get(vocab, {}).get(anchor)
        if pairs is None:
            raise KeyError(
                f"GroupScores {self.question_id!r} has no {anchor!r} anchor pairs for "
                f"{vocab!r}; compute them with compute_group_scores(..., "
                f"anchors=[{anchor!r}])"
            )
        return pairs

    def has_anchor(self, vocab: str, anchor: str) -> bool:
        """True when the ``vocab`` scores and (unless "all") the anchor's pairs are here."""
        has_pairs = anchor == "all" or anchor in self.anchor_pairs.get(vocab, {})
        return vocab in self.token_scores and has_pairs

    def with_scores(self, other: GroupScores) -> GroupScores:
        """A copy holding the vocab modes of both (``other`` wins on overlap); same group
        required."""
        if other.question_id != self.question_id or not torch.equal(
            other.completion_ids, self.completion_ids
        ):
            raise ValueError(
                f"cannot merge scores of question {other.question_id!r} into {self.question_id!r}"
            )
        pairs = {v: dict(by) for v, by in self.anchor_pairs.items()}
        for v in other.token_scores:  # other's scores come with other's pairs (or none)
            pairs[v] = dict(other.anchor_pairs.get(v, {}))
        return replace(
            self, token_scores={**self.token_scores, **other.token_scores}, anchor_pairs=pairs
        )


def display_tokens(
    completion_ids: Tensor, completion_mask: Tensor, tokenizer: Any = None
) -> list[list[str]]:
    """Per response, the display piece of every valid token (``viz.tokens_for_display``; ⟨id⟩
    without tokenizer)."""
    out = []
    for ids, m in zip(completion_ids.cpu(), completion_mask.cpu().bool()):
        valid = ids[m]
        out.append(
            viz.tokens_for_display(tokenizer, valid)
            if tokenizer is not None
            else [f"⟨{int(i)}⟩" for i in valid]
        )
    return out


@torch.no_grad()
def compute_group_scores(
    model: nn.Module,
    group: Any,
    *,
    vocab: str | Sequence[str] = "generated",
    temperature: float = 1.0,
    tokenizer: Any = None,
    batch_size: int | None = None,
    dtype: torch.dtype = torch.float32,
    anchors: Sequence[str] = nthr.ANCHORS,
) -> GroupScores:
    """GroupScores of one ``groups.Group``: one forward pass, then token_scores for each vocab mode
    (notebook 04).

    Hidden states come from ``grpo.group_token_logps(return_hidden=True)`` (eval mode, no gradient),
    scores from ``nthr.token_scores_from_hidden`` with the model's LM head, ``temperature`` and
    ``final_logit_softcapping``. ``vocab`` is one mode or several ("generated", "full"): every mode
    reuses the same hidden states. ``anchors``: whose anchor pairs to keep, so the explorer can
    switch anchor without the model ("other_responses" costs one more pass over the correct tokens).
    """
    modes = (vocab,) if isinstance(vocab, str) else tuple(vocab)
    if not modes:
        raise ValueError("`vocab` is empty: pass 'generated', 'full' or both")
    for mode in modes:
        if mode not in nthr.VOCAB_MODES:
            raise ValueError(f"vocab={mode!r}: expected one of {nthr.VOCAB_MODES}")
    anchors = (anchors,) if isinstance(anchors, str) else tuple(anchors)
    for anchor in anchors:
        if anchor not in nthr.ANCHORS:
            raise ValueError(f"anchors: {anchor!r} is not one of {nthr.ANCHORS}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    try:
        device = next(model.parameters()).device
    except StopIteration:
        raise ValueError("`model` has no parameters") from None
    r = group.rollouts.to(device)
    mask = r.completion_mask.bool()  # (G, T)
    with eval_mode(model):
        _, hidden = grpo.group_token_logps(
            model,
            r.prompt_ids,
            r.prompt_mask,
            r.completion_ids,
            mask,
            temperature=temperature,
            batch_size=batch_size,
            return_hidden=True,
        )  # (G, T, d)
    head = lm_head(model)
    correct = group.correct.to(device)  # (G,)
    kw = dict(temperature=temperature, lm_head_bias=head.bias, dtype=dtype, softcap=head.softcap)
    scores, pairs = {}, {}
    keep = tuple(a for a in anchors if a != "all")  # "all" leaves nothing out
    for mode in modes:
        s, by_anchor = nthr.token_scores_from_hidden(
            hidden, head.weight, r.completion_ids, mask, correct, vocab=mode, anchor=keep, **kw
        )
        scores[mode] = s.cpu()  # (G, T)
        pairs[mode] = {a: p.cpu() for a, p in by_anchor.items()}  # anchor -> (G, T)
    return GroupScores.from_group(
        group, scores, tokenizer=tokenizer, temperature=temperature, anchor_pairs=pairs
    )


# --------------------------------------------------------------------------------------------
# The state at given settings (pure)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExplorerState:
    """τ, selection and advantages of a group at (beta, eta, vocab, anchor): the explorer view."""

    question_id: str
    vocab: str
    anchor: str  # nthr.ANCHORS: which correct tokens k count in s̄+
    beta: float
    eta_schedule: str | float
    eta: float  # eta_for(p, eta_schedule)
    p: float  # N+ / G
    tau: float  # beta · min_i s̄+_i (-inf for beta = -inf)
    self_influence: list[float]  # (N+,) s̄+_i of the correct responses under ``anchor``
    selected: Tensor  # (G, T) bool: incorrect tokens with score > tau
    n_tokens: list[int]  # (G,) valid tokens per response
    n_selected: list[int]  # (G,) selected tokens per response (0 for correct ones)
    advantages: Tensor  # (G, T) GRPO advantages, 0 off mask
    new_advantages: Tensor  # (G, T) eta·A on selected tokens, A elsewhere
    completion_mask: Tensor  # (G, T) bool
    correct: list[bool]  # (G,)

    @property
    def n_selected_group(self) -> int:
        """Selected tokens in the whole group."""
        return int(sum(self.n_selected))

    @property
    def n_incorrect_tokens(self) -> int:
        """Valid tokens of the incorrect responses."""
        return int(sum(n for n, c in zip(self.n_tokens, self.correct) if not c))

    @property
    def selected_frac(self) -> float:
        """Selected / incorrect tokens of the group (NaN without incorrect tokens)."""
        n = self.n_incorrect_tokens
        return self.n_selected_group / n if n else math.nan

    def response_frac(self, row: int) -> float:
        """Selected / valid tokens of response ``row`` (NaN for an empty one)."""
        return self.n_selected[row] / self.n_tokens[row] if self.n_tokens[row] else math.nan

    @property
    def mean_incorrect_advantage(self) -> float:
        """Mean new advantage over the incorrect responses' tokens (the push-down NTHR keeps)."""
        return self._mean_incorrect(self.new_advantages)

    @property
    def mean_incorrect_advantage_grpo(self) -> float:
        """Mean GRPO advantage over the incorrect responses' tokens (before reweighting)."""
        return self._mean_incorrect(self.advantages)

    def _mean_incorrect(self, adv: Tensor) -> float:
        """Mean of (G, T) advantages over the valid tokens of the incorrect responses (NaN if
        none)."""
        where = (~torch.tensor(self.correct, dtype=torch.bool))[
            :, None
        ] & self.completion_mask  # (G, T)
        n = int(where.sum())
        return float(adv[where].sum()) / n if n else math.nan

    def summary(self) -> dict[str, Any]:
        """One flat row: settings, tau, counts, fractions, mean incorrect advantage (for tables)."""
        return {
            "id": self.question_id,
            "vocab": self.vocab,
            "anchor": self.anchor,
            "beta": self.beta,
            "eta_schedule": str(self.eta_schedule),
            "eta": self.eta,
            "p": self.p,
            "tau": self.tau,
            "n_selected": self.n_selected_group,
            "n_incorrect_tokens": self.n_incorrect_tokens,
            "selected_frac": self.selected_frac,
            "mean_adv_incorrect": self.mean_incorrect_advantage,
            "mean_adv_incorrect_grpo": self.mean_incorrect_advantage_grpo,
        }


def default_response(state: ExplorerState) -> int:
    """The incorrect response with the most selected tokens (the first one on ties): the one
    worth showing."""
    rows = [g for g, ok in enumerate(state.correct) if not ok]
    return max(rows, key=lambda g: (state.n_selected[g], -g))


def check_beta(beta: float) -> float:
    """β as a float: a number or -inf (NaN and +inf raise ValueError)."""
    beta = float(beta)
    if math.isnan(beta) or beta == math.inf:
        raise ValueError(f"beta must be a finite number or -inf, got {beta}")
    return beta


def explorer_state(
    scores: GroupScores,
    *,
    beta: float = 1.0,
    eta: str | float = "two_abs",
    vocab: str = "generated",
    anchor: str = "all",
) -> ExplorerState:
    """The ExplorerState of a group at (beta, eta, vocab, anchor) from nthr's functions (nb 04).

    τ, selection, η and the new advantages come from ``nthr.apply_to_scores`` on the precomputed
    scores, s̄+ from ``nthr.self_influence``. ``anchor`` (``nthr.ANCHORS``) changes s̄+ and so τ,
    never the incorrect tokens' scores.
    """
    beta = check_beta(beta)
    s = scores.scores(vocab)  # (G, T)
    pairs = scores.pairs(vocab, anchor)  # (G, T) or None for "all"
    mask, correct = scores.completion_mask, scores.correct  # (G, T), (G,)
    n_pos, G = int(correct.sum()), scores.group_size
    if n_pos in (0, G):
        raise ValueError(
            f"question {scores.question_id!r} is not mixed (N+={n_pos} of G={G}): nothing to select"
        )
    advantages = grpo.expand_advantages(grpo.group_advantages(scores.rewards[None]), mask)  # (G, T)
    config = nthr.NTHRConfig(beta=beta, eta=eta, vocab=vocab, anchor=anchor)
    res = nthr.apply_to_scores(s, mask, correct, advantages, config, anchor_pairs=pairs)
    return ExplorerState(
        question_id=scores.question_id,
        vocab=vocab,
        anchor=anchor,
        beta=beta,
        eta_schedule=eta,
        eta=res.eta,
        p=n_pos / G,
        tau=float(res.tau),
        self_influence=nthr.self_influence(s, mask, correct, anchor_pairs=pairs).tolist(),
        selected=res.selected,
        n_tokens=mask.sum(1).tolist(),
        n_selected=res.selected.sum(1).tolist(),
        advantages=advantages,
        new_advantages=res.new_advantages,
        completion_mask=mask.clone(),
        correct=correct.tolist(),
    )


# --------------------------------------------------------------------------------------------
# One update: NTHR vs GRPO
# --------------------------------------------------------------------------------------------


def displacement_comparison(
    model: nn.Module,
    group: Any,
    state: ExplorerState,
    *,
    lr: float,
    optimizer: str = "sgd",
    temperature: float = 1.0,
    grpo_result: Any = None,
    progress: Callable[[int, str], None] | None = None,
) -> tuple[Any, Any]:
    """(NTHR, GRPO) ``lld.QuestionDisplacement`` of one update on ``group``; NTHR uses ``state``'s
    selection and η.

    ``grpo_result`` reuses an earlier GRPO run (it does not depend on β, η or vocab). ``progress(k,
    what)`` is called before each of the two runs and at the end (k = 0, 1, 2).
    """
    from nthr_book import lld

    report = progress or (lambda k, what: None)
    report(0, "NTHR update")
    res_nthr = lld.one_step_displacement(
        model,
        group,
        update="nthr",
        lr=lr,
        optimizer=optimizer,
        beta=state.beta,
        eta=state.eta,
        temperature=temperature,
        vocab=state.vocab,
        selected=state.selected,
    )
    report(1, "GRPO update")
    if grpo_result is None:
        grpo_result = lld.one_step_displacement(
            model, group, update="grpo", lr=lr, optimizer=optimizer, temperature=temperature
        )
    report(2, "done")
    return res_nthr, grpo_result
