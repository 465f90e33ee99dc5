"""GRPO vs NTHR over seeds, with ablations and held-out evaluation (notebook 05).

``run_experiment`` trains every (method, seed) into ``runs/<name>/<label>/seed<k>/`` (skipping runs
that are complete, resuming killed ones), evaluates each final model greedily on a held-out set, and
writes ``runs/<name>/results.csv`` (one row per run: its training measures over steps [0, horizon),
``run_measures``), ``runs/<name>/heldout.csv`` (one row per run and held-out question: method,
seed, question, correct), ``runs/<name>/summary.csv`` (one row per method: mean over seeds with a
t-interval, and the pooled accuracy with a Wilson interval, a description) and
``runs/<name>/experiment.json`` (methods, seeds, horizon, config, versions); with ``eval_every``,
``runs/<name>/curve.csv`` (held-out answers at every evaluated step: accuracy over training, the
paper's Figure 5, read with ``curve_accuracy`` and ``curve_differences``).

A comparison is declared before the runs (docs/method.md §7): one primary measure of ``MEASURES``
at one horizon, the others secondary. ``comparison`` tests one rule against a baseline on a
measure: the training measures paired by seed (Student-t over seeds), held-out accuracy paired by
question and seed (``stats.paired_accuracy``: a bootstrap over questions and seeds, and McNemar).
``power_plan`` reads a pilot's results and says what a number of seeds can resolve.
``heldout_answers`` grades every model of an experiment again question by question from its own
evaluation records (notebook 06).
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from nthr_book import config as book_config
from nthr_book import reasoner, rules, stats
from nthr_book.env import versions
from nthr_book.io import write_json
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


MEASURES = {
    "lld_delta_mean": "mean Δ ln π of a step's right answers over its update",
    "lld_rate": "LLD rate: share of a step's right answers whose ln π did not rise",
    "accuracy": "held-out accuracy (greedy)",
}
"""The measures a training comparison may declare primary, and what each is."""

MEASURE_COLUMNS = {"lld_delta_mean": "lld_delta_mean", "lld_rate": "lld_rate_mean"}
"""The per-run column of results.csv that holds each training measure (accuracy: heldout.csv)."""

# metrics.csv column -> results.csv column: each run's mean over steps [0, horizon)
_MEANS = {
    "lld/rate": "lld_rate_mean",
    "lld/delta_mean": "lld_delta_mean",
    "nthr/selected_frac": "selected_frac_mean",
    "clip_frac_high": "clip_frac_high_mean",
    "rule/penalty": "rule_penalty_mean",
    "grad_norm": "grad_norm_mean",
    "updates": "updates_mean",
    "negatives/shared_prefix": "shared_prefix_mean",
    "negatives/replaced": "replaced_mean",
}


def run_measures(metrics: pd.DataFrame, horizon: int) -> dict[str, float]:
    """One run's training measures over its steps [0, ``horizon``) (a run's row of results.csv).

    ``train_reward_first5`` and ``train_reward_last5``: the mean reward of the first and the last
    5 steps of the window; for each metric of ``_MEANS`` present in ``metrics``, its mean over the
    window's steps where it is defined (``lld_delta_mean`` = mean ``lld/delta_mean``; a step with no
    right answer in its update has NaN there and is left out), NaN when it is nowhere defined.
    A run of fewer than ``horizon`` steps is an error naming the horizon.
    """
    if isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1:
        raise ValueError(f"horizon must be an int >= 1 (steps), got {horizon!r}")
    window = metrics[metrics["step"] < horizon]
    if len(window) < horizon:
        raise ValueError(
            f"horizon={horizon}: the run has {len(window)} steps; read it over at most that many"
        )
    row = {
        "horizon": horizon,
        "train_reward_first5": float(window["reward_mean"].head(5).mean()),
        "train_reward_last5": float(window["reward_mean"].tail(5).mean()),
    }
    for column, key in _MEANS.items():
        if column in window:
            row[key] = float(window[column].mean())  # NaN steps skipped
    return row


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


_SUMMARY_EXTRAS = (
    "lld_delta_mean",
    "clip_frac_high_mean",
    "rule_penalty_mean",
    "grad_norm_mean",
    "updates_mean",
)


def summarize(results: pd.DataFrame) -> pd.DataFrame:
    """Per method: mean held-out accuracy over seeds with a t-interval, pooled Wilson interval (a
    description: comparisons pair the rules, ``comparison``), LLD rate, and the means over seeds of
    the other training measures the runs have (``_SUMMARY_EXTRAS``: grad norm, upper clip, ...)."""
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
            # the other training measures, where the runs have them (means over seeds)
            | {c: g[c].mean() for c in _SUMMARY_EXTRAS if c in g}
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
    eval_every: int = 0,
    horizon: int | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Train each method and seed, evaluate on a held-out set, and return one row per run (notebook
    05).

    Each run's training measures are read over its steps [0, ``horizon``) (``run_measures``;
    None: all ``config.steps``), the one horizon the comparison declared; the held-out accuracy is
    the final model's. ``heldout.csv`` beside ``results.csv`` has each run's answer per question.
    ``eval_every`` > 0 also evaluates each run's model every that many steps while it trains
    (generation forks the RNG, so the run is the one it would be without) and writes ``curve.csv``:
    one row per method, seed, step and question, step 0 being the base model every run starts from
    and the last step the final model (accuracy over training, the paper's Figure 5).

    Runs already complete are skipped; killed runs resume from their last checkpoint; evaluations
    resume from their JSONL records. ``config`` defaults to ``TrainConfig.fast()``; its ``method``,
    ``seed`` and ``output_dir`` are set per run. Held-out evaluation (greedy, ``n_eval`` questions;
    0: none, and no accuracy columns) is on the task's own held-out questions for the arithmetic
    and reasoner tasks (``heldout_problems``); for the MATH task use ``nthr_book.evaluate`` on the
    benchmarks (notebook 06).
    """
    import torch

    from nthr_book.evaluate import evaluate, saved_answers
    from nthr_book.models import load_policy

    cfg = config or TrainConfig.fast()
    if not name or "/" in name:
        raise ValueError(f"name={name!r}: a non-empty folder name without '/'")
    if not seeds:
        raise ValueError("seeds must not be empty")
    if isinstance(n_eval, bool) or not isinstance(n_eval, int) or n_eval < 0:
        raise ValueError(f"n_eval must be an int >= 0, got {n_eval!r}")
    if isinstance(eval_every, bool) or not isinstance(eval_every, int) or eval_every < 0:
        raise ValueError(
            f"eval_every must be an int >= 0 (0: the final model only), got {eval_every!r}"
        )
    horizon = cfg.steps if horizon is None else horizon
    if isinstance(horizon, bool) or not isinstance(horizon, int) or not 1 <= horizon <= cfg.steps:
        raise ValueError(f"horizon must be an int in [1, steps={cfg.steps}], got {horizon!r}")
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

    rows, answers, curve = [], [], []
    records_name = f"{cfg.task}_heldout.jsonl"  # evaluate's file under <eval>/<label>/
    curve_steps = list(range(eval_every, cfg.steps, eval_every)) if eval_every else []

    def graded(res, label: str, seed: int) -> None:  # heldout.csv: one row per question
        answers.extend(
            {"method": label, "seed": seed, "question": q, "correct": int(round(c))}
            for q, c in res.per_problem.items()
        )

    def evaluate_while_training(label: str, seed: int, final: bool):
        """train()'s model, tokenizer and callbacks that evaluate it at ``curve_steps`` (and at
        the last step when ``final``: a run that saves no model is evaluated in memory)."""
        model, tokenizer = load_policy(cfg.model)

        def at_step(step: int, row: dict) -> None:
            if step + 1 in curve_steps:
                eval_model(model, tokenizer, f"{label}/seed{seed}/step{step + 1}")
            if final and step + 1 == cfg.steps:
                eval_model(model, tokenizer, f"{label}/seed{seed}")

        return {"model": model, "tokenizer": tokenizer, "callbacks": [at_step]}

    def final_in_memory(label: str, seed: int, run_dir: Path, while_training: dict):
        """The final evaluation of a run that kept no weights: made by the last step's callback,
        so its records are complete; ``evaluate`` then reads them back (no generation)."""
        _check_records_of_weightless_run(
            run_dir,
            root / "eval" / label / f"seed{seed}" / records_name,
            len(held),
            "delete both to train the run again, or train with save_model=True",
        )
        return eval_model(
            while_training["model"], while_training["tokenizer"], f"{label}/seed{seed}"
        )

    def add_to_curve(label: str, seed: int, step: int, per_problem: dict) -> None:
        curve.extend(
            {"method": label, "seed": seed, "step": step, "question": q, "correct": c}
            for q, c in per_problem.items()
        )

    if evaluate_base and held is not None:
        model, tokenizer = load_policy(cfg.model)
        base = eval_model(model, tokenizer, "base")
        graded(base, "base", -1)
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
            # a run that keeps no weights is evaluated in memory (one saved earlier: from disk)
            in_memory = (
                held is not None
                and not run_cfg.save_model
                and not (run_cfg.run_dir() / "model").exists()
            )
            while_training = (
                evaluate_while_training(label, int(seed), final=in_memory)
                if held is not None and (curve_steps or in_memory)
                else {}
            )
            run_dir = train(run_cfg, resume=True, progress=progress, **while_training)
            metrics = read_metrics(run_dir / "metrics.csv")
            row: dict[str, Any] = {"method": label, "seed": int(seed), "run_dir": str(run_dir)}
            # the training measures over steps [0, horizon): LLD rate, mean Δ ln π of the right
            # answers, NTHR's selection, the upper clip, the rule's penalty, the gradient norm
            row |= run_measures(metrics, horizon)
            if held is not None:
                if in_memory:
                    res = final_in_memory(label, int(seed), run_dir, while_training)
                else:
                    model, tokenizer = load_policy(str(Path(run_dir) / "model"))
                    res = eval_model(model, tokenizer, f"{label}/seed{seed}")
                    del model
                while_training.clear()  # the model in it is trained
                graded(res, label, int(seed))
                if eval_every:
                    if evaluate_base:
                        add_to_curve(label, int(seed), 0, base.per_problem)
                    for k in curve_steps:  # read back, so a finished run reused costs nothing
                        path = root / "eval" / label / f"seed{seed}" / f"step{k}" / records_name
                        scores = saved_answers(path)
                        if len(scores) < len(held):
                            warnings.warn(
                                f"{path}: {len(scores)} of {len(held)} questions evaluated (the "
                                f"run resumed past step {k}); step {k} is left out of curve.csv",
                                stacklevel=2,
                            )
                            continue
                        add_to_curve(label, int(seed), k, scores)
                    add_to_curve(label, int(seed), run_cfg.steps, res.per_problem)
                row |= {
                    "accuracy": res.accuracy,
                    "ci_low": res.ci_low,
                    "ci_high": res.ci_high,
                    "n_eval": res.n,
                }
                torch.cuda.empty_cache() if torch.cuda.is_available() else None
            rows.append(row)
    results = pd.DataFrame(rows)
    root.mkdir(parents=True, exist_ok=True)
    results.to_csv(root / "results.csv", index=False)
    if held is not None:
        heldout = pd.DataFrame(answers, columns=["method", "seed", "question", "correct"])
        heldout.to_csv(root / "heldout.csv", index=False)
    else:  # no evaluation this time: an earlier call's answers would not match results.csv
        (root / "heldout.csv").unlink(missing_ok=True)
    if curve:
        pd.DataFrame(curve).to_csv(root / "curve.csv", index=False)
    else:
        (root / "curve.csv").unlink(missing_ok=True)
    experiment = {
        "methods": list(methods),
        "seeds": [int(s) for s in seeds],
        "horizon": horizon,
        "n_eval": n_eval,
        "eval_every": eval_every,
        "config": cfg.to_dict(),
        "versions": versions(),
    }
    write_json(root / "experiment.json", experiment)
    trained = results[results["method"] != "base"]
    if "accuracy" in trained and len(trained):
        summarize(trained).to_csv(root / "summary.csv", index=False)
    return results


# ---------------------------------------------------------------------------------------------
# The declared comparison and its power
# ---------------------------------------------------------------------------------------------


def load_heldout(name: str) -> pd.DataFrame:
    """``runs/<name>/heldout.csv`` (method, seed, question, correct), from ``run_experiment``."""
    path = book_config.runs_dir() / name / "heldout.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: run_experiment({name!r}, n_eval > 0) writes it")
    return pd.read_csv(path)


def load_curve(name: str) -> pd.DataFrame:
    """``runs/<name>/curve.csv`` (method, seed, step, question, correct), from ``run_experiment``
    with ``eval_every`` > 0."""
    path = book_config.runs_dir() / name / "curve.csv"
    if not path.exists():
        raise FileNotFoundError(f"{path}: run_experiment({name!r}, eval_every > 0) writes it")
    return pd.read_csv(path)


def curve_accuracy(curve: pd.DataFrame) -> pd.DataFrame:
    """Held-out accuracy per method, seed and step (the mean over questions): a frame that
    ``viz.plot_training_curves(..., metrics=("accuracy",))`` draws as the paper's Figure 5."""
    return (
        curve.groupby(["method", "seed", "step"], as_index=False)["correct"]
        .mean()
        .rename(columns={"correct": "accuracy"})
    )


def curve_differences(
    curve: pd.DataFrame, method: str, baseline: str = "grpo", *, n_boot: int = 2000
) -> pd.DataFrame:
    """``method`` − ``baseline`` held-out accuracy at every evaluated step, paired by question and
    seed as ``comparison`` pairs the final one (``stats.paired_accuracy``): step, estimate, low,
    high, resolved, verdict. Step 0 is the shared base model (a difference of 0 by construction) and
    is left out. Reading one step of many is a description; the declared test is the final step's.
    """
    rows = []
    for step, at_step in curve[curve["step"] > 0].groupby("step", sort=True):
        r = stats.paired_accuracy(at_step, method, baseline, n_boot=n_boot)
        rows.append(
            {
                "step": int(step),
                "estimate": r["diff"],
                "low": r["low"],
                "high": r["high"],
                "resolved": r["resolved"],
                "verdict": stats.verdict(r["diff"], r["low"], r["high"]),
            }
        )
    return pd.DataFrame(rows)


def _check_measure(measure: str) -> None:
    if measure not in MEASURES:
        raise ValueError(f"measure={measure!r}: expected one of {sorted(MEASURES)}")


def _per_seed_differences(
    results: pd.DataFrame, measure: str, method: str, baseline: str
) -> pd.Series:
    """(seeds,) method − baseline on a training measure, paired by seed (seeds both ran)."""
    column = MEASURE_COLUMNS[measure]
    trained = results[results["method"] != "base"]
    for name in (method, baseline):
        if name not in set(trained["method"]):
            raise ValueError(f"no {name!r} runs among {sorted(set(trained['method']))}")
    table = trained.pivot(index="seed", columns="method", values=column)
    return (table[method] - table[baseline]).dropna()


def comparison(
    results: pd.DataFrame,
    measure: str,
    method: str,
    baseline: str = "grpo",
    *,
    heldout: pd.DataFrame | None = None,
    n_boot: int = 2000,
) -> dict[str, Any]:
    """``method`` − ``baseline`` on one measure of ``MEASURES``, paired, with its 95% interval and
    ``stats.verdict``'s sentence.

    A training measure (``results``' per-run column ``MEASURE_COLUMNS[measure]``) is paired by
    seed: ``stats.paired_differences``, a Student-t interval over the seeds. Held-out accuracy is
    paired by question and seed (``heldout``: heldout.csv): ``stats.paired_accuracy``, a bootstrap
    that resamples seeds and questions, and McNemar's exact test on the (seed, question) pairs.
    Returns measure, method, baseline, seeds, estimate, low, high, resolved, test (how it was
    paired) and verdict; for accuracy also both accuracies and McNemar's counts and p-value.
    """
    _check_measure(measure)
    out: dict[str, Any] = {"measure": measure, "method": method, "baseline": baseline}
    if measure == "accuracy":
        if heldout is None:
            raise ValueError(
                "comparison: held-out accuracy is paired by question and seed: pass heldout= "
                "(runs/<name>/heldout.csv, experiments.load_heldout)"
            )
        r = stats.paired_accuracy(heldout, method, baseline, n_boot=n_boot)
        out |= {
            "seeds": r["seeds"],
            "estimate": r["diff"],
            "low": r["low"],
            "high": r["high"],
            "resolved": r["resolved"],
            "test": f"paired by question and seed: bootstrap over {r['questions']} questions and "
            f"{r['seeds']} seeds; McNemar p = {r['mcnemar_p']:.3g} "
            f"({r['only_method']} vs {r['only_baseline']} answers right for one rule only)",
            "value": r["accuracy"],
            "value_baseline": r["accuracy_baseline"],
            "only_method": r["only_method"],
            "only_baseline": r["only_baseline"],
            "mcnemar_p": r["mcnemar_p"],
        }
    else:
        diff = _per_seed_differences(results, measure, method, baseline)  # checks both ran
        column = MEASURE_COLUMNS[measure]
        trained = results[results["method"].isin([method, baseline])]
        paired = stats.paired_differences(trained, baseline=baseline, value=column).iloc[0]
        means = trained[trained["seed"].isin(diff.index)].groupby("method")[column].mean()
        out |= {
            "seeds": int(paired["seeds"]),
            "estimate": float(paired["diff_mean"]),
            "low": float(paired["t95_low"]),
            "high": float(paired["t95_high"]),
            "resolved": bool(paired["resolved"]),
            "test": f"paired by seed: 95% Student-t over {int(paired['seeds'])} seeds",
            "value": float(means[method]),
            "value_baseline": float(means[baseline]),
            "per_seed": [float(v) for v in diff],
        }
    out["verdict"] = stats.verdict(out["estimate"], out["low"], out["high"])
    return out


def power_plan(
    results: pd.DataFrame | None,
    measure: str,
    method: str,
    baseline: str = "grpo",
    *,
    seeds: int,
    heldout: pd.DataFrame | None = None,
    power: float = 0.8,
) -> dict[str, Any]:
    """What a run of ``seeds`` seeds can resolve on ``measure`` (method − baseline), from a pilot.

    A training measure: the pilot's per-seed differences (paired by seed; ``results``, its
    results.csv): their mean and sd (ddof=1, at least 2 seeds); ``resolvable`` is
    ``stats.resolvable_difference(sd, seeds, power)``, the smallest true difference a 95% t
    interval over ``seeds`` seeds excludes 0 for with probability ``power``, and ``seeds_needed``
    ``stats.pairs_needed(sd, mean, power)``, the seeds that resolve the pilot's difference.
    Accuracy: the per-(seed, question) differences of ``heldout`` (each −1, 0 or 1), taken as
    independent pairs: n = seeds × questions, and ``seeds_needed`` = ⌈pairs_needed / questions⌉.
    That ignores a seed-to-seed spread in accuracy, which the bootstrap over seeds adds: the
    accuracy numbers are a lower bound on what the run needs. ``seeds_needed`` is inf when the
    pilot's difference is 0.
    """
    _check_measure(measure)
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 2:
        raise ValueError(f"seeds must be an int >= 2, got {seeds!r}")
    out: dict[str, Any] = {"measure": measure, "method": method, "baseline": baseline}
    if measure == "accuracy":
        if heldout is None:
            raise ValueError("power_plan: accuracy needs the pilot's heldout.csv (heldout=)")
        wide = heldout[heldout["method"].isin([method, baseline])].pivot_table(
            index=["seed", "question"], columns="method", values="correct", aggfunc="first"
        )
        for name in (method, baseline):
            if name not in wide:
                raise ValueError(f"power_plan: no held-out answers of {name!r}")
        d = (wide[method] - wide[baseline]).dropna().to_numpy(dtype=float)  # (seed, question)
        questions = wide.index.get_level_values("question").nunique()
        n_pilot, n_plan, unit = len(d), seeds * questions, "(seed, question) pairs"
    else:
        d = _per_seed_differences(results, measure, method, baseline).to_numpy(dtype=float)
        questions, n_pilot, n_plan, unit = None, len(d), seeds, "seeds"
    if n_pilot < 2:
        raise ValueError(f"power_plan: the pilot has {n_pilot} paired {unit}; need at least 2")
    mean_, sd = float(d.mean()), float(d.std(ddof=1))
    needed = stats.pairs_needed(sd, mean_, power) if sd > 0 else 2
    exceeded = needed > 100_000
    if questions is not None and not exceeded:
        needed = math.ceil(needed / questions)
    out |= {
        "unit": unit,
        "pilot_pairs": n_pilot,
        "pilot_diff": mean_,
        "pilot_sd": sd,
        "seeds": seeds,
        "pairs": n_plan,
        "power": power,
        "resolvable": stats.resolvable_difference(sd, n_plan, power),
        "seeds_needed": math.inf if exceeded else max(int(needed), 2),
    }
    return out


def _check_records_of_weightless_run(run_dir, records: Path, n_questions: int, remedy: str) -> None:
    """A run that kept no weights (``save_model=False``) was answered in memory as it trained:
    its records are all there is, so short ones must not be completed by other weights."""
    from nthr_book.evaluate import saved_answers

    n_answered = len(saved_answers(records))
    if n_answered < n_questions:
        raise ValueError(
            f"{run_dir} finished without its model (save_model=False) and {records} holds "
            f"{n_answered} of {n_questions} answers: {remedy}"
        )


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
    benchmark = f"{cfg.task}_heldout"  # the records' name, as run_experiment wrote them
    models: dict[str, str] = {}
    if (results["method"] == "base").any():
        models["base"] = cfg.model
    for run in runs.itertuples():
        label = f"{run.method}/seed{run.seed}"
        weights = Path(run.run_dir) / "model"
        if weights.exists():
            models[label] = str(weights)
            continue
        # save_model=False: answered in memory as it trained; the records are all there is, and
        # the base model (the name they were made under) only reads them back
        _check_records_of_weightless_run(
            run.run_dir,
            root / "eval" / label / f"{benchmark}.jsonl",
            len(held),
            f"run run_experiment({name!r}, ...) again to finish them",
        )
        models[label] = cfg.model
    first = root / "eval" / next(iter(models)) / f"{benchmark}.settings.json"
    settings = json.loads(first.read_text())["settings"]
    evaluated = evaluate_suite(
        models,
        {benchmark: held},
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
