"""Train GRPO and NTHR over several seeds and compare held-out accuracy (notebook 05 from the
shell).

A thin command line over ``nthr_book.experiments.run_experiment`` (arXiv 2505.18830, docs/method.md
§4): each method and seed trains from the same base model on the same training pool, is checkpointed
atomically (a killed run resumes) and is evaluated greedily on held-out questions disjoint from the
pool.

    python scripts/grpo_vs_nthr.py                          # fast preset, 3 seeds, 12 steps
    python scripts/grpo_vs_nthr.py --seeds 3 4 --steps 4 --n-eval 32  # other seeds, shorter
    python scripts/grpo_vs_nthr.py --preset paper --n-eval 0  # the paper's 0.5B run (GPU)
    python scripts/grpo_vs_nthr.py --negatives near_miss --steps 20 --prompts-per-step 2
        # training where the wrong answers are near the right ones (notebook 05 §5)

Prints, per run, the mean training reward over the first and the last 5 steps, the mean LLD rate,
the selection fraction and the held-out accuracy with its Wilson interval; then, per method, the
mean accuracy over seeds with a t-interval, and each method's paired difference from GRPO with
its t-interval. Writes ``runs/<name>/results.csv`` and ``summary.csv``.
"""

from __future__ import annotations

import argparse
import sys

import pandas as pd

from nthr_book.experiments import run_experiment, summarize
from nthr_book.stats import paired_differences
from nthr_book.trainer import NEGATIVES, TrainConfig


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--name", default=None, help="folder under the runs folder (default: grpo_vs_nthr_<preset>)"
    )
    p.add_argument("--preset", choices=("fast", "paper"), default="fast")
    p.add_argument(
        "--methods",
        nargs="+",
        default=["grpo", "nthr"],
        help="labels: grpo, nthr, pos_only, random, or with overrides such as nthr_beta=0.1",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=None, help="override the preset's number of steps")
    p.add_argument("--prompts-per-step", type=int, default=None)
    p.add_argument("--model", default=None, help="override the preset's model (e.g. tiny-random)")
    p.add_argument("--n-eval", type=int, default=64, help="held-out arithmetic questions (0: none)")
    p.add_argument("--no-base", action="store_true", help="skip evaluating the base model")
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
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    args = parse_args(argv)
    overrides = {
        k: v
        for k, v in (
            ("steps", args.steps),
            ("prompts_per_step", args.prompts_per_step),
            ("model", args.model),
            ("negatives", args.negatives),
            ("branch_fraction", args.branch_fraction),
        )
        if v is not None
    }
    cfg = (TrainConfig.fast if args.preset == "fast" else TrainConfig.paper_qwen_0_5b)(**overrides)
    name = args.name or f"grpo_vs_nthr_{args.preset}"
    results = run_experiment(
        name,
        methods=args.methods,
        seeds=args.seeds,
        config=cfg,
        n_eval=args.n_eval,
        evaluate_base=not args.no_base,
    )
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
            "shared_prefix_mean",
            "replaced_mean",
            "accuracy",
            "ci_low",
            "ci_high",
            "n_eval",
        )
        if c in results
    ]
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(results[columns].round(4).to_string(index=False), "\n")
        trained = results[results["method"] != "base"]
        rise = trained["train_reward_last5"] - trained["train_reward_first5"]
        print(
            f"reward rise (last 5 - first 5 steps): median {rise.median():+.4f}, "
            f"{int((rise > 0).sum())}/{len(rise)} runs up"
        )
        if "accuracy" in trained:
            print(summarize(trained).round(4).to_string(index=False))
        if "grpo" in set(trained["method"]) and trained["method"].nunique() > 1:
            # each rule minus GRPO, paired by seed, with its t-interval
            for value in ("accuracy", "lld_rate_mean", "lld_delta_mean"):
                if value in trained:
                    paired = paired_differences(trained, value=value).round(4)
                    print(f"\n{value}, paired with GRPO by seed:\n{paired.to_string(index=False)}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
