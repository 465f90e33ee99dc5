"""Train GRPO and NTHR (or any rules) over several seeds and compare them by a declared test
(notebook 05 from the shell).

A thin command line over ``nthr_book.experiments.run_experiment`` (arXiv 2505.18830, docs/method.md
§4): each method and seed trains from the same base model on the same training pool, is checkpointed
atomically (a killed run resumes) and is evaluated greedily on held-out questions disjoint from the
pool.

Declare the test before the runs: ``--primary`` is the one primary measure (``lld_delta_mean``: the
mean Δ ln π of a step's right answers over its update; ``lld_rate``: the share of them whose ln π
did not rise; ``accuracy``: held-out accuracy of the final model), ``--horizon H`` the steps
[0, H) the training measures are read over (accuracy: the model after all steps), ``--contrast``
the rule tested against GRPO (default: the first other one). The first printed line states it;
after the runs the primary comparison prints first (a training measure paired by seed with a 95%
t interval, accuracy paired by question and seed: bootstrap and McNemar), then the other rules and
measures, labelled secondary. ``--plan PILOT`` reads an earlier run's results.csv / heldout.csv and
prints what ``len(--seeds)`` seeds can resolve, without training.

    python scripts/grpo_vs_nthr.py                          # fast preset, 3 seeds, 12 steps
    python scripts/grpo_vs_nthr.py --seeds 3 4 --steps 4 --n-eval 32  # other seeds, shorter
    python scripts/grpo_vs_nthr.py --preset paper --n-eval 0 --primary lld_delta_mean  # GPU
    python scripts/grpo_vs_nthr.py --preset reasoner --steps 12 --prompts-per-step 2 \\
        --mini-batch-prompts 1 --methods grpo nthr pos_only nthr_all --primary lld_delta_mean
        # the warm-up reasoner, its own sampled negatives, two updates per rollout batch
    python scripts/grpo_vs_nthr.py --negatives near_miss --steps 20 --prompts-per-step 2 \\
        --methods grpo nthr pos_only nthr_all --primary lld_delta_mean --horizon 20
        # training where the wrong answers are near the right ones (notebook 05 §5)
    python scripts/grpo_vs_nthr.py --steps 12 --prompts-per-step 2 --mini-batch-prompts 1 ...
        # two updates per rollout batch (the paper's 32 prompts / mini-batch 16): Clip-Higher's
        # upper clip and LLDS's penalty act from the second

Prints, per run, the training measures over the horizon (reward of the first and last 5 steps, LLD
rate, mean Δ ln π, NTHR's selection, the upper clip's share, the rule's penalty, the gradient norm,
the optimizer steps per batch) and the held-out accuracy with its Wilson interval; then the declared
comparison. Writes ``runs/<name>/results.csv``, ``heldout.csv``, ``summary.csv`` and
``experiment.json``; with ``--eval-every K`` also ``curve.csv`` (held-out answers every K steps) and
prints accuracy over training per rule with each rule − GRPO per step (a description).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from nthr_book import experiments
from nthr_book.experiments import MEASURES, comparison, power_plan, run_experiment, summarize
from nthr_book.trainer import NEGATIVES, TrainConfig

PRESETS = {
    "fast": TrainConfig.fast,
    "reasoner": TrainConfig.fast_reasoner,
    "paper": TrainConfig.paper_qwen_0_5b,
}

BASELINE = "grpo"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0].replace("\n", " "),
        epilog=__doc__.split("\n\n")[2].replace("\n", " "),
    )
    p.add_argument(
        "--name", default=None, help="folder under the runs folder (default: grpo_vs_nthr_<preset>)"
    )
    p.add_argument(
        "--preset",
        choices=tuple(PRESETS),
        default="fast",
        help="fast: the embedded model on arithmetic (TrainConfig.fast); reasoner: the warm-up "
        "reasoner on worked products (TrainConfig.fast_reasoner); paper: Qwen2.5-0.5B on MATH",
    )
    p.add_argument(
        "--methods",
        nargs="+",
        default=["grpo", "nthr"],
        help="labels: grpo, nthr, pos_only, nthr_all, nsr, clip_higher, llds, ... (nthr_book.rules)"
        ", or NTHR ablations such as nthr_beta=0.1",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=None, help="override the preset's number of steps")
    p.add_argument("--prompts-per-step", type=int, default=None)
    p.add_argument(
        "--mini-batch-prompts",
        type=int,
        default=None,
        help="prompts per optimizer step (must divide the prompts per step): 1 of 2 gives two "
        "updates per rollout batch (default: the preset's; fast: one fused update)",
    )
    p.add_argument(
        "--num-iterations",
        type=int,
        default=None,
        help="passes over each rollout batch (PPO epochs; default: the preset's, 1)",
    )
    p.add_argument("--model", default=None, help="override the preset's model (e.g. tiny-random)")
    p.add_argument(
        "--n-eval", type=int, default=64, help="held-out questions of the task (0: none)"
    )
    p.add_argument("--no-base", action="store_true", help="skip evaluating the base model")
    p.add_argument(
        "--eval-every",
        type=int,
        default=0,
        help="also evaluate every run's model every K steps while it trains (accuracy over "
        "training, the paper's Figure 5: curve.csv; 0: the final model only)",
    )
    p.add_argument(
        "--negatives",
        choices=NEGATIVES,
        default=None,
        help="the wrong answers a mixed group trains on (TrainConfig.negatives; default: sampled)",
    )
    p.add_argument(
        "--branch-fraction",
        type=float,
        default=None,
        help="f of --negatives branched: the share of a correct answer a wrong one starts with",
    )
    p.add_argument(
        "--primary",
        choices=tuple(MEASURES),
        default="accuracy",
        help="the ONE primary measure, declared before the run: "
        + "; ".join(f"{k}: {v}" for k, v in MEASURES.items())
        + ". The others are reported as secondary (default: accuracy)",
    )
    p.add_argument(
        "--horizon",
        type=int,
        default=None,
        help="H: the training measures are each run's means over its steps [0, H), one horizon "
        "only (default: all steps; with --primary accuracy it must be all steps: the final model "
        "is evaluated)",
    )
    p.add_argument(
        "--contrast",
        default=None,
        help="the rule of the primary test, minus GRPO (default: the first method other than grpo)",
    )
    p.add_argument(
        "--plan",
        type=Path,
        default=None,
        metavar="PILOT",
        help="a finished run's folder (results.csv, heldout.csv): print, for each measure, the "
        "pilot's paired differences, what len(--seeds) seeds can resolve and the seeds that "
        "resolve the pilot's difference; trains nothing",
    )
    args = p.parse_args(argv)
    if BASELINE not in args.methods:
        p.error(f"--methods must include {BASELINE!r}: every rule is compared with it")
    others = [m for m in args.methods if m != BASELINE]
    if not others:
        p.error("--methods needs a rule besides grpo to compare")
    args.contrast = args.contrast or others[0]
    if args.contrast not in others:
        p.error(f"--contrast {args.contrast!r} is not among --methods {others}")
    if args.horizon is not None and args.horizon < 1:
        p.error(f"--horizon must be >= 1 step, got {args.horizon}")
    return args


def declaration(args: argparse.Namespace, steps: int) -> str:
    """The declared test, one line: the primary measure, its horizon and pairing, the secondary."""
    horizon = steps if args.horizon is None else args.horizon
    if args.primary == "accuracy":
        when = f"after {steps} steps, {args.n_eval} held-out questions, paired by question and seed"
    else:
        when = f"over steps [0, {horizon}), paired by seed"
    secondary = [m for m in MEASURES if m != args.primary]
    rest = [m for m in args.methods if m not in (BASELINE, args.contrast)]
    also = f"; {', '.join(rest)} minus {BASELINE}" if rest else ""
    return (
        f"declared test: primary = {args.primary} ({MEASURES[args.primary]}) {when}, "
        f"{args.contrast} − {BASELINE}, 95% interval; secondary: {', '.join(secondary)}{also}"
    )


def plan(args: argparse.Namespace) -> list[dict]:
    """``power_plan`` for every measure the pilot has, the primary first."""
    folder = args.plan
    results_path, heldout_path = folder / "results.csv", folder / "heldout.csv"
    if not results_path.is_file():
        raise SystemExit(f"--plan {folder}: no results.csv there")
    results = pd.read_csv(results_path)
    heldout = pd.read_csv(heldout_path) if heldout_path.is_file() else None
    plans = []
    n = len(args.seeds)
    for measure in [args.primary] + [m for m in MEASURES if m != args.primary]:
        if measure == "accuracy" and heldout is None:
            continue
        tag = "primary" if measure == args.primary else "secondary"
        for method in [args.contrast] + [
            m for m in args.methods if m not in (BASELINE, args.contrast)
        ]:
            try:
                r = power_plan(results, measure, method, BASELINE, seeds=n, heldout=heldout)
            except ValueError as err:  # a rule the pilot did not run
                print(f"{tag}: {measure}, {method} − {BASELINE}: {err}")
                continue
            plans.append(r | {"role": tag})
            pairs = "" if r["unit"] == "seeds" else f" ({r['pairs']} {r['unit']})"
            print(
                f"{tag}: {measure}, {method} − {BASELINE}: pilot {r['pilot_diff']:+.4f} "
                f"(sd {r['pilot_sd']:.4f} over {r['pilot_pairs']} {r['unit']}); {n} seeds"
                f"{pairs} resolve {r['resolvable']:.4f} with power {r['power']:.0%}; the pilot's "
                f"difference needs {r['seeds_needed']} seeds"
            )
            tag = "secondary"
    return plans


def main(argv: list[str] | None = None) -> pd.DataFrame | list[dict]:
    args = parse_args(argv)
    overrides = {
        k: v
        for k, v in (
            ("steps", args.steps),
            ("prompts_per_step", args.prompts_per_step),
            ("mini_batch_prompts", args.mini_batch_prompts),
            ("num_iterations", args.num_iterations),
            ("model", args.model),
            ("negatives", args.negatives),
            ("branch_fraction", args.branch_fraction),
        )
        if v is not None
    }
    cfg = PRESETS[args.preset](**overrides)
    if args.horizon is not None and args.horizon > cfg.steps:
        raise SystemExit(f"--horizon {args.horizon} exceeds the run's {cfg.steps} steps")
    if args.primary == "accuracy" and args.horizon not in (None, cfg.steps):
        raise SystemExit(
            f"--primary accuracy evaluates the model after all {cfg.steps} steps: "
            f"--horizon {args.horizon} would read the training measures elsewhere"
        )
    if args.primary == "accuracy" and not args.n_eval:
        raise SystemExit("--primary accuracy needs held-out questions (--n-eval > 0)")
    print(declaration(args, cfg.steps), flush=True)
    if args.plan is not None:
        return plan(args)
    name = args.name or f"grpo_vs_nthr_{args.preset}"
    results = run_experiment(
        name,
        methods=args.methods,
        seeds=args.seeds,
        config=cfg,
        n_eval=args.n_eval,
        evaluate_base=not args.no_base,
        eval_every=args.eval_every,
        horizon=args.horizon,
    )
    heldout = experiments.load_heldout(name) if args.n_eval else None
    report(results, heldout, args)
    if args.eval_every and args.n_eval:
        curve_report(experiments.load_curve(name), args)
    return results


def curve_report(curve: pd.DataFrame, args) -> None:
    """Accuracy over training per rule (mean over seeds), then each rule − GRPO per step, paired by
    question and seed: a description beside the declared test, which reads one horizon."""
    accuracy = experiments.curve_accuracy(curve)
    table = accuracy.groupby(["method", "step"])["accuracy"].mean().unstack("step")
    print("\ndescription: held-out accuracy over training steps (mean over seeds; step 0: base)")
    print(table.round(4).to_string())
    for method in [m for m in args.methods if m != BASELINE]:
        diff = experiments.curve_differences(curve, method, BASELINE)
        print(f"description: {method} − {BASELINE} per step (paired by question and seed)")
        for row in diff.itertuples():
            print(f"  step {row.step}: {row.verdict}")


def report(results: pd.DataFrame, heldout: pd.DataFrame | None, args) -> None:
    """The per-run table, the primary comparison, then the secondary ones."""
    columns = [
        c
        for c in (
            "method",
            "seed",
            "train_reward_first5",
            "train_reward_last5",
            "lld_rate_mean",
            "lld_delta_mean",
            "selected_frac_mean",
            "clip_frac_high_mean",
            "rule_penalty_mean",
            "grad_norm_mean",
            "updates_mean",
            "shared_prefix_mean",
            "replaced_mean",
            "accuracy",
            "ci_low",
            "ci_high",
            "n_eval",
        )
        if c in results
    ]
    trained = results[results["method"] != "base"]
    horizon = int(trained["horizon"].iloc[0])
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        print(f"per run (training measures over steps [0, {horizon})):")
        print(results[columns].round(4).to_string(index=False), "\n")

        def line(tag: str, measure: str, method: str) -> None:
            c = comparison(results, measure, method, BASELINE, heldout=heldout)
            per_seed = (
                " per seed " + ", ".join(f"{v:+.3f}" for v in c["per_seed"])
                if "per_seed" in c
                else ""
            )
            print(
                f"{tag}: {measure}, {method} − {BASELINE} ({c['value']:.4f} vs "
                f"{c['value_baseline']:.4f}): {c['verdict']}; {c['test']}{per_seed}"
            )

        line("PRIMARY", args.primary, args.contrast)
        others = [m for m in args.methods if m not in (BASELINE, args.contrast)]
        for method in others:
            line("secondary", args.primary, method)
        for measure in MEASURES:
            if measure == args.primary or (measure == "accuracy" and heldout is None):
                continue
            for method in [args.contrast] + others:
                line("secondary", measure, method)
        rise = trained["train_reward_last5"] - trained["train_reward_first5"]
        print(
            f"\ndescription: reward rise (last 5 - first 5 steps of [0, {horizon})): median "
            f"{rise.median():+.4f}, {int((rise > 0).sum())}/{len(rise)} runs up"
        )
        if "accuracy" in trained:
            print("description: held-out accuracy per rule (t over seeds; pooled Wilson)")
            print(summarize(trained).round(4).to_string(index=False))


if __name__ == "__main__":
    main(sys.argv[1:])
