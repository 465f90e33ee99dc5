"""GRPO vs NTHR over seeds, with ablations and held-out evaluation (notebook 05).

``run_experiment`` trains every (method, seed) into ``runs/<name>/<label>/seed<k>/`` (skipping runs
that are complete, resuming killed ones), evaluates each final model greedily on a held-out set, and
writes ``runs/<name>/results.csv`` (one row per run) and ``runs/<name>/summary.csv`` (one row per
method: mean over seeds with a t-interval, and the pooled accuracy with a Wilson interval).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from nthr_book import config as book_config
from nthr_book import reasoner, rules
from nthr_book.trainer import TrainConfig, read_metrics, task_defaults, train, training_problems

HELDOUT_SEED = (
    987_654  # arithmetic_problems seed of the held-out set (training pools use other seeds)
)


def __getattr__(name: str) -> Any:
    """``METHOD_PRESETS``: method label -> TrainConfig overrides, one per trainable rule of
    ``nthr_book.rules`` (read live). Ablations from the paper: beta in {-inf, 0, 0.1, 1}, eta."""
    if name == "METHOD_PRESETS":
        return {n: {"method": n} for n in rules.names(trainable=True)}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def method_overrides(label: str) -> dict[str, Any]:
    """TrainConfig overrides for a method label: a trainable rule of ``nthr_book.rules`` ("grpo",
    "nthr", "pos_only", "nsr", "clip_higher", ...; with the settings the rule carries, e.g.
    {"method": "clip_higher", "clip_eps_high": 0.28}, so that the run's config.json shows them),
    or ablations like "nthr_beta=-inf", "nthr_beta=0.1", "nthr_eta=p",
    "nthr_beta=0_eta=one_minus_p"."""
    presets = __getattr__("METHOD_PRESETS")
    if label in presets:
        return dict(presets[label]) | rules.get(label).settings()
    match = re.fullmatch(r"nthr(?:_beta=(?P<beta>[^_]+))?(?:_eta=(?P<eta>.+))?", label)
    if match is None or label == "nthr_":
        raise ValueError(
            f"unknown method {label!r}: use {sorted(presets)} or an ablation like "
            "'nthr_beta=0.1' / 'nthr_eta=p' / 'nthr_beta=0_eta=one_minus_p'"
        )
    out: dict[str, Any] = {"method": "nthr"}
    if match["beta"] is not None:
        out["nthr_beta"] = float(match["beta"])
    if match["eta"] is not None:
        try:
            out["nthr_eta"] = float(match["eta"])
        except ValueError:
            out["nthr_eta"] = match["eta"]
    return out


def ablation_methods(
    betas: Iterable[float] = (-math.inf, 0.0, 0.1, 1.0),
    etas: Iterable[str] = ("two_abs", "p", "one_minus_p"),
) -> list[str]:
    """The paper's ablation grid as method labels: beta sweep at eta=two_abs, eta sweep at
    beta=1, plus baselines."""
    labels = ["grpo", "pos_only"]
    labels += [f"nthr_beta={b:g}" for b in betas]
    labels += [f"nthr_eta={e}" for e in etas if e != "two_abs"]
    return labels


def heldout_problems(cfg: TrainConfig, n: int) -> list[dict]:
    """``n`` questions of the config's task disjoint (by text) from its training pool (shared by
    all seeds): arithmetic ones, or for ``task="reasoner"`` the held-out split of
    ``reasoner.problems`` (disjoint from the RL pool and the warm-up by construction)."""
    from nthr_book.data import arithmetic_problems

    seen = {p["problem"] for p in training_problems(cfg)}  # the pool is the same for every seed
    if cfg.task == "reasoner":
        pool = reasoner.problems("heldout", n, seed=HELDOUT_SEED)
    else:
        pool = arithmetic_problems(4 * n + 64, seed=HELDOUT_SEED)
    held = [p for p in pool if p["problem"] not in seen][:n]
    if len(held) < n:
        raise ValueError(
            f"could only find {len(held)} held-out questions disjoint from training, wanted {n}"
        )
    return held


# Two-sided 95% Student-t quantiles t_{0.975, df} for df = 1..10 (beyond: Cornish-Fisher expansion).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def t975(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom (table, then a 3-term
    expansion)."""
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def t_interval(values: Sequence[float]) -> tuple[float, float, float, float]:
    """(mean, std, low, high): 95% Student-t interval of the mean over seeds."""
    import numpy as np

    x = np.asarray(values, dtype=float)
    mean = float(x.mean())
    if len(x) < 2:
        return mean, math.nan, math.nan, math.nan
    std = float(x.std(ddof=1))
    half = t975(len(x) - 1) * std / math.sqrt(len(x))
    return mean, std, mean - half, mean + half


def bootstrap_interval(
    values: Sequence[float],
    statistic=None,
    *,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """(estimate, low, high): the statistic (default: the median) and its percentile-bootstrap
    interval over the values (questions, the unit of resampling), seeded so a rerun gives the same.

    Each of ``n_boot`` resamples draws ``len(values)`` values with replacement; the interval is the
    ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of the statistic over the resamples.
    ``values`` may be (n, k): paired measurements of n questions, resampled by row (e.g. the ratio
    of two methods' medians); ``statistic(x, axis)`` reduces the sample axis of (..., n) or
    (..., n, k) to one number per resample.
    """
    import numpy as np

    stat = statistic or (lambda x, axis: np.median(x, axis=axis))
    x = np.asarray(values, dtype=np.float64)
    if x.ndim not in (1, 2) or len(x) == 0:
        raise ValueError(f"bootstrap_interval: values must be non-empty, (n,) or (n, k): {x.shape}")
    if not 0 < level < 1:
        raise ValueError(f"bootstrap_interval: level={level} must lie in (0, 1)")
    estimate = float(stat(x, axis=0))
    if len(x) < 2:
        return estimate, math.nan, math.nan
    rng = np.random.default_rng(seed)
    resamples = x[rng.integers(0, len(x), size=(n_boot, len(x)))]  # (n_boot, n[, k]) by row
    stats = stat(resamples, axis=1)  # (n_boot,)
    low, high = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    return estimate, float(low), float(high)


def summarize(results: pd.DataFrame) -> pd.DataFrame:
    """Per method: mean held-out accuracy over seeds with a t-interval, pooled Wilson interval,
    LLD rate."""
    from nthr_book.evaluate import wilson_interval

    rows = []
    for method, g in results.groupby("method", sort=False):
        mean, std, low, high = t_interval(g["accuracy"].tolist())
        k, n = int(round((g["accuracy"] * g["n_eval"]).sum())), int(g["n_eval"].sum())
        wl, wh = wilson_interval(k, n)
        rows.append(
            {
                "method": method,
                "seeds": len(g),
                "accuracy_mean": mean,
                "accuracy_std": std,
                "t95_low": low,
                "t95_high": high,
                "pooled_k": k,
                "pooled_n": n,
                "pooled_wilson_low": wl,
                "pooled_wilson_high": wh,
                "train_reward_last5": g["train_reward_last5"].mean(),
                "train_reward_first5": g["train_reward_first5"].mean(),
                "lld_rate_mean": g["lld_rate_mean"].mean(),
                "selected_frac_mean": g["selected_frac_mean"].mean(),
            }
        )
    return pd.DataFrame(rows)


def paired_differences(
    results: pd.DataFrame, baseline: str = "grpo", value: str = "accuracy"
) -> pd.DataFrame:
    """Per method other than ``baseline``: the mean over seeds of (method − baseline) on ``value``,
    paired by seed (same data order and sampling seed), with its 95% Student-t interval and
    ``resolved``: whether the interval excludes 0. Seeds that only one of the two ran are left out.
    """
    table = results[results["method"] != "base"].pivot(index="seed", columns="method", values=value)
    if baseline not in table:
        raise ValueError(f"paired_differences: no {baseline!r} runs among {list(table.columns)}")
    rows = []
    for method in [m for m in table.columns if m != baseline]:
        diff = (table[method] - table[baseline]).dropna()  # (seeds run by both,)
        mean, std, low, high = t_interval(diff.tolist()) if len(diff) else (math.nan,) * 4
        rows.append(
            {
                "method": method,
                "baseline": baseline,
                "seeds": len(diff),
                "diff_mean": mean,
                "diff_std": std,
                "t95_low": low,
                "t95_high": high,
                "resolved": bool(low > 0 or high < 0),  # False when the interval is NaN
            }
        )
    return pd.DataFrame(rows)


def run_experiment(
    name: str,
    methods: Sequence[str] = ("grpo", "nthr"),
    seeds: Sequence[int] = (0, 1, 2),
    config: TrainConfig | None = None,
    *,
    n_eval: int = 64,
    eval_max_new_tokens: int | None = None,
    eval_batch_size: int = 32,
    evaluate_base: bool = True,
    progress: bool = True,
) -> pd.DataFrame:
    """Train each method and seed, evaluate on a held-out set, and return one row per run (notebook
    05).

    Runs already complete are skipped; killed runs resume from their last checkpoint; evaluations
    resume from their JSONL records. ``config`` defaults to ``TrainConfig.fast()``; its ``method``,
    ``seed`` and ``output_dir`` are set per run. Held-out evaluation (greedy, ``n_eval`` questions;
    0: none, and no accuracy columns) is on the task's own held-out questions for the arithmetic
    and reasoner tasks (``heldout_problems``); for the MATH task use ``nthr_book.evaluate`` on the
    benchmarks (notebook 06).
    """
    import torch

    from nthr_book.evaluate import evaluate
    from nthr_book.models import load_policy

    cfg = config or TrainConfig.fast()
    if not name or "/" in name:
        raise ValueError(f"name={name!r}: a non-empty folder name without '/'")
    if not seeds:
        raise ValueError("seeds must not be empty")
    if isinstance(n_eval, bool) or not isinstance(n_eval, int) or n_eval < 0:
        raise ValueError(f"n_eval must be an int >= 0, got {n_eval!r}")
    overrides = {label: method_overrides(label) for label in methods}  # validate every label first
    root = book_config.runs_dir() / name
    template, require_boxed = task_defaults(cfg)
    synthetic = cfg.task in ("arithmetic", "reasoner")  # tasks with a held-out split of their own
    held = heldout_problems(cfg, n_eval) if synthetic and n_eval else None
    max_new = eval_max_new_tokens or cfg.max_new_tokens

    def eval_model(model, tokenizer, label: str):
        if held is None:
            return None
        return evaluate(
            model,
            tokenizer,
            held,
            temperature=0.0,
            max_new_tokens=max_new,
            batch_size=eval_batch_size,
            template=template,
            require_boxed=require_boxed,
            out_dir=root / "eval",
            label=label,
            benchmark_name=f"{cfg.task}_heldout",
            progress=progress,
        )

    rows = []
    if evaluate_base and held is not None:
        model, tokenizer = load_policy(cfg.model)
        base = eval_model(model, tokenizer, "base")
        rows.append(
            {
                "method": "base",
                "seed": -1,
                "run_dir": "",
                "accuracy": base.accuracy,
                "ci_low": base.ci_low,
                "ci_high": base.ci_high,
                "n_eval": base.n,
            }
        )
        del model
    for label, over in overrides.items():
        for seed in seeds:
            run_cfg = cfg.replace(
                **over, seed=int(seed), output_dir=str(root / label / f"seed{seed}")
            )
            run_dir = train(run_cfg, resume=True, progress=progress)
            metrics = read_metrics(run_dir / "metrics.csv")
            row: dict[str, Any] = {"method": label, "seed": int(seed), "run_dir": str(run_dir)}
            row["train_reward_first5"] = float(metrics["reward_mean"].head(5).mean())
            row["train_reward_last5"] = float(metrics["reward_mean"].tail(5).mean())
            row["lld_rate_mean"] = float(metrics["lld/rate"].mean())
            # the mean change of ln π of a step's correct answers over its update
            row["lld_delta_mean"] = float(metrics["lld/delta_mean"].mean())
            row["selected_frac_mean"] = float(metrics["nthr/selected_frac"].mean())
            # how near the wrong answers were to the right ones, and how many were replaced
            for column, key in (
                ("negatives/shared_prefix", "shared_prefix_mean"),
                ("negatives/replaced", "replaced_mean"),
            ):
                if column in metrics:
                    row[key] = float(metrics[column].mean())
            if held is not None:
                model, tokenizer = load_policy(str(Path(run_dir) / "model"))
                res = eval_model(model, tokenizer, f"{label}/seed{seed}")
                row |= {
                    "accuracy": res.accuracy,
                    "ci_low": res.ci_low,
                    "ci_high": res.ci_high,
                    "n_eval": res.n,
                }
                del model
                torch.cuda.empty_cache() if torch.cuda.is_available() else None
            rows.append(row)
    results = pd.DataFrame(rows)
    root.mkdir(parents=True, exist_ok=True)
    results.to_csv(root / "results.csv", index=False)
    trained = results[results["method"] != "base"]
    if "accuracy" in trained and len(trained):
        summarize(trained).to_csv(root / "summary.csv", index=False)
    return results
