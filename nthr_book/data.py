"""Benchmarks, the MATH training split, a synthetic arithmetic task and prompts (arXiv 2505.18830).

The paper trains on MATH levels 3-5 and evaluates on AIME24, AMC23, MATH500, Minerva Math and
OlympiadBench; GSM8K is added as an easier yardstick. Every benchmark loads as a
``datasets.Dataset`` with string columns ``id``, ``problem`` and ``answer`` (plus ``level``,
``subject``, ``unique_id`` and the like where the source has them), whatever the source's field
names and answer formats are.

Where the files come from, first hit wins (see ``data/README.md``):

1. the ``data_dir`` argument, 2. ``$NTHR_BOOK_DATA``, 3. the project's ``data/``,
4. ``../shared/data/eval`` beside the project (``config.shared_eval_dir()``), each as
``<folder>/<name>.jsonl``; 5. the Hugging Face hub (``HUB_SOURCES``), only when it can be reached.

The embedded SmolLM2-135M cannot solve any of these, so the CPU run sizes use
:func:`arithmetic_problems`, a synthetic family with difficulty knobs whose defaults put the
embedded model's per-question success rate inside (0, 1) (measured by
``bench/arithmetic_difficulty.py``; notebook 00).

Why one long module: one converter per benchmark source (each a few lines) and the
search order they share; no formula of the method lives here.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import socket
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from nthr_book import config
from nthr_book import reasoner as _reasoner
from nthr_book.io import iter_jsonl_numbered
from nthr_book.rewards import extract_boxed

__all__ = [
    "ARITHMETIC_EXAMPLES",
    "ARITHMETIC_MAX_NEW_TOKENS",
    "ARITHMETIC_REQUIRE_BOXED",
    "ARITHMETIC_TEMPERATURE",
    "ARITHMETIC_TEMPLATE",
    "ARITHMETIC_TEST_FRACTION",
    "BENCHMARKS",
    "DATA_ENV",
    "HUB_SOURCES",
    "PROMPT_EXAMPLES",
    "PROMPT_TEMPLATES",
    "DataNotAvailableError",
    "arithmetic_problems",
    "arithmetic_split",
    "benchmark_search_dirs",
    "build_prompt",
    "format_problem",
    "load_benchmark",
    "load_math_train",
]

DATA_ENV = "NTHR_BOOK_DATA"
BENCHMARKS = ("aime24", "amc23", "math500", "minerva_math", "olympiadbench", "gsm8k")
MATH_TRAIN = "math_train"  # local file name (math_train.jsonl) of the MATH train split, if provided

# Hub equivalents for machines with network access: (dataset id, config name, split). Field names
# differ from the local files; the row converters below accept both spellings.
HUB_SOURCES: dict[str, tuple[str, str | None, str]] = {
    "aime24": ("HuggingFaceH4/aime_2024", None, "train"),
    "amc23": ("math-ai/amc23", None, "test"),
    "math500": ("HuggingFaceH4/MATH-500", None, "test"),
    "minerva_math": ("math-ai/minervamath", None, "test"),
    "olympiadbench": ("Hothan/OlympiadBench", "OE_TO_maths_en_COMP", "train"),
    "gsm8k": ("openai/gsm8k", "main", "test"),
}
MATH_TRAIN_HUB = "EleutherAI/hendrycks_math"
MATH_TRAIN_SUBJECTS = (
    "algebra",
    "counting_and_probability",
    "geometry",
    "intermediate_algebra",
    "number_theory",
    "prealgebra",
    "precalculus",
)
HUB_PROBE_TIMEOUT_S = 3.0  # how long to wait for a TCP connection to the hub before giving up


class DataNotAvailableError(FileNotFoundError):
    """A data set is in none of the searched folders and could not be fetched from the hub."""


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------

# The instruction used by the paper (Qwen2.5-Math's evaluation prompt).
BOXED_TEMPLATE = (
    "{problem}\nPlease reason step by step, and put your final answer within \\boxed{}."
)
# Tuned for the embedded SmolLM2-135M on arithmetic_problems (bench/arithmetic_difficulty.py). Asked
# for \boxed{} in words only, the 135M model boxes almost nothing; shown two solved questions as
# earlier chat turns (ARITHMETIC_EXAMPLES), it boxes every answer, stops after one line, and its
# wrong answers differ from the right ones in the number only ("7 * 3 = 18. The answer is
# \boxed{18}."): the near-miss negatives under which LLD shows.
ARITHMETIC_TEMPLATE = "{problem}\nAnswer in one sentence, with the final answer in \\boxed{}."
ARITHMETIC_EXAMPLES: tuple[tuple[str, str], ...] = (
    ("What is 3 + 4?", "3 + 4 = 7. The answer is \\boxed{7}."),
    ("What is 6 * 2?", "6 * 2 = 12. The answer is \\boxed{12}."),
)
PROMPT_TEMPLATES: dict[str, str] = {
    "boxed": BOXED_TEMPLATE,
    "arithmetic": ARITHMETIC_TEMPLATE,
    _reasoner.TEMPLATE_NAME: _reasoner.TEMPLATE,  # the warm-up's worked products (reasoner.py)
    "plain": "{problem}",
}
# Solved examples that a named template puts before the question as earlier chat turns.
PROMPT_EXAMPLES: dict[str, tuple[tuple[str, str], ...]] = {"arithmetic": ARITHMETIC_EXAMPLES}
ARITHMETIC_REQUIRE_BOXED = True  # the arithmetic reward needs \boxed{} (the examples elicit it)
ARITHMETIC_MAX_NEW_TOKENS = 48  # the answers take about 20 tokens; longer ones are rambling
ARITHMETIC_TEMPERATURE = 1.0  # the sampling temperature the difficulty defaults were tuned at


def _resolve_template(template: str) -> str:
    """The template string for a name in PROMPT_TEMPLATES or a custom string containing
    '{problem}'."""
    if not isinstance(template, str):
        raise TypeError(f"template must be a str, got {type(template).__name__}")
    if template in PROMPT_TEMPLATES:
        return PROMPT_TEMPLATES[template]
    if "{problem}" in template:
        return template
    raise ValueError(
        f"template={template!r}: not a known name ({', '.join(sorted(PROMPT_TEMPLATES))}) "
        "and not a custom string containing '{problem}'"
    )


def format_problem(problem: str, template: str = "boxed") -> str:
    """The user message: ``template`` (a name or a string with '{problem}') filled with
    ``problem``."""
    if not isinstance(problem, str):
        raise TypeError(f"problem must be a str, got {type(problem).__name__}")
    # replace, not str.format: every other brace in a template is literal, as in \boxed{}
    return _resolve_template(template).replace("{problem}", problem)


def _check_examples(examples: object) -> tuple[tuple[str, str], ...]:
    """Examples as a tuple of (problem, response) string pairs; TypeError naming the bad item."""
    if isinstance(examples, (str, bytes)) or not isinstance(examples, Sequence):
        raise TypeError(
            f"examples must be a sequence of (problem, response) pairs, got {examples!r}"
        )
    out = []
    for i, pair in enumerate(examples):
        if (
            isinstance(pair, (str, bytes))
            or not isinstance(pair, Sequence)
            or len(pair) != 2
            or not all(isinstance(x, str) for x in pair)
        ):
            raise TypeError(
                f"examples[{i}] must be a (problem, response) pair of strings, got {pair!r}"
            )
        out.append((pair[0], pair[1]))
    return tuple(out)


def build_prompt(
    tokenizer,
    problem: str,
    template: str = "boxed",
    *,
    examples: Sequence[tuple[str, str]] | None = None,
) -> str:
    """The chat-formatted prompt asking ``problem`` with ``template``'s instruction (notebook 00).

    ``template`` is a key of ``PROMPT_TEMPLATES`` ("boxed": the paper's Qwen-math instruction,
    "arithmetic": the one tuned for the embedded model, "plain": the bare problem) or a custom
    string containing ``{problem}``, the only placeholder (every other brace is literal, as in
    ``\\boxed{}``). ``examples`` are solved (problem, response) pairs put first as earlier
    user/assistant turns, each problem filled into the same template; ``None`` takes the named
    template's ``PROMPT_EXAMPLES`` (the two arithmetic examples for "arithmetic", none otherwise),
    ``()`` none. The result ends with the assistant header (``add_generation_prompt=True``). A
    tokenizer without a chat template gets plain text: the examples' turns and the question
    separated by blank lines.
    """
    content = format_problem(problem, template)
    if examples is None:
        examples = PROMPT_EXAMPLES.get(template, ())
    messages = []
    for shown, response in _check_examples(examples):
        messages += [
            {"role": "user", "content": format_problem(shown, template)},
            {"role": "assistant", "content": response},
        ]
    messages.append({"role": "user", "content": content})
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return "\n\n".join(m["content"] for m in messages)


# ---------------------------------------------------------------------------------------------
# Row conversion: one function per source format, each returning the common schema
# ---------------------------------------------------------------------------------------------


class _RowError(ValueError):
    """A row that cannot be converted; the loader prefixes file and line."""


def _field(row: dict, *names: str) -> Any:
    """The first present, non-null field among ``names``; _RowError naming them otherwise."""
    for name in names:
        if row.get(name) is not None:
            return row[name]
    raise _RowError(f"missing field {' or '.join(repr(n) for n in names)} (fields: {sorted(row)})")


def _text(row: dict, *names: str) -> str:
    """A non-empty string field (see _field)."""
    value = _field(row, *names)
    if not isinstance(value, str):
        raise _RowError(
            f"field {names[0]!r} must be a string, got {type(value).__name__}: {value!r}"
        )
    if not value.strip():
        raise _RowError(f"field {names[0]!r} is empty")
    return value


def _number_answer(value: Any) -> str:
    """A JSON number or string as an answer string: 27.0 -> '27', 0.5 -> '0.5', '023' kept."""
    if isinstance(value, bool):
        raise _RowError(f"answer must be a number or a string, got a bool: {value!r}")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, str) and value.strip():
        return value.strip()
    raise _RowError(f"answer must be a number or a non-empty string, got {value!r}")


_INLINE_DOLLAR_RE = re.compile(r"(?<!\\)\$")


def _strip_dollars(s: str) -> str:
    """``$2n$`` -> ``2n``; ``$69$,$84$`` -> ``69,84`` (math delimiters; an escaped ``\\$``
    stays)."""
    s = s.strip()
    if s.startswith("$") and s.endswith("$."):  # '$(-\\infty, 0)$.': a sentence's full stop
        s = s[:-1]
    if s.startswith("$") and s.endswith("$") and len(s) >= 2:
        s = _INLINE_DOLLAR_RE.sub("", s)
    return s.strip()


def _id(name: str, row: dict, index: int, *keys: str) -> str:
    """``<name>/<source id>`` from the first present key, else ``<name>/<row index>``."""
    for key in keys:
        if row.get(key) is not None:
            return f"{name}/{row[key]}"
    return f"{name}/{index}"


def _convert_aime24(row: dict, index: int) -> dict:
    return {
        "id": _id("aime24", row, index, "id"),
        "problem": _text(row, "problem", "question"),
        "answer": _number_answer(_field(row, "answer")),
        "url": str(row.get("url") or ""),
    }


def _convert_amc23(row: dict, index: int) -> dict:
    return {
        "id": _id("amc23", row, index, "id"),
        "problem": _text(row, "problem", "question"),
        "answer": _number_answer(_field(row, "answer")),
        "url": str(row.get("url") or ""),
    }


def _convert_math500(row: dict, index: int) -> dict:
    level = row.get("level")
    return {
        "id": _id("math500", row, index, "unique_id"),
        "problem": _text(row, "problem"),
        "answer": _text(row, "answer").strip(),
        "level": _level(level) if level is not None else 0,
        "subject": str(row.get("subject") or ""),
        "unique_id": str(row.get("unique_id") or ""),
    }


def _convert_minerva(row: dict, index: int) -> dict:
    if row.get("answer") is not None:  # hub copies carry the extracted answer
        answer = _number_answer(row["answer"])
    else:
        solution = _text(row, "solution")
        answer = extract_boxed(solution)
        if answer is None or not answer.strip():
            raise _RowError("field 'solution' has no non-empty \\boxed{...} answer")
        answer = answer.strip()
    return {
        "id": _id("minerva_math", row, index, "idx", "id"),
        "problem": _text(row, "problem", "question"),
        "answer": answer,
        "subject": str(row.get("type") or row.get("subject") or ""),
    }


def _convert_olympiadbench(row: dict, index: int) -> dict:
    final = _field(row, "final_answer", "answer")
    parts = [final] if isinstance(final, str) else final
    if not isinstance(parts, list) or not parts or not all(isinstance(p, str) for p in parts):
        raise _RowError(f"field 'final_answer' must be a non-empty list of strings, got {final!r}")
    answer = ", ".join(_strip_dollars(p) for p in parts)
    if not answer.strip(", "):
        raise _RowError("field 'final_answer' is empty")
    return {
        "id": _id("olympiadbench", row, index, "id"),
        "problem": _text(row, "question", "problem"),
        "answer": answer,
        "subject": str(row.get("subfield") or ""),
        "answer_type": str(row.get("answer_type") or ""),
        "unit": str(row.get("unit") or ""),
        "is_multiple_answer": bool(row.get("is_multiple_answer", len(parts) > 1)),
    }


def _convert_gsm8k(row: dict, index: int) -> dict:
    solution = _text(row, "answer")
    if "####" not in solution:
        raise _RowError("field 'answer' has no '#### <number>' final answer")
    answer = solution.rsplit("####", 1)[1].strip().replace(",", "")
    if not answer:
        raise _RowError("field 'answer' has nothing after '####'")
    return {
        "id": _id("gsm8k", row, index, "idx", "id"),
        "problem": _text(row, "question", "problem"),
        "answer": answer,
        "solution": solution,
    }


def _level(value: Any) -> int:
    """MATH level as an int: 3 or 'Level 3' -> 3 ('Level ?' -> 0)."""
    if isinstance(value, bool):
        raise _RowError(f"level must be an int or 'Level N', got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(?:Level\s*)?(\d+|\?)\s*", value)
        if m:
            return 0 if m.group(1) == "?" else int(m.group(1))
    raise _RowError(f"level must be an int or 'Level N', got {value!r}")


def _convert_math_train(row: dict, index: int) -> dict:
    solution = _text(row, "solution")
    answer = row.get("answer")
    if answer is None:
        answer = extract_boxed(solution)
        if answer is None or not answer.strip():
            raise _RowError("field 'solution' has no non-empty \\boxed{...} answer")
    return {
        "id": _id("math_train", row, index, "unique_id", "id"),
        "problem": _text(row, "problem"),
        "answer": _number_answer(answer),
        "level": _level(_field(row, "level")),
        "subject": str(row.get("type") or row.get("subject") or ""),
        "solution": solution,
    }


_CONVERTERS: dict[str, Callable[[dict, int], dict]] = {
    "aime24": _convert_aime24,
    "amc23": _convert_amc23,
    "math500": _convert_math500,
    "minerva_math": _convert_minerva,
    "olympiadbench": _convert_olympiadbench,
    "gsm8k": _convert_gsm8k,
    MATH_TRAIN: _convert_math_train,
}


# ---------------------------------------------------------------------------------------------
# Finding and reading files
# ---------------------------------------------------------------------------------------------


def _check_name(name: object) -> str:
    if not isinstance(name, str) or name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; valid names: {', '.join(BENCHMARKS)}")
    return name


def benchmark_search_dirs(data_dir: str | Path | None = None) -> list[tuple[str, Path]]:
    """The local folders searched, in order, as (where it came from, folder)."""
    dirs: list[tuple[str, Path]] = []
    if data_dir is not None:
        path = Path(data_dir).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"data_dir={str(data_dir)!r} is not a folder")
        dirs.append(("data_dir argument", path))
    env = os.environ.get(DATA_ENV, "").strip()
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"{DATA_ENV}={env!r} is not a folder")
        dirs.append((f"${DATA_ENV}", path))
    dirs.append(("project data/", config.data_dir()))
    shared = config.shared_eval_dir()
    if shared is not None:
        dirs.append(("shared eval folder", Path(shared)))
    return dirs


def _find_local(
    name: str, data_dir: str | Path | None
) -> tuple[Path | None, list[tuple[str, Path]]]:
    """The first ``<folder>/<name>.jsonl`` in the search order (or None) and the folders
    searched."""
    dirs = benchmark_search_dirs(data_dir)
    for _, folder in dirs:
        candidate = folder / f"{name}.jsonl"
        if candidate.is_file():
            return candidate, dirs
    return None, dirs


def _convert_all(name: str, rows: Sequence[tuple[str, dict]]) -> list[dict]:
    """Convert (location, record) pairs; errors name the location (file:line or hub id:row)."""
    convert = _CONVERTERS[name]
    out = []
    for index, (where, row) in enumerate(rows):
        try:
            out.append(convert(row, index))
        except _RowError as exc:
            raise ValueError(f"{where}: {name}: {exc}") from None
    return out


def _read_local(name: str, path: Path) -> list[dict]:
    records = [(f"{path}:{lineno}", row) for lineno, row in iter_jsonl_numbered(path)]
    if not records:
        raise ValueError(f"{path}: no records")
    return _convert_all(name, records)


def _to_dataset(records: list[dict]):
    import datasets

    return datasets.Dataset.from_list(records)


# ---------------------------------------------------------------------------------------------
# The hub (only when reachable; never hangs)
# ---------------------------------------------------------------------------------------------


def _offline_flag() -> bool:
    return any(
        os.environ.get(k, "").strip().lower() in {"1", "true", "yes", "on"}
        for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def _hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the hub's host opens within ``timeout`` seconds (True behind a
    proxy)."""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # the proxy decides; the download timeouts below still bound the wait
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme != "http" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _hub_rows(
    hub_id: str, config_name: str | None, split: str, what: str, searched: str
) -> list[dict]:
    """Rows of a hub split; DataNotAvailableError (naming ``what`` and ``searched``) on any
    failure."""
    hint = (
        f"Put {what} as JSONL into one of the searched folders (or point ${DATA_ENV} at one), "
        "or run once with network access (and HF_HUB_OFFLINE unset) to fill the Hugging Face cache."
    )
    if not _offline_flag() and not _hub_reachable():
        raise DataNotAvailableError(
            f"{what} was not found locally ({searched}) and the hub ({hub_id}) cannot be reached. "
            f"{hint} With a cached copy, set HF_HUB_OFFLINE=1."
        )
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "30")
    try:
        import datasets

        ds = datasets.load_dataset(hub_id, config_name, split=split)
        return [dict(row) for row in ds]
    except Exception as exc:  # network, missing cache, renamed dataset: all end in one clear error
        why = f"{type(exc).__name__}: {exc}".splitlines()[0]
        raise DataNotAvailableError(
            f"{what} was not found locally ({searched}) and loading {hub_id} from the hub failed "
            f"({why}). {hint}"
        ) from exc


def _describe(dirs: list[tuple[str, Path]], file_name: str) -> str:
    return "searched " + ", ".join(f"{where}: {folder / file_name}" for where, folder in dirs)


# ---------------------------------------------------------------------------------------------
# Public loaders
# ---------------------------------------------------------------------------------------------


def load_benchmark(name: str, data_dir: str | Path | None = None):
    """A benchmark as a ``datasets.Dataset``, string ``id``, ``problem``, ``answer`` (nb 00, 06).

    ``name`` is one of ``BENCHMARKS``. Answers are normalised to strings the graders accept: AIME's
    zero padding kept ("023"), AMC floats as integers ("27"), Minerva's last ``\\boxed{}`` of the
    solution, OlympiadBench's answer list joined with ", " without ``$``, GSM8K's number after
    "####" without thousands commas. Search order: ``data_dir``, ``$NTHR_BOOK_DATA``, ``data/``, the
    shared eval folder, then the hub (``HUB_SOURCES``); a malformed row raises ``ValueError`` naming
    file and line.
    """
    name = _check_name(name)
    path, dirs = _find_local(name, data_dir)
    if path is not None:
        return _to_dataset(_read_local(name, path))
    hub_id, config_name, split = HUB_SOURCES[name]
    rows = _hub_rows(
        hub_id, config_name, split, f"benchmark {name!r}", _describe(dirs, f"{name}.jsonl")
    )
    return _to_dataset(_convert_all(name, [(f"{hub_id}:{i}", r) for i, r in enumerate(rows)]))


def load_math_train(levels: Sequence[int] = (3, 4, 5), data_dir: str | Path | None = None):
    """The MATH train split restricted to ``levels``: the paper's training data (nb 05, paper size).

    A local ``math_train.jsonl`` (MATH records: problem, solution, level, type) in the benchmark
    search folders wins; otherwise the seven subject configs of ``EleutherAI/hendrycks_math`` are
    fetched from the hub (about 7.5k problems before the level filter). The answer is the solution's
    last ``\\boxed{}``. Offline, a ``DataNotAvailableError`` says where to put the file.
    """
    if isinstance(levels, (int, str)) or not isinstance(levels, Sequence) or not levels:
        raise TypeError(f"levels must be a non-empty sequence of ints in 1..5, got {levels!r}")
    if not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 5 for v in levels):
        raise ValueError(f"levels must be ints in 1..5, got {levels!r}")
    wanted = set(levels)
    path, dirs = _find_local(MATH_TRAIN, data_dir)
    if path is not None:
        records = _read_local(MATH_TRAIN, path)
    else:
        searched = _describe(dirs, f"{MATH_TRAIN}.jsonl")
        located: list[tuple[str, dict]] = []
        for subject in MATH_TRAIN_SUBJECTS:
            rows = _hub_rows(MATH_TRAIN_HUB, subject, "train", "the MATH train split", searched)
            located += [(f"{MATH_TRAIN_HUB}/{subject}:{i}", r) for i, r in enumerate(rows)]
        records = _convert_all(MATH_TRAIN, located)
        for i, rec in enumerate(records):  # hub rows have no ids: number them
            rec["id"] = f"math_train/{i}"
    kept = [r for r in records if r["level"] in wanted]
    if not kept:
        raise ValueError(f"no MATH train problems with levels {sorted(wanted)}")
    return _to_dataset(kept)


# ---------------------------------------------------------------------------------------------
# Synthetic arithmetic for the embedded model
# ---------------------------------------------------------------------------------------------

ARITHMETIC_OPS = ("+", "-", "*")
ARITHMETIC_TEST_FRACTION = 0.2  # share of the question space reserved for split="test"
_OP_WORDS = {"+": "plus", "-": "minus", "*": "times"}
_NAMES = ("Tom", "Ana", "Sam", "Mia", "Leo", "Zoe", "Ben", "Ivy")
_ITEMS = ("apples", "stamps", "marbles", "books", "coins", "cards", "shells", "pens")


def _value_range(value: object, name: str) -> tuple[int, int]:
    """(lo, hi) with 0 <= lo <= hi from a pair of ints; ValueError naming ``name`` otherwise."""
    if (
        isinstance(value, (str, bytes))
        or not isinstance(value, Sequence)
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        or not 0 <= value[0] <= value[1]
    ):
        raise ValueError(
            f"{name} must be a (lo, hi) pair of ints with 0 <= lo <= hi, got {value!r}"
        )
    return int(value[0]), int(value[1])


def _evaluate(operands: list[int], ops: list[str]) -> int:
    """Value with the usual precedence (* before + and -), computed without eval."""
    terms, signs = [operands[0]], []
    for op, x in zip(ops, operands[1:]):
        if op == "*":
            terms[-1] *= x
        else:
            terms.append(x)
            signs.append(op)
    total = terms[0]
    for op, t in zip(signs, terms[1:]):
        total = total + t if op == "+" else total - t
    return total


def _word_problem(rng: random.Random, a: int, op: str, b: int) -> str:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    if op == "+":
        return f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?"
    if op == "-":
        return f"{name} has {a} {item} and gives away {b}. How many {item} does {name} have left?"
    return (
        f"{name} has {a} bags with {b} {item} in each bag. "
        f"How many {item} does {name} have in total?"
    )


def arithmetic_split(expression: str) -> str:
    """'test' for a fixed ``ARITHMETIC_TEST_FRACTION`` of expressions (by SHA-256), else 'train'."""
    bucket = int.from_bytes(hashlib.sha256(expression.encode()).digest()[:8], "big") / 2.0**64
    return "test" if bucket < ARITHMETIC_TEST_FRACTION else "train"


def arithmetic_problems(
    n: int,
    *,
    seed: int,
    ops: Sequence[str] = ("+", "-", "*"),
    left: tuple[int, int] = (2, 20),
    right: tuple[int, int] = (2, 9),
    num_operands: int = 2,
    phrasing: str = "symbolic",
    allow_negative: bool = False,
    split: str | None = None,
) -> list[dict]:
    """``n`` synthetic arithmetic questions with exact integer answers (notebook 00).

    Knobs (the defaults are tuned for the embedded SmolLM2-135M; see
    ``bench/arithmetic_difficulty.py``):

    - ``ops``: the operations, one drawn uniformly for each slot.
    - ``left`` / ``right``: inclusive (lo, hi) ranges, drawn uniformly, of the first operand and of
      every later one. The default asks "17 - 3", "11 * 6", "9 + 8"; ``left=(2, 9)`` is easier (the
      model is right about 80% of the time, most groups nearly all right), ``left=(10, 99)`` harder
      (most questions never solved).
    - ``num_operands``: 2 to 4, with the usual precedence.
    - ``phrasing``: "symbolic" ("What is 17 - 3?"), "words" ("What is 17 minus 3?") or "story" (a
      one-sentence word problem; two operands only).
    - ``allow_negative``: keep negative results (otherwise they are drawn again).
    - ``split``: None (any question), "train" or "test", a fixed partition by a hash of the
      expression (``ARITHMETIC_TEST_FRACTION`` of the questions are "test"): held-out questions stay
      disjoint from every training pool however many seeds draw from the small default space (about
      430 questions).

    Question ``i`` depends only on ``(seed, i)`` and the knobs, so a larger ``n`` extends a smaller
    one; questions may repeat. Each dict has ``id``, ``problem``, ``answer`` (a string),
    ``expression`` (Python syntax), ``num_operands``, ``ops`` and ``max_digits``.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    ops = tuple(ops)
    if not ops or any(op not in ARITHMETIC_OPS for op in ops):
        raise ValueError(f"ops must be a non-empty subset of {ARITHMETIC_OPS}, got {ops!r}")
    left_range = _value_range(left, "left")
    right_range = _value_range(right, "right")
    if (
        isinstance(num_operands, bool)
        or not isinstance(num_operands, int)
        or not 2 <= num_operands <= 4
    ):
        raise ValueError(f"num_operands must be 2, 3 or 4, got {num_operands!r}")
    if phrasing not in ("symbolic", "words", "story"):
        raise ValueError(f"phrasing must be 'symbolic', 'words' or 'story', got {phrasing!r}")
    if phrasing == "story" and num_operands != 2:
        raise ValueError("phrasing='story' needs num_operands=2")
    if split not in (None, "train", "test"):
        raise ValueError(f"split must be None, 'train' or 'test', got {split!r}")

    problems = []
    for i in range(n):
        rng = random.Random(f"nthr_book.arithmetic/{seed}/{i}")  # str seeds are stable across runs
        for _ in range(1000):
            slot_ops = [rng.choice(ops) for _ in range(num_operands - 1)]
            operands = [rng.randint(*left_range)] + [rng.randint(*right_range) for _ in slot_ops]
            value = _evaluate(operands, slot_ops)
            expression = " ".join(
                [str(operands[0])] + [f"{op} {x}" for op, x in zip(slot_ops, operands[1:])]
            )
            if (allow_negative or value >= 0) and (
                split is None or arithmetic_split(expression) == split
            ):
                break
        else:
            raise ValueError(
                f"could not draw question {i} in 1000 tries: the knobs leave (almost) no "
                f"question with a non-negative result in split={split!r}"
            )
        if phrasing == "symbolic":
            problem = f"What is {expression}?"
        elif phrasing == "words":
            spoken = " ".join(
                [str(operands[0])]
                + [f"{_OP_WORDS[op]} {x}" for op, x in zip(slot_ops, operands[1:])]
            )
            problem = f"What is {spoken}?"
        else:
            problem = _word_problem(rng, operands[0], slot_ops[0], operands[1])
        problems.append(
            {
                "id": f"arith/{seed}/{i}",
                "problem": problem,
                "answer": str(value),
                "expression": expression,
                "num_operands": num_operands,
                "ops": "".join(slot_ops),
                "max_digits": max(len(str(x)) for x in operands),
            }
        )
    return problems
