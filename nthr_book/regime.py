"""The regime map of LLD: Δ(x) as the wrong answers go from unlike the right ones to nearly alike.

The paper explains LLD by how much a question's wrong answers resemble its right ones (Theorem 4.4,
GWHES, Table 1). The map measures that on the model's own samples. For each mixed group and a
fraction f, ``groups.branched_group`` replaces every wrong answer by a correct answer's first
floor(f·L) tokens and the model's own wrong continuation: f = 0 is natural sampling, f → 1 nears the
constructed near-miss negatives (``groups.near_miss_group``, the last column of the map). On every
condition the same update rules are measured by Δ(x) (``lld_sweep.displacement_table``), next to the
measured resemblance of right and wrong answers: GWHES (``similarity.gwhes_question``) and the share
of a wrong answer that repeats a right one from its start (``similarity.shared_prefix_share``).

``regime_map`` builds the table (one row per condition, question and rule), ``regime_summary`` reads
it per condition and rule (median Δ and the ratio to Pos Only with bootstrap intervals over
questions, the LLD rate, the share of wrong tokens NTHR spares), and ``gwhes_ranking`` asks the
paper's Table 1 question on these groups. Notebooks 02 and 03; ``scripts/lld_displacement.py --map``
runs it at full size.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from nthr_book import groups as _groups
from nthr_book import lld, lld_sweep
from nthr_book.env import versions
from nthr_book.groups import Group
from nthr_book.grpo import head_logits
from nthr_book.io import read_jsonl, write_json, write_jsonl
from nthr_book.similarity import (
    gwhes_question,
    random_topk_overlap_expectation,
    shared_prefix_share,
    topk_overlap,
)
from nthr_book.stats import (
    bootstrap_interval,
    mean,
    ratio_of_medians,
    ratio_of_sums,
    resolved,
    spearman,
)

__all__ = [
    "DEFAULT_FRACTIONS",
    "MAP_METHODS",
    "NEAR_MISS",
    "condition_label",
    "gwhes_ranking",
    "group_similarity",
    "regime_groups",
    "regime_map",
    "common_columns",
    "regime_shift",
    "regime_summary",
]

DEFAULT_FRACTIONS = (0.0, 0.25, 0.5, 0.75, 0.9)
MAP_METHODS = ("grpo", "pos_only", "nthr", "random")  # the rules notebooks 02 and 03 read off it
NEAR_MISS = "near-miss"  # the condition label of the constructed negatives


def condition_label(fraction: float) -> str:
    """The map's column name of a branching fraction: ``"f=0.50"``."""
    return f"f={fraction:.2f}"


def regime_groups(
    mixed: Sequence[Group],
    model: nn.Module,
    tokenizer,
    *,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    near_miss: bool = True,
    temperature: float,
    max_new_tokens: int,
    seed: int,
    require_boxed: bool = True,
    max_tries: int = 4,
    progress: bool = True,
    checkpoint: str | Path | None = None,
) -> tuple[dict[str, list[Group]], dict[str, int]]:
    """({condition: groups}, {condition: groups that could not be filled}) for the map's columns.

    With ``checkpoint`` (a path prefix) each branched column is saved to
    ``<checkpoint>.<condition>.groups.pt`` as soon as it is filled, and read back by a later call
    with the same settings and questions: a killed map resumes after its last finished column.

    ``mixed`` are the natural mixed groups; each fraction's column holds their branched versions
    (f = 0: the groups themselves), and ``near_miss`` adds the constructed column. A wrong answer
    the model could not be made to get wrong after its correct start is dropped from its group
    (``groups.branched_group(partial=True)``; the summary's ``mean_group_size`` shows how many),
    and a question with none left leaves the column (counted), so columns may differ in size.
    """
    columns: dict[str, list[Group]] = {}
    unfilled: dict[str, int] = {}
    for f in fractions:
        label = condition_label(f)
        settings = {  # what a saved column must have been branched with
            "questions": [g.question_id for g in mixed],
            "fraction": float(f),
            "temperature": temperature,
            "max_new_tokens": max_new_tokens,
            "seed": seed,
            "max_tries": max_tries,
            "require_boxed": require_boxed,
        }
        # f = 0 is the natural groups themselves: nothing to save; a branched column costs minutes
        saved = _part_path(checkpoint, label, "groups.pt") if f > 0 else None
        if saved is not None and saved.is_file():
            groups, meta = _groups.load_groups(saved, return_settings=True)
            if {k: meta.get(k) for k in settings} == settings:
                columns[label], unfilled[label] = groups, int(meta["unfilled"])
                continue
        columns[label], unfilled[label] = _groups.branched_groups(
            mixed,
            model,
            tokenizer,
            f,
            temperature=temperature,
            max_new_tokens=max_new_tokens,
            seed=seed,
            max_tries=max_tries,
            require_boxed=require_boxed,
            progress=progress,
        )
        if saved is not None:
            _groups.save_groups(
                saved, columns[label], settings=settings | {"unfilled": unfilled[label]}
            )
    if near_miss:
        near = [_groups.near_miss_group(g, tokenizer, require_boxed=require_boxed) for g in mixed]
        columns[NEAR_MISS] = [g for g in near if g is not None]
        unfilled[NEAR_MISS] = len(near) - len(columns[NEAR_MISS])
    return columns, unfilled


def _part_path(prefix: str | Path | None, condition: str, suffix: str) -> Path | None:
    """``<prefix>.<condition>.<suffix>``: one column's checkpoint beside a saved map (None: no
    checkpoints)."""
    if prefix is None:
        return None
    prefix = Path(prefix)
    return prefix.with_name(f"{prefix.name}.{condition.replace('=', '')}.{suffix}")


def common_columns(
    columns: dict[str, list[Group]],
) -> tuple[dict[str, list[Group]], dict[str, int]]:
    """The map's columns on common ground: the source questions filled in every column, each group
    restricted to its correct answers and the wrong slots filled in every column
    (``groups.slot_rows``), so that every column holds the same questions with the same G, p,
    advantages and correct answers, and only what the wrong answers are differs between columns.

    Returns (columns, {column: questions it held before}). A question left with no common wrong
    slot leaves every column. Notebook 02.
    """
    by_column = {c: {_groups.source_question_id(g): g for g in col} for c, col in columns.items()}
    held = {c: len(v) for c, v in by_column.items()}
    order = next(iter(by_column.values()), {})  # the first column's question order
    out: dict[str, list[Group]] = {c: [] for c in columns}
    for q in order:
        if not all(q in v for v in by_column.values()):
            continue
        groups = {c: by_column[c][q] for c in columns}
        wrong = [  # the slots each column's group filled with a wrong answer
            {s for s, ok in zip(_groups.slot_rows(g), g.correct.tolist()) if not ok}
            for g in groups.values()
        ]
        common = set.intersection(*wrong)
        if not common:
            continue
        for c, g in groups.items():
            slots, right = _groups.slot_rows(g), g.correct.tolist()
            keep = [i for i, s in enumerate(slots) if right[i] or s in common]
            out[c].append(g if len(keep) == g.group_size else _groups.select_rows(g, keep))
    return out, held


def group_similarity(
    model: nn.Module, group: Group, *, temperature: float, share_prompt: bool = True
) -> dict[str, float]:
    """How much a group's wrong answers resemble its right ones: ``gwhes`` (the paper's score over
    the full vocabulary, mean over the correct answers) and ``shared_prefix`` (the mean share of a
    wrong answer that repeats a correct one from its start)."""
    ro = group.rollouts
    mask = ro.completion_mask.bool()
    with torch.no_grad():
        _, hidden = lld.initial_token_logps(
            model, group, temperature=temperature, return_hidden=True, share_prompt=share_prompt
        )
        logits = head_logits(model, hidden, temperature=temperature)  # (G, T, V)
        score = gwhes_question(hidden, logits, ro.completion_ids, mask, group.correct)
    return {
        "gwhes": float(score),
        "shared_prefix": shared_prefix_share(ro.completion_ids.cpu(), mask.cpu(), group.correct),
    }


def regime_map(
    model: nn.Module,
    tokenizer,
    mixed: Sequence[Group],
    *,
    methods: Sequence[str] = ("grpo", "pos_only"),
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    near_miss: bool = True,
    lr: float,
    temperature: float,
    max_new_tokens: int,
    seed: int,
    beta: float = 1.0,
    eta: float = 0.0,
    require_boxed: bool = True,
    max_tries: int = 4,
    columns: dict[str, list[Group]] | None = None,
    common: bool = True,
    path: str | Path | None = None,
    progress: bool = True,
):
    """The map as a DataFrame: one row per condition, question and rule.

    Columns: those of ``lld_sweep.displacement_table`` (id, method, delta, per_response_delta,
    n_selected, n_incorrect_tokens, ...), then ``negatives`` (the condition: "f=0.50" or
    "near-miss"), ``fraction`` (NaN for near-miss), ``question`` (the natural group's id, the same
    in every column) and the group's ``gwhes`` and ``shared_prefix``. Pass ``columns`` (from
    ``regime_groups``) to measure other rules on the same branched groups without sampling them
    again; ``df.attrs["unfilled"]`` counts the questions each column could not fill. With
    ``common=True`` (the default) Δ is measured on ``common_columns``: the questions filled in every
    column, on the wrong slots filled in every column (``df.attrs["held"]`` counts each column's
    questions before, ``df.attrs["n_common"]`` after), so the columns compare the same questions at
    the same G; ``common=False`` measures every column on all it holds.

    With ``path`` the map is saved there (``<path>`` rows as JSONL, ``<path>.json`` its settings)
    and a later call with the same settings and questions reads it instead of measuring again
    (notebook 03 reads notebook 02's map); other settings raise and name the one that differs.
    A map killed on the way resumes: each branched column's groups
    (``<path>.<condition>.groups.pt``) and each measured column's Δ
    (``<path>.<condition>.delta.jsonl``) are saved as they finish, and a call with the same settings
    reads them instead of computing them again.
    """
    settings = {
        "questions": [g.question_id for g in mixed],
        "methods": list(methods),
        "fractions": [float(f) for f in fractions],
        "near_miss": near_miss,
        "lr": lr,
        "temperature": temperature,
        "max_new_tokens": max_new_tokens,
        "seed": seed,
        "beta": beta,
        "eta": eta,
        "max_tries": max_tries,
        "require_boxed": require_boxed,
        "common": common,
    }
    if path is not None and Path(path).is_file():
        return _read_map(Path(path), settings)
    unfilled: dict[str, int] = {}
    if columns is None:
        columns, unfilled = regime_groups(
            mixed,
            model,
            tokenizer,
            fractions=fractions,
            near_miss=near_miss,
            temperature=temperature,
            max_new_tokens=max_new_tokens,
            seed=seed,
            require_boxed=require_boxed,
            max_tries=max_tries,
            progress=progress,
            checkpoint=path,
        )
    held = {c: len(col) for c, col in columns.items()}
    if common:
        columns, held = common_columns(columns)
    parts, done = [], []
    for condition, column in columns.items():
        if not column:
            continue
        part_path = _part_path(path, condition, "delta.jsonl")  # this column's Δ, once measured
        part_settings = settings | {"column": [g.question_id for g in column]}
        if part_path is not None and part_path.is_file():
            meta = json.loads(_settings_path(part_path).read_text())
            if meta == part_settings:
                parts.append(pd.DataFrame(read_jsonl(part_path)))
                done.append(part_path)
                continue
        table = lld_sweep.displacement_table(
            model,
            column,
            methods=methods,
            lr=lr,
            seed=seed,
            temperature=temperature,
            beta=beta,
            eta=eta,
            progress=progress,
            desc=f"Δ(x) {condition}",
        )
        similarity = pd.DataFrame(
            [
                {"id": g.question_id, "question": _groups.source_question_id(g)}
                | group_similarity(model, g, temperature=temperature)
                for g in column
            ]
        )
        fraction = math.nan if condition == NEAR_MISS else float(condition.removeprefix("f="))
        parts.append(
            table.merge(similarity, on="id").assign(negatives=condition, fraction=fraction)
        )
        if part_path is not None:  # checkpoint: a killed map resumes after this column
            write_jsonl(part_path, parts[-1].to_dict("records"))
            write_json(_settings_path(part_path), part_settings)
            done.append(part_path)
    df = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    n_common = len(next(iter(columns.values()), []))
    df.attrs |= {"unfilled": unfilled, "held": held, "n_common": n_common, "settings": settings}
    if path is not None:
        write_jsonl(path, df.to_dict("records"))
        meta = {"settings": settings, "unfilled": unfilled, "versions": versions()}
        meta |= {"held": held, "n_common": n_common}
        write_json(_settings_path(Path(path)), meta)
        for part in done:  # the map holds them now (the branched groups stay: they cost most)
            part.unlink(missing_ok=True)
            _settings_path(part).unlink(missing_ok=True)
    return df


def _settings_path(path: Path) -> Path:
    """``<path>.json``: the settings a saved map was measured with."""
    return path.with_name(path.name + ".json")


def _read_map(path: Path, settings: dict):
    """A saved map, after checking it was measured with ``settings``."""
    meta_path = _settings_path(path)
    if not meta_path.is_file():
        raise FileNotFoundError(f"{path}: a saved regime map needs its settings file {meta_path}")
    meta = json.loads(meta_path.read_text())
    for key, wanted in settings.items():
        if meta["settings"].get(key) != wanted:
            raise ValueError(
                f"{path} was measured with {key}={meta['settings'].get(key)!r}, not {wanted!r}: "
                "delete it (and its .json) to measure again, or pass another path"
            )
    df = pd.DataFrame(read_jsonl(path))
    df.attrs |= {k: meta.get(k) for k in ("unfilled", "held", "n_common", "settings")}
    return df


def _keys(df) -> list[str]:
    """The columns that name one source question: (seed, question) when the table has seeds."""
    return ["seed", "question"] if "seed" in df.columns else ["question"]


def _strata(table) -> Any:
    """The seed of each row of a (seed, question)-indexed table, or None with one seed."""
    if "seed" not in (table.index.names or []):
        return None
    seeds = table.index.get_level_values("seed").to_numpy()
    return seeds if len(set(seeds.tolist())) > 1 else None


def _paired(part, method: str, baseline: str, value: str = "delta"):
    """(question × [method, baseline]) ``value`` (Δ) on the questions measured for both, indexed
    by _keys."""
    wide = part.pivot_table(index=_keys(part), columns="method", values=value, aggfunc="first")
    if method not in wide or baseline not in wide:
        return wide.iloc[:0, :0]
    return wide[[method, baseline]].dropna()


def _lld_counts(rule) -> Any:
    """(questions, 2): per question, its correct answers whose Δ ≤ 0, and its correct answers."""
    lists = rule["per_response_delta"].map(lambda v: np.asarray(v, dtype=np.float64))
    return np.stack([lists.map(lambda v: float((v <= 0).sum())), lists.map(len)], 1).astype(float)


def regime_summary(df, *, baseline: str = "pos_only", n_boot: int = 2000):
    """Per condition (in map order) and rule, on the questions of that condition (the common ones
    when the map was measured with ``common=True``):

    - ``n_questions``, ``mean_group_size`` and the median Δ with its bootstrap interval;
    - the paired test against ``baseline``: ``diff_mean`` = mean over questions of
      Δ_rule − Δ_baseline with its 95% interval (``diff_low``, ``diff_high``: a bootstrap that
      resamples source questions within seeds) and ``diff_resolved``; ``frac_below`` the share of
      questions where Δ_rule < Δ_baseline;
    - ``ratio_to_<baseline>`` = median Δ_rule / median Δ_baseline on the same questions with its
      interval: a description, not the test;
    - the paper's LLD measure: ``lld_rate``, the share of correct answers with Δ ≤ 0, with its
      interval (``lld_low``, ``lld_high``: questions resampled, their answers kept together), and
      ``frac_delta_le_0`` of questions;
    - ``delta_per_step``: the median of Δ / (lr · grad_norm), the rise per unit of step length
      (an SGD step moves the weights by lr · grad_norm), which compares rules whose steps differ
      in size; ``per_step_ratio_to_<baseline>``: it over the baseline's (a description, next
      to the raw ratio); and the paired test at equal step length, ``step_diff_mean`` (mean over
      questions of the rule's Δ per unit step minus the baseline's) with ``step_diff_low``,
      ``step_diff_high`` (the same bootstrap as ``diff_mean``);
    - the share of wrong tokens the rule spares (NTHR, Random) and the median resemblance (gwhes,
      shared_prefix).
    """
    rows = []
    per_step = "grad_norm" in df and "lr" in df
    if per_step:  # Δ per unit of step length, per question and rule
        df = df.assign(delta_per_unit=df["delta"] / (df["lr"] * df["grad_norm"]))
    for condition in pd.unique(df["negatives"]):
        part = df[df["negatives"] == condition]
        for method in pd.unique(part["method"]):
            rule = part[part["method"] == method].set_index(_keys(part), drop=False)
            strata = _strata(rule)
            median, low, high = bootstrap_interval(rule["delta"].to_numpy(), strata=strata)
            lld, lld_low, lld_high = bootstrap_interval(
                _lld_counts(rule), ratio_of_sums, strata=strata, n_boot=n_boot
            )
            row = {
                "negatives": condition,
                "fraction": rule["fraction"].iloc[0],
                "method": method,
                "n_questions": len(rule),
                "mean_group_size": float(rule["group_size"].mean()),
                "median_delta": median,
                "median_low": low,
                "median_high": high,
                "frac_delta_le_0": float((rule["delta"] <= 0).mean()),
                "lld_rate": lld,
                "lld_low": lld_low,
                "lld_high": lld_high,
                "spared_share": float(rule["n_selected"].sum() / rule["n_incorrect_tokens"].sum())
                if rule["n_selected"].notna().all()
                else math.nan,
                "gwhes": float(rule["gwhes"].median()),
                "shared_prefix": float(rule["shared_prefix"].median()),
            }
            if per_step:
                row["delta_per_step"] = float(np.median(rule["delta_per_unit"]))
            pairs = _paired(part, method, baseline) if method != baseline else []
            d = ratio = (math.nan,) * 3
            below = math.nan
            if len(pairs):
                diff = (pairs[method] - pairs[baseline]).to_numpy()
                d = bootstrap_interval(diff, mean, strata=_strata(pairs), n_boot=n_boot)
                ratio = bootstrap_interval(
                    pairs.to_numpy(), ratio_of_medians, strata=_strata(pairs), n_boot=n_boot
                )
                below = float((diff < 0).mean())
            row |= {
                "diff_mean": d[0],
                "diff_low": d[1],
                "diff_high": d[2],
                "diff_resolved": resolved(d[1], d[2]),
                "frac_below": below,
                f"ratio_to_{baseline}": 1.0 if method == baseline else ratio[0],
                "ratio_low": ratio[1],
                "ratio_high": ratio[2],
            }
            if per_step:  # the paired test at equal step length
                unit = _paired(part, method, baseline, "delta_per_unit") if len(pairs) else []
                step = (math.nan,) * 3
                if len(unit):
                    step = bootstrap_interval(
                        (unit[method] - unit[baseline]).to_numpy(),
                        mean,
                        strata=_strata(unit),
                        n_boot=n_boot,
                    )
                row |= {
                    "step_diff_mean": step[0],
                    "step_diff_low": step[1],
                    "step_diff_high": step[2],
                }
            rows.append(row)
    out = pd.DataFrame(rows)
    if "delta_per_step" in out:  # per condition: the rule's rise per unit step over the baseline's
        base = out[out["method"] == baseline].set_index("negatives")["delta_per_step"]
        out[f"per_step_ratio_to_{baseline}"] = out["delta_per_step"] / out["negatives"].map(base)
    return out


def regime_shift(
    df,
    *,
    method: str = "grpo",
    baseline: str = "pos_only",
    reference: str | None = None,
    n_boot: int = 2000,
):
    """Does ``method``'s position relative to ``baseline`` fall along the map, question by question?

    Per question, gap_c = Δ_method − Δ_baseline in column c; for each column other than
    ``reference`` (default: the map's first, the natural samples), the mean over the questions
    measured in both of gap_c − gap_reference, with a 95% bootstrap interval over source questions
    within seeds and ``resolved``, and ``frac_fell``, the share of those questions whose gap fell.
    A resolved negative shift says the same questions' negative gradient costs their right answers
    more once the wrong answers resemble them. One row per column.
    """
    conditions = list(pd.unique(df["negatives"]))
    reference = reference or conditions[0]
    if reference not in conditions:
        raise ValueError(f"reference={reference!r} is not a column of the map: {conditions}")
    gaps = {}
    for c in conditions:
        pairs = _paired(df[df["negatives"] == c], method, baseline)
        gaps[c] = pairs[method] - pairs[baseline]
    rows = []
    for c in conditions:
        if c == reference:
            continue
        both = pd.concat({"c": gaps[c], "ref": gaps[reference]}, axis=1).dropna()
        shift = both["c"] - both["ref"]
        est = (
            bootstrap_interval(shift.to_numpy(), mean, strata=_strata(both), n_boot=n_boot)
            if len(shift)
            else (math.nan,) * 3
        )
        rows.append(
            {
                "negatives": c,
                "reference": reference,
                "method": method,
                "baseline": baseline,
                "n_questions": len(shift),
                "shift_mean": est[0],
                "shift_low": est[1],
                "shift_high": est[2],
                "resolved": resolved(est[1], est[2]),
                "frac_fell": float((shift < 0).mean()) if len(shift) else math.nan,
            }
        )
    return pd.DataFrame(rows)


def gwhes_ranking(
    df, *, condition: str | None = None, k: int | None = None, n_boot: int = 2000, seed: int = 0
) -> dict:
    """The paper's Table 1 on the map's groups: does GWHES rank the lazy groups first?

    ``condition`` restricts it to one column (the sound reading: across columns the ranking mostly
    separates the columns, not the questions); None ranks every (column, question) group. Each
    group's laziness is Δ_PosOnly − Δ_GRPO (how much the negative gradient cost the correct
    answers). Returns the condition, n_groups, k (default n // 3), the top-k overlap of the GWHES
    and laziness rankings against a random ranking's k/n, and Spearman's rank correlation of GWHES
    with Δ_GRPO − Δ_PosOnly with a 95% bootstrap interval over source questions within seeds (the
    theory predicts it negative: more resemblance, a smaller GRPO rise).
    """
    if condition is not None:
        if condition not in set(df["negatives"]):
            raise ValueError(f"condition={condition!r} is not a column of the map")
        df = df[df["negatives"] == condition]
    index = ["negatives", *_keys(df)]
    wide = df.pivot_table(index=index, columns="method", values="delta", aggfunc="first")
    gw = df.groupby(index)["gwhes"].first()
    table = wide.join(gw).dropna(subset=["grpo", "pos_only", "gwhes"])
    gap = (table["grpo"] - table["pos_only"]).to_numpy()  # Δ_GRPO − Δ_PosOnly per group
    score = table["gwhes"].to_numpy()
    n = len(table)
    k = k or max(1, n // 3)
    rho, low, high = (
        bootstrap_interval(
            np.stack([score, gap], 1), spearman, strata=_strata(table), n_boot=n_boot, seed=seed
        )
        if n
        else (math.nan,) * 3
    )
    return {
        "condition": condition,
        "n_groups": n,
        "k": k,
        "topk_overlap": topk_overlap(score.tolist(), (-gap).tolist(), k) if n else math.nan,
        "random_overlap": random_topk_overlap_expectation(n, k) if n else math.nan,
        "spearman": rho,
        "spearman_low": low,
        "spearman_high": high,
    }
