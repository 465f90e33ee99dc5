"""NTHRGRPOTrainer (nthr_book.integrations.trl, arXiv 2505.18830) against TRL and nthr_book.

Tiny random Llama, 2 prompts x G=4 completions of 8 tokens, a token-id-parity reward (mixed groups).
Three layouts, as TRL 1.16 runs them: "fused" (TRL skips the old-policy pass and one micro-batch
holds the generation batch: NTHR reads the compute_loss forward), "old_pass" (num_iterations=2: TRL
runs the old-policy pass, NTHR reads it), "extra_pass" (steps_per_generation=2: one extra no-grad
pass). References are computed in float64 (nthr_book's hook on float64 hidden states and head, a
float64 copy of the model for log-probs); tolerances are derived from float32's epsilon and the
number of terms of each sum.
"""

from __future__ import annotations

import copy
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from trl_import import import_trl

import_trl()  # skips this file without the trl extra; fails under NTHR_BOOK_TRL_REQUIRED=1

from datasets import Dataset  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

import nthr_book.integrations.trl as trl_integration  # noqa: E402
from nthr_book import grpo, rules  # noqa: E402
from nthr_book.grpo import group_advantages  # noqa: E402
from nthr_book.integrations.trl import (  # noqa: E402
    LLDCallback,
    NTHRConfig,
    NTHRGRPOTrainer,
    hidden_states_source,
    low_precision_logits,
    math_answer_reward,
    prompt_dataset,
    trl_runs_old_pass,
)
from nthr_book.models import load_tokenizer, tiny_random_model  # noqa: E402
from nthr_book.nthr import nthr_advantage_fn  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
G = 4
PROMPTS = ["What is 2 + 3?", "Name a colour.", "Count to three.", "Say hello."]
BATCH = [{"prompt": p} for p in PROMPTS[:2] for _ in range(G)]  # group-major: 2 groups of G
MODES = {
    "fused": {},
    "old_pass": {"num_iterations": 2},
    "extra_pass": {
        "steps_per_generation": 2,
        "gradient_accumulation_steps": 2,
        "per_device_train_batch_size": 4,
    },
}
SELECTIVE = NTHRConfig(beta=1.0, eta=0.5, anchor="no_self_token")  # selects part of the tokens here
EPS32 = torch.finfo(torch.float32).eps
TINY = tiny_random_model(seed=0).config  # hidden_size d, num_hidden_layers, vocab_size V


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny-random")


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


def parity_reward(completions, completion_ids, **kwargs) -> list[float]:
    """1.0 when the sum of the completion's token ids is odd."""
    return [float(sum(ids) % 2) for ids in completion_ids]


def make_trainer(
    tmp_path,
    tokenizer,
    cls=NTHRGRPOTrainer,
    mode="fused",
    lr=1e-6,
    config=None,
    model=None,
    reward_funcs=parity_reward,
    **kwargs,
):
    overrides = (
        {"per_device_train_batch_size": 8, "use_cpu": True, "bf16": False, "num_generations": G}
        | MODES[mode]
        | (config or {})
    )
    args = GRPOConfig(
        output_dir=str(tmp_path / "out"),
        max_completion_length=8,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        seed=0,
        max_steps=1,
        learning_rate=lr,
        **overrides,
    )
    trainer = cls(
        model=model or tiny_random_model(seed=0),
        reward_funcs=reward_funcs,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        processing_class=tokenizer,
        **kwargs,
    )
    trainer.current_gradient_accumulation_steps = args.gradient_accumulation_steps  # set by train()
    trainer.model.train()
    return trainer


def generate(trainer, batch=BATCH) -> dict:
    torch.manual_seed(0)
    return trainer._generate_and_score_completions(batch)


def token_advantages(trainer, out: dict) -> torch.Tensor:
    """The (B, T) advantages TRL's loss sees (after compute_loss for the fused layout)."""
    if bool(out["nthr_fused"]):
        batch = dict(out)
        trainer.compute_loss(trainer.model, batch)
        return batch["advantages"]
    return out["advantages"]


def hidden_states(model, out: dict) -> torch.Tensor:
    """(B, T, d) last hidden states that predict the completion tokens, by a plain HF forward."""
    T = out["completion_ids"].shape[1]
    with torch.no_grad():
        ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
        att = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
        return model.model(input_ids=ids, attention_mask=att).last_hidden_state[:, -T - 1 : -1]


def reference(
    model, out: dict, cfg: NTHRConfig, bf16: bool = False, check_reward: bool = True
) -> tuple[torch.Tensor, dict]:
    """nthr_book.nthr's hook on the same group-major batch: float64 scores from a separate forward.

    The advantages come back as A or eta·A of the same float32 A, so they compare exactly with the
    trainer's as long as the (discrete) selections agree.
    """
    T = out["completion_ids"].shape[1]
    mask = out["completion_mask"].bool()
    device = out["completion_ids"].device.type
    with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):  # the forward only
        hidden = hidden_states(model, out)
    rewards = out["nthr_reward"]
    if check_reward:  # recomputed from the loss mask (a truncated completion's reward is not)
        parity = ((out["completion_ids"] * mask).sum(-1) % 2).float()
        torch.testing.assert_close(rewards, parity, rtol=0, atol=0)  # integers, exact
    A = out["seq_advantages"]
    ctx = SimpleNamespace(
        advantages=A[:, None].expand(-1, T).clone(),
        rewards=rewards.view(-1, G),
        group_size=G,
        completion_ids=out["completion_ids"],
        completion_mask=mask,
        hidden=hidden.double(),
        lm_head_weight=model.lm_head.weight.detach().double(),
        lm_head_bias=None,
        temperature=1.0,
    )
    return nthr_advantage_fn(cfg, dtype=torch.float64, use_logps=False)(ctx)


def score_rtol(out: dict) -> float:
    """Relative error of a float32 token score: s_t = g_tᵀ M h_t sums |V*|·d products after M's
    sums over the correct tokens; each addition costs at most one eps32 of the running magnitude."""
    mask = out["completion_mask"].bool()
    n_vocab = int(torch.unique(out["completion_ids"][mask]).numel())  # |V*| of the whole batch
    return (n_vocab * TINY.hidden_size + int(mask.sum())) * EPS32


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("nthr", [None, NTHRConfig(beta=math.inf)], ids=["none", "beta_inf"])
def test_selecting_nothing_is_plain_grpo_exactly(tmp_path, tokenizer, mode, nthr):
    ours = make_trainer(tmp_path, tokenizer, NTHRGRPOTrainer, mode, nthr=nthr)
    plain = make_trainer(tmp_path, tokenizer, GRPOTrainer, mode)
    out = generate(ours)
    old_pass = mode == "old_pass"  # TRL 1.16 runs the old-policy pass only there
    assert (
        trl_runs_old_pass(ours.args, False, True) is old_pass
        and ("old_per_token_logps" in out) is old_pass
    )
    if nthr is not None:  # the layout the trainer took is the one hidden_states_source names
        source, extra = hidden_states_source(ours.args, False, True)
        assert bool(out["nthr_fused"]) is (source == "the loss's own forward")
        assert extra == (mode == "extra_pass")
    mine, theirs = dict(out), dict(out)
    theirs["advantages"] = out["seq_advantages"]  # TRL's own (B,) advantages
    loss_ours = ours.compute_loss(ours.model, mine)
    loss_ours.backward()
    loss_plain = plain.compute_loss(plain.model, theirs)
    loss_plain.backward()
    if nthr is not None:
        metrics = ours._metrics["train"]
        assert mine["advantages"].shape == out["completion_ids"].shape  # (B, T) reached TRL's loss
        assert metrics["nthr/mixed_groups"][-1] >= 1 and metrics["nthr/selected_frac"][-1] == 0.0
    assert torch.equal(loss_ours, loss_plain)
    n_nonzero = 0
    for (name, p), (_, q) in zip(
        ours.model.named_parameters(), plain.model.named_parameters(), strict=True
    ):
        assert torch.equal(p.grad, q.grad), name
        n_nonzero += int(bool(p.grad.abs().sum() > 0))
    assert n_nonzero > 0


@pytest.mark.parametrize("mode", list(MODES))
def test_token_advantages_equal_nthr_book(tmp_path, tokenizer, mode):
    ours = make_trainer(tmp_path, tokenizer, NTHRGRPOTrainer, mode, nthr=SELECTIVE)
    out = generate(ours)
    adv = token_advantages(ours, out)
    expected, metrics = reference(ours.model, out, SELECTIVE)
    torch.testing.assert_close(adv, expected, rtol=0, atol=0)  # same selection, same float32 A
    logged = ours._metrics["train"]
    assert 0.0 < logged["nthr/selected_frac"][-1] < 1.0  # a selection that tests something
    # counts: exact; eta: two python floats through a float32 all-reduce and one division
    frac = metrics["nthr/selected_frac"]
    assert logged["nthr/selected_frac"][-1] == pytest.approx(frac, rel=2 * EPS32)
    assert logged["nthr/mixed_groups"][-1] == metrics["nthr/mixed_groups"]
    assert logged["nthr/eta_mean"][-1] == pytest.approx(metrics["nthr/eta_mean"], rel=4 * EPS32)
    # tau: float32 scores against float64 ones (see score_rtol), then a float32 all-reduce
    tau = metrics["nthr/tau_mean"]
    assert logged["nthr/tau_mean"][-1] == pytest.approx(tau, rel=score_rtol(out))


def test_full_vocabulary_log_sum_exp_option(tmp_path, tokenizer):
    """scores_from_logps=False: the scorer forms the full-vocabulary log-sum-exp, as nthr_book's
    hook does."""
    ours = make_trainer(
        tmp_path, tokenizer, NTHRGRPOTrainer, "old_pass", nthr=SELECTIVE, scores_from_logps=False
    )
    out = generate(ours)
    expected, _ = reference(ours.model, out, SELECTIVE)
    torch.testing.assert_close(out["advantages"], expected, rtol=0, atol=0)


def test_low_precision_is_read_from_the_accelerator():
    """accelerate launch --mixed_precision bf16 trains in bf16 while GRPOConfig.bf16 is False."""
    f32, bf16 = SimpleNamespace(dtype=torch.float32), SimpleNamespace(dtype=torch.bfloat16)
    no_flags = SimpleNamespace(bf16=False, fp16=False)
    assert low_precision_logits(SimpleNamespace(mixed_precision="bf16"), no_flags, f32)
    assert low_precision_logits(SimpleNamespace(mixed_precision="fp16"), no_flags, f32)
    assert not low_precision_logits(SimpleNamespace(mixed_precision="no"), no_flags, f32)
    assert low_precision_logits(SimpleNamespace(mixed_precision="no"), no_flags, bf16)  # weights


def test_trainer_under_accelerate_bf16_reads_full_precision_lse(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what `accelerate launch` exports
    ours = make_trainer(tmp_path, tokenizer, NTHRGRPOTrainer, "old_pass", nthr=SELECTIVE)
    assert ours.args.bf16 is False and ours.accelerator.mixed_precision == "bf16"
    assert ours.scores_from_logps is False  # bf16 log-probs would carry the bf16 logits' rounding


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["fused", "old_pass"])
def test_cuda_bf16_token_advantages(tmp_path, tokenizer, mode):
    """On CUDA in bf16 autocast, NTHR's advantages agree with nthr_book's hook on the same batch."""
    ours = make_trainer(
        tmp_path,
        tokenizer,
        NTHRGRPOTrainer,
        mode,
        nthr=SELECTIVE,
        config={"use_cpu": False, "bf16": True},
    )
    assert not ours.scores_from_logps  # bf16 log-probs would carry the bf16 logits' rounding into q
    out = generate(ours)
    assert out["completion_ids"].is_cuda
    adv = token_advantages(ours, out)
    expected, metrics = reference(ours.model, out, SELECTIVE, bf16=True)
    # bf16 forwards of two differently batched passes: a token whose score sits within bf16 rounding
    # (2^-8 relative) of tau may be selected by one and not the other; the rest agree exactly.
    agree = (adv == expected).float().mean().item()
    print(
        f"{mode}: {agree:.4f} of the token advantages agree, selected_frac "
        f"{ours._metrics['train']['nthr/selected_frac'][-1]:.3f} vs "
        f"{metrics['nthr/selected_frac']:.3f}"
    )
    assert agree >= 0.99, f"only {agree:.3f} of the token advantages agree"
    assert 0.0 < ours._metrics["train"]["nthr/selected_frac"][-1] < 1.0


def test_beta_minus_inf_eta_zero_by_hand(tmp_path, tokenizer):
    cfg = NTHRConfig(
        beta=-math.inf, eta=0.0
    )  # every token of an incorrect response of a mixed group -> 0
    ours = make_trainer(tmp_path, tokenizer, NTHRGRPOTrainer, "fused", nthr=cfg)
    out = generate(ours)
    adv = token_advantages(ours, out)
    rewards = out["nthr_reward"].view(-1, G)
    mixed = (rewards.amax(1) != rewards.amin(1)).repeat_interleave(G)  # (B,)
    zeroed = mixed & (out["nthr_reward"] <= 0.5)
    assert bool(zeroed.any())
    expected = out["seq_advantages"][:, None].expand_as(adv).clone()
    expected[zeroed] = 0.0
    torch.testing.assert_close(adv, expected, rtol=0, atol=0)


def test_positive_advantage_keeps_its_advantage(tmp_path, tokenizer):
    """normalize_then_sum over two rewards: an incorrect response can get A > 0; NTHR leaves it."""

    def first_wrong_bonus(completions, completion_ids, **kwargs) -> list[float]:
        """1.0 for the first parity-incorrect completion of each group (a second objective)."""
        bonus = [0.0] * len(completion_ids)
        for start in range(0, len(completion_ids), G):
            wrong = [i for i in range(start, start + G) if sum(completion_ids[i]) % 2 == 0]
            if wrong:
                bonus[wrong[0]] = 1.0
        return bonus

    cfg = NTHRConfig(beta=-math.inf, eta=0.0)  # would zero every incorrect token of a mixed group
    ours = make_trainer(
        tmp_path,
        tokenizer,
        NTHRGRPOTrainer,
        "old_pass",
        nthr=cfg,
        reward_funcs=[parity_reward, first_wrong_bonus],
        correct_reward="parity_reward",
        config={"multi_objective_aggregation": "normalize_then_sum", "reward_weights": [1.0, 2.0]},
    )
    out = generate(ours)
    A, correct = out["seq_advantages"], out["nthr_reward"] > 0.5  # (B,) TRL's A, parity decides
    mixed = (correct.view(-1, G).any(1) & ~correct.view(-1, G).all(1)).repeat_interleave(G)  # (B,)
    pushed_up = mixed & ~correct & (A > 0)
    assert bool(pushed_up.any()) and bool((mixed & ~correct & (A < 0)).any())  # both kinds present
    expected = A[:, None].expand_as(out["advantages"]).clone()
    expected[mixed & ~correct & (A < 0)] = 0.0  # eta·A with eta = 0 on every token of those rows
    torch.testing.assert_close(out["advantages"], expected, rtol=0, atol=0)
    # the metric counts the reweighted tokens only: the pushed-up rows' tokens are not selected
    neg = (mixed & ~correct)[:, None] & out["completion_mask"].bool()
    scaled = (mixed & ~correct & (A < 0))[:, None] & out["completion_mask"].bool()
    assert ours._metrics["train"]["nthr/selected_frac"][-1] == pytest.approx(
        scaled.sum().item() / neg.sum().item(), rel=2 * EPS32
    )  # two counts, a float32 reduce


def _seq_logp_tokens(model, rec: dict) -> tuple[torch.Tensor, float]:
    """(B, T) float64 token log-probs (the model in float64, full logits) and the float32 error
    bound of one of them."""
    T = rec["completion_ids"].shape[1]
    ids = torch.cat([rec["prompt_ids"], rec["completion_ids"]], 1)
    att = torch.cat([rec["prompt_mask"], rec["completion_mask"]], 1)
    with torch.no_grad():
        logits = model.double()(input_ids=ids, attention_mask=att).logits[:, -T - 1 : -1]
    logps = torch.log_softmax(logits, -1).gather(-1, rec["completion_ids"][..., None]).squeeze(-1)
    # Per token: the log-sum-exp over V logits (log2 V roundings after pairwise summation), the
    # log-prob itself, and the forward (each layer sums d products of values of the logits' size).
    per_token = (
        math.log2(TINY.vocab_size)
        + float(logps.abs().max())
        + TINY.num_hidden_layers * TINY.hidden_size * float(logits.abs().max())
    ) * EPS32
    return logps, per_token


def _seq_logp(model, rec: dict) -> tuple[torch.Tensor, float]:
    """(B,) ln π(y|x) in float64 (the model converted to float64, full logits), temperature 1, and
    the float32 error bound of one of its token log-probs (see ``lld_atol``)."""
    logps, per_token = _seq_logp_tokens(model, rec)
    return (logps * rec["completion_mask"]).sum(-1), per_token


def lld_atol(T: int, per_token: float) -> float:
    """Error bound of a float32 Δ = Σ_T logp_new - Σ_T logp_old against float64 (2T log-probs)."""
    return 2 * T * per_token


@pytest.mark.parametrize("truncate", [False, True], ids=["all_rows", "mask_truncated"])
def test_lld_metrics_match_recomputation(tmp_path, tokenizer, truncate):
    """lld/* over the correct responses inside TRL's loss mask; with mask_truncated_completions a
    correct truncated row (all-zero mask, Δ = 0) is not counted as lazy."""
    model = tiny_random_model(seed=0)
    if truncate:  # 1 token in 12 ends a completion: some of the 8 rows finish, the others are cut
        model.generation_config.eos_token_id = list(range(2, TINY.vocab_size, 12))
    lld = LLDCallback(eps=0.0)
    ours = make_trainer(
        tmp_path,
        tokenizer,
        NTHRGRPOTrainer,
        "fused",
        lr=1e-3,
        nthr=SELECTIVE,
        record_nthr=True,
        callbacks=[lld],
        model=model,
        config={"mask_truncated_completions": truncate},
    )
    assert (
        lld.trainer is ours
        and sum(isinstance(c, LLDCallback) for c in ours.callback_handler.callbacks) == 1
    )
    ours.train()
    rec, log = ours.nthr_record, ours.state.log_history[0]
    kept = rec["completion_mask"].bool().any(-1)  # (B,) rows with a token in TRL's loss mask
    correct = (rec["rewards"] > 0.5) & kept
    if truncate:
        assert bool(((rec["rewards"] > 0.5) & ~kept).any()) and bool(correct.any())  # both kinds
    else:
        assert bool(kept.all())
    new, err_new = _seq_logp(ours.model, rec)
    old, err_old = _seq_logp(tiny_random_model(seed=0), rec)
    delta = (new - old)[correct]
    atol = lld_atol(rec["completion_ids"].shape[1], max(err_new, err_old))
    assert bool((delta.abs() > atol).all())  # no Δ within rounding of eps = 0: the rate is decided
    assert log["lld/n_correct"] == correct.sum().item()
    assert log["lld/delta_mean"] == pytest.approx(delta.mean().item(), abs=atol)
    assert log["lld/rate"] == pytest.approx((delta <= 0).double().mean().item(), rel=2 * EPS32)
    assert 0.0 < log["nthr/selected_frac"] < 1.0


def test_selected_frac_counts_only_tokens_inside_trls_loss_mask(tmp_path, tokenizer):
    """mask_truncated_completions: truncated incorrect rows are neither selected nor counted."""
    model = tiny_random_model(seed=0)
    model.generation_config.eos_token_id = list(range(2, TINY.vocab_size, 12))
    ours = make_trainer(
        tmp_path,
        tokenizer,
        NTHRGRPOTrainer,
        "old_pass",
        nthr=SELECTIVE,
        model=model,
        config={"mask_truncated_completions": True},
        record_nthr=True,
    )
    out = generate(ours)
    mask = out["completion_mask"].bool()  # TRL's loss mask: truncated rows all zero
    incorrect = out["nthr_reward"] <= 0.5
    assert bool((incorrect & ~mask.any(-1)).any())  # a truncated incorrect row to leave out
    expected, metrics = reference(ours.model, out, SELECTIVE, check_reward=False)  # the same mask
    torch.testing.assert_close(out["advantages"], expected, rtol=0, atol=0)
    selected = ours.nthr_record["selected"]
    assert not bool((selected & ~mask).any())
    n_neg = sum(
        int((incorrect[g * G : (g + 1) * G, None] & mask[g * G : (g + 1) * G]).sum())
        for g in range(len(out["nthr_reward"]) // G)
        if 0 < int((~incorrect[g * G : (g + 1) * G]).sum()) < G
    )  # mixed groups only
    logged = ours._metrics["train"]["nthr/selected_frac"][-1]
    assert logged == pytest.approx(selected.sum().item() / n_neg, rel=2 * EPS32)
    assert logged == pytest.approx(metrics["nthr/selected_frac"], rel=2 * EPS32)


def test_trl_advantages_use_the_unbiased_std(tmp_path, tokenizer):
    """TRL: (r - mean) / (std_unbiased + 1e-4); nthr_book: population std + 1e-6. At N+ = 1 of
    G = 8 TRL's advantages are 0.935 times the native ones, for every response of the group."""

    def one_right(completions, **kwargs) -> list[float]:
        return [float(i % 8 == 0) for i in range(len(completions))]  # N+ = 1 in each group of 8

    trainer = make_trainer(
        tmp_path,
        tokenizer,
        NTHRGRPOTrainer,
        "fused",
        reward_funcs=one_right,
        config={"num_generations": 8, "per_device_train_batch_size": 8},
    )
    out = generate(trainer, [{"prompt": PROMPTS[0]}] * 8)
    trl_adv = out["seq_advantages"].double()  # (8,) TRL's, float32
    native = group_advantages(out["nthr_reward"].double().view(1, 8)).flatten()  # float64
    p = 1 / 8
    pop = math.sqrt(p * (1 - p))
    ratio = (pop + 1e-6) / (pop * math.sqrt(8 / 7) + 1e-4)  # closed form, float64
    assert round(ratio, 3) == 0.935  # the number the module docstring and notebook 07 quote
    # TRL's float32 mean, variance (8 terms each), sqrt and division: at most 2G + 4 roundings
    torch.testing.assert_close(
        trl_adv / native, torch.full_like(native, ratio), rtol=(2 * 8 + 4) * EPS32, atol=0
    )


class TwoProcesses:
    """Rank 0 of two processes, for the order of collectives: records each gather and reduce; the
    other process reports ``peer_failed`` failed checks in every flag all-reduce."""

    num_processes, process_index, is_main_process = 2, 0, True
    device = torch.device("cpu")

    def __init__(self, peer_failed: int = 0):
        self.calls: list[str] = []
        self.peer_failed = peer_failed

    def reduce(self, tensor, reduction="sum"):
        self.calls.append(f"reduce{tensor.numel()}")
        return tensor + self.peer_failed if tensor.numel() == 1 else tensor * 2

    def gather(self, tensor):
        self.calls.append("gather")
        return torch.cat([tensor, tensor])

    def pad_across_processes(self, tensor, dim=0, pad_index=0):
        return tensor

    def unwrap_model(self, model):
        return model


def _batch_and_states(tmp_path, tokenizer):
    """A trainer, a generated old-pass batch (8 rows: whole groups) and its hidden states."""
    ours = make_trainer(
        tmp_path, tokenizer, NTHRGRPOTrainer, "old_pass", nthr=SELECTIVE, scores_from_logps=False
    )
    out = generate(ours)
    return ours, out, hidden_states(ours.model, out), torch.zeros(out["completion_ids"].shape)


@pytest.mark.parametrize("peer_failed", [0, 1], ids=["here", "other_process"])
def test_nthr_checks_fire_before_any_gather(tmp_path, tokenizer, peer_failed):
    """A bad batch on one process stops every process at the flag all-reduce, before a gather."""
    ours, out, hidden, logps = _batch_and_states(tmp_path, tokenizer)
    ours.accelerator = acc = TwoProcesses(peer_failed)
    batch = {k: v[:6] if torch.is_tensor(v) and v.dim() else v for k, v in out.items()}  # straddles
    if peer_failed:  # this process is fine: 6 rows, with their hidden states
        with pytest.raises(RuntimeError, match="other process"):
            ours._nthr_advantages(batch, hidden[:6], logps[:6])
    else:  # hidden states of the wrong width here
        with pytest.raises(ValueError, match="hidden states"):
            ours._nthr_advantages(batch, hidden[:6, :-1], logps[:6])
    assert acc.calls == ["reduce1"]  # the agreement, then nothing: no gather, no metrics


def test_nthr_scoring_errors_raise_before_the_metrics_all_reduce(tmp_path, tokenizer, monkeypatch):
    ours, out, hidden, logps = _batch_and_states(tmp_path, tokenizer)
    ours.accelerator = acc = TwoProcesses()

    def broken(*args, **kwargs):
        raise FloatingPointError("a scoring failure on this process only")

    monkeypatch.setattr(trl_integration, "apply_to_group", broken)
    with pytest.raises(FloatingPointError):
        ours._nthr_advantages(out, hidden, logps)  # 8 rows = 2 whole groups: nothing gathered
    assert acc.calls == ["reduce1", "reduce1"]  # the checks, the agreement on the error; no reduce6


@pytest.mark.parametrize("peer_failed", [0, 1], ids=["here", "other_process"])
def test_lld_check_fires_before_the_gather_and_the_forward(
    tmp_path, tokenizer, peer_failed, monkeypatch
):
    ours, out, _, _ = _batch_and_states(tmp_path, tokenizer)
    batch = ours._lld_pending[-1]
    if not peer_failed:
        batch.old_seq[batch.correct.nonzero()[0]] = math.nan  # never recorded here
    ours.accelerator = acc = TwoProcesses(peer_failed)
    monkeypatch.setattr(
        ours,
        "_get_per_token_logps_and_entropies",
        lambda *a, **k: pytest.fail("the LLD forward ran after a failed check"),
    )
    with pytest.raises(RuntimeError, match="other process" if peer_failed else "never recorded"):
        LLDCallback()._measure(ours, batch)
    assert acc.calls == ["reduce1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_score_whole_groups(tmp_path):
    """2 CPU processes (gloo), 6 rows each, G=4: group 1 = rows 4-7 straddles the processes."""
    dump = tmp_path / "dump"
    # accelerate 1.15 spawns CPU processes only through torch.distributed.run (--multi_gpu) or
    # mpirun; GRPOConfig(use_cpu=True) in the script keeps them on CPU with the gloo backend.
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        str(ROOT / "scripts" / "train_trl.py"),
        "--model_name_or_path",
        "tiny-random",
        "--task",
        "toy",
        "--max_steps",
        "2",
        "--num_generations",
        str(G),
        "--per_device_train_batch_size",
        "6",
        "--max_completion_length",
        "8",
        "--nthr_beta",
        "1",
        "--nthr_eta",
        "0.5",
        "--nthr_anchor",
        "no_self_token",
        "--seed",
        "1",
        "--output_dir",
        str(tmp_path / "out"),
        "--dump_dir",
        str(dump),
    ]
    env = os.environ | {
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "TOKENIZERS_PARALLELISM": "false",
    }
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]

    logs = json.loads((dump / "log_history.json").read_text())
    assert logs["world_size"] == 2
    assert (tmp_path / "out" / "model.safetensors").exists()  # saved once, by the main process
    for row in logs["log_history"][:2]:
        assert math.isfinite(row["nthr/selected_frac"]) and math.isfinite(row["lld/delta_mean"])

    # Step 1 is scored before any update: recompute it in one process with the initial weights.
    model = tiny_random_model(seed=0)
    recs = [torch.load(dump / f"step1_rank{r}.pt") for r in (0, 1)]
    width = max(r["completion_ids"].shape[1] for r in recs)
    merged = {
        k: [] for k in ("rows", "completion_ids", "completion_mask", "hidden", "seq_advantages")
    }
    for r, rec in enumerate(recs):
        assert sorted(rec["rows"].tolist()) == list(range(6 * r, 6 * r + 6))
        T = rec["completion_ids"].shape[1]
        hidden = hidden_states(model.double(), rec)  # (6, T, d) float64
        # float32 against float64: each layer's sums of d products of states of size <= |h|max
        atol = TINY.num_hidden_layers * TINY.hidden_size * float(hidden.abs().max()) * EPS32
        # the captured states are the policy pass's
        torch.testing.assert_close(rec["hidden"].double(), hidden, rtol=0, atol=atol)
        parity = ((rec["completion_ids"] * rec["completion_mask"]).sum(-1) % 2).float()
        torch.testing.assert_close(rec["rewards"], parity, rtol=0, atol=0)
        pad = width - T
        merged["rows"].append(rec["rows"])
        merged["completion_ids"].append(
            torch.nn.functional.pad(rec["completion_ids"], (0, pad), value=2)
        )
        merged["completion_mask"].append(torch.nn.functional.pad(rec["completion_mask"], (0, pad)))
        merged["hidden"].append(torch.nn.functional.pad(hidden, (0, 0, 0, pad)))
        merged["seq_advantages"].append(rec["seq_advantages"])
    order = torch.cat(merged["rows"]).argsort()
    full = {k: torch.cat(v)[order] for k, v in merged.items()}  # (12, ...) group-major
    assert torch.equal(full["rows"], torch.arange(12))
    mask = full["completion_mask"].bool()
    rewards = ((full["completion_ids"] * mask).sum(-1) % 2).float()
    straddling_mixed = rewards[4:8].min() != rewards[4:8].max()
    assert straddling_mixed, "--seed 1 gave a homogeneous straddling group here; pick another seed"
    assert 1 in recs[0]["groups_scored"].tolist() and 1 in recs[1]["groups_scored"].tolist()
    ctx = SimpleNamespace(
        advantages=full["seq_advantages"][:, None].expand(-1, width).clone(),
        rewards=rewards.view(-1, G),
        group_size=G,
        completion_ids=full["completion_ids"],
        completion_mask=mask,
        hidden=full["hidden"],
        lm_head_weight=model.lm_head.weight.detach(),
        lm_head_bias=None,
        temperature=1.0,
    )
    expected, metrics = nthr_advantage_fn(SELECTIVE, dtype=torch.float64, use_logps=False)(ctx)
    for rec in recs:
        T = rec["completion_ids"].shape[1]
        torch.testing.assert_close(rec["advantages"], expected[rec["rows"], :T], rtol=0, atol=0)
    first = logs["log_history"][0]
    frac = metrics["nthr/selected_frac"]
    assert first["nthr/selected_frac"] == pytest.approx(frac, rel=2 * EPS32)
    assert first["nthr/mixed_groups"] == metrics["nthr/mixed_groups"]


def test_math_answer_reward_in_trls_calling_convention():
    completions = [
        "2 + 2 = 4. The answer is \\boxed{4}.",
        [{"role": "assistant", "content": "\\boxed{5}"}],
        "4",
    ]
    # TRL passes the dataset's columns (answer, possibly ints) and its own keywords
    assert math_answer_reward(completions, answer=[4, "4", "4"], prompts=["p"] * 3) == [
        1.0,
        0.0,
        0.0,
    ]
    assert math_answer_reward(completions[2:], answer=["4"], require_boxed=False) == [
        1.0
    ]  # unboxed allowed


def test_prompt_dataset_columns(tokenizer):
    from nthr_book.data import build_prompt

    problems = [
        {"id": "a", "problem": "What is 3 + 4?", "answer": 7},
        {"id": "b", "problem": "What is 2 * 5?", "answer": "10"},
    ]
    ds = prompt_dataset(problems, tokenizer, "arithmetic")
    assert ds.column_names == ["prompt", "answer"] and ds["answer"] == ["7", "10"]
    assert ds["prompt"][1] == build_prompt(tokenizer, "What is 2 * 5?", "arithmetic")


def test_generation_ignores_the_models_own_generation_config(tmp_path, tokenizer):
    """Samples are softmax(logits / T) whatever the model's stored generation settings say."""

    def completions(model) -> torch.Tensor:
        trainer = make_trainer(
            tmp_path / str(id(model)), tokenizer, model=model, nthr=None, track_lld=False
        )
        return generate(trainer)["completion_ids"]

    dirty = tiny_random_model(seed=0)
    # fields TRL leaves None, which transformers would fill from the model's own config
    dirty.generation_config.update(
        no_repeat_ngram_size=1, typical_p=0.2, min_p=0.5, epsilon_cutoff=0.1
    )
    before = dirty.generation_config.to_dict()
    assert torch.equal(completions(dirty), completions(tiny_random_model(seed=0)))
    assert dirty.generation_config.to_dict() == before  # set aside for the call, then put back


# ------------------------------------------------------------------ update rules (nthr_book.rules)


def parity_correct(out: dict) -> torch.Tensor:
    """(B,) bool: the parity reward, recomputed from the loss-mask tokens (odd sum: correct)."""
    mask = out["completion_mask"].bool()
    return (out["completion_ids"] * mask).sum(-1) % 2 == 1


@pytest.mark.parametrize("rule,positive", [("nsr", 0.0), ("w_reinforce", 0.1)])
def test_nsr_and_w_reinforce_replace_trls_advantages(tmp_path, tokenizer, rule, positive):
    """arXiv 2506.01347: -1 on wrong responses, 0 (NSR) or λ = 0.1 (W-REINFORCE) on correct
    ones, unnormalised; TRL's loss receives them."""
    ours = make_trainer(tmp_path, tokenizer, NTHRGRPOTrainer, "fused", rule=rule)
    out = generate(ours)
    correct = parity_correct(out)
    assert bool(correct.any()) and bool((~correct).any())
    # the rewards are float32, so λ is float32's 0.1 on both sides
    expected = torch.where(correct, torch.tensor(positive), torch.tensor(-1.0))
    assert torch.equal(out["advantages"], expected) and torch.equal(out["seq_advantages"], expected)


def test_trl_keeps_all_wrong_groups_for_nsr(tmp_path, tokenizer):
    """TRL has no dynamic sampling: with every answer wrong, NSR's groups carry -1 on every
    response (its code's all-wrong push, rules.Rule.keeps_homogeneous) and GRPO's carry 0."""

    def all_wrong(completions, **kwargs) -> list[float]:
        return [0.0] * len(completions)

    ours = make_trainer(tmp_path / "a", tokenizer, rule="nsr", reward_funcs=all_wrong)
    plain = make_trainer(tmp_path / "b", tokenizer, reward_funcs=all_wrong)
    out, ref = generate(ours), generate(plain)
    assert rules.get("nsr").keeps_homogeneous
    assert torch.equal(out["advantages"], torch.full_like(out["advantages"], -1.0))
    assert ref["advantages"].eq(0).all()


def test_pos_only_clamps_trls_own_advantages(tmp_path, tokenizer):
    ours = make_trainer(tmp_path / "a", tokenizer, NTHRGRPOTrainer, "fused", rule="pos_only")
    plain = make_trainer(tmp_path / "b", tokenizer, NTHRGRPOTrainer, "fused")
    out, ref = generate(ours), generate(plain)
    assert torch.equal(out["completion_ids"], ref["completion_ids"])  # the same samples
    assert bool((ref["advantages"] < 0).any())
    assert torch.equal(out["advantages"], ref["advantages"].clamp(min=0))


@pytest.mark.parametrize("rule", ["llds", "llds_token"])
def test_llds_is_zero_while_the_policy_is_the_old_one(tmp_path, tokenizer, rule):
    """TRL's default layout skips the old pass: LLDS adds exactly nothing, gradients included."""
    ours = make_trainer(tmp_path, tokenizer, NTHRGRPOTrainer, "fused", rule=rule)
    plain = make_trainer(tmp_path, tokenizer, GRPOTrainer, "fused")
    out = generate(ours)
    mine, theirs = dict(out), dict(out)
    loss_ours, loss_plain = (
        ours.compute_loss(ours.model, mine),
        plain.compute_loss(plain.model, theirs),
    )
    loss_ours.backward()
    loss_plain.backward()
    assert torch.equal(loss_ours, loss_plain)
    for p, q in zip(ours.model.parameters(), plain.model.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)
    assert ours._metrics["train"]["rule/penalty"][-1] == 0.0


@pytest.mark.parametrize("rule", ["llds", "llds_token"])
def test_llds_term_in_trls_loss_by_hand(tmp_path, tokenizer, rule):
    """TRL's old pass (num_iterations=2), then the policy moves: the loss grows by λ times the
    token mean of max(0, ln π_old - ln π_θ) over gated A >= 0 tokens (arXiv 2512.04220)."""
    ours = make_trainer(tmp_path, tokenizer, NTHRGRPOTrainer, "old_pass", rule=rule)
    plain = make_trainer(tmp_path, tokenizer, GRPOTrainer, "old_pass")
    out = generate(ours)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # the same move of both policies (identical initial weights)
        for p, q in zip(ours.model.parameters(), plain.model.parameters(), strict=True):
            step = 0.05 * torch.randn(p.shape, generator=gen)
            p.add_(step)
            q.add_(step)
    loss_ours = ours.compute_loss(ours.model, dict(out))
    loss_plain = plain.compute_loss(plain.model, dict(out))
    # by hand, in float64: the moved policy's log-probs against TRL's old ones
    T = out["completion_ids"].shape[1]
    current, per_token = _seq_logp_tokens(copy.deepcopy(ours.model), out)
    old, mask, adv = (
        out["old_per_token_logps"].double(),
        out["completion_mask"].bool(),
        out["advantages"],
    )
    total = 0.0
    for i in range(mask.shape[0]):
        if adv[i] < 0:
            continue  # only the preserving set, A >= 0
        drops = [float(old[i, t] - current[i, t]) for t in range(T) if mask[i, t]]
        # a response's gate cannot flip under float32 rounding of its log-probs
        assert abs(sum(drops)) > 2 * len(drops) * per_token
        if rule == "llds" and sum(drops) <= 0:
            continue  # the response gate: its likelihood did not fall
        total += sum(0.2 * d for d in drops if d > 0)
    expected = total / float(mask.sum())  # one micro-batch, no gradient accumulation
    assert expected > 0
    # λ·per_token bounds each float32 log-prob's share of the mean; the two float32 losses round
    # at their size
    atol = 0.2 * 2 * per_token + 4 * EPS32 * (abs(float(loss_plain.detach())) + expected)
    assert float((loss_ours - loss_plain).detach()) == pytest.approx(expected, abs=atol)
    assert ours._metrics["train"]["rule/penalty"][-1] == pytest.approx(expected, abs=atol)


def test_rules_with_a_trl_knob_need_it_set(tmp_path, tokenizer):
    """Clip-Higher, Dr. GRPO and the entropy mask are TRL's own: the rule checks the GRPOConfig."""
    with pytest.raises(ValueError, match=r"GRPOConfig\(epsilon_high=0.28\)"):
        make_trainer(tmp_path, tokenizer, rule="clip_higher")
    assert (
        make_trainer(
            tmp_path, tokenizer, rule="clip_higher", config={"epsilon_high": 0.28}
        ).rule.name
        == "clip_higher"
    )
    with pytest.raises(ValueError, match=r"GRPOConfig\(loss_type='dr_grpo'\)"):
        make_trainer(tmp_path, tokenizer, rule="dr_grpo")
    with pytest.raises(ValueError, match=r"GRPOConfig\(scale_rewards='none'\)"):
        make_trainer(tmp_path, tokenizer, rule="dr_grpo", config={"loss_type": "dr_grpo"})
    make_trainer(
        tmp_path,
        tokenizer,
        rule="dr_grpo",
        config={"loss_type": "dr_grpo", "scale_rewards": "none"},
    )
    with pytest.raises(ValueError, match=r"GRPOConfig\(top_entropy_quantile=0.2\)"):
        make_trainer(tmp_path, tokenizer, rule="high_entropy")
    make_trainer(tmp_path, tokenizer, rule="high_entropy", config={"top_entropy_quantile": 0.2})
    with pytest.raises(ValueError, match=r"nthr=NTHRConfig\(beta=-inf\)"):
        make_trainer(tmp_path, tokenizer, rule="nthr_all")
    with pytest.raises(ValueError, match="together"):
        make_trainer(tmp_path, tokenizer, rule="nsr", nthr=SELECTIVE)
    with pytest.raises(ValueError, match="unknown update rule 'ppo'"):
        make_trainer(tmp_path, tokenizer, rule="ppo")


def test_high_entropy_mask_is_trls():
    """grpo.high_entropy_mask against TRL's GRPOTrainer.get_high_entropy_mask on one process."""
    gen = torch.Generator().manual_seed(0)
    entropy = torch.randint(0, 6, (5, 7), generator=gen).float() / 2  # many ties
    mask = torch.rand(5, 7, generator=gen) > 0.3
    one_process = SimpleNamespace(
        accelerator=SimpleNamespace(pad_across_processes=lambda t, **kw: t, gather=lambda t: t)
    )
    for rho in (0.0, 0.2, 0.5, 1.0):  # TRL's argument is the quantile 1 - ρ
        theirs = GRPOTrainer.get_high_entropy_mask(one_process, entropy, mask, 1 - rho)
        assert torch.equal(grpo.high_entropy_mask(entropy, mask, rho), theirs), rho
