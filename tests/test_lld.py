"""Tests for nthr_book.lld: Δ(x) against hand computations, exact weight restoration, the
experiment (arXiv 2505.18830)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.testing import assert_close

from nthr_book import lld, rules
from nthr_book.groups import Group
from nthr_book.lld import (
    QuestionDisplacement,
    lld_rate,
    one_step_displacement,
    sequence_logprobs,
)
from nthr_book.models import tiny_random_model

torch.set_num_threads(1)

VOCAB = 64
PROMPT = torch.tensor([5, 6, 7])


def _group(
    completions: list[list[int]],
    rewards: list[float],
    prompt: torch.Tensor = PROMPT,
    question_id: str = "q",
) -> Group:
    """A Group from token lists: right-padded with 0, mask True on the listed tokens."""
    return Group.from_token_lists(prompt, completions, rewards, question_id=question_id)


def _small_model(seed: int = 0):
    return tiny_random_model(VOCAB, seed=seed, hidden_size=32)


# ------------------------------------------------------------------ tolerances
# The library computes in float32, the references below in float64. A float32 result that went
# through n rounded operations on values of size <= scale is off by at most ~n·ε·scale (first
# order), and by about sqrt(n)·ε·scale when the rounding errors are independent (Higham, "Accuracy
# and Stability of Numerical Algorithms", ch. 2); the tolerances use the latter, n counted
# generously as below.
EPS32 = torch.finfo(torch.float32).eps
EPS64 = torch.finfo(torch.float64).eps


def _forward_terms(model, seq_len: int) -> int:
    """Rounded operations chained into one float32 log-prob of the tiny Llama.

    Per layer: two RMSNorms, the q/k/v and o projections and the MLP's gate/up (each a reduction
    over hidden), q·k (head_dim), softmax and the weighted sum (seq_len each), the MLP's down
    projection (intermediate); then the final norm, the LM head (hidden) and the log-softmax
    (vocabulary).
    """
    c = model.config
    head_dim = c.hidden_size // c.num_attention_heads
    per_layer = 5 * c.hidden_size + head_dim + 2 * seq_len + c.intermediate_size
    return c.num_hidden_layers * per_layer + 2 * c.hidden_size + c.vocab_size


def _f32_tol(n_terms: int, scale: float) -> float:
    """Expected rounding error of n_terms float32 operations on values of size <= scale."""
    return math.sqrt(n_terms) * EPS32 * scale


def _logprob_atol(model, completions: list[list[int]], scale: float, n_evals: int = 1) -> float:
    """Tolerance of a float32 ln π summed over the longest completion (or of n_evals of them)."""
    T = max(len(c) for c in completions)
    return _f32_tol(n_evals * T * _forward_terms(model, len(PROMPT) + T), scale)


def _delta_tol(
    model, completions: list[list[int]], scale: float, steps: int
) -> tuple[float, float]:
    """(rtol, atol) of a float32 Δ against a float64 one: atol for the two ln π it subtracts, rtol
    for the float32 gradient of the token sum (each step moves Δ by its relative error)."""
    n_tokens = sum(len(c) for c in completions)
    n_grad = n_tokens * _forward_terms(model, len(PROMPT) + max(len(c) for c in completions))
    return steps * _f32_tol(n_grad, 1.0), _logprob_atol(model, completions, scale, n_evals=2)


# ---------------------------------------------------------------- the smallest demonstration of LLD

REPEAT_CORRECT = [10, 11, 12, 13]
REPEAT_GROUP = dict(completions=[REPEAT_CORRECT, REPEAT_CORRECT * 2], rewards=[1.0, 0.0])


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("optimizer,lr", [("sgd", 1e-2), ("adam", 1e-3)])
def test_grpo_lowers_correct_response_while_pos_only_raises_it(seed, optimizer, lr):
    """G = 2: y+ = [a b c d] (correct) and y- = [a b c d a b c d] (wrong: it repeats itself, never
    stops).

    p = 1/2 so A+ = +1, A- = -1. With token-level aggregation the gradients of the four shared
    prefix tokens (same tokens, same contexts) cancel exactly, so GRPO's step is only the negative
    gradient on y-'s tail "a b c d": the same tokens as y+ in nearly the same hidden states. Pushing
    them down pushes y+ down too: ln π(y+) falls (LLD), while Pos Only (only +∇ ln π(y+)) raises
    it. NTHR (η = 0) spares the tail tokens most aligned with y+ and lands in between.
    """
    model = _small_model(seed)
    group = _group(**REPEAT_GROUP)
    delta = {
        m: one_step_displacement(model, group, update=m, lr=lr, optimizer=optimizer).delta
        for m in ("grpo", "pos_only", "nthr")
    }
    assert delta["grpo"] < -0.05
    assert delta["pos_only"] > 0.05
    assert delta["grpo"] < delta["nthr"]


def test_grpo_moves_only_the_differing_tokens_when_prefixes_are_shared():
    """With identical prompts and shared prefixes, GRPO's gradient equals that of the tail alone
    (A+ = -A-)."""
    model = _small_model(0)
    group = _group(**REPEAT_GROUP)
    res = one_step_displacement(model, group, update="grpo", lr=1e-2)
    # Equivalent update, in float64: the wrong response's tail alone, as a "response" with A = -1.
    m0 = copy.deepcopy(model).double()
    m2 = copy.deepcopy(m0)
    ids = torch.cat([PROMPT, torch.tensor(REPEAT_CORRECT * 2)])[None]
    logits = m2(input_ids=ids).logits[0, len(PROMPT) + 3 : -1]  # predicts tail tokens 4..7
    tail_lp = torch.log_softmax(logits, -1).gather(-1, ids[0, len(PROMPT) + 4 :, None]).sum()
    (tail_lp / 12).backward()  # loss = -(1/12) Σ_tail A- logp = +(1/12) Σ_tail logp
    with torch.no_grad():
        for p in m2.parameters():
            p -= 1e-2 * p.grad
    before = _hand_logprob(m0, PROMPT, REPEAT_CORRECT)
    after = _hand_logprob(m2, PROMPT, REPEAT_CORRECT)
    completions = REPEAT_GROUP["completions"]
    rtol, atol = _delta_tol(model, completions, scale=float(before.abs()), steps=1)
    assert_close(res.delta, float(after - before), rtol=rtol, atol=atol)


# ---------------------------------------------------------- restoration: weights, grads, modes, RNG


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("update", ["grpo", "pos_only", "nthr", "random"])
def test_weights_grads_modes_and_rng_restored_exactly(update, optimizer):
    model = _small_model(3)
    model.train()
    model.model.layers[0].eval()  # a mixed-mode model: each module's flag must come back
    modes = [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    buffers = {
        k: v.clone() for k, v in model.named_buffers()
    }  # includes non-persistent ones (rotary)
    assert buffers
    stale_grad = torch.randn_like(model.lm_head.weight)
    model.lm_head.weight.grad = stale_grad  # e.g. a trainer mid gradient accumulation
    rng = torch.get_rng_state()
    group = _group(
        [[10, 11, 12], [10, 11, 14, 15, 16], [10, 20], [11, 12, 13, 14]], [1.0, 0.0, 0.0, 1.0]
    )

    res = one_step_displacement(model, group, update=update, lr=0.5, optimizer=optimizer, steps=2)

    assert abs(res.delta) > 1e-3  # the update really moved the weights before they were restored
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name]), name
    for name, buf in model.named_buffers():
        assert torch.equal(buf, buffers[name]), name
    assert model.lm_head.weight.grad is stale_grad  # tied to the input embedding
    assert all(p.grad is None for p in model.parameters() if p is not model.lm_head.weight)
    assert [m.training for m in model.modules()] == modes
    assert torch.equal(torch.get_rng_state(), rng)


def test_snapshot_is_allocated_once_per_model_and_releasable():
    model = _small_model(0)
    group = _group(**REPEAT_GROUP)
    one_step_displacement(model, group, lr=1e-2)
    ptrs = [buf.data_ptr() for _, buf in lld._SNAPSHOTS[model]]
    for update in ("pos_only", "nthr", "random"):
        one_step_displacement(model, group, update=update, lr=1e-2)
    assert [buf.data_ptr() for _, buf in lld._SNAPSHOTS[model]] == ptrs  # reused, not reallocated
    assert lld.release_snapshot(model) is True
    assert model not in lld._SNAPSHOTS
    assert lld.release_snapshot(model) is False


# -------------------------------------------------------- Δ(x) against an independent recomputation


def _hand_logprob(
    model, prompt: torch.Tensor, completion: list[int], temperature: float = 1.0
) -> torch.Tensor:
    """ln π(y|x) by a plain full-vocabulary forward of one unpadded sequence."""
    ids = torch.cat([prompt, torch.tensor(completion)])[None]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1] / temperature  # (T, V)
    return torch.log_softmax(logits.double(), -1).gather(-1, ids[0, len(prompt) :, None]).sum()


def _hand_token_logps(
    model, prompt: torch.Tensor, completions: list[list[int]], temperature: float
):
    """List of (T_i,) per-token log-probs with gradient, one unpadded forward per response."""
    out = []
    for c in completions:
        ids = torch.cat([prompt, torch.tensor(c)])[None]
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1] / temperature
        out.append(
            torch.log_softmax(logits, -1).gather(-1, ids[0, len(prompt) :, None]).squeeze(-1)
        )
    return out


def _hand_update(model, completions, advantages, temperature, lr, optimizer, steps):
    """Apply ``steps`` updates of the clipped token-mean loss written out by hand, in float64;
    returns the updated float64 copy."""
    m = copy.deepcopy(model).double()
    advantages = [adv.double() for adv in advantages]
    old = [lp.detach() for lp in _hand_token_logps(m, PROMPT, completions, temperature)]
    n_tokens = sum(len(c) for c in completions)
    adam_m = {p: torch.zeros_like(p) for p in m.parameters()}
    adam_v = {p: torch.zeros_like(p) for p in m.parameters()}
    for step in range(1, steps + 1):
        for p in m.parameters():
            p.grad = None
        objective = 0.0
        for lp, lp_old, adv in zip(
            _hand_token_logps(m, PROMPT, completions, temperature), old, advantages
        ):
            ratio = torch.exp(lp - lp_old)
            objective = objective + torch.minimum(ratio * adv, ratio.clamp(0.8, 1.2) * adv).sum()
        (-objective / n_tokens).backward()
        with torch.no_grad():
            for p in m.parameters():
                g = p.grad
                if optimizer == "sgd":
                    p -= lr * g
                else:  # Adam, betas (0.9, 0.999), eps 1e-8, bias-corrected, no weight decay
                    adam_m[p] = 0.9 * adam_m[p] + 0.1 * g
                    adam_v[p] = 0.999 * adam_v[p] + 0.001 * g * g
                    m_hat = adam_m[p] / (1 - 0.9**step)
                    v_hat = adam_v[p] / (1 - 0.999**step)
                    p -= lr * m_hat / (v_hat.sqrt() + 1e-8)
    return m


def _reference_selection(model, completions, rewards, temperature, beta):
    """(G, T) NTHR selection by naive_scores.naive_nthr (anchor "all", generated vocabulary) on the
    last hidden states of a float64 copy of the model, one unpadded forward per response.

    The library selects from float32 states of a padded forward; the test asserts that no score
    lies within their difference of tau (``_score_gap_tol``), so both select the same tokens.
    """
    from naive_scores import naive_nthr

    model64 = copy.deepcopy(model).double().eval()
    G, T = len(completions), max(len(c) for c in completions)
    d = model.config.hidden_size
    hidden = torch.zeros(G, T, d, dtype=torch.float64)
    tokens = torch.zeros(G, T, dtype=torch.long)
    mask = torch.zeros(G, T, dtype=torch.bool)
    with torch.no_grad():
        for i, c in enumerate(completions):
            ids = torch.cat([PROMPT, torch.tensor(c)])[None]
            states = model64(input_ids=ids, output_hidden_states=True).hidden_states[-1]
            hidden[i, : len(c)] = states[0, len(PROMPT) - 1 : -1]  # the states predicting y_t
            tokens[i, : len(c)], mask[i, : len(c)] = torch.tensor(c), True
        weight = model64.get_output_embeddings().weight.detach()  # (V, d)
    logits = hidden @ weight.T / temperature  # (G, T, V)
    correct = torch.tensor(rewards) > 0.5
    signs = torch.where(correct, 1.0, -1.0).double()  # binary rewards: every wrong row has A < 0
    ref = naive_nthr(
        hidden, logits, tokens, mask, correct, signs, beta=beta, eta=1.0, anchor="all",
        vocab="generated",
    )  # fmt: skip
    candidates = (~correct)[:, None] & mask
    gaps = (ref["scores"] - ref["tau"])[candidates].abs()
    tol = _score_gap_tol(model, hidden, weight, logits, tokens, mask, correct, temperature, beta)
    assert bool((gaps > tol).all()), f"a score within {tol:.1e} of tau: choose another group"
    return ref["selected"]


def _score_gap_tol(model, hidden, weight, logits, tokens, mask, correct, temperature, beta):
    """How far the library's float32 scores (and tau) may be from the float64 reference's.

    Hidden states: a float32 forward is within e_h = _f32_tol(forward terms, max|h|) of exact per
    coordinate, which moves each logit by d·e_h·max|W|/T and each <h_t, h_k> by
    e_h·(|h_t|₁ + |h_k|₁ + d·e_h). Scoring: naive_scores.score_atol in float32 with those logits.
    tau = beta·min s̄+ moves by |beta| times a mean of scores: |beta|·(the same bound).
    """
    from naive_scores import F32, generated_ids, logit_err, score_atol

    d = hidden.shape[-1]
    e_h = _f32_tol(_forward_terms(model, len(PROMPT) + mask.shape[1]), hidden.abs().max().item())
    e_z = logit_err(hidden, weight, None, temperature, F32) + d * e_h * weight.abs().max().item()
    ids = generated_ids(tokens, mask)
    scoring = score_atol(hidden, logits, tokens, mask, correct, F32, vocab_ids=ids, logit_err=e_z)
    q = torch.softmax(logits, -1)
    g = torch.nn.functional.one_hot(tokens, logits.shape[-1]).double() - q
    g = g[..., ids].abs()  # (G, T, |V*|)
    gg = torch.einsum("itv,jkv->itjk", g, g)  # <|g_t|, |g_k|>
    h1 = hidden.abs().sum(-1)  # (G, T) |h_t|₁
    dhh = e_h * (h1[:, :, None, None] + h1[None, None] + d * e_h)  # bound of Δ<h_t, h_k>
    k = (mask & correct[:, None]).double()
    from_hidden = float(((gg * dhh * k).sum((-2, -1)) * mask).max())
    return (1 + abs(beta)) * (scoring + from_hidden)


@pytest.mark.parametrize(
    "update,optimizer,lr,steps",
    [
        ("grpo", "sgd", 0.05, 1),
        ("pos_only", "sgd", 0.05, 1),
        ("nthr", "sgd", 0.05, 1),
        (
            "grpo",
            "sgd",
            0.5,
            2,
        ),  # the second step's ratios leave [0.8, 1.2] (and some stay in [0.7, 1.3]): clipping acts
        ("grpo", "adam", 1e-3, 1),
        ("nthr", "adam", 1e-3, 2),
    ],
)
def test_delta_equals_independent_recomputation(update, optimizer, lr, steps):
    temperature, eta = 0.7, 0.5
    completions = [[10, 11, 12], [10, 11, 14, 15, 16], [10, 20], [11, 12, 13, 14]]
    rewards = [1.0, 0.0, 0.0, 1.0]
    model = _small_model(1)
    group = _group(completions, rewards)
    res = one_step_displacement(
        model,
        group,
        update=update,
        lr=lr,
        optimizer=optimizer,
        steps=steps,
        temperature=temperature,
        eta=eta,
        beta=0.0,
    )
    # advantages by hand: p = 1/2, population std 1/2 -> A = ±1 (eps 1e-6 in the denominator)
    a = [(r - 0.5) / (0.5 + 1e-6) for r in rewards]
    advantages = [torch.full((len(c),), ai) for c, ai in zip(completions, a)]
    if update == "pos_only":
        advantages = [adv.clamp(min=0) for adv in advantages]
    if update == "nthr":
        # NTHR's selection by its definition, on the hidden states of a float64 copy: the one
        # one_step_displacement made (res.extras["selected"]) must equal it
        selected = _reference_selection(model, completions, rewards, temperature, beta=0.0)
        assert torch.equal(res.extras["selected"], selected)
        assert 0 < int(selected.sum()) < 5 + 2  # a real partial selection at beta = 0
        advantages = [
            torch.where(selected[i, : len(c)], eta * adv, adv)
            for i, (c, adv) in enumerate(zip(completions, advantages))
        ]
    # float64 reference
    new_model = _hand_update(model, completions, advantages, temperature, lr, optimizer, steps)
    model64 = copy.deepcopy(model).double()
    correct = [i for i, r in enumerate(rewards) if r > 0.5]
    init = [float(_hand_logprob(model64, PROMPT, completions[i], temperature)) for i in correct]
    per = [
        float(_hand_logprob(new_model, PROMPT, completions[i], temperature)) - init[k]
        for k, i in enumerate(correct)
    ]
    assert res.n_incorrect_tokens == 5 + 2
    assert res.n_correct == 2 and res.group_size == 4 and res.p == 0.5
    scale = max(abs(v) for v in init)  # |ln π| bounds the size of the summed log-probs
    rtol, atol = _delta_tol(model, completions, scale, steps)
    assert_close(res.per_response_delta, per, rtol=rtol, atol=atol)
    assert_close(res.delta, sum(per) / len(per), rtol=rtol, atol=atol)
    assert_close(res.logp_init, init, rtol=0.0, atol=_logprob_atol(model, completions, scale))
    if steps == 2 and optimizer == "sgd":
        assert res.extras["clip_frac"][1] > 0  # the clipped branch was exercised


@pytest.mark.parametrize("batch_size", [1, 3])
def test_micro_batches_give_the_same_delta(batch_size):
    """The token-mean loss is exact over micro-batches (each weighted by its share of tokens)."""
    model = _small_model(1)
    group = _group(
        [[10, 11, 12], [10, 11, 14, 15, 16], [10, 20], [11, 12, 13, 14]], [1.0, 0.0, 0.0, 1.0]
    )
    full = one_step_displacement(model, group, update="grpo", lr=0.05, steps=2)
    micro = one_step_displacement(
        model, group, update="grpo", lr=0.05, steps=2, batch_size=batch_size
    )
    # Two float32 computations that differ in padding and summation order: each is within the
    # float32 tolerance of the exact value, so they are within twice that of each other.
    completions = [[10, 11, 12], [10, 11, 14, 15, 16], [10, 20], [11, 12, 13, 14]]
    scale = max(abs(v) for v in full.logp_init)
    rtol, atol = _delta_tol(model, completions, scale, steps=2)
    assert_close(micro.per_response_delta, full.per_response_delta, rtol=2 * rtol, atol=2 * atol)
    # the loss: a mean over the 14 tokens of ratio·A, |A| = 1 and ratio ≈ 1, each from one forward
    n_loss = 14 * _forward_terms(model, len(PROMPT) + 5)
    loss_atol = 2 * _f32_tol(n_loss, 1.0)
    assert_close(micro.extras["loss"], full.extras["loss"], rtol=0.0, atol=loss_atol)


def test_eta_one_makes_nthr_and_random_equal_to_grpo():
    """η = 1 leaves every advantage unchanged, whatever is selected."""
    model = _small_model(2)
    group = _group([[10, 11, 12], [10, 11, 14, 15, 16], [10, 20]], [1.0, 0.0, 0.0])
    base = one_step_displacement(model, group, update="grpo", lr=0.05).per_response_delta
    for update in ("nthr", "random"):
        res = one_step_displacement(model, group, update=update, lr=0.05, eta=1.0, beta=-math.inf)
        assert (
            res.n_selected_tokens == res.n_incorrect_tokens == 7
        )  # beta = -inf selects every wrong token
        # 1.0 · A is A exactly, so the update runs the same float32 operations: equal bit for bit
        assert res.per_response_delta == base


def test_random_selection_matches_nthr_counts_per_response():
    model = _small_model(4)
    group = _group(
        [[10, 11, 12, 13], [10, 11, 14, 15, 16, 17, 18], [10, 20, 21, 22, 23], [11, 12, 13]],
        [1.0, 0.0, 0.0, 1.0],
    )
    nthr_res = one_step_displacement(model, group, update="nthr", lr=0.05, beta=0.0)
    sel = nthr_res.extras["selected"]
    assert 0 < int(sel.sum()) < nthr_res.n_incorrect_tokens
    incorrect_tokens = (~group.correct)[:, None] & group.rollouts.completion_mask
    for given in (None, sel):
        rand = one_step_displacement(
            model, group, update="random", lr=0.05, beta=0.0, seed=7, selected=given
        )
        rsel = rand.extras["selected"]
        assert torch.equal(rsel.sum(1), sel.sum(1))
        assert not bool((rsel & ~incorrect_tokens).any())
        assert torch.equal(rand.extras["nthr_selected"], sel)
        assert rand.n_selected_tokens == nthr_res.n_selected_tokens


def test_random_control_draws_per_question_and_repeats_on_rerun():
    """Questions of the same shape get different random positions; a rerun gets the same ones."""
    model = _small_model(4)
    completions = [[10, 11, 12], list(range(20, 40)), list(range(40, 60)), [11, 12, 13]]
    selected = torch.zeros(4, 20, dtype=torch.bool)
    selected[1, :5] = selected[2, :5] = True  # 5 of 20 tokens per wrong response: C(20, 5) draws

    def draw(question_id: str, seed: int = 7):
        group = _group(completions, [1.0, 0.0, 0.0, 1.0], question_id=question_id)
        res = one_step_displacement(
            model, group, update="random", lr=0.05, seed=seed, selected=selected
        )
        # NTHR's count per response
        assert torch.equal(res.extras["selected"].sum(1), selected.sum(1))
        assert res.extras["random_seed"] == lld.question_seed(seed, question_id)
        return res.extras["selected"]

    first = draw("q1")
    assert torch.equal(draw("q1"), first)  # a rerun of the same question
    assert not torch.equal(draw("q2"), first)  # another question of the same shape
    assert not torch.equal(draw("q1", seed=8), first)  # another experiment seed


def test_question_seed_is_stable_across_processes():
    """Not Python's salted ``hash``: another interpreter with another hash seed gives the same."""
    import os
    import subprocess
    import sys

    here = lld.question_seed(3, "algebra/17")
    code = "from nthr_book.lld import question_seed; print(question_seed(3, 'algebra/17'))"
    env = os.environ | {"PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert int(out.stdout) == here
    assert 0 <= here < 2**63  # a valid torch.Generator seed
    assert lld.question_seed(3, "algebra/18") != here and lld.question_seed(4, "algebra/17") != here
    with pytest.raises(TypeError, match="seed"):
        lld.question_seed("3", "algebra/17")


# ------------------------------------------------------------------ sequence_logprobs


def test_sequence_logprobs_matches_per_row_forward_with_left_padding_and_micro_batches():
    model = _small_model(5)
    model.train()
    prompts = [[5, 6, 7], [8, 9], [5], [6, 7]]
    completions = [[10, 11], [12, 13, 14, 15], [16], [17, 18, 19]]
    P, T = 3, 4
    prompt_ids = torch.zeros(4, P, dtype=torch.long)
    prompt_mask = torch.zeros(4, P, dtype=torch.long)
    ids = torch.zeros(4, T, dtype=torch.long)
    mask = torch.zeros(4, T, dtype=torch.bool)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        prompt_ids[i, P - len(p) :] = torch.tensor(p)  # left padding
        prompt_mask[i, P - len(p) :] = 1
        ids[i, : len(c)] = torch.tensor(c)
        mask[i, : len(c)] = True
    model64 = copy.deepcopy(model).double().eval()
    expected = torch.stack(
        [_hand_logprob(model64, torch.tensor(p), c, 0.8) for p, c in zip(prompts, completions)]
    )
    # float32 forward against the float64 reference: sqrt(T · forward terms) · ε32 · |ln π|
    atol = _f32_tol(T * _forward_terms(model, P + T), float(expected.abs().max()))
    for bs in (None, 1, 3):
        got = sequence_logprobs(
            model, prompt_ids, ids, mask, prompt_mask=prompt_mask, temperature=0.8, batch_size=bs
        )
        assert got.dtype == torch.float64 and not got.requires_grad
        assert_close(got, expected, rtol=0.0, atol=atol)
    assert model.training  # mode restored


def test_sequence_logprobs_rejects_mismatched_shapes():
    model = _small_model(0)
    with pytest.raises(ValueError, match="completion_mask"):
        sequence_logprobs(
            model,
            torch.zeros(2, 3, dtype=torch.long),
            torch.zeros(2, 4, dtype=torch.long),
            torch.ones(2, 5, dtype=torch.bool),
        )


# ------------------------------------------------------------------ input errors


def test_one_step_displacement_errors_name_the_problem():
    model = _small_model(0)
    with pytest.raises(ValueError, match="question 'q7'.*all correct"):
        one_step_displacement(model, _group([[10], [11]], [1.0, 1.0], question_id="q7"), lr=0.1)
    with pytest.raises(ValueError, match="all wrong"):
        one_step_displacement(model, _group([[10], [11]], [0.0, 0.0]), lr=0.1)
    group = _group(**REPEAT_GROUP)
    with pytest.raises(ValueError, match="update="):
        one_step_displacement(model, group, update="ppo", lr=0.1)
    with pytest.raises(ValueError, match="optimizer="):
        one_step_displacement(model, group, optimizer="rmsprop", lr=0.1)
    with pytest.raises(ValueError, match="selected"):
        one_step_displacement(
            model, group, update="grpo", lr=0.1, selected=torch.zeros(2, 8, dtype=torch.bool)
        )
    bad = torch.zeros(2, 8, dtype=torch.bool)
    bad[0, 0] = True  # a token of the correct response
    with pytest.raises(ValueError, match="outside"):
        one_step_displacement(model, group, update="random", lr=0.1, selected=bad)
    with pytest.raises(ValueError, match="lr"):
        one_step_displacement(model, group, lr=0.0)
    with pytest.raises(ValueError, match="steps"):
        one_step_displacement(model, group, lr=0.1, steps=0)
    with pytest.raises(ValueError, match="old_logps"):
        one_step_displacement(model, group, lr=0.1, old_logps=torch.zeros(2, 7))


def test_precomputed_initial_pass_and_selection_give_identical_results():
    model = _small_model(4)
    group = _group(
        [[10, 11, 12, 13], [10, 11, 14, 15, 16, 17, 18], [10, 20, 21, 22, 23], [11, 12, 13]],
        [1.0, 0.0, 0.0, 1.0],
    )
    old_logps, hidden = lld.initial_token_logps(model, group, return_hidden=True)
    selected, tau = lld.nthr_selection(model, group, beta=0.0, hidden=hidden)
    assert torch.equal(
        selected, lld.nthr_selection(model, group, beta=0.0)[0]
    )  # hidden recomputed inside
    for update in ("grpo", "nthr"):
        alone = one_step_displacement(model, group, update=update, lr=0.05, beta=0.0)
        shared = one_step_displacement(
            model,
            group,
            update=update,
            lr=0.05,
            beta=0.0,
            old_logps=old_logps,
            selected=selected if update == "nthr" else None,
        )
        assert shared.per_response_delta == alone.per_response_delta
        assert shared.logp_init == alone.logp_init
        if update == "nthr":
            assert torch.equal(alone.extras["selected"], selected) and alone.extras["tau"] == tau


# ------------------------------------------------------------------ summaries


def test_lld_rate_hand_values():
    assert lld_rate([0.5, -0.1, 0.0, 0.02]) == 0.5  # -0.1 and 0.0 did not rise
    assert lld_rate([0.5, -0.1, 0.0, 0.02], eps=0.05) == 0.75  # 0.02 rose by less than eps
    assert lld_rate([[0.5, -0.1], [0.0], [0.02]]) == 0.5  # a column of per-question lists
    assert lld_rate(torch.tensor([1.0, 2.0])) == 0.0
    assert math.isnan(lld_rate([]))
    with pytest.raises(ValueError, match="NaN"):
        lld_rate([0.1, float("nan")])


def test_question_displacement_row():
    q = QuestionDisplacement("q", "nthr", 1, 2, 0.5, 0.25, [0.25], 3, 4, [-5.0])
    assert q.to_row() == {
        "id": "q",
        "method": "nthr",
        "n_correct": 1,
        "group_size": 2,
        "p": 0.5,
        "delta": 0.25,
        "per_response_delta": [0.25],
        "n_selected": 3,
        "n_incorrect_tokens": 4,
        "grad_norm": q.to_row()["grad_norm"],
    }
    assert math.isnan(q.to_row()["grad_norm"])  # no update recorded: no step length
    q.extras["grad_norm"] = [1.5, 0.5]  # per step: the row reports the first step's
    assert q.to_row()["grad_norm"] == 1.5


# ------------------------------------------------------- the family of rules (nthr_book.rules)

FOUR = dict(
    completions=[[10, 11, 12], [10, 11, 14, 15, 16], [10, 20], [11, 12, 13, 14]],
    rewards=[1.0, 0.0, 0.0, 1.0],
)
# y+ and its near copies: GRPO's step lowers ln π(y+) here (LLD), so LLDS's gate opens
REPEAT4 = dict(
    completions=[
        [10, 11, 12, 13],
        [10, 11, 12, 13, 10, 11, 12, 13],
        [10, 11, 12, 13, 14],
        [10, 11, 12, 20],
    ],
    rewards=[1.0, 0.0, 1.0, 0.0],
)
RATIO_ONE_RULES = ("clip_higher", "llds", "llds_token")  # exactly GRPO when every ratio is 1


@pytest.mark.parametrize("update", rules.names())
def test_every_rule_runs_in_one_step_displacement(update):
    """Each registered rule measures Δ(x); at steps=1 (ratio 1) Clip-Higher and LLDS are GRPO."""
    model, group = _small_model(1), _group(**FOUR)
    res = one_step_displacement(model, group, update=update, lr=0.1, eta=0.5, temperature=0.7)
    assert res.method == update and all(math.isfinite(d) for d in res.per_response_delta)
    assert res.extras["settings"] == (
        {"clip_eps_high": None, "agg": "token", "adv_std": "population", "nthr_beta": 1.0}
        | rules.get(update).settings()
    )
    grpo_res = one_step_displacement(model, group, update="grpo", lr=0.1, temperature=0.7)
    same = res.per_response_delta == grpo_res.per_response_delta
    assert same == (update in ("grpo", "nthr", "random") + RATIO_ONE_RULES), update
    if update == "nthr_all":  # β = -inf: every wrong token selected
        assert res.n_selected_tokens == res.n_incorrect_tokens == 7
        assert res.extras["tau"] == -math.inf
    if rules.get(update).penalty is not None:
        assert res.extras["penalty"] == [0.0]  # 0 at ratio 1, with zero gradient
    # the (G, T) advantages the update used: Pos Only's are GRPO's with the negative ones at 0
    if update == "pos_only":
        grpo_adv = grpo_res.extras["advantages"]
        assert torch.equal(res.extras["advantages"], grpo_adv.clamp(min=0))
        wrong_tokens = (~group.correct)[:, None] & group.rollouts.completion_mask.bool()
        assert (grpo_adv[wrong_tokens] < 0).all() and (
            res.extras["advantages"][wrong_tokens] == 0
        ).all()


def _hand_token_entropies(model64, completions, temperature):
    """List of (T_i,) float64 entropies of softmax(logits / T), one unpadded forward each."""
    out = []
    for c in completions:
        ids = torch.cat([PROMPT, torch.tensor(c)])[None]
        with torch.no_grad():
            logits = model64(input_ids=ids).logits[0, len(PROMPT) - 1 : -1] / temperature
        out.append(-(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1))
    return out


def _hand_rule_update(
    model, completions, advantages, temperature, lr, steps, *, eps_high, weight, llds
):
    """``steps`` SGD steps of the clipped loss written out per response in float64, with an upper
    clip ``eps_high``, the normaliser ``weight`` and LLDS's term (λ = 0.2, gate ``llds``/None)."""
    m = copy.deepcopy(model).double()
    old = [lp.detach() for lp in _hand_token_logps(m, PROMPT, completions, temperature)]
    for _ in range(steps):
        for p in m.parameters():
            p.grad = None
        objective = 0.0
        for lp, lp_old, adv in zip(
            _hand_token_logps(m, PROMPT, completions, temperature), old, advantages
        ):
            adv = adv.double()
            ratio = torch.exp(lp - lp_old)
            objective = (
                objective + torch.minimum(ratio * adv, ratio.clamp(0.8, 1 + eps_high) * adv).sum()
            )
            if llds is not None and bool((adv >= 0).all()):  # the preserving set: A >= 0
                drop = lp_old - lp  # ln π_old - ln π_θ per token
                fell = drop.detach() > 0
                if llds == "response":
                    fell = fell & (drop.detach().sum() > 0)
                objective = objective - (0.2 * drop * fell).sum()
        (-objective * weight).backward()
        with torch.no_grad():
            for p in m.parameters():
                p -= lr * p.grad
    return m


@pytest.mark.parametrize(
    "update,case,lr",
    [
        ("neg_only", "four", 0.1),
        ("nsr", "four", 0.1),
        ("w_reinforce", "four", 0.1),
        ("high_entropy", "four", 0.1),
        ("dr_grpo", "four", 0.1),
        ("nthr_all", "four", 0.1),
        ("llds_token", "four", 0.1),  # the token gate fires where the response gate does not
        ("clip_higher", "repeat4", 0.2),  # some A > 0 ratios land in (1.2, 1.28] at step 2
        ("llds", "repeat4", 0.2),  # step 1 lowers ln π(y+): the response gate opens at step 2
    ],
)
def test_family_delta_equals_independent_recomputation(update, case, lr):
    """Two SGD steps of each rule against the papers' formulas written out by hand in float64."""
    temperature, eta, steps = 0.7, 0.5, 2
    spec = FOUR if case == "four" else REPEAT4
    completions, rewards = spec["completions"], spec["rewards"]
    model, group = _small_model(1), _group(completions, rewards)
    res = one_step_displacement(
        model, group, update=update, lr=lr, steps=steps, temperature=temperature, eta=eta
    )
    # advantages by hand (p = 1/2 in both groups)
    correct = [r > 0.5 for r in rewards]
    grpo_a = [(r - 0.5) / (0.5 + 1e-6) for r in rewards]  # population std 1/2, eps 1e-6
    seq = {
        "neg_only": [min(a, 0.0) for a in grpo_a],
        "nsr": [0.0 if c else -1.0 for c in correct],
        "w_reinforce": [0.1 if c else -1.0 for c in correct],
        "dr_grpo": [r - 0.5 for r in rewards],
        "nthr_all": [a if c else eta * a for a, c in zip(grpo_a, correct)],
    }.get(update, grpo_a)
    advantages = [torch.full((len(c),), a, dtype=torch.float64) for c, a in zip(completions, seq)]
    if update == "high_entropy":  # the top 20% tokens by the initial policy's entropy keep A
        ents = _hand_token_entropies(copy.deepcopy(model).double(), completions, temperature)
        flat = torch.cat(ents)
        s, pos = flat.sort().values.tolist(), 0.8 * (len(flat) - 1)
        lo = math.floor(pos)
        threshold = s[lo] + (pos - lo) * (s[lo + 1] - s[lo])  # linear interpolation
        # float32 entropies cannot flip a token across it: every token is either tied with it
        # (the first tokens: one shared prompt state, the same numbers in both computations) or
        # further from it than the float32 entropy error, EPS32·(2V + 8)·max|z| < 2e-5 here
        gap = (flat - threshold).abs()
        assert bool(((gap == 0) | (gap > 1e-4)).all())
        advantages = [torch.where(e >= threshold, a, 0.0) for e, a in zip(ents, advantages)]
        assert 0 < sum(int((a != 0).sum()) for a in advantages) < len(flat)
    n_tokens, width = sum(map(len, completions)), max(map(len, completions))
    new_model = _hand_rule_update(
        model,
        completions,
        advantages,
        temperature,
        lr,
        steps,
        eps_high=0.28 if update == "clip_higher" else 0.2,
        weight=1 / (len(completions) * width) if update == "dr_grpo" else 1 / n_tokens,
        llds={"llds": "response", "llds_token": "token"}.get(update),
    )
    model64 = copy.deepcopy(model).double()
    on = [i for i, c in enumerate(correct) if c]
    init = [float(_hand_logprob(model64, PROMPT, completions[i], temperature)) for i in on]
    per = [
        float(_hand_logprob(new_model, PROMPT, completions[i], temperature)) - init[k]
        for k, i in enumerate(on)
    ]
    scale = max(abs(v) for v in init)
    rtol, atol = _delta_tol(model, completions, scale, steps)
    assert_close(res.per_response_delta, per, rtol=rtol, atol=atol)
    # each case exercises what makes the rule differ from GRPO
    if update in ("clip_higher", "llds", "llds_token"):
        grpo_res = one_step_displacement(
            model, group, update="grpo", lr=lr, steps=steps, temperature=temperature
        )
        differs = [abs(a - b) for a, b in zip(res.per_response_delta, grpo_res.per_response_delta)]
        assert max(differs) > 100 * atol
    if update in ("llds", "llds_token"):
        assert res.extras["penalty"][0] == 0.0 and res.extras["penalty"][1] > 0
    if update == "llds_token":  # the response gate stays closed on this group
        llds = one_step_displacement(
            model, group, update="llds", lr=lr, steps=steps, temperature=temperature
        )
        assert llds.extras["penalty"] == [0.0, 0.0]


def test_given_entropies_and_old_logps_give_identical_results():
    model, group = _small_model(4), _group(**FOUR)
    old_logps, entropy = lld.initial_token_logps(model, group, return_entropy=True)
    alone = one_step_displacement(model, group, update="high_entropy", lr=0.1)
    shared = one_step_displacement(
        model, group, update="high_entropy", lr=0.1, old_logps=old_logps, entropy=entropy
    )
    assert shared.per_response_delta == alone.per_response_delta
    assert torch.equal(shared.extras["entropy_kept"], alone.extras["entropy_kept"])
    with pytest.raises(ValueError, match="entropy"):
        one_step_displacement(model, group, update="high_entropy", lr=0.1, entropy=entropy[:, :2])


# ------------------------------------------------------------------ Δ(x) to first order

FIRST_ORDER_GROUP = dict(
    completions=[[10, 11, 12, 13], [10, 11, 12, 13, 10, 11], [20, 21, 22], [10, 11, 30]],
    rewards=[1.0, 0.0, 1.0, 0.0],
)


def test_first_order_displacement_against_per_answer_gradients_in_float64():
    """The prediction against a brute force that shares no code with it: each answer's ∇ ln π(y_j)
    from its own float64 forward pass (log-softmax by hand), then Δ_i = (lr / Σ|y|) Σ_j A_j
    ⟨∇ ln π(y+_i), ∇ ln π(y_j)⟩ with A = ±1 (p = 1/2, population std) and Σ|y| = 16 tokens."""
    model = _small_model()
    g = _group(**FIRST_ORDER_GROUP)
    lr = 1e-2
    got = lld.first_order_displacement(model, g, update="grpo", lr=lr)

    ref = copy.deepcopy(model).double()
    params = [p for p in ref.parameters() if p.requires_grad]
    grads = []
    for completion in FIRST_ORDER_GROUP["completions"]:
        ids = torch.cat([PROMPT, torch.tensor(completion)])[None]  # (1, P + T)
        logits = ref(input_ids=ids).logits[0, len(PROMPT) - 1 : -1]  # (T, V) predicting y_t
        logp = logits.log_softmax(-1).gather(1, torch.tensor(completion)[:, None]).sum()
        grads.append(torch.cat([d.reshape(-1) for d in torch.autograd.grad(logp, params)]))
    A = [1.0, -1.0, 1.0, -1.0]
    n_tokens = sum(len(c) for c in FIRST_ORDER_GROUP["completions"])  # 16
    for k, i in enumerate((0, 2)):  # the correct answers, in row order
        terms = [lr / n_tokens * A[j] * float(grads[i] @ grads[j]) for j in range(4)]
        right, wrong = terms[0] + terms[2], terms[1] + terms[3]
        scale = sum(abs(t) for t in terms)
        rtol, _ = _delta_tol(model, FIRST_ORDER_GROUP["completions"], 1.0, steps=2)
        assert abs(got.per_response_right[k] - right) <= rtol * scale
        assert abs(got.per_response_wrong[k] - wrong) <= rtol * scale
    assert got.predicted == pytest.approx(got.right + got.wrong, abs=4 * EPS64 * scale)


def test_first_order_displacement_is_the_measured_delta_to_first_order():
    """Halving lr shrinks the gap between the measured Δ_i and the prediction about fourfold (the
    next term is O(lr²)); at these step sizes the measured ratio is 6-7 on this model, and a wrong
    prediction (a missing term, a sign) would leave an O(lr) gap that halves instead."""
    model = _small_model()
    g = _group(**FIRST_ORDER_GROUP)

    def gap(lr: float) -> float:
        measured = one_step_displacement(model, g, update="grpo", lr=lr).per_response_delta
        fo = lld.first_order_displacement(model, g, update="grpo", lr=lr)
        predicted = [a + b for a, b in zip(fo.per_response_right, fo.per_response_wrong)]
        return max(abs(m - p) for m, p in zip(measured, predicted))

    big, small = gap(2.5e-2), gap(1.25e-2)
    assert small < big / 3


def test_first_order_parts_pos_only_is_grpo_right_part():
    """Pos Only keeps the correct answers' terms of GRPO's loss and drops the wrong ones', with the
    same normaliser: its prediction is GRPO's right part, and its own wrong part is 0."""
    model = _small_model()
    g = _group(**FIRST_ORDER_GROUP)
    grpo_fo = lld.first_order_displacement(model, g, update="grpo", lr=1e-2)
    pos_fo = lld.first_order_displacement(model, g, update="pos_only", lr=1e-2)
    assert pos_fo.wrong == 0.0 and pos_fo.predicted == grpo_fo.right
    assert grpo_fo.to_row() | {"method": "x"} == {
        "id": "q",
        "method": "x",
        "predicted": grpo_fo.predicted,
        "right": grpo_fo.right,
        "wrong": grpo_fo.wrong,
    }
    # the weights and stored gradients are left as they were
    before = [p.detach().clone() for p in model.parameters()]
    lld.first_order_displacement(model, g, update="nthr", lr=1e-2)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
