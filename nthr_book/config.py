"""The one fast/full switch and the project's paths (never relative to the working directory).

The switch is the environment variable ``NTHR_BOOK_FAST``: ``1`` runs every notebook on the embedded
SmolLM2-135M with small step counts (what CI and ``make demo`` do), ``0`` runs the paper's setting
(Qwen2.5-0.5B-Instruct on a GPU). Unset, the mode follows the hardware: full with CUDA, fast
without. ``GroupsPreset.current()`` turns the switch into the parameters notebooks 02-04 share.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
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
    source = (
        f"{FAST_ENV}={os.environ[FAST_ENV]}" if os.environ.get(FAST_ENV) else "auto: CUDA present?"
    )
    return f"{'fast' if fast_mode() else 'full'} ({source})"


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

    ``fast()`` is the embedded model on the synthetic arithmetic task, ``paper()`` the paper's
    Qwen2.5-0.5B-Instruct on MATH levels 3-5; ``current()`` follows ``fast_mode()``. The groups are
    saved once at ``groups_path`` (``groups.load_or_sample_groups``) and reused by all three.
    """

    name: str  # "fast" or "full": part of the groups file's name
    model: str  # the policy, a name for models.load_policy
    template: str  # the prompt format of data.build_prompt
    require_boxed: bool  # the reward counts only a \boxed{} answer
    n_questions: int  # questions sampled into groups
    max_new_tokens: int  # the longest response sampled
    lr: float  # the step size of Δ(x)'s one plain SGD update
    group_size: int = 8  # G, responses per question
    temperature: float = 1.0  # sampling temperature; token log-probs and scores use the same
    seed: int = 0  # sampling seed (and the experiment seed of Δ(x))

    @classmethod
    def fast(cls) -> GroupsPreset:
        """SmolLM2-135M, 24 arithmetic questions (few-shot, boxed), 48 new tokens: minutes on a
        CPU."""
        return cls(
            "fast", "smollm2-135m", "arithmetic", True, n_questions=24, max_new_tokens=48, lr=5e-5
        )

    @classmethod
    def paper(cls) -> GroupsPreset:
        """Qwen2.5-0.5B-Instruct, 160 MATH500 questions of levels 3-5, 2500 new tokens (a GPU)."""
        return cls(
            "full",
            "Qwen/Qwen2.5-0.5B-Instruct",
            "boxed",
            True,
            n_questions=160,
            max_new_tokens=2500,
            lr=1e-5,
        )

    @classmethod
    def current(cls) -> GroupsPreset:
        """``fast()`` or ``paper()``, as ``NTHR_BOOK_FAST`` says."""
        return cls.fast() if fast_mode() else cls.paper()

    @property
    def groups_path(self) -> Path:
        """Where the sampled groups are saved: ``<runs>/lld/groups-<name>-seed<seed>.pt``."""
        return runs_dir() / "lld" / f"groups-{self.name}-seed{self.seed}.pt"

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
