"""The update rules nthr_book compares (docs/method.md §1-§3), in one registry.

A rule has a name, a display label and colour, how it changes the GRPO advantages, and whether it
needs NTHR's token selection (and so the last hidden states). The trainer (``TrainConfig.method``),
Δ(x) (``lld.one_step_displacement``, ``lld.lld_experiment``), the experiment runner
(``experiments.method_overrides``) and the plots (``viz.method_label``, ``viz.method_color``)
all read this registry, so a new rule is added in one place: here, or with ``register`` from a
notebook.

How a rule changes the advantages, in two stages:

- ``advantages``: a function of the GRPO advantages alone (per sequence (num_groups, G) in the
  trainer, per token (G, T) in Δ(x)); None keeps them. Pos Only is ``grpo.pos_only``.
- ``selection``: ``(nthr_selected, completion_mask, seed) -> tokens`` whose advantage becomes η·A,
  from NTHR's (G, T) selection of the group (docs/method.md §3); None for rules that need none.
  NTHR keeps it; Random draws as many tokens per response at random (``nthr.random_selection``).

The trainer runs NTHR through its batch hook (``nthr.nthr_advantage_fn``, η from the config's
schedule) for a trainable rule with a selection, Δ(x) uses the rule's own ``selection`` with a
constant η. Rules that the trainer cannot run (Random) say ``trainable=False``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from nthr_book import grpo, nthr

__all__ = ["Rule", "get", "label", "names", "register", "unregister"]


@dataclass(frozen=True)
class Rule:
    """One update rule: name, label, colour, and how it changes the advantages."""

    name: str
    """Key used by TrainConfig(method=...), lld's ``update``/``methods`` and the plots."""
    label: str
    """Display name in plots and tables ("Pos Only")."""
    color: int | None = None
    """Index into the plots' "colorblind" palette (viz); None: a spare colour."""
    advantages: Callable[[Tensor], Tensor] | None = None
    """GRPO advantages -> the rule's advantages, before any selection; None keeps them."""
    selection: Callable[[Tensor, Tensor, int], Tensor] | None = None
    """(nthr_selected, completion_mask, seed) -> (G, T) tokens that get η·A; None: no selection."""
    trainable: bool = True
    """Whether ``TrainConfig(method=name)`` accepts it (the trainer runs NTHR's selection only)."""

    @property
    def needs_hidden(self) -> bool:
        """True when the rule needs NTHR's selection, and so the last hidden states."""
        return self.selection is not None

    def transform(self, advantages: Tensor) -> Tensor:
        """The rule's selection-free change of the advantages (identity when it has none)."""
        return advantages if self.advantages is None else self.advantages(advantages)


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


register(Rule("grpo", "GRPO", color=0))
register(Rule("pos_only", "Pos Only", color=1, advantages=grpo.pos_only))
register(Rule("nthr", "GRPO + NTHR", color=2, selection=_nthr_tokens))
register(Rule("random", "GRPO + Random", color=7, selection=nthr.random_selection, trainable=False))
