"""The threshold explorer's picture as HTML: pure functions, an ``ExplorerState`` in, a string out.

The view of notebook 04's explorer (docs/method.md §3, arXiv 2505.18830): the chosen incorrect
response with its tokens coloured by score and the selected ones outlined, the correct responses
with their self-influence, τ and the counts, a per-token advantage strip (inline SVG), a table per
response and the score histogram (an inline PNG); and the table of one update's Δ(x), NTHR next to
GRPO. Styles are inline (no CSS file), so ``IPython.display.HTML`` shows the string as it is, in a
live widget (``widgets``) or in an executed notebook without a kernel
(``widgets.explorer_snapshot``). The token pictures and the histogram are ``viz``'s; the numbers are
``explorer``'s.

- ``render_explorer_html``     : ``GroupScores`` + ``ExplorerState`` (+ the response to show) ->
  HTML
- ``render_displacement_html`` : the (NTHR, GRPO) results of ``explorer.displacement_comparison`` ->
  HTML
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence
from typing import Any

from torch import Tensor

from nthr_book import viz
from nthr_book.explorer import ETA_CHOICES, ExplorerState, GroupScores, default_response

__all__ = ["render_displacement_html", "render_explorer_html"]


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
    """viz.plot_score_histogram of the group with τ, drawn on a pyplot-free Figure, as a base64
    PNG."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2, 2.6), dpi=dpi)
    ax = fig.subplots()
    where = (
        "τ = -∞ (all incorrect selected)" if state.tau == -math.inf else f"τ = {_fmt(state.tau)}"
    )
    viz.plot_score_histogram(
        scores.scores(state.vocab),
        scores.completion_mask,
        scores.correct,
        state.tau,
        ax=ax,
        bins=30,
        title=f"token scores ({state.vocab} vocab.), {where}",
    )
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
        bars.append(
            f'<rect x="{i * w}" y="0" width="{w - 1}" height="{height:.2f}" fill="{color}">'
            f"<title>token {i}: advantage {v:.4g}{' (selected: η·A)' if sel else ''}</title></rect>"
        )
    return (
        f'<svg class="nthr-adv-strip" viewBox="0 0 {n * w} {h}" preserveAspectRatio="none" '
        f'style="width:100%;max-width:{max(240, n * w)}px;height:{h}px;border-top:1px solid #444;'
        f'background:#fafafa;">{"".join(bars)}</svg>'
    )


def _stats_table(state: ExplorerState, response: int) -> str:
    """Per response: reward, tokens, selected, fraction, GRPO A, mean new advantage; then the
    group row."""
    head = (
        "<tr><th>response</th><th>reward</th><th>tokens</th><th>selected</th><th>fraction</th>"
        "<th>A (GRPO)</th><th>mean new A</th></tr>"
    )
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
        rows.append(
            f'<tr class="nthr-row" data-row="{g}" data-selected="{state.n_selected[g]}"{style}>'
            f"<td>#{g} "
            f"{'✓' if ok else '✗'}</td><td>{1 if ok else 0}</td><td>{state.n_tokens[g]}</td>"
            f"<td>{'–' if ok else state.n_selected[g]}</td><td>{frac}</td><td>{_fmt(a0, 3)}</td>"
            f"<td>{_fmt(mean_new, 3)}</td></tr>"
        )
    rows.append(
        f'<tr style="border-top:2px solid #444;"><td><b>group</b></td><td>p = {state.p:.3g}</td>'
        f"<td>{state.n_incorrect_tokens} incorrect</td><td><b>{state.n_selected_group}</b></td>"
        f"<td><b>{100 * state.selected_frac:.1f}%</b></td><td></td>"
        f"<td>{_fmt(state.mean_incorrect_advantage, 3)} (incorrect)</td></tr>"
    )
    return (
        '<table class="nthr-stats" style="border-collapse:collapse;font-size:12px;" '
        'cellpadding="3">'
        f"{head}{''.join(rows)}</table>"
    )


def render_explorer_html(
    scores: GroupScores,
    state: ExplorerState,
    response: int | None = None,
    *,
    histogram: bool = True,
    live: bool = True,
) -> str:
    """The explorer's picture: chosen incorrect response (scores, selection), correct ones, τ,
    counts, histogram.

    ``response`` is a row index of an incorrect response (default: ``default_response``). The chosen
    response is the only place with ``nthr-selected`` spans, so their number equals
    ``state.n_selected[response]``. ``live`` only sets the outer CSS class (``nthr-explorer-live``
    or ``nthr-explorer-snapshot``).
    """
    incorrect = scores.incorrect_rows
    if response is None:
        response = default_response(state)
    if response not in incorrect:
        raise ValueError(
            f"response={response} is not an incorrect response of question {scores.question_id!r} "
            f"(incorrect rows: {incorrect})"
        )
    s = scores.scores(state.vocab)  # (G, T)
    mask = scores.completion_mask
    center = state.tau if math.isfinite(state.tau) else 0.0
    valid = s[mask]
    scale = float((valid - center).abs().max()) if valid.numel() else 1.0
    scale = scale if scale > 0 else 1.0

    def view(row: int, selected: Tensor | None, title: str) -> str:
        return viz.render_token_scores_html(
            scores.tokens[row],
            s[row][mask[row]],
            None if selected is None else selected[row][mask[row]],
            state.tau,
            title=title,
            scale=scale,
        )

    n_sel, n_tok = state.n_selected[response], state.n_tokens[response]
    left = view(
        response,
        state.selected,
        f"incorrect response #{response}: {n_sel} of {n_tok} tokens selected "
        f"({100 * state.response_frac(response):.1f}%)",
    )
    adv = state.new_advantages[response][mask[response]].tolist()
    lo = float(state.advantages.min()) if state.advantages.numel() else -1.0
    strip = (
        '<div style="font-size:12px;margin-top:6px;">resulting per-token advantages (orange: η·A '
        "= "
        f"{_fmt(state.eta, 3)} × A on selected tokens, grey: A kept)</div>"
        + _advantage_strip(adv, state.selected[response][mask[response]].tolist(), lo)
    )
    right = "".join(
        view(g, None, f"correct response #{g} (s̄+ = {_fmt(sb, 4)})")
        for g, sb in zip(scores.correct.nonzero().flatten().tolist(), state.self_influence)
    )
    min_sbar = min(state.self_influence) if state.self_influence else math.nan
    beta_txt = "-∞" if state.beta == -math.inf else _fmt(state.beta, 3)
    tau_txt = (
        "-∞ (β = -∞ selects every incorrect token)"
        if state.tau == -math.inf
        else f"{_fmt(state.tau)} = β·min s̄+ = {beta_txt} × {_fmt(min_sbar)}"
    )
    problem = html.escape(scores.problem.strip()[:300]) if scores.problem else ""
    header = (
        '<div style="font-size:13px;margin-bottom:4px;"><b>question '
        f"{html.escape(scores.question_id)}</b>"
        f"{': ' + problem if problem else ''}"
        f"{' · answer ' + html.escape(scores.answer) if scores.answer else ''}</div>"
        f'<div class="nthr-summary" style="font-size:13px;margin-bottom:6px;">'
        f"N+ = {sum(state.correct)} of G = {len(state.correct)} (p = {state.p:.3g}) · vocabulary "
        f"<b>{state.vocab}</b> · s̄+ anchor <b>{state.anchor}</b>"
        f" · β = <b>{beta_txt}</b> · η = {html.escape(_eta_label(state.eta_schedule))} "
        f"= <b>{_fmt(state.eta, 3)}</b><br><b>τ = {html.escape(tau_txt)}</b><br>"
        f"selected: <b>{n_sel}</b> of {n_tok} tokens of response #{response}; group: "
        f"<b>{state.n_selected_group}</b> of {state.n_incorrect_tokens} incorrect tokens "
        f"({100 * state.selected_frac:.1f}%)</div>"
    )
    hist = (
        f'<img alt="token score histogram" style="max-width:100%;" '
        f'src="data:image/png;base64,{_histogram_png(scores, state)}"/>'
        if histogram
        else ""
    )
    kind = "nthr-explorer-live" if live else "nthr-explorer-snapshot"
    tau_attr = "-inf" if state.tau == -math.inf else repr(state.tau)
    return (
        f'<div class="nthr-explorer {kind}" '
        f'data-question="{html.escape(scores.question_id, quote=True)}" '
        f'data-response="{response}" data-tau="{tau_attr}" data-n-selected="{n_sel}" '
        f'data-n-selected-group="{state.n_selected_group}">{header}'
        f'<div style="display:flex;gap:14px;align-items:flex-start;flex-wrap:wrap;">'
        f'<div style="flex:1 1 380px;min-width:0;">{left}{strip}</div>'
        '<div style="flex:1 1 '
        f'380px;min-width:0;max-height:420px;overflow-y:auto;">{right}</div></div>'
        f'<div style="display:flex;gap:14px;align-items:flex-start;flex-wrap:wrap;margin-top:8px;">'
        f"<div>{_stats_table(state, response)}</div><div>{hist}</div></div></div>"
    )


def render_displacement_html(
    res_nthr: Any, res_grpo: Any, state: ExplorerState, lr: float, optimizer: str
) -> str:
    """A small table: Δ(x) and per-response Δ of NTHR (with ``state``'s settings) next to GRPO,
    after one step."""
    beta_txt = "-∞" if state.beta == -math.inf else _fmt(state.beta, 3)

    def row(name: str, r: Any) -> str:
        per = ", ".join(f"{d:+.3g}" for d in r.per_response_delta)
        return (
            f"<tr><td>{html.escape(name)}</td><td><b>{r.delta:+.4g}</b></td><td>{per}</td>"
            f"<td>{'' if r.n_selected_tokens is None else r.n_selected_tokens}</td></tr>"
        )

    return (
        f'<div class="nthr-delta" style="font-size:13px;">one {optimizer} step (lr {lr:g}) on '
        "question "
        f"{html.escape(res_nthr.question_id)}, from the same initial weights (restored after each):"
        '<table style="border-collapse:collapse;font-size:12px;" cellpadding="3">'
        "<tr><th>update</th><th>Δ(x)</th><th>Δ ln π(y+|x) per correct "
        "response</th><th>selected</th></tr>"
        f"{row(f'NTHR (β = {beta_txt}, η = {_fmt(state.eta, 3)}, {state.vocab})', res_nthr)}"
        f"{row('GRPO', res_grpo)}</table>"
        "<div>Δ(x) ≤ 0: lazy likelihood displacement. NTHR − GRPO = "
        f"{res_nthr.delta - res_grpo.delta:+.4g}"
        "</div></div>"
    )
