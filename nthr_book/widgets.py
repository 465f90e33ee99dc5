"""The NTHR threshold explorer: token scores, τ, selected tokens and advantages of one group, live.

Implements the interactive view of docs/method.md §3 for arXiv 2505.18830 (Deng et al., "On the Effect
of Negative Gradient in Group Relative Deep Reinforcement Optimization"), notebook 04. The module is
thin wiring over pure functions:

- ``compute_group_scores`` : one forward pass per group -> ``GroupScores`` (token_scores and the
  anchor pairs of ``nthr.ANCHORS`` per vocab mode)
- ``explorer_state``       : ``GroupScores`` + (beta, eta, vocab, anchor) -> ``ExplorerState`` (tau,
  selection, counts, advantages), only through ``nthr.apply_to_scores`` (and
  ``nthr.self_influence`` for s̄+)
- ``render_explorer_html`` : ``ExplorerState`` -> HTML (``viz.render_token_scores_html``,
  ``viz.plot_score_histogram`` as an inline PNG, a per-token advantage strip)
- ``threshold_explorer``   : the widget (``ThresholdExplorer``, an ipywidgets ``VBox``), returned
  without being displayed; moving a control never recomputes scores
- ``explorer_snapshot``    : the same picture as static HTML, for executed notebooks viewed without a kernel
- ``displacement_comparison`` : Δ(x) of one NTHR update (current settings) next to GRPO's (``lld``)
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import ipywidgets as ipw
import torch
from torch import Tensor, nn

from nthr_book import grpo, nthr, viz
from nthr_book.models import eval_mode, lm_head
from nthr_book.rewards import is_correct

__all__ = [
    "BETA_RANGE",
    "ETA_CHOICES",
    "ExplorerState",
    "GroupScores",
    "ThresholdExplorer",
    "compute_group_scores",
    "default_response",
    "displacement_comparison",
    "explorer_snapshot",
    "explorer_state",
    "render_explorer_html",
    "threshold_explorer",
]

# (label, value) of the η schedules offered by the explorer; 0 is the paper's LLD diagnostic.
ETA_CHOICES: tuple[tuple[str, str | float], ...] = (
    ("2|0.5 - p| (paper, training)", "two_abs"),
    ("p", "p"),
    ("1 - p", "one_minus_p"),
    ("0 (LLD diagnostic)", 0.0),
)
BETA_RANGE = (-1.0, 3.0, 0.05)  # (min, max, step) of the β slider; β = -∞ is a separate toggle


# --------------------------------------------------------------------------------------------
# Scores of one group, computed once
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GroupScores:
    """One mixed group's token_scores (per vocab mode) with what the explorer shows (CPU tensors)."""

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
            raise ValueError(f"GroupScores {qid!r}: `completion_ids` must be (G, T), got {_shape(ids)}")
        G, T = ids.shape
        if not isinstance(mask, Tensor) or tuple(mask.shape) != (G, T):
            raise ValueError(f"GroupScores {qid!r}: `completion_mask` must be (G, T) = {(G, T)}, got {_shape(mask)}")
        if not isinstance(self.rewards, Tensor) or tuple(self.rewards.shape) != (G,):
            raise ValueError(f"GroupScores {qid!r}: `rewards` must be (G,) = ({G},), got {_shape(self.rewards)}")
        if not self.token_scores:
            raise ValueError(f"GroupScores {qid!r}: `token_scores` is empty (expected vocab mode -> (G, T) scores)")
        for vocab, s in self.token_scores.items():
            if vocab not in nthr.VOCAB_MODES:
                raise ValueError(f"GroupScores {qid!r}: token_scores key {vocab!r} is not one of {nthr.VOCAB_MODES}")
            if not isinstance(s, Tensor) or tuple(s.shape) != (G, T):
                raise ValueError(f"GroupScores {qid!r}: token_scores[{vocab!r}] must be (G, T) = {(G, T)}, "
                                 f"got {_shape(s)}")
        for vocab, by_anchor in self.anchor_pairs.items():
            if vocab not in self.token_scores:
                raise ValueError(f"GroupScores {qid!r}: anchor_pairs[{vocab!r}] without "
                                 f"{vocab!r} token_scores")
            for anchor, pairs in by_anchor.items():
                if anchor not in nthr.ANCHORS:
                    raise ValueError(f"GroupScores {qid!r}: anchor_pairs key {anchor!r} is not "
                                     f"one of {nthr.ANCHORS}")
                if not isinstance(pairs, Tensor) or tuple(pairs.shape) != (G, T):
                    where = f"anchor_pairs[{vocab!r}][{anchor!r}]"
                    raise ValueError(f"GroupScores {qid!r}: {where} must be (G, T) = {(G, T)}, "
                                     f"got {_shape(pairs)}")
        lengths = mask.sum(1).tolist()
        if len(self.tokens) != G or any(len(t) != n for t, n in zip(self.tokens, lengths)):
            got = [len(t) for t in self.tokens]
            raise ValueError(f"GroupScores {qid!r}: `tokens` must hold one piece per valid token of each "
                             f"response ({lengths}), got {got}")

    @classmethod
    def from_group(cls, group: Any, token_scores: Mapping[str, Tensor], *, tokenizer: Any = None,
                   temperature: float = 1.0,
                   anchor_pairs: Mapping[str, Mapping[str, Tensor]] | None = None) -> GroupScores:
        """GroupScores of an ``groups.Group`` from precomputed (G, T) token_scores and anchor pairs."""
        r = group.rollouts
        ids = r.completion_ids.detach().cpu().long()  # (G, T)
        mask = r.completion_mask.detach().cpu().bool()  # (G, T)
        return cls(question_id=str(group.question_id), completion_ids=ids, completion_mask=mask,
                   rewards=group.rewards.detach().cpu().float(),
                   token_scores={k: v.detach().cpu().float() for k, v in token_scores.items()},
                   tokens=display_tokens(ids, mask, tokenizer), problem=str(group.problem),
                   answer=str(group.answer), temperature=float(temperature),
                   anchor_pairs={v: {a: p.detach().cpu().float() for a, p in by.items()}
                                 for v, by in (anchor_pairs or {}).items()})

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
            raise KeyError(f"GroupScores {self.question_id!r} has no {vocab!r} scores (present: "
                           f"{list(self.token_scores)}); compute them with compute_group_scores(..., vocab={vocab!r})")
        return self.token_scores[vocab]

    def pairs(self, vocab: str, anchor: str) -> Tensor | None:
        """(G, T) pairs ``anchor`` leaves out of s̄+ (None for "all"); KeyError when absent."""
        if anchor not in nthr.ANCHORS:
            raise ValueError(f"anchor={anchor!r}: expected one of {nthr.ANCHORS}")
        if anchor == "all":
            return None
        pairs = self.anchor_pairs.get(vocab, {}).get(anchor)
        if pairs is None:
            raise KeyError(f"GroupScores {self.question_id!r} has no {anchor!r} anchor pairs for "
                           f"{vocab!r}; compute them with compute_group_scores(..., "
                           f"anchors=[{anchor!r}])")
        return pairs

    def has_anchor(self, vocab: str, anchor: str) -> bool:
        """True when the ``vocab`` scores and (unless "all") the anchor's pairs are here."""
        has_pairs = anchor == "all" or anchor in self.anchor_pairs.get(vocab, {})
        return vocab in self.token_scores and has_pairs

    def with_scores(self, other: GroupScores) -> GroupScores:
        """A copy holding the vocab modes of both (``other`` wins on overlap); same group required."""
        if other.question_id != self.question_id or not torch.equal(other.completion_ids, self.completion_ids):
            raise ValueError(f"cannot merge scores of question {other.question_id!r} into {self.question_id!r}")
        pairs = {v: dict(by) for v, by in self.anchor_pairs.items()}
        for v in other.token_scores:  # other's scores come with other's pairs (or none)
            pairs[v] = dict(other.anchor_pairs.get(v, {}))
        return replace(self, token_scores={**self.token_scores, **other.token_scores},
                       anchor_pairs=pairs)


def display_tokens(completion_ids: Tensor, completion_mask: Tensor, tokenizer: Any = None) -> list[list[str]]:
    """Per response, the display piece of every valid token (``viz.tokens_for_display``; ⟨id⟩ without tokenizer)."""
    out = []
    for ids, m in zip(completion_ids.cpu(), completion_mask.cpu().bool()):
        valid = ids[m]
        out.append(viz.tokens_for_display(tokenizer, valid) if tokenizer is not None
                   else [f"⟨{int(i)}⟩" for i in valid])
    return out


@torch.no_grad()
def compute_group_scores(model: nn.Module, group: Any, *, vocab: str | Sequence[str] = "generated",
                         temperature: float = 1.0, tokenizer: Any = None, batch_size: int | None = None,
                         dtype: torch.dtype = torch.float32,
                         anchors: Sequence[str] = nthr.ANCHORS) -> GroupScores:
    """GroupScores of one ``groups.Group``: one forward pass, then token_scores for each vocab mode (notebook 04).

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
        _, hidden = grpo.group_token_logps(model, r.prompt_ids, r.prompt_mask, r.completion_ids,
                                           mask, temperature=temperature, batch_size=batch_size,
                                           return_hidden=True)  # (G, T, d)
    head = lm_head(model)
    correct = group.correct.to(device)  # (G,)
    kw = dict(temperature=temperature, lm_head_bias=head.bias, dtype=dtype, softcap=head.softcap)
    scores, pairs = {}, {}
    keep = tuple(a for a in anchors if a != "all")  # "all" leaves nothing out
    for mode in modes:
        s, by_anchor = nthr.token_scores_from_hidden(hidden, head.weight, r.completion_ids,
                                                     mask, correct, vocab=mode, anchor=keep, **kw)
        scores[mode] = s.cpu()  # (G, T)
        pairs[mode] = {a: p.cpu() for a, p in by_anchor.items()}  # anchor -> (G, T)
    return GroupScores.from_group(group, scores, tokenizer=tokenizer, temperature=temperature,
                                  anchor_pairs=pairs)


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
        """Mean of (G, T) advantages over the valid tokens of the incorrect responses (NaN if none)."""
        where = (~torch.tensor(self.correct, dtype=torch.bool))[:, None] & self.completion_mask  # (G, T)
        n = int(where.sum())
        return float(adv[where].sum()) / n if n else math.nan

    def summary(self) -> dict[str, Any]:
        """One flat row: settings, tau, counts, fractions, mean incorrect advantage (for tables)."""
        return {"id": self.question_id, "vocab": self.vocab, "anchor": self.anchor,
                "beta": self.beta, "eta_schedule": str(self.eta_schedule),
                "eta": self.eta, "p": self.p, "tau": self.tau, "n_selected": self.n_selected_group,
                "n_incorrect_tokens": self.n_incorrect_tokens, "selected_frac": self.selected_frac,
                "mean_adv_incorrect": self.mean_incorrect_advantage,
                "mean_adv_incorrect_grpo": self.mean_incorrect_advantage_grpo}


def default_response(state: ExplorerState) -> int:
    """The incorrect response with the most selected tokens (the first one on ties): the one worth showing."""
    rows = [g for g, ok in enumerate(state.correct) if not ok]
    return max(rows, key=lambda g: (state.n_selected[g], -g))


def _check_beta(beta: float) -> float:
    beta = float(beta)
    if math.isnan(beta) or beta == math.inf:
        raise ValueError(f"beta must be a finite number or -inf, got {beta}")
    return beta


def explorer_state(scores: GroupScores, *, beta: float = 1.0, eta: str | float = "two_abs",
                   vocab: str = "generated", anchor: str = "all") -> ExplorerState:
    """The ExplorerState of a group at (beta, eta, vocab, anchor) from nthr's functions (nb 04).

    τ, selection, η and the new advantages come from ``nthr.apply_to_scores`` on the precomputed
    scores, s̄+ from ``nthr.self_influence``. ``anchor`` (``nthr.ANCHORS``) changes s̄+ and so τ,
    never the incorrect tokens' scores.
    """
    beta = _check_beta(beta)
    s = scores.scores(vocab)  # (G, T)
    pairs = scores.pairs(vocab, anchor)  # (G, T) or None for "all"
    mask, correct = scores.completion_mask, scores.correct  # (G, T), (G,)
    n_pos, G = int(correct.sum()), scores.group_size
    if n_pos in (0, G):
        raise ValueError(f"question {scores.question_id!r} is not mixed (N+={n_pos} of G={G}): nothing to select")
    advantages = grpo.expand_advantages(grpo.group_advantages(scores.rewards[None]), mask)  # (G, T)
    config = nthr.NTHRConfig(beta=beta, eta=eta, vocab=vocab, anchor=anchor)
    res = nthr.apply_to_scores(s, mask, correct, advantages, config, anchor_pairs=pairs)
    return ExplorerState(
        question_id=scores.question_id, vocab=vocab, anchor=anchor, beta=beta, eta_schedule=eta,
        eta=res.eta, p=n_pos / G, tau=float(res.tau),
        self_influence=nthr.self_influence(s, mask, correct, anchor_pairs=pairs).tolist(),
        selected=res.selected, n_tokens=mask.sum(1).tolist(),
        n_selected=res.selected.sum(1).tolist(), advantages=advantages,
        new_advantages=res.new_advantages, completion_mask=mask.clone(), correct=correct.tolist())


# --------------------------------------------------------------------------------------------
# Rendering (pure: state in, HTML string out)
# --------------------------------------------------------------------------------------------


def _fmt(x: float, digits: int = 4) -> str:
    """A number for display: -∞/∞ spelled out, NaN as '–'."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if x == -math.inf:
        return "-∞"
    if x == math.inf:
        return "∞"
    return f"{x:.{digits}g}"


def _eta_label(eta: str | float) -> str:
    for label, value in ETA_CHOICES:
        if value == eta:
            return label
    return str(eta)


def _histogram_png(scores: GroupScores, state: ExplorerState, *, dpi: int = 72) -> str:
    """viz.plot_score_histogram of the group with τ, drawn on a pyplot-free Figure, as a base64 PNG."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2, 2.6), dpi=dpi)
    ax = fig.subplots()
    where = "τ = -∞ (all incorrect selected)" if state.tau == -math.inf else f"τ = {_fmt(state.tau)}"
    viz.plot_score_histogram(scores.scores(state.vocab), scores.completion_mask, scores.correct, state.tau, ax=ax,
                             bins=30, title=f"token scores ({state.vocab} vocab.), {where}")
    ax.title.set_fontsize(9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _advantage_strip(values: Sequence[float], selected: Sequence[bool], lo: float) -> str:
    """Inline SVG: one bar per token of the new advantage (selected: orange η·A, others grey A)."""
    n = max(1, len(values))
    w, h = 12, 40
    lo = lo if lo < 0 else -1.0
    bars = []
    for i, (v, sel) in enumerate(zip(values, selected)):
        height = h * min(1.0, abs(v) / abs(lo)) if v < 0 else 0.0
        color = "#e08214" if sel else "#8c8c8c"
        bars.append(f'<rect x="{i * w}" y="0" width="{w - 1}" height="{height:.2f}" fill="{color}">'
                    f"<title>token {i}: advantage {v:.4g}{' (selected: η·A)' if sel else ''}</title></rect>")
    return (f'<svg class="nthr-adv-strip" viewBox="0 0 {n * w} {h}" preserveAspectRatio="none" '
            f'style="width:100%;max-width:{max(240, n * w)}px;height:{h}px;border-top:1px solid #444;'
            f'background:#fafafa;">{"".join(bars)}</svg>')


def _stats_table(state: ExplorerState, response: int) -> str:
    """Per response: reward, tokens, selected, fraction, GRPO A, mean new advantage; then the group row."""
    head = ("<tr><th>response</th><th>reward</th><th>tokens</th><th>selected</th><th>fraction</th>"
            "<th>A (GRPO)</th><th>mean new A</th></tr>")
    rows = []
    mask = state.completion_mask
    for g in range(len(state.n_tokens)):
        a = state.advantages[g][mask[g]]
        na = state.new_advantages[g][mask[g]]
        a0 = float(a[0]) if a.numel() else math.nan
        mean_new = float(na.mean()) if na.numel() else math.nan
        ok = state.correct[g]
        style = ' style="background:#fff3cd;font-weight:bold;"' if g == response else ""
        frac = "–" if ok else f"{100 * state.response_frac(g):.1f}%"
        rows.append(f'<tr class="nthr-row" data-row="{g}" data-selected="{state.n_selected[g]}"{style}>'
                    f"<td>#{g} {'✓' if ok else '✗'}</td><td>{1 if ok else 0}</td><td>{state.n_tokens[g]}</td>"
                    f"<td>{'–' if ok else state.n_selected[g]}</td><td>{frac}</td><td>{_fmt(a0, 3)}</td>"
                    f"<td>{_fmt(mean_new, 3)}</td></tr>")
    rows.append(f'<tr style="border-top:2px solid #444;"><td><b>group</b></td><td>p = {state.p:.3g}</td>'
                f"<td>{state.n_incorrect_tokens} incorrect</td><td><b>{state.n_selected_group}</b></td>"
                f"<td><b>{100 * state.selected_frac:.1f}%</b></td><td></td>"
                f"<td>{_fmt(state.mean_incorrect_advantage, 3)} (incorrect)</td></tr>")
    return ('<table class="nthr-stats" style="border-collapse:collapse;font-size:12px;" cellpadding="3">'
            f"{head}{''.join(rows)}</table>")


def render_explorer_html(scores: GroupScores, state: ExplorerState, response: int | None = None, *,
                         histogram: bool = True, live: bool = True) -> str:
    """The explorer's picture: chosen incorrect response (scores, selection), correct ones, τ, counts, histogram.

    ``response`` is a row index of an incorrect response (default: ``default_response``). The chosen response
    is the only place with ``nthr-selected`` spans, so their number equals ``state.n_selected[response]``.
    ``live`` only sets the outer CSS class (``nthr-explorer-live`` or ``nthr-explorer-snapshot``).
    """
    incorrect = scores.incorrect_rows
    if response is None:
        response = default_response(state)
    if response not in incorrect:
        raise ValueError(f"response={response} is not an incorrect response of question {scores.question_id!r} "
                         f"(incorrect rows: {incorrect})")
    s = scores.scores(state.vocab)  # (G, T)
    mask = scores.completion_mask
    center = state.tau if math.isfinite(state.tau) else 0.0
    valid = s[mask]
    scale = float((valid - center).abs().max()) if valid.numel() else 1.0
    scale = scale if scale > 0 else 1.0

    def view(row: int, selected: Tensor | None, title: str) -> str:
        return viz.render_token_scores_html(scores.tokens[row], s[row][mask[row]],
                                            None if selected is None else selected[row][mask[row]],
                                            state.tau, title=title, scale=scale)

    n_sel, n_tok = state.n_selected[response], state.n_tokens[response]
    left = view(response, state.selected,
                f"incorrect response #{response}: {n_sel} of {n_tok} tokens selected "
                f"({100 * state.response_frac(response):.1f}%)")
    adv = state.new_advantages[response][mask[response]].tolist()
    lo = float(state.advantages.min()) if state.advantages.numel() else -1.0
    strip = (f'<div style="font-size:12px;margin-top:6px;">resulting per-token advantages (orange: η·A = '
             f"{_fmt(state.eta, 3)} × A on selected tokens, grey: A kept)</div>"
             + _advantage_strip(adv, state.selected[response][mask[response]].tolist(), lo))
    right = "".join(view(g, None, f"correct response #{g} (s̄+ = {_fmt(sb, 4)})")
                    for g, sb in zip(scores.correct.nonzero().flatten().tolist(), state.self_influence))
    min_sbar = min(state.self_influence) if state.self_influence else math.nan
    beta_txt = "-∞" if state.beta == -math.inf else _fmt(state.beta, 3)
    tau_txt = ("-∞ (β = -∞ selects every incorrect token)" if state.tau == -math.inf
               else f"{_fmt(state.tau)} = β·min s̄+ = {beta_txt} × {_fmt(min_sbar)}")
    problem = html.escape(scores.problem.strip()[:300]) if scores.problem else ""
    header = (f'<div style="font-size:13px;margin-bottom:4px;"><b>question {html.escape(scores.question_id)}</b>'
              f"{': ' + problem if problem else ''}"
              f"{' · answer ' + html.escape(scores.answer) if scores.answer else ''}</div>"
              f'<div class="nthr-summary" style="font-size:13px;margin-bottom:6px;">'
              f"N+ = {sum(state.correct)} of G = {len(state.correct)} (p = {state.p:.3g}) · vocabulary "
              f"<b>{state.vocab}</b> · s̄+ anchor <b>{state.anchor}</b>"
              f" · β = <b>{beta_txt}</b> · η = {html.escape(_eta_label(state.eta_schedule))} "
              f"= <b>{_fmt(state.eta, 3)}</b><br><b>τ = {html.escape(tau_txt)}</b><br>"
              f"selected: <b>{n_sel}</b> of {n_tok} tokens of response #{response}; group: "
              f"<b>{state.n_selected_group}</b> of {state.n_incorrect_tokens} incorrect tokens "
              f"({100 * state.selected_frac:.1f}%)</div>")
    hist = (f'<img alt="token score histogram" style="max-width:100%;" '
            f'src="data:image/png;base64,{_histogram_png(scores, state)}"/>' if histogram else "")
    kind = "nthr-explorer-live" if live else "nthr-explorer-snapshot"
    tau_attr = "-inf" if state.tau == -math.inf else repr(state.tau)
    return (f'<div class="nthr-explorer {kind}" data-question="{html.escape(scores.question_id, quote=True)}" '
            f'data-response="{response}" data-tau="{tau_attr}" data-n-selected="{n_sel}" '
            f'data-n-selected-group="{state.n_selected_group}">{header}'
            f'<div style="display:flex;gap:14px;align-items:flex-start;flex-wrap:wrap;">'
            f'<div style="flex:1 1 380px;min-width:0;">{left}{strip}</div>'
            f'<div style="flex:1 1 380px;min-width:0;max-height:420px;overflow-y:auto;">{right}</div></div>'
            f'<div style="display:flex;gap:14px;align-items:flex-start;flex-wrap:wrap;margin-top:8px;">'
            f"<div>{_stats_table(state, response)}</div><div>{hist}</div></div></div>")


# --------------------------------------------------------------------------------------------
# One update: NTHR vs GRPO
# --------------------------------------------------------------------------------------------


def displacement_comparison(model: nn.Module, group: Any, state: ExplorerState, *, lr: float, optimizer: str = "sgd",
                            temperature: float = 1.0, grpo_result: Any = None,
                            progress: Callable[[int, str], None] | None = None) -> tuple[Any, Any]:
    """(NTHR, GRPO) ``lld.QuestionDisplacement`` of one update on ``group``; NTHR uses ``state``'s selection and η.

    ``grpo_result`` reuses an earlier GRPO run (it does not depend on β, η or vocab). ``progress(k, what)``
    is called before each of the two runs and at the end (k = 0, 1, 2).
    """
    from nthr_book import lld

    report = progress or (lambda k, what: None)
    report(0, "NTHR update")
    res_nthr = lld.one_step_displacement(model, group, update="nthr", lr=lr, optimizer=optimizer, beta=state.beta,
                                         eta=state.eta, temperature=temperature, vocab=state.vocab,
                                         selected=state.selected)
    report(1, "GRPO update")
    if grpo_result is None:
        grpo_result = lld.one_step_displacement(model, group, update="grpo", lr=lr, optimizer=optimizer,
                                                temperature=temperature)
    report(2, "done")
    return res_nthr, grpo_result


def _displacement_html(res_nthr: Any, res_grpo: Any, state: ExplorerState, lr: float, optimizer: str) -> str:
    """A small table: Δ(x) and per-response Δ of NTHR (with its settings) next to GRPO."""
    beta_txt = "-∞" if state.beta == -math.inf else _fmt(state.beta, 3)

    def row(name: str, r: Any) -> str:
        per = ", ".join(f"{d:+.3g}" for d in r.per_response_delta)
        return (f"<tr><td>{html.escape(name)}</td><td><b>{r.delta:+.4g}</b></td><td>{per}</td>"
                f"<td>{'' if r.n_selected_tokens is None else r.n_selected_tokens}</td></tr>")

    return (f'<div class="nthr-delta" style="font-size:13px;">one {optimizer} step (lr {lr:g}) on question '
            f"{html.escape(res_nthr.question_id)}, from the same initial weights (restored after each):"
            '<table style="border-collapse:collapse;font-size:12px;" cellpadding="3">'
            "<tr><th>update</th><th>Δ(x)</th><th>Δ ln π(y+|x) per correct response</th><th>selected</th></tr>"
            f"{row(f'NTHR (β = {beta_txt}, η = {_fmt(state.eta, 3)}, {state.vocab})', res_nthr)}"
            f"{row('GRPO', res_grpo)}</table>"
            f"<div>Δ(x) ≤ 0: lazy likelihood displacement. NTHR − GRPO = {res_nthr.delta - res_grpo.delta:+.4g}"
            "</div></div>")


# --------------------------------------------------------------------------------------------
# The widget
# --------------------------------------------------------------------------------------------


def _mixed(groups: Sequence[Any]) -> list[Any]:
    from nthr_book.groups import Group

    groups = list(groups)
    for i, g in enumerate(groups):
        if not isinstance(g, Group):
            raise TypeError(f"groups[{i}] must be an nthr_book.groups.Group, got {type(g).__name__}")
    mixed = [g for g in groups if g.status == "mixed"]
    if not mixed:
        raise ValueError(f"none of the {len(groups)} groups is mixed (0 < N+ < G): the explorer needs correct "
                         "and incorrect responses in one group")
    return mixed


def _align_scores(groups: Sequence[Any], scores: Sequence[GroupScores] | None) -> dict[str, GroupScores]:
    """Precomputed scores keyed by question id; error when one does not belong to the groups."""
    if scores is None:
        return {}
    ids = {g.question_id: g for g in groups}
    out = {}
    for i, s in enumerate(scores):
        if not isinstance(s, GroupScores):
            raise TypeError(f"scores[{i}] must be a GroupScores, got {type(s).__name__}")
        g = ids.get(s.question_id)
        if g is None:
            continue  # scores of a group that is not shown (e.g. homogeneous)
        if tuple(s.completion_ids.shape) != tuple(g.rollouts.completion_ids.shape) or not torch.equal(
                s.completion_ids, g.rollouts.completion_ids.cpu()):
            raise ValueError(f"scores[{i}] (question {s.question_id!r}) does not match that group's completion_ids")
        out[s.question_id] = s
    return out


class _ScoreCache:
    """GroupScores per question, computed with the model at most once per (question, vocab mode)."""

    def __init__(self, groups: Sequence[Any], scores: Sequence[GroupScores] | None, model: nn.Module | None,
                 tokenizer: Any, temperature: float, batch_size: int | None):
        self.groups = list(groups)
        self.cache = _align_scores(self.groups, scores)
        self.model, self.tokenizer, self.temperature, self.batch_size = model, tokenizer, temperature, batch_size
        self.computed = 0  # number of compute_group_scores calls (tests check that moves never recompute)

    def has(self, index: int, vocab: str, anchor: str = "all") -> bool:
        """True when the scores of (question index, vocab) and the anchor's pairs are cached."""
        s = self.cache.get(self.groups[index].question_id)
        return s is not None and s.has_anchor(vocab, anchor)

    def available(self, index: int, vocab: str, anchor: str = "all") -> bool:
        """True when the scores are cached or can be computed (a model is there)."""
        return self.has(index, vocab, anchor) or self.model is not None

    def get(self, index: int, vocab: str, anchor: str = "all") -> GroupScores:
        g = self.groups[index]
        s = self.cache.get(g.question_id)
        if s is not None and s.has_anchor(vocab, anchor):
            return s
        if self.model is None:
            raise LookupError(f"no {vocab!r} scores with {anchor!r} anchor pairs for question "
                              f"{g.question_id!r}: pass model= to compute them, or scores= "
                              f"computed with compute_group_scores(..., vocab={vocab!r})")
        new = compute_group_scores(self.model, g, vocab=vocab, temperature=self.temperature,
                                   tokenizer=self.tokenizer, batch_size=self.batch_size)
        self.computed += 1
        if s is not None:
            new = replace(s.with_scores(new), tokens=s.tokens)
        self.cache[g.question_id] = new
        return new


class ThresholdExplorer(ipw.VBox):
    """The threshold explorer widget (a VBox): controls in ``.controls``, current numbers from ``.state()``.

    Built by ``threshold_explorer``; every control change calls ``explorer_state`` and
    ``render_explorer_html`` on cached GroupScores, never the model (except the first time a vocab
    mode is shown for a question without precomputed scores, and the Δ(x) button).
    """

    def __init__(self, groups: Sequence[Any], *, scores: Sequence[GroupScores] | None = None,
                 model: nn.Module | None = None, tokenizer: Any = None, beta: float = 1.0,
                 eta: str | float = "two_abs", vocab: str = "generated", lr: float = 5e-5, optimizer: str = "sgd",
                 temperature: float = 1.0, batch_size: int | None = None, histogram: bool = True,
                 anchor: str = "all"):
        w = ipw
        beta = _check_beta(beta)
        nthr.eta_for(0.5, eta)  # validates the schedule
        if vocab not in nthr.VOCAB_MODES:
            raise ValueError(f"vocab={vocab!r}: expected one of {nthr.VOCAB_MODES}")
        if anchor not in nthr.ANCHORS:
            raise ValueError(f"anchor={anchor!r}: expected one of {nthr.ANCHORS}")
        if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
            raise ValueError(f"`lr` must be a positive number, got {lr!r}")
        groups = _mixed(groups)
        if model is None and not _align_scores(groups, scores):
            raise ValueError("pass model= (scores are computed once per group) or scores= (a list of GroupScores)")
        self.groups, self.model, self.lr, self.optimizer = groups, model, float(lr), optimizer
        self.temperature, self.histogram = float(temperature), histogram
        self.scores = _ScoreCache(groups, scores, model, tokenizer, self.temperature, batch_size)
        self._grpo: dict[str, Any] = {}  # question id -> GRPO QuestionDisplacement (independent of β, η, vocab)
        self._busy = False
        self._updating = False

        q_options = [(f"{g.question_id} (N+ {g.n_correct}/{g.group_size}): {g.problem.strip()[:50]}", i)
                     for i, g in enumerate(groups)]
        lo, hi, step = BETA_RANGE
        finite_beta = 1.0 if beta == -math.inf else beta
        eta_options = list(ETA_CHOICES)
        if all(v != eta for _, v in eta_options):
            eta_options.append((str(eta), eta))
        wide = w.Layout(width="auto")
        self.controls: dict[str, Any] = {
            "question": w.Dropdown(options=q_options, value=0, description="question", layout=w.Layout(width="460px")),
            "response": w.Dropdown(options=[], description="incorrect", layout=w.Layout(width="260px")),
            "beta_neg_inf": w.ToggleButton(value=beta == -math.inf, description="β = -∞",
                                           tooltip="β = -∞: select every incorrect token", layout=wide),
            "beta": w.FloatSlider(value=finite_beta, min=min(lo, finite_beta), max=max(hi, finite_beta), step=step,
                                  description="β", continuous_update=False, readout_format=".2f",
                                  disabled=beta == -math.inf, layout=w.Layout(width="340px")),
            "eta": w.Dropdown(options=eta_options, value=eta, description="η", layout=w.Layout(width="300px")),
            "vocab": w.ToggleButtons(options=list(nthr.VOCAB_MODES), value=vocab, description="vocabulary",
                                     tooltips=["V*: token ids of the group's responses (paper's speed-up)",
                                               "the full vocabulary (exact)"]),
            "anchor": w.Dropdown(options=list(nthr.ANCHORS), value=anchor, description="s̄+ anchor",
                                 tooltip="which correct tokens k count in s̄+ (and so in τ)",
                                 layout=w.Layout(width="260px")),
            "run": w.Button(description="Δ(x): one NTHR step vs GRPO", disabled=model is None, icon="play",
                            tooltip="needs model=" if model is None else "one update from the initial weights",
                            layout=w.Layout(width="260px")),
        }
        self.outputs: dict[str, Any] = {
            "view": w.HTML(),
            "progress": w.IntProgress(value=0, min=0, max=2, description="", layout=w.Layout(width="160px",
                                                                                             visibility="hidden")),
            "status": w.HTML(value="" if model is not None else "<i>pass model= to enable the Δ(x) button</i>"),
            "result": w.HTML(),
        }
        c, o = self.controls, self.outputs
        self._set_response_options()
        for name in ("question", "response", "beta_neg_inf", "beta", "eta", "vocab", "anchor"):
            c[name].observe(self._on_change, names="value")
        c["run"].on_click(self._on_run)
        super().__init__(children=[
            w.HBox([c["question"], c["response"]]),
            w.HBox([c["beta_neg_inf"], c["beta"], c["eta"]]),
            w.HBox([c["vocab"], c["anchor"]]),
            o["view"],
            w.HBox([c["run"], o["progress"], o["status"]]),
            o["result"],
        ])
        self.add_class("nthr-threshold-explorer")
        self.refresh()

    # ---- reading the controls -------------------------------------------------------------
    @property
    def beta(self) -> float:
        """The current β (-inf when the toggle is on)."""
        return -math.inf if self.controls["beta_neg_inf"].value else float(self.controls["beta"].value)

    @property
    def group(self) -> Any:
        """The groups.Group of the chosen question."""
        return self.groups[self.controls["question"].value]

    def current_scores(self) -> GroupScores:
        """GroupScores of the chosen question, vocab and anchor (computed once, then cached)."""
        c = self.controls
        return self.scores.get(c["question"].value, c["vocab"].value, c["anchor"].value)

    def state(self) -> ExplorerState:
        """The ExplorerState at the controls' current values."""
        c = self.controls
        return explorer_state(self.current_scores(), beta=self.beta, eta=c["eta"].value,
                              vocab=c["vocab"].value, anchor=c["anchor"].value)

    @property
    def view_html(self) -> str:
        """The HTML currently shown."""
        return self.outputs["view"].value

    # ---- wiring ---------------------------------------------------------------------------------
    def _set_response_options(self) -> None:
        g = self.group
        mask = g.rollouts.completion_mask.bool()
        rows = (~g.correct).nonzero().flatten().tolist()
        self._updating = True
        try:
            self.controls["response"].options = [(f"#{r} ({int(mask[r].sum())} tokens)", r) for r in rows]
            c = self.controls
            q, vocab, anchor = c["question"].value, c["vocab"].value, c["anchor"].value
            ready = self.scores.available(q, vocab, anchor)
            c["response"].value = default_response(self.state()) if ready else rows[0]
        finally:
            self._updating = False

    def _on_change(self, change: dict) -> None:
        if self._updating:
            return
        if change["owner"] is self.controls["question"]:
            self._set_response_options()
        if change["owner"] is self.controls["beta_neg_inf"]:
            self.controls["beta"].disabled = bool(change["new"])
        self.refresh()

    def refresh(self) -> None:
        """Recompute the state from cached scores and redraw the view."""
        c, o = self.controls, self.outputs
        q, vocab, anchor = c["question"].value, c["vocab"].value, c["anchor"].value
        if not self.scores.available(q, vocab, anchor):
            what = f"{vocab!r} scores" + ("" if anchor == "all" else f" with {anchor!r} pairs")
            qid = html.escape(self.groups[q].question_id)
            style = "color:#b2182b;"
            o["view"].value = (f'<div class="nthr-explorer nthr-explorer-live" style="{style}">'
                               f"no {what} for question {qid}: pass model= or scores computed "
                               f"with compute_group_scores(..., vocab={vocab!r})</div>")
            return
        qid = self.groups[q].question_id
        if not self.scores.has(q, vocab, anchor):  # first view of (question, vocab): a forward pass
            o["status"].value = f"<i>computing {vocab} scores for question {html.escape(qid)}…</i>"
        gs = self.current_scores()
        if o["status"].value.startswith("<i>computing"):
            o["status"].value = ""
        state = explorer_state(gs, beta=self.beta, eta=c["eta"].value, vocab=vocab, anchor=anchor)
        o["view"].value = render_explorer_html(gs, state, c["response"].value, histogram=self.histogram)

    def _on_run(self, _button: Any = None) -> None:
        if self.model is None or self._busy:
            return
        c, o = self.controls, self.outputs
        self._busy = True
        c["run"].disabled = True
        o["progress"].layout.visibility = "visible"
        try:
            state, group = self.state(), self.group

            def progress(k: int, what: str) -> None:
                o["progress"].value = k
                o["status"].value = f"<i>{html.escape(what)}…</i>" if k < 2 else ""

            res_nthr, res_grpo = displacement_comparison(
                self.model, group, state, lr=self.lr, optimizer=self.optimizer, temperature=self.temperature,
                grpo_result=self._grpo.get(group.question_id), progress=progress)
            self._grpo[group.question_id] = res_grpo
            o["result"].value = _displacement_html(res_nthr, res_grpo, state, self.lr, self.optimizer)
        except Exception as exc:  # shown in the widget: a callback's exception would otherwise vanish
            o["status"].value = f'<span style="color:#b2182b;">{html.escape(type(exc).__name__)}: {html.escape(str(exc))}</span>'
        finally:
            self._busy = False
            c["run"].disabled = False
            o["progress"].layout.visibility = "hidden"


def threshold_explorer(groups: Sequence[Any], *, beta: float = 1.0, eta: str | float = "two_abs",
                       model: nn.Module | None = None, lr: float = 5e-5, scores: Sequence[GroupScores] | None = None,
                       tokenizer: Any = None, vocab: str = "generated", optimizer: str = "sgd",
                       temperature: float = 1.0, batch_size: int | None = None,
                       anchor: str = "all") -> ThresholdExplorer:
    """The NTHR threshold explorer for mixed ``groups.Group``s, returned without being displayed (notebook 04).

    Scores come from ``scores`` (GroupScores, e.g. from ``compute_group_scores``) or are computed
    with ``model`` once per question and vocab mode. Controls: question, incorrect response, β
    (slider plus a β = -∞ toggle), η schedule, vocabulary, s̄+ anchor (``nthr.ANCHORS``); the Δ(x)
    button (enabled with ``model``) runs ``lld.one_step_displacement`` with ``lr``/``optimizer`` for
    NTHR at the current settings and GRPO.
    """
    return ThresholdExplorer(groups, scores=scores, model=model, tokenizer=tokenizer, beta=beta, eta=eta, vocab=vocab,
                             lr=lr, optimizer=optimizer, temperature=temperature,
                             batch_size=batch_size, anchor=anchor)


def explorer_snapshot(groups: Sequence[Any], beta: float = 1.0, eta: str | float = "two_abs", *,
                      vocab: str = "generated", question: int | str = 0, response: int | None = None,
                      scores: Sequence[GroupScores] | None = None, model: nn.Module | None = None,
                      tokenizer: Any = None, temperature: float = 1.0, histogram: bool = True,
                      anchor: str = "all"):
    """The explorer's picture at fixed settings as ``IPython.display.HTML`` (visible without a kernel).

    ``question`` is an index into the mixed groups or a question id; ``response`` a row of an
    incorrect response (default: the one with the most selected tokens). Scores as in ``threshold_explorer``.
    """
    from IPython.display import HTML

    mixed = _mixed(groups)
    if isinstance(question, str):
        ids = [g.question_id for g in mixed]
        if question not in ids:
            raise ValueError(f"question={question!r} is not a mixed question (mixed ids: {ids[:10]})")
        index = ids.index(question)
    else:
        index = int(question)
        if not 0 <= index < len(mixed):
            raise ValueError(f"question={question} is out of range: {len(mixed)} mixed groups")
    if model is None and not _align_scores(mixed, scores):
        raise ValueError("pass model= (scores are computed once per group) or scores= (a list of GroupScores)")
    gs = _ScoreCache(mixed, scores, model, tokenizer, temperature, None).get(index, vocab, anchor)
    state = explorer_state(gs, beta=beta, eta=eta, vocab=vocab, anchor=anchor)
    return HTML(render_explorer_html(gs, state, response, histogram=histogram, live=False))


def _shape(x: Any) -> str:
    """Shape of a tensor, or the type name of anything else, for error messages."""
    return f"shape {tuple(x.shape)}" if isinstance(x, Tensor) else f"a {type(x).__name__}"
