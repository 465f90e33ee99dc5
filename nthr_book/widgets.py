"""The NTHR threshold explorer widget: ipywidgets controls wired to the explorer's pure functions.

The interactive view of docs/method.md §3 for arXiv 2505.18830 (Deng et al., "On the Effect of
Negative Gradient in Group Relative Deep Reinforcement Optimization"), notebook 04. Only controls
and their callbacks live here; the numbers are ``explorer``'s, the picture is ``explorer_html``'s:

- ``threshold_explorer`` : the widget (``ThresholdExplorer``, an ipywidgets ``VBox``), returned
  without being displayed; a control change calls ``explorer.explorer_state`` and
  ``explorer_html.render_explorer_html`` on cached ``explorer.GroupScores``, never the model
- ``explorer_snapshot``  : the same picture as static HTML, for executed notebooks viewed without a
  kernel
- the Δ(x) button        : ``explorer.displacement_comparison`` at the current settings
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import ipywidgets as ipw
import torch
from torch import nn

from nthr_book import nthr
from nthr_book.explorer import (
    ETA_CHOICES,
    ExplorerState,
    GroupScores,
    check_beta,
    compute_group_scores,
    default_response,
    displacement_comparison,
    explorer_state,
)
from nthr_book.explorer_html import render_displacement_html, render_explorer_html

__all__ = ["BETA_RANGE", "ThresholdExplorer", "explorer_snapshot", "threshold_explorer"]

BETA_RANGE = (-1.0, 3.0, 0.05)  # (min, max, step) of the β slider; β = -∞ is a separate toggle


def _mixed(groups: Sequence[Any]) -> list[Any]:
    from nthr_book.groups import Group

    groups = list(groups)
    for i, g in enumerate(groups):
        if not isinstance(g, Group):
            raise TypeError(
                f"groups[{i}] must be an nthr_book.groups.Group, got {type(g).__name__}"
            )
    mixed = [g for g in groups if g.status == "mixed"]
    if not mixed:
        raise ValueError(
            f"none of the {len(groups)} groups is mixed (0 < N+ < G): the explorer needs correct "
            "and incorrect responses in one group"
        )
    return mixed


def _align_scores(
    groups: Sequence[Any], scores: Sequence[GroupScores] | None
) -> dict[str, GroupScores]:
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
        if tuple(s.completion_ids.shape) != tuple(
            g.rollouts.completion_ids.shape
        ) or not torch.equal(s.completion_ids, g.rollouts.completion_ids.cpu()):
            raise ValueError(
                f"scores[{i}] (question {s.question_id!r}) does not match that group's "
                "completion_ids"
            )
        out[s.question_id] = s
    return out


class _ScoreCache:
    """GroupScores per question, computed with the model at most once per (question, vocab mode)."""

    def __init__(
        self,
        groups: Sequence[Any],
        scores: Sequence[GroupScores] | None,
        model: nn.Module | None,
        tokenizer: Any,
        temperature: float,
        batch_size: int | None,
    ):
        self.groups = list(groups)
        self.cache = _align_scores(self.groups, scores)
        self.model, self.tokenizer, self.temperature, self.batch_size = (
            model,
            tokenizer,
            temperature,
            batch_size,
        )
        self.computed = (
            0  # number of compute_group_scores calls (tests check that moves never recompute)
        )

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
            raise LookupError(
                f"no {vocab!r} scores with {anchor!r} anchor pairs for question "
                f"{g.question_id!r}: pass model= to compute them, or scores= "
                f"computed with compute_group_scores(..., vocab={vocab!r})"
            )
        new = compute_group_scores(
            self.model,
            g,
            vocab=vocab,
            temperature=self.temperature,
            tokenizer=self.tokenizer,
            batch_size=self.batch_size,
        )
        self.computed += 1
        if s is not None:
            new = replace(s.with_scores(new), tokens=s.tokens)
        self.cache[g.question_id] = new
        return new


class ThresholdExplorer(ipw.VBox):
    """The threshold explorer widget (a VBox): controls in ``.controls``, current numbers from
    ``.state()``.

    Built by ``threshold_explorer``; every control change calls ``explorer_state`` and
    ``render_explorer_html`` on cached GroupScores, never the model (except the first time a vocab
    mode is shown for a question without precomputed scores, and the Δ(x) button).
    """

    def __init__(
        self,
        groups: Sequence[Any],
        *,
        scores: Sequence[GroupScores] | None = None,
        model: nn.Module | None = None,
        tokenizer: Any = None,
        beta: float = 1.0,
        eta: str | float = "two_abs",
        vocab: str = "generated",
        lr: float = 5e-5,
        optimizer: str = "sgd",
        temperature: float = 1.0,
        batch_size: int | None = None,
        histogram: bool = True,
        anchor: str = "all",
    ):
        w = ipw
        beta = check_beta(beta)
        nthr.eta_for(0.5, eta)  # validates the schedule
        if vocab not in nthr.VOCAB_MODES:
            raise ValueError(f"vocab={vocab!r}: expected one of {nthr.VOCAB_MODES}")
        if anchor not in nthr.ANCHORS:
            raise ValueError(f"anchor={anchor!r}: expected one of {nthr.ANCHORS}")
        if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
            raise ValueError(f"`lr` must be a positive number, got {lr!r}")
        groups = _mixed(groups)
        if model is None and not _align_scores(groups, scores):
            raise ValueError(
                "pass model= (scores are computed once per group) or scores= (a list of "
                "GroupScores)"
            )
        self.groups, self.model, self.lr, self.optimizer = groups, model, float(lr), optimizer
        self.temperature, self.histogram = float(temperature), histogram
        self.scores = _ScoreCache(groups, scores, model, tokenizer, self.temperature, batch_size)
        self._grpo: dict[
            str, Any
        ] = {}  # question id -> GRPO QuestionDisplacement (independent of β, η, vocab)
        self._busy = False
        self._updating = False

        q_options = [
            (f"{g.question_id} (N+ {g.n_correct}/{g.group_size}): {g.problem.strip()[:50]}", i)
            for i, g in enumerate(groups)
        ]
        lo, hi, step = BETA_RANGE
        finite_beta = 1.0 if beta == -math.inf else beta
        eta_options = list(ETA_CHOICES)
        if all(v != eta for _, v in eta_options):
            eta_options.append((str(eta), eta))
        wide = w.Layout(width="auto")
        self.controls: dict[str, Any] = {
            "question": w.Dropdown(
                options=q_options, value=0, description="question", layout=w.Layout(width="460px")
            ),
            "response": w.Dropdown(
                options=[], description="incorrect", layout=w.Layout(width="260px")
            ),
            "beta_neg_inf": w.ToggleButton(
                value=beta == -math.inf,
                description="β = -∞",
                tooltip="β = -∞: select every incorrect token",
                layout=wide,
            ),
            "beta": w.FloatSlider(
                value=finite_beta,
                min=min(lo, finite_beta),
                max=max(hi, finite_beta),
                step=step,
                description="β",
                continuous_update=False,
                readout_format=".2f",
                disabled=beta == -math.inf,
                layout=w.Layout(width="340px"),
            ),
            "eta": w.Dropdown(
                options=eta_options, value=eta, description="η", layout=w.Layout(width="300px")
            ),
            "vocab": w.ToggleButtons(
                options=list(nthr.VOCAB_MODES),
                value=vocab,
                description="vocabulary",
                tooltips=[
                    "V*: token ids of the group's responses (paper's speed-up)",
                    "the full vocabulary (exact)",
                ],
            ),
            "anchor": w.Dropdown(
                options=list(nthr.ANCHORS),
                value=anchor,
                description="s̄+ anchor",
                tooltip="which correct tokens k count in s̄+ (and so in τ)",
                layout=w.Layout(width="260px"),
            ),
            "run": w.Button(
                description="Δ(x): one NTHR step vs GRPO",
                disabled=model is None,
                icon="play",
                tooltip="needs model=" if model is None else "one update from the initial weights",
                layout=w.Layout(width="260px"),
            ),
        }
        self.outputs: dict[str, Any] = {
            "view": w.HTML(),
            "progress": w.IntProgress(
                value=0,
                min=0,
                max=2,
                description="",
                layout=w.Layout(width="160px", visibility="hidden"),
            ),
            "status": w.HTML(
                value="" if model is not None else "<i>pass model= to enable the Δ(x) button</i>"
            ),
            "result": w.HTML(),
        }
        c, o = self.controls, self.outputs
        self._set_response_options()
        for name in ("question", "response", "beta_neg_inf", "beta", "eta", "vocab", "anchor"):
            c[name].observe(self._on_change, names="value")
        c["run"].on_click(self._on_run)
        super().__init__(
            children=[
                w.HBox([c["question"], c["response"]]),
                w.HBox([c["beta_neg_inf"], c["beta"], c["eta"]]),
                w.HBox([c["vocab"], c["anchor"]]),
                o["view"],
                w.HBox([c["run"], o["progress"], o["status"]]),
                o["result"],
            ]
        )
        self.add_class("nthr-threshold-explorer")
        self.refresh()

    # ---- reading the controls -------------------------------------------------------------
    @property
    def beta(self) -> float:
        """The current β (-inf when the toggle is on)."""
        return (
            -math.inf if self.controls["beta_neg_inf"].value else float(self.controls["beta"].value)
        )

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
        return explorer_state(
            self.current_scores(),
            beta=self.beta,
            eta=c["eta"].value,
            vocab=c["vocab"].value,
            anchor=c["anchor"].value,
        )

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
            self.controls["response"].options = [
                (f"#{r} ({int(mask[r].sum())} tokens)", r) for r in rows
            ]
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
            o["view"].value = (
                f'<div class="nthr-explorer nthr-explorer-live" style="{style}">'
                f"no {what} for question {qid}: pass model= or scores computed "
                f"with compute_group_scores(..., vocab={vocab!r})</div>"
            )
            return
        qid = self.groups[q].question_id
        if not self.scores.has(q, vocab, anchor):  # first view of (question, vocab): a forward pass
            o["status"].value = f"<i>computing {vocab} scores for question {html.escape(qid)}…</i>"
        gs = self.current_scores()
        if o["status"].value.startswith("<i>computing"):
            o["status"].value = ""
        state = explorer_state(gs, beta=self.beta, eta=c["eta"].value, vocab=vocab, anchor=anchor)
        o["view"].value = render_explorer_html(
            gs, state, c["response"].value, histogram=self.histogram
        )

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
                self.model,
                group,
                state,
                lr=self.lr,
                optimizer=self.optimizer,
                temperature=self.temperature,
                grpo_result=self._grpo.get(group.question_id),
                progress=progress,
            )
            self._grpo[group.question_id] = res_grpo
            o["result"].value = render_displacement_html(
                res_nthr, res_grpo, state, self.lr, self.optimizer
            )
        except (
            Exception
        ) as exc:  # shown in the widget: a callback's exception would otherwise vanish
            what = f"{html.escape(type(exc).__name__)}: {html.escape(str(exc))}"
            o["status"].value = f'<span style="color:#b2182b;">{what}</span>'
        finally:
            self._busy = False
            c["run"].disabled = False
            o["progress"].layout.visibility = "hidden"


def threshold_explorer(
    groups: Sequence[Any],
    *,
    beta: float = 1.0,
    eta: str | float = "two_abs",
    model: nn.Module | None = None,
    lr: float = 5e-5,
    scores: Sequence[GroupScores] | None = None,
    tokenizer: Any = None,
    vocab: str = "generated",
    optimizer: str = "sgd",
    temperature: float = 1.0,
    batch_size: int | None = None,
    anchor: str = "all",
) -> ThresholdExplorer:
    """The NTHR threshold explorer for mixed ``groups.Group``s, returned without being displayed
    (notebook 04).

    Scores come from ``scores`` (GroupScores, e.g. from ``compute_group_scores``) or are computed
    with ``model`` once per question and vocab mode. Controls: question, incorrect response, β
    (slider plus a β = -∞ toggle), η schedule, vocabulary, s̄+ anchor (``nthr.ANCHORS``); the Δ(x)
    button (enabled with ``model``) runs ``lld.one_step_displacement`` with ``lr``/``optimizer`` for
    NTHR at the current settings and GRPO.
    """
    return ThresholdExplorer(
        groups,
        scores=scores,
        model=model,
        tokenizer=tokenizer,
        beta=beta,
        eta=eta,
        vocab=vocab,
        lr=lr,
        optimizer=optimizer,
        temperature=temperature,
        batch_size=batch_size,
        anchor=anchor,
    )


def explorer_snapshot(
    groups: Sequence[Any],
    beta: float = 1.0,
    eta: str | float = "two_abs",
    *,
    vocab: str = "generated",
    question: int | str = 0,
    response: int | None = None,
    scores: Sequence[GroupScores] | None = None,
    model: nn.Module | None = None,
    tokenizer: Any = None,
    temperature: float = 1.0,
    histogram: bool = True,
    anchor: str = "all",
):
    """The explorer's picture at fixed settings as ``IPython.display.HTML`` (visible without a
    kernel).

    ``question`` is an index into the mixed groups or a question id; ``response`` a row of an
    incorrect response (default: the one with the most selected tokens). Scores as in
    ``threshold_explorer``.
    """
    from IPython.display import HTML

    mixed = _mixed(groups)
    if isinstance(question, str):
        ids = [g.question_id for g in mixed]
        if question not in ids:
            raise ValueError(
                f"question={question!r} is not a mixed question (mixed ids: {ids[:10]})"
            )
        index = ids.index(question)
    else:
        index = int(question)
        if not 0 <= index < len(mixed):
            raise ValueError(f"question={question} is out of range: {len(mixed)} mixed groups")
    if model is None and not _align_scores(mixed, scores):
        raise ValueError(
            "pass model= (scores are computed once per group) or scores= (a list of GroupScores)"
        )
    gs = _ScoreCache(mixed, scores, model, tokenizer, temperature, None).get(index, vocab, anchor)
    state = explorer_state(gs, beta=beta, eta=eta, vocab=vocab, anchor=anchor)
    return HTML(render_explorer_html(gs, state, response, histogram=histogram, live=False))
