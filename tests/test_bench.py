"""The GPU step profile's code path, on the CPU with a tiny model (the timings themselves are not
tested)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_step_smoke_prints_the_table3_layout():
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "bench/gpu_step.py", "--smoke", "--steps", "1", "--warmup", "0"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    for phase in ("generation", "old_logps", "reference", "nthr", "update", "step"):
        assert any(line.startswith(phase) for line in lines), f"no {phase} row in:\n{out.stdout}"
    assert "ratio nthr/grpo" in out.stdout
    nthr_step = next(line for line in lines if line.startswith("nthr") and "step 0" in line)
    assert (
        "selected" in nthr_step and "nan" not in nthr_step.split("selected")[1]
    )  # NTHR really scored tokens


def _load_bench(name: str):
    """Import bench/<name>.py as a module (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_step_samples_ignore_the_models_generation_config(tmp_path):
    from transformers import GenerationConfig

    from nthr_book.models import tiny_random_model
    from nthr_book.trainer import TrainConfig

    bench = _load_bench("gpu_step")
    bench.DEVICE = "cpu"
    cfg = TrainConfig.paper_qwen_0_5b(
        model="tiny-random",
        max_new_tokens=6,
        prompts_per_step=2,
        mini_batch_prompts=1,
        micro_batch_groups=1,
        output_dir=tmp_path,
        task="arithmetic",
        num_problems=64,
        bf16=False,
        gradient_checkpointing=False,
    )
    samples = []
    for hub_like in (dict(repetition_penalty=1.5, typical_p=0.9, top_k=5, min_p=0.2), {}):
        model = tiny_random_model()
        model.generation_config = GenerationConfig(eos_token_id=2, pad_token_id=0, **hub_like)
        trainer = bench.SyntheticTrainer(
            cfg,
            model=model,
            tokenizer=types.SimpleNamespace(pad_token_id=0),
            device="cpu",
            reward_fn=lambda c, a: [0.0] * len(c),
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            samples.append(trainer.sample(0)[0].completion_ids)
    assert samples[0].shape == (16, 6)  # no EOS: every completion is max_new_tokens long
    assert torch.equal(samples[0], samples[1])


def test_grpo_step_ours_generates_exactly_max_new_tokens(tmp_path, monkeypatch):
    from nthr_book import trainer as trainer_module
    from nthr_book.models import load_policy

    bench = _load_bench("grpo_step")
    mkdtemp = bench.tempfile.mkdtemp
    monkeypatch.setattr(
        bench.tempfile, "mkdtemp", lambda prefix="": mkdtemp(prefix=prefix, dir=tmp_path)
    )
    model, tok = load_policy("tiny-random", device="cpu")
    eos = torch.zeros(model.config.vocab_size)
    eos[tok.eos_token_id] = 12.0  # EOS all but certain at every position, unless it is held back
    model.get_output_embeddings().register_forward_hook(lambda module, inputs, out: out + eos)
    before = trainer_module.generate_groups
    lengths = {}
    for natural in (True, False):
        argv = [
            "--model",
            "tiny-random",
            "--prompts",
            "2",
            "--group-size",
            "2",
            "--max-new-tokens",
            "5",
            "--warmup",
            "0",
            "--steps",
            "1",
            *(["--natural-length"] if natural else []),
        ]
        rows = bench.run_ours(bench.parse_args(argv), model, tok, "cpu")["rows"]
        lengths[natural] = rows[0]["completion_length"]
    assert lengths[True] < 5  # the EOS bias works: free completions stop early
    assert lengths[False] == 5  # exact length, as TRL's min_new_tokens gives on the other side
    assert trainer_module.generate_groups is before  # the trainer's sampling is put back


@pytest.mark.slow
def test_lld_step_smoke_times_both_modes(tmp_path):
    bench = _load_bench("lld_step")
    out = tmp_path / "lld_step.json"
    summary = bench.main(
        [
            "--model",
            "tiny-random",
            "--sample",
            "1",
            "--questions",
            "1",
            "--repeats",
            "1",
            "--warmup",
            "0",
        ]
        + ["--json", str(out)]
    )
    assert summary["median_s_shared"] > 0 and summary["median_s_unshared"] > 0
    # arithmetic prompt of 161 tokens, G = 8, 48 tokens: (161 + 8·48) / (8·(161 + 48))
    assert summary["positions_computed"] == (161 + 8 * 48) / (8 * (161 + 48))
    assert out.is_file()


@pytest.mark.slow
def test_two_at_a_time_smoke_prints_both_ways_and_their_ratio(tmp_path):
    out = subprocess.run(
        [sys.executable, "bench/two_at_a_time.py", "--model", "tiny-random", "--repeats", "1"]
        + ["--questions", "1", "--tokens", "2", "--json", str(tmp_path / "t.json")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "one at a time" in out.stdout and "ratio" in out.stdout
    summary = json.loads((tmp_path / "t.json").read_text())
    assert summary["median_s_one_at_a_time"] > 0 and summary["median_s_two_at_a_time"] > 0
    assert summary["ratio"] == summary["median_s_one_at_a_time"] / summary["median_s_two_at_a_time"]


@pytest.mark.slow
def test_rewards_speed_smoke_prints_growth_and_timeout_ratios(tmp_path):
    bench = _load_bench("rewards_speed")
    out = tmp_path / "rewards_speed.json"
    summary = bench.main(["--smoke", "--json", str(out)])
    shapes = {"deep-nesting", "deep-unbalanced", "many-boxes", "long-prefix", "non-boxes"}
    assert set(summary["extract_boxed"]) == shapes
    for row in summary["extract_boxed"].values():
        assert row["s_n"] > 0 and row["growth_2n_over_n"] == row["s_2n"] / row["s_n"]
    timeout = summary["timeout_s"]
    for name, row in summary["math_reward"].items():
        assert row["ratio_to_timeout"] == row["s"] / timeout, name
    assert json.loads(out.read_text())["size"] == 20_000


def test_reasoner_build_bench_times_a_tiny_build_into_a_temporary_cache(tmp_path):
    bench = _load_bench("reasoner_build")
    out = tmp_path / "reasoner_build.json"
    threads = torch.get_num_threads()
    try:
        result = bench.main(
            ["--size", "ci", "--base", "tiny-random", "--steps", "2", "--threads", "1"]
            + ["--out", str(out)]
        )
    finally:
        torch.set_num_threads(threads)
    saved = json.loads(out.read_text())
    assert saved["settings"]["steps"] == 2 and saved["settings"]["base"] == "tiny-random"
    assert saved["preset_steps"] == result["preset_steps"] > 2
    assert saved["seconds_full_build_estimate"] > 0 and "torch" in saved["versions"]


@pytest.mark.slow
def test_first_order_bench_times_both_ways_and_they_agree(tmp_path):
    bench = _load_bench("first_order")
    out = tmp_path / "first_order.json"
    argv = ["--model", "tiny-random", "--questions", "1", "--repeats", "1", "--warmup", "0"]
    summary = bench.main(argv + ["--json", str(out)])
    assert all(seconds > 0 for seconds in summary["median_s"].values())
    # the same float32 gradients summed in another order: a wrong row or a dropped term would
    # differ by order 1, float32 rounding by about 1e-6 of the value
    assert summary["max_rel_difference"] < 1e-3
    assert out.is_file()


@pytest.mark.slow
def test_shared_start_bench_times_both_ways_and_they_write_the_same_answers(tmp_path):
    bench = _load_bench("shared_start")
    out = tmp_path / "shared_start.json"
    argv = ["--model", "tiny-random", "--questions", "3", "--repeats", "1", "--warmup", "0"]
    summary = bench.main(argv + ["--json", str(out)])
    assert set(summary["median_s"]) == {"whole_prompts", "shared_start"}
    assert all(seconds > 0 for seconds in summary["median_s"].values())
    med = summary["median_s"]
    assert summary["speedup"] == med["whole_prompts"] / med["shared_start"]
    assert summary["same_answers"] is True  # greedy: the shared start changes no answer
    assert json.loads(out.read_text())["prompt_tokens"] == summary["prompt_tokens"]
