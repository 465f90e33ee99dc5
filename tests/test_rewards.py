"""Tests for nthr_book.rewards: boxed extraction, math-verify equivalences, hostile output.

No test here measures time: on hostile output they check the answer and that the caller waits on
the math-verify worker only with ``timeout_s`` (and that the answers sympy cannot finish end in
that timeout). How the times grow is ``bench/rewards_speed.py``'s business.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from nthr_book import rewards
from nthr_book.rewards import extract_boxed, math_reward, math_rewards

ADV_TIMEOUT_S = 0.5  # timeout_s used for adversarial inputs


@pytest.fixture(scope="module", autouse=True)
def _workers():
    """One warm math-verify worker for the module; killed at the end."""
    rewards.warm_up()
    yield
    rewards.shutdown_workers()


@pytest.fixture
def worker_waits(monkeypatch):
    """Every wait on a worker from now on: ``waits`` lists (timeout, answered) of each
    ``_Worker.recv`` (from any thread) and ``discards`` counts the workers killed (a timeout or a
    crash)."""
    log = {"waits": [], "discards": 0}
    recv, discard = rewards._Worker.recv, rewards._discard

    def spy_recv(self, timeout):
        msg = recv(self, timeout)
        log["waits"].append((timeout, msg is not None))
        return msg

    def spy_discard(w, respawn=True):
        log["discards"] += 1
        return discard(w, respawn)

    monkeypatch.setattr(rewards._Worker, "recv", spy_recv)
    monkeypatch.setattr(rewards, "_discard", spy_discard)
    return log


# ---------------------------------------------------------------------------------------------
# extract_boxed
# ---------------------------------------------------------------------------------------------

EXTRACT_CASES = [
    ("The answer is \\boxed{5}.", "5"),
    ("\\boxed{1} then \\boxed{2}", "2"),  # last one wins
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # nested braces
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces do not count
    ("\\boxed{a\\\\}b}", "a\\\\"),  # \\ is a line break, then } closes
    ("\\fbox{7}", "7"),
    ("\\boxed{3} and \\fbox{4}", "4"),
    ("\\boxed {3}", "3"),
    ("\\boxed 5", "5"),
    ("\\boxed 42.", "42"),
    ("\\boxed \\pi", "\\pi"),
    ("\\boxed{\\boxed{8}}", "8"),
    ("\\boxed{}", ""),
    ("\\boxed{1} \\fboxsep=2pt", "1"),  # \fboxsep is not a box
    ("\\boxed{1", None),  # unbalanced
    ("\\boxed{a} and then \\boxed{b", None),  # the last one is unbalanced
    ("no box here: 5", None),
    ("\\boxed", None),
    ("", None),
]


@pytest.mark.parametrize(("text", "expected"), EXTRACT_CASES)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "\\boxed{" + "{" * 300_000 + "x" + "}" * 300_000 + "}",
            "{" * 300_000 + "x" + "}" * 300_000,
        ),
        ("\\boxed{" + "{" * 600_000, None),
        ("\\boxed{1} " * 10_000 + "\\boxed{2}", "2"),
        ("x" * 1_000_000 + "\\boxed{3}", "3"),
        ("\\boxedx" * 100_000, None),
    ],
    ids=["deep-nesting", "deep-unbalanced", "10k-boxes", "megabyte-prefix", "100k-non-boxes"],
)
def test_extract_boxed_on_huge_inputs(text, expected):
    # the answer only: that the time grows linearly is bench/rewards_speed.py's (t(2n) / t(n))
    assert extract_boxed(text) == expected


# ---------------------------------------------------------------------------------------------
# math_reward: equivalent forms, wrong answers, format
# ---------------------------------------------------------------------------------------------

EQUIVALENT = [
    ("\\boxed{\\dfrac{14}{3}}", "\\frac{14}{3}"),
    ("\\boxed{\\tfrac{1}{2}}", "\\frac12"),
    ("\\boxed{0.5}", "\\frac12"),
    ("\\boxed{\\frac12}", "0.5"),
    ("\\boxed{-\\frac{1}{2}}", "-0.5"),
    ("\\boxed{27}", "27.0"),
    ("\\boxed{27.0}", "27"),
    ("\\boxed{23}", "023"),
    ("\\boxed{023}", "23"),
    ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "(3, \\frac{\\pi}{2})"),
    ("\\boxed{(3,\\pi/2)}", "(3, \\frac{\\pi}{2})"),
    ("\\boxed{5 \\text{ cm}}", "5"),
    ("\\boxed{12\\text{ apples}}", "12"),
    ("\\boxed{\\$5}", "5"),
    ("\\boxed{50\\%}", "50"),
    ("\\boxed{50\\%}", "0.5"),
    ("\\boxed{90^\\circ}", "90"),
    ("\\boxed{90^{\\circ}}", "90"),
    ("\\boxed{x = 5}", "5"),
    ("So the final answer is \\boxed{5}, as required.", "5"),
    ("\\boxed{(-\\infty, \\frac{4}{2}]}", "(-\\infty, 2]"),
    ("\\boxed{[1,3)}", "[1, 3)"),
    ("\\boxed{\\{2, 1\\}}", "\\{1, 2\\}"),
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}"),
    ("\\boxed{\\dfrac{\\sqrt{3}}{2}}", "\\frac{\\sqrt3}{2}"),
    ("\\boxed{1,000}", "1000"),
    ("\\boxed{1+x^2}", "x^2+1"),
    ("\\fbox{12}", "12"),
    ("\\boxed 7", "7"),
    ("$\\boxed{4}$", "\\boxed{4}"),  # gold may come boxed
]

WRONG = [
    ("\\boxed{6}", "5"),
    ("\\boxed{\\frac{14}{5}}", "\\frac{14}{3}"),
    ("\\boxed{0.5}", "50"),
    ("\\boxed{230}", "023"),
    ("\\boxed{1,001}", "1000"),
    ("\\boxed{x^2-1}", "x^2+1"),
    ("\\boxed{(3, \\pi)}", "(3, \\frac{\\pi}{2})"),
    ("\\boxed{(2, 1)}", "(1, 2)"),
    ("\\boxed{[1, 3]}", "[1, 3)"),
    ("\\boxed{3\\sqrt{2}}", "\\sqrt{8}"),
    ("\\boxed{y = 5}", "x = 5"),
    ("\\boxed{\\frac{\\pi}{2}}", "90^\\circ"),
    ("\\boxed{5} and finally \\boxed{6}", "5"),  # the last box counts
    ("\\boxed{}", "5"),
    ("\\boxed{5", "5"),  # unbalanced
]


@pytest.mark.parametrize(("completion", "gold"), EQUIVALENT)
def test_equivalent_answers_score_one(completion, gold):
    assert math_reward(completion, gold) == 1.0


@pytest.mark.parametrize(("completion", "gold"), WRONG)
def test_wrong_answers_score_zero(completion, gold):
    assert math_reward(completion, gold) == 0.0


@pytest.mark.parametrize(
    ("completion", "gold", "expected_unboxed"),
    [
        ("The answer is 5.", "5", 1.0),
        ("so x = 12", "12", 1.0),
        ("The answer is $\\frac{1}{2}$.", "0.5", 1.0),
        ("3 + 4 = 7, so the answer is 7.", "8", 0.0),
    ],
)
def test_unboxed_rejected_by_default_and_parsed_when_allowed(completion, gold, expected_unboxed):
    assert math_reward(completion, gold) == 0.0
    assert math_reward(completion, gold, require_boxed=False) == expected_unboxed


def test_answer_length_cap():
    long_number = "1" * (rewards.MAX_ANSWER_CHARS + 1)
    assert math_reward("\\boxed{" + long_number + "}", long_number) == 0.0
    assert math_reward("\\boxed{" + long_number[:-2] + "}", long_number[:-2]) == 1.0


def test_fast_path_agrees_with_math_verify():
    """Every case the in-process fast path decides gets the same verdict from math-verify itself."""
    from math_verify import LatexExtractionConfig, parse, verify

    cfg = [LatexExtractionConfig()]
    decided = 0
    for completion, gold in EQUIVALENT + WRONG:
        answer = extract_boxed(completion)
        if not answer:
            continue
        fast = rewards._fast_verdict(answer.strip(), rewards._clean_gold(gold, "gold"))
        if fast is None:
            continue
        decided += 1
        direct = verify(parse("\\boxed{" + gold + "}", cfg), parse("\\boxed{" + answer + "}", cfg))
        assert fast == float(direct), (completion, gold)
    assert decided >= 20  # the fast path covers most of the table


def test_batch_matches_single_calls_and_survives_a_timeout(worker_waits):
    pairs = (
        EQUIVALENT[:8]
        + WRONG[:6]
        + [("\\boxed{9^{9^{9^{9}}}}", "27")]
        + EQUIVALENT[8:16]
        + WRONG[6:10]
    )
    completions, golds = [c for c, _ in pairs], [g for _, g in pairs]
    expected = [1.0] * 8 + [0.0] * 6 + [0.0] + [1.0] * 8 + [0.0] * 4
    timeout_s = 2.0  # generous for the legitimate items, some of which reach sympy
    got = math_rewards(completions, golds, timeout_s=timeout_s)
    assert got == expected
    # the power tower (item 14) timed out: its worker was killed and a fresh one (whose start-up
    # wait is STARTUP_TIMEOUT_S) graded the items after it; every answer was awaited timeout_s
    item_waits = [w for w in worker_waits["waits"] if w[0] != rewards.STARTUP_TIMEOUT_S]
    assert {t for t, _ in item_waits} <= {timeout_s}
    assert [answered for _, answered in item_waits].count(False) == 1
    assert worker_waits["discards"] == 1
    assert math_rewards([], []) == []


def test_concurrent_calls_from_threads():
    pairs = (EQUIVALENT + WRONG) * 2
    expected = ([1.0] * len(EQUIVALENT) + [0.0] * len(WRONG)) * 2
    rewards.warm_up(2)
    with ThreadPoolExecutor(max_workers=4) as pool:
        got = list(pool.map(lambda p: math_reward(*p), pairs))
    assert got == expected


def test_fast_path_needs_no_worker():
    # Plain integer answers are decided in-process: no worker is started. (Its speed is a
    # benchmark's
    # business, not a unit test's: a time limit would depend on the machine.)
    rewards.shutdown_workers()
    completions = [f"We add them up, so the answer is \\boxed{{{k}}}." for k in range(1000)]
    golds = [str(k if k % 3 else k + 1) for k in range(1000)]
    got = [math_reward(c, g) for c, g in zip(completions, golds)]
    assert got == [float(k % 3 != 0) for k in range(1000)]
    assert rewards._pool.count == 0  # decided in-process
    rewards.warm_up()


# ---------------------------------------------------------------------------------------------
# Adversarial output: the caller waits at most timeout_s, from the main thread and from threads
# ---------------------------------------------------------------------------------------------

ADVERSARIAL = [
    ("\\boxed{9^{9^{9^{9}}}}", "27", True, 0.0),
    ("\\boxed{10^{10^{10}}!}", "27", True, 0.0),
    ("\\boxed{" + "{" * 400 + "1" + "}" * 400 + "}", "1", True, 0.0),
    ("\\boxed{" + "{" * 500_000 + "1" + "}" * 500_000 + "}", "1", True, 0.0),
    ("\\boxed{" + "a{" * 500_000, "1", False, None),
    ("x" * 1_000_000 + " \\boxed{27}", "27", True, 1.0),
    ("\\boxed{1} " * 10_000 + "\\boxed{27}", "27", True, 1.0),
    ("1 + " * 250_000, "3", False, None),
]
ADV_IDS = [
    "power-tower",
    "huge-factorial",
    "nest-400",
    "nest-500k",
    "unbalanced-1MB",
    "1MB-text",
    "10k-boxes",
    "1MB-unboxed",
]


# the answers sympy cannot finish on any machine: their calls end by the timeout
TIMES_OUT = {
    c for (c, *_), name in zip(ADVERSARIAL, ADV_IDS) if name in ("power-tower", "huge-factorial")
}


def _reward(completion: str, gold: str, require_boxed: bool) -> float:
    return math_reward(completion, gold, require_boxed=require_boxed, timeout_s=ADV_TIMEOUT_S)


@pytest.mark.parametrize("caller", ["main", "thread", "executor"])
@pytest.mark.parametrize(
    ("completion", "gold", "require_boxed", "expected"), ADVERSARIAL, ids=ADV_IDS
)
def test_adversarial_output_is_bounded(
    completion, gold, require_boxed, expected, caller, worker_waits
):
    rewards.warm_up()  # a worker killed by the previous case restarts here, before the spy counts
    worker_waits["waits"].clear()
    if caller == "main":
        r = _reward(completion, gold, require_boxed)
    elif caller == "thread":
        out: list[float] = []
        th = threading.Thread(target=lambda: out.append(_reward(completion, gold, require_boxed)))
        th.start()
        th.join()
        (r,) = out
    else:
        with ThreadPoolExecutor(max_workers=1) as pool:
            r = pool.submit(_reward, completion, gold, require_boxed).result()
    # the call waited on the worker at most once, for at most timeout_s (the rest is in-process,
    # linear-time scanning; bench/rewards_speed.py times both)
    waits = worker_waits["waits"]
    assert len(waits) <= 1 and all(t == ADV_TIMEOUT_S for t, _ in waits)
    if completion in TIMES_OUT:
        assert waits == [(ADV_TIMEOUT_S, False)] and worker_waits["discards"] == 1, (
            "sympy cannot finish this: the call must end by the timeout, the worker killed"
        )
    assert r in (0.0, 1.0)
    if expected is not None:
        assert r == expected


# ---------------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda: extract_boxed(None), TypeError, "text"),
        (lambda: math_reward(5, "5"), TypeError, "completion"),
        (lambda: math_reward("\\boxed{5}", 5), TypeError, "gold"),
        (lambda: math_reward("\\boxed{5}", "5", require_boxed="yes"), TypeError, "require_boxed"),
        (lambda: math_reward("\\boxed{5}", "5", timeout_s="1"), TypeError, "timeout_s"),
        (lambda: math_reward("\\boxed{5}", "5", timeout_s=0), ValueError, "timeout_s"),
        (lambda: math_reward("\\boxed{5}", "  "), ValueError, "gold"),
        (lambda: math_rewards("\\boxed{5}", ["5"]), TypeError, "completions"),
        (lambda: math_rewards(["\\boxed{5}"], [5]), TypeError, r"golds\[0\]"),
        (lambda: math_rewards(["\\boxed{5}"], ["5", "6"]), ValueError, "golds"),
        (lambda: rewards.warm_up(0), ValueError, "num_workers"),
    ],
)
def test_bad_arguments_name_the_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_is_correct_is_reward_above_threshold():
    import torch

    from nthr_book.rewards import CORRECT_THRESHOLD, is_correct

    assert CORRECT_THRESHOLD == 0.5
    rewards = torch.tensor([0.0, 0.5, 0.51, 1.0], dtype=torch.float64)
    assert is_correct(rewards).tolist() == [False, False, True, True]  # strictly above 0.5
    assert is_correct(rewards, threshold=0.0).tolist() == [False, True, True, True]
    assert is_correct([0.0, 1.0]) == [False, True] and is_correct(1.0) is True
    with pytest.raises(ValueError, match="nan"):
        is_correct(rewards, threshold=float("nan"))
