"""Greedy / avg@k benchmark accuracy, resumable records, the paper's Table 2 (notebook 06).

The paper (arXiv 2505.18830, docs/method.md §4) reports greedy accuracy on AIME24, AMC23, MATH500,
Minerva and OlympiadBench, one run each, without intervals. :func:`evaluate` measures the same
quantity (``n_samples=1``, ``temperature=0``: pass@1) or avg@k (``n_samples=k`` sampled completions
per problem, accuracy = mean over problems of the mean over samples), always with a 95% interval:

* every per-problem score is 0 or 1 (always so for pass@1): the **Wilson** score interval on
  ``k`` correct problems out of ``n`` (:func:`wilson_interval`);
* otherwise (avg@k with problems solved by some but not all samples): a **normal interval on the
  per-problem means**, ``mean ± z * sd / sqrt(n)`` with the sample standard deviation (ddof=1),
  clipped to [0, 1]. Problems are the independent units, so the interval reflects between-problem
  spread and never treats the ``k`` correlated samples of a problem as independent trials.

Records. Each (problem, sample) becomes one JSON line in ``<out_dir>/<label>/<benchmark>.jsonl``
(:data:`RECORD_FIELDS`), appended and flushed as each batch finishes, next to a settings file
``<benchmark>.settings.json`` (label, model, the settings of :data:`COMPARED_SETTINGS`, library
versions). A rerun with the same settings resumes: it skips the (id, sample) pairs already on disk,
drops a torn last line left by a kill, and extends the file when ``limit`` grows. A rerun with
different settings, a different gold answer or a different prompt for a recorded id raises instead
of mixing two evaluations in one file.

Determinism. Greedy decoding is deterministic (up to the padding of the batch a problem lands in).
With ``temperature > 0`` each batch is seeded with ``seed + position of its first problem``, so a
fresh run is reproducible; a resumed run is statistically, not bitwise, equal to an uninterrupted
one.

Why one long module: the records' resume rules and the intervals are what make a table
trustworthy, and they are read together.
"""

from __future__ import annotations

import gc
import json
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from nthr_book import config
from nthr_book.data import DataNotAvailableError, build_prompt, load_benchmark
from nthr_book.env import versions
from nthr_book.io import append_jsonl, read_jsonl, write_json, write_jsonl
from nthr_book.rewards import extract_boxed, is_correct, math_rewards
from nthr_book.rollout import generate_groups
from nthr_book.stats import normal_interval, wilson_interval

__all__ = [
    "COMPARED_SETTINGS",
    "PAPER_BENCHMARKS",
    "PAPER_BENCHMARK_SIZES",
    "PAPER_TABLE2",
    "RECORD_FIELDS",
    "EvalResult",
    "evaluate",
    "evaluate_suite",
    "results_table",
]

PAPER_BENCHMARKS = ("aime24", "amc23", "math500", "minerva_math", "olympiadbench")
# Full sizes of the paper's benchmarks: one problem is 100/n points (AIME24 3.3, AMC23 2.5).
PAPER_BENCHMARK_SIZES = {
    "aime24": 30,
    "amc23": 40,
    "math500": 500,
    "minerva_math": 272,
    "olympiadbench": 675,
}
RECORD_FIELDS = (
    "id",
    "sample",
    "prompt",
    "completion",
    "extracted",
    "gold",
    "correct",
    "truncated",
)
# Settings that must match for a rerun to resume a records file (batch_size and limit may change).
COMPARED_SETTINGS = (
    "benchmark",
    "label",
    "model",
    "n_samples",
    "temperature",
    "top_p",
    "max_new_tokens",
    "template",
    "require_boxed",
    "seed",
)


def _paper_table2() -> pd.DataFrame:
    """docs/method.md §4, one row per (model, method); 'GRPO / NTHR' rows are split in two."""
    rows = [
        ("Qwen2.5-0.5B-Instruct", "base", 0.0, 2.5, 33.4, 4.4, 7.0, 9.46),
        ("Qwen2.5-0.5B-Instruct", "GRPO", 0.0, 7.5, 33.8, 9.2, 8.1, 11.72),
        ("Qwen2.5-0.5B-Instruct", "NTHR", 0.0, 10.0, 36.6, 8.1, 8.6, 12.66),
        ("Qwen2.5-Math-1.5B", "base", 3.3, 20.0, 39.6, 7.7, 24.9, 19.10),
        ("Qwen2.5-Math-1.5B", "GRPO", 13.3, 57.5, 71.8, 29.0, 34.1, 41.14),
        ("Qwen2.5-Math-1.5B", "Pos Only", 10.0, 57.5, 70.6, 30.1, 31.0, 39.84),
        ("Qwen2.5-Math-1.5B", "NTHR", 16.7, 57.5, 70.8, 30.5, 34.2, 41.94),
        ("Qwen2.5-1.5B-Instruct", "GRPO", 3.3, 32.5, 57.2, 18.8, 23.0, 26.96),
        ("Qwen2.5-1.5B-Instruct", "NTHR", 6.7, 35.0, 58.8, 21.0, 20.9, 28.48),
        ("Qwen2.5-3B", "GRPO", 6.7, 35.0, 66.6, 31.2, 29.9, 33.88),
        ("Qwen2.5-3B", "NTHR", 10.0, 47.5, 65.6, 31.6, 26.8, 36.30),
    ]
    return pd.DataFrame(rows, columns=["model", "method", *PAPER_BENCHMARKS, "avg"])


PAPER_TABLE2 = _paper_table2()  # greedy accuracy %, one run each (arXiv 2505.18830 Table 2)


# ---------------------------------------------------------------------------------------------
# Intervals
# ---------------------------------------------------------------------------------------------


def _interval(per_problem: Sequence[float]) -> tuple[float, float, str]:
    """(low, high, method): Wilson when every per-problem score is 0 or 1, else the normal
    interval."""
    if all(v in (0.0, 1.0) for v in per_problem):
        return (*wilson_interval(int(sum(per_problem)), len(per_problem)), "wilson")
    return (*normal_interval(per_problem), "normal")


# ---------------------------------------------------------------------------------------------
# Result
# ---------------------------------------------------------------------------------------------


@dataclass
class EvalResult:
    """One model on one benchmark: accuracy in [0, 1] with its 95% interval and where the records
    are."""

    benchmark: str  # benchmark name (file stem of the records)
    n: int  # number of problems
    n_samples: int  # samples per problem (1: pass@1, k: avg@k)
    accuracy: float  # mean over problems of the mean over samples, in [0, 1]
    ci_low: float  # 95% interval, in [0, 1] (see the module docstring for the method)
    ci_high: float
    records_path: Path | None  # the JSONL of per-sample records
    label: str = "model"  # the method/run label (folder name of the records)
    model: str = ""  # the model's name (basename of its name_or_path)
    settings: dict = field(default_factory=dict)  # the settings the records were made with
    ci_method: str = "wilson"  # "wilson" or "normal"
    truncated: float = 0.0  # fraction of samples that hit max_new_tokens
    per_problem: dict[str, float] = field(
        default_factory=dict, repr=False
    )  # id -> mean over samples
    seconds: float = 0.0  # wall time of this call (generation of missing samples only)

    @property
    def metric(self) -> str:
        """'pass@1' or 'avg@k'."""
        return "pass@1" if self.n_samples == 1 else f"avg@{self.n_samples}"

    @property
    def points_per_problem(self) -> float:
        """Accuracy points (%) one problem is worth: 100 / n."""
        return 100.0 / self.n

    def ci_text(self) -> str:
        """'12.5 [4.1, 25.0]': accuracy and interval in %, one decimal."""
        return f"{100 * self.accuracy:.1f} [{100 * self.ci_low:.1f}, {100 * self.ci_high:.1f}]"

    def as_row(self) -> dict[str, Any]:
        """A flat dict (percentages) for a results DataFrame."""
        return {
            "label": self.label,
            "model": self.model,
            "benchmark": self.benchmark,
            "metric": self.metric,
            "n": self.n,
            "n_samples": self.n_samples,
            "accuracy_pct": 100 * self.accuracy,
            "ci_low_pct": 100 * self.ci_low,
            "ci_high_pct": 100 * self.ci_high,
            "ci_method": self.ci_method,
            "points_per_problem": self.points_per_problem,
            "truncated": self.truncated,
            "temperature": self.settings.get("temperature"),
            "max_new_tokens": self.settings.get("max_new_tokens"),
            "seed": self.settings.get("seed"),
            "records_path": None if self.records_path is None else str(self.records_path),
        }


# ---------------------------------------------------------------------------------------------
# evaluate
# ---------------------------------------------------------------------------------------------


def _problems(benchmark, benchmark_name: str | None, data_dir) -> tuple[str, list[dict]]:
    """(name, [{id, problem, answer}]) from a benchmark name or an in-memory list/Dataset."""
    if isinstance(benchmark, str):
        name, rows = benchmark, load_benchmark(benchmark, data_dir=data_dir)
    else:
        name, rows = benchmark_name or "custom", benchmark
    problems, seen = [], set()
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or any(k not in row for k in ("id", "problem", "answer")):
            got = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise ValueError(
                f"benchmark {name!r} row {i}: needs keys id, problem, answer (got {got})"
            )
        pid = str(row["id"])
        if pid in seen:
            raise ValueError(f"benchmark {name!r} row {i}: duplicate id {pid!r}")
        seen.add(pid)
        problems.append({"id": pid, "problem": str(row["problem"]), "answer": str(row["answer"])})
    if benchmark_name is not None and isinstance(benchmark, str) and benchmark_name != benchmark:
        raise ValueError(f"benchmark_name={benchmark_name!r} contradicts benchmark={benchmark!r}")
    return name, problems


def _model_name(model) -> str:
    """Basename of the model's name_or_path ('' for an in-memory model), stable across machines."""
    name = getattr(model, "name_or_path", None) or getattr(
        getattr(model, "config", None), "_name_or_path", ""
    )
    return Path(str(name)).name if name else ""


def _check_label(label: str) -> None:
    if (
        not isinstance(label, str)
        or not label
        or label.startswith("/")
        or any(part in ("", ".", "..") for part in label.split("/"))
    ):
        raise ValueError(
            f"label must be a non-empty relative name without '.'/'..' parts, got {label!r}"
        )


def _load_records(path: Path) -> list[dict]:
    """Records on disk; a torn last line (a killed append) is removed from the file first."""
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    records = read_jsonl(path, skip_torn_tail=True)
    if text and not text.endswith("\n"):
        write_jsonl(path, records)  # rewrite without the torn line so the next append starts clean
    for lineno, rec in enumerate(records, start=1):
        missing = [k for k in RECORD_FIELDS if k not in rec]
        if missing:
            raise ValueError(f"{path}: record {lineno} lacks fields {missing}")
    return records


def saved_answers(records_path: str | Path) -> dict[str, float]:
    """Each problem's score (the mean of ``correct`` over its samples) from the records that
    ``evaluate`` wrote, without a model: how a finished run's evaluations are read back."""
    by_id: dict[str, list[bool]] = {}
    for rec in _load_records(Path(records_path)):
        by_id.setdefault(str(rec["id"]), []).append(bool(rec["correct"]))
    return {i: sum(c) / len(c) for i, c in by_id.items()}


def _check_settings(
    settings_path: Path, records_path: Path, settings: dict, has_records: bool
) -> None:
    """Raise when records exist and were made with other settings (or without a settings file)."""
    if not has_records:
        return
    if not settings_path.exists():
        raise ValueError(
            f"{records_path} holds records but its settings file {settings_path} is missing, so "
            "they cannot "
            "be checked; delete or move the records file, or use another label/out_dir."
        )
    old = json.loads(settings_path.read_text(encoding="utf-8")).get("settings", {})
    diff = {k: (old.get(k), settings[k]) for k in COMPARED_SETTINGS if old.get(k) != settings[k]}
    if diff:
        what = ", ".join(f"{k}: {a!r} on disk vs {b!r} now" for k, (a, b) in diff.items())
        raise ValueError(
            f"{records_path} was written with other settings ({what}). Refusing to mix two "
            "evaluations in "
            "one file: use another label or out_dir, or delete the file to start over."
        )


def evaluate(
    model,
    tokenizer,
    benchmark,
    *,
    n_samples: int = 1,
    temperature: float = 0.0,
    max_new_tokens: int,
    batch_size: int,
    limit: int | None = None,
    template: str = "boxed",
    require_boxed: bool = True,
    out_dir: str | Path | None = None,
    label: str = "model",
    seed: int = 0,
    progress: bool = True,
    benchmark_name: str | None = None,
    data_dir: str | Path | None = None,
) -> EvalResult:
    """Accuracy of ``model`` on ``benchmark`` (pass@1 or avg@k), resumable records; notebook 06.

    ``benchmark`` is a name for ``data.load_benchmark`` (with ``data_dir``) or a list/Dataset of
    ``{id, problem, answer}`` (then ``benchmark_name`` names the records file, default "custom").
    ``limit`` keeps the first problems. ``batch_size`` counts problems per ``generate`` call
    (``batch_size * n_samples`` sequences). Records go to ``<out_dir>/<label>/<benchmark>.jsonl``
    (``out_dir`` default ``config.runs_dir()/"eval"``); see the module docstring for resume rules.
    """
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be an int >= 1, got {n_samples!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if (
        isinstance(max_new_tokens, bool)
        or not isinstance(max_new_tokens, int)
        or max_new_tokens < 1
    ):
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be None or an int >= 1, got {limit!r}")
    _check_label(label)
    if temperature == 0 and n_samples > 1:
        warnings.warn(
            f"n_samples={n_samples} with temperature=0: greedy samples are identical, avg@k = "
            "pass@1",
            stacklevel=2,
        )

    name, problems = _problems(benchmark, benchmark_name, data_dir)
    if limit is not None:
        problems = problems[:limit]
    if not problems:
        raise ValueError(f"benchmark {name!r} has no problems")
    model_name = _model_name(model)
    settings = {
        "benchmark": name,
        "label": label,
        "model": model_name,
        "n_samples": n_samples,
        "temperature": float(temperature),
        "top_p": 1.0,
        "max_new_tokens": max_new_tokens,
        "template": template,
        "require_boxed": bool(require_boxed),
        "seed": int(seed),
    }

    out_dir = Path(out_dir) if out_dir is not None else config.runs_dir() / "eval"
    records_path = out_dir / label / f"{name}.jsonl"
    settings_path = out_dir / label / f"{name}.settings.json"
    records = _load_records(records_path)
    _check_settings(settings_path, records_path, settings, bool(records))
    write_json(
        settings_path,
        {
            "settings": settings,
            "info": {
                "model_name_or_path": str(getattr(model, "name_or_path", "") or ""),
                "batch_size": batch_size,
                "limit": limit,
                "num_problems": len(problems),
            },
            "versions": versions(),
        },
    )

    # Index the records on disk and check them against the problems they claim to answer.
    prompts = {p["id"]: build_prompt(tokenizer, p["problem"], template) for p in problems}
    golds = {p["id"]: p["answer"] for p in problems}
    done: dict[tuple[str, int], dict] = {}
    for lineno, rec in enumerate(records, start=1):
        key = (str(rec["id"]), int(rec["sample"]))
        if key in done:
            raise ValueError(
                f"{records_path}: record {lineno} repeats id {key[0]!r} sample {key[1]}"
            )
        if key[0] in golds:
            if rec["gold"] != golds[key[0]]:
                raise ValueError(
                    f"{records_path}: record {lineno} (id {key[0]!r}) has gold {rec['gold']!r} but "
                    f"the benchmark now says {golds[key[0]]!r}: the data changed; start a new file"
                )
            if rec["prompt"] != prompts[key[0]]:
                raise ValueError(
                    f"{records_path}: record {lineno} (id {key[0]!r}) was made from another prompt "
                    "(tokenizer or chat template changed?); start a new file"
                )
        done[key] = rec

    # Problems with at least one missing sample are generated again; only missing samples are
    # written.
    position = {p["id"]: i for i, p in enumerate(problems)}
    todo = [p for p in problems if any((p["id"], s) not in done for s in range(n_samples))]
    start_time = time.perf_counter()
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc=f"eval {label}/{name}", unit="problem")
    try:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            batch_prompts = [prompts[p["id"]] for p in batch]
            rollouts = generate_groups(
                model,
                tokenizer,
                batch_prompts,
                n_samples,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                batch_size=len(batch) * n_samples,
                seed=int(seed) + position[batch[0]["id"]],
            )
            batch_golds = [
                p["answer"] for p in batch for _ in range(n_samples)
            ]  # group-major, like texts
            rewards = math_rewards(rollouts.texts, batch_golds, require_boxed=require_boxed)
            truncated = rollouts.truncated.tolist()
            for g, p in enumerate(batch):
                for s in range(n_samples):
                    if (p["id"], s) in done:
                        continue
                    row = g * n_samples + s
                    rec = {
                        "id": p["id"],
                        "sample": s,
                        "prompt": batch_prompts[g],
                        "completion": rollouts.texts[row],
                        "extracted": extract_boxed(rollouts.texts[row]),
                        "gold": p["answer"],
                        "correct": bool(is_correct(rewards[row])),
                        "truncated": bool(truncated[row]),
                    }
                    append_jsonl(records_path, rec)
                    done[(p["id"], s)] = rec
            if bar is not None:
                bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()

    per_problem = {
        p["id"]: sum(done[(p["id"], s)]["correct"] for s in range(n_samples)) / n_samples
        for p in problems
    }
    scores = list(per_problem.values())
    low, high, method = _interval(scores)
    n_trunc = sum(done[(p["id"], s)]["truncated"] for p in problems for s in range(n_samples))
    return EvalResult(
        benchmark=name,
        n=len(problems),
        n_samples=n_samples,
        accuracy=sum(scores) / len(scores),
        ci_low=low,
        ci_high=high,
        records_path=records_path,
        label=label,
        model=model_name,
        settings=settings,
        ci_method=method,
        truncated=n_trunc / (len(problems) * n_samples),
        per_problem=per_problem,
        seconds=time.perf_counter() - start_time,
    )


def evaluate_suite(
    models: Mapping[str, Any],
    benchmarks: Sequence[str] | Mapping[str, Any],
    *,
    load: Callable[[Any], tuple[Any, Any]] | None = None,
    log: Callable[[str], None] | None = print,
    **evaluate_kwargs: Any,
) -> list[EvalResult]:
    """Every model on every benchmark; notebook 06 and ``scripts/evaluate_benchmarks.py``.

    ``models`` maps a label to what ``load`` takes (default ``models.load_policy``: an embedded
    name, hub id or folder); each model is loaded once, evaluated on every benchmark, then freed.
    ``benchmarks`` are names (loaded by :func:`evaluate`; one that is not reachable is skipped with
    a note through ``log``) or ``{name: rows}``. ``evaluate_kwargs`` go to :func:`evaluate`
    (``max_new_tokens`` and ``batch_size`` are required there). Results come model-major, in the
    order given.
    """
    if load is None:
        from nthr_book.models import load_policy as load
    say = log or (lambda _msg: None)
    items = (
        list(benchmarks.items())
        if isinstance(benchmarks, Mapping)
        else [(b, b) for b in benchmarks]
    )
    for name, _ in items:
        if not isinstance(name, str):
            raise TypeError(f"benchmark names must be strings, got {name!r}")
    results: list[EvalResult] = []
    unreachable: set[str] = set()
    for label, source in models.items():
        model, tokenizer = load(source)
        for name, rows in items:
            if name in unreachable:
                continue
            try:
                res = evaluate(
                    model, tokenizer, rows, benchmark_name=name, label=label, **evaluate_kwargs
                )
            except DataNotAvailableError as exc:
                unreachable.add(name)
                say(f"{name}: skipped ({exc})")
                continue
            results.append(res)
            say(f"{label:5s} {name:14s} {res.ci_text()}  (truncated {res.truncated:.0%})")
        del model, tokenizer
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return results


# ---------------------------------------------------------------------------------------------
# Table
# ---------------------------------------------------------------------------------------------


def results_table(
    results: Sequence[EvalResult],
    *,
    paper_model: str | None = "Qwen2.5-0.5B-Instruct",
    numeric: bool = False,
) -> pd.DataFrame:
    """Our results next to the paper's Table 2 rows for ``paper_model`` (notebook 06).

    Rows are indexed by (source, method): the paper's rows ("paper", method) first, then ours
    ("ours", label) in order of appearance, then ("noise", "1 problem = pts") with 100/n per
    benchmark (our n when we ran it, else the full benchmark size). Columns: the five paper
    benchmarks, any other benchmark we ran, then "avg" over the five paper benchmarks (only when a
    row has all five). Cells are text, "12.5 [4.1, 25.0]" for ours, or floats (accuracy %, NaN when
    absent) with ``numeric``. ``df.attrs["points_per_problem"]`` holds the noise row as a dict.
    """
    results = list(results)
    for i, r in enumerate(results):
        if not isinstance(r, EvalResult):
            raise TypeError(f"results[{i}] must be an EvalResult, got {type(r).__name__}")
    seen: dict[tuple[str, str], int] = {}
    for i, r in enumerate(results):
        key = (r.label, r.benchmark)
        if key in seen:
            raise ValueError(
                f"results[{seen[key]}] and results[{i}] are both label {r.label!r} on "
                f"{r.benchmark!r}; "
                "give each run its own label (e.g. 'grpo/seed1')"
            )
        seen[key] = i
    extra = [b for b in dict.fromkeys(r.benchmark for r in results) if b not in PAPER_BENCHMARKS]
    columns = [*PAPER_BENCHMARKS, *extra, "avg"]

    index: list[tuple[str, str]] = []
    values: list[dict[str, float]] = []  # accuracy % per column
    texts: list[dict[str, str]] = []
    if paper_model is not None:
        paper = PAPER_TABLE2[PAPER_TABLE2["model"] == paper_model]
        if paper.empty:
            raise ValueError(
                f"paper_model={paper_model!r} is not in PAPER_TABLE2; "
                f"choose one of {sorted(PAPER_TABLE2['model'].unique())} or None"
            )
        for _, row in paper.iterrows():
            index.append(("paper", row["method"]))
            values.append({c: float(row[c]) for c in (*PAPER_BENCHMARKS, "avg")})
            texts.append(
                {c: f"{row[c]:.1f}" for c in PAPER_BENCHMARKS} | {"avg": f"{row['avg']:.2f}"}
            )

    for label in dict.fromkeys(r.label for r in results):
        mine = {r.benchmark: r for r in results if r.label == label}
        vals = {b: 100 * r.accuracy for b, r in mine.items()}
        txt = {b: r.ci_text() for b, r in mine.items()}
        if all(b in mine for b in PAPER_BENCHMARKS):
            vals["avg"] = sum(vals[b] for b in PAPER_BENCHMARKS) / len(PAPER_BENCHMARKS)
            txt["avg"] = f"{vals['avg']:.2f}"
        index.append(("ours", label))
        values.append(vals)
        texts.append(txt)

    points = {}
    for b in columns[:-1]:
        ns = {r.n for r in results if r.benchmark == b}
        if len(ns) > 1:  # different limits across labels: report the smallest n (the noisiest)
            points[b] = 100.0 / min(ns)
        elif ns:
            points[b] = 100.0 / ns.pop()
        else:
            points[b] = 100.0 / PAPER_BENCHMARK_SIZES[b]
    index.append(("noise", "1 problem = pts"))
    values.append(dict(points))
    texts.append({b: f"{v:.2f}" for b, v in points.items()})

    cells = values if numeric else texts
    fill = float("nan") if numeric else ""
    df = pd.DataFrame(
        [[row.get(c, fill) for c in columns] for row in cells],
        columns=columns,
        index=pd.MultiIndex.from_tuples(index, names=["source", "method"]),
    )
    df.attrs["points_per_problem"] = points
    return df
