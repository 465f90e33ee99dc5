"""Trainer: config validation, one real loop on tiny-random, resume equals an uninterrupted run.

Tolerances are rounding bounds derived from the unit roundoff (F32) and the number of terms.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

import nthr_book.trainer as trainer_mod
from nthr_book import grpo, nthr, rules
from nthr_book.models import tiny_random_model
from nthr_book.trainer import (
    METRIC_COLUMNS,
    GRPOTrainer,
    TrainConfig,
    float32_logps,
    make_advantage_fn,
    read_metrics,
    train,
)

F32 = 2.0**-24  # float32 unit roundoff


def parity_reward(completions: list[str], answers: list[str]) -> list[float]:
    """A deterministic stand-in grader that makes mixed groups on a random model: even length
    wins."""
    return [float(len(c) % 2 == 0) for c in completions]


def tiny(tmp_path, **kw) -> TrainConfig:
    base = dict(
        model="tiny-random",
        task="arithmetic",
        num_problems=16,
        steps=4,
        prompts_per_step=2,
        group_size=4,
        max_new_tokens=6,
        lr=1e-3,
        kl_coef=1e-2,
        checkpoint_every=2,
        output_dir=str(tmp_path / "run"),
        seed=3,
    )
    return TrainConfig(**(base | kw))


@pytest.mark.parametrize(
    "field,value,words",
    [
        ("group_size", 1, "group_size"),
        ("mini_batch_prompts", 3, "mini_batch_prompts"),
        ("agg", "sum", "agg"),
        ("method", "ppo", "method"),
        ("temperature", 0.0, "temperature"),
        ("lr", -1.0, "lr"),
        ("nthr_anchor", "mine", "nthr_anchor"),
    ],
)
def test_bad_config_names_the_field(field, value, words):
    with pytest.raises(ValueError, match=f"TrainConfig.{words}"):
        TrainConfig(**{field: value, "prompts_per_step": 4})


def test_presets_follow_the_paper_table():
    paper = TrainConfig.paper_qwen_0_5b()
    assert (paper.prompts_per_step, paper.mini_batch_prompts, paper.lr, paper.group_size) == (
        32,
        16,
        5e-7,
        8,
    )
    assert (paper.temperature, paper.clip_eps, paper.kl_coef, paper.max_new_tokens) == (
        1.0,
        0.2,
        1e-4,
        2500,
    )
    assert paper.model == "Qwen/Qwen2.5-0.5B-Instruct" and paper.task == "math"
    fast = TrainConfig.fast()
    assert fast.model == "smollm2-135m" and fast.task == "arithmetic"
    assert TrainConfig.from_dict(paper.to_dict()) == paper


@pytest.mark.slow
def test_train_writes_metrics_and_model(tmp_path):
    run = train(tiny(tmp_path), reward_fn=parity_reward, progress=False)
    df = read_metrics(run / "metrics.csv")
    assert list(df["step"]) == [0, 1, 2, 3]
    assert set(METRIC_COLUMNS) <= set(df.columns)
    assert ((df["accuracy"] >= 0) & (df["accuracy"] <= 1)).all()
    assert (run / "model" / "config.json").exists()
    assert not (run / "checkpoint.pt").exists(), (
        "a finished run keeps model/ only, not the optimizer state"
    )
    used = df["groups_used"] > 0
    assert used.any(), "the parity reward should give mixed groups"
    assert df.loc[used, "kl"].notna().all() and df.loc[used, "lld/rate"].between(0, 1).all()


@pytest.mark.slow
def test_existing_run_is_not_overwritten(tmp_path):
    cfg = tiny(tmp_path, steps=1)
    train(cfg, reward_fn=parity_reward, progress=False)
    with pytest.raises(FileExistsError, match="resume=True"):
        train(cfg, reward_fn=parity_reward, progress=False)
    with pytest.raises(ValueError, match="lr"):
        train(cfg.replace(lr=1e-2), reward_fn=parity_reward, resume=True, progress=False)


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra", [{}, {"mini_batch_prompts": 1, "num_iterations": 2, "method": "nthr"}]
)
def test_resume_after_kill_matches_uninterrupted(tmp_path, extra):
    full = train(tiny(tmp_path / "a", **extra), reward_fn=parity_reward, progress=False)

    def kill_at_step_2(step, row):
        if step == 2:
            raise KeyboardInterrupt

    cfg = tiny(tmp_path / "b", **extra)
    ran: list[int] = []  # the steps each call executes
    record = lambda step, row: ran.append(step)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, reward_fn=parity_reward, callbacks=[record, kill_at_step_2], progress=False)
    assert ran == [0, 1, 2]
    ran.clear()
    resumed = train(cfg, reward_fn=parity_reward, resume=True, callbacks=[record], progress=False)
    # the checkpoint of step 2 (checkpoint_every=2) is read: the resumed call runs steps 2 and 3
    # only; a resume that restarted from step 0 would run all four, seeded the same way, and
    # leave the same metrics and weights as the uninterrupted run
    assert ran == [2, 3]
    a, b = read_metrics(full / "metrics.csv"), read_metrics(resumed / "metrics.csv")
    cols = [c for c in a.columns if not c.startswith("time_")]
    pd.testing.assert_frame_equal(a[cols], b[cols], check_exact=True)  # the same run, bit for bit
    wa, wb = final_weights(full), final_weights(resumed)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_the_loop_written_out_in_notebook_01_is_train_bit_for_bit(tmp_path):
    """Notebook 01's "GRPO by hand" (sample, grade, advantages, policy_loss, AdamW) leaves the
    weights that train() leaves, to the last bit, on the CPU (``device``)."""
    from nthr_book.data import build_prompt
    from nthr_book.env import set_seed
    from nthr_book.models import load_policy
    from nthr_book.rollout import generate_groups
    from nthr_book.trainer import task_defaults, training_problems

    cfg = tiny(tmp_path, kl_coef=0.0, steps=3)
    set_seed(cfg.seed)
    model, tokenizer = load_policy(cfg.model, device="cpu")
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, betas=cfg.adam_betas, weight_decay=0.0
    )
    template, _ = task_defaults(cfg)
    pool, updates = training_problems(cfg), 0
    for step in range(cfg.steps):
        n = cfg.prompts_per_step
        problems = [pool[(step * n + i) % len(pool)] for i in range(n)]
        prompts = [build_prompt(tokenizer, p["problem"], template) for p in problems]
        ro = generate_groups(
            model,
            tokenizer,
            prompts,
            cfg.group_size,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            seed=cfg.seed * 1_000_003 + step,
        )
        golds = [p["answer"] for p in problems for _ in range(cfg.group_size)]
        rewards = torch.tensor(parity_reward(ro.texts, golds)).view(-1, cfg.group_size)
        mixed = grpo.mixed_group_mask(rewards).nonzero().flatten().tolist()
        if not mixed:
            continue
        ro, rewards = ro.select_groups(mixed), rewards[mixed]
        advantages = grpo.expand_advantages(grpo.group_advantages(rewards), ro.completion_mask)
        model.train()
        logps = grpo.per_token_logps(
            model,
            ro.input_ids,
            ro.attention_mask,
            ro.completion_mask,
            temperature=cfg.temperature,
            group_size=cfg.group_size,
        )
        loss, _ = grpo.policy_loss(
            logps.float(),
            logps.detach().float(),
            advantages,
            ro.completion_mask,
            clip_eps=cfg.clip_eps,
            kl_coef=0.0,
            agg="token",
            max_completion_length=cfg.max_new_tokens,
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        model.eval()
        updates += 1
    assert updates >= 2, "the parity reward should give mixed groups on most steps"
    run = train(cfg, reward_fn=parity_reward, progress=False, device="cpu")
    saved, mine = final_weights(run), model.state_dict()
    assert set(saved) <= set(mine)
    assert all(torch.equal(saved[k], mine[k]) for k in saved), "the loop is not train()'s"


def final_weights(run):
    from safetensors.torch import load_file

    return load_file(run / "model" / "model.safetensors")


def _no_trainer(*args, **kwargs):
    raise AssertionError("a finished run is returned as it is: no GRPOTrainer, no model load")


@pytest.mark.slow
def test_finished_run_extends_only_with_its_checkpoint(tmp_path, monkeypatch):
    straight = train(tiny(tmp_path / "a"), reward_fn=parity_reward, progress=False)
    short = tiny(tmp_path / "b", steps=2, keep_checkpoint=True)
    train(short, reward_fn=parity_reward, progress=False)
    assert (short.run_dir() / "checkpoint.pt").exists()
    ran: list[int] = []
    extended = train(
        short.replace(steps=4),
        reward_fn=parity_reward,
        resume=True,
        callbacks=[lambda step, row: ran.append(step)],
        progress=False,
    )
    assert ran == [2, 3], "extending from the checkpoint of step 2 runs steps 2 and 3 only"
    assert list(read_metrics(extended / "metrics.csv")["step"]) == [0, 1, 2, 3]
    wa, wb = final_weights(straight), final_weights(extended)
    assert all(torch.equal(wa[k], wb[k]) for k in wa), (
        "2 + 2 steps from the checkpoint equal 4 straight steps"
    )

    dropped = tiny(tmp_path / "c", steps=2)
    train(dropped, reward_fn=parity_reward, progress=False)
    with monkeypatch.context() as m:
        m.setattr(trainer_mod, "GRPOTrainer", _no_trainer)  # reuse builds nothing
        assert train(dropped, reward_fn=parity_reward, resume=True, progress=False) == (
            dropped.run_dir()
        )
    with pytest.raises(ValueError, match="keep_checkpoint=True"):
        train(dropped.replace(steps=4), reward_fn=parity_reward, resume=True, progress=False)
    # fewer steps than the finished run: its final model is not the shorter run's, so it is refused
    with pytest.raises(ValueError, match="finished run of 2 steps, more than steps=1"):
        train(dropped.replace(steps=1), reward_fn=parity_reward, resume=True, progress=False)


@pytest.mark.slow
def test_a_run_without_its_model_is_the_same_run_and_is_reused(tmp_path, monkeypatch):
    saved = train(tiny(tmp_path / "a", steps=2), reward_fn=parity_reward, progress=False)
    light_cfg = tiny(tmp_path / "b", steps=2, save_model=False)
    light = train(light_cfg, reward_fn=parity_reward, progress=False)
    assert not (light / "model").exists() and not (light / "checkpoint.pt").exists()
    assert json.loads((light / "finished.json").read_text()) == {"steps": 2, "model_saved": False}
    a, b = read_metrics(saved / "metrics.csv"), read_metrics(light / "metrics.csv")
    timing = [c for c in a if c.startswith("time_")]
    assert a.drop(columns=timing).equals(b.drop(columns=timing))  # weights kept or not: one run
    with monkeypatch.context() as m:
        m.setattr(trainer_mod, "GRPOTrainer", _no_trainer)  # finished.json marks it complete
        assert train(light_cfg, reward_fn=parity_reward, resume=True, progress=False) == light
    with pytest.raises(ValueError, match="keep_checkpoint=True"):
        train(light_cfg.replace(steps=3), reward_fn=parity_reward, resume=True, progress=False)
    assert (light / "finished.json").exists()  # a refused extension leaves the run complete
    with pytest.raises(ValueError, match="finished without its model"):  # no weights to give
        train(light_cfg.replace(save_model=True), reward_fn=parity_reward, resume=True)


@pytest.mark.slow
def test_nthr_hook_receives_old_policy_hidden_states(tmp_path):
    seen = []

    def spy(ctx):
        seen.append((ctx.hidden.shape, ctx.advantages.clone(), ctx.completion_mask.clone()))
        return ctx.advantages * 0.5, {"spy/calls": 1.0}

    run = train(tiny(tmp_path, steps=2), advantage_fn=spy, reward_fn=parity_reward, progress=False)
    assert seen and all(shape[-1] == 64 for shape, _, _ in seen)
    df = read_metrics(run / "metrics.csv")
    assert "spy/calls" in df.columns
    for _, adv, mask in seen:  # group advantages expanded per token, zero on padding
        assert torch.all(adv[~mask] == 0)


@pytest.mark.slow
def test_pos_only_has_no_negative_signal(tmp_path):
    seen = []

    def spy(ctx):
        seen.append(ctx.advantages.clone())
        return ctx.advantages, {}

    train(
        tiny(tmp_path, steps=2, method="pos_only"),
        advantage_fn=spy,
        reward_fn=parity_reward,
        progress=False,
    )
    assert seen and all(bool((a >= 0).all()) for a in seen)
    assert any(bool((a > 0).any()) for a in seen)


@pytest.mark.slow
def test_metrics_nan_when_no_mixed_group(tmp_path):
    run = train(tiny(tmp_path, steps=1), reward_fn=lambda c, a: [0.0] * len(c), progress=False)
    row = read_metrics(run / "metrics.csv").iloc[0]
    assert row["groups_used"] == 0 and row["frac_homogeneous"] == 1 and math.isnan(row["loss"])


# ------------------------------------------------------------------ homogeneous groups, by rule


def all_wrong(completions: list[str], answers: list[str]) -> list[float]:
    return [0.0] * len(completions)


def _spied_updates(monkeypatch) -> list[tuple]:
    """Patch GRPOTrainer._update to record (rollouts, rewards, per-token ln π before, after)."""
    seen: list[tuple] = []
    real_update = GRPOTrainer._update

    def spy(self, ro, rewards, row, times):
        with torch.no_grad():
            before = self._logps(self.model, ro).double()
        real_update(self, ro, rewards, row, times)
        with torch.no_grad():
            after = self._logps(self.model, ro).double()
        seen.append((ro, rewards.clone(), before, after))

    monkeypatch.setattr(GRPOTrainer, "_update", spy)
    return seen


def test_nsr_trains_on_all_wrong_groups_and_grpo_drops_them(tmp_path, monkeypatch):
    """NSR's code pushes an all-wrong group down with -1 (no baseline): the trainer keeps it for
    NSR (rules.Rule.keeps_homogeneous), the step moves the weights and lowers the answers' ln π;
    GRPO's dynamic sampling drops the same groups, and its weights stay put."""
    assert rules.get("nsr").keeps_homogeneous and rules.get("w_reinforce").keeps_homogeneous
    assert not rules.get("grpo").keeps_homogeneous and not rules.get("nthr").keeps_homogeneous
    seen = _spied_updates(monkeypatch)
    rows, moved = {}, {}
    for method in ("nsr", "grpo"):
        cfg = tiny(tmp_path / method, steps=1, method=method, kl_coef=0.0)
        trainer = GRPOTrainer(cfg, reward_fn=all_wrong, device="cpu")
        start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        rows[method] = trainer.train_step(0)
        end = trainer.model.state_dict()
        moved[method] = any(not torch.equal(start[k], end[k]) for k in start)
    nsr, grpo_row = rows["nsr"], rows["grpo"]
    assert (nsr["sampling/mixed"], nsr["groups_used"], nsr["sampling/homogeneous_used"]) == (
        0,
        2,
        2,
    )
    assert moved["nsr"] and nsr["updates"] == 1 and math.isfinite(nsr["loss"])
    assert len(seen) == 1  # only NSR's step reached the update
    ro, rewards, before, after = seen[0]
    assert rewards.eq(0).all() and rewards.shape == (2, 4)
    mask = ro.completion_mask.bool()
    # every token has A = -1: the loss is the mean ratio over the valid tokens, and the step
    # lowered it; the answers' ln π fell, summed and on most answers
    change = ((after - before) * mask).sum(-1)  # (8,) Δ ln π per answer
    assert float((after - before).exp()[mask].mean()) < 1.0
    assert float(change.sum()) < 0 and int((change < 0).sum()) >= 6
    # no right answer in a mixed group: nothing for the LLD measure
    assert nsr["lld/n_correct"] == 0 and math.isnan(nsr["lld/delta_mean"])
    assert (grpo_row["groups_used"], grpo_row["sampling/homogeneous_used"]) == (0, 0)
    assert not moved["grpo"] and "loss" not in grpo_row  # no update: no loss (NaN in the CSV)


def test_lld_is_measured_on_the_mixed_groups_right_answers(tmp_path, monkeypatch):
    """NSR keeps an all-right group too; the LLD measure reads only the mixed group's right
    answers, as for every other rule (the all-right group's answers are not what LLD is about)."""
    seen = _spied_updates(monkeypatch)

    def one_mixed_one_right(completions, answers):  # group 0: right, wrong, right, wrong; 1: right
        return [float(i >= 4 or i % 2 == 0) for i in range(len(completions))]

    cfg = tiny(tmp_path, steps=1, method="nsr", kl_coef=0.0)
    row = GRPOTrainer(cfg, reward_fn=one_mixed_one_right, device="cpu").train_step(0)
    assert row["groups_used"] == 2 and row["sampling/homogeneous_used"] == 1
    assert row["lld/n_correct"] == 2  # rows 0 and 2, not the all-right group's 4
    ro, _, before, after = seen[0]
    mask = ro.completion_mask.double()
    delta = ((after - before) * mask).sum(-1)  # (8,) in float64, from the spy's own passes
    # the trainer's float32 sums of ~6 terms of |ln π| < 20: a few hundred float32 roundings
    assert row["lld/delta_mean"] == pytest.approx(float(delta[[0, 2]].mean()), abs=1e-4)
    assert row["lld/rate"] == float((delta[[0, 2]] <= 0).double().mean())


def test_a_rule_that_keeps_every_group_refuses_a_refill():
    with pytest.raises(ValueError, match="TrainConfig.refill_max_rounds.*keeps homogeneous"):
        TrainConfig(method="nsr", refill_max_rounds=2)


# ------------------------------------------------------------------ dynamic sampling, DAPO's refill


class FirstRoundMostlyHomogeneous:
    """Reward stand-in: the first sampling round has one mixed group (the rest all wrong); later
    rounds have every group mixed, or none when ``later_mixed`` is False. Mixed: 1, 0, 1, 0, ..."""

    def __init__(self, group_size: int, later_mixed: bool = True):
        self.group_size, self.later_mixed, self.calls = group_size, later_mixed, 0

    def __call__(self, completions: list[str], answers: list[str]) -> list[float]:
        self.calls += 1
        mixed_groups = (
            1
            if self.calls == 1
            else (len(completions) // self.group_size if self.later_mixed else 0)
        )
        return [
            float(i // self.group_size < mixed_groups and i % 2 == 0)
            for i in range(len(completions))
        ]


def _refill_trainer(tmp_path, reward, **kw):
    """A GRPOTrainer on tiny-random whose hook records the groups the update sees."""
    from nthr_book.trainer import GRPOTrainer

    seen: list[torch.Tensor] = []

    def spy(ctx):
        seen.append(ctx.rewards.clone())  # (num_groups, G) of the groups in the update
        return ctx.advantages, {}

    cfg = tiny(tmp_path, prompts_per_step=4, group_size=4, kl_coef=0.0, track_lld=False, **kw)
    trainer = GRPOTrainer(cfg, advantage_fn=spy, reward_fn=reward, device="cpu")
    sampled: list[tuple[int, list[str]]] = []
    plain_sample = trainer.sample

    def spy_sample(step, refill_round=0):
        out = plain_sample(step, refill_round)
        sampled.append((refill_round, [p["id"] for p in out[2]]))
        return out

    trainer.sample = spy_sample
    return trainer, seen, sampled


def test_refill_fills_the_batch_with_mixed_groups(tmp_path):
    from nthr_book.grpo import mixed_group_mask

    reward = FirstRoundMostlyHomogeneous(group_size=4)
    trainer, seen, sampled = _refill_trainer(tmp_path, reward, refill_max_rounds=3)
    row = trainer.train_step(0)
    # round 0: 1 mixed of 4; round 1: 4 more mixed, so 5 >= 4 and the refill stops after one round
    assert [r for r, _ in sampled] == [0, 1] and reward.calls == 2
    assert not set(sampled[0][1]) & set(sampled[1][1]), "a refill round samples new prompts"
    assert row["sampling/refill_rounds"] == 1 and row["sampling/prompts"] == 8
    assert row["sampling/mixed"] == 5 and row["groups_used"] == 4
    groups = torch.cat(seen)  # (groups in the update, G)
    assert groups.shape[0] == 4 and bool(mixed_group_mask(groups).all())
    # the same step again: the same refill prompts (seeded by seed, step and round)
    again, _, sampled_again = _refill_trainer(
        tmp_path, FirstRoundMostlyHomogeneous(4), refill_max_rounds=3
    )
    again.train_step(0)
    assert sampled_again == sampled


def test_refill_rounds_are_bounded_and_without_refill_the_batch_shrinks(tmp_path):
    reward = FirstRoundMostlyHomogeneous(group_size=4, later_mixed=False)
    trainer, seen, sampled = _refill_trainer(tmp_path / "refill", reward, refill_max_rounds=2)
    row = trainer.train_step(0)
    assert [r for r, _ in sampled] == [0, 1, 2] and reward.calls == 3  # at most 2 extra rounds
    assert row["sampling/refill_rounds"] == 2 and row["sampling/prompts"] == 12
    assert row["groups_used"] == 1 and torch.cat(seen).shape[0] == 1

    off, seen_off, sampled_off = _refill_trainer(tmp_path / "off", FirstRoundMostlyHomogeneous(4))
    row = off.train_step(0)
    assert [r for r, _ in sampled_off] == [0]
    assert row["sampling/refill_rounds"] == 0 and row["sampling/prompts"] == 4
    assert row["groups_used"] == 1 and torch.cat(seen_off).shape[0] == 1  # the update shrinks to 1


def test_refill_config_checks_and_old_configs_load():
    with pytest.raises(ValueError, match="TrainConfig.refill_max_rounds"):
        TrainConfig(refill_max_rounds=-1)
    with pytest.raises(ValueError, match="TrainConfig.refill_max_rounds.*dynamic_sampling"):
        TrainConfig(refill_max_rounds=2, dynamic_sampling=False)
    old = TrainConfig().to_dict()
    del old["refill_max_rounds"]  # a config.json written before the field existed
    assert TrainConfig.from_dict(old).refill_max_rounds == 0


# ---- NTHR options: the anchor ---------------------------------------------------------------


def test_nthr_anchor_reaches_the_hook_and_its_repr():
    for anchor in nthr.ANCHORS:
        hook = make_advantage_fn(TrainConfig(method="nthr", nthr_anchor=anchor))
        assert hook.config == nthr.NTHRConfig(anchor=anchor)
    hooks = [make_advantage_fn(TrainConfig(method="nthr", nthr_anchor=a)) for a in nthr.ANCHORS]
    assert len({repr(h) for h in hooks}) == 3  # finished runs with different anchors are told apart
    cfg = TrainConfig(nthr_anchor="other_responses")
    assert TrainConfig.from_dict(cfg.to_dict()).nthr_anchor == "other_responses"


def _finished_run(tmp_path, cfg: TrainConfig, drop: tuple[str, ...] = ()) -> None:
    """A run folder as train() leaves it (config.json, metrics.csv, model/); ``drop``: unsaved."""
    run = cfg.run_dir()
    (run / "model").mkdir(parents=True)
    saved = {k: v for k, v in cfg.to_dict().items() if k not in drop}
    record = {"config": saved, "advantage_fn": repr(make_advantage_fn(cfg))}
    (run / "config.json").write_text(json.dumps(record))
    pd.DataFrame({"step": range(cfg.steps)}).to_csv(run / "metrics.csv", index=False)


def test_a_run_saved_before_nthr_anchor_existed_is_reused(tmp_path, monkeypatch):
    cfg = tiny(tmp_path, method="nthr", steps=2)
    _finished_run(tmp_path, cfg, drop=("nthr_anchor",))  # older runs did not record the field
    monkeypatch.setattr(trainer_mod, "GRPOTrainer", _no_trainer)  # reuse loads no model
    reused = train(cfg, reward_fn=parity_reward, resume=True, progress=False)
    assert reused == cfg.run_dir()
    with pytest.raises(ValueError, match="nthr_anchor"):
        train(
            cfg.replace(nthr_anchor="other_responses"),
            reward_fn=parity_reward,
            resume=True,
            progress=False,
        )


# ---- bf16 autocast: NTHR reads float32 log-probs --------------------------------------------


def _logps_bound(hidden: torch.Tensor, weight: torch.Tensor, temperature: float) -> float:
    """Rounding bound of float32 log softmax(h·Wᵀ / T)[y] = z_y - m - log Σ exp(z - m).

    Each logit is an inner product of d terms (+2 for the scaling): (d + 2)·F32·S with S = max
    |h|·|W|/T, counted twice (z_y and the log-sum-exp); the sum of V positive terms has a relative
    error (V + 2)·F32, which the log turns into an absolute one; 4·F32·S for the subtractions.
    """
    h = hidden.double().abs().reshape(-1, hidden.shape[-1])  # (n, d)
    S = float((h @ weight.double().abs().T).max()) / temperature
    return (2 * (hidden.shape[-1] + 2) + 4) * F32 * S + (weight.shape[0] + 2) * F32


def _reference_logps(hidden, weight, ids, mask, temperature, softcap=None) -> torch.Tensor:
    """Float64 log softmax of the (capped) logits h·Wᵀ at the token ids, 0 off mask."""
    z = hidden.double() @ weight.double().T
    if softcap:
        z = torch.tanh(z / softcap) * softcap
    return torch.log_softmax(z / temperature, -1).gather(-1, ids[..., None]).squeeze(-1) * mask


def test_float32_logps_under_bf16_autocast_give_float64_scores():
    model = tiny_random_model(300, seed=1, hidden_size=16).eval()  # small d: tight float32 bounds
    with torch.no_grad():
        model.model.norm.weight.mul_(32.0)  # logits up to about 17 as in trained models (init: ~1)
    gen = torch.Generator().manual_seed(0)
    G, P, T, temp = 4, 3, 6, 0.9
    ids = torch.randint(3, 40, (G, T), generator=gen)  # V* a small part of the vocabulary
    mask = torch.arange(T)[None, :] < torch.tensor([6, 4, 5, 3])[:, None]
    input_ids = torch.cat([torch.randint(3, 300, (1, P), generator=gen).expand(G, P), ids], 1)
    attention = torch.cat([torch.ones(G, P, dtype=torch.long), mask.long()], 1)
    head = model.get_output_embeddings()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        bf16_logps, hidden = grpo.per_token_logps(
            model, input_ids, attention, mask, temperature=temp, return_hidden=True
        )
        ours = float32_logps(hidden, head, ids, mask, temperature=temp)  # inside it on purpose
    W = head.weight.detach()
    expected = _reference_logps(hidden, W, ids, mask, temp)
    bound = _logps_bound(hidden, W, temp)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), expected, rtol=0, atol=bound)
    assert (bf16_logps.double() - expected).abs().max() > 10 * bound  # what the hook used to read
    # NTHR scores from each: the float64 pair-by-pair reference, generated vocabulary
    correct = torch.tensor([True, False, True, False])
    logits = hidden.double() @ W.double().T / temp
    reference = nthr.token_scores_reference(hidden, logits, ids, mask, correct, vocab="generated")
    kw = dict(temperature=temp, vocab="generated")
    with_ours = nthr.token_scores_from_hidden(hidden, W, ids, mask, correct, logps=ours, **kw)
    with_bf16 = nthr.token_scores_from_hidden(hidden, W, ids, mask, correct, logps=bf16_logps, **kw)
    # A score sums n terms of inner products over |V*| and d coordinates: m·F32·Σ|terms| with
    # m = n + |V*| + d + 16. The log-sum-exp read off the log-probs is off by at most 2·bound (the
    # log-prob and z_y), so q by a relative 3·bound and g_y = 1 - q_y by q_y/(1 - q_y) times that:
    # 2 g's per term.
    q = torch.softmax(logits, -1)
    g = (torch.nn.functional.one_hot(ids, 300).double() - q)[..., torch.unique(ids[mask])]
    q_y = q.gather(-1, ids[..., None]).squeeze(-1)[mask]
    abs_terms = torch.einsum("itv,jkv->itjk", g.abs(), g.abs()) * torch.einsum(
        "itd,jkd->itjk", hidden.double().abs(), hidden.double().abs()
    )  # (G, T, G, T)
    scale = float((abs_terms * (mask & correct[:, None])).sum((-2, -1)).max())
    rel_g = 3 * bound * max(1.0, float((q_y / (1 - q_y)).max()))
    m = int(mask.sum()) + g.shape[-1] + hidden.shape[-1] + 16 + 2 * rel_g / F32
    tol = m * F32 * scale
    torch.testing.assert_close(with_ours.double(), reference, rtol=0, atol=tol)
    assert (with_bf16.double() - reference).abs().max() > 2 * tol  # beyond any float32 rounding


def _spy_on_nthr(seen: list):
    """An NTHR hook keeping a copy of each context it sees (the head is updated in place later)"""
    hook = nthr.nthr_advantage_fn(nthr.NTHRConfig(beta=0.0))

    def spy(ctx):
        seen.append(
            SimpleNamespace(
                **{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in vars(ctx).items()}
            )
        )
        return hook(ctx)

    return spy


@pytest.mark.slow
def test_trainer_hands_the_hook_float32_logps_under_bf16(tmp_path, monkeypatch):
    # bf16 autocast on CPU stands in for CUDA: the trainer's bf16 switch is made true here
    monkeypatch.setattr(GRPOTrainer, "_bf16", lambda self: self.cfg.bf16)
    seen = []
    # every group mixed: rows alternate wrong and right
    alternate = lambda completions, answers: [float(i % 2) for i in range(len(completions))]
    train(
        tiny(tmp_path, steps=2, bf16=True, method="nthr"),
        advantage_fn=_spy_on_nthr(seen),
        reward_fn=alternate,
        progress=False,
    )
    assert seen
    for ctx in seen:
        W, mask = ctx.lm_head_weight, ctx.completion_mask
        head = torch.nn.Linear(W.shape[1], W.shape[0], bias=False)
        head.weight.data.copy_(W)
        # the log-probs the hook reads are float32_logps of its hidden states (the training pass's
        # come from bf16 logits: they differ), and they are float64's up to float32 rounding
        assert ctx.old_logps.dtype == torch.float32 and ctx.softcap is None
        ours = float32_logps(ctx.hidden, head, ctx.completion_ids, mask, temperature=1.0)
        assert torch.equal(ctx.old_logps, ours)
        expected = _reference_logps(ctx.hidden, W, ctx.completion_ids, mask, 1.0)
        bound = _logps_bound(ctx.hidden, W, 1.0)
        torch.testing.assert_close(ctx.old_logps.double(), expected, rtol=0, atol=bound)


@pytest.mark.slow
def test_trainer_passes_the_models_softcap_to_the_hook(tmp_path):
    from nthr_book.models import load_policy

    model, tokenizer = load_policy("tiny-random", device="cpu")
    model.config.final_logit_softcapping = 2.0  # grpo.per_token_logps caps its log-probs with it
    seen = []
    train(
        tiny(tmp_path, steps=1, method="nthr"),
        advantage_fn=_spy_on_nthr(seen),
        reward_fn=parity_reward,
        model=model,
        tokenizer=tokenizer,
        progress=False,
    )
    assert seen and all(ctx.softcap == 2.0 for ctx in seen)
    for ctx in seen:  # the log-probs the hook reads its log-sum-exp from are the capped ones
        W, mask = ctx.lm_head_weight, ctx.completion_mask
        expected = _reference_logps(ctx.hidden, W, ctx.completion_ids, mask, 1.0, softcap=2.0)
        bound = _logps_bound(ctx.hidden, W, 1.0)  # tanh's slope is at most 1: this bound holds
        torch.testing.assert_close(ctx.old_logps.double(), expected, rtol=0, atol=bound)


@pytest.mark.slow
def test_shared_prompt_switch_gives_the_same_training_run(tmp_path):
    """share_prompt on (the default) and off: the same samples, losses, KL and LLD columns, within
    float32 rounding carried over 2 steps; NTHR's selection reads the same hidden states."""
    runs = {}
    for share in (True, False):
        cfg = tiny(tmp_path / str(share), steps=2, method="nthr", share_prompt=share)
        runs[share] = read_metrics(
            train(cfg, reward_fn=parity_reward, progress=False) / "metrics.csv"
        )
    on, off = runs[True], runs[False]
    assert list(on["reward_mean"]) == list(
        off["reward_mean"]
    )  # step 1 samples from the updated model
    for col in ("loss", "kl", "lld/delta_mean"):
        a, b = on[col].to_numpy(), off[col].to_numpy()
        scale = float(abs(b).max()) + 1.0
        # float32 sums of up to d + P + T terms in each of the 2 layers and the head, over 2 steps
        tol = 2 * 3 * (64 + 64) * F32 * 2 * scale
        assert abs(a - b).max() <= tol, (col, a, b)


# ------------------------------------------------------------------ the rules of nthr_book.rules


def _one_step_spied(tmp_path, monkeypatch, method, **kw):
    """One training step of ``method`` on tiny-random; every policy_loss call's inputs, and the
    rewards of the update with the policy's entropies before it."""
    calls, updates = [], []
    real_loss, real_update = trainer_mod.policy_loss, GRPOTrainer._update

    def loss_spy(logps, old_logps, advantages, mask, **kwargs):
        calls.append(
            SimpleNamespace(
                logps=logps.detach().clone(),
                old=old_logps.clone(),
                advantages=advantages.clone(),
                mask=mask.clone(),
                kwargs={
                    k: v.detach().clone() if isinstance(v, torch.Tensor) else v
                    for k, v in kwargs.items()
                },
            )
        )
        return real_loss(logps, old_logps, advantages, mask, **kwargs)

    def update_spy(self, ro, rewards, row, times):
        with torch.no_grad():  # the entropies of the policy before the update (float32)
            _, entropy = grpo.per_token_logps(
                self.model,
                ro.input_ids,
                ro.attention_mask,
                ro.completion_mask,
                temperature=self.cfg.temperature,
                group_size=ro.group_size,
                return_entropy=True,
            )
        updates.append(SimpleNamespace(rewards=rewards.clone(), entropy=entropy))
        return real_update(self, ro, rewards, row, times)

    monkeypatch.setattr(trainer_mod, "policy_loss", loss_spy)
    monkeypatch.setattr(GRPOTrainer, "_update", update_spy)
    cfg = tiny(tmp_path, steps=1, method=method, kl_coef=0.0, **kw)
    row = GRPOTrainer(cfg, reward_fn=parity_reward).train_step(0)
    return row, calls, updates


def _hand_sequence_advantages(method: str, rewards: list[float]) -> list[float]:
    """One group's per-response advantages as the papers define them (Python floats)."""
    G = len(rewards)
    mean = sum(rewards) / G
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / G)
    grpo_a = [(r - mean) / (std + 1e-6) for r in rewards]
    p = sum(r > 0.5 for r in rewards) / G
    return {
        "pos_only": [max(a, 0.0) for a in grpo_a],
        "neg_only": [min(a, 0.0) for a in grpo_a],
        "nsr": [0.0 if r > 0.5 else -1.0 for r in rewards],
        "w_reinforce": [0.1 if r > 0.5 else -1.0 for r in rewards],
        "dr_grpo": [r - mean for r in rewards],
        "nthr_all": [a if r > 0.5 else 2 * abs(0.5 - p) * a for a, r in zip(grpo_a, rewards)],
    }.get(method, grpo_a)


@pytest.mark.parametrize("method", [m for m in rules.names(trainable=True) if m != "nthr"])
def test_one_trainer_step_of_each_rule(tmp_path, monkeypatch, method):
    """The advantages, settings and penalty the loss receives are the rule's, by hand."""
    row, calls, updates = _one_step_spied(tmp_path, monkeypatch, method)
    assert len(calls) == 1 and len(updates) == 1 and math.isfinite(row["loss"])
    call, upd = calls[0], updates[0]
    rule = rules.get(method)
    assert call.kwargs["clip_eps_high"] == rule.settings().get("clip_eps_high")
    assert call.kwargs["agg"] == rule.settings().get("agg", "token")
    mask = call.mask.bool()
    G = upd.rewards.shape[1]
    seq = [a for g in upd.rewards.tolist() for a in _hand_sequence_advantages(method, g)]
    expected = torch.tensor(seq)[:, None].expand(mask.shape) * mask  # (N, T), 0 on padding
    if method == "high_entropy":  # the top 20% valid tokens by entropy keep theirs
        # (the entropies' formula is test_rules'; here: TRL's quantile rule on the right pass)
        flat = upd.entropy[mask].double()
        s, pos = flat.sort().values.tolist(), 0.8 * (len(flat) - 1)
        lo = math.floor(pos)
        threshold = s[lo] + (pos - lo) * (s[lo + 1] - s[lo])  # linear interpolation
        keep = (upd.entropy.double() >= threshold) & mask
        expected = torch.where(keep, expected, 0.0)
        assert row["rule/entropy_kept_frac"] == float(keep.sum()) / float(mask.sum())
        assert 0.15 < row["rule/entropy_kept_frac"] < 0.3  # about the top 20%
    # float32 A from the library against float64 by hand: a few roundings of |A| <= 2
    torch.testing.assert_close(call.advantages, expected.float(), rtol=0, atol=8 * F32 * 2)
    assert expected.abs().sum() > 0 and G == 4
    if rule.penalty is not None:  # fused step: the old policy is the current one, ratio 1
        assert call.kwargs["penalty"].eq(0).all() and row["rule/penalty"] == 0.0
    else:
        assert call.kwargs["penalty"] is None


def test_llds_acts_once_the_policy_has_moved(tmp_path, monkeypatch):
    """Two mini-batches: the second one's old log-probs predate the first step, so LLDS's
    token-gated penalty is nonzero there: λ·max(0, old - logp) on A >= 0 tokens, by hand."""
    row, calls, _ = _one_step_spied(tmp_path, monkeypatch, "llds_token", mini_batch_prompts=1)
    assert len(calls) == 2
    for k, call in enumerate(calls):
        pen = call.kwargs["penalty"]
        hand = torch.zeros_like(pen)
        for i, j in zip(*call.mask.nonzero(as_tuple=True)):
            drop = float(call.old[i, j]) - float(call.logps[i, j])
            if call.advantages[i, j] >= 0 and drop > 0:
                hand[i, j] = 0.2 * drop
        # the same float32 difference on both sides, times 0.2: one rounding
        torch.testing.assert_close(pen, hand, rtol=F32 * 2, atol=0)
        assert (pen.sum() > 0) == (k == 1)  # before the first step nothing has moved
    assert row["rule/penalty"] > 0


# ---- near negatives: training on wrong answers that resemble the right ones ---------------------

NEAR_A = "2 + 3 = 5. The answer is \\boxed{5}."  # ends with EOS
NEAR_B = "So \\boxed{5}"  # truncated: no EOS


def _near_batch(tok):
    """(rollouts, rewards (2, 4), problems): a mixed group [A, wrong, B, wrong] and an all-wrong
    group, as a sampled step would hand them over."""
    from nthr_book.groups import Group
    from nthr_book.rollout import Rollouts

    eos = tok.eos_token_id
    enc = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompt = enc("What is 2 + 3?")
    mixed = [enc(NEAR_A) + [eos], enc("no idea") + [eos], enc(NEAR_B), enc("\\boxed{6}") + [eos]]
    wrong = [enc(t) + [eos] for t in ("7", "it is 8", "\\boxed{9}", "none")]
    groups = [
        Group.from_token_lists(
            prompt,
            rows,
            rewards,
            pad_id=tok.pad_token_id,
            question_id=qid,
            answer="5",
            texts=[tok.decode(r, skip_special_tokens=True) for r in rows],
            truncated=[False, False, rows is mixed, False],
        )
        for qid, rows, rewards in (("a", mixed, [1, 0, 1, 0]), ("b", wrong, [0, 0, 0, 0]))
    ]
    ro = Rollouts.concat([g.rollouts for g in groups], pad_id=tok.pad_token_id)
    rewards = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0] * 4])
    return ro, rewards, [{"id": "a", "answer": "5"}, {"id": "b", "answer": "5"}]


def _rows(ro, group: int) -> list[list[int]]:
    G = ro.group_size
    return [
        ro.completion_ids[i][ro.completion_mask[i]].tolist()
        for i in range(group * G, (group + 1) * G)
    ]


def _prefix_share(wrong: list[int], rights: list[list[int]]) -> float:
    """By hand: the longest common prefix with any right answer over the wrong answer's length."""
    best = 0
    for right in rights:
        n = next(
            (k for k, (a, b) in enumerate(zip(wrong, right)) if a != b), min(len(wrong), len(right))
        )
        best = max(best, n)
    return best / len(wrong)


def test_near_miss_negatives_replace_each_wrong_answer_of_a_mixed_group(tmp_path):
    cfg = tiny(tmp_path, negatives="near_miss", group_size=4, kl_coef=0.0)
    trainer = GRPOTrainer(cfg, device="cpu")  # the default reward: a boxed answer equal to "5"
    tok = trainer.tokenizer
    ro, rewards, problems = _near_batch(tok)
    new, new_rewards, replaced = trainer.near_negatives(0, ro, rewards, problems)
    assert new.group_size == 4 and new.num_groups == 2 and replaced == 1.0  # 2 of 2 wrong
    # wrong slot k copies correct answer k mod 2 with its final number changed, by hand: 5 -> 6
    assert new.texts[:4] == [NEAR_A, NEAR_A.replace("{5}", "{6}"), NEAR_B, "So \\boxed{6}"]
    assert new.truncated[:4].tolist() == [False, False, True, True]
    assert new_rewards.tolist() == [[1.0, 0.0, 1.0, 0.0], [0.0] * 4]  # graded again
    before, after = _rows(ro, 0), _rows(new, 0)
    assert after[0] == before[0] and after[2] == before[2]
    assert after[1][-1] == tok.eos_token_id and after[3][-1] != tok.eos_token_id
    assert _rows(new, 1) == _rows(ro, 1)  # the all-wrong group passes through
    # the metric: the mean over mixed groups of the wrong answers' shared-prefix share
    shares = [_prefix_share(after[i], [after[0], after[2]]) for i in (1, 3)]
    assert 0.5 < min(shares) and max(shares) < 1.0
    # one mixed group: the same ratios of token counts, summed and halved in the same order; the
    # mean over groups of one value is that value: bit for bit
    assert trainer_mod._shared_prefix(new, new_rewards) == sum(shares) / 2
    assert trainer_mod._shared_prefix(ro, rewards) == (
        sum(_prefix_share(before[i], [before[0], before[2]]) for i in (1, 3)) / 2
    )


def test_branched_negatives_are_branched_group_of_the_current_policy(tmp_path):
    from nthr_book.groups import branched_group, groups_from_rollouts

    cfg = tiny(tmp_path, negatives="branched", branch_fraction=0.5, group_size=4, max_new_tokens=24)
    trainer = GRPOTrainer(cfg, device="cpu")
    ro, rewards, problems = _near_batch(trainer.tokenizer)
    new, new_rewards, replaced = trainer.near_negatives(7, ro, rewards, problems)
    group = groups_from_rollouts(ro, rewards, ["a", "b"], ["5", "5"])[0]
    expected = branched_group(
        group,
        trainer.model,
        trainer.tokenizer,
        0.5,
        temperature=cfg.temperature,
        max_new_tokens=24,
        seed=cfg.seed * 1_000_003 + 7,
        max_tries=cfg.branch_max_tries,
        keep_unfilled=True,
    )
    filled = expected.rollouts.meta["branched"]["rows"]
    assert replaced == len(filled) / 2 and _rows(new, 0) == _rows(expected.rollouts, 0)
    assert new_rewards[0].tolist() == expected.rewards.tolist()
    assert _rows(new, 1) == _rows(ro, 1)


def test_a_step_trains_on_the_near_negatives(tmp_path, monkeypatch):
    """train_step hands the update the replaced groups and logs how near they were; with sampled
    negatives it logs only the nearness of the sampled ones."""
    seen = []
    real_update = GRPOTrainer._update

    def update_spy(self, ro, rewards, row, times):
        seen.append((ro, rewards.clone()))
        return real_update(self, ro, rewards, row, times)

    monkeypatch.setattr(GRPOTrainer, "_update", update_spy)
    rows = {}
    for negatives in ("near_miss", "sampled"):
        cfg = tiny(tmp_path / negatives, negatives=negatives, group_size=4, kl_coef=0.0)
        trainer = GRPOTrainer(cfg, device="cpu")
        batch = _near_batch(trainer.tokenizer)
        trainer.sample = lambda step, refill_round=0, batch=batch: batch
        rows[negatives] = trainer.train_step(0)
    (near, near_rewards), (sampled, _) = seen
    assert near.num_groups == sampled.num_groups == 1  # dynamic sampling kept the mixed group
    assert near.texts[1] == NEAR_A.replace("{5}", "{6}") and sampled.texts[1] == "no idea"
    assert near_rewards.tolist() == [[1.0, 0.0, 1.0, 0.0]]
    assert rows["near_miss"]["negatives/replaced"] == 1.0
    assert "negatives/replaced" not in rows["sampled"]
    assert rows["near_miss"]["negatives/shared_prefix"] > 0.5
    assert rows["sampled"]["negatives/shared_prefix"] == trainer_mod._shared_prefix(
        sampled, torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    )


@pytest.mark.parametrize(
    "field,value",
    [
        ("negatives", "mined"),
        ("branch_fraction", 0.0),
        ("branch_fraction", 1.5),
        ("branch_max_tries", 0),
    ],
)
def test_near_negative_settings_are_checked(field, value):
    with pytest.raises(ValueError, match=f"TrainConfig.{field}"):
        TrainConfig(**{field: value})
    old = TrainConfig().to_dict()
    for key in ("negatives", "branch_fraction", "branch_max_tries"):
        del old[key]  # a config.json written before the fields existed
    assert TrainConfig.from_dict(old).negatives == "sampled"
