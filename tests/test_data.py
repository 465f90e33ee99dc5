"""Tests for nthr_book.data: benchmark loaders, the MATH train loader, arithmetic problems,
prompts."""

from __future__ import annotations

import ast
import json
import math
import operator
from pathlib import Path

import datasets
import pytest

from nthr_book import config, data, rewards
from nthr_book.data import (
    BENCHMARKS,
    PROMPT_TEMPLATES,
    DataNotAvailableError,
    arithmetic_problems,
    build_prompt,
    format_problem,
    load_benchmark,
    load_math_train,
)

SHARED = config.shared_eval_dir()
needs_shared = pytest.mark.skipif(SHARED is None, reason="../shared/data/eval is absent")

ROW_COUNTS = {
    "aime24": 30,
    "amc23": 40,
    "math500": 500,
    "minerva_math": 272,
    "olympiadbench": 675,
    "gsm8k": 1319,
}


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    """No $NTHR_BOOK_DATA, an empty project data/, no shared folder and an unreachable hub."""
    project_data = tmp_path / "project_data"
    project_data.mkdir()
    monkeypatch.delenv(data.DATA_ENV, raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(config, "data_dir", lambda: project_data)
    monkeypatch.setattr(config, "shared_eval_dir", lambda: None)
    monkeypatch.setattr(data, "_hub_reachable", lambda timeout=0: False)
    return tmp_path


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------ shared benchmarks


@pytest.fixture(scope="module")
def benchmarks() -> dict:
    if SHARED is None:
        pytest.skip("../shared/data/eval is absent")
    return {name: load_benchmark(name, data_dir=SHARED) for name in BENCHMARKS}


@needs_shared
@pytest.mark.parametrize("name", BENCHMARKS)
def test_row_counts_and_string_columns(benchmarks, name):
    ds = benchmarks[name]
    assert len(ds) == ROW_COUNTS[name]
    for col in ("id", "problem", "answer"):
        assert col in ds.column_names
        values = ds[col]
        assert all(isinstance(v, str) and v.strip() for v in values), col
    assert len(set(ds["id"])) == len(ds), "ids must be unique"


@needs_shared
def test_known_rows(benchmarks):
    aime = benchmarks["aime24"]
    assert aime[0]["answer"] == "204"
    assert "023" in aime["answer"]  # zero padding kept as given
    amc = benchmarks["amc23"]
    assert amc[0]["answer"] == "27"  # JSON 27.0
    assert amc[15]["answer"] == "-1"  # JSON -1.0
    minerva = benchmarks["minerva_math"]
    assert minerva[0]["answer"] == "1.6"  # ...=\boxed{1.6} \mathrm{~cm}
    assert minerva[1]["answer"] == "4.5e33"
    # nested braces inside the box: balanced extraction, not a [^}]* regex
    assert minerva[12]["answer"].startswith("\\frac{2 \\pi c^{2} R^{2}}{\\lambda^{5}\\left[")
    assert minerva[12]["answer"].endswith("\\right] d^{2}}")
    olympiad = benchmarks["olympiadbench"]
    assert olympiad[0]["answer"] == "2"
    assert olympiad[1]["answer"] == "\\frac{1}{2 n+2}"  # '$\frac{1}{2 n+2}$'
    by_id = {r["id"]: r for r in olympiad}
    assert "69,84" in olympiad["answer"]  # ['$69$,$84$']
    assert any(r["is_multiple_answer"] for r in by_id.values())
    assert not any("$" in a.replace("\\$", "") for a in olympiad["answer"])
    gsm = benchmarks["gsm8k"]
    assert gsm[0]["answer"] == "18"
    assert "2125" in gsm["answer"]  # '#### 2,125' without the thousands comma
    math500 = benchmarks["math500"]
    assert math500[0]["answer"] == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert {"level", "subject", "unique_id"} <= set(math500.column_names)
    assert math500[0]["unique_id"] == "test/precalculus/807.json" and math500[0]["level"] == 2


@needs_shared
@pytest.mark.parametrize("name", BENCHMARKS)
def test_boxed_gold_is_graded_correct(benchmarks, name):
    answers = benchmarks[name]["answer"]
    scores = rewards.math_rewards([f"\\boxed{{{a}}}" for a in answers], list(answers))
    assert sum(scores) >= 0.99 * len(answers)


@needs_shared
def test_converted_answers_equal_the_raw_source_answers(benchmarks):
    """The conversion keeps the value: the grader accepts the converted answer against the raw
    field."""
    raw_amc = [
        json.loads(line)["answer"] for line in (SHARED / "amc23.jsonl").read_text().splitlines()
    ]
    raw_gsm = [
        json.loads(line)["answer"].split("####")[-1].strip()
        for line in (SHARED / "gsm8k.jsonl").read_text().splitlines()
    ]
    completions = [
        f"\\boxed{{{a}}}"
        for a in list(benchmarks["amc23"]["answer"]) + list(benchmarks["gsm8k"]["answer"])
    ]
    golds = [str(a) for a in raw_amc] + raw_gsm
    assert rewards.math_rewards(completions, golds) == [1.0] * len(golds)


# ------------------------------------------------------------------------------ search order


def test_search_order_data_dir_then_env_then_project(isolated, monkeypatch):
    arg_dir, env_dir = isolated / "arg", isolated / "env"
    arg_dir.mkdir()
    env_dir.mkdir()
    row = {"id": 1, "problem": "p", "answer": "001"}
    write_jsonl(config.data_dir() / "aime24.jsonl", [row | {"answer": "3"}])
    assert load_benchmark("aime24")[0]["answer"] == "3"  # project data/
    write_jsonl(env_dir / "aime24.jsonl", [row | {"answer": "2"}])
    monkeypatch.setenv(data.DATA_ENV, str(env_dir))
    assert load_benchmark("aime24")[0]["answer"] == "2"  # $NTHR_BOOK_DATA beats data/
    write_jsonl(arg_dir / "aime24.jsonl", [row])
    assert (
        load_benchmark("aime24", data_dir=arg_dir)[0]["answer"] == "001"
    )  # the argument beats both
    # a folder without the file falls through to the next one
    assert load_benchmark("aime24", data_dir=isolated)[0]["answer"] == "2"
    dirs = [where for where, _ in data.benchmark_search_dirs(arg_dir)]
    assert dirs == ["data_dir argument", f"${data.DATA_ENV}", "project data/"]


@needs_shared
def test_shared_folder_is_last_local_source(monkeypatch, tmp_path):
    monkeypatch.delenv(data.DATA_ENV, raising=False)
    monkeypatch.setattr(config, "data_dir", lambda: tmp_path)
    assert data.benchmark_search_dirs()[-1] == ("shared eval folder", SHARED)
    assert len(load_benchmark("amc23")) == 40


def test_missing_folders_raise(isolated, monkeypatch):
    with pytest.raises(FileNotFoundError, match="data_dir="):
        load_benchmark("aime24", data_dir=isolated / "nope")
    monkeypatch.setenv(data.DATA_ENV, str(isolated / "nope"))
    with pytest.raises(FileNotFoundError, match=data.DATA_ENV):
        load_benchmark("aime24")


def test_not_found_offline_names_benchmark_and_folders(isolated):
    with pytest.raises(DataNotAvailableError) as info:
        load_benchmark("math500", data_dir=isolated)
    msg = str(info.value)
    assert "'math500'" in msg and str(isolated / "math500.jsonl") in msg
    assert str(config.data_dir() / "math500.jsonl") in msg and "HuggingFaceH4/MATH-500" in msg


def test_hub_probe(monkeypatch):
    for key in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv(
        "HF_ENDPOINT", "http://127.0.0.1:1"
    )  # nothing listens on port 1: refused at once
    assert data._hub_reachable(timeout=2.0) is False
    monkeypatch.setenv(
        "HTTPS_PROXY", "http://127.0.0.1:1"
    )  # behind a proxy the download itself decides
    assert data._hub_reachable(timeout=2.0) is True


def test_hub_failure_becomes_clear_error(isolated, monkeypatch):

    def fail(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub")

    monkeypatch.setattr(data, "_hub_reachable", lambda timeout=0: True)
    monkeypatch.setattr(datasets, "load_dataset", fail)
    with pytest.raises(DataNotAvailableError, match=r"gsm8k.*ConnectionError"):
        load_benchmark("gsm8k")


def test_hub_rows_are_converted(isolated, monkeypatch):
    """Hub copies use other field names (question/answer); the same converters handle them."""
    calls = []

    def fake(hub_id, config_name=None, split=None):
        calls.append((hub_id, config_name, split))
        return datasets.Dataset.from_list([{"question": "q?", "answer": "\\frac{1}{2}"}])

    monkeypatch.setattr(data, "_hub_reachable", lambda timeout=0: True)
    monkeypatch.setattr(datasets, "load_dataset", fake)
    ds = load_benchmark("minerva_math")
    assert calls == [("math-ai/minervamath", None, "test")]
    assert ds[0] == {
        "id": "minerva_math/0",
        "problem": "q?",
        "answer": "\\frac{1}{2}",
        "subject": "",
    }


def test_unknown_benchmark_lists_valid_names():
    with pytest.raises(ValueError, match="aime24.*gsm8k"):
        load_benchmark("aime25")


# ------------------------------------------------------------------------------ malformed files


@pytest.mark.parametrize(
    ("name", "rows", "bad_line", "match"),
    [
        ("aime24", [{"problem": "a", "answer": "1"}, "{not json"], 2, "not valid JSON"),
        (
            "aime24",
            [{"problem": "a", "answer": "1"}, "", {"problem": "b"}],
            3,
            "missing field 'answer'",
        ),
        ("amc23", [{"problem": "a", "answer": True}], 1, "bool"),
        ("math500", [{"problem": "a", "answer": ""}], 1, "'answer' is empty"),
        ("minerva_math", [{"problem": "a", "solution": "so 5"}], 1, "boxed"),
        ("olympiadbench", [{"question": "a", "final_answer": []}], 1, "final_answer"),
        ("gsm8k", [{"question": "a", "answer": "it is 5"}], 1, "####"),
        ("gsm8k", [[1, 2]], 1, "JSON object"),
    ],
)
def test_malformed_rows_name_file_and_line(isolated, name, rows, bad_line, match):
    path = write_jsonl(isolated / f"{name}.jsonl", rows)
    with pytest.raises(ValueError, match=match) as info:
        load_benchmark(name, data_dir=isolated)
    assert f"{path}:{bad_line}:" in str(info.value)


def test_small_files_convert_each_format(isolated):
    write_jsonl(
        isolated / "amc23.jsonl",
        [{"id": 3, "problem": "p", "answer": 2.5}, {"id": 4, "problem": "p", "answer": -7.0}],
    )
    write_jsonl(
        isolated / "minerva_math.jsonl",
        [
            {
                "idx": 0,
                "problem": "p",
                "type": "Physics",
                "solution": "first \\boxed{1} then $x=\\boxed{\\frac{a}{b^{2}}}$ m",
            }
        ],
    )
    write_jsonl(
        isolated / "olympiadbench.jsonl",
        [
            {
                "id": 9,
                "question": "p",
                "final_answer": ["$3$", "$\\frac{1}{2}$"],
                "is_multiple_answer": True,
            },
            {"id": 10, "question": "p", "final_answer": ["$(-\\infty, 0)$."]},
            {"id": 11, "question": "p", "final_answer": ["costs \\$5"]},
        ],
    )
    write_jsonl(
        isolated / "gsm8k.jsonl", [{"idx": 5, "question": "p", "answer": "x #### 1,234,567"}]
    )
    assert list(load_benchmark("amc23", data_dir=isolated)["answer"]) == ["2.5", "-7"]
    minerva = load_benchmark("minerva_math", data_dir=isolated)[0]
    assert (minerva["answer"], minerva["subject"]) == ("\\frac{a}{b^{2}}", "Physics")
    assert list(load_benchmark("olympiadbench", data_dir=isolated)["answer"]) == [
        "3, \\frac{1}{2}",
        "(-\\infty, 0)",
        "costs \\$5",
    ]
    gsm = load_benchmark("gsm8k", data_dir=isolated)[0]
    assert (gsm["id"], gsm["answer"]) == ("gsm8k/5", "1234567")


# ------------------------------------------------------------------------------ MATH train


def test_math_train_local_file_filters_levels(isolated):
    rows = [
        {
            "problem": f"p{i}",
            "solution": f"so \\boxed{{{i}}}",
            "level": f"Level {lvl}",
            "type": "Algebra",
        }
        for i, lvl in enumerate([1, 3, 5, 4, 2, "?"])
    ]
    write_jsonl(isolated / "math_train.jsonl", rows)
    ds = load_math_train(data_dir=isolated)
    assert list(ds["answer"]) == ["1", "2", "3"] and list(ds["level"]) == [3, 5, 4]
    assert list(load_math_train(levels=[2], data_dir=isolated)["problem"]) == ["p4"]
    with pytest.raises(ValueError, match="levels"):
        load_math_train(levels=(0, 6), data_dir=isolated)
    with pytest.raises(TypeError, match="levels"):
        load_math_train(levels=3, data_dir=isolated)


def test_math_train_offline_error(isolated):
    with pytest.raises(
        DataNotAvailableError, match=r"MATH train split.*math_train\.jsonl.*hendrycks_math"
    ):
        load_math_train()


# ------------------------------------------------------------------------------ arithmetic


_AST_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def _eval_expression(expr: str) -> int:
    """Independent evaluation of '12 + 3 * 4' through Python's own parser (precedence included)."""

    def ev(node):
        if isinstance(node, ast.BinOp) and type(node.op) in _AST_OPS:
            return _AST_OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        raise AssertionError(f"unexpected node {ast.dump(node)}")

    return ev(ast.parse(expr, mode="eval").body)


@pytest.mark.parametrize(
    "knobs",
    [
        {},
        {"ops": ("*",), "left": (10, 99), "right": (2, 99)},
        {"ops": ("+", "-", "*"), "left": (0, 999), "right": (0, 30), "num_operands": 4},
        {
            "ops": ("-",),
            "left": (10, 99),
            "right": (10, 99),
            "num_operands": 3,
            "allow_negative": True,
        },
        {"phrasing": "words", "num_operands": 3},
        {"phrasing": "story"},
    ],
)
def test_arithmetic_answers_are_correct(knobs):
    problems = arithmetic_problems(200, seed=7, **knobs)
    assert len(problems) == 200 and len({p["id"] for p in problems}) == 200
    ops = knobs.get("ops", ("+", "-", "*"))
    for p in problems:
        value = _eval_expression(p["expression"])
        assert p["answer"] == str(value)
        numbers = [int(t) for t in p["expression"].split() if t.isdigit()]
        assert len(numbers) == p["num_operands"] == knobs.get("num_operands", 2)
        assert set(p["ops"]) <= set(ops)
        if not knobs.get("allow_negative"):
            assert value >= 0
        for x in numbers:  # every operand appears in the question text
            assert str(x) in p["problem"]
    if knobs.get("allow_negative"):
        assert any(int(p["answer"]) < 0 for p in problems)


def test_arithmetic_range_knobs():
    problems = arithmetic_problems(
        300, seed=1, ops=("*",), left=(100, 999), right=(2, 9), num_operands=3
    )
    for p in problems:
        a, _, b, _, c = p["expression"].split()
        assert 100 <= int(a) <= 999 and 2 <= int(b) <= 9 and 2 <= int(c) <= 9
        assert p["max_digits"] == 3 and p["ops"] == "**"
    sums = arithmetic_problems(400, seed=1, ops=("+",), left=(3, 5), right=(7, 8))
    pairs = {tuple(int(x) for x in p["expression"].split(" + ")) for p in sums}
    assert pairs == {
        (a, b) for a in (3, 4, 5) for b in (7, 8)
    }  # every value of both ranges is drawn


def test_arithmetic_is_deterministic_in_seed():
    a = arithmetic_problems(50, seed=3)
    assert a == arithmetic_problems(50, seed=3)
    assert a[:20] == arithmetic_problems(
        20, seed=3
    )  # a prefix: question i depends on (seed, i) only
    assert [p["problem"] for p in a] != [p["problem"] for p in arithmetic_problems(50, seed=4)]
    assert a[0]["id"] == "arith/3/0"


def test_arithmetic_split_is_a_fixed_partition():
    train = arithmetic_problems(600, seed=0, split="train")
    test = arithmetic_problems(300, seed=5, split="test")
    train_q, test_q = {p["expression"] for p in train}, {p["expression"] for p in test}
    assert not train_q & test_q
    everything = {
        p["expression"] for p in arithmetic_problems(20000, seed=1)
    }  # the whole default space
    share = sum(data.arithmetic_split(e) == "test" for e in everything) / len(everything)
    # a hash split puts each of the n questions in "test" with probability f: the share is binomial,
    # sd sqrt(f(1 - f)/n); 4 sd is a margin that a fair hash misses once in ~16 000 question spaces
    f = data.ARITHMETIC_TEST_FRACTION
    assert abs(share - f) <= 4 * math.sqrt(f * (1 - f) / len(everything))
    assert all(data.arithmetic_split(e) == "test" for e in test_q)
    with pytest.raises(ValueError, match="split"):
        arithmetic_problems(3, seed=0, split="val")
    with pytest.raises(ValueError, match="1000 tries"):  # 2 + 2 alone: hashed into one split only
        arithmetic_problems(
            1,
            seed=0,
            ops=("+",),
            left=(2, 2),
            right=(2, 2),
            split="train" if data.arithmetic_split("2 + 2") == "test" else "test",
        )


def test_arithmetic_default_mix_has_every_op():
    problems = arithmetic_problems(300, seed=0)
    assert {p["ops"] for p in problems} == {"+", "-", "*"}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ops": ("/",)}, "ops"),
        ({"ops": ()}, "ops"),
        ({"left": 5}, "left"),
        ({"left": (3, 2)}, "left"),
        ({"left": (-1, 2)}, "left"),
        ({"right": (1.0, 2)}, "right"),
        ({"right": "29"}, "right"),
        ({"num_operands": 1}, "num_operands"),
        ({"phrasing": "poem"}, "phrasing"),
        ({"phrasing": "story", "num_operands": 3}, "story"),
    ],
)
def test_arithmetic_bad_knobs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        arithmetic_problems(3, seed=0, **kwargs)


def test_arithmetic_bad_n_and_seed():
    with pytest.raises(ValueError, match="n must be"):
        arithmetic_problems(-1, seed=0)
    with pytest.raises(TypeError, match="seed"):
        arithmetic_problems(3, seed="0")
    assert arithmetic_problems(0, seed=0) == []


def test_arithmetic_reward_settings_match_template():
    """Tuned defaults are wired together: the template shows the boxed format the reward
    requires."""
    assert isinstance(data.ARITHMETIC_REQUIRE_BOXED, bool)
    assert PROMPT_TEMPLATES["arithmetic"] == data.ARITHMETIC_TEMPLATE
    if data.ARITHMETIC_REQUIRE_BOXED:
        assert "\\boxed{" in data.ARITHMETIC_TEMPLATE
    assert 16 <= data.ARITHMETIC_MAX_NEW_TOKENS <= 96


# ------------------------------------------------------------------------------ prompts


class _PlainTokenizer:
    chat_template = None


@pytest.fixture(scope="module")
def tokenizer():
    from nthr_book.models import ModelNotAvailableError, load_tokenizer

    try:
        return load_tokenizer()
    except ModelNotAvailableError as exc:
        pytest.skip(str(exc))


def test_build_prompt_embedded_chat_template(tokenizer):
    problem = "What is 12 + 30?"
    prompt = build_prompt(tokenizer, problem)
    assert "<|im_start|>user\n" + problem in prompt
    assert "Please reason step by step, and put your final answer within \\boxed{}." in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    arith = build_prompt(tokenizer, problem, template="arithmetic")
    question = format_problem(problem, "arithmetic")
    assert arith.endswith("<|im_start|>user\n" + question + "<|im_end|>\n<|im_start|>assistant\n")
    for shown, response in data.ARITHMETIC_EXAMPLES:  # solved examples come first, as earlier turns
        turn = (
            f"<|im_start|>user\n{format_problem(shown, 'arithmetic')}<|im_end|>\n"
            f"<|im_start|>assistant\n{response}<|im_end|>\n"
        )
        assert turn in arith and arith.index(turn) < arith.index(question)
    assert arith.count("<|im_start|>assistant") == len(data.ARITHMETIC_EXAMPLES) + 1
    bare = build_prompt(tokenizer, problem, template="arithmetic", examples=())
    assert bare == tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )
    shot = build_prompt(tokenizer, problem, examples=[("What is 1 + 1?", "It is \\boxed{2}.")])
    assert "<|im_start|>assistant\nIt is \\boxed{2}.<|im_end|>" in shot
    assert shot.endswith(prompt[prompt.index("<|im_start|>user") :])  # then the same question turn
    plain = build_prompt(tokenizer, problem, template="plain")
    assert "<|im_start|>user\n" + problem + "<|im_end|>" in plain
    custom = build_prompt(tokenizer, problem, template="Q: {problem} Put it in \\boxed{}.")
    assert "Q: What is 12 + 30? Put it in \\boxed{}." in custom


def test_format_problem_keeps_braces():
    problem = "Let $f(x)=\\frac{1}{x}$ and {a}. Find $f(2)$."
    assert (
        format_problem(problem)
        == problem + "\nPlease reason step by step, and put your final answer within \\boxed{}."
    )
    assert format_problem(problem, "plain") == problem
    assert format_problem("{problem}", "[{problem}]") == "[{problem}]"


def test_build_prompt_without_chat_template_is_plain_text():
    assert build_prompt(_PlainTokenizer(), "2+2?", template="plain") == "2+2?"
    assert (
        build_prompt(_PlainTokenizer(), "2+2?")
        == "2+2?\n" + PROMPT_TEMPLATES["boxed"].split("\n", 1)[1]
    )


def test_build_prompt_plain_text_examples():
    text = build_prompt(
        _PlainTokenizer(), "5+5?", template="{problem} =", examples=[("1+1?", "2"), ("2+2?", "4")]
    )
    assert text == "1+1? =\n\n2\n\n2+2? =\n\n4\n\n5+5? ="


@pytest.mark.parametrize("examples", ["Q A", [("only one",)], [("q", 3)], [["q", "a", "b"]], 5])
def test_build_prompt_bad_examples(examples):
    with pytest.raises(TypeError, match="examples"):
        build_prompt(_PlainTokenizer(), "2+2?", examples=examples)


def test_build_prompt_unknown_template_lists_names():
    with pytest.raises(ValueError, match="arithmetic.*boxed.*plain"):
        build_prompt(_PlainTokenizer(), "2+2?", template="fancy")
    with pytest.raises(TypeError, match="problem"):
        build_prompt(_PlainTokenizer(), 4)
