"""Evaluate one or more models on the math benchmarks and print them beside the paper's Table 2.

A thin command line over ``nthr_book.evaluate`` (greedy pass@1 by default, resumable JSONL records:
a killed run picks up at the next problem).

    python scripts/evaluate_benchmarks.py --limit 20   # the embedded model, 20 per benchmark
    python scripts/evaluate_benchmarks.py --model runs/grpo_vs_nthr_fast/nthr/seed0/model \
        --label nthr --limit 20
    python scripts/evaluate_benchmarks.py --model Qwen/Qwen2.5-0.5B-Instruct \
        --max-new-tokens 2500 --batch 64

``--limit N`` keeps the first N problems of each file (the benchmark files' own order). Writes
``<out>/<label>/<benchmark>.jsonl`` (records), ``<out>/results-<label>.csv`` and
``<out>/results_vs_paper-<label>.csv`` (default ``<out>`` is ``runs/eval``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from nthr_book import config, data
from nthr_book.evaluate import evaluate_suite, results_table
from nthr_book.io import atomic_write_text


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="embedded name, hub id or local folder")
    p.add_argument(
        "--label",
        default=None,
        help="name of this model in the tables (default: base for the "
        "embedded model, else the folder name)",
    )
    p.add_argument(
        "--benchmarks", nargs="+", default=list(data.BENCHMARKS), choices=data.BENCHMARKS
    )
    p.add_argument(
        "--limit", type=int, default=None, help="first N problems of each benchmark (default: all)"
    )
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch", type=int, default=20, help="problems per generate call")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        p.error(f"--limit must be >= 1, got {args.limit}")
    return args


def main(argv: list[str] | None = None) -> pd.DataFrame:
    args = parse_args(argv)
    label = args.label or ("base" if args.model == "smollm2-135m" else Path(args.model).name)
    out = args.out or config.runs_dir() / "eval"
    # prints one line per benchmark, and which benchmark files (or hub) are not reachable here
    results = evaluate_suite(
        {label: args.model},
        args.benchmarks,
        limit=args.limit,
        temperature=0.0,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch,
        out_dir=out,
    )
    rows = pd.DataFrame([r.as_row() for r in results])
    atomic_write_text(out / f"results-{label}.csv", rows.to_csv(index=False))
    table = results_table(results)
    atomic_write_text(out / f"results_vs_paper-{label}.csv", table.to_csv())
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table.to_string())
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
