"""NTHRGRPOTrainer (nthr_book.integrations.trl, arXiv 2505.18830) against TRL's GRPOTrainer and nthr_book.nthr.

Tiny random Llama, 2 prompts x G=4 completions of 8 tokens, a token-id-parity reward (mixed groups).
Three layouts, as TRL 1.16 runs them: "fused" (TRL skips the old-policy pass and one micro-batch holds the
generation batch: NTHR reads the compute_loss forward), "old_pass" (num_iterations=2: TRL runs the
old-policy pass, NTHR reads it), "extra_pass" (steps_per_generation=2: one extra no-grad pass).
"""

from __future__ import annotations

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

pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from nthr_book.integrations.trl import (  # noqa: E402
    LLDCallback,
    NTHRConfig,
    NTHRGRPOTrainer,
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
    "extra_pass": {"steps_per_generation": 2, "gradient_accumulation_steps": 2, "per_device_train_batch_size": 4},
}
SELECTIVE = NTHRConfig(beta=1.0, eta=0.5, exclude_self=True)  # selects part of the tokens on this model


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny-random")


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


def parity_reward(completions, completion_ids, **kwargs) -> list[float]:
    """1.0 when the sum of the completion's token ids is odd."""
    return [float(sum(ids) % 2) for ids in completion_ids]


def make_trainer(tmp_path, tokenizer, cls=NTHRGRPOTrainer, mode="fused", lr=1e-6, config=None, **kwargs):
    overrides = {"per_device_train_batch_size": 8, "use_cpu": True, "bf16": False} | MODES[mode] | (config or {})
    args = GRPOConfig(output_dir=str(tmp_path / "out"), num_generations=G, max_completion_length=8,
                      report_to="none", save_strategy="no", logging_steps=1, seed=0, max_steps=1,
                      learning_rate=lr, **overrides)
    trainer = cls(model=tiny_random_model(seed=0), reward_funcs=parity_reward, args=args,
                  train_dataset=Dataset.from_dict({"prompt": PROMPTS}), processing_class=tokenizer, **kwargs)
    trainer.current_gradient_accumulation_steps = args.gradient_accumulation_steps  # set by train()
    trainer.model.train()
    return trainer


def generate(trainer) -> dict:
    torch.manual_seed(0)
    return trainer._generate_and_score_completions(BATCH)


def token_advantages(trainer, out: dict) -> torch.Tensor:
    """The (B, T) advantages TRL's loss sees (after compute_loss for the fused layout)."""
    if bool(out["nthr_fused"]):
        batch = dict(out)
        trainer.compute_loss(trainer.model, batch)
        return batch["advantages"]
    return out["advantages"]


def reference(model, out: dict, cfg: NTHRConfig, bf16: bool = False) -> tuple[torch.Tensor, dict]:
    """nthr_book.nthr's hook on the same group-major batch, with hidden states from a separate forward."""
    T = out["completion_ids"].shape[1]
    mask = out["completion_mask"].bool()
    device = out["completion_ids"].device.type
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):  # the forward only
        ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
        att = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
        hidden = model.model(input_ids=ids, attention_mask=att).last_hidden_state[:, -T - 1:-1]  # (B, T, d)
    rewards = ((out["completion_ids"] * mask).sum(-1) % 2).float()  # the reward, recomputed
    torch.testing.assert_close(out["nthr_reward"], rewards)
    A = out["seq_advantages"]
    ctx = SimpleNamespace(advantages=A[:, None].expand(-1, T).clone(), rewards=rewards.view(-1, G), group_size=G,
                          completion_ids=out["completion_ids"], completion_mask=mask, hidden=hidden,
                          lm_head_weight=model.lm_head.weight.detach(), lm_head_bias=None, temperature=1.0)
    return nthr_advantage_fn(cfg)(ctx)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("nthr", [None, NTHRConfig(beta=math.inf)], ids=["none", "beta_inf"])
def test_selecting_nothing_is_plain_grpo_exactly(tmp_path, tokenizer, mode, nthr):
    ours = make_trainer(tmp_path, tokenizer, NTHRGRPOTrainer, mode, nthr=nthr)
    plain = make_trainer(tmp_path, tokenizer, GRPOTrainer, mode)
    out = generate(ours)
    old_pass = mode == "old_pass"  # TRL 1.16 runs the old-policy pass only there
    assert trl_runs_old_pass(ours.args, False, True) is old_pass and ("old_per_token_logps" in out) is old_pass
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
    for (name, p), (_, q) in zip(ours.model.named_parameters(), plain.model.named_parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), name
        n_nonzero += int(bool(p.grad.abs().sum() > 0))
    assert n_nonzero > 0


@pytest.mark.parametrize("mode", list(MODES))
def test_token_advantages_equal_nthr_book(tmp_path, tokenizer, mode):
    ours = make_trainer(tmp_path, tokenizer, NTHRGRPOTrainer, mode, nthr=SELECTIVE)
    out = generate(ours)
    adv = token_advantages(ours, out)
    expected, metrics = reference(ours.model, out, SELECTIVE)
    torch.testing.assert_close(adv, expected)
    logged = ours._metrics["train"]
    assert 0.0 < logged["nthr/selected_frac"][-1] < 1.0  # a selection that tests something
    for key in ("nthr/selected_frac", "nthr/tau_mean", "nthr/eta_mean", "nthr/mixed_groups"):
        assert logged[key][-1] == pytest.approx(metrics[key], rel=1e-5), key


def test_full_vocabulary_log_sum_exp_option(tmp_path, tokenizer):
    """scores_from_logps=False: the scorer forms the full-vocabulary log-sum-exp, as nthr_book's hook does."""
    ours = make_trainer(tmp_path, tokenizer, NTHRGRPOTrainer, "old_pass", nthr=SELECTIVE, scores_from_logps=False)
    out = generate(ours)
    expected, _ = reference(ours.model, out, SELECTIVE)
    torch.testing.assert_close(out["advantages"], expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["fused", "old_pass"])
def test_cuda_bf16_token_advantages(tmp_path, tokenizer, mode):
    """On CUDA in bf16 autocast, NTHR's advantages agree with nthr_book's hook on the same batch."""
    ours = make_trainer(tmp_path, tokenizer, NTHRGRPOTrainer, mode, nthr=SELECTIVE,
                        config={"use_cpu": False, "bf16": True})
    assert not ours.scores_from_logps  # bf16 log-probs would carry the bf16 logits' rounding into q
    out = generate(ours)
    assert out["completion_ids"].is_cuda
    adv = token_advantages(ours, out)
    expected, metrics = reference(ours.model, out, SELECTIVE, bf16=True)
    agree = ((adv - expected).abs() <= 1e-4 + 1e-3 * expected.abs()).float().mean().item()
    print(f"{mode}: {agree:.4f} of the token advantages agree, selected_frac "
          f"{ours._metrics['train']['nthr/selected_frac'][-1]:.3f} vs {metrics['nthr/selected_frac']:.3f}")
    assert agree >= 0.99, f"only {agree:.3f} of the token advantages agree"
    assert 0.0 < ours._metrics["train"]["nthr/selected_frac"][-1] < 1.0


def test_beta_minus_inf_eta_zero_by_hand(tmp_path, tokenizer):
    cfg = NTHRConfig(beta=-math.inf, eta=0.0)  # every token of an incorrect response of a mixed group -> 0
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


def _seq_logp(model, rec: dict) -> torch.Tensor:
    """(B,) ln π(y|x) by a plain HF forward (full logits), temperature 1."""
    T = rec["completion_ids"].shape[1]
    ids = torch.cat([rec["prompt_ids"], rec["completion_ids"]], 1)
    att = torch.cat([rec["prompt_mask"], rec["completion_mask"]], 1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=att).logits[:, -T - 1:-1].float()
    logps = torch.log_softmax(logits, -1).gather(-1, rec["completion_ids"][..., None]).squeeze(-1)
    return (logps * rec["completion_mask"]).sum(-1)


def test_lld_metrics_match_recomputation(tmp_path, tokenizer):
    lld = LLDCallback(eps=0.0)
    ours = make_trainer(tmp_path, tokenizer, NTHRGRPOTrainer, "fused", lr=1e-3, nthr=SELECTIVE, record_nthr=True,
                        callbacks=[lld])
    assert lld.trainer is ours and sum(isinstance(c, LLDCallback) for c in ours.callback_handler.callbacks) == 1
    ours.train()
    rec, log = ours.nthr_record, ours.state.log_history[0]
    correct = rec["rewards"] > 0.5
    delta = (_seq_logp(ours.model, rec) - _seq_logp(tiny_random_model(seed=0), rec))[correct]
    assert log["lld/n_correct"] == correct.sum().item()
    assert log["lld/delta_mean"] == pytest.approx(delta.mean().item(), rel=1e-3, abs=1e-4)
    assert log["lld/rate"] == pytest.approx((delta <= 0).float().mean().item())
    assert 0.0 < log["nthr/selected_frac"] < 1.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_score_whole_groups(tmp_path):
    """2 CPU processes (gloo), 6 rows each, G=4: group 1 = rows 4-7 straddles the processes."""
    dump = tmp_path / "dump"
    # accelerate 1.15 spawns CPU processes only through torch.distributed.run (--multi_gpu) or mpirun;
    # GRPOConfig(use_cpu=True) in the script keeps them on CPU with the gloo backend.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), str(ROOT / "scripts" / "train_trl.py"),
           "--model", "tiny-random", "--task", "toy", "--steps", "2", "--num-generations", str(G),
           "--per-device-batch", "6", "--max-completion-length", "8", "--nthr-beta", "1", "--nthr-eta", "0.5",
           "--nthr-exclude-self", "--seed", "1", "--output-dir", str(tmp_path / "out"), "--dump-dir", str(dump)]
    env = os.environ | {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]

    logs = json.loads((dump / "log_history.json").read_text())
    assert logs["world_size"] == 2
    for row in logs["log_history"][:2]:
        assert math.isfinite(row["nthr/selected_frac"]) and math.isfinite(row["lld/delta_mean"])

    # Step 1 is scored before any update: recompute it in one process with the initial weights.
    model = tiny_random_model(seed=0)
    recs = [torch.load(dump / f"step1_rank{r}.pt") for r in (0, 1)]
    width = max(r["completion_ids"].shape[1] for r in recs)
    merged = {k: [] for k in ("rows", "completion_ids", "completion_mask", "hidden", "seq_advantages")}
    for r, rec in enumerate(recs):
        assert sorted(rec["rows"].tolist()) == list(range(6 * r, 6 * r + 6))
        T = rec["completion_ids"].shape[1]
        with torch.no_grad():
            ids = torch.cat([rec["prompt_ids"], rec["completion_ids"]], 1)
            att = torch.cat([rec["prompt_mask"], rec["completion_mask"]], 1)
            hidden = model.model(input_ids=ids, attention_mask=att).last_hidden_state[:, -T - 1:-1]
        torch.testing.assert_close(rec["hidden"], hidden)  # the captured states are the policy pass's
        parity = ((rec["completion_ids"] * rec["completion_mask"]).sum(-1) % 2).float()
        torch.testing.assert_close(rec["rewards"], parity)
        pad = width - T
        merged["rows"].append(rec["rows"])
        merged["completion_ids"].append(torch.nn.functional.pad(rec["completion_ids"], (0, pad), value=2))
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
    ctx = SimpleNamespace(advantages=full["seq_advantages"][:, None].expand(-1, width).clone(),
                          rewards=rewards.view(-1, G), group_size=G, completion_ids=full["completion_ids"],
                          completion_mask=mask, hidden=full["hidden"], lm_head_weight=model.lm_head.weight.detach(),
                          lm_head_bias=None, temperature=1.0)
    expected, metrics = nthr_advantage_fn(SELECTIVE)(ctx)
    for rec in recs:
        T = rec["completion_ids"].shape[1]
        torch.testing.assert_close(rec["advantages"], expected[rec["rows"], :T])
    assert logs["log_history"][0]["nthr/selected_frac"] == pytest.approx(metrics["nthr/selected_frac"], rel=1e-5)
    assert logs["log_history"][0]["nthr/mixed_groups"] == metrics["nthr/mixed_groups"]


def test_math_answer_reward_in_trls_calling_convention():
    completions = ["2 + 2 = 4. The answer is \\boxed{4}.", [{"role": "assistant", "content": "\\boxed{5}"}], "4"]
    # TRL passes the dataset's columns (answer, possibly ints) and its own keywords
    assert math_answer_reward(completions, answer=[4, "4", "4"], prompts=["p"] * 3) == [1.0, 0.0, 0.0]
    assert math_answer_reward(completions[2:], answer=["4"], require_boxed=False) == [1.0]  # unboxed allowed


def test_prompt_dataset_columns(tokenizer):
    from nthr_book.data import build_prompt

    problems = [{"id": "a", "problem": "What is 3 + 4?", "answer": 7}, {"id": "b", "problem": "What is 2 * 5?",
                                                                         "answer": "10"}]
    ds = prompt_dataset(problems, tokenizer, "arithmetic")
    assert ds.column_names == ["prompt", "answer"] and ds["answer"] == ["7", "10"]
    assert ds["prompt"][1] == build_prompt(tokenizer, "What is 2 * 5?", "arithmetic")
