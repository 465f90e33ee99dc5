"""Trainer: config validation, one real loop on tiny-random, resume equals an uninterrupted run."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from nthr_book.trainer import METRIC_COLUMNS, TrainConfig, read_metrics, train


def parity_reward(completions: list[str], answers: list[str]) -> list[float]:
    """A deterministic stand-in grader that makes mixed groups on a random model: even length wins."""
    return [float(len(c) % 2 == 0) for c in completions]


def tiny(tmp_path, **kw) -> TrainConfig:
    base = dict(model="tiny-random", task="arithmetic", num_problems=16, steps=4, prompts_per_step=2, group_size=4,
                max_new_tokens=6, lr=1e-3, kl_coef=1e-2, checkpoint_every=2, output_dir=str(tmp_path / "run"),
                seed=3)
    return TrainConfig(**(base | kw))


@pytest.mark.parametrize("field,value,words", [
    ("group_size", 1, "group_size"),
    ("mini_batch_prompts", 3, "mini_batch_prompts"),
    ("agg", "sum", "agg"),
    ("method", "ppo", "method"),
    ("temperature", 0.0, "temperature"),
    ("lr", -1.0, "lr"),
])
def test_bad_config_names_the_field(field, value, words):
    with pytest.raises(ValueError, match=f"TrainConfig.{words}"):
        TrainConfig(**{field: value, "prompts_per_step": 4})


def test_presets_follow_the_paper_table():
    paper = TrainConfig.paper_qwen_0_5b()
    assert (paper.prompts_per_step, paper.mini_batch_prompts, paper.lr, paper.group_size) == (32, 16, 5e-7, 8)
    assert (paper.temperature, paper.clip_eps, paper.kl_coef, paper.max_new_tokens) == (1.0, 0.2, 1e-4, 2500)
    assert paper.model == "Qwen/Qwen2.5-0.5B-Instruct" and paper.task == "math"
    fast = TrainConfig.fast()
    assert fast.model == "smollm2-135m" and fast.task == "arithmetic"
    assert TrainConfig.from_dict(paper.to_dict()) == paper


def test_train_writes_metrics_and_model(tmp_path):
    run = train(tiny(tmp_path), reward_fn=parity_reward, progress=False)
    df = read_metrics(run / "metrics.csv")
    assert list(df["step"]) == [0, 1, 2, 3]
    assert set(METRIC_COLUMNS) <= set(df.columns)
    assert ((df["accuracy"] >= 0) & (df["accuracy"] <= 1)).all()
    assert (run / "model" / "config.json").exists()
    assert not (run / "checkpoint.pt").exists(), "a finished run keeps model/ only, not the optimizer state"
    used = df["groups_used"] > 0
    assert used.any(), "the parity reward should give mixed groups"
    assert df.loc[used, "kl"].notna().all() and df.loc[used, "lld/rate"].between(0, 1).all()


def test_existing_run_is_not_overwritten(tmp_path):
    cfg = tiny(tmp_path, steps=1)
    train(cfg, reward_fn=parity_reward, progress=False)
    with pytest.raises(FileExistsError, match="resume=True"):
        train(cfg, reward_fn=parity_reward, progress=False)
    with pytest.raises(ValueError, match="lr"):
        train(cfg.replace(lr=1e-2), reward_fn=parity_reward, resume=True, progress=False)


@pytest.mark.parametrize("extra", [{}, {"mini_batch_prompts": 1, "num_iterations": 2, "method": "nthr"}])
def test_resume_after_kill_matches_uninterrupted(tmp_path, extra):
    full = train(tiny(tmp_path / "a", **extra), reward_fn=parity_reward, progress=False)

    def kill_at_step_2(step, row):
        if step == 2:
            raise KeyboardInterrupt

    cfg = tiny(tmp_path / "b", **extra)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, reward_fn=parity_reward, callbacks=[kill_at_step_2], progress=False)
    resumed = train(cfg, reward_fn=parity_reward, resume=True, progress=False)
    a, b = read_metrics(full / "metrics.csv"), read_metrics(resumed / "metrics.csv")
    cols = [c for c in a.columns if not c.startswith("time_")]
    pd.testing.assert_frame_equal(a[cols], b[cols])
    wa, wb = final_weights(full), final_weights(resumed)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def final_weights(run):
    from safetensors.torch import load_file

    return load_file(run / "model" / "model.safetensors")


def test_finished_run_extends_only_with_its_checkpoint(tmp_path):
    straight = train(tiny(tmp_path / "a"), reward_fn=parity_reward, progress=False)
    short = tiny(tmp_path / "b", steps=2, keep_checkpoint=True)
    train(short, reward_fn=parity_reward, progress=False)
    assert (short.run_dir() / "checkpoint.pt").exists()
    extended = train(short.replace(steps=4), reward_fn=parity_reward, resume=True, progress=False)
    assert len(read_metrics(extended / "metrics.csv")) == 4
    wa, wb = final_weights(straight), final_weights(extended)
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "2 + 2 steps from the checkpoint equal 4 straight steps"

    dropped = tiny(tmp_path / "c", steps=2)
    train(dropped, reward_fn=parity_reward, progress=False)
    assert train(dropped, reward_fn=parity_reward, resume=True, progress=False) == dropped.run_dir()
    with pytest.raises(ValueError, match="keep_checkpoint=True"):
        train(dropped.replace(steps=4), reward_fn=parity_reward, resume=True, progress=False)


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


def test_pos_only_has_no_negative_signal(tmp_path):
    seen = []

    def spy(ctx):
        seen.append(ctx.advantages.clone())
        return ctx.advantages, {}

    train(tiny(tmp_path, steps=2, method="pos_only"), advantage_fn=spy, reward_fn=parity_reward, progress=False)
    assert seen and all(bool((a >= 0).all()) for a in seen)
    assert any(bool((a > 0).any()) for a in seen)


def test_metrics_nan_when_no_mixed_group(tmp_path):
    run = train(tiny(tmp_path, steps=1), reward_fn=lambda c, a: [0.0] * len(c), progress=False)
    row = read_metrics(run / "metrics.csv").iloc[0]
    assert row["groups_used"] == 0 and row["frac_homogeneous"] == 1 and math.isnan(row["loss"])
