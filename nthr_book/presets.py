"""The parameters notebooks 02-04 (and 08) share: one policy, one set of sampled groups, one step
size, at each run size (``config.run_size``).

``GroupsPreset.current()`` is the preset of the current size; its groups are sampled once
(``groups.load_or_sample_groups`` at ``groups_path``) and its regime map measured once
(``regime.regime_map`` with ``map_settings``, saved at ``map_path``); every notebook reuses them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from nthr_book import data, reasoner
from nthr_book.config import by_size, runs_dir
from nthr_book.groups import SAMPLING_KEYS
from nthr_book.regime import MAP_METHODS


@dataclass(frozen=True)
class GroupsPreset:
    """The parameters notebooks 02-04 share: one policy, one set of sampled groups, one step size.

    ``ci()`` and ``laptop()`` are the embedded model on the synthetic arithmetic task (12 and 48
    questions), ``reasoner_ci()`` and ``reasoner_laptop()`` the warm-up reasoner on its worked
    products, ``paper()`` the paper's Qwen2.5-0.5B-Instruct on MATH levels 3-5; ``current()`` and
    ``current_reasoner()`` follow ``run_size()``. The groups are saved once at ``groups_path``
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
        """SmolLM2-135M, 12 arithmetic questions (few-shot, boxed), 48 new tokens, the map's natural
        and near-miss columns only: the rehearsal."""
        return cls(
            "ci",
            "smollm2-135m",
            "arithmetic",
            True,
            12,
            max_new_tokens=48,
            lr=5e-5,
            map_fractions=(0.0,),
        )

    @classmethod
    def laptop(cls) -> GroupsPreset:
        """The same model and task with 48 questions (about 30 mixed groups): minutes on a CPU."""
        return cls(
            "laptop",
            "smollm2-135m",
            "arithmetic",
            True,
            48,
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
    def reasoner_ci(cls) -> GroupsPreset:
        """The warm-up reasoner (``reasoner``, its ci build) on 12 worked products of its RL pool,
        64 new tokens: the rehearsal. The ci warm-up (24 steps) is right on about 29% of its answers
        at T = 1 with about 10 of 16 questions mixed, so 12 questions leave notebook 09 several
        mixed ones even where a warm-up built on another CPU lands a little lower."""
        return cls._reasoner("ci-reasoner", n_questions=12, n_map=2)

    @classmethod
    def reasoner_laptop(cls) -> GroupsPreset:
        """The warm-up reasoner on 32 worked products of its RL pool (about 22 mixed groups, its
        wrong answers slips inside a right-looking solution); the map compares its own wrong
        answers (f = 0) with near-miss copies on 12 of them (notebook 09 measures 6)."""
        return cls._reasoner("laptop-reasoner", n_questions=32, n_map=12)

    @classmethod
    def _reasoner(cls, name: str, *, n_questions: int, n_map: int) -> GroupsPreset:
        """The warm-up reasoner on its worked products (RL pool), its template and token budget,
        the map at f = 0 and near-miss: what its ci and laptop presets share."""
        return cls(
            name,
            reasoner.REASONER,
            reasoner.TEMPLATE_NAME,
            True,
            n_questions,
            max_new_tokens=reasoner.MAX_NEW_TOKENS,
            lr=5e-5,
            n_map=n_map,
            map_fractions=(0.0,),
        )

    @classmethod
    def current(cls) -> GroupsPreset:
        """The preset of the current run size (``NTHR_BOOK_SIZE``)."""
        return by_size(ci=cls.ci, laptop=cls.laptop, paper=cls.paper)()

    @classmethod
    def current_reasoner(cls) -> GroupsPreset:
        """The reasoner's preset of the current run size; at the paper size the paper's model on
        MATH is already a reasoner (``paper()``)."""
        return by_size(ci=cls.reasoner_ci, laptop=cls.reasoner_laptop, paper=cls.paper)()

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
        """The keyword arguments of ``groups.load_or_sample_groups`` and
        ``lld_sweep.lld_experiment``."""
        # what a saved groups file must match
        return {k: v for k, v in asdict(self).items() if k in SAMPLING_KEYS}

    def problems(self) -> list[dict]:
        """The questions: seeded arithmetic ones (fast), the reasoner's worked products (its RL
        pool) or the first MATH500 ones of levels 3-5."""
        if self.template == "arithmetic":
            return data.arithmetic_problems(self.n_questions, seed=self.seed)
        if self.template == reasoner.TEMPLATE_NAME:
            return reasoner.problems("rl", self.n_questions, seed=self.seed)
        hard = [dict(row) for row in data.load_benchmark("math500") if row["level"] >= 3]
        return hard[: self.n_questions]
