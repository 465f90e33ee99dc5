"""The configuration of a GRPO / NTHR training run: ``TrainConfig`` (every setting a run depends on,
checked when it is made) and its presets ``fast()``, ``fast_reasoner()`` and ``paper_qwen_0_5b()``.

The loop that runs a config is ``nthr_book.trainer`` (which re-exports ``TrainConfig``); the
settings follow docs/method.md §1 (GRPO), §3 (NTHR) and §5 (the negatives a mixed group trains
on).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from nthr_book import config as book_config
from nthr_book import reasoner, rules
from nthr_book.grpo import AGG_MODES, STD_MODES
from nthr_book.nthr import ANCHORS, VOCAB_MODES

NEGATIVES = ("sampled", "branched", "near_miss")  # TrainConfig.negatives
TASKS = ("arithmetic", "reasoner", "math")  # TrainConfig.task


@dataclass(frozen=True)
class TrainConfig:
    """Everything a GRPO / NTHR run depends on; ``fast()`` and ``paper_qwen_0_5b()`` are the
    presets."""

    model: str = "smollm2-135m"
    """Policy to train: "smollm2-135m" (embedded), "tiny-random", a hub id or a local path."""
    task: str = "arithmetic"
    """Training prompts: "arithmetic" (synthetic, data.arithmetic_problems), "reasoner" (the
    warm-up's products, the RL-pool split of reasoner.problems; train "smollm2-135m-reasoner" on
    them) or "math" (MATH train, hub)."""
    num_problems: int = 512
    """Size of the training pool (arithmetic: generated; math: the first n after shuffling, 0 =
    all)."""
    math_levels: tuple[int, ...] = (3, 4, 5)
    """MATH difficulty levels used when task == "math" (the paper: 3-5)."""
    template: str | None = None
    """Prompt template name or string for data.build_prompt; None: the task's default."""
    require_boxed: bool | None = None
    """Reward needs \\boxed{}; None: the task's default."""
    method: str = "grpo"
    """A trainable rule of ``nthr_book.rules``: "grpo", "nthr" (NTHR hook from the nthr_* fields),
    "pos_only", "nsr", "clip_higher", "llds", ... A rule's settings (``rules.SETTINGS``) replace the
    defaults of the fields of the same name (``rule_settings``)."""
    steps: int = 20
    """Number of rollout batches (optimizer steps when mini_batch_prompts == prompts_per_step)."""
    prompts_per_step: int = 4
    """Prompts (groups) sampled per step."""
    group_size: int = 8
    """Completions per prompt (G)."""
    mini_batch_prompts: int | None = None
    """Prompts per gradient step; must divide prompts_per_step; None = all (one step per batch)."""
    num_iterations: int = 1
    """Passes over each rollout batch (PPO epochs; TRL's num_iterations)."""
    micro_batch_groups: int | None = None
    """Groups per forward pass (gradient accumulation inside a mini-batch); None = the whole
    mini-batch."""
    lr: float = 1e-6
    """AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_betas: tuple[float, float] = (0.9, 0.99)
    """AdamW betas."""
    max_grad_norm: float = 1.0
    """Gradient clipping by global norm (0 disables)."""
    temperature: float = 1.0
    """Sampling temperature; log-probs use logits / temperature."""
    top_p: float = 1.0
    """Nucleus sampling."""
    max_new_tokens: int = 64
    """Completion token budget."""
    min_new_tokens: int = 0
    """EOS is blocked before this many tokens (0: off; benchmarks use it to fix the length)."""
    clip_eps: float = 0.2
    """PPO clip range (low side, and high side unless clip_eps_high is set)."""
    clip_eps_high: float | None = None
    """Upper clip (DAPO's clip-higher); None = clip_eps."""
    kl_coef: float = 1e-4
    """Weight of the k3 KL to the frozen reference (0 skips the reference pass)."""
    agg: str = "token"
    """Loss aggregation: "token" (paper, DAPO), "seq_mean" (original GRPO), "dr_grpo"."""
    adv_std: str = "population"
    """Advantage normaliser: "population" (paper), "sample", "none" (Dr. GRPO)."""
    dynamic_sampling: bool = True
    """Drop homogeneous groups (all right or all wrong) from the update, unless the method's rule
    trains on them (``rules.Rule.keeps_homogeneous``: NSR, W-REINFORCE keep every group)."""
    refill_max_rounds: int = 0
    """DAPO's refill for dynamic sampling: up to this many extra rounds of prompts_per_step new
    prompts until prompts_per_step mixed groups are kept (0: off, the update gets fewer groups)."""
    negatives: str = "sampled"
    """The wrong answers a mixed group trains on: "sampled" (the policy's own), "branched" (each
    replaced by the policy's continuation of a correct answer's first branch_fraction of tokens,
    kept when graded wrong: ``groups.branched_group``; a slot still right after branch_max_tries
    keeps its sampled answer) or "near_miss" (a correct answer with its final number changed:
    ``groups.near_miss_group``). Notebook 05 §5: training where the negatives are near."""
    branch_fraction: float = 0.5
    """f of negatives="branched": the share of a correct answer's tokens a wrong one starts with."""
    branch_max_tries: int = 2
    """Sampling rounds per step for the branched slots still unfilled (negatives="branched")."""
    nthr_beta: float = 1.0
    """NTHR threshold scale beta (method == "nthr"); -inf selects every incorrect token."""
    nthr_eta: str | float = "two_abs"
    """NTHR advantage factor schedule: "two_abs", "p", "one_minus_p" or a number."""
    nthr_vocab: str = "generated"
    """NTHR vocabulary: "generated" (paper's speed-up) or "full" (exact)."""
    nthr_anchor: str = "all"
    """NTHR anchor, the tokens k of s̄+: "all" (default), "other_responses" or "no_self_token"."""
    track_lld: bool = True
    """Log the change of ln pi of this step's correct responses over the update and the LLD rate."""
    lld_eps: float = 0.0
    """A correct response counts as lazily displaced when its ln pi rose by no more than this."""
    seed: int = 0
    """Seed for data order, sampling and initialisation."""
    checkpoint_every: int = 5
    """Steps between atomic checkpoints (0: only at the end)."""
    keep_checkpoint: bool = False
    """Keep ``checkpoint.pt`` (weights + optimizer state) after the last step, to extend the run
    later."""
    save_model: bool = True
    """Write the final weights to ``model/`` (4 bytes a parameter: 0.5 GB for the 135M model).
    False keeps the run's metrics (and ``run_experiment``'s evaluation, made in memory) and no
    weights: for runs nothing reloads, so a series does not fill the disk."""
    output_dir: str | None = None
    """Run folder; None: <runs>/train/<method>/seed<seed>."""
    bf16: bool = False
    """bf16 autocast for forward passes (CUDA only)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory (CUDA runs of long completions)."""
    share_prompt: bool = True
    """Run each group's prompt once in every pass (``grpo.shared_prompt_hidden``); exact. Not with
    gradient checkpointing, where transformers drops the key/value cache: then rows run whole."""
    generation_batch_size: int | None = None
    """Sequences per generate call; None = all at once."""

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> None:
            raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r}: {why}")

        if self.task not in TASKS:
            bad("task", f"expected one of {TASKS}")
        if self.method not in rules.names(trainable=True):
            bad("method", f"expected one of {rules.names(trainable=True)} (nthr_book.rules)")
        self.rule_settings()  # a field that contradicts the method's rule is refused, named
        if self.group_size < 2:
            bad("group_size", "GRPO needs at least 2 completions per prompt to compare")
        for name in ("steps", "prompts_per_step", "num_iterations", "max_new_tokens"):
            if getattr(self, name) < 1:
                bad(name, "must be >= 1")
        if self.num_problems < 0:
            bad("num_problems", "must be >= 0")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            bad("min_new_tokens", f"must lie in [0, max_new_tokens={self.max_new_tokens}]")
        mini = self.mini_batch_prompts or self.prompts_per_step
        if mini < 1 or self.prompts_per_step % mini:
            bad("mini_batch_prompts", f"must divide prompts_per_step={self.prompts_per_step}")
        if self.micro_batch_groups is not None and self.micro_batch_groups < 1:
            bad("micro_batch_groups", "must be >= 1 or None")
        if not self.lr > 0:
            bad("lr", "must be > 0")
        if not self.temperature > 0:
            bad("temperature", "must be > 0 for sampling (greedy groups carry no signal)")
        if not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if not 0 < self.clip_eps < 1:
            bad("clip_eps", "must be in (0, 1)")
        if self.clip_eps_high is not None and not self.clip_eps_high > 0:
            bad("clip_eps_high", "must be > 0")
        if self.kl_coef < 0:
            bad("kl_coef", "must be >= 0")
        if self.agg not in AGG_MODES:
            bad("agg", f"expected one of {AGG_MODES}")
        if self.adv_std not in STD_MODES:
            bad("adv_std", f"expected one of {STD_MODES}")
        if self.nthr_vocab not in VOCAB_MODES:
            bad("nthr_vocab", f"expected one of {VOCAB_MODES}")
        if self.nthr_anchor not in ANCHORS:
            bad("nthr_anchor", f"expected one of {ANCHORS}")
        if isinstance(self.nthr_eta, str) and self.nthr_eta not in ("two_abs", "p", "one_minus_p"):
            bad("nthr_eta", "expected 'two_abs', 'p', 'one_minus_p' or a number")
        if math.isnan(self.nthr_beta):
            bad("nthr_beta", "must be a number or -inf")
        if (
            isinstance(self.refill_max_rounds, bool)
            or not isinstance(self.refill_max_rounds, int)
            or self.refill_max_rounds < 0
        ):
            bad("refill_max_rounds", "must be an int >= 0 (0: no refill)")
        if self.refill_max_rounds and not self.dynamic_sampling:
            bad(
                "refill_max_rounds",
                "refills the mixed groups of dynamic sampling: needs dynamic_sampling=True",
            )
        if self.refill_max_rounds and rules.get(self.method).keeps_homogeneous:
            bad(
                "refill_max_rounds",
                f"method {self.method!r} keeps homogeneous groups (rules.Rule.keeps_homogeneous): "
                "no group is dropped, so there is nothing to refill (set it to 0)",
            )
        if self.checkpoint_every < 0:
            bad("checkpoint_every", "must be >= 0")
        if self.negatives not in NEGATIVES:
            bad("negatives", f"expected one of {NEGATIVES}")
        if not 0 < self.branch_fraction <= 1:
            bad("branch_fraction", "must be in (0, 1] (0 is negatives='sampled')")
        if isinstance(self.branch_max_tries, bool) or not (
            isinstance(self.branch_max_tries, int) and self.branch_max_tries >= 1
        ):
            bad("branch_max_tries", "must be an int >= 1")

    # ---- presets -------------------------------------------------------------------------------
    @classmethod
    def fast(cls, **overrides: Any) -> TrainConfig:
        """Embedded SmolLM2-135M on the arithmetic task: a few minutes on 2 CPU cores."""
        base = dict(
            model="smollm2-135m",
            task="arithmetic",
            num_problems=256,
            steps=12,
            prompts_per_step=4,
            group_size=8,
            lr=1e-5,
            temperature=1.0,
            max_new_tokens=48,
            kl_coef=0.0,
            checkpoint_every=4,
        )
        return cls(**(base | overrides))

    @classmethod
    def fast_reasoner(cls, **overrides: Any) -> TrainConfig:
        """``fast()`` on the warm-up reasoner and its task (reasoner.py): worked products whose
        wrong answers are slips in a right-looking solution, 64 new tokens."""
        base = dict(
            model=reasoner.REASONER,
            task="reasoner",
            max_new_tokens=reasoner.MAX_NEW_TOKENS,
            temperature=reasoner.TEMPERATURE,
        )
        return cls.fast(**(base | overrides))

    @classmethod
    def paper_qwen_0_5b(cls, **overrides: Any) -> TrainConfig:
        """The paper's Qwen2.5-0.5B-Instruct setting (docs/method.md §1) for one GPU."""
        base = dict(
            model="Qwen/Qwen2.5-0.5B-Instruct",
            task="math",
            num_problems=0,
            math_levels=(3, 4, 5),
            template="boxed",
            require_boxed=True,
            steps=105,
            prompts_per_step=32,
            mini_batch_prompts=16,
            micro_batch_groups=2,
            group_size=8,
            lr=5e-7,
            temperature=1.0,
            max_new_tokens=2500,
            clip_eps=0.2,
            kl_coef=1e-4,
            agg="token",
            adv_std="population",
            bf16=True,
            gradient_checkpointing=True,
            checkpoint_every=5,
            generation_batch_size=128,
        )
        return cls(**(base | overrides))

    def rule_settings(self) -> dict[str, Any]:
        """clip_eps_high, agg, adv_std and nthr_beta as the run uses them: the method's rule's
        settings in place of these fields' defaults (``rules.Rule.resolve_settings``; a field set
        to another value than the rule's is an error naming it)."""
        defaults = {f.name: f.default for f in fields(self) if f.name in rules.SETTINGS}
        values = {k: getattr(self, k) for k in rules.SETTINGS}
        return rules.get(self.method).resolve_settings(values, defaults, owner="TrainConfig.")

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with some fields changed (validated again)."""
        return TrainConfig(**(asdict(self) | changes))

    def run_dir(self) -> Path:
        """The run folder (``output_dir`` or the default under the runs folder)."""
        if self.output_dir:
            return Path(self.output_dir).expanduser()
        return book_config.runs_dir() / "train" / self.method / f"seed{self.seed}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples as lists, inf as a string)."""
        out = asdict(self)
        for k, v in out.items():
            if isinstance(v, float) and math.isinf(v):
                out[k] = str(v)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Inverse of ``to_dict`` (unknown keys are an error naming them)."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields: {unknown}")
        kw = dict(d)
        for k in ("math_levels", "adam_betas"):
            if k in kw and kw[k] is not None:
                kw[k] = tuple(kw[k])
        if isinstance(kw.get("nthr_beta"), str):
            kw["nthr_beta"] = float(kw["nthr_beta"])
        return cls(**kw)
