"""The gradients g_i = ∇ ln π(y+_i) of ``lld.first_order_displacement``: one batched graph against
one answer's graph at a time, side by side in one process.

``first_order_displacement`` needs one full parameter gradient per correct answer of a group. The
first version ran the group's forward pass once with gradient and called backward once per correct
answer through that whole graph, which costs a backward pass over all G answers each time. The
library now runs each correct answer's own forward and backward (the rows are independent, so the
gradient is the same up to float32 rounding). This bench reuses (or samples and saves) the series'
ci groups (``presets.GroupsPreset.ci()``), takes the first ``--questions`` mixed ones and times both
ways alternately (``--repeats`` times after ``--warmup`` untimed rounds), each reduced to the inner
product of every g_i with one fixed random direction (float64), then prints the median seconds of
each, their ratio, the largest relative difference of the inner products, and the median time of
the whole ``first_order_displacement`` for scale.

    python bench/first_order.py                      # 2 questions x 3 repeats, ~3 min on one core
    python bench/first_order.py --model tiny-random  # smoke run (rewards alternate: mixed groups)
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
    return parse_timing_args(timing_parser(__doc__, questions=2), argv)


def inner_products(model, group, direction, *, per_answer: bool) -> list[float]:
    """⟨∇ ln π(y+_i), direction⟩ for each correct answer i (float64), by one batched graph with a
    backward per answer (the baseline) or by each answer's own graph (the library's way)."""
    import torch

    from nthr_book import grpo

    r, params = group.rollouts, [q for q in model.parameters() if q.requires_grad]
    mask, rows = r.completion_mask.bool(), group.correct.nonzero().flatten().tolist()

    def logps_of(sel):
        return grpo.group_token_logps(
            model, r.prompt_ids[sel], r.prompt_mask[sel], r.completion_ids[sel], mask[sel]
        )

    def dot(grads):
        return float(sum((g.double() * d).sum() for g, d in zip(grads, direction)))

    out = []
    if per_answer:
        for i in rows:
            one = slice(i, i + 1)
            seq = grpo.sequence_logprob(logps_of(one), mask[one])
            out.append(dot(torch.autograd.grad(seq[0], params)))
    else:
        seq = grpo.sequence_logprob(logps_of(slice(None)), mask)
        for k, i in enumerate(rows):
            out.append(dot(torch.autograd.grad(seq[i], params, retain_graph=k + 1 < len(rows))))
    return out


def main(argv: list[str] | None = None) -> dict:
    """Sample the groups, time both ways, print and return the summary."""
    args = parse_args(argv)
    import torch

    from bench._groups import ci_mixed_groups
    from nthr_book.env import versions
    from nthr_book.lld import first_order_displacement
    from nthr_book.presets import GroupsPreset

    if args.threads:
        torch.set_num_threads(args.threads)
    preset = GroupsPreset.ci()
    model, _, mixed = ci_mixed_groups(args.model, args.questions)
    gen = torch.Generator().manual_seed(0)
    direction = [
        torch.randn(q.shape, generator=gen, dtype=torch.float64)
        for q in model.parameters()
        if q.requires_grad
    ]
    model.eval()
    times = {"batched": [], "per_answer": [], "first_order_displacement": []}
    worst = 0.0  # largest relative difference of an inner product between the two ways
    for g in mixed:
        for repeat in range(args.warmup + args.repeats):
            values = {}
            for way in ("batched", "per_answer"):
                t0 = time.perf_counter()
                values[way] = inner_products(model, g, direction, per_answer=way == "per_answer")
                if repeat >= args.warmup:
                    times[way].append(time.perf_counter() - t0)
            for a, b in zip(values["batched"], values["per_answer"]):
                worst = max(worst, abs(a - b) / max(abs(a), 1e-30))
            if repeat >= args.warmup:
                t0 = time.perf_counter()
                first_order_displacement(model, g, lr=preset.lr, seed=preset.seed)
                times["first_order_displacement"].append(time.perf_counter() - t0)
        print(f"  {g.question_id}: {g.n_correct} of {g.group_size} answers right", flush=True)
    med = {way: statistics.median(v) for way, v in times.items()}
    summary = {
        "median_s": med,
        "speedup": med["batched"] / med["per_answer"],
        "max_rel_difference": worst,
        "questions": [g.question_id for g in mixed],
        "args": vars(args),
        "versions": versions(),
    }
    print(
        f"g_i of every correct answer ({len(mixed)} questions x {args.repeats} repeats, torch "
        f"threads {torch.get_num_threads()}): median {med['batched']:.2f} s by one batched graph, "
        f"{med['per_answer']:.2f} s by each answer's graph, speed-up {summary['speedup']:.2f}x; "
        f"max relative difference {worst:.1e}; the whole first_order_displacement now "
        f"{med['first_order_displacement']:.2f} s"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
