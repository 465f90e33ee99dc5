"""The one run-size switch and the project's paths (never relative to the working directory).

The switch is the environment variable ``NTHR_BOOK_SIZE``:

- ``ci``: the embedded SmolLM2-135M with the smallest step counts that run every piece (what
  ``make test`` executes, minutes in all);
- ``laptop``: the same model and code, sized so that each notebook shows its phenomenon with its own
  numbers on 2 CPU cores (what ``make demo`` runs, just under an hour for the series);
- ``paper``: the paper's setting, Qwen2.5-0.5B-Instruct on a GPU.

Unset, the size follows the hardware: ``paper`` with CUDA, ``laptop`` without. The older switch
``NTHR_BOOK_FAST`` still works as an alias (``1`` is ``ci``, ``0`` is ``paper``) when
``NTHR_BOOK_SIZE`` is unset. ``by_size`` picks a notebook's parameter for the current size
(``presets.GroupsPreset.current()`` holds the parameters notebooks 02-04 share).

This is the bottom layer of the package: it imports nothing of nthr_book.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
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
