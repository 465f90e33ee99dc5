"""The one fast/full switch and the project's paths (never relative to the working directory).

The switch is the environment variable ``NTHR_BOOK_FAST``: ``1`` runs every notebook on the embedded
SmolLM2-135M with small step counts (what CI and ``make demo`` do), ``0`` runs the paper's setting
(Qwen2.5-0.5B-Instruct on a GPU). Unset, the mode follows the hardware: full with CUDA, fast without.
"""

from __future__ import annotations

import os
from pathlib import Path

FAST_ENV = "NTHR_BOOK_FAST"

PACKAGE_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = PACKAGE_DIR.parent


def fast_mode() -> bool:
    """True for the fast run (embedded model, few steps); read from ``NTHR_BOOK_FAST``."""
    value = os.environ.get(FAST_ENV)
    if value is None or value.strip() == "":
        import torch

        return not torch.cuda.is_available()
    value = value.strip().lower()
    if value in {"1", "true", "yes", "fast"}:
        return True
    if value in {"0", "false", "no", "full"}:
        return False
    raise ValueError(f"{FAST_ENV}={value!r}: expected 1 (fast) or 0 (full)")


def mode_name() -> str:
    """'fast' or 'full', with where the choice came from, for the notebooks' parameters cell."""
    source = f"{FAST_ENV}={os.environ[FAST_ENV]}" if os.environ.get(FAST_ENV) else "auto: CUDA present?"
    return f"{'fast' if fast_mode() else 'full'} ({source})"


def cache_dir() -> Path:
    """Where converted models live: ``$NTHR_BOOK_CACHE`` or ``~/.cache/nthr_book``."""
    return Path(os.environ.get("NTHR_BOOK_CACHE", Path.home() / ".cache" / "nthr_book")).expanduser()


def data_dir() -> Path:
    """The project's own ``data/`` folder (data the project makes itself)."""
    return PROJECT_ROOT / "data"


def shared_eval_dir() -> Path | None:
    """``../shared/data/eval`` beside the project, where the benchmark files sit on offline machines."""
    candidate = PROJECT_ROOT.parent / "shared" / "data" / "eval"
    return candidate if candidate.is_dir() else None


def runs_dir() -> Path:
    """Where training runs and experiment outputs go: ``$NTHR_BOOK_RUNS`` or ``<project>/runs``."""
    return Path(os.environ.get("NTHR_BOOK_RUNS", PROJECT_ROOT / "runs")).expanduser()


def build_dir() -> Path:
    """Where executed notebooks, figures and summaries go: ``$NTHR_BOOK_BUILD`` or ``<project>/build``."""
    return Path(os.environ.get("NTHR_BOOK_BUILD", PROJECT_ROOT / "build")).expanduser()


def default_device() -> str:
    """'cuda' when available, else 'cpu'."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
