"""Δ(x) over many questions and seeds: how often one update lowers the correct answers' likelihood.

The command-line form of notebook 02 (arXiv 2505.18830, docs/method.md §2, §5): for each seed it
samples ``--n-questions`` arithmetic questions x G responses with the embedded model, keeps the
mixed groups, applies one plain-SGD step per question and method (GRPO, Pos Only, NTHR, ...) from
the same weights and records Δ(x), the change of the mean log-likelihood of that question's correct
responses.

    python scripts/lld_displacement.py       # seeds 0 1, 60 questions each, ~15 min CPU
    # the regime map (notebook 02 §4) on the first 16 mixed questions of each seed, too:
    python scripts/lld_displacement.py --map 16 --fractions 0 0.25 0.5 0.75 0.9
    python scripts/lld_displacement.py --seeds 2 --n-questions 8 --model tiny-random  # smoke run
    # the warm-up reasoner's own samples (natural column) against near-miss copies, 2 seeds:
    python scripts/lld_displacement.py --task reasoner --map 40 --fractions 0 --no-sweep
    # the balanced 4+/4- probe (docs/results.md):
    python scripts/lld_displacement.py --group-size 16 --balance 4 --temperature 0.7 \
        --max-new-tokens 64 --no-require-boxed --out runs/lld_sweep_balanced \
        --template "{problem} Explain your reasoning in one or two sentences, then give the final \
answer."

Writes, under ``--out`` (default ``runs/lld_sweep``): ``groups-seed<k>.pt`` (the sampled groups,
reused on a rerun), ``delta-seed<k>.csv`` (one row per question and method; a finished seed is
skipped on a rerun), ``summary.csv`` (per method: questions, median Δ, fraction Δ <= 0, LLD rate,
over all seeds), ``summary_by_seed.csv``, ``paired_vs_grpo.csv`` (per method: the share of questions
where its Δ beats GRPO's, and the median difference) and ``settings.json`` (arguments and versions).
With ``--map N``: ``map-seed<k>.jsonl`` (the regime map of the seed's first N mixed questions by id:
GRPO, Pos Only, NTHR and Random on branched and near-miss negatives; reused on a rerun),
``map_summary.csv`` (``regime.regime_summary`` over all seeds: on the questions and wrong slots
filled in every column, each rule's Δ paired with Pos Only's per question, with bootstrap intervals
over questions within seeds), ``map_shift.csv`` (``regime.regime_shift``: the same questions' GRPO −
Pos Only gap in each column against the natural one) and ``map_ranking.json`` (the paper's Table 1
within the natural column, ``regime.gwhes_ranking``). ``--no-sweep`` skips Δ(x) on every mixed
question and measures the map alone.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from nthr_book import config, data, env, lld, lld_sweep, models, reasoner, regime
from nthr_book.io import atomic_write_text, write_json


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--task",
        choices=["arithmetic", "reasoner"],
        default="arithmetic",
        help="the questions: the embedded model's arithmetic (data.arithmetic_problems) or the "
        "warm-up reasoner's worked products (reasoner.problems, its RL-pool split); reasoner "
        "defaults to --model smollm2-135m-reasoner --template reasoner --max-new-tokens 64",
    )
    p.add_argument("--model", default=None, help="default: the task's model")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument(
        "--n-questions",
        type=int,
        default=60,
        help="questions sampled per seed (about 55%% are mixed)",
    )
    p.add_argument(
        "--methods", nargs="+", default=["grpo", "pos_only", "nthr"], choices=lld.METHODS
    )
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the task's (48, 64)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument(
        "--template",
        default=None,
        help="a name in data.PROMPT_TEMPLATES or a custom string with {problem}",
    )
    p.add_argument(
        "--no-require-boxed",
        dest="require_boxed",
        action="store_false",
        help="grade the last answer in the text when nothing is boxed",
    )
    p.add_argument("--lr", type=float, default=5e-5, help="plain SGD step size (docs/method.md §5)")
    p.add_argument("--beta", type=float, default=1.0, help="NTHR threshold factor")
    p.add_argument(
        "--eta",
        type=float,
        default=0.0,
        help="NTHR down-weighting factor (0: the diagnostic setting)",
    )
    p.add_argument(
        "--balance",
        type=int,
        default=None,
        metavar="K",
        help="measure each mixed group on its first K right and K wrong answers (the balanced "
        "4+/4- probe; use a --group-size of about 4K so that enough groups qualify)",
    )
    p.add_argument(
        "--out", type=Path, default=None, help="output folder (default: <runs>/lld_sweep)"
    )
    p.add_argument(
        "--map",
        type=int,
        default=0,
        metavar="N",
        help="also measure the regime map on the first N mixed questions of each seed (0: no)",
    )
    p.add_argument(
        "--max-tries",
        type=int,
        default=4,
        help="sampling rounds per wrong slot of a branched column (the map fills more questions "
        "with more)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="sequences per generate call when sampling the groups (default: all at once; "
        "lower it to bound memory: 96 questions x 8 answers at once take about 7 GB)",
    )
    p.add_argument(
        "--no-sweep",
        dest="sweep",
        action="store_false",
        help="with --map: sample the groups but skip Δ(x) on every mixed question (the map "
        "measures its own)",
    )
    p.add_argument(
        "--fractions",
        type=float,
        nargs="+",
        default=list(regime.DEFAULT_FRACTIONS),
        help="the map's branching fractions f",
    )
    args = p.parse_args(argv)
    reasoner_task = args.task == "reasoner"
    args.model = args.model or (reasoner.REASONER if reasoner_task else "smollm2-135m")
    args.template = args.template or (reasoner.TEMPLATE_NAME if reasoner_task else "arithmetic")
    args.max_new_tokens = args.max_new_tokens or (reasoner.MAX_NEW_TOKENS if reasoner_task else 48)
    try:
        data.format_problem("", args.template)
    except ValueError as exc:
        p.error(str(exc))
    if args.n_questions < 1:
        p.error(f"--n-questions must be >= 1, got {args.n_questions}")
    if args.balance is not None and not 1 <= 2 * args.balance <= args.group_size:
        p.error(
            f"--balance K needs 1 <= 2K <= --group-size ({args.group_size}), got {args.balance}"
        )
    return args


def main(argv: list[str] | None = None) -> pd.DataFrame:
    args = parse_args(argv)
    out = args.out or config.runs_dir() / "lld_sweep"
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "settings.json", vars(args) | {"out": str(out), "versions": env.versions()})
    model, tokenizer = models.load_policy(args.model)
    tables = []
    for seed in args.seeds:
        csv = out / f"delta-seed{seed}.csv"
        if csv.exists():  # a finished seed: keep its rows
            print(f"seed {seed}: reusing {csv}")
            saved = pd.read_csv(csv)
            saved["per_response_delta"] = saved["per_response_delta"].map(
                json.loads
            )  # "[0.1, -0.2]" -> list
            tables.append(saved)
            continue
        env.set_seed(seed)
        problems = (
            reasoner.problems("rl", args.n_questions, seed=seed)
            if args.task == "reasoner"
            else data.arithmetic_problems(args.n_questions, seed=seed)
        )
        if not args.sweep:  # the map's groups only
            _sample_groups(args, out, seed, model, tokenizer, problems)
            continue
        df = lld_sweep.lld_experiment(
            model,
            tokenizer,
            problems,
            methods=args.methods,
            group_size=args.group_size,
            max_new_tokens=args.max_new_tokens,
            lr=args.lr,
            seed=seed,
            temperature=args.temperature,
            template=args.template,
            require_boxed=args.require_boxed,
            beta=args.beta,
            eta=args.eta,
            balance=args.balance,
            batch_size=args.batch_size,
            groups_path=out / f"groups-seed{seed}.pt",
        )
        atomic_write_text(csv, df.to_csv(index=False))
        tables.append(df)
    maps = [_seed_map(args, out, seed, model, tokenizer) for seed in args.seeds] if args.map else []
    if maps:
        _report_map(args, out, pd.concat(maps, ignore_index=True))
    if not args.sweep:
        print(f"wrote {out}")
        return pd.DataFrame()
    table = pd.concat(tables, ignore_index=True)
    if table.empty:
        raise SystemExit(
            f"no mixed group in {args.seeds} x {args.n_questions} questions with {args.model}: "
            "nothing to measure (raise --n-questions or --temperature)"
        )
    summary = lld_sweep.displacement_summary(table)
    by_seed = pd.concat(
        {seed: lld_sweep.displacement_summary(part) for seed, part in table.groupby("seed")},
        names=["seed"],
    )
    atomic_write_text(out / "summary.csv", summary.to_csv())
    paired = lld_sweep.paired_comparison(table) if "grpo" in set(table["method"]) else None
    if paired is not None:
        atomic_write_text(out / "paired_vs_grpo.csv", paired.to_csv())
    atomic_write_text(out / "summary_by_seed.csv", by_seed.to_csv())
    with pd.option_context("display.width", 140):
        print(by_seed.round(4).to_string(), "\n")
        print(f"all seeds {args.seeds}:\n{summary.round(4).to_string()}\n")
        if paired is not None:
            print(f"paired with GRPO on the same questions:\n{paired.round(4).to_string()}")
    print(f"wrote {out}")
    return summary


def _seed_map(args, out: Path, seed: int, model, tokenizer) -> pd.DataFrame:
    """The regime map of one seed's first ``args.map`` mixed questions (saved and reused), with
    the question ids made unique across seeds."""
    from nthr_book.groups import load_groups

    mixed = sorted(
        (g for g in load_groups(out / f"groups-seed{seed}.pt") if g.status == "mixed"),
        key=lambda g: g.question_id,
    )[: args.map]
    df = regime.regime_map(
        model,
        tokenizer,
        mixed,
        methods=regime.MAP_METHODS,
        fractions=args.fractions,
        lr=args.lr,
        temperature=args.temperature,
        max_new_tokens=args.max_new_tokens,
        seed=seed,
        beta=args.beta,
        eta=args.eta,
        require_boxed=args.require_boxed,
        max_tries=args.max_tries,
        path=out / f"map-seed{seed}.jsonl",
    )
    print(
        f"seed {seed}: questions per column {df.attrs['held']}, common to all "
        f"{df.attrs['n_common']}"
    )
    return df.assign(question=f"s{seed}/" + df["question"], seed=seed)


def _sample_groups(args, out: Path, seed: int, model, tokenizer, problems) -> None:
    """The seed's groups at ``groups-seed<k>.pt``, sampled once (the map reads them)."""
    from nthr_book.groups import load_or_sample_groups

    load_or_sample_groups(
        out / f"groups-seed{seed}.pt",
        model,
        tokenizer,
        problems,
        group_size=args.group_size,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        seed=seed,
        template=args.template,
        require_boxed=args.require_boxed,
        batch_size=args.batch_size,
    )


def _report_map(args, out: Path, both: pd.DataFrame) -> None:
    """The map's paired statistics over all seeds, saved and printed with their verdicts."""
    from nthr_book.stats import verdict

    summary = regime.regime_summary(both)
    shift = regime.regime_shift(both)
    natural = regime.condition_label(0.0)
    ranking = regime.gwhes_ranking(
        both, condition=natural if natural in set(both["negatives"]) else None
    )
    atomic_write_text(out / "map_summary.csv", summary.to_csv(index=False))
    atomic_write_text(out / "map_shift.csv", shift.to_csv(index=False))
    write_json(out / "map_ranking.json", ranking)
    with pd.option_context("display.width", 200):
        shown = ["negatives", "method", "n_questions", "median_delta", "diff_mean", "diff_low"]
        shown += ["diff_high", "frac_below", "ratio_to_pos_only", "lld_rate", "lld_low"]
        shown += ["lld_high", "spared_share", "shared_prefix"]
        print(f"regime map, seeds {args.seeds}:\n{summary[shown].round(4).to_string()}")
    print("\nΔ_rule − Δ_PosOnly per question (mean, 95% bootstrap over questions within seeds):")
    for row in summary[summary.method != "pos_only"].itertuples():
        print(
            f"  {row.negatives:>10} {row.method:>8}: "
            + verdict(row.diff_mean, row.diff_low, row.diff_high, digits=4)
        )
    if "step_diff_mean" in summary:
        print("\nthe same at equal step length (Δ per unit of ‖lr·∇L‖, rule − Pos Only):")
        for row in summary[summary.method != "pos_only"].itertuples():
            text = verdict(row.step_diff_mean, row.step_diff_low, row.step_diff_high, digits=2)
            print(f"  {row.negatives:>10} {row.method:>8}: {text}")
    print(f"\nthe same questions' GRPO − Pos Only gap against {natural} (within-question):")
    for row in shift.itertuples():
        text = verdict(row.shift_mean, row.shift_low, row.shift_high, digits=4)
        print(f"  {row.negatives:>10}: {text}; fell on {row.frac_fell:.0%} of {row.n_questions}")
    print(f"\nGWHES ranking (Table 1) within {ranking['condition']}: {ranking}")


if __name__ == "__main__":
    main(sys.argv[1:])
