"""The command-line scripts: arguments reach the library, results are saved, finished work is
reused."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import pandas as pd
import pytest
from trl_import import import_trl

from nthr_book import lld
from nthr_book.trainer import TrainConfig

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_lld_table(seed: int) -> pd.DataFrame:
    rows = [
        {
            "id": f"q{i % 2}",
            "method": m,
            "n_correct": 2,
            "group_size": 4,
            "p": 0.5,
            "delta": d,
            "per_response_delta": [d, d - 0.1],
            "n_selected": 0,
            "n_incorrect_tokens": 5,
            "tau": None,
            "seed": seed,
            "lr": 1e-3,
        }
        for i, (m, d) in enumerate(
            [("grpo", -0.2), ("grpo", 0.3), ("pos_only", 0.4), ("pos_only", 0.5)]
        )
    ]
    return pd.DataFrame(rows, columns=list(lld.ROW_COLUMNS))


def test_lld_displacement_saves_summarises_and_reuses_seeds(tmp_path, monkeypatch):
    script = load_script("lld_displacement")
    calls = []
    monkeypatch.setattr(script.models, "load_policy", lambda name: (None, None))
    monkeypatch.setattr(
        script.lld_sweep,
        "lld_experiment",
        lambda model, tok, problems, **kw: calls.append(kw) or fake_lld_table(kw["seed"]),
    )
    args = ["--seeds", "0", "1", "--n-questions", "3", "--lr", "0.001", "--out", str(tmp_path)]
    summary = script.main(args)
    assert [c["seed"] for c in calls] == [0, 1] and {c["lr"] for c in calls} == {0.001}
    assert calls[0]["groups_path"] == tmp_path / "groups-seed0.pt"
    # grpo deltas over both seeds: -0.2, 0.3, -0.2, 0.3 -> median 0.05, half <= 0;
    # per-response deltas -0.2, -0.3, 0.3, 0.2 (x2) -> LLD rate 0.5
    # the median halves a sum of -0.2 and 0.3: one rounding of numbers below 0.3
    assert summary.loc["grpo", "median_delta"] == pytest.approx(0.05, rel=0, abs=0.3 * 2.0**-52)
    assert summary.loc["grpo", "frac_delta_le_0"] == 0.5 and summary.loc["grpo", "lld_rate"] == 0.5
    assert (
        summary.loc["pos_only", "frac_delta_le_0"] == 0.0
        and summary.loc["grpo", "n_questions"] == 4
    )
    assert (tmp_path / "summary_by_seed.csv").exists() and (tmp_path / "settings.json").exists()
    paired = pd.read_csv(tmp_path / "paired_vs_grpo.csv", index_col="method")
    assert (
        paired.loc["pos_only", "frac_above"] == 1.0 and paired.loc["pos_only", "n_pairs"] == 4
    )  # 2 questions x 2 seeds
    # A rerun reads the finished seeds back from CSV (lists included) and measures nothing again.
    again = script.main(args)
    assert len(calls) == 2
    pd.testing.assert_frame_equal(summary, again, check_exact=True)  # floats round-trip in CSV


def test_lld_displacement_map_measures_the_first_mixed_questions_of_each_seed(
    tmp_path, monkeypatch
):
    from types import SimpleNamespace

    from nthr_book import groups as groups_mod

    script = load_script("lld_displacement")
    monkeypatch.setattr(script.models, "load_policy", lambda name: (None, None))
    monkeypatch.setattr(
        script.lld_sweep,
        "lld_experiment",
        lambda model, tok, problems, **kw: fake_lld_table(kw["seed"]),
    )
    statuses = {"q3": "mixed", "q1": "mixed", "q2": "all_wrong", "q0": "mixed"}
    fake_groups = [SimpleNamespace(question_id=q, status=s) for q, s in statuses.items()]
    monkeypatch.setattr(groups_mod, "load_groups", lambda path: fake_groups)
    seen = []

    def fake_map(model, tok, mixed, **kw):
        seen.append(([g.question_id for g in mixed], kw["seed"], kw["path"].name))
        rows = [
            {
                "id": g.question_id,
                "question": g.question_id,
                "negatives": cond,
                "fraction": 0.0,
                "method": m,
                "delta": d,
                "per_response_delta": [d],
                "n_selected": None,
                "n_incorrect_tokens": 4,
                "group_size": 8,
                "gwhes": 1.0 + i,
                "shared_prefix": 0.5,
            }
            for i, g in enumerate(mixed)
            for cond in ("f=0.00", "near-miss")
            for m, d in (("grpo", 0.1 * (i + 1)), ("pos_only", 0.2))
        ]
        df = pd.DataFrame(rows)
        df.attrs |= {"held": {"f=0.00": 2, "near-miss": 2}, "n_common": 2}
        return df

    monkeypatch.setattr(script.regime, "regime_map", fake_map)
    args = ["--seeds", "0", "1", "--n-questions", "4", "--map", "2", "--out", str(tmp_path)]
    script.main(args)
    # the first two mixed questions by id, per seed, each seed's map in its own file
    assert seen == [(["q0", "q1"], 0, "map-seed0.jsonl"), (["q0", "q1"], 1, "map-seed1.jsonl")]
    summary = pd.read_csv(tmp_path / "map_summary.csv")
    # the seeds' questions stay apart: 2 questions × 2 seeds per condition and rule
    assert (summary.n_questions == 4).all()
    grpo = summary[(summary.negatives == "f=0.00") & (summary.method == "grpo")].iloc[0]
    # GRPO's Δ over the 4 groups: 0.1, 0.2, 0.1, 0.2 -> median 0.15; Pos Only 0.2 -> ratio 0.75
    # a mean of two and a division of numbers below 1: a few roundings, 4·eps in all
    assert grpo.median_delta == pytest.approx(0.15, rel=0, abs=4 * 2.0**-52)
    assert grpo.ratio_to_pos_only == pytest.approx(0.75, rel=0, abs=4 * 2.0**-52)
    # Table 1 within the natural column: its 2 questions × 2 seeds
    ranking = json.loads((tmp_path / "map_ranking.json").read_text())
    assert ranking["condition"] == "f=0.00" and ranking["n_groups"] == 4
    # the within-question shift: near-miss gaps equal the natural ones here, so 0 on 4 questions
    shift = pd.read_csv(tmp_path / "map_shift.csv").iloc[0]
    assert shift.negatives == "near-miss" and shift.n_questions == 4 and shift.shift_mean == 0


def test_lld_displacement_rejects_bad_arguments():
    script = load_script("lld_displacement")
    with pytest.raises(SystemExit):
        script.parse_args(["--n-questions", "0"])
    with pytest.raises(SystemExit):
        script.parse_args(["--methods", "sgd"])


def _fake_grpo_vs_nthr_run(seen: dict, runs: Path):
    """A stand-in for run_experiment: records its arguments, writes heldout.csv under ``runs``
    and returns per-run rows with hand-picked measures (NTHR's Δ ln π 1, 0.75 above GRPO's). With
    ``eval_every`` it writes curve.csv: every rule right on q0-q4 at step 0, NTHR on all ten
    questions at the steps after it."""

    def fake_run(name, methods, seeds, config, n_eval, evaluate_base, eval_every, horizon):
        seen.update(
            name=name,
            methods=methods,
            seeds=seeds,
            config=config,
            n_eval=n_eval,
            base=evaluate_base,
            eval_every=eval_every,
            horizon=horizon,
        )
        rows = [
            {
                "method": m,
                "seed": s,
                "horizon": horizon or config.steps,
                "train_reward_first5": 0.2,
                "train_reward_last5": 0.1 + 0.2 * s,
                "lld_rate_mean": 0.3,
                "lld_delta_mean": {"grpo": 0.0, "nthr": 1.0 - 0.25 * s}.get(m, 0.0),
                "selected_frac_mean": 0.0,
                "accuracy": 0.5,
                "ci_low": 0.3,
                "ci_high": 0.7,
                "n_eval": 10,
            }
            for m in methods
            for s in seeds
        ]
        answers = [
            {"method": m, "seed": s, "question": f"q{q}", "correct": int(q < 5)}
            for m in methods
            for s in seeds
            for q in range(10)
        ]
        (runs / name).mkdir(parents=True, exist_ok=True)
        pd.DataFrame(answers).to_csv(runs / name / "heldout.csv", index=False)
        if eval_every:
            steps = [0, *range(eval_every, config.steps, eval_every), config.steps]
            curve = [
                {**a, "step": k, "correct": int(a["method"] == "nthr" and k > 0 or a["correct"])}
                for k in steps
                for a in answers
            ]
            pd.DataFrame(curve).to_csv(runs / name / "curve.csv", index=False)
        return pd.DataFrame(rows)

    return fake_run


def test_grpo_vs_nthr_passes_preset_overrides(monkeypatch, capsys, tmp_path):
    script = load_script("grpo_vs_nthr")
    seen = {}
    monkeypatch.setenv("NTHR_BOOK_RUNS", str(tmp_path))
    monkeypatch.setattr(script, "run_experiment", _fake_grpo_vs_nthr_run(seen, tmp_path))
    script.main(
        [
            "--seeds",
            "0",
            "1",
            "--steps",
            "3",
            "--model",
            "tiny-random",
            "--n-eval",
            "10",
            "--no-base",
            "--negatives",
            "branched",
            "--branch-fraction",
            "0.25",
            "--mini-batch-prompts",
            "2",
            "--num-iterations",
            "2",
        ]
    )
    cfg = seen["config"]
    assert (cfg.steps, cfg.model, cfg.prompts_per_step) == (3, "tiny-random", 4)  # fast preset
    assert (cfg.negatives, cfg.branch_fraction) == ("branched", 0.25)
    assert (cfg.mini_batch_prompts, cfg.num_iterations) == (2, 2)
    assert seen["name"] == "grpo_vs_nthr_fast" and seen["seeds"] == [0, 1] and seen["base"] is False
    assert seen["horizon"] is None  # the default: every step
    out = capsys.readouterr().out
    lines = out.splitlines()
    # the declared test comes first: accuracy by default, paired by question and seed
    assert lines[0].startswith("declared test: primary = accuracy (held-out accuracy (greedy))")
    assert "after 3 steps" in lines[0] and "nthr − grpo" in lines[0]
    primary = next(i for i, x in enumerate(lines) if x.startswith("PRIMARY"))
    assert lines[primary].startswith("PRIMARY: accuracy, nthr − grpo")
    assert "not resolved" in lines[primary] and "McNemar p = 1" in lines[primary]
    secondary = [i for i, x in enumerate(lines) if x.startswith("secondary")]
    assert secondary and min(secondary) > primary
    assert any(lines[i].startswith("secondary: lld_delta_mean, nthr − grpo") for i in secondary)
    assert "2/4 runs up" in out  # seed 1 rises (0.3 > 0.2), seed 0 falls (0.1 < 0.2)
    with pytest.raises(SystemExit):
        script.main(["--negatives", "mined"])
    # --preset reasoner: the warm-up reasoner on its worked products (TrainConfig.fast_reasoner)
    script.main(["--preset", "reasoner", "--seeds", "0", "1", "--steps", "2", "--no-base"])
    cfg = seen["config"]
    assert (cfg.task, cfg.model, cfg.steps) == ("reasoner", "smollm2-135m-reasoner", 2)
    assert cfg.max_new_tokens == TrainConfig.fast_reasoner().max_new_tokens
    assert seen["name"] == "grpo_vs_nthr_reasoner"
    assert seen["eval_every"] == 0  # the default: the final model only, no curve


def test_grpo_vs_nthr_prints_accuracy_over_training(monkeypatch, capsys, tmp_path):
    """--eval-every: accuracy per rule and step (mean over seeds), then NTHR − GRPO per step paired
    by question and seed: 1.0 vs 0.5 after step 0 on the fake runs, +0.5 with no interval
    containing it (every pair differs the same way)."""
    script = load_script("grpo_vs_nthr")
    seen = {}
    monkeypatch.setenv("NTHR_BOOK_RUNS", str(tmp_path))
    monkeypatch.setattr(script, "run_experiment", _fake_grpo_vs_nthr_run(seen, tmp_path))
    script.main(["--seeds", "0", "1", "--steps", "4", "--n-eval", "10", "--eval-every", "2"])
    assert seen["eval_every"] == 2
    out = capsys.readouterr().out
    table = out[out.index("held-out accuracy over training steps") :].splitlines()
    assert table[1].split() == ["step", "0", "2", "4"]
    assert table[3].split() == ["grpo", "0.5", "0.5", "0.5"]
    assert table[4].split() == ["nthr", "0.5", "1.0", "1.0"]
    steps = [x for x in out.splitlines() if x.startswith("  step ")]
    assert [x.split(":")[0].strip() for x in steps] == ["step 2", "step 4"]
    assert all("+0.5" in x and "not resolved" not in x for x in steps)


def test_grpo_vs_nthr_declares_a_training_primary_and_its_horizon(monkeypatch, capsys, tmp_path):
    script = load_script("grpo_vs_nthr")
    seen = {}
    monkeypatch.setenv("NTHR_BOOK_RUNS", str(tmp_path))
    monkeypatch.setattr(script, "run_experiment", _fake_grpo_vs_nthr_run(seen, tmp_path))
    argv = ["--steps", "6", "--methods", "grpo", "pos_only", "nthr", "--seeds", "0", "1"]
    script.main(argv + ["--primary", "lld_delta_mean", "--horizon", "4", "--contrast", "nthr"])
    assert seen["horizon"] == 4
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == (
        "declared test: primary = lld_delta_mean (mean Δ ln π of a step's right answers over its "
        "update) over steps [0, 4), paired by seed, nthr − grpo, 95% interval; secondary: "
        "lld_rate, accuracy; pos_only minus grpo"
    )
    primary = next(x for x in lines if x.startswith("PRIMARY"))
    # NTHR − GRPO per seed 1, 0.75: mean 0.875, one t interval over 2 seeds
    assert primary.startswith("PRIMARY: lld_delta_mean, nthr − grpo (0.8750 vs 0.0000): +0.875")
    assert "per seed +1.000, +0.750" in primary
    after = lines[lines.index(primary) + 1]
    assert after.startswith("secondary: lld_delta_mean, pos_only − grpo")
    # parsing: the choices, the horizon's range, and the contrast among the methods
    for bad in (
        ["--primary", "reward"],
        ["--horizon", "0"],
        ["--contrast", "llds"],
        ["--methods", "nthr", "pos_only"],
    ):
        with pytest.raises(SystemExit):
            script.parse_args(bad)
    with pytest.raises(SystemExit, match="exceeds the run's 6 steps"):
        script.main(argv + ["--primary", "lld_rate", "--horizon", "7"])
    with pytest.raises(SystemExit, match="after all 6 steps"):
        script.main(argv + ["--horizon", "4"])  # accuracy is the final model's
    assert script.parse_args(["--methods", "grpo", "nthr_all", "nthr"]).contrast == "nthr_all"


def test_grpo_vs_nthr_plan_reads_a_pilot(tmp_path, capsys):
    script = load_script("grpo_vs_nthr")
    pilot = tmp_path / "pilot"
    pilot.mkdir()
    pd.DataFrame(
        {
            "method": ["grpo"] * 3 + ["nthr"] * 3,
            "seed": [0, 1, 2] * 2,
            "lld_delta_mean": [0.0, 0.25, -0.25, 1.0, 1.0, 1.0],  # differences 1, 0.75, 1.25
            "lld_rate_mean": [0.5] * 6,
        }
    ).to_csv(pilot / "results.csv", index=False)
    argv = ["--plan", str(pilot), "--primary", "lld_delta_mean", "--seeds", "0", "1", "2", "3"]
    plans = script.main(argv)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("declared test: primary = lld_delta_mean")
    assert lines[1].startswith("primary: lld_delta_mean, nthr − grpo: pilot +1.0000 (sd 0.2500")
    # (t975(3) + z80) · 0.25 / √4 = (3.182 + 0.8416) · 0.125
    assert "4 seeds resolve 0.5030 with power 80%" in lines[1]
    assert plans[0]["seeds_needed"] == 3 and plans[0]["role"] == "primary"
    assert plans[1]["measure"] == "lld_rate" and plans[1]["role"] == "secondary"
    assert len(plans) == 2  # no heldout.csv: no accuracy plan
    with pytest.raises(SystemExit, match="no results.csv"):
        script.main(["--plan", str(tmp_path / "nowhere")])


def test_evaluate_benchmarks_writes_tables_and_skips_missing_data(tmp_path, monkeypatch, capsys):
    script = load_script("evaluate_benchmarks")
    problems = [
        {"id": f"p{i}", "problem": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(3)
    ]

    def fake_load(name, data_dir=None):
        if name == "gsm8k":
            raise script.data.DataNotAvailableError("gsm8k: no file and no hub here")
        return problems

    monkeypatch.setattr("nthr_book.evaluate.load_benchmark", fake_load)
    rows = script.main(
        [
            "--model",
            "tiny-random",
            "--benchmarks",
            "aime24",
            "gsm8k",
            "--limit",
            "2",
            "--max-new-tokens",
            "2",
            "--out",
            str(tmp_path),
        ]
    )
    assert (
        list(rows["benchmark"]) == ["aime24"] and int(rows["n"].iloc[0]) == 2
    )  # --limit keeps the first 2
    assert "gsm8k: skipped" in capsys.readouterr().out
    assert (tmp_path / "tiny-random" / "aime24.jsonl").exists()
    assert (tmp_path / "results-tiny-random.csv").exists() and (
        tmp_path / "results_vs_paper-tiny-random.csv"
    ).exists()


def test_lld_displacement_template_argument():
    script = load_script("lld_displacement")
    custom = script.parse_args(["--template", "{problem} Explain briefly.", "--no-require-boxed"])
    assert custom.template == "{problem} Explain briefly." and custom.require_boxed is False
    assert script.parse_args([]).require_boxed is True
    with pytest.raises(SystemExit):
        script.parse_args(["--template", "no placeholder"])
    assert script.parse_args(["--group-size", "16", "--balance", "4"]).balance == 4
    assert script.parse_args([]).balance is None
    with pytest.raises(SystemExit):
        script.parse_args(["--balance", "5"])  # 2K > G = 8


# ---- scripts/train_trl.py (TRL's parser, save, resume) -----------------------------------------
TRL_TINY = [
    "--model_name_or_path",
    "tiny-random",
    "--task",
    "toy",
    "--num_generations",
    "4",
    "--per_device_train_batch_size",
    "8",
    "--max_completion_length",
    "8",
    "--nthr_beta",
    "1",
    "--nthr_anchor",
    "no_self_token",
    "--learning_rate",
    "1e-3",
    "--save_steps",
    "1",
]


def test_train_trl_parses_trl_options_and_nthr_config():
    import_trl()
    from nthr_book.nthr import NTHRConfig

    script = load_script("train_trl")
    args, grpo, model = script.parse_args(
        [
            "--nthr_anchor",
            "other_responses",
            "--nthr_eta",
            "0.5",
            "--nthr_beta=-inf",
            "--max_steps",
            "3",
            "--report_to",
            "tensorboard",
            "--save_steps",
            "7",
            "--dtype",
            "bfloat16",
        ]
    )
    assert args.nthr_config() == NTHRConfig(beta=-float("inf"), eta=0.5, anchor="other_responses")
    # GRPOConfig's and ModelConfig's own fields
    assert (grpo.max_steps, grpo.save_steps, grpo.report_to) == (3, 7, ["tensorboard"])
    assert model.dtype == "bfloat16" and model.model_name_or_path == "smollm2-135m"
    assert grpo.output_dir.endswith("nthr")
    args, grpo, _ = script.parse_args(["--nthr_beta", "none", "--resume_from_checkpoint", "last"])
    assert args.nthr_config() is None and grpo.output_dir.endswith("grpo")
    assert grpo.resume_from_checkpoint is True  # the newest checkpoint-N of output_dir
    assert grpo.report_to == [] and grpo.save_strategy == "steps"  # script defaults: no tracker
    with pytest.raises(SystemExit):
        script.parse_args(["--nthr_anchor", "mine"])
    # another rule of the registry: its name is the run's folder
    args, grpo, _ = script.parse_args(["--rule", "w_reinforce"])
    assert args.method() == "w_reinforce" and grpo.output_dir.endswith("w_reinforce")
    assert args.nthr_config() is None  # --rule replaces NTHR's --nthr_beta


def test_train_trl_leaves_model_loading_to_trl_after_the_config():
    """A hub id or folder goes to TRL by name with ModelConfig's dtype: loaded after the config."""
    import_trl()
    script = load_script("train_trl")
    _, grpo, model = script.parse_args(
        [
            "--model_name_or_path",
            "org/some-model",
            "--dtype",
            "bfloat16",
            "--attn_implementation",
            "sdpa",
        ]
    )
    assert script.policy_for_trl(model, grpo) == "org/some-model"
    init = grpo.model_init_kwargs
    assert init["dtype"] == "bfloat16" and init["attn_implementation"] == "sdpa"


@pytest.mark.slow
def test_train_trl_saves_the_model_and_resumes_from_a_checkpoint(tmp_path):
    """Two steps save checkpoint-1, checkpoint-2 and the final model; resuming from checkpoint-1
    repeats step 2 exactly (weights, optimizer, RNG and data position come back)."""
    import_trl()
    import torch
    from safetensors.torch import load_file

    script = load_script("train_trl")
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    trainer = script.run(TRL_TINY + ["--max_steps", "2", "--output_dir", str(full)])
    assert trainer.state.global_step == 2
    for folder in (full, full / "checkpoint-1", full / "checkpoint-2"):
        assert (folder / "model.safetensors").exists(), folder
    assert (full / "tokenizer.json").exists() and (full / "log_history.json").exists()
    final = load_file(full / "model.safetensors")
    saved = trainer.accelerator.unwrap_model(trainer.model).state_dict()
    assert all(torch.equal(final[k], saved[k]) for k in final)  # the trained weights

    dump = tmp_path / "dump"  # the resumed call's NTHR records, one file per step it runs
    again = script.run(
        TRL_TINY
        + [
            "--max_steps",
            "2",
            "--output_dir",
            str(resumed),
            "--resume_from_checkpoint",
            str(full / "checkpoint-1"),
            "--dump_dir",
            str(dump),
        ]
    )
    assert again.state.global_step == 2
    # only step 2 ran: a resume that restarted from step 0 (seeded the same way) would also write
    # step1_rank0.pt and end with the same weights
    assert sorted(p.name for p in dump.glob("step*.pt")) == ["step2_rank0.pt"]
    step1 = load_file(full / "checkpoint-1" / "model.safetensors")
    redone = load_file(resumed / "model.safetensors")
    assert any(not torch.equal(redone[k], step1[k]) for k in step1)  # step 2 trained after resuming
    assert all(torch.equal(redone[k], final[k]) for k in final)  # exactly as without interruption


def test_warmup_reasoner_measures_both_models_and_saves_its_tables(tmp_path, monkeypatch, capsys):
    """The script builds (here: a 2-step tiny-random warm-up), samples both models on held-out
    questions of the reasoner task and writes summary.json, questions.csv, samples.jsonl and the
    loss curve."""
    from nthr_book import data, models, reasoner

    script = load_script("warmup_reasoner")
    settings = reasoner.ReasonerSettings(
        base="tiny-random", num_examples=4, steps=2, batch_size=2, warmup_steps=0
    )
    folder = reasoner.build_reasoner(
        settings,
        cache_root=tmp_path / "cache",
        load_base=models.load_policy,
        build_prompt=data.build_prompt,
        progress=False,
    )
    asked = []
    monkeypatch.setattr(models, "reasoner_dir", lambda s: asked.append(s) or folder)
    out = tmp_path / "out"
    args = ["--size", "ci", "--n", "3", "--group-size", "2", "--max-new-tokens", "4"]
    args += ["--set", "base=tiny-random", "--set", "num_examples=4", "--set", "steps=2"]
    args += ["--set", "batch_size=2", "--set", "warmup_steps=0", "--out", str(out)]
    result = script.main(args)
    assert asked == [settings]  # the --set overrides reach the build
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"] == dataclasses.asdict(settings) and summary["size"] == "ci"
    assert summary["args"]["seed"] == 0 and "torch" in summary["versions"]
    assert [m["model"] for m in result["models"]] == ["reasoner", "base"]
    assert all(m["questions"] == 3 and m["samples"] == 6 for m in result["models"])
    questions = pd.read_csv(out / "questions.csv")
    assert len(questions) == 6 and set(questions["model"]) == {"reasoner", "base"}
    held = set(summary["heldout_ids"])
    assert set(questions["id"]) == held and len(held) == 3
    assert len((out / "samples.jsonl").read_text().splitlines()) == 12
    assert len(pd.read_csv(out / "loss_curve.csv")) == 2
    assert "reasoner" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        script.parse_args(["--set", "nonsense=1"])


def test_warmup_reasoner_first_slip_and_format():
    script = load_script("warmup_reasoner")
    solution = "37*6 = 30*6 + 7*6 = 180 + 42 = \\boxed{222}"
    assert script.first_slip(solution, solution) == -1
    assert script.first_slip("37*6 = 30*6 + 7*6 = 180 + 52 = \\boxed{232}", solution) == 2
    assert script.first_slip("37*6 = 30*6 + 7*6 = 180 + 42 = \\boxed{212}", solution) == 3
    assert script.first_slip("37*6 = 222", solution) == 1
    assert script.SOLUTION_FORMAT.fullmatch(solution)
    assert script.SOLUTION_FORMAT.fullmatch(
        "345*7 = 300*7 + 40*7 + 5*7 = 2100 + 280 + 35 = 2380 + 35 = \\boxed{2415}"
    )
    assert not script.SOLUTION_FORMAT.fullmatch("37 * 6 = 222. The answer is \\boxed{222}.")


def test_lld_displacement_task_sets_the_reasoner_defaults(tmp_path, monkeypatch):
    script = load_script("lld_displacement")
    args = script.parse_args(["--task", "reasoner"])
    assert (args.model, args.template, args.max_new_tokens) == (
        "smollm2-135m-reasoner",
        "reasoner",
        64,
    )
    plain = script.parse_args([])
    assert (plain.model, plain.template, plain.max_new_tokens) == ("smollm2-135m", "arithmetic", 48)
    # an explicit value wins over the task's default
    assert script.parse_args(["--task", "reasoner", "--max-new-tokens", "80"]).max_new_tokens == 80
    # the questions come from the reasoner's RL pool, per seed
    seen = []
    monkeypatch.setattr(script.models, "load_policy", lambda name: (None, None))
    monkeypatch.setattr(
        script, "_sample_groups", lambda args, out, seed, m, t, problems: seen.append(problems)
    )
    script.main(
        ["--task", "reasoner", "--seeds", "3", "--n-questions", "5", "--no-sweep"]
        + ["--out", str(tmp_path)]
    )
    from nthr_book import reasoner

    assert seen == [reasoner.problems("rl", 5, seed=3)]
