"""Tests for nthr_book.grpo: every formula against a hand computation on a tiny example (arXiv 2505.18830)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

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

torch.set_num_threads(1)

G = 8


# ------------------------------------------------------------------ advantages


def _binary_groups(group_size: int = G) -> torch.Tensor:
    """(group_size+1, group_size) rewards: row k has k ones (N+ = k) then zeros."""
    return torch.stack([torch.tensor([1.0] * k + [0.0] * (group_size - k)) for k in range(group_size + 1)])


@pytest.mark.parametrize("std", ["population", "sample", "none"])
def test_group_advantages_closed_form_every_n_plus(std):
    eps = 1e-6
    rewards = _binary_groups()
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
            expected = torch.zeros(G)
        else:
            expected = torch.tensor([a_pos] * n_plus + [a_neg] * (G - n_plus))
        assert_close(adv[n_plus], expected, rtol=1e-5, atol=1e-6)


def test_group_advantages_population_values_spot_check():
    # N+ = 2 of 8: p = 1/4, std = sqrt(3)/4, A+ = (3/4)/(sqrt(3)/4) = sqrt(3), A- = -(1/4)/(sqrt(3)/4) = -1/sqrt(3)
    rewards = torch.tensor([[1.0, 1.0, 0, 0, 0, 0, 0, 0]])
    adv = group_advantages(rewards, eps=0.0)
    expected = torch.tensor([[math.sqrt(3)] * 2 + [-1 / math.sqrt(3)] * 6])
    assert_close(adv, expected)


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
    assert adv.is_floating_point()
    assert_close(adv, torch.tensor([[1.0, -1.0]]), rtol=1e-5, atol=1e-5)


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

    logps = torch.tensor([[-1.0, -2.0, 99.0], [-0.5, float("nan"), 7.0], [-1.0, -1.0, -1.0], [5.0, 5.0, 5.0]])
    assert_close(sequence_logprob(logps, completion_mask), torch.tensor([-3.0, -0.5, -3.0, 0.0]))
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


def _example():
    # ratios: row 0 = [1.1, 1.5 (A>0: clipped high), 0.7 (A<0: clipped low)], row 1 = [0.9, 1.3 (A<0: not clipped), pad]
    old = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -0.8, -3.0]])
    ratio = torch.tensor([[1.1, 1.5, 0.7], [0.9, 1.3, 1.0]])
    logps = old + ratio.log()
    adv = torch.tensor([[0.8, 0.8, -0.6], [-1.2, -1.2, 0.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    ref = torch.tensor([[-1.2, -1.7, -0.9], [-1.1, -1.0, -2.0]])
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
        logps, old, adv, mask, ref_logps=ref, clip_eps=0.2, clip_eps_high=eps_high, kl_coef=kl_coef, agg=agg
    )
    assert_close(loss, torch.tensor(-expected))


def test_policy_loss_dr_grpo_max_completion_length():
    logps, old, adv, mask, _, _ = _example()
    loss_t, _ = policy_loss(logps, old, adv, mask, agg="dr_grpo")
    loss_10, _ = policy_loss(logps, old, adv, mask, agg="dr_grpo", max_completion_length=10)
    assert_close(loss_10, loss_t * 3 / 10)


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
    assert_close(grad, expected)
    assert grad[1, 1] != 0


def test_policy_loss_metrics():
    logps, old, adv, mask, ref, ratio = _example()
    _, metrics = policy_loss(logps, old, adv, mask, ref_logps=ref, clip_eps=0.2)
    assert metrics["clip_frac_low"] == pytest.approx(1 / 5)
    assert metrics["clip_frac_high"] == pytest.approx(1 / 5)
    assert metrics["clip_frac"] == pytest.approx(2 / 5)
    valid_ratios = [1.1, 1.5, 0.7, 0.9, 1.3]
    assert metrics["ratio_mean"] == pytest.approx(sum(valid_ratios) / 5, rel=1e-5)
    assert metrics["ratio_min"] == pytest.approx(0.7, rel=1e-5)
    assert metrics["ratio_max"] == pytest.approx(1.5, rel=1e-5)
    ks = [
        math.exp(r - lp) - (r - lp) - 1
        for r, lp, m in zip(ref.flatten().tolist(), logps.flatten().tolist(), mask.flatten().tolist())
        if m
    ]
    assert metrics["kl"] == pytest.approx(sum(ks) / 5, rel=1e-5)
    assert all(isinstance(v, float) for v in metrics.values())
    _, no_ref = policy_loss(logps, old, adv, mask)
    assert "kl" not in no_ref
    # eps_high widens the upper band: ratio 1.5 is no longer clipped at eps_high = 0.6
    _, wide = policy_loss(logps, old, adv, mask, clip_eps_high=0.6)
    assert wide["clip_frac_high"] == 0.0 and wide["clip_frac_low"] == pytest.approx(1 / 5)


def test_k3_kl_value_and_gradient():
    logps = torch.tensor([-1.0, -0.3, -2.5, -0.7], requires_grad=True)
    ref = torch.tensor([-1.4, -0.3, -2.0, -3.0])
    kl = k3_kl(logps, ref)
    d = (ref - logps).detach()
    assert_close(kl, torch.exp(d) - d - 1)
    assert kl[1] == 0.0 and (kl >= 0).all()
    (grad,) = torch.autograd.grad(kl.sum(), logps)
    assert_close(grad, 1 - torch.exp(d))  # d/dlogp [e^(ref-logp) - (ref-logp) - 1] = 1 - e^(ref-logp)


def test_policy_loss_kl_term_gradient():
    # With A = 0 only the KL term is left: loss = kl_coef * mean_t k3, gradient kl_coef*(1-e^(ref-logp))/Σ|y|.
    logps, old, _, mask, ref, _ = _example()
    logps = logps.clone().requires_grad_(True)
    loss, _ = policy_loss(logps, old, torch.zeros(2, 3), mask, ref_logps=ref, kl_coef=0.5)
    (grad,) = torch.autograd.grad(loss, logps)
    expected = 0.5 * (1 - torch.exp(ref - logps.detach())) / 5 * mask
    assert_close(grad, expected)


def test_policy_loss_masked_garbage_and_errors():
    logps, old, adv, mask, _, _ = _example()
    dirty = logps.clone()
    dirty[1, 2] = 1e4  # would overflow exp() if not masked
    loss_clean, _ = policy_loss(logps, old, adv, mask)
    loss_dirty, _ = policy_loss(dirty, old, adv, mask)
    assert_close(loss_dirty, loss_clean)
    # per-sequence advantages (N,) broadcast like per-token ones
    seq_adv = torch.tensor([0.8, -1.2])
    loss_seq, _ = policy_loss(logps, old, seq_adv, mask)
    loss_tok, _ = policy_loss(logps, old, expand_advantages(seq_adv, mask), mask)
    assert_close(loss_seq, loss_tok)
    with pytest.raises(ValueError, match="bnpo"):
        policy_loss(logps, old, adv, mask, agg="bnpo")
    with pytest.raises(ValueError, match="ref_logps"):
        policy_loss(logps, old, adv, mask, kl_coef=0.1)
    with pytest.raises(ValueError, match="old_logps"):
        policy_loss(logps, old[:, :2], adv, mask)
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(logps, old, adv[:, :2], mask)


# ------------------------------------------------------------------ per-token log-probs on a tiny Llama

VOCAB, PAD = 64, 0


def _make_tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        pad_token_id=PAD,
        attn_implementation="eager",
    )
    return LlamaForCausalLM(config).eval()


def _make_tiny_gpt2():
    # Absolute position embeddings: unlike RoPE, wrong position ids under left padding change the logits.
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, attn_implementation="eager"
    )
    return GPT2LMHeadModel(config).eval()


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
            tiny_lm, input_ids, attention_mask, completion_mask, temperature=temperature, chunk_size=3
        )
        logits = tiny_lm(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
        ).logits  # (N, P+T, V)
    full = torch.log_softmax(logits[:, -T - 1 : -1] / temperature, dim=-1)  # (N, T, V)
    manual = full.gather(-1, input_ids[:, -T:, None]).squeeze(-1) * completion_mask
    assert logps.shape == completion_mask.shape and logps.dtype == torch.float32
    assert_close(logps, manual, rtol=1e-5, atol=1e-5)
    assert (logps[completion_mask == 0] == 0).all()


def test_per_token_logps_left_padding_equals_unpadded(tiny_lm):
    # Each row alone, without any padding, through plain model(ids).logits: the padded batch must agree.
    prompts, completions, input_ids, attention_mask, completion_mask = _batch()
    with torch.no_grad():
        logps = per_token_logps(tiny_lm, input_ids, attention_mask, completion_mask, chunk_size=2)
        for i, (p, c) in enumerate(zip(prompts, completions)):
            ids = torch.tensor([p + c])
            logits = tiny_lm(ids).logits[0, len(p) - 1 : -1]  # (len(c), V)
            expected = torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(c)[:, None]).squeeze(-1)
            assert_close(logps[i, : len(c)], expected, rtol=1e-5, atol=1e-5)


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
    from_hidden = tiny_lm.get_output_embeddings()(hidden)  # (N, T, V)
    assert_close(from_hidden, logits[:, -T - 1 : -1], rtol=1e-5, atol=1e-5)
    lp = torch.log_softmax(from_hidden, -1).gather(-1, input_ids[:, -T:, None]).squeeze(-1) * completion_mask
    assert_close(logps, lp, rtol=1e-5, atol=1e-5)


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
    ).logits
    manual = torch.log_softmax(logits[:, -T - 1 : -1], -1).gather(-1, input_ids[:, -T:, None]).squeeze(-1)
    manual_grads = torch.autograd.grad((manual * completion_mask * weights).sum(), params)
    assert any(g.abs().sum() > 0 for g in grads)
    for g, mg in zip(grads, manual_grads):
        assert_close(g, mg, rtol=1e-4, atol=1e-6)


def test_chunked_token_logps_chunk_size_invariant():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 11, bias=True)
    hidden = torch.randn(7, 8)
    targets = torch.randint(0, 11, (7,))
    expected = torch.log_softmax(head(hidden) / 0.5, -1).gather(-1, targets[:, None]).squeeze(-1)
    for chunk_size in (1, 3, 7, 100):
        with torch.no_grad():
            got = chunked_token_logps(hidden, head, targets, temperature=0.5, chunk_size=chunk_size)
        assert_close(got, expected.detach())
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
