"""How the reward's time grows on hostile output: ``extract_boxed`` against a linear scan, and the
worker timeout against ``timeout_s``, in one process.

The unit tests (``tests/test_rewards.py``) check what the reward returns on hostile output and that
the caller only ever waits on the worker with ``timeout_s``; they assert no time. This bench prints
the times:

1. ``extract_boxed`` on five hostile shapes (deep nesting, an unbalanced megabyte, 10k boxes, a
   megabyte before the box, 100k non-boxes) at size n and 2n. For each: the median seconds, the
   growth t(2n) / t(n) (about 2 for linear code, 4 for quadratic) and the ratio to a baseline
   measured on the same text in the same process, one linear pass of ``str.count`` (a ratio that
   stays flat from n to 2n is linear).
2. ``math_reward`` on answers that make sympy hang (``9^{9^{9^{9}}}``, ``(10^{10^{10}})!``) with
   ``timeout_s``: the median seconds of a call and its ratio to ``timeout_s`` (a little above 1:
   the timeout plus killing the worker), beside a plain answer decided by the worker (the
   baseline round trip).

    python bench/rewards_speed.py                 # ~30 s
    python bench/rewards_speed.py --smoke         # small inputs, one repeat (tests/test_bench.py)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout


def hostile_texts(n: int) -> dict[str, str]:
    """The shapes of test_rewards' huge inputs, each about n characters (or n repetitions)."""
    return {
        "deep-nesting": "\\boxed{" + "{" * (n // 2) + "x" + "}" * (n // 2) + "}",
        "deep-unbalanced": "\\boxed{" + "{" * n,
        "many-boxes": "\\boxed{1} " * (n // 10) + "\\boxed{2}",
        "long-prefix": "x" * n + "\\boxed{3}",
        "non-boxes": "\\boxedx" * (n // 7),
    }


def median_seconds(fn, repeats: int) -> float:
    """The median wall time of ``repeats`` calls of ``fn()``."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--size", type=int, default=600_000, help="n, characters of the smaller input")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per measurement")
    p.add_argument("--timeout", type=float, default=0.5, help="math_reward's timeout_s")
    p.add_argument("--smoke", action="store_true", help="--size 20000 --repeats 1")
    p.add_argument("--json", default=None, help="write the summary to this file")
    args = p.parse_args(argv)
    if args.smoke:
        args.size, args.repeats = 20_000, 1
    if args.size < 100 or args.repeats < 1 or not args.timeout > 0:
        p.error("--size must be >= 100, --repeats >= 1 and --timeout > 0")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Time both parts, print the table, return the summary."""
    args = parse_args(argv)
    from nthr_book import rewards
    from nthr_book.env import versions

    n = args.size
    extract: dict[str, dict[str, float]] = {}
    print(f"extract_boxed, median of {args.repeats} calls (baseline: one str.count over the text)")
    print(f"{'input':16s} {'n':>8s} {'s':>10s} {'s at 2n':>10s} {'2n / n':>7s} {'÷ base n':>9s}")
    small, large = hostile_texts(n), hostile_texts(2 * n)
    for name in small:
        row = {}
        for label, text in (("n", small[name]), ("2n", large[name])):
            row[f"s_{label}"] = median_seconds(
                lambda t=text: rewards.extract_boxed(t), args.repeats
            )
            base = median_seconds(lambda t=text: t.count("{"), args.repeats)
            row[f"ratio_to_baseline_{label}"] = row[f"s_{label}"] / base
        row["growth_2n_over_n"] = row["s_2n"] / row["s_n"]
        extract[name] = row
        print(
            f"{name:16s} {n:8d} {row['s_n']:10.4f} {row['s_2n']:10.4f} "
            f"{row['growth_2n_over_n']:7.2f} {row['ratio_to_baseline_n']:9.1f}"
        )

    rewards.warm_up()
    cases = {
        "plain (worker)": ("\\boxed{x^2+1}", "1+x^2"),  # symbolic: math-verify decides it
        "power-tower": ("\\boxed{9^{9^{9^{9}}}}", "27"),
        "huge-factorial": ("\\boxed{10^{10^{10}}!}", "27"),
    }
    hostile: dict[str, dict[str, float]] = {}
    print(f"\nmath_reward with timeout_s = {args.timeout}, median of {args.repeats} calls")
    print(f"{'answer':16s} {'s':>8s} {'÷ timeout_s':>12s}")
    for name, (completion, gold) in cases.items():
        seconds = []
        for _ in range(args.repeats):
            rewards.warm_up()  # a worker killed by the last call restarts here, untimed
            t0 = time.perf_counter()
            rewards.math_reward(completion, gold, timeout_s=args.timeout)
            seconds.append(time.perf_counter() - t0)
        s = statistics.median(seconds)
        hostile[name] = {"s": s, "ratio_to_timeout": s / args.timeout}
        print(f"{name:16s} {s:8.3f} {s / args.timeout:12.2f}")
    rewards.shutdown_workers()
    summary = {
        "size": n,
        "repeats": args.repeats,
        "timeout_s": args.timeout,
        "extract_boxed": extract,
        "math_reward": hostile,
        "versions": versions(),
    }
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
