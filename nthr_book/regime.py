"""The regime map of LLD: Δ(x) as the wrong answers go from unlike the right ones to nearly alike.

The paper explains LLD by how much a question's wrong answers resemble its right ones (Theorem 4.4,
GWHES, Table 1). The map measures that on the model's own samples. For each mixed group and a
fraction f, ``groups.branched_group`` replaces every wrong answer by a correct answer's first
floor(f·L) tokens and the model's own wrong continuation: f = 0 is natural sampling, f → 1 nears
the constructed near-miss negatives (``groups.near_miss_group``, the last column of the map). On
every condition the same update rules are measured by Δ(x) (``lld.displacement_table``), next to the
measured resemblance of right and wrong answers: GWHES (``similarity.gwhes_question``) and the share
of a wrong answer that repeats a right one from its start (``similarity.shared_prefix_share``).

``regime_map`` builds the table (one row per condition, question and rule), ``regime_summary`` reads
it per condition and rule (median Δ and the ratio to Pos Only with bootstrap intervals over
questions, the LLD rate, the share of wrong tokens NTHR spares), and ``gwhes_ranking`` asks the
paper's Table 1 question on these groups. Notebooks 02 and 03; ``scripts/lld_displacement.py --map``
runs it at full size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nthr_book import groups as _groups
from nthr_book import lld
from nthr_book.groups import Group

__all__ = [
    "DEFAULT_FRACTIONS",
    "MAP_METHODS",
    "NEAR_MISS",
    "condition_label",
    "gwhes_ranking",
    "group_similarity",
    "regime_groups",
    "regime_map",
    "regime_summary",
    "spearman",
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
) -> tuple[dict[str, list[Group]], dict[str, int]]:
    """({condition: groups}, {condition: groups that could not be filled}) for the map's columns.

    ``mixed`` are the natural mixed groups; each fraction's column holds their branched versions
    (f = 0: the groups themselves), and ``near_miss`` adds the constructed column. A wrong answer
    the model could not be made to get wrong after its correct start is dropped from its group
    (``groups.branched_group(partial=True)``; the summary's ``mean_group_size`` shows how many),
    and a question with none left leaves the column (counted), so columns may differ in size.
    """
    columns: dict[str, list[Group]] = {}
    unfilled: dict[str, int] = {}
    for f in fractions:
        columns[condition_label(f)], unfilled[condition_label(f)] = _groups.branched_groups(
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
    if near_miss:
        columns[NEAR_MISS] = [_groups.near_miss_group(g, tokenizer) for g in mixed]
        unfilled[NEAR_MISS] = 0
    return columns, unfilled


def group_similarity(
    model: nn.Module, group: Group, *, temperature: float, share_prompt: bool = True
) -> dict[str, float]:
    """How much a group's wrong answers resemble its right ones: ``gwhes`` (the paper's score over
    the full vocabulary, mean over the correct answers) and ``shared_prefix`` (the mean share of a
    wrong answer that repeats a correct one from its start)."""
    from nthr_book.grpo import head_logits
    from nthr_book.similarity import gwhes_question, shared_prefix_share

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
    path: str | Path | None = None,
    progress: bool = True,
):
    """The map as a DataFrame: one row per condition, question and rule.

    Columns: those of ``lld.displacement_table`` (id, method, delta, per_response_delta,
    n_selected, n_incorrect_tokens, ...), then ``negatives`` (the condition: "f=0.50" or
    "near-miss"), ``fraction`` (NaN for near-miss), ``question`` (the natural group's id, the same
    in every column) and the group's ``gwhes`` and ``shared_prefix``. Pass ``columns`` (from
    ``regime_groups``) to measure other rules on the same branched groups without sampling them
    again; ``df.attrs["unfilled"]`` counts the questions each column could not fill.

    With ``path`` the map is saved there (``<path>`` rows as JSONL, ``<path>.json`` its settings)
    and a later call with the same settings and questions reads it instead of measuring again
    (notebook 03 reads notebook 02's map); other settings raise and name the one that differs.
    """
    import pandas as pd

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
        )
    parts = []
    for condition, column in columns.items():
        if not column:
            continue
        table = lld.displacement_table(
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
    df = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    df.attrs["unfilled"] = unfilled
    df.attrs["settings"] = settings
    if path is not None:
        from nthr_book.env import versions
        from nthr_book.io import write_json, write_jsonl

        write_jsonl(path, df.to_dict("records"))
        meta = {"settings": settings, "unfilled": unfilled, "versions": versions()}
        write_json(_settings_path(Path(path)), meta)
    return df


def _settings_path(path: Path) -> Path:
    """``<path>.json``: the settings a saved map was measured with."""
    return path.with_name(path.name + ".json")


def _read_map(path: Path, settings: dict):
    """A saved map, after checking it was measured with ``settings``."""
    import json

    import pandas as pd

    from nthr_book.io import read_jsonl

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
    df.attrs["unfilled"], df.attrs["settings"] = meta["unfilled"], meta["settings"]
    return df


def _ratio_of_medians(x: Any, axis: int) -> Any:
    """median(column 0) / median(column 1) along the sample axis (paired rows)."""
    import numpy as np

    return np.median(x[..., 0], axis=axis) / np.median(x[..., 1], axis=axis)


def regime_summary(df, *, baseline: str = "pos_only"):
    """Per condition (in map order) and rule: n_questions, median Δ with its 95% bootstrap interval
    over questions, the ratio median Δ_rule / median Δ_baseline on the same questions with its
    interval (questions resampled in pairs), frac_delta_le_0, lld_rate, the share of wrong tokens
    the rule spares (NTHR, Random) and the median resemblance (gwhes, shared_prefix)."""
    import pandas as pd

    from nthr_book.experiments import bootstrap_interval

    rows = []
    for condition in pd.unique(df["negatives"]):
        part = df[df["negatives"] == condition]
        wide = part.pivot_table(index="question", columns="method", values="delta", aggfunc="first")
        for method in pd.unique(part["method"]):
            rule = part[part["method"] == method]
            median, low, high = bootstrap_interval(rule["delta"].to_numpy())
            row = {
                "negatives": condition,
                "fraction": rule["fraction"].iloc[0],
                "method": method,
                "n_questions": len(rule),
                "median_delta": median,
                "median_low": low,
                "median_high": high,
                "mean_group_size": float(rule["group_size"].mean()),  # < G: slots left unfilled
                "frac_delta_le_0": float((rule["delta"] <= 0).mean()),
                "lld_rate": lld.lld_rate(rule["per_response_delta"]),
                "spared_share": float(rule["n_selected"].sum() / rule["n_incorrect_tokens"].sum())
                if rule["n_selected"].notna().all()
                else math.nan,
                "gwhes": float(rule["gwhes"].median()),
                "shared_prefix": float(rule["shared_prefix"].median()),
            }
            ratio = (math.nan,) * 3
            if baseline in wide.columns:
                pairs = wide[[method, baseline]].dropna().to_numpy()
                if len(pairs):
                    ratio = bootstrap_interval(pairs, _ratio_of_medians)
            row |= dict(zip(("ratio_to_" + baseline, "ratio_low", "ratio_high"), ratio))
            rows.append(row)
    return pd.DataFrame(rows)


def spearman(x: Any, axis: int) -> Any:
    """Spearman's rank correlation of the two columns of (..., n, 2) paired values along the sample
    ``axis`` (-2 or its positive index): the Pearson correlation of their average ranks (ties, as
    in a bootstrap resample, share the mean of their ranks)."""
    import numpy as np

    x = np.moveaxis(np.asarray(x, dtype=np.float64), axis, -2)  # (..., n, 2)
    below = (x[..., None, :, :] < x[..., :, None, :]).sum(-2)  # (..., n, 2) values below each
    equal = (x[..., None, :, :] == x[..., :, None, :]).sum(-2)  # (..., n, 2) itself included
    ranks = below + (equal + 1) / 2  # (..., n, 2) average 1-based ranks
    ranks = ranks - ranks.mean(-2, keepdims=True)
    cov = (ranks[..., 0] * ranks[..., 1]).sum(-1)
    return cov / np.sqrt((ranks[..., 0] ** 2).sum(-1) * (ranks[..., 1] ** 2).sum(-1))


def gwhes_ranking(df, *, k: int | None = None, n_boot: int = 2000, seed: int = 0) -> dict:
    """The paper's Table 1 on the map's groups: does GWHES rank the lazy groups first?

    Each (condition, question) is one group; its laziness is Δ_PosOnly − Δ_GRPO (how much the
    negative gradient cost the correct answers). Returns n_groups, k (default n // 3), the top-k
    overlap of the GWHES and laziness rankings against a random ranking's k/n, and Spearman's rank
    correlation of GWHES with Δ_GRPO − Δ_PosOnly with a 95% bootstrap interval over groups (the
    theory predicts it negative: more resemblance, a smaller GRPO rise).
    """
    import numpy as np

    from nthr_book.experiments import bootstrap_interval
    from nthr_book.similarity import random_topk_overlap_expectation, topk_overlap

    wide = df.pivot_table(
        index=["negatives", "question"], columns="method", values="delta", aggfunc="first"
    )
    gw = df.groupby(["negatives", "question"])["gwhes"].first()
    table = wide.join(gw).dropna(subset=["grpo", "pos_only", "gwhes"])
    gap = (table["grpo"] - table["pos_only"]).to_numpy()  # Δ_GRPO − Δ_PosOnly per group
    score = table["gwhes"].to_numpy()
    n = len(table)
    k = k or max(1, n // 3)

    rho, low, high = bootstrap_interval(
        np.stack([score, gap], 1), spearman, n_boot=n_boot, seed=seed
    )
    return {
        "n_groups": n,
        "k": k,
        "topk_overlap": topk_overlap(score.tolist(), (-gap).tolist(), k) if n else math.nan,
        "random_overlap": random_topk_overlap_expectation(n, k) if n else math.nan,
        "spearman": rho,
        "spearman_low": low,
        "spearman_high": high,
    }
