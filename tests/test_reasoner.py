"""The warm-up reasoner (nthr_book.reasoner): its task, splits, completion-only loss and cache."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import pytest
import torch

from nthr_book import config, data, experiments, models, reasoner
from nthr_book.io import read_jsonl
from nthr_book.rewards import math_rewards
from nthr_book.trainer import TrainConfig, task_defaults, training_problems

TINY = reasoner.ReasonerSettings(
    base="tiny-random", num_examples=12, steps=2, batch_size=3, warmup_steps=1
)


@pytest.fixture(scope="module")
def tokenizer():
    return models.load_tokenizer()


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory):
    """A 2-step warm-up of tiny-random into its own cache root: (root, folder)."""
    root = tmp_path_factory.mktemp("cache")
    folder = reasoner.build_reasoner(
        TINY,
        cache_root=root,
        load_base=models.load_policy,
        build_prompt=data.build_prompt,
        progress=False,
    )
    return root, folder


# ---- the task ------------------------------------------------------------------------------------


def test_worked_solution_writes_partial_products_then_running_totals():
    # 37*6: 30*6 = 180, 7*6 = 42, 180 + 42 = 222
    assert reasoner.worked_solution(37, 6) == "37*6 = 30*6 + 7*6 = 180 + 42 = \\boxed{222}"
    # 345*7: 2100 + 280 = 2380, 2380 + 35 = 2415 (three partial products, summed two at a time)
    assert reasoner.worked_solution(345, 7) == (
        "345*7 = 300*7 + 40*7 + 5*7 = 2100 + 280 + 35 = 2380 + 35 = \\boxed{2415}"
    )
    # a zero digit has no partial product
    assert reasoner.worked_solution(305, 4) == "305*4 = 300*4 + 5*4 = 1200 + 20 = \\boxed{1220}"


@pytest.mark.parametrize(
    "a, b, match",
    [(40, 3, "a=40 has one nonzero digit"), (0, 3, "a must be"), (12, 0, "b must be")],
)
def test_worked_solution_refuses_what_it_cannot_decompose(a, b, match):
    with pytest.raises(ValueError, match=match):
        reasoner.worked_solution(a, b)


@pytest.mark.parametrize("split", [name for name, _ in reasoner.SPLITS])
def test_targets_grade_right_and_a_changed_final_number_grades_wrong(split):
    problems = reasoner.problems(split, 40, seed=3)
    solutions = [p["solution"] for p in problems]
    answers = [p["answer"] for p in problems]
    assert math_rewards(solutions, answers) == [1.0] * len(problems)
    for p in problems:  # the product, computed here without the module
        a, b = (int(x) for x in p["expression"].split(" * "))
        assert int(p["answer"]) == a * b and p["problem"] == f"What is {a} * {b}?"
        assert p["solution"].endswith(f"\\boxed{{{a * b}}}")
    slipped = [
        s.replace(f"\\boxed{{{a}}}", f"\\boxed{{{int(a) + 10}}}")
        for s, a in zip(solutions, answers)
    ]
    assert math_rewards(slipped, answers) == [0.0] * len(problems)


def test_problems_are_deterministic_distinct_and_extend_with_n():
    first = reasoner.problems("warmup", 60, seed=0)
    assert first == reasoner.problems("warmup", 60, seed=0)
    assert reasoner.problems("warmup", 25, seed=0) == first[:25]
    assert [p["id"] for p in reasoner.problems("warmup", 60, seed=1)] != [p["id"] for p in first]
    assert len({p["expression"] for p in first}) == 60
    shares = [
        p["num_partials"] for p in reasoner.problems("warmup", 60, seed=0, three_digit_share=0)
    ]
    assert set(shares) == {2}  # two-digit first factors only


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(split="train", n=3, seed=0), "split must be one of"),
        (dict(split="rl", n=-1, seed=0), "n must be"),
        (dict(split="rl", n=3, seed="0"), "seed must be"),
        (dict(split="rl", n=3, seed=0, three_digit_share=1.5), "three_digit_share"),
        (dict(split="heldout", n=113, seed=0, three_digit_share=0.0), "holds only 112 products"),
    ],
)
def test_problems_refuse_bad_arguments_by_name(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        reasoner.problems(**kwargs)


def test_problems_follow_the_asked_mixture_of_two_and_three_digit_factors():
    n, share = 400, 0.5
    drawn = reasoner.problems("warmup", n, seed=0, three_digit_share=share)
    three = sum(len(p["expression"].split(" * ")[0]) == 3 for p in drawn)
    assert abs(three - share * n) < 4 * math.sqrt(n * share * (1 - share))  # binomial, 4 sd
    assert {p["num_partials"] for p in drawn} == {2, 3}  # 3-digit factors with a zero digit: 2
    two_only = reasoner.problems("heldout", 112, seed=0, three_digit_share=0.0)
    assert sorted(p["expression"] for p in two_only) == sorted(
        f"{a} * {b}" for a, b in reasoner.split_space("heldout")[2]
    )  # the whole kind, each product once


def test_the_splits_partition_the_problem_space_in_their_shares():
    space = [f"{a} * {b}" for a in range(10, 1000) for b in range(2, 10)]
    counts = {name: 0 for name, _ in reasoner.SPLITS}
    for expression in space:
        counts[reasoner.split_of(expression)] += 1
    for name, share in reasoner.SPLITS:  # a hash split: binomial counts, within 4 sd
        sd = math.sqrt(len(space) * share * (1 - share))
        assert abs(counts[name] - share * len(space)) < 4 * sd, (name, counts)
    spaces = [reasoner.split_space(name) for name, _ in reasoner.SPLITS]
    # the task: a of two or three digits, at least two of them nonzero; b from 2 to 9
    task = {
        (a, b) for a in range(10, 1000) for b in range(2, 10) if sum(d != "0" for d in str(a)) > 1
    }
    assert sorted(pair for space in spaces for pairs in space.values() for pair in pairs) == sorted(
        task
    )
    drawn = {name: reasoner.problems(name, 200, seed=7) for name, _ in reasoner.SPLITS}
    for name, problems in drawn.items():
        assert {reasoner.split_of(p["expression"]) for p in problems} == {name}
    sets = [{p["expression"] for p in problems} for problems in drawn.values()]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])


def test_trainer_and_experiments_draw_from_the_rl_and_heldout_splits():
    cfg = TrainConfig.fast_reasoner(num_problems=200)
    assert cfg.model == reasoner.REASONER and cfg.task == "reasoner"
    pool = training_problems(cfg)
    held = experiments.heldout_problems(cfg, 60)
    assert len(pool) == 200 and len(held) == 60
    assert {reasoner.split_of(p["expression"]) for p in pool} == {"rl"}
    assert {reasoner.split_of(p["expression"]) for p in held} == {"heldout"}
    assert not {p["problem"] for p in pool} & {p["problem"] for p in held}
    # the run seed only reorders the pool
    other = training_problems(cfg.replace(seed=1))
    assert sorted(p["id"] for p in other) == sorted(p["id"] for p in pool)
    assert task_defaults(cfg) == (reasoner.TEMPLATE_NAME, True)
    assert task_defaults(cfg.replace(require_boxed=False)) == (reasoner.TEMPLATE_NAME, False)
    with pytest.raises(ValueError, match="TrainConfig.task='bogus'"):
        TrainConfig(task="bogus")
    with pytest.raises(ValueError, match="TrainConfig.num_problems=512: .* holds only 155"):
        training_problems(TrainConfig(task="reasoner", num_problems=512))


def test_prompt_template_is_registered_without_examples(tokenizer):
    assert data.PROMPT_TEMPLATES[reasoner.TEMPLATE_NAME] == reasoner.TEMPLATE
    prompt = data.build_prompt(tokenizer, "What is 37 * 6?", reasoner.TEMPLATE_NAME)
    assert prompt.count("<|im_start|>user") == 1  # no example turns
    assert "What is 37 * 6?\nWork it out by place value" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")


# ---- the completion-only loss ----------------------------------------------------------------


def test_pad_batch_labels_only_the_completion():
    rows = [([5, 6, 7, 8, 9], 2), ([3, 4, 1], 1)]  # (ids, prompt length)
    ids, mask, labels = reasoner.pad_batch(rows, pad_id=0)
    assert ids.tolist() == [[5, 6, 7, 8, 9], [3, 4, 1, 0, 0]]
    assert mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert labels.tolist() == [[-100, -100, 7, 8, 9], [-100, 4, 1, -100, -100]]
    with pytest.raises(ValueError, match="leaves no completion"):
        reasoner.pad_batch([([5, 6], 2)], pad_id=0)


def test_encode_examples_puts_prompt_then_target_then_eos(tokenizer):
    rows = reasoner.encode_examples(tokenizer, ["Q: 2*3?\n"], ["2*3 = \\boxed{6}"])
    ids, prompt_len = rows[0]
    assert ids[:prompt_len] == tokenizer("Q: 2*3?\n", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids[prompt_len:-1]) == "2*3 = \\boxed{6}"
    assert ids[-1] == tokenizer.eos_token_id
    with pytest.raises(ValueError, match="2 prompts but 1 targets"):
        reasoner.encode_examples(tokenizer, ["a", "b"], ["c"])


def _peaked_tiny_model(V: int, dtype: torch.dtype) -> torch.nn.Module:
    """tiny-random with its (tied) embeddings scaled up, so that its token log-probs differ from
    one position to the next (at the default init they are all close to -ln V)."""
    model = models.tiny_random_model(V, seed=1, hidden_size=32).to(dtype).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(40.0)
    return model


def test_completion_loss_is_the_mean_negative_log_softmax_over_completion_tokens():
    V = 40
    model = _peaked_tiny_model(V, torch.float32)
    rows = [([3, 9, 4, 11, 25, 7, 2], 3), ([12, 5, 30, 8], 2), ([6, 17, 21, 13, 1], 4)]
    ids, mask, labels = reasoner.pad_batch(rows, pad_id=0)
    loss = reasoner.completion_loss(model, ids, mask, labels)

    # float64 reference: each row alone (no padding), the full model's logits; position t is
    # predicted by the logits at t - 1
    ref_model = _peaked_tiny_model(V, torch.float64)
    completion, prompt = [], []
    with torch.no_grad():
        for tokens, prompt_len in rows:
            logits = ref_model(input_ids=torch.tensor([tokens])).logits[0]  # (L, V) float64
            logp = torch.log_softmax(logits, dim=-1)
            nll = [-logp[t - 1, tokens[t]] for t in range(1, len(tokens))]
            completion += nll[prompt_len - 1 :]
            prompt += nll[: prompt_len - 1]
    expected = torch.stack(completion).mean()
    assert len(completion) == 4 + 2 + 1  # 7 completion tokens
    # float32 forward of a 2-layer model with O(10) logits: a few hundred float32 eps (1.2e-7)
    rtol = 3e-5
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), expected, rtol=rtol, atol=0)
    # the prompt positions are out: counting them too would give another number, far outside rtol
    with_prompt = torch.stack(completion + prompt).mean()
    assert abs(with_prompt - expected) > 100 * rtol * expected
    with pytest.raises(ValueError, match="no position to learn"):
        reasoner.completion_loss(model, ids, mask, torch.full_like(ids, -100))


def test_train_sft_lowers_the_loss_of_its_examples_and_is_seeded():
    V = 40
    rows = [([3, 9, 4, 11, 25, 7, 2], 3), ([12, 5, 30, 8], 2), ([6, 17, 21, 13, 1], 4)]
    settings = reasoner.ReasonerSettings(steps=8, batch_size=3, lr=1e-2, warmup_steps=0, bf16=False)
    curves = []
    for _ in range(2):
        model = models.tiny_random_model(V, seed=2, hidden_size=32)
        curves.append(reasoner.train_sft(model, rows, settings, pad_id=0, progress=False))
        assert not model.training
    assert [r["loss"] for r in curves[0]] == [r["loss"] for r in curves[1]]
    assert curves[0][-1]["loss"] < 0.7 * curves[0][0]["loss"]  # 3.74 -> 2.20 here
    assert [r["step"] for r in curves[0]] == list(range(8))
    assert all(r["tokens"] == 7 for r in curves[0])  # all three rows each step: 7 completion tokens


def test_lr_schedule_warms_up_linearly_then_decays_by_cosine_to_zero():
    s = reasoner.ReasonerSettings(steps=10, warmup_steps=2)
    factors = [reasoner._lr_factor(step, s) for step in range(10)]
    assert factors[:2] == [0.5, 1.0]
    assert factors[2] == 1.0 and all(a > b for a, b in zip(factors[2:], factors[3:]))
    assert factors[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 8)))


# ---- settings, cache key, build ----------------------------------------------------------------


def test_settings_presets_and_cache_key():
    ci, laptop = reasoner.ReasonerSettings.ci(), reasoner.ReasonerSettings.laptop()
    assert ci.steps < laptop.steps and ci.key() != laptop.key()
    assert reasoner.ReasonerSettings.for_size("ci") == ci
    assert reasoner.ReasonerSettings.for_size("laptop") == laptop
    with pytest.raises(ValueError, match="size must be one of"):
        reasoner.ReasonerSettings.for_size("huge")
    assert laptop.key() == reasoner.ReasonerSettings.laptop().key()  # stable
    assert laptop.folder_name == f"smollm2-135m-reasoner-{laptop.key()}"
    changed = {
        "base": "tiny-random",
        "seed": 1,
        "num_examples": 7,
        "three_digit_share": 0.25,
        "steps": 30,
        "batch_size": 2,
        "lr": 1e-5,
        "warmup_steps": 0,
        "weight_decay": 0.1,
        "max_grad_norm": 0.5,
        "bf16": not laptop.bf16,
    }
    assert set(changed) == {f.name for f in dataclasses.fields(laptop)}  # every field tried
    keys = {dataclasses.replace(laptop, **{k: v}).key() for k, v in changed.items()}
    assert len(keys) == len(changed) and laptop.key() not in keys


@pytest.mark.parametrize(
    "field, value",
    [
        ("steps", 0),
        ("batch_size", 1.5),
        ("num_examples", 0),
        ("lr", 0.0),
        ("warmup_steps", 99),
        ("three_digit_share", -0.1),
        ("weight_decay", -1.0),
        ("max_grad_norm", -1.0),
        ("base", ""),
        ("seed", "0"),
    ],
)
def test_settings_refuse_bad_values_by_name(field, value):
    with pytest.raises(ValueError, match=f"ReasonerSettings.{field}="):
        reasoner.ReasonerSettings(**{field: value})


def test_build_saves_a_loadable_model_with_its_settings_curve_and_problems(tiny_build):
    root, folder = tiny_build
    assert folder == root / TINY.folder_name and reasoner.is_built(folder)
    info = json.loads((folder / "reasoner.json").read_text())
    assert info["settings"] == dataclasses.asdict(TINY) and info["key"] == TINY.key()
    assert {"torch", "transformers"} <= set(info["versions"])
    curve = (folder / "loss_curve.csv").read_text().splitlines()
    assert curve[0].startswith("step,loss,lr") and len(curve) == 1 + TINY.steps
    warmup = read_jsonl(folder / "warmup_problems.jsonl")
    assert len(warmup) == TINY.num_examples
    assert {reasoner.split_of(p["expression"]) for p in warmup} == {"warmup"}
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no staging folder left
    model, tokenizer = models.load_policy(str(folder))
    assert model.config.hidden_size == 64 and not model.training
    assert tokenizer.eos_token_id is not None


def test_a_second_build_loads_from_the_cache_without_training(tiny_build, monkeypatch):
    root, folder = tiny_build

    def refuse(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(reasoner, "train_sft", refuse)
    again = reasoner.build_reasoner(
        TINY, cache_root=root, load_base=refuse, build_prompt=refuse, progress=False
    )
    assert again == folder


def test_a_folder_without_its_marker_is_built_again(tmp_path):
    settings = dataclasses.replace(TINY, steps=1, warmup_steps=0)
    partial = tmp_path / settings.folder_name
    partial.mkdir()
    (partial / "model.safetensors").write_text("cut short")
    folder = reasoner.build_reasoner(
        settings,
        cache_root=tmp_path,
        load_base=models.load_policy,
        build_prompt=data.build_prompt,
        progress=False,
    )
    assert folder == partial and reasoner.is_built(folder)
    assert (folder / "model.safetensors").stat().st_size > 1000


def test_models_build_the_reasoner_of_the_run_size_beside_the_converted_model(
    tiny_build, monkeypatch
):
    calls = []

    def fake_build(settings, **kwargs):
        calls.append((settings, kwargs))
        return tiny_build[1]

    monkeypatch.setenv("NTHR_BOOK_SIZE", "ci")
    monkeypatch.setattr(reasoner, "build_reasoner", fake_build)
    assert models.reasoner_dir() == tiny_build[1]
    settings, kwargs = calls[0]
    assert settings == reasoner.ReasonerSettings.ci()
    assert kwargs["cache_root"] == config.cache_dir()  # beside the converted embedded model
    assert kwargs["load_base"] is models.load_policy
    assert kwargs["build_prompt"] is data.build_prompt
    monkeypatch.setattr(models, "reasoner_dir", lambda: tiny_build[1])
    model, _ = models.load_policy(models.REASONER)
    assert model.config.hidden_size == 64  # the tiny build, read from its folder


@pytest.mark.slow
def test_a_two_step_warm_up_of_the_embedded_model_loads_and_answers(tmp_path):
    from nthr_book.groups import sample_groups

    settings = reasoner.ReasonerSettings(num_examples=8, steps=2, batch_size=2, warmup_steps=0)
    folder = reasoner.build_reasoner(
        settings,
        cache_root=tmp_path,
        load_base=models.load_policy,
        build_prompt=data.build_prompt,
        progress=False,
    )
    try:
        model, tokenizer = models.load_policy(str(folder))
        groups = sample_groups(
            model,
            tokenizer,
            reasoner.problems("heldout", 2, seed=0),
            group_size=2,
            max_new_tokens=8,
            temperature=1.0,
            template=reasoner.TEMPLATE_NAME,
        )
        assert [g.group_size for g in groups] == [2, 2]
    finally:
        shutil.rmtree(folder)  # 0.5 GB of weights: not left to pytest's kept tmp folders
