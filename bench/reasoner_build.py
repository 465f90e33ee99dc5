"""How long the warm-up takes to build (issue 23 §1: under 10 minutes on 2 CPU cores).

Runs ``reasoner.build_reasoner`` for a run size's preset (``--size``, optionally with fewer
``--steps``) into a temporary cache root (the real cache is neither read nor written, except the
converted embedded model that the base is loaded from), with ``--threads`` torch threads, and
prints the phases from the build's own record: loading and tokenizing, the SFT steps (median and
mean seconds per step), saving, and the total; then how long a second ``build_reasoner`` call
takes (the cached path: a marker check) and loading the folder with ``models.load_policy``.
With ``--steps`` below the preset's, the full build is extrapolated as load + save + preset steps
x the median step. Writes ``<build>/reasoner_build.json`` (settings, threads, versions, timings).

    python bench/reasoner_build.py --threads 2               # the laptop warm-up, in full
    python bench/reasoner_build.py --threads 2 --steps 10    # quicker: 10 steps, extrapolated
    python bench/reasoner_build.py --size ci --threads 1     # the ci warm-up

The machine is shared on the reference setup: note the load average it prints beside the times.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from nthr_book import config, data, env, models, reasoner  # noqa: E402
from nthr_book.io import write_json  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=config.RUN_SIZES, default="laptop")
    p.add_argument("--steps", type=int, default=None, help="fewer steps than the preset's")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--base", default=None, help="another base model (e.g. tiny-random)")
    p.add_argument("--out", type=Path, default=None, help="default: <build>/reasoner_build.json")
    args = p.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        p.error("--steps must be >= 1")
    if args.threads < 1:
        p.error("--threads must be >= 1")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    preset = reasoner.ReasonerSettings.for_size(args.size)
    settings = preset
    if args.steps is not None:
        warmup = min(preset.warmup_steps, args.steps)
        settings = dataclasses.replace(settings, steps=args.steps, warmup_steps=warmup)
    if args.base is not None:
        settings = dataclasses.replace(settings, base=args.base)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="reasoner_build.") as root:
        start = time.perf_counter()
        folder = reasoner.build_reasoner(
            settings, cache_root=root, load_base=models.load_policy, build_prompt=data.build_prompt
        )
        first = time.perf_counter() - start
        start = time.perf_counter()
        reasoner.build_reasoner(
            settings, cache_root=root, load_base=models.load_policy, build_prompt=data.build_prompt
        )
        second = time.perf_counter() - start
        start = time.perf_counter()
        models.load_policy(str(folder))
        load = time.perf_counter() - start
        info = json.loads((folder / "reasoner.json").read_text())
        with open(folder / "loss_curve.csv", newline="") as fh:
            steps = [float(row["seconds"]) for row in csv.DictReader(fh)]
    median = statistics.median(steps)
    save = info["seconds_total"] - info["seconds_load"] - info["seconds_train"]
    full = info["seconds_load"] + save + preset.steps * median
    result = {
        "size": args.size,
        "settings": dataclasses.asdict(settings),
        "preset_steps": preset.steps,
        "threads": args.threads,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "seconds_first_build": first,
        "seconds_load_and_tokenize": info["seconds_load"],
        "seconds_train": info["seconds_train"],
        "seconds_save": save,
        "seconds_per_step_median": median,
        "seconds_per_step_mean": statistics.fmean(steps),
        "seconds_full_build_estimate": full,
        "seconds_second_build_call": second,
        "seconds_load_policy_from_folder": load,
        "versions": env.versions(),
    }
    out = args.out or config.build_dir() / "reasoner_build.json"
    write_json(out, result)
    print(
        f"{args.size} warm-up, {settings.steps} steps on {args.threads} threads (load average "
        f"{load_before[0]:.1f} before, {result['load_average_after'][0]:.1f} after):\n"
        f"  load + tokenize {info['seconds_load']:.0f} s, SFT {info['seconds_train']:.0f} s "
        f"({median:.2f} s/step median, {result['seconds_per_step_mean']:.2f} mean), save "
        f"{save:.0f} s: {first:.0f} s in all\n"
        f"  the preset's {preset.steps} steps: about {full / 60:.1f} min\n"
        f"  second build call {second * 1000:.1f} ms (cached), load_policy of the folder "
        f"{load:.1f} s\nwrote {out}"
    )
    return result


if __name__ == "__main__":
    main()
