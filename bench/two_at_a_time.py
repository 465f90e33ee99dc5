"""Two notebooks at a time, one core each, against one at a time with all the cores.

``make demo`` and ``make notebooks`` run two notebooks at once with ``cpu_count // 2`` threads each
(``nthr_book.demo``). This bench checks that choice on the series' own work: a *workload* is Δ(x) of
``--questions`` mixed groups (``lld.one_step_displacement``, GRPO) plus sampling G answers of
``--tokens`` tokens for each (``model.generate``), on the groups notebooks 02-04 use
(``presets.GroupsPreset.ci()``). Side by side, in each round:

- one at a time: one process with every core runs the workload twice;
- two at a time: two processes with half the cores each run it once, started together.

Each process loads the model first and waits at a barrier, so only the workloads are timed. Prints
the median seconds of each way over ``--repeats`` rounds and their ratio (above 1: two at a time
gets through the same work sooner).

    python bench/two_at_a_time.py                        # 2 questions, 3 rounds, ~5 min on 2 cores
    python bench/two_at_a_time.py --model tiny-random    # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m (embedded) or tiny-random")
    p.add_argument("--questions", type=int, default=2, help="mixed groups per workload")
    p.add_argument("--tokens", type=int, default=40, help="tokens sampled per answer")
    p.add_argument("--repeats", type=int, default=3, help="rounds of both ways")
    p.add_argument("--json", default=None, help="write the timings to this file")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # barrier file: run here
    p.add_argument("--times", type=int, default=1, help=argparse.SUPPRESS)  # workloads per worker
    args = p.parse_args(argv)
    if args.questions < 1 or args.repeats < 1 or args.tokens < 1:
        p.error("--questions, --tokens and --repeats must be >= 1")
    return args


def worker(args: argparse.Namespace) -> None:
    """Load the model and groups, print "ready", wait for the barrier file, run the workload
    ``--times`` times and print its seconds."""
    import torch

    from bench._groups import ci_mixed_groups
    from nthr_book.lld import one_step_displacement
    from nthr_book.presets import GroupsPreset

    preset = GroupsPreset.ci()
    model, tokenizer, mixed = ci_mixed_groups(args.model, args.questions)
    print("ready", flush=True)
    barrier = Path(args.worker)
    while not barrier.exists():
        time.sleep(0.01)
    t0 = time.perf_counter()
    for _ in range(args.times):
        for g in mixed:  # 1. Δ(x) of the group
            one_step_displacement(model, g, update="grpo", lr=preset.lr, seed=preset.seed)
            r = g.rollouts  # 2. G fresh answers to its prompt
            with torch.no_grad():
                model.generate(
                    input_ids=r.prompt_ids,
                    attention_mask=r.prompt_mask,
                    max_new_tokens=args.tokens,
                    min_new_tokens=args.tokens,
                    do_sample=True,
                    pad_token_id=tokenizer.pad_token_id,
                )
    print(f"seconds {time.perf_counter() - t0}", flush=True)


def timed(args: argparse.Namespace, processes: int, times: int) -> float:
    """Wall seconds of ``processes`` workers with ``cpu_count // processes`` threads each, each
    running the workload ``times`` times, from the barrier to the last one's end."""
    threads = str(max(1, (os.cpu_count() or 1) // processes))
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    with tempfile.TemporaryDirectory() as tmp:
        barrier = Path(tmp) / "go"
        command = [sys.executable, __file__, "--worker", str(barrier), "--times", str(times)]
        command += ["--model", args.model, "--questions", str(args.questions)]
        command += ["--tokens", str(args.tokens)]
        procs = [
            subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
            for _ in range(processes)
        ]
        for proc in procs:  # every worker loaded
            if proc.stdout.readline().strip() != "ready":
                raise SystemExit(f"a worker failed to start (exit {proc.wait()})")
        barrier.touch()
        seconds = []
        for proc in procs:
            out, _ = proc.communicate()
            if proc.returncode:
                raise SystemExit(f"a worker failed (exit {proc.returncode})")
            seconds.append(float(out.split("seconds ")[-1]))
    return max(seconds)


def main(argv: list[str] | None = None) -> dict:
    """Time both ways round by round; print and return the summary."""
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return {}
    from nthr_book.env import versions

    one, two = [], []
    for round_ in range(args.repeats):
        one.append(timed(args, processes=1, times=2))
        two.append(timed(args, processes=2, times=1))
        print(f"  round {round_}: one at a time {one[-1]:.1f} s, two at a time {two[-1]:.1f} s")
    summary = {
        "median_s_one_at_a_time": statistics.median(one),
        "median_s_two_at_a_time": statistics.median(two),
        "ratio": statistics.median(one) / statistics.median(two),
        "cpu_count": os.cpu_count(),
        "args": {k: v for k, v in vars(args).items() if k not in ("worker", "times")},
        "versions": versions(),
    }
    print(
        f"two workloads ({args.questions} x [Δ(x) + {args.tokens}-token sampling], "
        f"{os.cpu_count()} cores, median of {args.repeats}): one at a time "
        f"{summary['median_s_one_at_a_time']:.1f} s, two at a time "
        f"{summary['median_s_two_at_a_time']:.1f} s: ratio {summary['ratio']:.2f}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
