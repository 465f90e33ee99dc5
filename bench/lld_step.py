"""Δ(x) of one question with the group's prompt shared and not, side by side in one process.

``lld.one_step_displacement`` runs three passes over a group of G answers (the initial log-probs,
the update's forward and backward, the new log-probs). With ``share_prompt`` each pass computes the
group's prompt once (``grpo.shared_prompt_hidden``) instead of G times. This bench reuses (or
samples and saves) the notebook series' groups (``presets.GroupsPreset.ci()``: the arithmetic
task's 161-token few-shot prompt, up to 48 new tokens), takes the first ``--questions`` mixed ones
and times each measurement alternately with sharing on and off (``--repeats`` times, after
``--warmup`` untimed rounds), then prints the median seconds of each, their ratio, the share of
token positions computed and the largest difference of Δ(x) between the two (they must agree to
float32 rounding).

    python bench/lld_step.py                      # 3 questions x 3 repeats, ~3 min on 2 cores
    python bench/lld_step.py --model tiny-random  # smoke run (rewards alternate: mixed groups)
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
    p = timing_parser(__doc__, questions=3)
    p.add_argument(
        "--sample", type=int, default=None, help="questions sampled (default: all of the preset's)"
    )
    p.add_argument("--update", default="grpo", help="the update rule (nthr_book.rules)")
    return parse_timing_args(p, argv)


def main(argv: list[str] | None = None) -> dict:
    """Sample the groups, time the measurements, print and return the summary."""
    args = parse_args(argv)
    import torch

    from bench._groups import ci_mixed_groups
    from nthr_book.env import versions
    from nthr_book.lld import one_step_displacement
    from nthr_book.presets import GroupsPreset

    if args.threads:
        torch.set_num_threads(args.threads)
    preset = GroupsPreset.ci()
    model, _, mixed = ci_mixed_groups(args.model, args.questions, args.sample)
    times: dict[bool, list[float]] = {True: [], False: []}
    deltas: dict[bool, list[float]] = {True: [], False: []}
    computed, whole = 0, 0  # token positions of the three passes, shared and not
    for g in mixed:
        r = g.rollouts
        G, P, T = r.group_size, r.prompt_ids.shape[1], r.completion_ids.shape[1]
        computed, whole = computed + P + G * T, whole + G * (P + T)
        for repeat in range(args.warmup + args.repeats):
            for share in (True, False):
                t0 = time.perf_counter()
                res = one_step_displacement(
                    model, g, update=args.update, lr=preset.lr, seed=preset.seed, share_prompt=share
                )
                if repeat >= args.warmup:
                    times[share].append(time.perf_counter() - t0)
                    deltas[share].append(res.delta)
        print(f"  {g.question_id}: G={G}, prompt {P} tokens, answers up to {T}", flush=True)
    med = {share: statistics.median(v) for share, v in times.items()}
    diff = max(abs(a - b) for a, b in zip(deltas[True], deltas[False]))
    summary = {
        "median_s_shared": med[True],
        "median_s_unshared": med[False],
        "speedup": med[False] / med[True],
        "positions_computed": computed / whole,
        "max_abs_delta_difference": diff,
        "questions": [g.question_id for g in mixed],
        "args": vars(args),
        "versions": versions(),
    }
    print(
        f"Δ(x) of one question ({args.update}, {len(mixed)} questions x {args.repeats} repeats, "
        f"torch threads {torch.get_num_threads()}): median {med[True]:.2f} s shared, "
        f"{med[False]:.2f} s unshared, speed-up {summary['speedup']:.2f}x; token positions "
        f"computed {summary['positions_computed']:.0%} of unshared; max |ΔΔ(x)| {diff:.2e}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
