"""What the Δ(x) benches share (``lld_step``, ``first_order``, ``two_at_a_time``): the series' ci
groups (``presets.GroupsPreset.ci()``: the arithmetic task's 161-token few-shot prompt, up to 48 new
tokens) on a model, and their first mixed ones; and the options of the side-by-side timing benches
(those two and ``shared_start``)."""

from __future__ import annotations

import argparse


def timing_parser(
    description: str, *, questions: int, questions_help: str = "mixed groups measured"
) -> argparse.ArgumentParser:
    """The options the side-by-side timing benches share: the model, the questions measured, the
    timed repeats after untimed warm-up rounds, torch's threads and a JSON file for the timings."""
    p = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m (embedded) or tiny-random")
    p.add_argument("--questions", type=int, default=questions, help=questions_help)
    p.add_argument("--repeats", type=int, default=3, help="timed measurements per group and way")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", default=None, help="write the timings to this file")
    return p


def parse_timing_args(
    parser: argparse.ArgumentParser, argv: list[str] | None
) -> argparse.Namespace:
    """``parser``'s arguments, refusing fewer than one question or repeat."""
    args = parser.parse_args(argv)
    if args.questions < 1 or args.repeats < 1:
        parser.error("--questions and --repeats must be >= 1")
    return args


def ci_mixed_groups(model_name: str, questions: int, sample: int | None = None):
    """(model, tokenizer, the first ``questions`` mixed groups) of the ci preset's questions (the
    first ``sample`` of them; None: all), on ``model_name`` ("smollm2-135m" or "tiny-random").
    The whole preset on its own model reuses (or samples and saves) the series' groups file; a
    random model answers nothing right, so its rewards alternate to make every group mixed."""
    import torch

    from nthr_book.groups import load_or_sample_groups
    from nthr_book.models import load_policy
    from nthr_book.presets import GroupsPreset

    preset = GroupsPreset.ci()
    model, tokenizer = load_policy(model_name, device="cpu")
    if model_name == "tiny-random" and sample is None:
        sample = questions  # its groups are all made mixed below: sample only those asked for
    problems = preset.problems()[:sample]
    path = preset.groups_path if sample is None and model_name == preset.model else None
    groups, _, _ = load_or_sample_groups(path, model, tokenizer, problems, **preset.sampling())
    if model_name == "tiny-random":
        for g in groups:
            g.rewards = torch.arange(g.group_size).remainder(2).float()
    mixed = [g for g in groups if g.status == "mixed"][:questions]
    if not mixed:
        raise SystemExit(f"no mixed group among {len(groups)} sampled: try --model smollm2-135m")
    return model, tokenizer, mixed
