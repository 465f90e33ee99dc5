"""The warm-up reasoner against the base model on held-out products (issue 23 §1, reasoner.py).

Builds (or loads from the cache) ``smollm2-135m-reasoner`` at a run size, samples ``--group-size``
answers at ``--temperature`` and one greedy answer for each of ``--n`` held-out questions
(``experiments.heldout_problems`` of ``TrainConfig.fast_reasoner()``: disjoint from the warm-up
and the RL pool) with the reasoner and with the base model, and measures for each:

- the success rate over all samples with a Wilson interval, and with the interval over questions
  (``evaluate.normal_interval`` of the per-question rates: the samples of a question are not
  independent), and greedy with a Wilson interval;
- the share of mixed groups (some answers right, some wrong; what GRPO learns from), Wilson;
- how much a wrong answer shares with a right one: ``similarity.shared_prefix_share`` per mixed
  group (the regime map's measure), median, mean and quartiles;
- for the reasoner's wrong answers, how many keep the solution's format and at which step of the
  reference solution they first differ (``first_slip``).

The base model answers with its own tuned prompt (``--base-template``, default "arithmetic": the
two one-line examples), the reasoner with the template it was fine-tuned on. Writes under ``--out``
(default ``<build>/warmup_reasoner/<size>``): ``summary.json`` (settings, seeds, versions, timings,
the numbers above), ``questions.csv`` (one row per model and question), ``samples.jsonl`` (every
answer, graded) and ``loss_curve.csv`` (the warm-up's, from the cache). Prints the numbers and a
few right and wrong answers side by side.

    python scripts/warmup_reasoner.py                         # laptop size: ~8 min build + ~10 min
    NTHR_BOOK_SIZE=ci python scripts/warmup_reasoner.py --n 16 --no-base   # the ci warm-up
    python scripts/warmup_reasoner.py --set steps=80 --set lr=2e-4 --no-base   # tuning
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import statistics
import sys
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from nthr_book import config, data, env, models, reasoner  # noqa: E402
from nthr_book.evaluate import normal_interval, wilson_interval  # noqa: E402
from nthr_book.experiments import heldout_problems  # noqa: E402
from nthr_book.groups import sample_groups  # noqa: E402
from nthr_book.io import atomic_write_text, write_json, write_jsonl  # noqa: E402
from nthr_book.similarity import shared_prefix_share  # noqa: E402
from nthr_book.trainer import TrainConfig  # noqa: E402

# A worked solution as reasoner.worked_solution writes it, whatever its numbers.
SOLUTION_FORMAT = re.compile(
    r"\d+\*\d+ = \d+\*\d+(?: \+ \d+\*\d+)+ = \d+(?: \+ \d+)+(?: = \d+(?: \+ \d+)+)*"
    r" = \\boxed\{\d+\}"
)


def _setting(text: str) -> tuple[str, object]:
    """'steps=80' -> ('steps', 80), typed as the ReasonerSettings field."""
    key, _, value = text.partition("=")
    types = {f.name: f.type for f in dataclasses.fields(reasoner.ReasonerSettings)}
    if key not in types or not value:
        raise argparse.ArgumentTypeError(
            f"--set {text!r}: expected FIELD=VALUE with FIELD one of {sorted(types)}"
        )
    kind = {"int": int, "float": float, "str": str, "bool": _flag}[types[key]]
    try:
        return key, kind(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--set {text!r}: {exc}") from None


def _flag(text: str) -> bool:
    """'true'/'1'/'yes' or 'false'/'0'/'no'."""
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=config.RUN_SIZES, default=None, help="default: NTHR_BOOK_SIZE")
    p.add_argument(
        "--set",
        type=_setting,
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a ReasonerSettings field (a distinct cache entry)",
    )
    p.add_argument("--n", type=int, default=64, help="held-out questions")
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--temperature", type=float, default=reasoner.TEMPERATURE)
    p.add_argument("--max-new-tokens", type=int, default=reasoner.MAX_NEW_TOKENS)
    p.add_argument("--batch-size", type=int, default=64, help="sequences per generate call")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--base-template", default="arithmetic", help="the base model's prompt")
    p.add_argument("--no-base", dest="base", action="store_false", help="skip the base model")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--show", type=int, default=4, help="mixed groups shown side by side")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    for name in ("n", "group_size", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.group_size < 2:
        p.error("--group-size must be >= 2 (a group of one is never mixed)")
    try:
        data.format_problem("", args.base_template)
    except ValueError as exc:
        p.error(str(exc))
    return args


def first_slip(text: str, solution: str) -> int:
    """The index of the first ' = '-separated step where ``text`` leaves ``solution`` (0: the
    restated product, 1: the decomposition, 2: the partial products, 3+: the running totals and
    the boxed answer); -1 when none differs."""
    got, want = text.strip().split(" = "), solution.split(" = ")
    for i, step in enumerate(want):
        if i >= len(got) or got[i] != step:
            return i
    return -1 if len(got) == len(want) else len(want)


def measure(label, model, tokenizer, problems, args, template) -> tuple[dict, list, list]:
    """One model's numbers (summary dict), its per-question rows and its graded samples."""
    start = time.perf_counter()
    kwargs = dict(template=template, require_boxed=True, batch_size=args.batch_size)
    groups = sample_groups(
        model,
        tokenizer,
        problems,
        group_size=args.group_size,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        seed=args.seed,
        progress=True,
        **kwargs,
    )
    greedy = sample_groups(
        model,
        tokenizer,
        problems,
        group_size=1,
        max_new_tokens=args.max_new_tokens,
        temperature=0.0,
        seed=args.seed,
        **kwargs,
    )
    by_id = {p["id"]: p for p in problems}
    questions, samples, prefixes = [], [], []
    for g, gg in zip(groups, greedy):
        ro = g.rollouts
        share = shared_prefix_share(ro.completion_ids, ro.completion_mask, g.correct)
        if g.status == "mixed":
            prefixes.append(share)
        questions.append(
            {
                "model": label,
                "id": g.question_id,
                "problem": g.problem,
                "answer": g.answer,
                "num_partials": by_id[g.question_id]["num_partials"],
                "n_correct": g.n_correct,
                "rate": g.p,
                "status": g.status,
                "greedy_correct": bool(gg.correct[0]),
                "shared_prefix": share,
            }
        )
        solution = by_id[g.question_id]["solution"]
        for text, ok, cut in zip(ro.texts, g.correct.tolist(), ro.truncated.tolist()):
            samples.append(
                {
                    "model": label,
                    "id": g.question_id,
                    "text": text,
                    "correct": ok,
                    "truncated": cut,
                    "format_ok": bool(SOLUTION_FORMAT.fullmatch(text.strip())),
                    "first_slip": first_slip(text, solution),
                }
            )
    n, G = len(groups), args.group_size
    k = sum(q["n_correct"] for q in questions)
    k_greedy = sum(q["greedy_correct"] for q in questions)
    mixed = sum(q["status"] == "mixed" for q in questions)
    wrong = [s for s in samples if not s["correct"]]
    slips = pd.Series([s["first_slip"] for s in wrong if s["format_ok"]], dtype=int)
    summary = {
        "model": label,
        "template": template,
        "questions": n,
        "samples": n * G,
        "success": k / (n * G),
        "success_wilson": wilson_interval(k, n * G),
        "success_over_questions": normal_interval([q["rate"] for q in questions]),
        "greedy_success": k_greedy / n,
        "greedy_wilson": wilson_interval(k_greedy, n),
        "mixed_share": mixed / n,
        "mixed_wilson": wilson_interval(mixed, n),
        "all_wrong_share": sum(q["status"] == "all_wrong" for q in questions) / n,
        "all_correct_share": sum(q["status"] == "all_correct" for q in questions) / n,
        "shared_prefix_median": statistics.median(prefixes) if prefixes else None,
        "shared_prefix_mean": statistics.fmean(prefixes) if prefixes else None,
        "shared_prefix_quartiles": (
            statistics.quantiles(prefixes, n=4) if len(prefixes) > 1 else None
        ),
        "wrong_format_ok_share": (
            sum(s["format_ok"] for s in wrong) / len(wrong) if wrong else None
        ),
        "wrong_first_slip_counts": {int(i): int(c) for i, c in slips.value_counts().items()},
        "truncated_share": sum(s["truncated"] for s in samples) / len(samples),
        "success_by_partials": {
            int(m): sum(q["n_correct"] for q in questions if q["num_partials"] == m)
            / (G * sum(q["num_partials"] == m for q in questions))
            for m in sorted({q["num_partials"] for q in questions})
        },
        "seconds": time.perf_counter() - start,
    }
    return summary, questions, samples


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def report(s: dict) -> str:
    """The summary of one model in a few lines."""
    lo, hi = s["success_wilson"]
    qlo, qhi = s["success_over_questions"]
    glo, ghi = s["greedy_wilson"]
    mlo, mhi = s["mixed_wilson"]
    lines = [
        f"{s['model']} ({s['template']} prompt), {s['questions']} questions x "
        f"{s['samples'] // s['questions']}:",
        f"  success at T: {_pct(s['success'])}% [{_pct(lo)}, {_pct(hi)}] Wilson over samples, "
        f"[{_pct(qlo)}, {_pct(qhi)}] over questions; by partial products "
        + ", ".join(f"{m}: {_pct(v)}%" for m, v in s["success_by_partials"].items()),
        f"  greedy: {_pct(s['greedy_success'])}% [{_pct(glo)}, {_pct(ghi)}]",
        f"  mixed groups: {_pct(s['mixed_share'])}% [{_pct(mlo)}, {_pct(mhi)}] (all wrong "
        f"{_pct(s['all_wrong_share'])}%, all right {_pct(s['all_correct_share'])}%)",
    ]
    if s["shared_prefix_median"] is not None:
        q = s["shared_prefix_quartiles"] or [float("nan")] * 3
        lines.append(
            f"  shared prefix of a wrong answer with a right one, per mixed group: median "
            f"{s['shared_prefix_median']:.2f}, mean {s['shared_prefix_mean']:.2f}, quartiles "
            f"{q[0]:.2f}-{q[2]:.2f}"
        )
    if s["wrong_format_ok_share"] is not None:
        lines.append(
            f"  wrong answers in the solution's format: {_pct(s['wrong_format_ok_share'])}%; "
            f"first differing step (0 restated, 1 decomposition, 2 partial products, 3+ sums): "
            f"{dict(sorted(s['wrong_first_slip_counts'].items()))}"
        )
    lines.append(f"  truncated: {_pct(s['truncated_share'])}%, {s['seconds']:.0f} s")
    return "\n".join(lines)


def side_by_side(questions: list[dict], samples: list[dict], label: str, show: int) -> str:
    """A right and a wrong answer of the first ``show`` mixed groups of ``label``."""
    out = []
    for q in [q for q in questions if q["model"] == label and q["status"] == "mixed"][:show]:
        answers = [s for s in samples if s["model"] == label and s["id"] == q["id"]]
        right = next(s["text"] for s in answers if s["correct"])
        wrong = next(s["text"] for s in answers if not s["correct"])
        out.append(
            f"{q['problem']} (answer {q['answer']}, {q['n_correct']}/{len(answers)} right)\n"
            f"  right: {right.strip()}\n  wrong: {wrong.strip()}"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    size = args.size or config.run_size()
    settings = dataclasses.replace(reasoner.ReasonerSettings.for_size(size), **dict(args.set))
    out = args.out or config.build_dir() / "warmup_reasoner" / size
    out.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    built_before = reasoner.is_built(config.cache_dir() / settings.folder_name)
    folder = models.reasoner_dir(settings)
    build_seconds = time.perf_counter() - start
    info = json.loads((folder / "reasoner.json").read_text())
    curve = pd.read_csv(folder / "loss_curve.csv")
    atomic_write_text(out / "loss_curve.csv", curve.to_csv(index=False))
    print(
        f"reasoner {folder.name}: {'loaded from the cache' if built_before else 'built'} in "
        f"{build_seconds:.0f} s (its build: {info['seconds_total']:.0f} s, "
        f"{info['seconds_per_step']:.2f} s/step on {info['torch_threads']} threads); loss "
        f"{curve['loss'].iloc[0]:.3f} -> {curve['loss'].tail(5).mean():.3f} (mean of the last 5)"
    )

    problems = heldout_problems(TrainConfig.fast_reasoner(), args.n)
    runs = [("reasoner", str(folder), reasoner.TEMPLATE_NAME)]
    if args.base:
        runs.append(("base", settings.base, args.base_template))
    summaries, questions, samples = [], [], []
    for label, source, template in runs:
        model, tokenizer = models.load_policy(source)
        summary, q, s = measure(label, model, tokenizer, problems, args, template)
        del model
        summaries.append(summary)
        questions += q
        samples += s
        print(report(summary))

    atomic_write_text(out / "questions.csv", pd.DataFrame(questions).to_csv(index=False))
    write_jsonl(out / "samples.jsonl", samples)
    result = {
        "size": size,
        "settings": dataclasses.asdict(settings),
        "cache_folder": str(folder),
        "build": info,
        "build_seconds_this_call": build_seconds,
        "loaded_from_cache": built_before,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "heldout_ids": [p["id"] for p in problems],
        "versions": env.versions(),
        "torch_threads": torch.get_num_threads(),
        "models": summaries,
    }
    write_json(out / "summary.json", result)
    print("\nright and wrong answers of the reasoner, side by side:")
    print(side_by_side(questions, samples, "reasoner", args.show))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
