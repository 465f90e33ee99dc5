"""Δ(x) over many questions and rules: the experiment behind the paper's Figures 1 and 4, and the
summaries of its table (docs/method.md §2).

``lld_experiment`` samples (or loads) the groups of a list of problems, keeps the mixed ones and
measures ``lld.one_step_displacement`` for every rule on the same groups from the same weights;
``displacement_table`` does the same for groups built by other means (the regime map's branched
and near-miss groups). The table has one row per question and rule (``ROW_COLUMNS``);
``displacement_summary`` reads it per rule and ``paired_comparison`` per question against a
baseline rule. Notebook 02; ``scripts/lld_displacement.py`` runs it at full size.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd
from torch import nn
from tqdm.auto import tqdm

from nthr_book import groups as _groups
from nthr_book import nthr as _nthr
from nthr_book import rules as _rules
from nthr_book.groups import Group
from nthr_book.lld import (
    OPTIMIZERS,
    ROW_COLUMNS,
    first_order_displacement,
    initial_token_logps,
    lld_rate,
    nthr_selection,
    one_step_displacement,
)
from nthr_book.stats import bootstrap_interval

__all__ = [
    "displacement_summary",
    "first_order_table",
    "displacement_table",
    "lld_experiment",
    "paired_comparison",
]


def _check_choice(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r}: expected one of {tuple(allowed)}")


def lld_experiment(
    model: nn.Module,
    tokenizer,
    problems: Iterable[dict],
    *,
    methods: Sequence[str] = ("grpo", "pos_only"),
    group_size: int = 8,
    max_new_tokens: int,
    lr: float,
    seed: int,
    temperature: float = 1.0,
    template: str = "boxed",
    require_boxed: bool = True,
    beta: float = 1.0,
    eta: float = 0.0,
    optimizer: str = "sgd",
    steps: int = 1,
    vocab: str = "generated",
    groups_path: str | Path | None = None,
    batch_size: int | None = None,
    balance: int | None = None,
    progress: bool = True,
    share_prompt: bool = True,
):
    """Δ(x) per mixed question and method on the same sampled groups, as a DataFrame (notebook 02).

    Samples (seeded) and grades ``group_size`` responses per problem, or loads them from
    ``groups_path`` when that file exists (it is written after sampling, so a rerun compares methods
    on the same rollouts). Homogeneous groups are dropped: ``df.attrs["dropped"]`` maps
    "all_correct"/"all_wrong" to question ids. Columns: id, method, n_correct, group_size, p, delta,
    per_response_delta, n_selected, n_incorrect_tokens, tau (NTHR's threshold; None for the rules
    without a selection), seed, lr; ``df.attrs["settings"]`` records the rest (``rule_settings``:
    each method's own). One initial forward pass per question is shared by all methods (with the
    entropies when a rule masks by entropy); NTHR's selection is computed once per β (``beta``, or
    a rule's own: nthr_all's -inf); "random" spares as many tokens per wrong response as NTHR at
    ``beta``, at positions drawn with ``question_seed(seed, id)`` (one draw per question).
    ``balance=k`` measures each mixed group on its first k correct and k incorrect responses only
    (``balanced_group``, the balanced 4+/4- probe of docs/results.md; sample a larger ``group_size``
    so that enough groups qualify); groups with fewer go to ``df.attrs["dropped"]["unbalanced"]``.
    Groups come from ``groups.load_or_sample_groups``; ``share_prompt`` as in
    ``one_step_displacement``.
    """

    methods = tuple(methods)
    if isinstance(methods, str) or not methods:
        raise ValueError(
            f"`methods` must be a non-empty sequence of {_rules.names()}, got {methods!r}"
        )
    for m in methods:
        _check_choice("methods item", m, _rules.names())
    if len(set(methods)) != len(methods):
        raise ValueError(f"`methods` has duplicates: {methods}")
    _check_choice("optimizer", optimizer, OPTIMIZERS)
    _check_choice("vocab", vocab, _nthr.VOCAB_MODES)
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise ValueError(f"`lr` must be a positive number, got {lr!r}")
    if balance is not None and (
        isinstance(balance, bool)
        or not isinstance(balance, int)
        or balance < 1
        or 2 * balance > group_size
    ):
        raise ValueError(
            f"`balance` must be None or an int k >= 1 with 2k <= group_size={group_size}, "
            f"got {balance!r}"
        )
    groups, sampling, source = _groups.load_or_sample_groups(
        groups_path,
        model,
        tokenizer,
        problems,
        group_size=group_size,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        seed=seed,
        template=template,
        require_boxed=require_boxed,
        batch_size=batch_size,
        progress=progress,
    )
    sampling = {k: sampling[k] for k in _groups.SAMPLING_KEYS}

    dropped: dict[str, list[str]] = {"all_correct": [], "all_wrong": []}
    mixed = []
    for g in groups:
        if g.status == "mixed":
            mixed.append(g)
        else:
            dropped[g.status].append(g.question_id)
    kept_note = ""
    if balance is not None:
        balanced = [(g.question_id, _groups.balanced_group(g, balance)) for g in mixed]
        dropped["unbalanced"] = [qid for qid, b in balanced if b is None]
        mixed = [b for _, b in balanced if b is not None]
        kept_note = (
            f" ({len(dropped['unbalanced'])} more dropped with fewer than {balance} right or wrong)"
        )
    print(
        f"lld_experiment: {len(groups)} questions ({source}); {len(mixed)} mixed kept{kept_note}; "
        "dropped "
        f"{len(dropped['all_correct'])} all correct, {len(dropped['all_wrong'])} all wrong"
    )

    df = displacement_table(
        model,
        mixed,
        methods=methods,
        lr=lr,
        seed=seed,
        temperature=temperature,
        beta=beta,
        eta=eta,
        optimizer=optimizer,
        steps=steps,
        vocab=vocab,
        batch_size=batch_size,
        share_prompt=share_prompt,
        progress=progress,
    )
    df.attrs["dropped"] = dropped
    df.attrs["n_sampled"] = len(groups)
    df.attrs["settings"] = sampling | {
        "methods": list(methods),
        "rule_settings": {m: _rules.get(m).settings() for m in methods},
        "lr": lr,
        "beta": beta,
        "eta": eta,
        "optimizer": optimizer,
        "steps": steps,
        "vocab": vocab,
        "balance": balance,
        "share_prompt": share_prompt,
        "groups_path": None if groups_path is None else str(groups_path),
    }
    return df


def displacement_table(
    model: nn.Module,
    groups: Sequence[Group],
    *,
    methods: Sequence[str] = ("grpo", "pos_only"),
    lr: float,
    seed: int,
    temperature: float = 1.0,
    beta: float = 1.0,
    eta: float = 0.0,
    optimizer: str = "sgd",
    steps: int = 1,
    vocab: str = "generated",
    batch_size: int | None = None,
    share_prompt: bool = True,
    progress: bool = True,
    desc: str = "LLD questions",
):
    """Δ(x) of every rule in ``methods`` on each of the given mixed ``groups``: the table of
    ``lld_experiment`` (columns ``ROW_COLUMNS``), for groups built by other means (the regime map's
    branched and near-miss groups).

    One initial pass per group is shared by every rule: NTHR's selection is computed once from it
    per β (the experiment's ``beta``, or a rule's own: nthr_all's -inf), so Random spares exactly as
    many tokens per wrong response as NTHR, and an entropy-masking rule's entropies come from it.
    """
    betas = {
        m: _rules.get(m).settings().get("nthr_beta", beta)
        for m in methods
        if _rules.get(m).needs_hidden
    }
    need_selection = bool(betas)
    need_entropy = any(_rules.get(m).needs_entropy for m in methods)
    rows = []
    for g in tqdm(groups, desc=desc, disable=not progress):
        out = initial_token_logps(
            model,
            g,
            temperature=temperature,
            batch_size=batch_size,
            return_hidden=need_selection,
            share_prompt=share_prompt,
            return_entropy=need_entropy,
        )
        out = list(out) if isinstance(out, tuple) else [out]
        old_logps = out.pop(0)
        hidden = out.pop(0) if need_selection else None
        entropy = out.pop(0) if need_entropy else None
        selections = {  # β -> ((G, T) selection, tau)
            b: nthr_selection(model, g, beta=b, temperature=temperature, vocab=vocab, hidden=hidden)
            for b in set(betas.values())
        }
        del hidden
        for m in methods:
            selected, tau_m = selections[betas[m]] if m in betas else (None, None)
            res = one_step_displacement(
                model,
                g,
                update=m,
                lr=lr,
                optimizer=optimizer,
                steps=steps,
                beta=betas.get(m, beta),
                eta=eta,
                seed=seed,
                temperature=temperature,
                vocab=vocab,
                selected=selected,
                old_logps=old_logps,
                batch_size=batch_size,
                share_prompt=share_prompt,
                entropy=entropy,
            )
            rows.append(res.to_row() | {"tau": tau_m, "seed": seed, "lr": lr})
    return pd.DataFrame(rows, columns=list(ROW_COLUMNS))


# ----------------------------------------------------------------------------------------------
# Summaries
# ----------------------------------------------------------------------------------------------


def displacement_summary(df):
    """Per method (in first-seen order): n_questions, median_delta with its 95% bootstrap interval
    over questions (median_low, median_high), mean_delta, frac_delta_le_0, lld_rate."""
    missing = [c for c in ("method", "delta") if c not in df.columns]
    if missing:
        raise ValueError(f"`df` lacks column(s) {missing} (expected an lld_experiment table)")
    rows = []
    for method in pd.unique(df["method"]):
        part = df[df["method"] == method]
        delta = part["delta"].astype(float)
        median, low, high = bootstrap_interval(delta.to_numpy())
        row = {
            "method": method,
            "n_questions": int(len(part)),
            "median_delta": median,
            "median_low": low,
            "median_high": high,
            "mean_delta": float(delta.mean()),
            "frac_delta_le_0": float((delta <= 0).mean()),
        }
        if "per_response_delta" in part.columns:
            row["lld_rate"] = lld_rate(part["per_response_delta"])
        rows.append(row)
    columns = ["method", "n_questions", "median_delta", "median_low", "median_high", "mean_delta"]
    columns.append("frac_delta_le_0")
    if "per_response_delta" in df.columns:
        columns.append("lld_rate")
    return pd.DataFrame(rows, columns=columns).set_index("method")


def paired_comparison(df, baseline: str = "grpo"):
    """Each method against ``baseline`` on the same questions (and seeds): the paired view of Δ(x).

    Per method other than ``baseline``: n_pairs (questions where both were measured), frac_above
    (the share where the method's Δ is larger than the baseline's), median_diff and mean_diff of
    Δ_method - Δ_baseline. With GRPO as the baseline, Pos Only above GRPO on most questions means
    the negative gradient lowered the correct answers' rise (lazy); NTHR above GRPO means the
    penalty it spared was pulling the correct answers down.
    """
    missing = [c for c in ("id", "method", "delta") if c not in df.columns]
    if missing:
        raise ValueError(f"`df` lacks column(s) {missing} (expected an lld_experiment table)")
    if baseline not in set(df["method"]):
        raise ValueError(
            f"baseline={baseline!r} is not among the methods {list(pd.unique(df['method']))}"
        )
    keys = ["seed", "id"] if "seed" in df.columns else ["id"]
    wide = df.pivot_table(index=keys, columns="method", values="delta", aggfunc="first")
    rows = []
    for method in pd.unique(df["method"]):
        if method == baseline:
            continue
        pair = wide[[baseline, method]].dropna()
        diff = pair[method] - pair[baseline]
        rows.append(
            {
                "method": method,
                "n_pairs": int(len(diff)),
                "frac_above": float((diff > 0).mean()),
                "median_diff": float(diff.median()),
                "mean_diff": float(diff.mean()),
            }
        )
    columns = ["method", "n_pairs", "frac_above", "median_diff", "mean_diff"]
    return pd.DataFrame(rows, columns=columns).set_index("method")


def first_order_table(
    model: nn.Module,
    groups: Sequence[Group],
    *,
    lr: float,
    update: str = "grpo",
    temperature: float = 1.0,
    seed: int = 0,
    progress: bool = True,
    desc: str = "first order",
) -> pd.DataFrame:
    """Per group: the measured Δ(x) of one SGD step of ``update`` (``lld.one_step_displacement``)
    beside its first-order prediction and the prediction's two parts, the right answers' push and
    the wrong answers' push (``lld.first_order_displacement``). Columns: id, method, measured,
    predicted, right, wrong, residual (measured − predicted). Notebook 02 plots it
    (``viz.plot_first_order``)."""
    rows = []
    for g in tqdm(groups, desc=desc, disable=not progress):
        kw = dict(update=update, lr=lr, temperature=temperature, seed=seed)
        measured = one_step_displacement(model, g, **kw).delta
        row = first_order_displacement(model, g, **kw).to_row()
        rows.append(row | {"measured": measured, "residual": measured - row["predicted"]})
    columns = ["id", "method", "measured", "predicted", "right", "wrong", "residual"]
    return pd.DataFrame(rows, columns=columns)
