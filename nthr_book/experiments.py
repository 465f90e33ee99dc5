"""GRPO vs NTHR over seeds, with ablations and held-out evaluation (notebook 05).

``run_experiment`` trains every (method, seed) into ``runs/<name>/<label>/seed<k>/`` (skipping runs
that are complete, resuming killed ones), evaluates each final model greedily on a held-out set, and
writes ``runs/<name>/results.csv`` (one row per run) and ``runs/<name>/summary.csv`` (one row per
method: mean over seeds with a t-interval, and the pooled accuracy with a Wilson interval).
``heldout_answers`` reads an experiment back question by question (notebook 06's paired
comparison).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from nthr_book import config as book_config
from nthr_book import rules
from nthr_book.stats import t_interval, wilson_interval
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
    """``n`` arithmetic questions disjoint (by text) from the config's training pool (shared by
    all seeds)."""
    from nthr_book.data import arithmetic_problems

    seen = {p["problem"] for p in training_problems(cfg)}  # the pool is the same for every seed
    pool = arithmetic_problems(4 * n + 64, seed=HELDOUT_SEED)
    held = [p for p in pool if p["problem"] not in seen][:n]
    if len(held) < n:
        raise ValueError(
            f"could only find {len(held)} held-out questions disjoint from training, wanted {n}"
        )
    return held


def summarize(results: pd.DataFrame) -> pd.DataFrame:
    """Per method: mean held-out accuracy over seeds with a t-interval, pooled Wilson interval,
    LLD rate."""
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
    ``seed`` and ``output_dir`` are set per run. Held-out evaluation is on arithmetic for the
    arithmetic task (greedy) on ``n_eval`` questions (0: none, and no accuracy columns); for the
    MATH task use ``nthr_book.evaluate`` on the benchmarks (notebook 06).
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
    held = heldout_problems(cfg, n_eval) if cfg.task == "arithmetic" and n_eval else None
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
            benchmark_name="arithmetic_heldout",
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


def heldout_answers(
    name: str, *, batch_size: int = 32, progress: bool = False, log: Any = None
) -> tuple[pd.DataFrame, dict[str, Any], list[dict]]:
    """Every model of ``run_experiment(name)`` graded question by question on its held-out set
    (notebook 06): ``(correct, results, problems)``.

    Reads ``runs/<name>/results.csv`` for the runs (the base model, each method and seed) and the
    settings of their evaluation records, and evaluates each model with ``evaluate_suite`` under
    those settings into the same records: what ``run_experiment`` wrote is reused, so nothing is
    generated when the records are complete (a missing answer is generated and appended).
    ``correct`` has one row per graded answer, columns ``method``, ``seed`` (-1 for the base
    model), ``question`` and ``correct`` (0/1), as ``stats.paired_accuracy`` takes them;
    ``results`` maps each label ("base", "grpo/seed0", ...) to its ``EvalResult``; ``problems``
    are the held-out questions (``heldout_problems`` of the experiment's config). Raises
    FileNotFoundError when the experiment has not run and ValueError when it evaluated no
    held-out set (``n_eval=0``, or the MATH task).
    """
    from nthr_book.evaluate import evaluate_suite

    root = book_config.runs_dir() / name
    path = root / "results.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run run_experiment({name!r}, ...) first")
    results = pd.read_csv(path)
    if "accuracy" not in results or results["accuracy"].isna().all():
        raise ValueError(f"{name}: its runs were not evaluated on held-out questions (n_eval=0)")
    runs = results[results["method"] != "base"]
    saved = json.loads((Path(runs["run_dir"].iloc[0]) / "config.json").read_text())
    cfg = TrainConfig.from_dict(saved["config"])
    held = heldout_problems(cfg, int(results["n_eval"].dropna().iloc[0]))
    models: dict[str, str] = {}
    if (results["method"] == "base").any():
        models["base"] = cfg.model
    for run in runs.itertuples():
        models[f"{run.method}/seed{run.seed}"] = str(Path(run.run_dir) / "model")
    first = root / "eval" / next(iter(models)) / "arithmetic_heldout.settings.json"
    settings = json.loads(first.read_text())["settings"]
    evaluated = evaluate_suite(
        models,
        {"arithmetic_heldout": held},
        log=log,
        out_dir=root / "eval",
        **{k: settings[k] for k in ("n_samples", "temperature", "max_new_tokens", "seed")},
        template=settings["template"],
        require_boxed=settings["require_boxed"],
        batch_size=batch_size,
        progress=progress,
    )
    rows = []
    for res in evaluated:
        method, _, seed = res.label.partition("/seed")
        for question, score in res.per_problem.items():
            rows.append(
                {
                    "method": method,
                    "seed": int(seed) if seed else -1,
                    "question": question,
                    "correct": score,
                }
            )
    return pd.DataFrame(rows), {res.label: res for res in evaluated}, held
