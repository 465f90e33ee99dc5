"""How hard is the synthetic arithmetic task for the embedded SmolLM2-135M? (arXiv 2505.18830,
docs/method.md §5)

Samples ``--group-size`` completions for each of ``--n`` questions from
``nthr_book.data.arithmetic_problems`` with the tuned prompt (``template="arithmetic"``: instruction
plus two solved example turns), scores them with the arithmetic reward settings, and prints the
histogram of per-question success rates (bins 0, (0,.25], (.25,.5], (.5,.75], (.75,1), 1), the
fraction of boxed answers and the share of mixed groups (the ones GRPO learns from). Writes three
files under ``config.build_dir()``:

- ``arithmetic_difficulty.csv``: the histogram (bin, questions, fraction);
- ``arithmetic_difficulty_questions.csv``: one row per question (id, problem, answer, ops,
  max_digits, successes, rate, boxed, sample completion);
- ``arithmetic_difficulty.json``: the settings, library versions, totals and timings.

Usage (about 2-4 minutes on 2 idle CPU cores for the defaults; knobs as in
``arithmetic_problems``)::

    python bench/arithmetic_difficulty.py
    python bench/arithmetic_difficulty.py --left 10,99 --temperature 0.7 --n 50
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
import time
from pathlib import Path

import torch

sys.path.insert(
    0, str(Path(__file__).resolve().parents[1])
)  # run from a checkout without installing

from nthr_book import config, data, env  # noqa: E402
from nthr_book.io import atomic_write_text, write_json  # noqa: E402

BINS = ("0", "(0,.25]", "(.25,.5]", "(.5,.75]", "(.75,1)", "1")


def rate_bin(rate: float) -> str:
    """The histogram bin of a per-question success rate."""
    if rate <= 0.0:
        return BINS[0]
    if rate >= 1.0:
        return BINS[5]
    for label, upper in zip(BINS[1:4], (0.25, 0.5, 0.75)):
        if rate <= upper:
            return label
    return BINS[4]


def _pair(text: str) -> tuple[int, int]:
    """'2,20' -> (2, 20)."""
    lo, hi = (int(x) for x in text.split(","))
    return lo, hi


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (defaults: the tuned ones in nthr_book.data)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100, help="number of questions")
    p.add_argument("--group-size", type=int, default=8, help="samples per question")
    p.add_argument("--temperature", type=float, default=data.ARITHMETIC_TEMPERATURE)
    p.add_argument("--max-new-tokens", type=int, default=data.ARITHMETIC_MAX_NEW_TOKENS)
    p.add_argument("--batch-size", type=int, default=64, help="sequences per generate call")
    p.add_argument("--seed", type=int, default=0, help="seed of the questions and of sampling")
    p.add_argument(
        "--template",
        default="arithmetic",
        help="a PROMPT_TEMPLATES name or a string with {problem}",
    )
    p.add_argument("--no-examples", action="store_true", help="drop the template's example turns")
    p.add_argument(
        "--require-boxed",
        choices=("yes", "no"),
        default="yes" if data.ARITHMETIC_REQUIRE_BOXED else "no",
    )
    p.add_argument(
        "--ops", default=None, help="operations, e.g. '+-*' (default: arithmetic_problems')"
    )
    p.add_argument(
        "--left", type=_pair, default=None, help="range of the first operand, e.g. '2,20'"
    )
    p.add_argument(
        "--right", type=_pair, default=None, help="range of the other operands, e.g. '2,9'"
    )
    p.add_argument("--num-operands", type=int, default=None)
    p.add_argument("--phrasing", default=None, choices=("symbolic", "words", "story"))
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: build/)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Run the measurement, print the histogram and write the CSV/JSON files; returns the
    summary."""
    from nthr_book.models import load_policy
    from nthr_book.rewards import extract_boxed, math_rewards
    from nthr_book.rollout import generate_groups

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    knobs = {
        k: v
        for k, v in {
            "ops": tuple(args.ops) if args.ops else None,
            "left": args.left,
            "right": args.right,
            "num_operands": args.num_operands,
            "phrasing": args.phrasing,
        }.items()
        if v is not None
    }
    problems = data.arithmetic_problems(args.n, seed=args.seed, **knobs)
    require_boxed = args.require_boxed == "yes"
    G = args.group_size

    t0 = time.perf_counter()
    model, tokenizer = load_policy(args.model)
    load_s = time.perf_counter() - t0
    examples = () if args.no_examples else None
    prompts = [
        data.build_prompt(tokenizer, p["problem"], args.template, examples=examples)
        for p in problems
    ]
    t0 = time.perf_counter()
    rollouts = generate_groups(
        model,
        tokenizer,
        prompts,
        G,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        batch_size=args.batch_size,
        seed=args.seed,
        progress=True,
    )
    gen_s = time.perf_counter() - t0
    texts = rollouts.texts  # (n*G,) group-major
    golds = [p["answer"] for p in problems for _ in range(G)]
    t0 = time.perf_counter()
    rewards = math_rewards(texts, golds, require_boxed=require_boxed)
    lenient = rewards if not require_boxed else math_rewards(texts, golds, require_boxed=False)
    reward_s = time.perf_counter() - t0
    boxed = [extract_boxed(t) is not None for t in texts]

    rows, hist = [], dict.fromkeys(BINS, 0)
    for g, p in enumerate(problems):
        sl = slice(g * G, (g + 1) * G)
        successes = int(sum(rewards[sl]))
        rate = successes / G
        hist[rate_bin(rate)] += 1
        rows.append(
            {
                "id": p["id"],
                "problem": p["problem"],
                "answer": p["answer"],
                "ops": p["ops"],
                "max_digits": p["max_digits"],
                "successes": successes,
                "rate": rate,
                "boxed": sum(boxed[sl]) / G,
                "sample": texts[g * G],
            }
        )
    n = len(problems)
    summary = {
        "settings": vars(args)
        | {
            "out": str(args.out),
            "knobs": knobs,
            "require_boxed": require_boxed,
            "template_text": data._resolve_template(args.template),
        },
        "versions": env.versions(),
        "device": env.device_description(),
        "histogram": hist,
        "questions": n,
        "samples": len(texts),
        "accuracy": sum(rewards) / len(texts),
        "accuracy_unboxed_allowed": sum(lenient) / len(texts),
        "boxed_fraction": sum(boxed) / len(texts),
        "mixed_fraction": sum(0 < r["successes"] < G for r in rows) / n,
        "truncated_fraction": rollouts.truncated.float().mean().item(),
        "mean_completion_tokens": rollouts.completion_lengths.float().mean().item(),
        "seconds": {
            "load": round(load_s, 1),
            "generate": round(gen_s, 1),
            "rewards": round(reward_s, 1),
        },
    }

    print(
        f"{n} questions x {G} samples, T={args.temperature}, max_new_tokens={args.max_new_tokens}, "
        f"template={args.template!r}, require_boxed={require_boxed}, knobs={knobs or 'defaults'}"
    )
    print(f"{'success rate':>14}  questions")
    for label in BINS:
        print(f"{label:>14}  {hist[label]:4d}  {'#' * hist[label]}")
    print(
        f"accuracy {summary['accuracy']:.3f} (unboxed allowed "
        f"{summary['accuracy_unboxed_allowed']:.3f}), "
        f"boxed {summary['boxed_fraction']:.3f}, mixed groups {summary['mixed_fraction']:.3f}, "
        f"truncated {summary['truncated_fraction']:.3f}, "
        f"mean completion {summary['mean_completion_tokens']:.1f} tokens"
    )
    print(
        f"time: load {load_s:.1f}s, generate {gen_s:.1f}s, rewards {reward_s:.1f}s "
        f"({env.device_description()})"
    )

    out = args.out or config.build_dir()
    hist_csv = io.StringIO()
    w = csv.writer(hist_csv)
    w.writerow(["bin", "questions", "fraction"])
    for label in BINS:
        w.writerow([label, hist[label], hist[label] / n if n else 0.0])
    atomic_write_text(Path(out) / "arithmetic_difficulty.csv", hist_csv.getvalue())
    q_csv = io.StringIO()
    w = csv.DictWriter(q_csv, fieldnames=list(rows[0]) if rows else ["id"])
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(Path(out) / "arithmetic_difficulty_questions.csv", q_csv.getvalue())
    write_json(Path(out) / "arithmetic_difficulty.json", summary)
    print(f"wrote {Path(out) / 'arithmetic_difficulty.csv'} (+ _questions.csv, .json)")
    return summary


if __name__ == "__main__":
    main()
