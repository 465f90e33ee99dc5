"""Tests for nthr_book.rules: one registry of update rules, read by Δ(x), the trainer, the
runner and the plots."""

from __future__ import annotations

import math

import pytest
import torch

from nthr_book import experiments, grpo, lld, nthr, rules, trainer, viz
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


PAPER_RULES = ("grpo", "pos_only", "nthr", "random")
FAMILY = (
    "neg_only",
    "nsr",
    "w_reinforce",
    "high_entropy",
    "clip_higher",
    "dr_grpo",
    "llds",
    "llds_token",
    "nthr_all",
)


def test_builtin_rules():
    assert rules.names() == PAPER_RULES + FAMILY
    assert rules.names(trainable=True) == tuple(n for n in rules.names() if n != "random")
    assert [n for n in rules.names() if rules.get(n).needs_hidden] == ["nthr", "random", "nthr_all"]
    adv = torch.tensor([[1.0, -2.0], [-0.5, 0.0]], dtype=torch.float64)
    assert torch.equal(  # a clamp at 0: exact
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
    # one SGD step from ratio 1: the gradient is linear in A, so A/2 at lr equals A at lr/2; and
    # halving is exact in floating point (a power of 2), so every product of the step is the same
    # number: equal bit for bit
    assert toy.per_response_delta == grpo_half_lr.per_response_delta
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


# ------------------------------------------------------------------ the family, by hand

F64 = torch.float64
EPS64 = torch.finfo(F64).eps
EPS32 = torch.finfo(torch.float32).eps
DEFAULTS = {"clip_eps_high": None, "agg": "token", "adv_std": "population", "nthr_beta": 1.0}
ETA = 0.5

# One group, G = 4, T = 3. N+ = 3 (p = 3/4): GRPO's A- = -sqrt(p/(1-p)) = -1.73, not NSR's -1.
REWARDS = [1.0, 1.0, 1.0, 0.0]
MASK = [[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]]  # 9 valid tokens
# π_θ/π_old per token: row 0 (A > 0): 1.25 lies between GRPO's 1 + 0.2 and DAPO's 1 + 0.28, and
# its log-likelihood rose overall (ln 1.25 + ln 1.1 + ln 0.9 > 0) although its last token fell;
# row 1 (A > 0): its log-likelihood fell (ln 0.7 + ln 1.05 < 0); row 2: ratio 1; row 3 (A < 0):
# 0.75 < 0.8 is clipped, 1.3 is not (A < 0: the min keeps the unclipped term).
RATIOS = [[1.25, 1.1, 0.9], [0.7, 1.05, 1.0], [1.0, 1.0, 1.0], [0.75, 1.3, 1.0]]
OLD = [[-1.0, -2.0, -0.5], [-1.5, -0.8, -3.0], [-0.3, -1.0, -1.0], [-2.2, -0.4, -1.1]]
# per-token entropies; the padded positions' 9.9 must not count
ENTROPY = [[0.5, 2.0, 1.0], [3.0, 0.1, 9.9], [1.5, 9.9, 9.9], [2.5, 0.7, 0.2]]


def _tensors():
    mask = torch.tensor(MASK, dtype=torch.bool)
    old = torch.tensor(OLD, dtype=F64)
    logps = (old + torch.tensor(RATIOS, dtype=F64).log()).requires_grad_(True)
    return logps, old, torch.tensor(REWARDS, dtype=F64), mask, torch.tensor(ENTROPY, dtype=F64)


def _rule_loss(rule, logps, old, rewards, mask, entropy):
    """The rule's stages as the consumers run them (rules' module docstring), Δ(x)'s defaults."""
    settings = rule.resolve_settings(DEFAULTS, DEFAULTS, owner="test: ")
    adv = rule.sequence_advantages(rewards[None], std=settings["adv_std"])  # (1, G)
    adv = grpo.expand_advantages(adv, mask)  # (G, T)
    if rule.needs_hidden:  # any scores: β = -inf selects every wrong token whatever they are
        scores = torch.randn(mask.shape, dtype=F64, generator=torch.Generator().manual_seed(0))
        selected = nthr.select_tokens(scores, mask, rewards > 0.5, settings["nthr_beta"])
        adv = nthr.reweight_advantages(adv, rule.selection(selected, mask, 0), ETA)
    adv, _ = rule.entropy_masked(adv, entropy, mask)
    loss, _ = grpo.policy_loss(
        logps,
        old,
        adv,
        mask,
        clip_eps=0.2,
        clip_eps_high=settings["clip_eps_high"],
        agg=settings["agg"],
        penalty=rule.loss_penalty(logps, old, adv, mask),
    )
    return loss


def _hand_quantile(values: list[float], q: float) -> float:
    """The q-quantile with linear interpolation between order statistics (torch.quantile's)."""
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    return s[lo] + (pos - lo) * (s[min(lo + 1, len(s) - 1)] - s[lo])


def _hand_gradient(name: str, logps: list, old: list) -> list:
    """dL/d ln π_θ(y_t) per token, from the papers' formulas written out with Python floats."""
    G, T = len(MASK), len(MASK[0])
    correct = [r > 0.5 for r in REWARDS]
    mean = sum(REWARDS) / G
    std = math.sqrt(sum((r - mean) ** 2 for r in REWARDS) / G)  # population std, as the paper
    grpo_a = [(r - mean) / (std + 1e-6) for r in REWARDS]
    seq = {
        "nsr": [0.0 if c else -1.0 for c in correct],  # NSR: r - 1, r in {0, 1}
        "w_reinforce": [0.1 if c else -1.0 for c in correct],  # λ·r, r - 1
        "dr_grpo": [r - mean for r in REWARDS],  # no std
        "pos_only": [max(a, 0.0) for a in grpo_a],
        "neg_only": [min(a, 0.0) for a in grpo_a],
    }.get(name, grpo_a)
    valid = [[bool(m) for m in row] for row in MASK]
    n_valid = sum(map(sum, valid))
    adv = [[seq[i] if valid[i][t] else 0.0 for t in range(T)] for i in range(G)]
    if name == "nthr_all":  # every wrong token: η·A
        adv = [[a * ETA if not correct[i] else a for a in adv[i]] for i in range(G)]
    if name == "high_entropy":  # top 20% of the valid tokens by entropy keep A
        ents = [ENTROPY[i][t] for i in range(G) for t in range(T) if valid[i][t]]
        threshold = _hand_quantile(ents, 0.8)
        adv = [
            [a if ENTROPY[i][t] >= threshold else 0.0 for t, a in enumerate(adv[i])]
            for i in range(G)
        ]
    eps_high = 0.28 if name == "clip_higher" else 0.2
    weight = 1 / (G * T) if name == "dr_grpo" else 1 / n_valid  # the loss's normaliser
    grad = [[0.0] * T for _ in range(G)]
    for i in range(G):
        drops = [old[i][t] - logps[i][t] for t in range(T) if valid[i][t]]
        response_fell = sum(drops) > 0  # LLDS's response gate (A >= 0 rows only, below)
        for t in range(T):
            if not valid[i][t]:
                continue
            a, r = adv[i][t], math.exp(logps[i][t] - old[i][t])
            clipped = (a > 0 and r > 1 + eps_high) or (a < 0 and r < 1 - 0.2)
            g = 0.0 if clipped else -a * r * weight  # d/dlogp of -(r·A)·weight
            fell = old[i][t] - logps[i][t] > 0
            gate = {"llds": fell and response_fell, "llds_token": fell}.get(name, False)
            if gate and seq[i] >= 0:  # d/dlogp of +λ·(old - logp)·weight
                g += -0.2 * weight
            grad[i][t] = g
    return grad


@pytest.mark.parametrize("name", ("grpo", "pos_only") + tuple(n for n in FAMILY))
def test_each_rule_gradient_equals_the_hand_derived_weights(name):
    """Which tokens, which sign, which weight: d loss / d ln π_θ(y_t) of every rule, by hand."""
    logps, old, rewards, mask, entropy = _tensors()
    loss = _rule_loss(rules.get(name), logps, old, rewards, mask, entropy)
    (grad,) = torch.autograd.grad(loss, logps)
    expected = torch.tensor(_hand_gradient(name, logps.tolist(), old.tolist()), dtype=F64)
    # each weight: a ratio exp(logp - old) (2 roundings on top of the log-ratio's), a product of
    # three factors and a division, and for LLDS one addition: at most 8 roundings, relative;
    # zeros (padding, clipped tokens, closed gates) are exact on both sides
    torch.testing.assert_close(grad, expected, rtol=8 * EPS64, atol=0.0)


def test_the_hand_example_tells_the_rules_apart():
    """The example is not degenerate: each rule's hand weights differ from GRPO's somewhere."""
    logps, old, *_ = _tensors()
    base = _hand_gradient("grpo", logps.tolist(), old.tolist())
    for name in FAMILY:
        assert _hand_gradient(name, logps.tolist(), old.tolist()) != base, name
    # the entropy mask keeps the 2 of 9 valid tokens at or above the 0.8-quantile (2.2 here)
    kept = grpo.high_entropy_mask(torch.tensor(ENTROPY), torch.tensor(MASK, dtype=bool), 0.2)
    assert kept.nonzero().tolist() == [[1, 0], [3, 0]]
    # LLDS: the token gate fires on row 0's last token and row 1's first, the response gate on
    # row 1 only (row 0's likelihood rose)
    token = grpo.llds_penalty(
        logps, old, torch.tensor([1.0, 1, 1, -1]), torch.tensor(MASK) > 0, gate="token"
    )
    resp = grpo.llds_penalty(logps, old, torch.tensor([1.0, 1, 1, -1]), torch.tensor(MASK) > 0)
    assert (token > 0).nonzero().tolist() == [[0, 2], [1, 0]]
    assert (resp > 0).nonzero().tolist() == [[1, 0]]
    # logp = old + ln 0.7 rounds at |old| = 1.5, so old - logp is -ln 0.7 to within 2·1.5·eps64;
    # times λ = 0.2, one rounding more
    expected = torch.tensor(0.2 * -math.log(0.7), dtype=F64)
    torch.testing.assert_close(resp[1, 0], expected, rtol=0.0, atol=0.2 * 3 * EPS64 + EPS64)


def test_keeps_homogeneous_marks_the_rules_that_train_on_homogeneous_groups():
    """The flag is True exactly for the rules whose advantages are not 0 on an all-right or
    all-wrong group (NSR and W-REINFORCE): dropping such groups changes only their updates."""
    homogeneous = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    for name in rules.names():
        rule = rules.get(name)
        std = rule.settings().get("adv_std", "population")
        signal = bool(rule.sequence_advantages(homogeneous, std=std).ne(0).any())
        assert rule.keeps_homogeneous == signal, name
    assert {n for n in rules.names() if rules.get(n).keeps_homogeneous} == {"nsr", "w_reinforce"}


def test_family_advantages_on_mixed_and_homogeneous_groups():
    """NSR and W-REINFORCE are not group-normalised: all-wrong and all-correct groups count."""
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    nsr = rules.get("nsr").sequence_advantages(rewards)
    w = rules.get("w_reinforce").sequence_advantages(rewards.double())
    assert nsr.tolist() == [[0, -1, -1, -1], [0, 0, 0, 0], [-1, -1, -1, -1]]
    assert w.tolist() == [[0.1, -1.0, -1.0, -1.0], [0.1] * 4, [-1.0] * 4]  # λ in float64
    assert w.dtype == torch.float64 and nsr.dtype == rewards.dtype
    grpo_adv = rules.get("grpo").sequence_advantages(rewards)
    assert grpo_adv[1:].eq(0).all()  # GRPO: homogeneous groups carry no signal
    neg = rules.get("neg_only").sequence_advantages(rewards)
    torch.testing.assert_close(neg, grpo_adv.clamp(max=0), rtol=0, atol=0)
    dr = rules.get("dr_grpo").sequence_advantages(rewards, std="none")
    assert dr.tolist() == [[0.75, -0.25, -0.25, -0.25], [0.0] * 4, [0.0] * 4]  # exact in binary
    # a trainer's own GRPO advantages (TRL's) go through the rule's elementwise change
    given = torch.tensor([[0.5, -0.5, 2.0, -2.0]])
    assert rules.get("pos_only").sequence_advantages(
        rewards[:1], group_advantages=given
    ).tolist() == [[0.5, 0.0, 2.0, 0.0]]
    with pytest.raises(ValueError, match="positive_weight"):
        grpo.weighted_reinforce_advantages(rewards, positive_weight=math.nan)


def test_llds_penalty_is_zero_with_zero_gradient_at_ratio_one():
    """Old = current policy: LLDS adds nothing, not even half a gradient at the tie."""
    logps, old, _, mask, _ = _tensors()
    at_one = old.clone().requires_grad_(True)
    adv = torch.tensor([1.0, 1.0, 1.0, -1.0], dtype=F64)
    for gate in ("response", "token"):
        pen = grpo.llds_penalty(at_one, old, adv, mask, gate=gate)
        (g,) = torch.autograd.grad(pen.sum(), at_one)
        assert pen.eq(0).all() and g.eq(0).all()
    with pytest.raises(ValueError, match="gate"):
        grpo.llds_penalty(logps, old, adv, mask, gate="chunk")


def test_high_entropy_mask_edges():
    entropy = torch.tensor([[1.0, 2.0, 2.0, 5.0], [0.5, 7.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    assert grpo.high_entropy_mask(entropy, mask, 1.0).equal(mask)  # ρ = 1 keeps every valid token
    # ρ = 0.5: the median of [0.5, 1, 2, 2, 5] is 2, kept with its tie; 7.0 is padding
    assert grpo.high_entropy_mask(entropy, mask, 0.5).nonzero().tolist() == [[0, 1], [0, 2], [0, 3]]
    assert not grpo.high_entropy_mask(entropy, torch.zeros_like(mask), 0.2).any()
    with pytest.raises(ValueError, match="top_quantile"):
        grpo.high_entropy_mask(entropy, mask, 1.5)


def test_entropies_come_from_the_same_pass_as_the_log_probs():
    """per_token_logps(return_entropy=True): the log-probs unchanged, the entropies those of the
    float64 distribution softmax(logits / T), within float32 rounding."""
    model = tiny_random_model(64, seed=2, hidden_size=32).eval().double()
    prompt = torch.tensor([[0, 5, 6, 7], [8, 9, 10, 11]])
    prompt_mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    completion = torch.tensor([[20, 21, 22], [23, 24, 0]])
    cmask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    ids, att = torch.cat([prompt, completion], 1), torch.cat([prompt_mask, cmask], 1)
    temperature = 0.7
    with torch.no_grad():
        plain = grpo.per_token_logps(model, ids, att, cmask, temperature=temperature)
        logps, entropy = grpo.per_token_logps(
            model, ids, att, cmask, temperature=temperature, return_entropy=True, chunk_size=2
        )
        logits = (
            model(
                input_ids=ids, attention_mask=att, position_ids=grpo.position_ids_from_mask(att)
            ).logits[:, 3:-1]
            / temperature
        )  # (N, T, V) float64
    q = torch.softmax(logits, -1)
    reference = -(q * torch.log_softmax(logits, -1)).sum(-1) * cmask
    assert torch.equal(logps, plain)
    # H = lse - Σ q z in float32: the log-sum-exp and the weighted sum each add V rounded terms
    # of size <= max|z|, on top of rounding the float64 logits to float32
    atol = EPS32 * (2 * logits.shape[-1] + 8) * float(logits.abs().max())
    torch.testing.assert_close(entropy.double(), reference, rtol=0.0, atol=atol)
    assert entropy[cmask == 0].eq(0).all() and entropy.dtype == torch.float32


def test_rule_settings_reach_trainer_runner_and_delta():
    cfg = trainer.TrainConfig(method="clip_higher")
    assert cfg.clip_eps_high is None and cfg.rule_settings()["clip_eps_high"] == 0.28
    assert (
        trainer.TrainConfig(method="clip_higher", clip_eps_high=0.28).rule_settings()
        == cfg.rule_settings()
    )
    with pytest.raises(
        ValueError, match=r"TrainConfig.clip_eps_high=0.3: update rule 'clip_higher'"
    ):
        trainer.TrainConfig(method="clip_higher", clip_eps_high=0.3)
    with pytest.raises(ValueError, match="TrainConfig.agg='seq_mean'"):
        trainer.TrainConfig(method="dr_grpo", agg="seq_mean")
    dr = trainer.TrainConfig(method="dr_grpo").rule_settings()
    assert (dr["agg"], dr["adv_std"]) == ("dr_grpo", "none")
    assert (
        trainer.make_advantage_fn(trainer.TrainConfig(method="nthr_all")).config.beta == -math.inf
    )
    with pytest.raises(ValueError, match="TrainConfig.nthr_beta=0.5"):
        trainer.TrainConfig(method="nthr_all", nthr_beta=0.5)
    assert experiments.method_overrides("dr_grpo") == {
        "method": "dr_grpo",
        "agg": "dr_grpo",
        "adv_std": "none",
    }
    assert experiments.method_overrides("nthr_all") == {
        "method": "nthr_all",
        "nthr_beta": -math.inf,
    }
    for name in rules.names(trainable=True):
        trainer.TrainConfig(**experiments.method_overrides(name))  # each makes a valid config
    with pytest.raises(ValueError, match="one_step_displacement: beta=0.5"):
        one_step_displacement(
            tiny_random_model(64, seed=1, hidden_size=32),
            _group(),
            update="nthr_all",
            lr=0.05,
            beta=0.5,
        )


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"entropy_quantile": 0.0}, "entropy_quantile"),
        ({"clip_eps_high": -0.1}, "clip_eps_high"),
        ({"agg": "sum"}, "agg"),
        ({"adv_std": "mad"}, "adv_std"),
        ({"nthr_beta": 1.0}, "nthr_beta"),  # β without a selection
        ({"from_rewards": grpo.negative_sample_advantages, "adv_std": "none"}, "adv_std"),
        ({"keeps_homogeneous": 1}, "keeps_homogeneous"),
    ],
)
def test_bad_rules_are_refused_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"Rule 'bad': {field}="):
        rules.Rule("bad", "Bad", **kwargs)


def test_every_builtin_rule_says_what_it_does_to_the_wrong_answers():
    # notebook 08's table reads this line for every registered rule
    for name in rules.names():
        why = rules.get(name).why
        assert why and len(why) <= 100, name
