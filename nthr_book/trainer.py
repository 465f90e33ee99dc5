"""A small, resumable GRPO trainer with a per-token advantage hook for NTHR (notebooks 01 and 05).

One step (docs/method.md §1): sample prompts -> rollouts (``generate_groups``) -> rewards -> group
advantages -> optional ``advantage_fn`` (NTHR plugs in here, on the hidden states of the old-policy
pass) -> mini-batch updates of the clipped token loss with a k3 KL to a frozen reference.

When each rollout batch gets exactly one gradient step (one mini-batch, one iteration) the old
policy *is* the current policy: ``old_logps`` are the detached log-probs of the training forward,
and the hook reads that same forward's hidden states (no extra pass, as in TRL). Otherwise an
old-policy pass runs first and the hook reads its hidden states.

Outputs in ``output_dir``: ``config.json`` (config, versions, hook), ``metrics.csv`` (one row per
step, columns in ``METRIC_COLUMNS``), ``checkpoint.pt`` (atomic, every ``checkpoint_every`` steps:
weights, optimizer, RNG, metrics so far; about 12 bytes per parameter with Adam, 1.6 GB for the 135M
model), ``model/`` (the final weights, loadable with ``load_policy``; not with ``save_model=False``)
and ``finished.json`` (the steps taken; written last, it marks the run complete). A finished run
keeps ``model/`` and drops ``checkpoint.pt`` unless ``keep_checkpoint`` is set, so a notebook
series leaves at most one copy of weights per run.

The run's settings are ``TrainConfig`` (``nthr_book.train_config``, re-exported here); this module
is the loop: the step, checkpoint/resume and the metrics file, which change together; each function
is one stage of the step and short on its own.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nthr_book import config as book_config
from nthr_book import reasoner, rules
from nthr_book.env import set_seed, versions
from nthr_book.grpo import (
    chunked_token_logps,
    expand_advantages,
    mixed_group_mask,
    per_token_logps,
    policy_loss,
    sequence_logprob,
)
from nthr_book.io import atomic_torch_save, atomic_write_text, write_json
from nthr_book.lld import lld_rate
from nthr_book.models import lm_head
from nthr_book.rewards import is_correct
from nthr_book.rollout import Rollouts, generate_groups
from nthr_book.train_config import NEGATIVES, TASKS, TrainConfig  # noqa: F401 (re-exported)


def __getattr__(name: str) -> Any:
    """``METHODS``: the trainable update rules of ``nthr_book.rules``, read live."""
    if name == "METHODS":
        return rules.names(trainable=True)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


TRAIN_POOL_SEED = (
    10_000  # arithmetic_problems seed of the training pool (run seeds only reorder it)
)

# Columns of metrics.csv, in order (NTHR columns are present, NaN, for other methods).
METRIC_COLUMNS = (
    "step",
    "reward_mean",
    "accuracy",
    "frac_homogeneous",
    "groups_used",
    "sampling/prompts",
    "sampling/mixed",
    "sampling/homogeneous_used",
    "sampling/refill_rounds",
    "negatives/replaced",
    "negatives/shared_prefix",
    "completion_length",
    "truncation_rate",
    "loss",
    "kl",
    "clip_frac_low",
    "clip_frac_high",
    "ratio_mean",
    "ratio_min",
    "ratio_max",
    "grad_norm",
    "updates",
    "lld/delta_mean",
    "lld/rate",
    "lld/n_correct",
    "nthr/selected_frac",
    "nthr/tau_mean",
    "nthr/score_mean",
    "nthr/eta_mean",
    "time_generation",
    "time_old_logps",
    "time_reference",
    "time_nthr",
    "time_update",
    "time_lld",
    "time_step",
)


@dataclass
class AdvantageContext:
    """What an ``advantage_fn`` sees for a set of whole groups (group-major rows)."""

    advantages: torch.Tensor  # (N, T) per-token advantages before the hook
    rewards: torch.Tensor  # (num_groups, G)
    group_size: int
    completion_ids: torch.Tensor  # (N, T)
    completion_mask: torch.Tensor  # (N, T) bool
    hidden: torch.Tensor | None  # (N, T, d) old-policy last hidden states (detached)
    lm_head_weight: torch.Tensor  # (V, d)
    lm_head_bias: torch.Tensor | None  # (V,)
    temperature: float
    old_logps: torch.Tensor  # (N, T) float32 log-probs of the pass that made ``hidden``
    softcap: float | None = None  # the model's final_logit_softcapping c (logits c·tanh(z/c))


class _Float32Head(torch.nn.Module):
    """h Wᵀ + b with W, b in float32: the LM head's maths without copying the head module."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight, self.bias = (
            weight.float(),
            None if bias is None else bias.float(),
        )  # no-op if float32

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(hidden, self.weight, self.bias)


@torch.no_grad()
def float32_logps(
    hidden: torch.Tensor,
    lm_head: torch.nn.Module,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    temperature: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """(N, T) float32 token log-probs from (N, T, d) hidden states, outside autocast (notebook 05).

    Under bf16 autocast the LM head's logits are bf16, and NTHR reads its log-sum-exp off the
    log-probs (lse_t = z_t[y_t] - logp_t), so the hook gets these instead: the same states, the
    head's weights in float32 (converted tensors, not a copy of the module; nothing when they are
    float32 already), ``grpo.chunked_token_logps``.
    """
    mask = completion_mask.bool()  # (N, T)
    head32 = _Float32Head(lm_head.weight.detach(), getattr(lm_head, "bias", None))
    logps = torch.zeros(mask.shape, dtype=torch.float32, device=hidden.device)  # (N, T), 0 off mask
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        logps[mask] = chunked_token_logps(
            hidden[mask].float(),
            head32,
            completion_ids[mask],
            temperature=temperature,
            softcap=softcap,
        )
    return logps


@dataclass
class _Batch:
    """The kept groups of one step, on the device, with everything the update needs."""

    rollouts: Rollouts
    rewards: torch.Tensor  # (num_groups, G)
    advantages: torch.Tensor  # (N, T)
    old_logps: torch.Tensor | None = None  # (N, T)
    ref_logps: torch.Tensor | None = None  # (N, T)
    metrics: dict[str, float] = field(default_factory=dict)


# ---- data and rewards ----------------------------------------------------------------------------
def training_problems(cfg: TrainConfig) -> list[dict]:
    """The training pool of {id, problem, answer} for the config's task, in a seeded order.

    The pool is the same for every seed (the seed only orders it), so a held-out set can avoid it.
    """
    from nthr_book import data

    if cfg.task == "arithmetic":
        problems = list(data.arithmetic_problems(cfg.num_problems or 512, seed=TRAIN_POOL_SEED))
    elif cfg.task == "reasoner":  # the RL-pool split: disjoint from the warm-up and the held-out
        try:
            problems = reasoner.problems("rl", cfg.num_problems or 256, seed=TRAIN_POOL_SEED)
        except ValueError as exc:
            raise ValueError(f"TrainConfig.num_problems={cfg.num_problems}: {exc}") from None
    else:
        problems = list(data.load_math_train(levels=cfg.math_levels))
    order = np.random.default_rng(cfg.seed).permutation(len(problems))
    problems = [problems[i] for i in order]
    if cfg.num_problems:
        problems = problems[: cfg.num_problems]
    if not problems:
        raise ValueError(f"TrainConfig.task={cfg.task!r} gave no training problems")
    return problems


def task_defaults(cfg: TrainConfig) -> tuple[str, bool]:
    """(template, require_boxed) for the config, filling the task's defaults."""
    from nthr_book import data

    if cfg.task == "arithmetic":
        template = cfg.template or "arithmetic"
        boxed = data.ARITHMETIC_REQUIRE_BOXED if cfg.require_boxed is None else cfg.require_boxed
    elif cfg.task == "reasoner":
        template = cfg.template or reasoner.TEMPLATE_NAME
        boxed = True if cfg.require_boxed is None else cfg.require_boxed
    else:
        template, boxed = (
            cfg.template or "boxed",
            True if cfg.require_boxed is None else cfg.require_boxed,
        )
    return template, boxed


def default_reward_fn(require_boxed: bool) -> Callable[[list[str], list[str]], list[float]]:
    """math_rewards with the task's format rule."""
    from nthr_book.rewards import math_rewards

    def reward_fn(completions: list[str], answers: list[str]) -> list[float]:
        return math_rewards(completions, answers, require_boxed=require_boxed)

    return reward_fn


def make_advantage_fn(cfg: TrainConfig):
    """The hook a config's ``method`` implies: NTHR's for a rule with a selection (its β from
    ``rule_settings``: the rule's own, or ``nthr_beta``), else None."""
    if not rules.get(cfg.method).needs_hidden:
        return None
    from nthr_book.nthr import nthr_advantage_fn

    beta = cfg.rule_settings()["nthr_beta"]
    return nthr_advantage_fn(beta, cfg.nthr_eta, cfg.nthr_vocab, anchor=cfg.nthr_anchor)


# ---- metrics I/O ---------------------------------------------------------------------------------
def read_metrics(path: str | Path):
    """metrics.csv as a pandas DataFrame."""
    import pandas as pd

    return pd.read_csv(path)


def _write_metrics(path: Path, rows: list[dict]) -> None:
    columns = list(METRIC_COLUMNS) + sorted({k for r in rows for k in r} - set(METRIC_COLUMNS))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, restval="nan")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row.get(k, math.nan) for k in columns})
    atomic_write_text(path, buf.getvalue())


# ---- RNG state -----------------------------------------------------------------------------------
def _rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- the trainer ---------------------------------------------------------------------------------
class GRPOTrainer:
    """Holds the policy, reference, optimizer and data of one run; ``train()`` is the usual entry
    point."""

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        advantage_fn=None,
        reward_fn=None,
        model=None,
        tokenizer=None,
        device=None,
    ):
        from nthr_book.models import load_policy

        self.cfg = cfg
        self.device = torch.device(device or book_config.default_device())
        set_seed(cfg.seed)
        if model is None:
            model, tokenizer = load_policy(cfg.model, device=self.device)
        elif tokenizer is None:
            raise ValueError("pass tokenizer= together with model=")
        self.model, self.tokenizer = model.to(self.device), tokenizer
        self.ref_model = None
        if cfg.kl_coef > 0:
            self.ref_model = copy.deepcopy(self.model).eval().requires_grad_(False)
        if cfg.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
            self.model.config.use_cache = False
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=cfg.lr, betas=cfg.adam_betas, weight_decay=cfg.weight_decay
        )
        self.advantage_fn = advantage_fn if advantage_fn is not None else make_advantage_fn(cfg)
        self.template, boxed = task_defaults(cfg)
        self.reward_fn = reward_fn or default_reward_fn(boxed)
        self.problems = training_problems(cfg)
        self.step = 0
        self.rows: list[dict] = []

    # -- helpers
    def _bf16(self) -> bool:
        return self.cfg.bf16 and self.device.type == "cuda"

    def _autocast(self):
        enabled = self._bf16()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def _needs_hidden(self) -> bool:
        return self.advantage_fn is not None and getattr(self.advantage_fn, "needs_hidden", True)

    def _step_problems(self, step: int) -> list[dict]:
        n = self.cfg.prompts_per_step
        start = (step * n) % len(self.problems)
        idx = [(start + i) % len(self.problems) for i in range(n)]
        return [self.problems[i] for i in idx]

    def _micro_batches(self, group_ids: Sequence[int]) -> list[list[int]]:
        size = self.cfg.micro_batch_groups or len(group_ids)
        return [list(group_ids[i : i + size]) for i in range(0, len(group_ids), size)]

    def _logps(self, model, ro: Rollouts, *, hidden: bool = False, entropy: bool = False):
        with self._autocast():
            return per_token_logps(
                model,
                ro.input_ids,
                ro.attention_mask,
                ro.completion_mask,
                temperature=self.cfg.temperature,
                return_hidden=hidden,
                group_size=ro.group_size if self.cfg.share_prompt else None,
                return_entropy=entropy,
            )

    def _policy_pass(self, ro: Rollouts, *, hidden: bool, entropy: bool):
        """(logps (N, T), hidden (N, T, d) or None, entropy (N, T) or None) of the policy."""
        out = self._logps(self.model, ro, hidden=hidden, entropy=entropy)
        out = list(out) if isinstance(out, tuple) else [out]
        logps = out.pop(0)
        return logps, out.pop(0) if hidden else None, out.pop(0) if entropy else None

    def _apply_hook(
        self, ro: Rollouts, rewards, advantages, old_logps, hidden
    ) -> tuple[torch.Tensor, dict]:
        head = lm_head(self.model)
        if self._bf16() and hidden is not None and getattr(self.advantage_fn, "use_logps", True):
            # bf16 logits would round NTHR's log-sum-exp: the hook reads float32 log-probs instead
            old_logps = float32_logps(
                hidden.detach(),
                head.module,
                ro.completion_ids,
                ro.completion_mask,
                temperature=self.cfg.temperature,
                softcap=head.softcap,
            )
        ctx = AdvantageContext(
            advantages=advantages,
            rewards=rewards,
            group_size=ro.group_size,
            completion_ids=ro.completion_ids,
            completion_mask=ro.completion_mask.bool(),
            hidden=None if hidden is None else hidden.detach(),
            lm_head_weight=head.weight,
            lm_head_bias=head.bias,
            temperature=self.cfg.temperature,
            old_logps=old_logps,
            softcap=head.softcap,
        )
        with torch.no_grad():
            return self.advantage_fn(ctx)

    # -- one step
    def sample(self, step: int, refill_round: int = 0) -> tuple[Rollouts, torch.Tensor, list[dict]]:
        """Rollouts and rewards (num_groups, G) for a step (seeded by config seed and step).

        ``refill_round`` r >= 1 is the r-th refill round (``refill_max_rounds``): prompts_per_step
        more pool prompts, the r-th slice of a permutation of the pool seeded by (seed, step) that
        leaves out the step's own prompts, sampled with a seed made from (seed, step, r).
        Notebook 05.
        """
        from nthr_book.data import build_prompt

        n, gen_seed = self.cfg.prompts_per_step, self.cfg.seed * 1_000_003 + step
        problems = self._step_problems(step)
        if refill_round > 0:
            own = {id(p) for p in problems}
            order = np.random.default_rng([self.cfg.seed, step]).permutation(len(self.problems))
            rest = [self.problems[i] for i in order if id(self.problems[i]) not in own]
            rest = rest or self.problems  # a pool of one batch: refill from it again
            first = (refill_round - 1) * n
            problems = [rest[k % len(rest)] for k in range(first, first + n)]
            seeds = np.random.SeedSequence([self.cfg.seed, step, refill_round])
            gen_seed = int(seeds.generate_state(1)[0])
        prompts = [build_prompt(self.tokenizer, p["problem"], self.template) for p in problems]
        ro = generate_groups(
            self.model,
            self.tokenizer,
            prompts,
            self.cfg.group_size,
            max_new_tokens=self.cfg.max_new_tokens,
            temperature=self.cfg.temperature,
            top_p=self.cfg.top_p,
            batch_size=self.cfg.generation_batch_size,
            min_new_tokens=self.cfg.min_new_tokens,
            seed=gen_seed,
        )
        golds = [str(p["answer"]) for p in problems for _ in range(self.cfg.group_size)]
        rewards = torch.tensor(self.reward_fn(ro.texts, golds), dtype=torch.float32)
        if rewards.numel() != len(golds):
            raise ValueError(
                f"reward_fn returned {rewards.numel()} rewards for {len(golds)} completions"
            )
        return ro, rewards.view(len(problems), self.cfg.group_size).to(self.device), problems

    def train_step(self, step: int) -> dict[str, float]:
        """Run one full step and return its metrics row."""
        cfg, times = (
            self.cfg,
            dict.fromkeys(("generation", "old_logps", "reference", "nthr", "update", "lld"), 0.0),
        )
        t_step = time.perf_counter()
        ro, rewards, problems = self.sample(step)
        # DAPO's refill: more rounds of prompts while fewer than prompts_per_step groups are mixed
        parts, rounds = [(ro, rewards, problems)], 0
        while (
            rounds < cfg.refill_max_rounds
            and sum(int(mixed_group_mask(r).sum()) for _, r, _ in parts) < cfg.prompts_per_step
        ):
            rounds += 1
            parts.append(self.sample(step, rounds))
        if rounds:
            ro = Rollouts.concat([p for p, _, _ in parts], pad_id=self.tokenizer.pad_token_id)
            rewards = torch.cat([r for _, r, _ in parts])  # (num_groups of all rounds, G)
            problems = [q for _, _, qs in parts for q in qs]
        times["generation"] = time.perf_counter() - t_step
        row: dict[str, float] = {
            "step": step,
            "reward_mean": float(rewards.mean()),
            "accuracy": float(is_correct(rewards).float().mean()),
            "completion_length": float(ro.completion_lengths.float().mean()),
            "truncation_rate": float(ro.truncated.float().mean()),
        }
        mixed = mixed_group_mask(rewards)
        row["frac_homogeneous"] = float(1 - mixed.float().mean())
        # dynamic sampling keeps the mixed groups, unless the rule trains on homogeneous ones too
        filtered = cfg.dynamic_sampling and not rules.get(cfg.method).keeps_homogeneous
        keep = mixed.nonzero().squeeze(-1).tolist() if filtered else list(range(rewards.shape[0]))
        keep = keep[: cfg.prompts_per_step]  # a refill may find more mixed groups than needed
        row["groups_used"] = float(len(keep))
        # how the batch was filled: prompts sampled, mixed groups among them, refill rounds used,
        # and the homogeneous groups the update trains on (0 under dynamic sampling's filter)
        row.update(
            {
                "sampling/prompts": float(rewards.shape[0]),
                "sampling/mixed": float(mixed.sum()),
                "sampling/homogeneous_used": float(len(keep) - int(mixed[keep].sum())),
                "sampling/refill_rounds": float(rounds),
            }
        )
        if keep:
            ro, rewards = ro.select_groups(keep), rewards[keep]
            if cfg.negatives != "sampled":
                t0 = time.perf_counter()
                ro, rewards, row["negatives/replaced"] = self.near_negatives(
                    step, ro, rewards, [problems[g] for g in keep]
                )
                times["generation"] += time.perf_counter() - t0
            row["negatives/shared_prefix"] = _shared_prefix(ro, rewards)
            self._update(ro, rewards, row, times)
        row.update({f"time_{k}": v for k, v in times.items()})
        row["time_step"] = time.perf_counter() - t_step
        return row

    def near_negatives(
        self, step: int, ro: Rollouts, rewards: torch.Tensor, problems: list[dict]
    ) -> tuple[Rollouts, torch.Tensor, float]:
        """(rollouts, rewards (num_groups, G), replaced share): each mixed group's wrong answers
        replaced as ``cfg.negatives`` says, G unchanged, every row graded again by the reward
        function; the share is of the wrong answers that were replaced. Homogeneous groups pass
        through. Branching is seeded by (seed, step) and the question id."""
        from nthr_book import groups as _groups

        cfg, G = self.cfg, ro.group_size
        ids = [str(p.get("id", f"step{step}/{g}")) for g, p in enumerate(problems)]
        answers = [str(p["answer"]) for p in problems]
        out, n_wrong, n_replaced = [], 0, 0
        for group in _groups.groups_from_rollouts(ro, rewards, ids, answers):
            if group.status != "mixed":
                out.append(group.rollouts)
                continue
            n_wrong += G - group.n_correct
            if cfg.negatives == "near_miss":  # a group no copy of which grades wrong is kept
                new = _groups.near_miss_group(
                    group, self.tokenizer, reward_fn=self.reward_fn, keep_unfilled=True
                )
                n_replaced += len(new.rollouts.meta.get("near_miss", {}).get("rows", []))
            else:
                new = _groups.branched_group(
                    group,
                    self.model,
                    self.tokenizer,
                    cfg.branch_fraction,
                    temperature=cfg.temperature,
                    max_new_tokens=cfg.max_new_tokens,
                    seed=cfg.seed * 1_000_003 + step,
                    max_tries=cfg.branch_max_tries,
                    keep_unfilled=True,
                    reward_fn=self.reward_fn,
                )
                n_replaced += len(new.rollouts.meta["branched"]["rows"])
            out.append(new.rollouts)
        ro = Rollouts.concat(
            [part.to(self.device) for part in out], pad_id=self.tokenizer.pad_token_id
        )
        golds = [a for a in answers for _ in range(G)]
        rewards = torch.tensor(self.reward_fn(ro.texts, golds), dtype=torch.float32)
        return ro, rewards.view(-1, G).to(self.device), n_replaced / n_wrong if n_wrong else 0.0

    def _update(self, ro: Rollouts, rewards: torch.Tensor, row: dict, times: dict) -> None:
        cfg = self.cfg
        rule, settings = rules.get(cfg.method), cfg.rule_settings()
        # (num_groups, G): GRPO's, or the rule's (Pos Only: negatives to 0; NSR: -1 on wrong ones)
        group_adv = rule.sequence_advantages(rewards, std=settings["adv_std"])
        advantages = expand_advantages(group_adv, ro.completion_mask)  # (N, T)
        num_groups, G = rewards.shape
        n_mini = cfg.prompts_per_step // (cfg.mini_batch_prompts or cfg.prompts_per_step)
        minis = [m.tolist() for m in np.array_split(np.arange(num_groups), min(n_mini, num_groups))]
        fused = len(minis) == 1 and cfg.num_iterations == 1  # old policy == current policy
        rows_of = lambda groups: torch.tensor(
            [g * G + j for g in groups for j in range(G)], device=self.device
        )
        old_logps = torch.zeros_like(advantages)
        ref_logps = torch.zeros_like(advantages) if self.ref_model is not None else None
        hook_metrics: list[dict] = []
        # the entropy mask (rules.Rule.entropy_quantile), per micro-batch of the old-policy pass
        want_entropy, kept_counts = rule.needs_entropy, [0, 0]  # kept tokens, valid tokens

        def entropy_mask(r, entropy, mask) -> None:
            advantages[r], kept = rule.entropy_masked(advantages[r], entropy, mask)
            if kept is not None:
                kept_counts[0] += int(kept.sum())
                kept_counts[1] += int(mask.sum())

        self.model.train()
        if not fused:  # old-policy pass (and the hook on its hidden states), no gradient
            with torch.no_grad():
                for micro in self._micro_batches(range(num_groups)):
                    sub, r = ro.select_groups(micro), rows_of(micro)
                    t0 = time.perf_counter()
                    logps, hidden, entropy = self._policy_pass(
                        sub, hidden=self._needs_hidden(), entropy=want_entropy
                    )
                    old_logps[r] = logps.float()
                    times["old_logps"] += time.perf_counter() - t0
                    if self.advantage_fn is not None:
                        t0 = time.perf_counter()
                        advantages[r], m = self._apply_hook(
                            sub, rewards[micro], advantages[r], logps, hidden
                        )
                        hook_metrics.append(m)
                        times["nthr"] += time.perf_counter() - t0
                    entropy_mask(r, entropy, sub.completion_mask)
                    del hidden, entropy

        step_metrics: list[dict] = []
        grad_norms = []
        t_upd = time.perf_counter()
        for _ in range(cfg.num_iterations):
            for mini in minis:
                self.optimizer.zero_grad(set_to_none=True)
                mini_rows = rows_of(mini)
                n_tok = ro.completion_mask[mini_rows].sum().clamp(min=1)
                for micro in self._micro_batches(mini):
                    sub, r = ro.select_groups(micro), rows_of(micro)
                    if self.ref_model is not None and (fused or _ == 0):
                        t0 = time.perf_counter()
                        with torch.no_grad():
                            ref_logps[r] = self._logps(self.ref_model, sub).float()
                        times["reference"] += time.perf_counter() - t0
                    logps, hidden, entropy = self._policy_pass(
                        sub, hidden=fused and self._needs_hidden(), entropy=fused and want_entropy
                    )
                    if fused:
                        old_logps[r] = logps.detach().float()
                        if self.advantage_fn is not None:
                            t0 = time.perf_counter()
                            advantages[r], m = self._apply_hook(
                                sub, rewards[micro], advantages[r], old_logps[r], hidden
                            )
                            hook_metrics.append(m)
                            times["nthr"] += time.perf_counter() - t0
                        entropy_mask(r, entropy, sub.completion_mask)
                    del hidden, entropy
                    mask = sub.completion_mask
                    logps = logps.float()
                    loss, m = policy_loss(
                        logps,
                        old_logps[r],
                        advantages[r],
                        mask,
                        ref_logps=None if ref_logps is None else ref_logps[r],
                        clip_eps=cfg.clip_eps,
                        clip_eps_high=settings["clip_eps_high"],
                        kl_coef=cfg.kl_coef,
                        agg=settings["agg"],
                        max_completion_length=cfg.max_new_tokens,
                        penalty=rule.loss_penalty(logps, old_logps[r], advantages[r], mask),
                    )
                    # Re-weight micro-batch means into the mini-batch mean (token: by tokens, else
                    # by rows).
                    by_tokens = settings["agg"] == "token"
                    scale = (mask.sum() / n_tok) if by_tokens else (len(r) / len(mini_rows))
                    (loss * scale).backward()
                    m["loss"] = float(loss.detach()) * float(scale)
                    step_metrics.append(m)
                if cfg.max_grad_norm > 0:
                    grad_norms.append(
                        float(
                            torch.nn.utils.clip_grad_norm_(
                                self.model.parameters(), cfg.max_grad_norm
                            )
                        )
                    )
                self.optimizer.step()
        times["update"] = time.perf_counter() - t_upd - times["reference"] - times["nthr"] * fused
        self.model.eval()

        row["loss"] = float(np.sum([m["loss"] for m in step_metrics])) / (
            cfg.num_iterations * len(minis)
        )
        for key in ("kl", "clip_frac_low", "clip_frac_high", "ratio_mean"):
            vals = [m[key] for m in step_metrics if key in m]
            row[key] = float(np.nanmean(vals)) if vals else math.nan
        if rule.penalty is not None:  # the rule's extra loss term: its mean per valid token
            row["rule/penalty"] = float(np.nanmean([m["penalty"] for m in step_metrics]))
        if rule.needs_entropy:  # the share of valid tokens the entropy mask kept
            kept, valid = kept_counts
            row["rule/entropy_kept_frac"] = kept / valid if valid else math.nan
        row["ratio_min"] = min((m["ratio_min"] for m in step_metrics), default=math.nan)
        row["ratio_max"] = max((m["ratio_max"] for m in step_metrics), default=math.nan)
        row["grad_norm"] = float(np.mean(grad_norms)) if grad_norms else math.nan
        row["updates"] = float(cfg.num_iterations * len(minis))  # optimizer steps on this batch
        for key in sorted({k for m in hook_metrics for k in m}):
            vals = np.array([m.get(key, math.nan) for m in hook_metrics], dtype=float)
            if key == "nthr/mixed_groups":
                row[key] = float(np.nansum(vals))
            else:
                finite = vals[np.isfinite(vals)]
                row[key] = (
                    float(finite.mean())
                    if finite.size
                    else (float(vals[0]) if vals.size else math.nan)
                )

        if cfg.track_lld:
            t0 = time.perf_counter()
            self._track_lld(ro, rewards, old_logps, row)
            times["lld"] = time.perf_counter() - t0

    @torch.no_grad()
    def _track_lld(
        self, ro: Rollouts, rewards: torch.Tensor, old_logps: torch.Tensor, row: dict
    ) -> None:
        """Change of ln pi(y+|x) of the correct responses of this batch's mixed groups over the
        update, and the LLD rate (the correct answers of an all-right group that a rule keeping
        homogeneous groups trains on are left out, so that every rule is measured on the same
        kind of answers)."""
        G = ro.group_size
        in_mixed = mixed_group_mask(rewards).repeat_interleave(G)  # (N,)
        correct_rows = (is_correct(rewards.reshape(-1)) & in_mixed).nonzero().squeeze(-1)
        row["lld/n_correct"] = float(correct_rows.numel())
        if correct_rows.numel() == 0:
            row["lld/delta_mean"] = row["lld/rate"] = math.nan
            return
        before = sequence_logprob(old_logps[correct_rows], ro.completion_mask[correct_rows])
        groups = sorted({int(r) // G for r in correct_rows})
        new = torch.zeros_like(old_logps)
        for micro in self._micro_batches(groups):
            sub = ro.select_groups(micro)
            rows = torch.tensor([g * G + j for g in micro for j in range(G)], device=self.device)
            new[rows] = self._logps(self.model, sub).float()
        after = sequence_logprob(new[correct_rows], ro.completion_mask[correct_rows])
        delta = after - before
        row["lld/delta_mean"] = float(delta.mean())
        row["lld/rate"] = lld_rate(delta, self.cfg.lld_eps)

    # -- checkpoints
    def save_checkpoint(self, run_dir: Path) -> None:
        """Atomically save weights, optimizer, RNG, step and metrics."""
        state = {
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": _rng_state(),
            "rows": self.rows,
            "config": self.cfg.to_dict(),
        }
        atomic_torch_save(state, run_dir / "checkpoint.pt")

    def load_checkpoint(self, run_dir: Path) -> None:
        """Restore a checkpoint written by ``save_checkpoint``."""
        state = torch.load(run_dir / "checkpoint.pt", map_location=self.device, weights_only=False)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        _set_rng_state(state["rng"])
        self.step, self.rows = int(state["step"]), list(state["rows"])

    def save_model(self, run_dir: Path) -> Path:
        """Save the final weights and tokenizer to ``run_dir/model`` (temporary folder, then
        rename)."""
        target = run_dir / "model"
        staging = Path(tempfile.mkdtemp(prefix=".model.", dir=run_dir))
        try:
            self.model.save_pretrained(staging, safe_serialization=True)
            self.tokenizer.save_pretrained(staging)
            if target.exists():
                shutil.rmtree(target)
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return target


# Config fields a resumed run may change: they do not alter the steps already taken.
_RESUMABLE_CHANGES = ("steps", "checkpoint_every", "keep_checkpoint", "save_model")


def _shared_prefix(ro: Rollouts, rewards: torch.Tensor) -> float:
    """Mean over the mixed groups of ``similarity.shared_prefix_share``: how much of a wrong answer
    repeats a right one from its start (NaN when no group is mixed)."""
    from nthr_book.similarity import shared_prefix_share

    G, mixed = ro.group_size, mixed_group_mask(rewards)
    shares = [
        shared_prefix_share(
            ro.completion_ids[g * G : (g + 1) * G].cpu(),
            ro.completion_mask[g * G : (g + 1) * G].cpu(),
            is_correct(rewards[g]).cpu(),
        )
        for g in mixed.nonzero().squeeze(-1).tolist()
    ]
    return float(np.mean(shares)) if shares else math.nan


def _finished(run_dir: Path) -> bool:
    """Whether ``train`` completed the run in ``run_dir`` (older runs: ``model/`` marks it)."""
    return (run_dir / "finished.json").exists() or (run_dir / "model").exists()


def _steps_done(run_dir: Path) -> int:
    """Rows in a run's metrics.csv (0 when it has none)."""
    path = run_dir / "metrics.csv"
    return len(read_metrics(path)) if path.exists() else 0


def _check_run_dir(run_dir: Path, cfg: TrainConfig, hook_repr: str, resume: bool) -> None:
    saved_path = run_dir / "config.json"
    if not saved_path.exists():
        return
    saved = json.loads(saved_path.read_text())
    if not resume:
        raise FileExistsError(
            f"{run_dir} already holds a run; pass resume=True to continue it, "
            "or choose another output_dir"
        )
    mine = json.loads(json.dumps(cfg.to_dict()))
    # A field added after the run was saved (absent there) ran with its default behaviour.
    theirs = json.loads(json.dumps(TrainConfig().to_dict())) | saved["config"]
    diff = sorted(
        k
        for k in set(mine) | set(theirs)
        if mine.get(k) != theirs.get(k) and k not in _RESUMABLE_CHANGES
    )
    if diff or saved.get("advantage_fn") != hook_repr:
        what = diff or ["advantage_fn"]
        raise ValueError(
            f"{saved_path}: resume with a different config ({', '.join(what)}); "
            "use the saved config or another output_dir"
        )


def train(
    config: TrainConfig,
    *,
    advantage_fn=None,
    reward_fn=None,
    resume: bool = False,
    callbacks: Sequence[Callable[[int, dict], None]] = (),
    model=None,
    tokenizer=None,
    progress: bool = True,
    device: str | None = None,
) -> Path:
    """Train with GRPO (or NTHR / Pos Only per ``config.method``); returns the run folder. Notebook
    01.

    ``advantage_fn(ctx: AdvantageContext) -> (advantages, metrics)`` overrides the method's hook.
    ``reward_fn(completions, answers) -> list[float]`` overrides the math reward. ``callbacks`` are
    called as ``cb(step, row)`` after each step. ``resume=True`` continues from ``checkpoint.pt``,
    returns a finished run of ``steps`` steps as it is, extends a finished run to more ``steps``
    when it kept its checkpoint, and refuses one of more steps than ``steps``. ``device``: where to
    train (default: CUDA when present, else the CPU); notebook 01 trains on the CPU at every size to
    compare its hand-written loop with this one bit for bit.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    run_dir = config.run_dir()
    hook = advantage_fn if advantage_fn is not None else make_advantage_fn(config)
    hook_repr = repr(hook)
    _check_run_dir(run_dir, config, hook_repr, resume)
    done = _steps_done(run_dir) if resume and _finished(run_dir) else None  # None: not finished
    if done is not None and done > config.steps:
        raise ValueError(
            f"{run_dir}: holds a finished run of {done} steps, more than steps={config.steps}; "
            "its model is not the shorter run's. Choose another output_dir"
        )
    if done is not None and done == config.steps:
        if config.save_model and not (run_dir / "model").exists():
            raise ValueError(
                f"{run_dir}: the run finished without its model (save_model=False), so it has no "
                "weights to give; delete the folder to train it again with save_model=True, or "
                "choose another output_dir"
            )
        return run_dir  # reuse the finished run: no model load, no checkpoint read
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer = GRPOTrainer(
        config,
        advantage_fn=hook,
        reward_fn=reward_fn,
        model=model,
        tokenizer=tokenizer,
        device=device,
    )
    if resume and (run_dir / "checkpoint.pt").exists():
        trainer.load_checkpoint(run_dir)
    elif done is not None:
        raise ValueError(
            f"{run_dir}: the run finished at {done} steps and did not keep its checkpoint, so it "
            f"cannot be extended to steps={config.steps}; train it with keep_checkpoint=True, "
            "or choose another output_dir"
        )
    (run_dir / "finished.json").unlink(missing_ok=True)  # complete again only at the end
    write_json(
        run_dir / "config.json",
        {
            "config": config.to_dict(),
            "advantage_fn": hook_repr,
            "reward_fn": repr(reward_fn) if reward_fn else "math_rewards",
            "versions": versions(),
            "device": str(trainer.device),
        },
    )
    from tqdm.auto import tqdm

    bar = tqdm(
        range(trainer.step, config.steps),
        desc=f"{config.method} seed{config.seed}",
        initial=trainer.step,
        total=config.steps,
        disable=not progress,
    )
    for step in bar:
        row = trainer.train_step(step)
        trainer.rows.append(row)
        trainer.step = step + 1
        _write_metrics(run_dir / "metrics.csv", trainer.rows)
        bar.set_postfix(reward=f"{row['reward_mean']:.2f}", sec=f"{row['time_step']:.0f}")
        if config.checkpoint_every and trainer.step % config.checkpoint_every == 0:
            trainer.save_checkpoint(run_dir)
        for cb in callbacks:
            cb(step, row)
    if config.save_model:
        trainer.save_model(run_dir)
    if config.keep_checkpoint:
        trainer.save_checkpoint(run_dir)
    write_json(run_dir / "finished.json", {"steps": trainer.step, "model_saved": config.save_model})
    if not config.keep_checkpoint:  # the optimizer state is dead weight now
        (run_dir / "checkpoint.pt").unlink(missing_ok=True)
    return run_dir
