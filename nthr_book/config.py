"""The one run-size switch and the project's paths (never relative to the working directory).

The switch is the environment variable ``NTHR_BOOK_SIZE``:

- ``ci``: the embedded SmolLM2-135M with the smallest step counts that run every piece (what
  ``make test`` executes, minutes in all);
- ``laptop``: the same model and code, sized so that each notebook shows its phenomenon with its own
  numbers on 2 CPU cores (what ``make demo`` runs, just under an hour for the series);
- ``paper``: the paper's setting, Qwen2.5-0.5B-Instruct on a GPU.

Unset, the size follows the hardware: ``paper`` with CUDA, ``laptop`` without. The older switch
``NTHR_BOOK_FAST`` still works as an alias (``1`` is ``ci``, ``0`` is ``paper``) when
``NTHR_BOOK_SIZE`` is unset. ``by_size`` picks a notebook's parameter for the current size and
``GroupsPreset.current()`` holds the parameters notebooks 02-04 share.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

SIZE_ENV = "NTHR_BOOK_SIZE"
FAST_ENV = "NTHR_BOOK_FAST"  # the older fast/full switch, an alias of ci/paper
RUN_SIZES = ("ci", "laptop", "paper")

PACKAGE_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = PACKAGE_DIR.parent


def _size_and_source() -> tuple[str, str]:
    """The run size and where it came from (the variable, or the hardware)."""
    value = os.environ.get(SIZE_ENV, "").strip().lower()
    if value:
        if value not in RUN_SIZES:
            raise ValueError(
                f"{SIZE_ENV}={os.environ[SIZE_ENV]!r}: expected one of {', '.join(RUN_SIZES)}"
            )
        return value, f"{SIZE_ENV}={value}"
    fast = os.environ.get(FAST_ENV, "").strip().lower()
    if fast:
        if fast in {"1", "true", "yes", "fast"}:
            return "ci", f"{FAST_ENV}={fast}"
        if fast in {"0", "false", "no", "full"}:
            return "paper", f"{FAST_ENV}={fast}"
        raise ValueError(
            f"{FAST_ENV}={os.environ[FAST_ENV]!r}: expected 1 (the ci size) or 0 (the paper "
            f"size); or set {SIZE_ENV} to one of {', '.join(RUN_SIZES)}"
        )
    import torch

    return ("paper" if torch.cuda.is_available() else "laptop"), "auto: CUDA present?"


def run_size() -> str:
    """``ci``, ``laptop`` or ``paper``, read from ``NTHR_BOOK_SIZE`` (see the module docstring)."""
    return _size_and_source()[0]


def fast_mode() -> bool:
    """True for the sizes that run the embedded model on a CPU (``ci`` and ``laptop``)."""
    return run_size() != "paper"


def mode_name() -> str:
    """The run size with where the choice came from, e.g. ``laptop (NTHR_BOOK_SIZE=laptop)``."""
    size, source = _size_and_source()
    return f"{size} ({source})"


def by_size(ci: Any, laptop: Any, paper: Any, size: str | None = None) -> Any:
    """The value for the current run size (or ``size``): one visible line per parameter."""
    size = size or run_size()
    return {"ci": ci, "laptop": laptop, "paper": paper}[size]


def announce_size(costs: Mapping[str, str]) -> str:
    """Print the run size and what this notebook costs at each size; return the size.

    ``costs`` maps every size to a short cost, e.g. ``{"ci": "2 min", "laptop": "15 min on 2 CPU
    cores", "paper": "about 20 GPU hours"}``; the notebooks call this in their parameters cell.
    """
    missing = [s for s in RUN_SIZES if s not in costs]
    if missing:
        raise ValueError(f"announce_size: costs has no entry for {', '.join(missing)}")
    size = run_size()
    others = "; ".join(f"{s}: {costs[s]}" for s in RUN_SIZES if s != size)
    print(f"run size: {mode_name()}; this notebook costs about {costs[size]} ({others})")
    return size


def cache_dir() -> Path:
    """Where converted models live: ``$NTHR_BOOK_CACHE`` or ``~/.cache/nthr_book``."""
    return Path(
        os.environ.get("NTHR_BOOK_CACHE", Path.home() / ".cache" / "nthr_book")
    ).expanduser()


def data_dir() -> Path:
    """The project's own ``data/`` folder (data the project makes itself)."""
    return PROJECT_ROOT / "data"


def shared_eval_dir() -> Path | None:
    """``../shared/data/eval`` beside the project, where the benchmark files sit on offline
    machines."""
    candidate = PROJECT_ROOT.parent / "shared" / "data" / "eval"
    return candidate if candidate.is_dir() else None


def runs_dir() -> Path:
    """Where training runs and experiment outputs go: ``$NTHR_BOOK_RUNS`` or ``<project>/runs``."""
    return Path(os.environ.get("NTHR_BOOK_RUNS", PROJECT_ROOT / "runs")).expanduser()


def build_dir() -> Path:
    """Where executed notebooks, figures and summaries go: ``$NTHR_BOOK_BUILD`` or
    ``<project>/build``."""
    return Path(os.environ.get("NTHR_BOOK_BUILD", PROJECT_ROOT / "build")).expanduser()


def default_device() -> str:
    """'cuda' when available, else 'cpu'."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class GroupsPreset:
    """The parameters notebooks 02-04 share: one policy, one set of sampled groups, one step size.

    ``ci()`` and ``laptop()`` are the embedded model on the synthetic arithmetic task (16 and 72
    questions), ``paper()`` the paper's Qwen2.5-0.5B-Instruct on MATH levels 3-5; ``current()``
    follows ``run_size()``. The groups are saved once at ``groups_path``
    (``groups.load_or_sample_groups``) and reused by all three notebooks; the regime map
    (``regime.regime_map``, ``map_settings``) is saved at ``map_path`` by 02 and read by 03.
    """

    name: str  # the run size: part of the groups file's name
    model: str  # the policy, a name for models.load_policy
    template: str  # the prompt format of data.build_prompt
    require_boxed: bool  # the reward counts only a \boxed{} answer
    n_questions: int  # questions sampled into groups
    max_new_tokens: int  # the longest response sampled
    lr: float  # the step size of Δ(x)'s one plain SGD update
    n_map: int = 2  # questions on the regime map (the first mixed ones by id)
    # branching fractions f of the map: an arithmetic answer states its result about halfway, so
    # beyond f = 0.5 the model's continuation is almost always right (the column cannot be filled)
    map_fractions: tuple[float, ...] = (0.0, 0.25)
    group_size: int = 8  # G, responses per question
    temperature: float = 1.0  # sampling temperature; token log-probs and scores use the same
    seed: int = 0  # sampling seed (and the experiment seed of Δ(x))

    @classmethod
    def ci(cls) -> GroupsPreset:
        """SmolLM2-135M, 16 arithmetic questions (few-shot, boxed), 48 new tokens: the rehearsal."""
        return cls("ci", "smollm2-135m", "arithmetic", True, 16, max_new_tokens=48, lr=5e-5)

    @classmethod
    def laptop(cls) -> GroupsPreset:
        """The same model and task with 72 questions (about 40 mixed groups): minutes on a CPU."""
        return cls(
            "laptop",
            "smollm2-135m",
            "arithmetic",
            True,
            72,
            max_new_tokens=48,
            lr=5e-5,
            n_map=4,
            map_fractions=(0.0, 0.25, 0.5),
        )

    @classmethod
    def paper(cls) -> GroupsPreset:
        """Qwen2.5-0.5B-Instruct, 160 MATH500 questions of levels 3-5, 2500 new tokens (a GPU)."""
        return cls(
            "paper",
            "Qwen/Qwen2.5-0.5B-Instruct",
            "boxed",
            True,
            n_questions=160,
            max_new_tokens=2500,
            lr=1e-5,
            n_map=40,
            map_fractions=(0.0, 0.25, 0.5, 0.75, 0.9),
        )

    @classmethod
    def current(cls) -> GroupsPreset:
        """The preset of the current run size (``NTHR_BOOK_SIZE``)."""
        return by_size(ci=cls.ci, laptop=cls.laptop, paper=cls.paper)()

    @property
    def groups_path(self) -> Path:
        """Where the sampled groups are saved: ``<runs>/lld/groups-<name>-seed<seed>.pt``."""
        return runs_dir() / "lld" / f"groups-{self.name}-seed{self.seed}.pt"

    @property
    def map_path(self) -> Path:
        """Where the regime map is saved: ``<runs>/lld/map-<name>-seed<seed>.jsonl``."""
        return runs_dir() / "lld" / f"map-{self.name}-seed{self.seed}.jsonl"

    def map_settings(self) -> dict:
        """The keyword arguments of ``regime.regime_map`` (notebooks 02 and 03 share them): the
        rules, fractions, step size, sampling settings and NTHR's diagnostic β = 1, η = 0."""
        from nthr_book.regime import MAP_METHODS

        return {
            "methods": MAP_METHODS,
            "fractions": self.map_fractions,
            "lr": self.lr,
            "temperature": self.temperature,
            "max_new_tokens": self.max_new_tokens,
            "seed": self.seed,
            "beta": 1.0,
            "eta": 0.0,
            "require_boxed": self.require_boxed,
            "path": self.map_path,
        }

    def sampling(self) -> dict:
        """The keyword arguments of ``groups.load_or_sample_groups`` and ``lld.lld_experiment``."""
        from nthr_book.groups import SAMPLING_KEYS  # what a saved groups file must match

        return {k: v for k, v in asdict(self).items() if k in SAMPLING_KEYS}

    def problems(self) -> list[dict]:
        """The questions: seeded arithmetic ones (fast) or the first MATH500 ones of levels 3-5."""
        from nthr_book import data

        if self.template == "arithmetic":
            return data.arithmetic_problems(self.n_questions, seed=self.seed)
        hard = [dict(row) for row in data.load_benchmark("math500") if row["level"] >= 3]
        return hard[: self.n_questions]
