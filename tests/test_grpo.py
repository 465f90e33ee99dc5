"""Tests for nthr_book.grpo: every formula against a hand computation on a tiny example (arXiv
2505.18830)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from nthr_book import grpo
from nthr_book.grpo import (
    chunked_token_logps,
    dynamic_sampling_filter,
    expand_advantages,
    group_advantages,
    k3_kl,
    mixed_group_mask,
    per_token_logps,
    policy_loss,
    pos_only,
    position_ids_from_mask,
    sequence_logprob,
)
from nthr_book.models import tiny_random_model

torch.set_num_threads(1)

G = 8
F64 = torch.float64
EPS64, EPS32 = torch.finfo(torch.float64).eps, torch.finfo(torch.float32).eps


def _sum_atol(terms, ops_per_term: int = 6) -> float:
    """Rounding bound of a float64 sum of ``terms``, each at most ``ops_per_term`` roundings from
    exact: (n + ops)·eps·Σ|terms|. Dividing the sum by a count >= 1 (a mean) keeps it a bound."""
    terms = [float(t) for t in terms]
    return (len(terms) + ops_per_term) * EPS64 * sum(abs(t) for t in terms)


def _logps_atol(logits: torch.Tensor, temperature: float = 1.0) -> float:
    """Bound on |library log-prob - float64 log-softmax| when the library rounds float64 logits to
    float32: each logit moves by eps·|z| and the float32 log-sum-exp adds V terms, so at most
    (V + 4 + 3·max|z|)·eps32."""
    z_max = logits.abs().max().item() / temperature
    return EPS32 * (logits.shape[-1] + 4 + 3 * z_max)


# ------------------------------------------------------------------ advantages


def _binary_groups(group_size: int = G) -> torch.Tensor:
    """(group_size+1, group_size) rewards: row k has k ones (N+ = k) then zeros."""
    return torch.stack(
        [torch.tensor([1.0] * k + [0.0] * (group_size - k)) for k in range(group_size + 1)]
    )


@pytest.mark.parametrize("std", ["population", "sample", "none"])
def test_group_advantages_closed_form_every_n_plus(std):
    eps = 1e-6
    rewards = _binary_groups().to(F64)
    adv = group_advantages(rewards, std=std, eps=eps)
    assert adv.shape == (G + 1, G)
    for n_plus in range(G + 1):
        p = n_plus / G
        if std == "population":
            scale = math.sqrt(p * (1 - p)) + eps
        elif std == "sample":
            scale = math.sqrt(G / (G - 1) * p * (1 - p)) + eps
        else:
            scale = 1.0
        a_pos, a_neg = (1 - p) / scale, -p / scale
        if n_plus in (0, G):  # homogeneous: exactly zero
            expected = torch.zeros(G, dtype=F64)
        else:
            expected = torch.tensor([a_pos] * n_plus + [a_neg] * (G - n_plus), dtype=F64)
        tol = 4 * G * EPS64  # a mean and a std over G rewards, in float64
        assert_close(adv[n_plus], expected, rtol=tol, atol=tol)


def test_group_advantages_population_values_spot_check():
    # N+ = 2 of 8: p = 1/4, std = sqrt(3)/4, A+ = (3/4)/(sqrt(3)/4) = sqrt(3), A- =
    # -(1/4)/(sqrt(3)/4) = -1/sqrt(3)
    rewards = torch.tensor([[1.0, 1.0, 0, 0, 0, 0, 0, 0]], dtype=F64)
    adv = group_advantages(rewards, eps=0.0)
    expected = torch.tensor([[math.sqrt(3)] * 2 + [-1 / math.sqrt(3)] * 6], dtype=F64)
    tol = 4 * G * EPS64  # a mean and a std over G rewards, in float64
    assert_close(adv, expected, rtol=tol, atol=tol)


def test_group_advantages_homogeneous_exact_zero_no_nan():
    rewards = torch.tensor([[0.3] * 7, [1.0] * 7, [0.0] * 7, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]])
    for std in ("population", "sample", "none"):
        adv = group_advantages(rewards, std=std, eps=0.0)  # eps=0 would give 0/0 without the guard
        assert not torch.isnan(adv).any()
        assert torch.equal(adv[:3], torch.zeros(3, 7))
        assert (adv[3] != 0).all()


def test_group_advantages_errors_and_dtype():
    with pytest.raises(ValueError, match="rewards"):
        group_advantages(torch.zeros(8))
    with pytest.raises(ValueError, match="rewards"):
        group_advantages(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.tensor([[1.0], [0.0]]), std="sample")
    with pytest.raises(ValueError, match="std"):
        group_advantages(torch.zeros(1, 4), std="unbiased")
    with pytest.raises(ValueError, match="rewards"):
        group_advantages(torch.tensor([[1.0, float("nan")]]))
    # group_size 1 with population std: homogeneous, zero
    assert torch.equal(group_advantages(torch.tensor([[1.0], [0.0]])), torch.zeros(2, 1))
    # integer / bool rewards are promoted to float
    adv = group_advantages(torch.tensor([[1, 0]]))
    assert adv.dtype == torch.float32
    a = 0.5 / (0.5 + 1e-6)  # (r - mean) / (std + eps), std = 1/2, in float64
    tol = 4 * 2 * EPS32  # a mean and a std over 2 rewards, in float32
    assert_close(adv.double(), torch.tensor([[a, -a]], dtype=F64), rtol=tol, atol=tol)


def test_pos_only():
    adv = torch.tensor([[1.5, -0.5, 0.0], [-2.0, 3.0, -0.1]])
    assert torch.equal(pos_only(adv), torch.tensor([[1.5, 0.0, 0.0], [0.0, 3.0, 0.0]]))
    per_token = torch.tensor([[[-1.0, 2.0]]])
    assert torch.equal(pos_only(per_token), torch.tensor([[[0.0, 2.0]]]))


def test_mixed_group_mask_and_dynamic_sampling_filter():
    rewards = _binary_groups(4)  # N+ = 0..4 for G = 4
    assert mixed_group_mask(rewards).tolist() == [False, True, True, True, False]
    idx = dynamic_sampling_filter(rewards)
    assert idx.dtype == torch.long
    assert idx.tolist() == list(range(4, 16))  # groups 1, 2, 3 -> rows 4..15
    rewards = torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.0, 0.0], [1.0, 0.0]])
    assert mixed_group_mask(rewards).tolist() == [False, True, False, True]
    assert dynamic_sampling_filter(rewards).tolist() == [2, 3, 6, 7]
    assert dynamic_sampling_filter(torch.ones(2, 3)).numel() == 0
    with pytest.raises(ValueError, match="rewards"):
        mixed_group_mask(torch.ones(6))


def test_expand_advantages_and_sequence_logprob():
    group_adv = torch.tensor([[1.0, -1.0], [0.5, -0.5]])  # 2 groups of 2 -> N = 4
    completion_mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0]])
    expected = torch.tensor([[1.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.0, 0.0, 0.0]])
    assert torch.equal(expand_advantages(group_adv, completion_mask), expected)
    assert torch.equal(expand_advantages(group_adv.reshape(-1), completion_mask), expected)
    with pytest.raises(ValueError, match="group_adv"):
        expand_advantages(torch.zeros(3, 2), completion_mask)

    logps = torch.tensor(
        [[-1.0, -2.0, 99.0], [-0.5, float("nan"), 7.0], [-1.0, -1.0, -1.0], [5.0, 5.0, 5.0]]
    )
    # sums of small integers and halves: exact in float32
    assert torch.equal(
        sequence_logprob(logps, completion_mask), torch.tensor([-3.0, -0.5, -3.0, 0.0])
    )
    with pytest.raises(ValueError, match="completion_mask"):
        sequence_logprob(logps, completion_mask[:, :2])


# ------------------------------------------------------------------ loss


def _hand_objective(logps, old_logps, adv, mask, eps_low, eps_high, kl_coef=0.0, ref=None):
    """Per-token objective by explicit Python loops (floats)."""
    rows = []
    for i in range(len(logps)):
        row = []
        for t in range(len(logps[i])):
            if not mask[i][t]:
                row.append(None)
                continue
            r = math.exp(logps[i][t] - old_logps[i][t])
            a = adv[i][t]
            obj = min(r * a, min(max(r, 1 - eps_low), 1 + eps_high) * a)
            if ref is not None:
                d = ref[i][t] - logps[i][t]
                obj -= kl_coef * (math.exp(d) - d - 1)
            row.append(obj)
        rows.append(row)
    return rows


def _example(dtype: torch.dtype = F64):
    # ratios: row 0 = [1.1, 1.5 (A>0: clipped high), 0.7 (A<0: clipped low)], row 1 = [0.9, 1.3
    # (A<0: not clipped), pad]
    old = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -0.8, -3.0]], dtype=dtype)
    ratio = torch.tensor([[1.1, 1.5, 0.7], [0.9, 1.3, 1.0]], dtype=dtype)
    logps = old + ratio.log()
    adv = torch.tensor([[0.8, 0.8, -0.6], [-1.2, -1.2, 0.0]], dtype=dtype)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    ref = torch.tensor([[-1.2, -1.7, -0.9], [-1.1, -1.0, -2.0]], dtype=dtype)
    return logps, old, adv, mask, ref, ratio


@pytest.mark.parametrize("agg", ["token", "seq_mean", "dr_grpo"])
@pytest.mark.parametrize("eps_high", [None, 0.28])
def test_policy_loss_aggregation_vs_hand(agg, eps_high):
    logps, old, adv, mask, ref, _ = _example()
    kl_coef = 0.1
    eh = 0.2 if eps_high is None else eps_high
    obj = _hand_objective(
        logps.tolist(), old.tolist(), adv.tolist(), mask.tolist(), 0.2, eh, kl_coef, ref.tolist()
    )
    valid = [[o for o in row if o is not None] for row in obj]
    if agg == "token":
        expected = sum(sum(v) for v in valid) / sum(len(v) for v in valid)  # / 5 tokens
    elif agg == "seq_mean":
        expected = sum(sum(v) / len(v) for v in valid) / len(valid)
    else:
        expected = sum(sum(v) for v in valid) / (2 * 3)
    loss, _ = policy_loss(
        logps,
        old,
        adv,
        mask,
        ref_logps=ref,
        clip_eps=0.2,
        clip_eps_high=eps_high,
        kl_coef=kl_coef,
        agg=agg,
    )
    atol = _sum_atol([o for row in valid for o in row])  # both sides in float64
    assert_close(loss, torch.tensor(-expected, dtype=F64), rtol=0.0, atol=atol)


def test_policy_loss_dr_grpo_max_completion_length():
    logps, old, adv, mask, _, _ = _example()
    loss_t, _ = policy_loss(logps, old, adv, mask, agg="dr_grpo")
    loss_10, _ = policy_loss(logps, old, adv, mask, agg="dr_grpo", max_completion_length=10)
    tol = 4 * EPS64  # one float64 sum divided by 6 and by 20, then scaled by 3/10: a few roundings
    assert_close(loss_10, loss_t * 3 / 10, rtol=tol, atol=0.0)


def test_policy_loss_gradient_inside_and_outside_clip():
    logps, old, adv, mask, _, ratio = _example()
    logps = logps.clone().requires_grad_(True)
    loss, _ = policy_loss(logps, old, adv, mask, clip_eps=0.2, agg="token")
    (grad,) = torch.autograd.grad(loss, logps)
    n_tokens = 5.0
    expected = -adv * ratio / n_tokens  # d/dlogp of -(ratio*A)/Σ|y| with ratio = exp(logp - old)
    expected[0, 1] = 0.0  # ratio 1.5 > 1.2, A > 0: clipped
    expected[0, 2] = 0.0  # ratio 0.7 < 0.8, A < 0: clipped
    expected[1, 2] = 0.0  # padding
    # [1, 1]: ratio 1.3 > 1.2 but A < 0 -> min picks the unclipped term: gradient kept
    # each entry: a product of exp(log r), A and 1/5 (float64, a few roundings); zeros are exact
    assert_close(grad, expected, rtol=8 * EPS64, atol=0.0)
    assert grad[1, 1] != 0


def test_policy_loss_metrics():
    logps, old, adv, mask, ref, ratio = _example()
    _, metrics = policy_loss(logps, old, adv, mask, ref_logps=ref, clip_eps=0.2)
    # counts over 5 tokens: one correctly rounded float64 division, the same as Python's
    assert metrics["clip_frac_low"] == 1 / 5
    assert metrics["clip_frac_high"] == 1 / 5
    assert metrics["clip_frac"] == 2 / 5
    # logps = old + log r rounds at the scale of |old|, so exp(logps - old) returns r to within
    # (2·max|old| + 2)·eps, relatively; a mean of 5 adds 5 roundings more
    rel = (2 * old.abs().max().item() + 2 + 5) * EPS64
    valid_ratios = [1.1, 1.5, 0.7, 0.9, 1.3]
    assert metrics["ratio_mean"] == pytest.approx(sum(valid_ratios) / 5, rel=rel, abs=0.0)
    assert metrics["ratio_min"] == pytest.approx(0.7, rel=rel, abs=0.0)
    assert metrics["ratio_max"] == pytest.approx(1.5, rel=rel, abs=0.0)
    ks = [
        math.exp(r - lp) - (r - lp) - 1
        for r, lp, m in zip(
            ref.flatten().tolist(), logps.flatten().tolist(), mask.flatten().tolist()
        )
        if m
    ]
    assert metrics["kl"] == pytest.approx(sum(ks) / 5, rel=0.0, abs=_sum_atol(ks, ops_per_term=4))
    assert all(isinstance(v, float) for v in metrics.values())
    _, no_ref = policy_loss(logps, old, adv, mask)
    assert "kl" not in no_ref
    # eps_high widens the upper band: ratio 1.5 is no longer clipped at eps_high = 0.6
    _, wide = policy_loss(logps, old, adv, mask, clip_eps_high=0.6)
    assert wide["clip_frac_high"] == 0.0 and wide["clip_frac_low"] == 1 / 5  # a count over 5


def test_k3_kl_value_and_gradient():
    logps = torch.tensor([-1.0, -0.3, -2.5, -0.7], requires_grad=True, dtype=F64)
    ref = torch.tensor([-1.4, -0.3, -2.0, -3.0], dtype=F64)
    kl = k3_kl(logps, ref)
    d = [r - lp for r, lp in zip(ref.tolist(), logps.tolist())]  # Python floats, independently
    # an exp and two differences: a few roundings at the scale of e^d + |d| + 1
    atol = torch.tensor([math.exp(x) + abs(x) + 1 for x in d], dtype=F64) * 4 * EPS64
    assert ((kl - torch.tensor([math.exp(x) - x - 1 for x in d], dtype=F64)).abs() <= atol).all()
    assert kl[1] == 0.0 and (kl >= 0).all()
    (grad,) = torch.autograd.grad(kl.sum(), logps)
    # d/dlogp [e^(ref-logp) - (ref-logp) - 1] = 1 - e^(ref-logp): an exp and a difference, a few
    # roundings
    assert ((grad - torch.tensor([1 - math.exp(x) for x in d], dtype=F64)).abs() <= atol).all()


def test_policy_loss_kl_term_gradient():
    # With A = 0 only the KL term is left: loss = kl_coef * mean_t k3, gradient
    # kl_coef*(1-e^(ref-logp))/Σ|y|.
    logps, old, _, mask, ref, _ = _example()
    logps = logps.clone().requires_grad_(True)
    zero_adv = torch.zeros(2, 3, dtype=F64)
    loss, _ = policy_loss(logps, old, zero_adv, mask, ref_logps=ref, kl_coef=0.5)
    (grad,) = torch.autograd.grad(loss, logps)
    expected = 0.5 * (1 - torch.exp(ref - logps.detach())) / 5 * mask
    # an exp, a difference and two products per entry in float64, at the scale 0.5·(1 + e^(ref-
    # logp))/5
    atol = 8 * EPS64 * (0.5 * (1 + torch.exp(ref - logps.detach())) / 5)
    assert ((grad - expected).abs() <= atol).all()


def test_policy_loss_masked_garbage_and_errors():
    logps, old, adv, mask, _, _ = _example()
    dirty = logps.clone()
    dirty[1, 2] = 1e4  # would overflow exp() if not masked
    loss_clean, _ = policy_loss(logps, old, adv, mask)
    loss_dirty, _ = policy_loss(dirty, old, adv, mask)
    assert torch.equal(loss_dirty, loss_clean)  # masked entries never reach the sum: the same bits
    # per-sequence advantages (N,) broadcast like per-token ones: the same per-token values, the
    # same sum
    seq_adv = torch.tensor([0.8, -1.2], dtype=F64)
    loss_seq, _ = policy_loss(logps, old, seq_adv, mask)
    loss_tok, _ = policy_loss(logps, old, expand_advantages(seq_adv, mask), mask)
    assert torch.equal(loss_seq, loss_tok)
    with pytest.raises(ValueError, match="bnpo"):
        policy_loss(logps, old, adv, mask, agg="bnpo")
    with pytest.raises(ValueError, match="ref_logps"):
        policy_loss(logps, old, adv, mask, kl_coef=0.1)
    with pytest.raises(ValueError, match="old_logps"):
        policy_loss(logps, old[:, :2], adv, mask)
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(logps, old, adv[:, :2], mask)


# -------------------------------------------------------------- per-token log-probs on a tiny Llama

VOCAB, PAD = 64, 0


def _make_tiny_llama():
    # sdpa attention (the default): eager attention in float64 turns fully masked rows into NaN
    model = tiny_random_model(VOCAB, hidden_size=32, num_kv_heads=4)
    model.config.pad_token_id = PAD
    return model.eval().double()  # float64: references without float32 rounding


def _make_tiny_gpt2():
    # Absolute position embeddings: unlike RoPE, wrong position ids under left padding change the
    # logits.
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        attn_implementation="eager",
    )
    return GPT2LMHeadModel(config).eval().double()  # float64: references without float32 rounding


@pytest.fixture(scope="module")
def tiny_llama():
    return _make_tiny_llama()


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def tiny_lm(request):
    return _make_tiny_llama() if request.param == "llama" else _make_tiny_gpt2()


def _batch():
    """3 rows: prompts left-padded to P=4, completions right-padded to T=5."""
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    completions = [[20, 21, 22, 23, 24], [25, 26], [27, 28, 29, 30]]
    P, T = 4, 5
    prompt_ids = torch.tensor([[PAD] * (P - len(p)) + p for p in prompts])
    prompt_mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    completion_ids = torch.tensor([c + [PAD] * (T - len(c)) for c in completions])
    completion_mask = torch.tensor([[1] * len(c) + [0] * (T - len(c)) for c in completions])
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    return prompts, completions, input_ids, attention_mask, completion_mask


def test_position_ids_from_mask():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2]]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_per_token_logps_matches_full_log_softmax(tiny_lm, temperature):
    _, _, input_ids, attention_mask, completion_mask = _batch()
    T = completion_mask.shape[1]
    with torch.no_grad():
        logps = per_token_logps(
            tiny_lm,
            input_ids,
            attention_mask,
            completion_mask,
            temperature=temperature,
            chunk_size=3,
        )
        logits = tiny_lm(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
        ).logits  # (N, P+T, V)
    full = torch.log_softmax(logits[:, -T - 1 : -1] / temperature, dim=-1)  # (N, T, V) float64
    manual = full.gather(-1, input_ids[:, -T:, None]).squeeze(-1) * completion_mask
    assert logps.shape == completion_mask.shape and logps.dtype == torch.float32
    # the library rounds the float64 logits to float32: the bound of _logps_atol
    assert_close(logps.double(), manual, rtol=0.0, atol=_logps_atol(logits, temperature))
    assert (logps[completion_mask == 0] == 0).all()


def test_per_token_logps_left_padding_equals_unpadded(tiny_lm):
    # Each row alone, without any padding, through plain model(ids).logits: the padded batch must
    # agree.
    prompts, completions, input_ids, attention_mask, completion_mask = _batch()
    with torch.no_grad():
        logps = per_token_logps(tiny_lm, input_ids, attention_mask, completion_mask, chunk_size=2)
        for i, (p, c) in enumerate(zip(prompts, completions)):
            ids = torch.tensor([p + c])
            logits = tiny_lm(ids).logits[0, len(p) - 1 : -1]  # (len(c), V) float64
            expected = (
                torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(c)[:, None]).squeeze(-1)
            )
            # float64 forwards of the padded and unpadded rows agree to ~1e-15, far inside this
            # float32 bound
            assert_close(logps[i, : len(c)].double(), expected, rtol=0.0, atol=_logps_atol(logits))


def test_per_token_logps_return_hidden_gives_logits(tiny_lm):
    _, _, input_ids, attention_mask, completion_mask = _batch()
    T = completion_mask.shape[1]
    with torch.no_grad():
        logps, hidden = per_token_logps(
            tiny_lm, input_ids, attention_mask, completion_mask, return_hidden=True, chunk_size=4
        )
        logits = tiny_lm(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
        ).logits
    assert hidden.shape == (3, T, 32)
    head = tiny_lm.get_output_embeddings()
    from_hidden = head(hidden)  # (N, T, V) float64
    # the same float64 states through the head in two batch shapes: each logit a d-term dot product,
    # so within d·eps64·max Σ_j |h_j w_j| of each other
    S = (hidden.abs() @ head.weight.abs().T).max().item()
    assert_close(from_hidden, logits[:, -T - 1 : -1], rtol=0.0, atol=hidden.shape[-1] * EPS64 * S)
    lp = (
        torch.log_softmax(from_hidden, -1).gather(-1, input_ids[:, -T:, None]).squeeze(-1)
        * completion_mask
    )
    assert_close(logps.double(), lp, rtol=0.0, atol=_logps_atol(from_hidden))


def test_per_token_logps_gradients_match_unchunked(tiny_lm):
    # Gradients flow through the checkpointed chunks and equal those of the plain full log-softmax.
    _, _, input_ids, attention_mask, completion_mask = _batch()
    T = completion_mask.shape[1]
    weights = torch.randn(completion_mask.shape, generator=torch.Generator().manual_seed(1))
    params = [p for p in tiny_lm.parameters()]

    logps = per_token_logps(tiny_lm, input_ids, attention_mask, completion_mask, chunk_size=3)
    grads = torch.autograd.grad((logps * weights).sum(), params)

    logits = tiny_lm(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
    ).logits[:, -T - 1 : -1]  # (N, T, V) float64
    manual = torch.log_softmax(logits, -1).gather(-1, input_ids[:, -T:, None]).squeeze(-1)
    manual_loss = (manual * completion_mask * weights).sum()
    manual_grads = torch.autograd.grad(manual_loss, params, retain_graph=True)
    assert any(g.abs().sum() > 0 for g in grads)

    # Rounding bound. The library's gradient at each valid logit, w·(onehot - q), comes from a
    # float32
    # softmax of float32-rounded logits: q is off by at most (V + 6 + 2·max|z|)·eps32 relatively.
    # The rest
    # of the backward pass is float64 and linear in those logit gradients, so a parameter's gradient
    # moves
    # by at most Σ_{n,v} |∂z_nv/∂θ| · |w_n|·(onehot + q)_nv·(V + 6 + 2·max|z|)·eps32.
    valid = completion_mask.bool()
    z = logits[valid]  # (n, V) the logits the library rounds
    n, V = z.shape
    q = torch.softmax(z.detach(), -1)
    onehot = torch.nn.functional.one_hot(input_ids[:, -T:][valid], V).to(q.dtype)
    rel = (V + 6 + 2 * z.abs().max().item()) * EPS32
    b = weights[valid].abs().double()[:, None] * (onehot + q) * rel  # (n, V): logit-gradient bound
    eye = torch.eye(n * V, dtype=z.dtype).view(n * V, n, V)
    # each (n·V, *p.shape): the rows of ∂z/∂θ
    jacobian = torch.autograd.grad(z, params, grad_outputs=eye, is_grads_batched=True)
    # plus the float64 passes' own rounding: n·V contributions, at the scale of the largest gradient
    # entry
    # (it is all that is left where a gradient is 0 analytically, e.g. GPT-2's key bias)
    floor64 = n * V * EPS64 * max(mg.abs().max().item() for mg in manual_grads)
    for g, mg, jac in zip(grads, manual_grads, jacobian):
        bound = torch.tensordot(b.reshape(-1), jac.abs(), dims=1) + floor64  # (*p.shape)
        assert ((g - mg).abs() <= bound).all()


def test_chunked_token_logps_chunk_size_invariant():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 11, bias=True).double()
    hidden = torch.randn(7, 8, dtype=F64)
    targets = torch.randint(0, 11, (7,))
    with torch.no_grad():
        logits = head(hidden)  # (7, 11) float64
    expected = torch.log_softmax(logits / 0.5, -1).gather(-1, targets[:, None]).squeeze(-1)
    for chunk_size in (1, 3, 7, 100):
        with torch.no_grad():
            got = chunked_token_logps(hidden, head, targets, temperature=0.5, chunk_size=chunk_size)
        assert got.dtype == torch.float32
        assert_close(got.double(), expected, rtol=0.0, atol=_logps_atol(logits, 0.5))
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_token_logps(hidden, head, targets, chunk_size=0)


def test_per_token_logps_errors(tiny_llama):
    _, _, input_ids, attention_mask, completion_mask = _batch()
    with pytest.raises(ValueError, match="attention_mask"):
        per_token_logps(tiny_llama, input_ids, attention_mask[:, :-1], completion_mask)
    with pytest.raises(ValueError, match="completion_mask"):
        per_token_logps(tiny_llama, input_ids, attention_mask, completion_mask[:2])
    with pytest.raises(ValueError, match="prompt token"):
        per_token_logps(tiny_llama, input_ids[:, :5], attention_mask[:, :5], completion_mask)
    with pytest.raises(ValueError, match="temperature"):
        per_token_logps(tiny_llama, input_ids, attention_mask, completion_mask, temperature=0.0)


def test_micro_batches_trim_each_batch_to_its_last_valid_token():
    from nthr_book.grpo import micro_batches

    _, _, input_ids, attention_mask, completion_mask = _batch()
    P = 4
    batches = list(
        micro_batches(input_ids[:, :P], attention_mask[:, :P], input_ids[:, P:], completion_mask, 1)
    )
    assert [b[1] for b in batches] == [5, 2, 4]  # completion lengths 5, 2, 4
    rows, t_b, ids, att, cm = batches[1]
    assert rows == slice(1, 2) and cm.dtype == torch.bool and cm.tolist() == [[True, True]]
    assert torch.equal(ids, input_ids[1:2, : P + 2])
    assert torch.equal(att, attention_mask[1:2, : P + 2])
    with pytest.raises(ValueError, match="batch_size"):
        list(
            micro_batches(
                input_ids[:, :P], attention_mask[:, :P], input_ids[:, P:], completion_mask, 0
            )
        )


@pytest.mark.parametrize("batch_size", [None, 1, 2])
def test_group_token_logps_equals_one_unbatched_pass(tiny_lm, batch_size):
    from nthr_book.grpo import group_token_logps

    _, _, input_ids, attention_mask, completion_mask = _batch()
    P, mask = 4, completion_mask.bool()
    with torch.no_grad():
        full, hidden = per_token_logps(
            tiny_lm, input_ids, attention_mask, completion_mask, return_hidden=True
        )
        lp, h = group_token_logps(
            tiny_lm,
            input_ids[:, :P],
            attention_mask[:, :P],
            input_ids[:, P:],
            completion_mask,
            batch_size=batch_size,
            return_hidden=True,
        )
        logits = tiny_lm.get_output_embeddings()(hidden)  # (N, T, V) float64
    # the float64 states of a valid token do not depend on the right padding after it, up to the
    # rounding of a few dozen float64 operations on values of size max|h|
    assert_close(h[mask], hidden[mask], rtol=0.0, atol=64 * EPS64 * hidden.abs().max().item())
    if batch_size == 1:  # row 1 (2 tokens) is its own micro-batch: the columns after it stay zero
        assert bool((h[1, 2:] == 0).all())
    # both float32 roundings of (nearly) the same float64 logits: twice the bound of _logps_atol
    assert_close(lp, full, rtol=0.0, atol=2 * _logps_atol(logits))
    assert torch.equal(lp[~mask], torch.zeros_like(lp[~mask]))


def test_head_logits_is_the_distribution_per_token_logps_reads(tiny_llama):
    from nthr_book.grpo import head_logits

    hidden = torch.randn(2, 3, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    z = tiny_llama.get_output_embeddings()(hidden)  # (2, 3, V) float64
    got = head_logits(tiny_llama, hidden, temperature=0.5)
    assert got.dtype == torch.float32
    assert_close(got.double(), z / 0.5, rtol=0.0, atol=EPS32 * (z / 0.5).abs().max().item())
    tiny_llama.config.final_logit_softcapping = 2.0
    try:
        capped = head_logits(tiny_llama, hidden, temperature=0.5)
    finally:
        tiny_llama.config.final_logit_softcapping = None
    want = torch.tanh(z / 2.0) * 2.0 / 0.5  # |want| <= 4: float32 rounding of a few operations
    assert_close(capped.double(), want, rtol=0.0, atol=8 * EPS32 * 4.0)


# ------------------------------------------------------------------ the shared prompt of a group


def _groups_batch(G: int = 3):
    """2 groups of G rows: left-padded prompts of different lengths (P=5), completions right-padded
    after an EOS inside the row (T=6); group-major."""
    prompts = [[5, 6, 7, 8, 9], [10, 11]]
    completions = [[20, 21, 2], [22, 23, 24, 25, 26, 27], [28], [30, 31, 32, 2], [33, 2], [34, 35]]
    P, T = 5, 6
    prompt_ids = torch.tensor([[PAD] * (P - len(p)) + p for p in prompts]).repeat_interleave(G, 0)
    prompt_mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    prompt_mask = prompt_mask.repeat_interleave(G, 0)
    completion_ids = torch.tensor([c + [PAD] * (T - len(c)) for c in completions[: 2 * G]])
    completion_mask = torch.tensor(
        [[1] * len(c) + [0] * (T - len(c)) for c in completions[: 2 * G]]
    )
    return prompt_ids, prompt_mask, completion_ids, completion_mask.bool()


def _shared_tol(model, scale: float) -> float:
    # Llama's RMSNorm computes in float32 even in a float64 model: each of the 2L + 1 norms rounds
    # at float32 eps, and the error reaches an output through sums of at most d + P + T terms.
    cfg = model.config
    n_norms = 2 * cfg.num_hidden_layers + 1
    return n_norms * (cfg.hidden_size + 11) * torch.finfo(torch.float32).eps * scale


def test_shared_prompt_gives_the_same_logps_hidden_and_gradients(tiny_llama):
    prompt_ids, prompt_mask, completion_ids, completion_mask = _groups_batch()
    ids = torch.cat([prompt_ids, completion_ids], 1)
    att = torch.cat([prompt_mask, completion_mask.long()], 1)
    assert grpo.can_share_prompt(tiny_llama, prompt_ids, prompt_mask, 3)
    out = {}
    for name, group_size in (("whole", None), ("shared", 3)):
        tiny_llama.zero_grad()
        logps, hidden = per_token_logps(
            tiny_llama, ids, att, completion_mask, return_hidden=True, group_size=group_size
        )
        (logps * completion_mask).sum().backward()
        grads = torch.cat([p.grad.flatten() for p in tiny_llama.parameters()])
        out[name] = (logps, hidden[completion_mask], grads)
    tiny_llama.zero_grad()
    for a, b in zip(out["whole"], out["shared"]):
        tol = _shared_tol(tiny_llama, float(a.abs().max()))
        torch.testing.assert_close(b, a, rtol=0, atol=tol)
    assert (
        out["whole"][0][~completion_mask].eq(0).all()
        and out["shared"][0][~completion_mask].eq(0).all()
    )


def test_shared_prompt_in_micro_batches_that_split_a_group(tiny_llama):
    prompt_ids, prompt_mask, completion_ids, completion_mask = _groups_batch()
    one = prompt_ids[:3], prompt_mask[:3], completion_ids[:3], completion_mask[:3]  # one group
    whole = grpo.group_token_logps(tiny_llama, *one, share_prompt=False)
    for batch_size in (1, 2, 3):  # 2: micro-batches of 2 rows and 1 row of the same group
        split = grpo.group_token_logps(tiny_llama, *one, batch_size=batch_size)
        tol = _shared_tol(tiny_llama, float(whole.abs().max()))
        torch.testing.assert_close(split, whole, rtol=0, atol=tol)


def test_can_share_prompt_only_for_groups_with_one_prompt_and_a_cache(tiny_llama):
    prompt_ids, prompt_mask, _, _ = _groups_batch()
    assert grpo.can_share_prompt(tiny_llama, prompt_ids, prompt_mask, 3)
    assert not grpo.can_share_prompt(tiny_llama, prompt_ids, prompt_mask, None)
    assert not grpo.can_share_prompt(tiny_llama, prompt_ids, prompt_mask, 1)
    assert not grpo.can_share_prompt(
        tiny_llama, prompt_ids, prompt_mask, 4
    )  # 6 rows: no groups of 4
    assert not grpo.can_share_prompt(tiny_llama, prompt_ids, prompt_mask, 6)  # two prompts in one
    tiny_llama.gradient_checkpointing_enable()
    try:
        tiny_llama.train()  # transformers drops the cache under checkpointing in training mode
        assert not grpo.can_share_prompt(tiny_llama, prompt_ids, prompt_mask, 3)
        tiny_llama.eval()
        assert grpo.can_share_prompt(tiny_llama, prompt_ids, prompt_mask, 3)
    finally:
        tiny_llama.gradient_checkpointing_disable()
        tiny_llama.eval()


@pytest.mark.slow
def test_shared_prompt_on_the_embedded_model_matches_whole_rows():
    """The arithmetic task's real prompts (161 tokens, two groups left-padded to one width), EOS
    inside the completions, float32: log-probs and gradients within float32 rounding."""
    from nthr_book.data import arithmetic_problems, build_prompt
    from nthr_book.models import load_policy

    model, tok = load_policy("smollm2-135m")
    model.train()
    prompts = [
        build_prompt(tok, p["problem"], "arithmetic") for p in arithmetic_problems(2, seed=0)
    ]
    enc = tok(prompts, padding=True, return_tensors="pt", padding_side="left")
    G = 3
    texts = ["So the answer is \\boxed{12}.", "\\boxed{7}", "I think it is 40, so \\boxed{40}."] * 2
    rows = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
    T = max(map(len, rows))
    completion_ids = torch.tensor([r + [tok.pad_token_id] * (T - len(r)) for r in rows])
    completion_mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows]).bool()
    prompt_ids = enc.input_ids.repeat_interleave(G, 0)
    prompt_mask = enc.attention_mask.repeat_interleave(G, 0)
    ids = torch.cat([prompt_ids, completion_ids], 1)
    att = torch.cat([prompt_mask, completion_mask.long()], 1)
    head = model.get_output_embeddings().weight  # (V, d): its gradient sums every token's
    out = {}
    for name, group_size in (("whole", None), ("shared", G)):
        model.zero_grad()
        logps = per_token_logps(model, ids, att, completion_mask, group_size=group_size)
        (logps * completion_mask).sum().backward()
        out[name] = (logps.detach(), head.grad.clone())
    model.zero_grad()
    # float32 kernels of different shapes (one prompt row vs G, T queries vs P + T) round
    # differently: at each of the L layers the error of a sum of up to d + P + T terms.
    cfg = model.config
    n_terms = cfg.num_hidden_layers * (cfg.hidden_size + ids.shape[1])
    for a, b in zip(out["whole"], out["shared"]):
        tol = n_terms * torch.finfo(torch.float32).eps * float(a.abs().max())
        torch.testing.assert_close(b, a, rtol=0, atol=tol)
