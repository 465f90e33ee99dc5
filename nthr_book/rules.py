"""The update rules nthr_book compares (docs/method.md §1-§3), in one registry.

A rule has a name, a display label and colour, and says how it changes GRPO's update. The trainer
(``TrainConfig.method``), Δ(x) (``lld.one_step_displacement``, ``lld_sweep.lld_experiment``), the
experiment runner (``experiments.method_overrides``), the TRL integration (``NTHRGRPOTrainer(rule=
...)``) and the plots (``viz.method_label``, ``viz.method_color``) all read this registry, so a new
rule is added in one place: here, or with ``register`` from a notebook.

How a rule changes the update, stage by stage (each consumer runs the stages it reads from here):

1. per-response advantages (num_groups, G), ``Rule.sequence_advantages``: ``from_rewards`` (the
   rewards -> the rule's own advantages, e.g. NSR's -1 on wrong answers), else GRPO's
   ``grpo.group_advantages`` with the rule's ``adv_std``; then ``advantages``, an elementwise
   function of them (Pos Only is ``grpo.pos_only``); broadcast to the tokens.
2. ``selection``: ``(nthr_selected, completion_mask, seed) -> tokens`` whose advantage becomes η·A,
   from NTHR's (G, T) selection of the group (docs/method.md §3, threshold scale ``nthr_beta``);
   None for rules that need none. NTHR keeps it; Random draws as many tokens per response at
   random (``nthr.random_selection``). Needs the last hidden states.
3. ``entropy_quantile`` ρ: only the top-ρ valid tokens by entropy keep their advantage
   (``grpo.high_entropy_mask``), the others get 0. Needs the per-token entropies of the pass that
   also gives the old log-probs (``grpo.per_token_logps(return_entropy=True)``); the quantile runs
   over the valid tokens of that pass's batch (the trainer's micro-batch of groups, Δ(x)'s group),
   as TRL's over each forward batch.
4. the loss: the settings ``clip_eps_high`` and ``agg`` of ``grpo.policy_loss``, and ``penalty``,
   an extra per-token loss term ``(logps, old_logps, advantages, mask) -> (N, T)`` (LLDS's).

Which groups a rule trains on: GRPO's advantages are 0 on a group whose answers are all right or
all wrong, so the trainer's dynamic sampling drops such groups (``TrainConfig.dynamic_sampling``).
A rule whose own advantages are not 0 there says ``keeps_homogeneous=True`` (NSR and W-REINFORCE:
their code pushes an all-wrong group's answers down with -1 and no baseline), and the trainer keeps
every group for it. TRL's trainer keeps every group anyway (it has no dynamic sampling).

Settings (``SETTINGS``: ``clip_eps_high``, ``agg``, ``adv_std``, ``nthr_beta``) carry the names of
the ``TrainConfig`` fields they set. A rule's setting replaces the caller's default; a caller that
asks for another value is refused (``Rule.resolve_settings``).

The trainer runs NTHR through its batch hook (``nthr.nthr_advantage_fn``, η from the config's
schedule) for a trainable rule with a selection, Δ(x) uses the rule's own ``selection`` with a
constant η. Rules that the trainer cannot run (Random) say ``trainable=False``.

What each rule does in a ONE-step Δ(x) (``steps=1``: the old policy is the current one, every
ratio is 1): Clip-Higher is exactly GRPO there (nothing is clipped at ratio 1), and so are both
LLDS rules (the penalty is 0 with zero gradient until the policy moves); they differ from GRPO
only from the second step of ``steps > 1``, or in the trainer with several mini-batches or
``num_iterations > 1``. Dr. GRPO's step is GRPO's with unnormalised advantages (r - mean) and a
constant normaliser G·T: a rescaled step on a mixed group.

TRL (``GRPOConfig``, trl 1.16) has its own knob for some rules: Clip-Higher is ``epsilon=0.2,
epsilon_high=0.28``; Dr. GRPO is ``loss_type="dr_grpo", scale_rewards="none"``; the high-entropy
rule is ``top_entropy_quantile=0.2`` (TRL computes the entropies on every training forward, the
current policy's; nthr_book on the old policy's pass, the same pass when each rollout batch gets
one gradient step); NTHR at β = -∞ is ``NTHRGRPOTrainer(nthr=NTHRConfig(beta=-inf))``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

from torch import Tensor

from nthr_book import grpo, nthr

__all__ = ["SETTINGS", "Rule", "get", "label", "names", "register", "unregister"]

SETTINGS = ("clip_eps_high", "agg", "adv_std", "nthr_beta")
"""The loss and advantage settings a rule may carry (named as the TrainConfig fields they set)."""

CLIP_HIGHER_EPS_HIGH = 0.28  # DAPO (arXiv 2503.14476), §3.1: ε_low = 0.2, ε_high = 0.28
HIGH_ENTROPY_QUANTILE = 0.2  # arXiv 2506.01939: the top 20% tokens by entropy


@dataclass(frozen=True)
class Rule:
    """One update rule: name, label, colour, and how it changes GRPO's update (see the module)."""

    name: str
    """Key used by TrainConfig(method=...), lld's ``update``/``methods`` and the plots."""
    label: str
    """Display name in plots and tables ("Pos Only")."""
    color: int | None = None
    """Index into the plots' "colorblind" palette (viz); None: a spare colour."""
    advantages: Callable[[Tensor], Tensor] | None = None
    """Elementwise: per-response advantages -> the rule's, before any selection; None keeps them."""
    selection: Callable[[Tensor, Tensor, int], Tensor] | None = None
    """(nthr_selected, completion_mask, seed) -> (G, T) tokens that get η·A; None: no selection."""
    trainable: bool = True
    """Whether ``TrainConfig(method=name)`` accepts it (the trainer runs NTHR's selection only)."""
    from_rewards: Callable[[Tensor], Tensor] | None = None
    """(num_groups, G) rewards -> the rule's per-response advantages, replacing GRPO's."""
    entropy_quantile: float | None = None
    """ρ in (0, 1]: only the top-ρ valid tokens by entropy keep their advantage; None: all."""
    penalty: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor] | None = None
    """(logps, old_logps, advantages, mask) -> (N, T) extra per-token loss; None: none."""
    clip_eps_high: float | None = None
    """Setting: the loss's upper clip ε_high (``grpo.policy_loss``); None: the caller's."""
    agg: str | None = None
    """Setting: the loss's aggregation (``grpo.AGG_MODES``); None: the caller's."""
    adv_std: str | None = None
    """Setting: GRPO's advantage normaliser (``grpo.STD_MODES``); None: the caller's."""
    nthr_beta: float | None = None
    """Setting: NTHR's threshold scale β for the rule's selection; None: the caller's."""
    keeps_homogeneous: bool = False
    """Whether the rule trains on homogeneous groups (all right or all wrong) too: True when its
    advantages are not 0 there (NSR, W-REINFORCE), so dynamic sampling keeps every group for it."""
    why: str = ""
    """One line: what the rule does to the wrong answers' gradient, and why (notebook 08)."""

    def __post_init__(self) -> None:
        def bad(field: str, why: str) -> None:
            raise ValueError(f"Rule {self.name!r}: {field}={getattr(self, field)!r}: {why}")

        if not isinstance(self.keeps_homogeneous, bool):
            bad("keeps_homogeneous", "expected True or False")
        q = self.entropy_quantile
        if q is not None and not (isinstance(q, (int, float)) and 0 < q <= 1):
            bad("entropy_quantile", "expected a number in (0, 1] or None")
        h = self.clip_eps_high
        if h is not None and not (isinstance(h, (int, float)) and 0 < h < math.inf):
            bad("clip_eps_high", "expected a number > 0 or None")
        if self.agg is not None and self.agg not in grpo.AGG_MODES:
            bad("agg", f"expected one of {grpo.AGG_MODES} or None")
        if self.adv_std is not None and self.adv_std not in grpo.STD_MODES:
            bad("adv_std", f"expected one of {grpo.STD_MODES} or None")
        if self.nthr_beta is not None and (self.selection is None or math.isnan(self.nthr_beta)):
            bad("nthr_beta", "expected a number or -inf, on a rule with a selection")
        if self.from_rewards is not None and self.adv_std is not None:
            bad("adv_std", "has no effect on a rule whose advantages come from_rewards")

    @property
    def needs_hidden(self) -> bool:
        """True when the rule needs NTHR's selection, and so the last hidden states."""
        return self.selection is not None

    @property
    def needs_entropy(self) -> bool:
        """True when the rule masks tokens by entropy, and so needs the per-token entropies."""
        return self.entropy_quantile is not None

    def transform(self, advantages: Tensor) -> Tensor:
        """The rule's elementwise change of the advantages (identity when it has none)."""
        return advantages if self.advantages is None else self.advantages(advantages)

    def sequence_advantages(
        self,
        rewards: Tensor,
        *,
        std: str = "population",
        eps: float = 1e-6,
        group_advantages: Tensor | None = None,
    ) -> Tensor:
        """(num_groups, G) per-response advantages of the rule: stage 1 of the module docstring.

        ``from_rewards(rewards)`` when the rule has one, else GRPO's advantages: the given
        ``group_advantages`` (a trainer's own, e.g. TRL's) or ``grpo.group_advantages(rewards,
        std=std, eps=eps)``; then ``transform``. ``std`` is the caller's, after
        ``resolve_settings``.
        """
        if self.from_rewards is not None:
            base = self.from_rewards(rewards)
        elif group_advantages is not None:
            base = group_advantages
        else:
            base = grpo.group_advantages(rewards, std=std, eps=eps)
        return self.transform(base)

    def entropy_masked(
        self, advantages: Tensor, entropy: Tensor | None, completion_mask: Tensor
    ) -> tuple[Tensor, Tensor | None]:
        """Stage 3: (N, T) advantages with 0 outside the top-ρ tokens by entropy, and the (N, T)
        bool tokens kept; unchanged and None when the rule has no entropy mask."""
        if self.entropy_quantile is None:
            return advantages, None
        if entropy is None:
            raise ValueError(f"rule {self.name!r} masks tokens by entropy: pass the entropies")
        kept = grpo.high_entropy_mask(entropy, completion_mask, self.entropy_quantile)  # (N, T)
        return advantages.where(kept, advantages.new_zeros(())), kept

    def loss_penalty(
        self, logps: Tensor, old_logps: Tensor, advantages: Tensor, completion_mask: Tensor
    ) -> Tensor | None:
        """The rule's extra (N, T) per-token loss term for ``grpo.policy_loss(penalty=...)``
        (stage 4), or None."""
        if self.penalty is None:
            return None
        return self.penalty(logps, old_logps, advantages, completion_mask)

    def settings(self) -> dict[str, Any]:
        """The settings the rule carries ({} for most rules), by ``SETTINGS`` name."""
        return {k: getattr(self, k) for k in SETTINGS if getattr(self, k) is not None}

    def resolve_settings(
        self,
        values: Mapping[str, Any],
        defaults: Mapping[str, Any],
        *,
        owner: str,
        arg_names: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """``values`` (one per ``SETTINGS`` name) with the rule's settings in place of defaults.

        A value that differs from both its default and the rule's setting is a contradiction:
        ValueError naming ``owner`` and the argument (``arg_names`` maps a setting to the caller's
        name for it, e.g. {"nthr_beta": "beta"}).
        """
        out = {k: values[k] for k in SETTINGS}
        for key, rule_value in self.settings().items():
            given = values[key]
            if given != defaults[key] and given != rule_value:
                arg = (arg_names or {}).get(key, key)
                raise ValueError(
                    f"{owner}{arg}={given!r}: update rule {self.name!r} sets {key}={rule_value!r}"
                    " (leave it at its default, or set it to the rule's value)"
                )
            out[key] = rule_value
        return out


def _nthr_tokens(selected: Tensor, mask: Tensor, seed: int) -> Tensor:
    """NTHR: the selected tokens themselves."""
    return selected


_RULES: dict[str, Rule] = {}


def register(rule: Rule, *, replace: bool = False) -> Rule:
    """Add ``rule`` to the registry (``replace=True`` to overwrite a rule of the same name)."""
    if not isinstance(rule, Rule):
        raise TypeError(f"expected a rules.Rule, got {type(rule).__name__}")
    if not rule.name or not isinstance(rule.name, str):
        raise ValueError(f"a rule needs a non-empty name, got {rule.name!r}")
    if rule.name in _RULES and not replace:
        raise ValueError(f"rule {rule.name!r} is already registered (pass replace=True)")
    _RULES[rule.name] = rule
    return rule


def unregister(name: str) -> Rule:
    """Remove and return the rule called ``name``."""
    return _RULES.pop(get(name).name)


def get(name: str) -> Rule:
    """The rule called ``name``; ValueError naming the known rules otherwise."""
    try:
        return _RULES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown update rule {name!r}: expected one of {names()}") from None


def names(*, trainable: bool | None = None) -> tuple[str, ...]:
    """Registered rule names in registration order (only the trainable ones with trainable=True)."""
    return tuple(n for n, r in _RULES.items() if trainable is None or r.trainable == trainable)


def label(name: str) -> str:
    """Display label of a registered rule; other names unchanged."""
    rule = _RULES.get(name)
    return name if rule is None else rule.label


# The paper's rules (arXiv 2505.18830, docs/method.md §1-§3).
register(Rule("grpo", "GRPO", color=0, why="every wrong token pushed down by the group's A < 0"))
register(
    Rule(
        "pos_only",
        "Pos Only",
        color=1,
        advantages=grpo.pos_only,
        why="no negative gradient at all: the control that shows what the wrong answers' push does",
    )
)
register(
    Rule(
        "nthr",
        "GRPO + NTHR",
        color=2,
        selection=_nthr_tokens,
        why="the wrong tokens whose push would pull the right answers down most keep only η·A",
    )
)
register(
    Rule(
        "random",
        "GRPO + Random",
        color=7,
        selection=nthr.random_selection,
        trainable=False,
        why="as many wrong tokens as NTHR, picked at random: the control for NTHR's choice",
    )
)

# The family of negative-gradient fixes (sources and choices in each formula's docstring):
# GRPO's negative advantages only (Pos Only's mirror: NSR on GRPO's scale, mixed groups only);
register(
    Rule(
        "neg_only",
        "Neg Only",
        advantages=grpo.neg_only,
        why="only the wrong answers' push, on GRPO's scale: the mirror of Pos Only",
    )
)
# NSR and W-REINFORCE (arXiv 2506.01347): -1 on wrong responses, 0 (NSR) or λ = 0.1 (W-REINFORCE)
# on correct ones, as their code has them (no group normalisation: all-wrong groups count too, and
# the trainer keeps them: keeps_homogeneous);
register(
    Rule(
        "nsr",
        "NSR",
        from_rewards=grpo.negative_sample_advantages,
        keeps_homogeneous=True,
        why="-1 on every wrong answer, nothing on right ones: learning from mistakes alone",
    )
)
register(
    Rule(
        "w_reinforce",
        "W-REINFORCE",
        from_rewards=grpo.weighted_reinforce_advantages,
        keeps_homogeneous=True,
        why="-1 on wrong answers, +0.1 on right ones: the negative push dominates by design",
    )
)
# the policy gradient on the top 20% tokens by entropy (arXiv 2506.01939, TRL's mask);
register(
    Rule(
        "high_entropy",
        "GRPO + Top-20% Entropy",
        entropy_quantile=HIGH_ENTROPY_QUANTILE,
        why="only the 20% most uncertain tokens (the forks) are pushed, in right and wrong answers",
    )
)
# DAPO's clip-higher (arXiv 2503.14476): ε_low = 0.2 (the caller's clip_eps), ε_high = 0.28;
register(
    Rule(
        "clip_higher",
        "Clip-Higher",
        clip_eps_high=CLIP_HIGHER_EPS_HIGH,
        why="a wider upper clip lets rare right tokens rise further; at ratio 1 it is GRPO",
    )
)
# Dr. GRPO (Liu et al., "Understanding R1-Zero-Like Training", arXiv 2503.20783): advantages
# without the std, and the constant normaliser G·L_max;
register(
    Rule(
        "dr_grpo",
        "Dr. GRPO",
        agg="dr_grpo",
        adv_std="none",
        why="no std and a constant normaliser: long wrong answers are not pushed less per token",
    )
)
# LLDS (arXiv 2512.04220): λ = 0.2 · max(0, ln π_old - ln π_θ) on A >= 0 responses whose
# likelihood fell (``grpo.llds_penalty``), with the response-level gate and with the finest one;
register(
    Rule(
        "llds",
        "GRPO + LLDS",
        penalty=partial(grpo.llds_penalty, gate="response"),
        why="a penalty when a right answer's likelihood falls below the old policy's",
    )
)
register(
    Rule(
        "llds_token",
        "GRPO + LLDS (token)",
        penalty=partial(grpo.llds_penalty, gate="token"),
        why="the same penalty token by token, where each token's log-prob fell",
    )
)
# NTHR at β = -∞ (arXiv 2505.18830's β ablation): every wrong token's advantage becomes η·A.
register(
    Rule(
        "nthr_all",
        "GRPO + NTHR (β = -∞)",
        selection=_nthr_tokens,
        nthr_beta=-math.inf,
        why="every wrong token keeps η·A: NTHR without its selection (the paper's β ablation)",
    )
)
