"""Tests for nthr_book.rules: one registry of update rules, read by Δ(x), the trainer, the
runner and the plots."""

from __future__ import annotations

import pytest
import torch

from nthr_book import experiments, lld, rules, trainer, viz
from nthr_book.groups import Group
from nthr_book.lld import one_step_displacement
from nthr_book.models import tiny_random_model

torch.set_num_threads(1)


@pytest.fixture
def toy_rule():
    """A registered toy rule (advantages halved), removed again after the test."""
    rule = rules.register(rules.Rule("toy_half", "Toy ½", advantages=lambda a: 0.5 * a))
    try:
        yield rule
    finally:
        rules.unregister("toy_half")
    assert "toy_half" not in rules.names()


def _group() -> Group:
    completions = [[10, 11, 12], [10, 11, 14, 15], [10, 20, 0, 0], [11, 12, 13, 0]]
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    ids = torch.tensor([c + [0] * (4 - len(c)) for c in completions])[:, :4]
    return Group.from_tensors(torch.tensor([5, 6, 7]), ids, mask, [1.0, 0.0, 0.0, 1.0])


def test_builtin_rules():
    assert rules.names() == ("grpo", "pos_only", "nthr", "random")
    assert rules.names(trainable=True) == ("grpo", "pos_only", "nthr")
    assert [rules.get(n).needs_hidden for n in rules.names()] == [False, False, True, True]
    adv = torch.tensor([[1.0, -2.0], [-0.5, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(
        rules.get("pos_only").transform(adv),
        torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=torch.float64),
    )
    assert rules.get("grpo").transform(adv) is adv
    assert viz.method_label("pos_only") == "Pos Only" and viz.method_label("base") == "Base"
    assert viz.method_label("unknown") == "unknown"
    with pytest.raises(ValueError, match="unknown update rule 'nope'"):
        rules.get("nope")
    with pytest.raises(ValueError, match="already registered"):
        rules.register(rules.Rule("grpo", "GRPO again"))


def test_a_registered_rule_reaches_lld_trainer_runner_and_plots(toy_rule):
    assert "toy_half" in lld.METHODS and "toy_half" in rules.names(trainable=True)
    cfg = trainer.TrainConfig(method="toy_half")  # accepted by the trainer's config
    assert trainer.make_advantage_fn(cfg) is None  # no selection: no hook
    assert experiments.method_overrides("toy_half") == {"method": "toy_half"}
    assert viz.method_label("toy_half") == "Toy ½" and viz.METHOD_LABELS["toy_half"] == "Toy ½"
    assert len(viz.method_color("toy_half")) == 3

    model, group = tiny_random_model(64, seed=1, hidden_size=32), _group()
    toy = one_step_displacement(model, group, update="toy_half", lr=0.05)
    grpo_half_lr = one_step_displacement(model, group, update="grpo", lr=0.025)
    assert toy.method == "toy_half" and toy.n_selected_tokens is None
    # one SGD step from ratio 1: the gradient is linear in A, so A/2 at lr equals A at lr/2
    torch.testing.assert_close(
        torch.tensor(toy.per_response_delta),
        torch.tensor(grpo_half_lr.per_response_delta),
        rtol=1e-3,
        atol=1e-6,
    )
    assert toy.delta > 0  # the correct answers rose


def test_unregistered_rules_are_refused():
    with pytest.raises(ValueError, match="toy_half"):
        trainer.TrainConfig(method="toy_half")
    with pytest.raises(ValueError, match="TrainConfig.method='random'"):
        trainer.TrainConfig(method="random")  # Random is a Δ(x) control, not a trainable rule
    with pytest.raises(ValueError, match="update='toy_half'"):
        one_step_displacement(
            tiny_random_model(64, seed=1, hidden_size=32), _group(), update="toy_half", lr=0.05
        )
