"""Generation with the prompts' shared start prefilled once per call, against every prompt
prefilled in full, side by side in one process.

Every prompt of the arithmetic task starts with the same chat header and two few-shot examples
(about 150 of its 161 tokens), and every held-out evaluation of notebooks 05, 06 and 08 generates
for dozens of such prompts per ``generate`` call. ``rollout.generate_groups`` now prefills that
shared start once for the call, then each prompt's own rest once (``share_prompt=True``, the
default); ``share_prompt=False`` prefills every row in full, as every greedy evaluation did before.
This bench times both on the greedy held-out evaluation of ``TrainConfig.fast()`` (``--questions``
questions, one ``generate`` call of up to 32 each, 48 new tokens), alternately, ``--repeats`` times
after ``--warmup`` untimed rounds, checks that both write the same answers, and prints the median
seconds of each and their ratio.

    python bench/shared_start.py                      # 32 questions x 3 repeats, ~2 min, 1 core
    python bench/shared_start.py --model tiny-random  # smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from bench._groups import parse_timing_args, timing_parser  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = timing_parser(__doc__, questions=32, questions_help="held-out questions generated")
    return parse_timing_args(parser, argv)


def main(argv: list[str] | None = None) -> dict:
    """Time both ways, print and return the summary."""
    args = parse_args(argv)
    import torch

    from nthr_book.data import build_prompt
    from nthr_book.env import versions
    from nthr_book.experiments import heldout_problems
    from nthr_book.models import load_policy
    from nthr_book.rollout import generate_groups
    from nthr_book.trainer import TrainConfig, task_defaults

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = TrainConfig.fast()
    model, tokenizer = load_policy(args.model, device="cpu")
    template, _ = task_defaults(cfg)
    held = heldout_problems(cfg, args.questions)
    prompts = [build_prompt(tokenizer, p["problem"], template) for p in held]
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]

    def generate(share: bool):
        return generate_groups(
            model,
            tokenizer,
            prompts,
            1,
            max_new_tokens=cfg.max_new_tokens,
            temperature=0.0,
            batch_size=32,
            seed=0,
            share_prompt=share,
        )

    times = {"whole_prompts": [], "shared_start": []}
    same = True  # the two ways wrote the same answers in every round
    for repeat in range(args.warmup + args.repeats):
        texts = {}
        for way in times:
            t0 = time.perf_counter()
            texts[way] = generate(way == "shared_start").texts
            if repeat >= args.warmup:
                times[way].append(time.perf_counter() - t0)
        same = same and texts["whole_prompts"] == texts["shared_start"]
    med = {way: statistics.median(v) for way, v in times.items()}
    summary = {
        "median_s": med,
        "speedup": med["whole_prompts"] / med["shared_start"],
        "same_answers": same,
        "prompt_tokens": [min(lengths), max(lengths)],
        "args": vars(args),
        "versions": versions(),
    }
    print(
        f"greedy evaluation of {len(prompts)} questions ({min(lengths)}-{max(lengths)} prompt "
        f"tokens, {args.repeats} repeats, torch threads {torch.get_num_threads()}): median "
        f"{med['whole_prompts']:.2f} s with every prompt prefilled in full, "
        f"{med['shared_start']:.2f} s with the shared start once, speed-up "
        f"{summary['speedup']:.2f}x; same answers: {same}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
