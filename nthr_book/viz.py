"""Plots and HTML views for GRPO, Lazy Likelihood Displacement and NTHR (arXiv 2505.18830).

Every plot function draws into ``ax`` (or ``axes``) when given and creates a figure only when it is
None; it returns the axes, never calls ``plt.show()`` and saves only when ``save=path`` is passed.
The HTML renderers are pure functions returning a string with inline styles (no CSS files), so a
notebook shows them with ``IPython.display.HTML`` (``explorer_html`` builds the threshold explorer's
picture from them). The module is long because it is a catalogue of independent, pure draw and
render functions, one per figure, that share only the colours and the token-display helpers.

- ``plot_displacement``       : the paper's Figures 1 and 4, per-question Δ ln π(y+|x) by rule
- ``plot_first_order``        : measured Δ(x) against its first-order prediction, and its two parts
- ``plot_regime_map``, ``plot_regime_panels``: the regime map (one message per panel)
- ``render_token_scores_html``: one response's tokens coloured by score, selected tokens outlined
- ``render_group_html``       : incorrect and correct responses side by side (the paper's Figure 3)
- ``token_influence_matrix``, ``plot_token_influence``: <g_t,g_k><h_t,h_k> between two responses
- ``plot_score_histogram``    : token scores of incorrect vs correct responses, with τ
- ``load_metrics``, ``plot_training_curves``: per-step metrics over runs, mean ± std over seeds
- ``plot_benchmark_table``    : accuracy with 95% intervals per benchmark and method
- ``plot_success_histogram``  : per-question success rates at k/G
"""

from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch
from matplotlib.axes import Axes
from torch import Tensor

from nthr_book import rules

__all__ = [
    "DELTA_LABEL",
    "METHOD_LABELS",  # noqa: F822 (module __getattr__: read live from nthr_book.rules)
    "load_metrics",
    "method_color",
    "method_label",
    "plot_benchmark_table",
    "plot_displacement",
    "plot_first_order",
    "plot_regime_panels",
    "plot_score_histogram",
    "plot_success_histogram",
    "plot_token_influence",
    "plot_training_curves",
    "render_group_html",
    "render_token_scores_html",
    "token_influence_matrix",
    "tokens_for_display",
]

DELTA_LABEL = "Δ ln π(y+|x)"
# One colour per method across every figure (seaborn "colorblind" palette); the update rules' labels
# and colour indices live in nthr_book.rules, "base" (the untrained model) is not a rule.
_PALETTE = sns.color_palette("colorblind", 10)
_BASE_LABEL, _BASE_COLOR = "Base", 5


def __getattr__(name: str) -> Any:
    """``METHOD_LABELS``: display name per method, from ``nthr_book.rules`` (live) and "base"."""
    if name == "METHOD_LABELS":
        return {"base": _BASE_LABEL} | {n: rules.label(n) for n in rules.names()}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_OTHER_COLORS = [_PALETTE[i] for i in (3, 4, 6, 8, 9)]
_LINESTYLES = ("-", "--", "-.", ":")  # training curves: the j-th method's dash pattern
_HTML_CMAP = "RdBu_r"  # red = high score (harmful to the correct answers), blue = low


def method_label(method: str) -> str:
    """Display name of a method ("pos_only" -> "Pos Only"); unknown names unchanged."""
    return _BASE_LABEL if str(method) == "base" else rules.label(str(method))


def method_color(method: str, index: int = 0) -> tuple[float, float, float]:
    """The fixed colour of a known method, else the ``index``-th of the spare colours."""
    name = str(method)
    rule = rules.get(name) if name in rules.names() else None
    color = _BASE_COLOR if name == "base" else None if rule is None else rule.color
    return _OTHER_COLORS[index % len(_OTHER_COLORS)] if color is None else _PALETTE[color]


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


def _new_axes(ax: Axes | None, figsize: tuple[float, float]) -> Axes:
    """``ax`` itself, or the axes of a new figure when it is None (the only place figures are
    made)."""
    if ax is not None:
        return ax
    _, ax = plt.subplots(figsize=figsize)
    return ax


def _save(fig: matplotlib.figure.Figure, save: str | Path | None) -> None:
    """Save ``fig`` to ``save`` when a path is given (parents created); nothing otherwise."""
    if save is not None:
        path = Path(save)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, bbox_inches="tight")


def _require_columns(df: pd.DataFrame, columns: Sequence[str], name: str = "df") -> None:
    """Raise ValueError naming the columns of ``df`` that are missing."""
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"`{name}` must be a pandas DataFrame, got a {type(df).__name__}")
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"`{name}` lacks column(s) {missing}; it has {list(df.columns)}")


def _to_numpy(x: Any, name: str, dtype: Any = np.float64) -> np.ndarray:
    """A tensor, array or sequence as a numpy array of ``dtype`` (tensors detached and moved to
    CPU)."""
    if isinstance(x, Tensor):
        x = x.detach().cpu()
        x = x.double() if dtype is np.float64 else x
        x = x.numpy()
    try:
        return np.asarray(x, dtype=dtype)
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"`{name}` must be numeric (a tensor, array or sequence), got {type(x).__name__}"
        ) from exc


def _finite(x: float | None) -> bool:
    """True for a finite number (None, nan and ±inf are not)."""
    return x is not None and math.isfinite(float(x))


# --------------------------------------------------------------------------------------------
# Figure 1: per-question likelihood displacement
# --------------------------------------------------------------------------------------------


def plot_displacement(
    df: pd.DataFrame,
    methods: Sequence[str] = ("grpo", "pos_only"),
    ax: Axes | None = None,
    *,
    sort_by: str | None = "grpo",
    title: str | None = None,
    save: str | Path | None = None,
) -> Axes:
    """Grouped bars of Δ(x) per question and method, questions sorted by the ``sort_by`` method's Δ
    (notebook 02).

    ``df`` has one row per question and method with columns ``id``, ``method``, ``delta`` (as built
    by ``nthr_book.lld``). Bars of a method are one BarContainer in ``ax.containers``, in the order
    of ``methods``; a question a method lacks gets a NaN (absent) bar. ``sort_by=None`` keeps the
    order in which questions first appear.
    """
    _require_columns(df, ("id", "method", "delta"))
    methods = [str(m) for m in methods]
    if not methods:
        raise ValueError("`methods` is empty: name at least one method to plot")
    present = list(dict.fromkeys(df["method"].astype(str)))
    missing = [m for m in methods if m not in present]
    if missing:
        raise ValueError(f"method(s) {missing} not in df['method'] (present: {present})")
    if sort_by is not None and str(sort_by) not in present:
        raise ValueError(
            f"sort_by={sort_by!r} is not a method in df['method'] (present: {present})"
        )
    data = df.assign(method=df["method"].astype(str))
    dup = data.duplicated(["id", "method"], keep=False)
    if dup.any():
        rows = data.loc[dup, ["id", "method"]].drop_duplicates().values.tolist()[:5]
        raise ValueError(
            f"df has several rows for the same (id, method), e.g. {rows}: expected one each"
        )

    ids = list(dict.fromkeys(data["id"]))  # questions in first-appearance order
    table = data.pivot(index="id", columns="method", values="delta").reindex(ids)  # (Q, methods)
    if sort_by is not None:
        table = table.sort_values(str(sort_by), kind="mergesort", na_position="last")

    ax = _new_axes(ax, (max(6.0, 0.25 * len(table) * len(methods) + 2), 4))
    x = np.arange(len(table))
    width = 0.8 / len(methods)
    for j, m in enumerate(methods):
        ax.bar(
            x + (j - (len(methods) - 1) / 2) * width,
            table[m].to_numpy(dtype=float),
            width,
            label=method_label(m),
            color=method_color(m, j),
        )
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(x)
    if len(table) <= 30:
        ax.set_xticklabels([str(i) for i in table.index], rotation=90, fontsize=7)
    else:  # too many questions to name: the position is the rank
        ax.set_xticklabels([])
    order = f"sorted by {method_label(sort_by)} Δ" if sort_by is not None else "in input order"
    ax.set_xlabel(f"question ({order})")
    ax.set_ylabel(DELTA_LABEL)
    ax.set_xlim(-0.6, len(table) - 0.4)
    ax.legend(
        loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8
    )  # beside the bars, never over them
    if title is not None:
        ax.set_title(title)
    _save(ax.figure, save)
    return ax


# --------------------------------------------------------------------------------------------
# Token views in HTML (Figure 3)
# --------------------------------------------------------------------------------------------


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def tokens_for_display(tokenizer, ids: Sequence[int] | Tensor, *, window: int = 8) -> list[str]:
    """One surface string per token id: the text each token adds to the decoded response (nb 03).

    A piece is the difference between decoding the ``window`` ids before a token with and without
    it, so leading spaces survive for byte-level and SentencePiece tokenizers alike, and a character
    split over several byte tokens is shown on the token that completes it (the earlier ones get
    ""). Special tokens are kept (``<|im_end|>``). Pass only the valid ids, e.g.
    ``ids[completion_mask]``.
    """
    if isinstance(ids, Tensor):
        if ids.dim() != 1:
            raise ValueError(f"`ids` must be one response's 1-D ids, got shape {tuple(ids.shape)}")
        ids = ids.tolist()
    ids = [int(i) for i in ids]
    pieces = []
    for i, token_id in enumerate(ids):
        lo = max(0, i - window)
        before = _decode(tokenizer, ids[lo:i]).rstrip("\ufffd") if i > lo else ""
        after = _decode(tokenizer, ids[lo : i + 1]).rstrip("\ufffd")
        if after.startswith(before):
            pieces.append(after[len(before) :])
        else:  # the tokenizer rewrote earlier text (rare): fall back to the token on its own
            pieces.append(_decode(tokenizer, [token_id]))
    return pieces


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _visible(piece: str) -> str:
    """A token made visible but readable: ↵ before newlines, ⇥ for tabs, · for space-only, ∅ for
    empty."""
    if piece == "":
        return "∅"
    if piece.strip(" ") == "":
        return "·" * len(piece)
    piece = piece.replace("\r\n", "␍↵\n").replace("\r", "␍").replace("\n", "↵\n").replace("\t", "⇥")
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", piece)


def _tick_label(piece: str, max_len: int = 12) -> str:
    """A token on one line for tick labels: spaces as ·, newline as ↵, long pieces cut with …."""
    text = _visible(piece).replace("\n", "").replace(" ", "·")
    return text if len(text) <= max_len else text[: max_len - 1] + "…"


def _scale(values: Iterable[np.ndarray], center: float) -> float:
    """max |score - center| over the finite scores of every array (1.0 when there is none or all
    equal)."""
    m = 0.0
    for v in values:
        v = v[np.isfinite(v)]
        if v.size:
            m = max(m, float(np.abs(v - center).max()))
    return m if m > 0 else 1.0


def _color(score: float, center: float, scale: float) -> tuple[str, str]:
    """(background, text) CSS colours of a score on the diverging map centred at ``center``."""
    if not math.isfinite(score):
        return "#dddddd", "#000000"
    r, g, b, _ = matplotlib.colormaps[_HTML_CMAP](
        0.5 + 0.5 * max(-1.0, min(1.0, (score - center) / scale))
    )
    luminance = 0.2126 * r + 0.7152 * g + 0.0722 * b
    return matplotlib.colors.to_hex((r, g, b)), ("#000000" if luminance > 0.5 else "#ffffff")


def _check_tokens(
    tokens: Sequence[str], scores: Any, selected: Any, name: str
) -> tuple[np.ndarray, np.ndarray]:
    """Scores and selected mask of one response as arrays of len(tokens); ValueError naming the
    mismatch."""
    if isinstance(tokens, str) or not all(isinstance(t, str) for t in tokens):
        raise TypeError(f"`tokens{name}` must be a list of strings (see tokens_for_display)")
    s = _to_numpy(scores, f"scores{name}").reshape(-1)
    if s.shape[0] != len(tokens):
        raise ValueError(
            f"`scores{name}` has {s.shape[0]} values but `tokens{name}` has {len(tokens)} tokens"
        )
    if selected is None:
        sel = np.zeros(len(tokens), dtype=bool)
    else:
        sel = _to_numpy(selected, f"selected{name}", dtype=bool).reshape(-1)
        if sel.shape[0] != len(tokens):
            raise ValueError(
                f"`selected{name}` has {sel.shape[0]} values but `tokens{name}` has {len(tokens)}"
            )
    return s, sel


def _spans(
    tokens: Sequence[str], scores: np.ndarray, selected: np.ndarray, center: float, scale: float
) -> str:
    """The coloured <span class="nthr-token"> of every token, with data-score and a hover title."""
    out = []
    for piece, score, sel in zip(tokens, scores, selected):
        bg, fg = _color(float(score), center, scale)
        if piece == "" or piece.strip(" ") == "":  # the ∅ / · markers in a muted colour
            fg = "#888888" if fg == "#000000" else "#dddddd"
        style = f"background:{bg};color:{fg};border-radius:2px;padding:0 1px;"
        tip = f"score {float(score):.4g}" + (" (selected)" if sel else "") + f" | token {piece!r}"
        cls = "nthr-token nthr-selected" if sel else "nthr-token"
        if sel:
            style += "outline:2px solid #111111;outline-offset:-1px;"
        out.append(
            f'<span class="{cls}" data-score="{float(score):.6g}" '
            f'title="{html.escape(tip, quote=True)}" '
            f'style="{style}">{html.escape(_visible(piece), quote=True)}</span>'
        )
    return "".join(out)


_BOX = (
    "font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:13px;line-height:1.7;"
    "white-space:pre-wrap;word-break:break-word;"
)


def _legend(center: float, scale: float, tau: float | None) -> str:
    """A one-line key: the two ends of the colour scale and what the outline means."""
    lo_bg, lo_fg = _color(center - scale, center, scale)
    hi_bg, hi_fg = _color(center + scale, center, scale)
    where = f"τ = {tau:.4g}" if _finite(tau) else "0"
    return (
        f'<div style="font-size:12px;margin:2px 0 6px 0;">colour centred at {html.escape(where)}: '
        f'<span style="background:{lo_bg};color:{lo_fg};padding:0 4px;">{center - scale:.3g} '
        "low</span> "
        f'<span style="background:{hi_bg};color:{hi_fg};padding:0 4px;">{center + scale:.3g} high '
        f"(harmful to correct answers)</span> "
        f'<span style="outline:2px solid #111111;padding:0 4px;">selected</span></div>'
    )


def render_token_scores_html(
    tokens: Sequence[str],
    scores: Sequence[float] | Tensor,
    selected: Sequence[bool] | Tensor | None = None,
    tau: float | None = None,
    *,
    title: str | None = None,
    scale: float | None = None,
) -> str:
    """One response as coloured token spans: red high score, blue low, centred at τ (or 0); hover
    for the score.

    Every token is a ``<span class="nthr-token" data-score=...>``; selected tokens also carry the
    class ``nthr-selected`` and an outline. ``scale`` fixes the score distance shown at full colour
    (default: the largest distance from the centre). NaN scores are grey.
    """
    s, sel = _check_tokens(tokens, scores, selected, "")
    center = float(tau) if _finite(tau) else 0.0
    scale = float(scale) if scale is not None else _scale([s], center)
    head = (
        f'<div style="font-weight:bold;margin-bottom:2px;">{html.escape(title)}</div>'
        if title
        else ""
    )
    return (
        f'<div class="nthr-view" style="{_BOX}">{head}{_legend(center, scale, tau)}'
        f"<div>{_spans(tokens, s, sel, center, scale)}</div></div>"
    )


def _column(
    label: str,
    tokens: Sequence[Sequence[str]],
    scores: Sequence[np.ndarray],
    selected: Sequence[np.ndarray],
    center: float,
    scale: float,
    border: str,
) -> str:
    """One column of response boxes with a heading."""
    boxes = []
    for i, (tok, s, sel) in enumerate(zip(tokens, scores, selected)):
        extra = f", {int(sel.sum())} selected" if sel.any() else ""
        boxes.append(
            f'<div style="border:1px solid {border};border-radius:4px;padding:4px;margin:4px 0;">'
            f'<div style="font-size:11px;color:#555555;">#{i} ({len(tok)} tokens{extra})</div>'
            f"{_spans(tok, s, sel, center, scale)}</div>"
        )
    return (
        f'<div style="flex:1;min-width:0;"><div style="font-weight:bold;color:{border};">'
        f"{html.escape(label)}</div>{''.join(boxes)}</div>"
    )


def render_group_html(
    tokens_incorrect: Sequence[Sequence[str]],
    scores_incorrect: Sequence[Any],
    tokens_correct: Sequence[Sequence[str]],
    scores_correct: Sequence[Any],
    selected_incorrect: Sequence[Any] | None = None,
    tau: float | None = None,
    *,
    selected_correct: Sequence[Any] | None = None,
    title: str | None = None,
    scale: float | None = None,
) -> str:
    """A group's incorrect (left) and correct (right) responses on one colour scale (Fig. 3; nb 03).

    The header shows τ, the response counts and how many incorrect tokens are selected. Each list
    holds one entry per response: token strings, scores (sequence or 1-D tensor), selected masks.
    """

    def prepare(tokens, scores, selected, side):
        if selected is not None and len(selected) != len(tokens):
            raise ValueError(
                f"`selected_{side}` has {len(selected)} masks for {len(tokens)} responses"
            )
        if len(scores) != len(tokens):
            raise ValueError(
                f"`scores_{side}` has {len(scores)} entries for {len(tokens)} responses"
            )
        out = [
            _check_tokens(t, s, None if selected is None else selected[i], f"_{side}[{i}]")
            for i, (t, s) in enumerate(zip(tokens, scores))
        ]
        return [o[0] for o in out], [o[1] for o in out]

    s_neg, sel_neg = prepare(tokens_incorrect, scores_incorrect, selected_incorrect, "incorrect")
    s_pos, sel_pos = prepare(tokens_correct, scores_correct, selected_correct, "correct")
    center = float(tau) if _finite(tau) else 0.0
    scale = float(scale) if scale is not None else _scale(s_neg + s_pos, center)
    n_tok = sum(len(t) for t in tokens_incorrect)
    n_sel = int(sum(s.sum() for s in sel_neg))
    share = f" ({100.0 * n_sel / n_tok:.1f}%)" if n_tok else ""
    tau_text = "none" if tau is None else f"{float(tau):.4g}"
    header = (
        f'<div style="margin-bottom:4px;"><b>τ = {html.escape(tau_text)}</b> · '
        f"{len(tokens_incorrect)} incorrect, {len(tokens_correct)} correct responses · "
        f"{n_sel} of {n_tok} incorrect tokens selected{share}</div>"
    )
    head = (
        f'<div style="font-weight:bold;font-size:14px;">{html.escape(title)}</div>' if title else ""
    )
    columns = _column(
        f"Incorrect (N- = {len(tokens_incorrect)})",
        tokens_incorrect,
        s_neg,
        sel_neg,
        center,
        scale,
        "#b2182b",
    ) + _column(
        f"Correct (N+ = {len(tokens_correct)})",
        tokens_correct,
        s_pos,
        sel_pos,
        center,
        scale,
        "#2166ac",
    )
    return (
        f'<div class="nthr-group" style="{_BOX}">{head}{header}{_legend(center, scale, tau)}'
        f'<div style="display:flex;gap:12px;align-items:flex-start;">{columns}</div></div>'
    )


# --------------------------------------------------------------------------------------------
# Token-pair influence
# --------------------------------------------------------------------------------------------


def token_influence_matrix(g_a: Tensor, h_a: Tensor, g_b: Tensor, h_b: Tensor) -> Tensor:
    """(Ta, Tb) <g_t,g_k><h_t,h_k> between the tokens of response a (rows) and response b
    (columns)."""
    for name, x in (("g_a", g_a), ("h_a", h_a), ("g_b", g_b), ("h_b", h_b)):
        if not isinstance(x, Tensor) or x.dim() != 2:
            raise ValueError(
                f"`{name}` must be a 2-D (T, dim) tensor, got "
                f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}"
            )
    if g_a.shape[0] != h_a.shape[0] or g_b.shape[0] != h_b.shape[0]:
        raise ValueError(
            f"g and h must have one row per token: g_a {tuple(g_a.shape)}, h_a {tuple(h_a.shape)}, "
            f"g_b {tuple(g_b.shape)}, h_b {tuple(h_b.shape)}"
        )
    if g_a.shape[1] != g_b.shape[1] or h_a.shape[1] != h_b.shape[1]:
        raise ValueError(
            f"g_a/g_b (vocabulary) and h_a/h_b (hidden) widths differ: {tuple(g_a.shape)} vs "
            f"{tuple(g_b.shape)}, {tuple(h_a.shape)} vs {tuple(h_b.shape)}"
        )
    dtype = torch.promote_types(
        torch.promote_types(g_a.dtype, g_b.dtype), torch.promote_types(h_a.dtype, h_b.dtype)
    )
    gg = g_a.to(dtype) @ g_b.to(dtype).T  # (Ta, Tb)
    hh = h_a.to(dtype) @ h_b.to(dtype).T  # (Ta, Tb)
    return gg * hh


def plot_token_influence(
    g_incorrect: Tensor | None = None,
    h_incorrect: Tensor | None = None,
    g_correct: Tensor | None = None,
    h_correct: Tensor | None = None,
    tokens_incorrect: Sequence[str] | None = None,
    tokens_correct: Sequence[str] | None = None,
    ax: Axes | None = None,
    *,
    matrix: Tensor | np.ndarray | None = None,
    max_tokens: int = 40,
    cmap: str = "RdBu_r",
    title: str | None = None,
    save: str | Path | None = None,
) -> Axes:
    """Heatmap of <g_t,g_k><h_t,h_k>: incorrect tokens as rows, correct ones as columns (nb 03).

    Give ``g``/``h`` of both responses, or a precomputed ``matrix`` (Ta, Tb). Only the first
    ``max_tokens`` rows and columns are drawn; the colour map is centred at 0 (red: the pair pushes
    the correct token down when the incorrect one is penalised).
    """
    if matrix is None:
        if any(x is None for x in (g_incorrect, h_incorrect, g_correct, h_correct)):
            raise ValueError(
                "give g_incorrect, h_incorrect, g_correct, h_correct, or a precomputed `matrix`"
            )
        matrix = token_influence_matrix(g_incorrect, h_incorrect, g_correct, h_correct)
    m = _to_numpy(matrix, "matrix")
    if m.ndim != 2:
        raise ValueError(f"`matrix` must be 2-D (Ta, Tb), got shape {m.shape}")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    labels = []
    for name, tokens, n in (
        ("tokens_incorrect", tokens_incorrect, m.shape[0]),
        ("tokens_correct", tokens_correct, m.shape[1]),
    ):
        if tokens is not None and len(tokens) != n:
            raise ValueError(
                f"`{name}` has {len(tokens)} tokens but the matrix has {n} along that axis"
            )
        labels.append(False if tokens is None else [_tick_label(t) for t in tokens[:max_tokens]])
    m = m[:max_tokens, :max_tokens]  # (rows, cols) drawn
    ax = _new_axes(ax, (max(5.0, 0.22 * m.shape[1] + 2), max(4.0, 0.22 * m.shape[0] + 1.5)))
    sns.heatmap(
        m,
        ax=ax,
        cmap=cmap,
        center=0.0,
        xticklabels=labels[1],
        yticklabels=labels[0],
        cbar_kws={"label": "<g_t,g_k> <h_t,h_k>"},
    )
    ax.tick_params(labelsize=7)
    ax.set_xlabel("correct response token k")
    ax.set_ylabel("incorrect response token t")
    if title is not None:
        ax.set_title(title)
    _save(ax.figure, save)
    return ax


# --------------------------------------------------------------------------------------------
# Score histogram
# --------------------------------------------------------------------------------------------


def plot_score_histogram(
    scores: Tensor | np.ndarray,
    mask: Tensor | np.ndarray,
    correct: Tensor | np.ndarray,
    tau: float | None = None,
    ax: Axes | None = None,
    *,
    bins: int | Sequence[float] = 40,
    density: bool = False,
    title: str | None = None,
    save: str | Path | None = None,
) -> Axes:
    """Histograms of a group's incorrect and correct token scores, τ as a vertical line (nb 03).

    ``scores`` and ``mask`` are (G, T), ``correct`` (G,) bool or 0/1. Both histograms share bin
    edges (``ax.containers[0]`` incorrect, ``[1]`` correct). A finite ``tau`` draws a vertical line
    and counts the incorrect tokens above it in its label.
    """
    s = _to_numpy(scores, "scores")
    mk = _to_numpy(mask, "mask", dtype=bool)
    c = _to_numpy(correct, "correct", dtype=bool)
    if s.ndim != 2 or mk.shape != s.shape:
        raise ValueError(f"`scores` and `mask` must both be (G, T); got {s.shape} and {mk.shape}")
    if c.shape != (s.shape[0],):
        raise ValueError(f"`correct` must have shape (G,) = ({s.shape[0]},), got {c.shape}")
    valid = mk & np.isfinite(s)
    neg = s[valid & ~c[:, None]]  # scores of incorrect-response tokens
    pos = s[valid & c[:, None]]  # scores of correct-response tokens
    both = np.concatenate([neg, pos])
    if both.size == 0:
        raise ValueError("no valid token scores: `mask` selects no token with a finite score")
    edges = np.histogram_bin_edges(both, bins=bins)
    ax = _new_axes(ax, (6, 3.5))
    ax.hist(
        neg,
        bins=edges,
        alpha=0.55,
        color="#d6604d",
        label=f"incorrect ({neg.size} tokens)",
        density=density,
    )
    ax.hist(
        pos,
        bins=edges,
        alpha=0.55,
        color="#4393c3",
        label=f"correct ({pos.size} tokens)",
        density=density,
    )
    if _finite(tau):
        n_sel = int((neg > float(tau)).sum())
        ax.axvline(
            float(tau),
            color="black",
            linestyle="--",
            label=f"τ = {float(tau):.3g} ({n_sel} of {neg.size} incorrect above)",
        )
    ax.set_xlabel("token score s_t")
    ax.set_ylabel("density" if density else "tokens")
    ax.legend(fontsize=8)
    if title is not None:
        ax.set_title(title)
    _save(ax.figure, save)
    return ax


# --------------------------------------------------------------------------------------------
# Training curves
# --------------------------------------------------------------------------------------------


def _metric_column(df: pd.DataFrame, metric: str) -> str | None:
    """The column of ``metric`` ("a_b" and "a/b" are the same name), None when absent or all NaN."""
    for name in dict.fromkeys((metric, metric.replace("_", "/", 1), metric.replace("/", "_", 1))):
        if name in df.columns and df[name].notna().any():
            return name
    return None


_SEED_DIR = re.compile(r"^seed[_-]?(\d+)$")


def _run_identity(run_dir: Path) -> tuple[str | None, int | None]:
    """(method, seed) of a run from its config.json, falling back to the path
    <...>/<method>/seed<k>/."""
    method = seed = None
    cfg_path = run_dir / "config.json"
    if cfg_path.exists():
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{cfg_path}: not valid JSON ({exc})") from exc
        for part in (
            cfg,
            cfg.get("config") if isinstance(cfg, dict) else None,
        ):  # flat, or the trainer's nesting
            if isinstance(part, dict):
                method = part.get("method") if method is None else method
                seed = part.get("seed") if seed is None else seed
    match = _SEED_DIR.match(run_dir.name)
    if match:
        seed = int(match.group(1)) if seed is None else seed
        method = run_dir.parent.name if method is None else method
    return (None if method is None else str(method)), (None if seed is None else int(seed))


def load_metrics(run_dirs: str | Path | Iterable[str | Path]) -> pd.DataFrame:
    """Concatenate each run's metrics.csv with ``method``, ``seed`` and ``run`` columns (nb 01, 05).

    method and seed come from the run's config.json ({"method": ..., "seed": ...}, at the top or
    under "config" as ``nthr_book.trainer`` writes it) or else from the path pattern
    ``<...>/<method>/seed<k>/``; a run where neither gives them is an error.
    """
    if isinstance(run_dirs, (str, Path)):
        run_dirs = [run_dirs]
    frames = []
    for run_dir in map(Path, run_dirs):
        csv = run_dir / "metrics.csv"
        if not csv.exists():
            raise FileNotFoundError(f"{csv}: no metrics.csv in run directory {run_dir}")
        method, seed = _run_identity(run_dir)
        if method is None or seed is None:
            raise ValueError(
                f"{run_dir}: cannot tell the run's method and seed; write config.json with "
                "'method' and 'seed' or use the layout <...>/<method>/seed<k>/"
            )
        frame = pd.read_csv(csv)
        for col, value in (("method", method), ("seed", seed)):
            if col in frame.columns and not (frame[col].astype(str) == str(value)).all():
                raise ValueError(f"{csv}: column {col!r} disagrees with the run's {col} {value!r}")
        frames.append(frame.assign(method=method, seed=seed, run=str(run_dir)))
    if not frames:
        raise ValueError("`run_dirs` is empty")
    return pd.concat(frames, ignore_index=True)


def plot_regime_map(
    summary: pd.DataFrame,
    methods: Sequence[str] | None = None,
    ax: Axes | None = None,
    *,
    baseline: str = "pos_only",
    title: str | None = None,
    save: str | Path | None = None,
) -> Axes:
    """The regime map as ratios (notebook 08): per condition, median Δ_rule / median Δ_baseline
    with its bootstrap interval, one line per rule; on a second axis the median share of a wrong
    answer that repeats a right one (``shared_prefix``); each condition's median GWHES under its
    tick.

    ``summary`` is ``regime.regime_summary``'s table (conditions in map order). A ratio of 1 is the
    baseline's rise (Pos Only: no negative gradient); below 1 the negative gradient cost the correct
    answers part of their rise, below 0 it made them fall. A description: notebooks 02, 03 and 09
    read the map paired per question (``plot_regime_panels``).
    """
    ratio = f"ratio_to_{baseline}"
    _require_columns(summary, ("negatives", "method", ratio, "ratio_low", "ratio_high"))
    present = list(dict.fromkeys(summary["method"].astype(str)))
    methods = [m for m in (methods or present) if m != baseline]
    missing = [m for m in methods if m not in present]
    if missing:
        raise ValueError(f"method(s) {missing} not in summary['method'] (present: {present})")
    conditions = list(dict.fromkeys(summary["negatives"]))
    x = np.arange(len(conditions))
    if ax is None:
        _, ax = plt.subplots(figsize=(1.3 * len(conditions) + 3, 3.6), layout="constrained")
    for j, method in enumerate(methods):
        rows = summary[summary["method"] == method].set_index("negatives").reindex(conditions)
        y = rows[ratio].to_numpy(dtype=float)
        err = np.abs(np.vstack([y - rows["ratio_low"], rows["ratio_high"] - y]).astype(float))
        ax.errorbar(
            x + 0.06 * (j - (len(methods) - 1) / 2),
            y,
            yerr=err,
            color=method_color(method, j),
            linestyle=_LINESTYLES[j % len(_LINESTYLES)],
            marker="o",
            capsize=3,
            label=method_label(method),
        )
    ax.axhline(1.0, color="0.5", linewidth=0.8)
    ax.axhline(0.0, color="0.5", linewidth=0.8, linestyle=":")
    per_condition = summary.drop_duplicates("negatives").set_index("negatives").reindex(conditions)
    labels = [f"{c}\nGWHES {g:.3g}" for c, g in zip(conditions, per_condition["gwhes"])]
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel(f"median Δ / median Δ {method_label(baseline)}")
    ax.set_xlabel("wrong answers: branched at fraction f of a right one, then near-miss")
    twin = ax.twinx()
    twin.plot(x, per_condition["shared_prefix"], color="0.4", linestyle="--", marker="s")
    twin.set_ylim(0, 1.02)
    twin.set_ylabel("shared prefix of a wrong answer (grey)", color="0.4")
    ax.legend(fontsize=8, loc="lower left")
    ax.set_title(title or "The regime map: what the negative gradient costs as negatives near")
    _save(ax.figure, save)
    return ax


def plot_first_order(
    table: pd.DataFrame,
    axes: Sequence[Axes] | None = None,
    *,
    title: str | None = None,
    save: str | Path | None = None,
) -> Sequence[Axes]:
    """Δ(x) to first order (notebook 02, ``lld.first_order_displacement``), two panels: measured Δ
    against the first-order prediction per question (one colour per kind of negatives, the line
    y = x), and per kind the mean of the prediction's two parts (the right answers' push and the
    wrong answers' push) as bars side by side, with the mean measured Δ as a black diamond.

    ``table`` has one row per question: ``negatives`` (e.g. "f=0.00", "near-miss"), ``measured``,
    ``predicted``, ``right`` and ``wrong``. The scatter of kind k is ``axes[0].collections[k]``; the
    bars are ``axes[1].containers`` (right, then wrong).
    """
    _require_columns(table, ("negatives", "measured", "predicted", "right", "wrong"), "table")
    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(10, 3.8), layout="constrained")
    kinds = list(dict.fromkeys(table["negatives"]))
    ax = axes[0]
    for j, kind in enumerate(kinds):
        rows = table[table["negatives"] == kind]
        ax.scatter(rows["predicted"], rows["measured"], s=18, color=_PALETTE[j], label=kind)
    both = table[["predicted", "measured"]].to_numpy(dtype=float)
    lo, hi = float(np.nanmin(both)), float(np.nanmax(both))
    ax.plot([lo, hi], [lo, hi], color="0.4", linewidth=0.8, linestyle="--")
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.set_xlabel("first-order prediction lr·⟨∇ln π(y+), −∇L⟩")
    ax.set_ylabel(f"measured {DELTA_LABEL}")
    ax.legend(fontsize=8, title="wrong answers")
    means = table.groupby("negatives", sort=False)[["right", "wrong"]].mean().reindex(kinds)
    x = np.arange(len(kinds))
    bx = axes[1]
    width = 0.38  # side by side: the two parts, then their sum (the measured Δ) as a marker
    bx.bar(x - width / 2, means["right"], width, color=_PALETTE[2], label="right answers' push")
    bx.bar(x + width / 2, means["wrong"], width, color=_PALETTE[3], label="wrong answers' push")
    measured = table.groupby("negatives", sort=False)["measured"].mean().reindex(kinds)
    bx.scatter(x, measured, marker="D", color="black", zorder=3, label="measured Δ (mean)")
    bx.axhline(0.0, color="black", linewidth=0.6)
    bx.set_xticks(x, kinds)
    bx.set_ylabel("mean predicted Δ (two parts)")
    bx.legend(fontsize=8)
    axes[0].set_title(title or "The first-order account of Δ(x)")
    bx.set_title("where the prediction comes from")
    _save(axes[0].figure, save)
    return axes


def plot_regime_panels(
    summary: pd.DataFrame,
    axes: Sequence[Axes] | None = None,
    *,
    rules_shown: Sequence[str] = ("nthr", "random"),
    save: str | Path | None = None,
) -> Sequence[Axes]:
    """The regime map in three panels, one message each (notebooks 02, 03): (1) how much of a right
    answer a wrong one repeats (median shared prefix); (2) GRPO − Pos Only per question, mean with
    its 95% interval (below 0: the negative gradient costs the right answers part of their rise);
    (3) the same for ``rules_shown`` (NTHR, Random), each minus Pos Only. Each panel's title states
    what its numbers show: the columns whose interval lies wholly below (or above) 0.

    ``summary`` is ``regime.regime_summary``'s table. The drawn values are ``axes[0].patches``
    (heights) and ``axes[k].containers`` (error bars), in column order.
    """
    _require_columns(summary, ("negatives", "method", "diff_mean", "diff_low", "diff_high"))
    conditions = list(dict.fromkeys(summary["negatives"]))
    x = np.arange(len(conditions))
    if axes is None:
        _, axes = plt.subplots(1, 3, figsize=(13, 3.6), layout="constrained")
    first = summary.drop_duplicates("negatives").set_index("negatives").reindex(conditions)
    axes[0].bar(x, first["shared_prefix"], color="0.6")
    axes[0].set_ylim(0, 1)
    axes[0].set_xticks(x, conditions, fontsize=8)
    axes[0].set_ylabel("median shared prefix of a wrong answer")
    axes[0].set_title("1. the wrong answers come to repeat the right ones", fontsize=9)

    def draw(ax: Axes, methods: Sequence[str], caption: str) -> None:
        below, above = [], []
        for j, method in enumerate(methods):
            rows = summary[summary["method"] == method].set_index("negatives").reindex(conditions)
            y = rows["diff_mean"].to_numpy(dtype=float)
            err = np.abs(np.vstack([y - rows["diff_low"], rows["diff_high"] - y]).astype(float))
            ax.errorbar(
                x + 0.08 * (j - (len(methods) - 1) / 2),
                y,
                yerr=err,
                color=method_color(method, j),
                marker="o",
                capsize=3,
                linestyle=_LINESTYLES[j % len(_LINESTYLES)],
                label=method_label(method),
            )
            below += [
                f"{method_label(method)} {c}"
                for c, h in zip(conditions, rows["diff_high"])
                if h < 0
            ]
            above += [
                f"{method_label(method)} {c}"
                for c, lo in zip(conditions, rows["diff_low"])
                if lo > 0
            ]
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_xticks(x, conditions, fontsize=8)
        ax.set_ylabel(f"Δ − Δ {method_label('pos_only')} per question")
        ax.legend(fontsize=8)
        verdict = (f"below 0: {', '.join(below)}" if below else "no interval wholly below 0") + (
            f"; above 0: {', '.join(above)}" if above else ""
        )
        ax.set_title(f"{caption}\n({verdict})", fontsize=9)

    draw(axes[1], ["grpo"], "2. GRPO against Pos Only")
    shown = [m for m in rules_shown if m in set(summary["method"])]
    names = " and ".join(method_label(m).removeprefix("GRPO + ") for m in shown)
    draw(axes[2], shown, f"3. sparing tokens: {names} against Pos Only")
    _save(axes[0].figure, save)
    return axes


def _per_step(
    df: pd.DataFrame,
    metric: str,
    hue: str | None,
    seed_col: str | None,
    step_col: str,
    smooth: int = 1,
) -> pd.DataFrame:
    """Per (hue, step): mean, sd, min, max over seeds of the per-seed mean of ``metric``, and
    n_seeds; with ``smooth`` > 1 each run is first a trailing mean over its last ``smooth`` logged
    steps."""
    keys = [k for k in (hue, seed_col) if k is not None]
    data = df[keys + [step_col, metric]].dropna(subset=[metric])
    per_seed = (
        data.groupby(keys + [step_col], sort=True)[metric].mean().reset_index()
    )  # one value per run and step
    if smooth > 1:
        runs = per_seed.groupby(keys, sort=False)[metric] if keys else per_seed[metric]
        per_seed[metric] = runs.transform(lambda v: v.rolling(smooth, min_periods=1).mean())
    outer = [hue, step_col] if hue is not None else [step_col]
    return (
        per_seed.groupby(outer, sort=True)[metric]
        .agg(mean="mean", sd="std", min="min", max="max", n_seeds="count")
        .reset_index()
    )


def plot_training_curves(
    df: pd.DataFrame,
    metrics: Sequence[str] = (
        "reward_mean",
        "lld/rate",
        "nthr/selected_frac",
        "kl",
        "completion_length",
    ),
    *,
    hue: str | None = "method",
    seed_col: str | None = "seed",
    step_col: str = "step",
    band: str | None = "sd",
    smooth: int = 1,
    axes: Sequence[Axes] | np.ndarray | None = None,
    ncols: int = 3,
    save: str | Path | None = None,
) -> np.ndarray:
    """One panel per metric: mean over seeds per step and a band, a colour per ``hue`` (nb 01, 05).

    Each run is first averaged per step (rows repeated after a resume count once) and, with
    ``smooth`` > 1, replaced by its trailing mean over ``smooth`` steps (one step's reward of a few
    groups is noisy); then
    ``band="sd"`` shades mean ± sd over seeds (none with a single seed), ``"minmax"`` the range over
    seeds, ``None`` nothing. A metric name matches its column with "_" or "/" after the prefix
    ("lld_rate" finds the trainer's "lld/rate"). Metrics without a column, or with only NaN, are
    skipped and named in the figure title. Returns the used axes as a 1-D array, in drawing order.
    """
    needed = [step_col] + [c for c in (hue, seed_col) if c is not None]
    _require_columns(df, needed)
    if band not in ("sd", "minmax", None):
        raise ValueError(f"band={band!r}: expected 'sd', 'minmax' or None")
    if smooth < 1:
        raise ValueError(f"smooth={smooth}: expected a window of at least 1 step")
    present, skipped = [], []
    for m in metrics:
        col = _metric_column(df, m)
        (skipped if col is None else present).append(m if col is None else col)
    if not present:
        raise ValueError(
            f"none of the metrics {list(metrics)} is a column of df (columns: {list(df.columns)})"
        )
    if axes is None:
        cols = min(ncols, len(present))
        rows = math.ceil(len(present) / cols)
        fig, grid = plt.subplots(
            rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False, layout="constrained"
        )
        grid = grid.ravel()
        for extra in grid[len(present) :]:
            extra.set_visible(False)
        axes = grid[: len(present)]
    else:
        axes = np.asarray(axes, dtype=object).ravel()
        if len(axes) < len(present):
            raise ValueError(f"{len(axes)} axes given for {len(present)} metrics {present}")
        axes = axes[: len(present)]
    levels = list(dict.fromkeys(df[hue])) if hue is not None else [None]
    for ax, metric in zip(axes, present):
        stats = _per_step(df, metric, hue, seed_col, step_col, smooth)
        for j, level in enumerate(levels):
            rows = stats[stats[hue] == level] if hue is not None else stats
            if rows.empty:
                continue
            x, y = rows[step_col].to_numpy(dtype=float), rows["mean"].to_numpy(dtype=float)
            n = int(rows["n_seeds"].max())
            color = method_color(level, j) if hue is not None else _PALETTE[0]
            name = method_label(level) if hue is not None else metric
            # a dash pattern per method too, so that identical curves stay visible on top of each
            # other
            ax.plot(
                x,
                y,
                color=color,
                linestyle=_LINESTYLES[j % len(_LINESTYLES)],
                marker=".",
                label=f"{name} (n={n})",
            )
            if band == "sd" and n > 1:
                sd = rows["sd"].fillna(0.0).to_numpy(dtype=float)
                ax.fill_between(x, y - sd, y + sd, color=color, alpha=0.2, linewidth=0)
            elif band == "minmax" and n > 1:
                ax.fill_between(
                    x,
                    rows["min"].to_numpy(dtype=float),
                    rows["max"].to_numpy(dtype=float),
                    color=color,
                    alpha=0.2,
                    linewidth=0,
                )
        ax.set_title(metric)
        ax.set_xlabel(step_col)
    axes[0].legend(fontsize=8)
    fig = axes[0].figure
    what = {
        "sd": "mean ± sd over seeds",
        "minmax": "mean, min-max over seeds",
        None: "mean over seeds",
    }[band]
    what += f", each run a trailing mean over {smooth} steps" if smooth > 1 else ""
    note = f"{what}" + (f"; not logged, skipped: {', '.join(skipped)}" if skipped else "")
    fig.suptitle(note, fontsize=9)
    _save(fig, save)
    return np.asarray(axes, dtype=object)


# --------------------------------------------------------------------------------------------
# Benchmarks and success rates
# --------------------------------------------------------------------------------------------


def plot_benchmark_table(
    df: pd.DataFrame,
    ax: Axes | None = None,
    *,
    hue: str = "method",
    title: str | None = None,
    save: str | Path | None = None,
) -> Axes:
    """Bars of accuracy with 95% interval error bars, benchmarks on x, a bar per method (nb 05, 06).

    Columns ``benchmark``, ``method``, ``accuracy``, ``ci_low``, ``ci_high``; rows of
    ``EvalResult.as_row()`` (``label``, ``accuracy_pct``, ``ci_low_pct``, ``ci_high_pct``) work too.
    A ``model`` column with several models makes each bar a (model, method) pair. Bars of one hue
    level are one BarContainer (in first-appearance order; its ``.errorbar`` holds the intervals); a
    missing pair is a NaN bar.
    """
    data = df.copy() if isinstance(df, pd.DataFrame) else df
    if (
        isinstance(data, pd.DataFrame)
        and "accuracy" not in data.columns
        and "accuracy_pct" in data.columns
    ):
        data = data.rename(
            columns={"accuracy_pct": "accuracy", "ci_low_pct": "ci_low", "ci_high_pct": "ci_high"}
        )
        if hue not in data.columns and "label" in data.columns:
            hue = "label"
    _require_columns(data, ("benchmark", hue, "accuracy", "ci_low", "ci_high"))
    key = data[hue].astype(str)
    multi_model = "model" in data.columns and data["model"].nunique() > 1
    if multi_model:  # one bar per (model, method) pair
        key = data["model"].astype(str) + " / " + key.map(method_label)
    else:
        key = key.map(method_label)
    data["_level"] = key
    bad = data[(data["ci_low"] > data["accuracy"]) | (data["ci_high"] < data["accuracy"])]
    if len(bad):
        raise ValueError(f"rows {list(bad.index)[:5]}: need ci_low <= accuracy <= ci_high")
    dup = data.duplicated(["benchmark", "_level"], keep=False)
    if dup.any():
        raise ValueError(
            f"several rows for the same benchmark and {hue}: "
            f"{data.loc[dup, ['benchmark', '_level']].values.tolist()[:5]}"
        )
    benchmarks = list(dict.fromkeys(data["benchmark"]))
    levels = list(dict.fromkeys(data["_level"]))
    ax = _new_axes(ax, (max(6.0, 1.2 * len(benchmarks) + 2), 4))
    x = np.arange(len(benchmarks))
    width = 0.8 / len(levels)
    for j, level in enumerate(levels):
        rows = data[data["_level"] == level].set_index("benchmark").reindex(benchmarks)
        acc = rows["accuracy"].to_numpy(dtype=float)
        yerr = np.vstack(
            [
                acc - rows["ci_low"].to_numpy(dtype=float),
                rows["ci_high"].to_numpy(dtype=float) - acc,
            ]
        )
        method = rows[hue].dropna().iloc[0]
        color = _PALETTE[j % len(_PALETTE)] if multi_model else method_color(method, j)
        ax.bar(
            x + (j - (len(levels) - 1) / 2) * width,
            acc,
            width,
            yerr=yerr,
            capsize=3,
            color=color,
            label=level,
        )
    ax.set_xticks(x)
    ax.set_xticklabels(benchmarks)
    ax.set_ylabel("accuracy (95% CI)")
    ax.legend(fontsize=8)
    if title is not None:
        ax.set_title(title)
    _save(ax.figure, save)
    return ax


def plot_success_histogram(
    success_rates: Sequence[float] | Tensor | np.ndarray,
    ax: Axes | None = None,
    *,
    group_size: int = 8,
    title: str | None = None,
    save: str | Path | None = None,
) -> Axes:
    """Bar per k/G of how many questions reached that success rate; mixed groups (0 < k < G)
    coloured.

    ``success_rates`` are per-question N+/G values, or (num_groups, G) 0/1 rewards whose row means
    are taken. Values must be multiples of 1/G. ``ax.containers[0]`` holds the G + 1 bars, k = 0..G.
    """
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    r = _to_numpy(success_rates, "success_rates")
    if r.ndim == 2:
        if r.shape[1] != group_size:
            raise ValueError(
                f"2-D `success_rates` must be (num_groups, group_size={group_size}) rewards, "
                f"got shape {r.shape}"
            )
        r = r.mean(axis=1)
    r = r.reshape(-1)
    k = np.rint(r * group_size)
    off = np.abs(k - r * group_size) > 1e-6
    if off.any() or (k < 0).any() or (k > group_size).any():
        bad = r[off | (k < 0) | (k > group_size)][:5].tolist()
        raise ValueError(
            f"success rates must be k/{group_size} for k in 0..{group_size}; got e.g. {bad}"
        )
    counts = np.bincount(k.astype(int), minlength=group_size + 1)  # (G + 1,)
    ax = _new_axes(ax, (6, 3.5))
    colors = ["#999999" if i in (0, group_size) else _PALETTE[0] for i in range(group_size + 1)]
    ax.bar(np.arange(group_size + 1) / group_size, counts, width=0.8 / group_size, color=colors)
    ax.set_xticks(np.arange(group_size + 1) / group_size)
    ax.set_xticklabels([f"{i}/{group_size}" for i in range(group_size + 1)])
    ax.set_xlabel("success rate N+/G")
    ax.set_ylabel("questions")
    mixed = int(counts[1:group_size].sum())
    share = f" ({100.0 * mixed / r.size:.0f}%)" if r.size else ""
    ax.set_title(title if title is not None else f"{r.size} questions, {mixed} mixed{share}")
    _save(ax.figure, save)
    return ax
