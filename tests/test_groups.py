"""Tests of nthr_book.groups: the Group type, save/load, and the near-miss, branched and balanced
constructions."""

from __future__ import annotations

import math
import time
from fractions import Fraction

import pytest
import torch

import nthr_book.rewards as rewards_mod
from nthr_book import rollout as rollout_mod
from nthr_book.groups import (
    Group,
    balanced_group,
    branch_prefix_length,
    branched_group,
    branched_groups,
    groups_from_rollouts,
    load_groups,
    load_or_sample_groups,
    near_miss_group,
    near_miss_text,
    save_groups,
)
from nthr_book.models import load_policy, load_tokenizer
from nthr_book.rollout import Rollouts

PROMPT = torch.tensor([5, 6, 7])


def _group(completions: list[list[int]], rewards: list[float], question_id: str = "q") -> Group:
    return Group.from_token_lists(PROMPT, completions, rewards, question_id=question_id)


def test_from_token_lists_pads_and_masks():
    g = Group.from_token_lists([5, 6], [[10, 11, 12], [13]], [1.0, 0.0], pad_id=2, question_id="x")
    assert g.rollouts.completion_ids.tolist() == [[10, 11, 12], [13, 2, 2]]
    assert g.rollouts.completion_mask.tolist() == [[True, True, True], [True, False, False]]
    assert g.rollouts.prompt_ids.tolist() == [[5, 6], [5, 6]]
    assert (g.question_id, g.n_correct, g.p, g.status) == ("x", 1, 0.5, "mixed")
    with pytest.raises(ValueError, match="non-empty"):
        Group.from_token_lists([5], [[10], []], [1.0, 0.0])


def test_groups_save_load_roundtrip_and_trim(tmp_path):
    r = Rollouts(
        prompt_ids=torch.tensor([[0, 5, 6]] * 2 + [[7, 8, 9]] * 2),
        prompt_mask=torch.tensor([[0, 1, 1]] * 2 + [[1, 1, 1]] * 2),
        completion_ids=torch.tensor([[10, 2, 2], [11, 12, 2], [13, 14, 15], [16, 2, 2]]),
        completion_mask=torch.tensor(
            [[1, 0, 0], [1, 1, 0], [1, 1, 1], [1, 0, 0]], dtype=torch.bool
        ),
        texts=["a", "b", "c", "d"],
        truncated=torch.tensor([False, False, True, False]),
        group_size=2,
        prompts=["P0", "P1"],
        meta={"seed": 3},
    )
    groups = groups_from_rollouts(
        r, [[1.0, 0.0], [1.0, 1.0]], ["x", "y"], ["4", "5"], ["two+two", "2+3"]
    )
    assert [g.status for g in groups] == ["mixed", "all_correct"]
    assert groups[0].rollouts.prompt_ids.tolist() == [[5, 6], [5, 6]]  # shared left padding dropped
    assert groups[0].rollouts.completion_ids.tolist() == [
        [10, 2],
        [11, 12],
    ]  # trailing padding dropped
    assert groups[1].rollouts.completion_ids.shape == (2, 3)
    path = save_groups(tmp_path / "g.pt", groups, settings={"seed": 3})
    loaded, settings = load_groups(path, return_settings=True)
    assert settings == {"seed": 3}
    for a, b in zip(groups, loaded):
        assert (a.question_id, a.answer, a.problem, a.rollouts.texts) == (
            b.question_id,
            b.answer,
            b.problem,
            b.rollouts.texts,
        )
        assert torch.equal(a.rewards, b.rewards)
        for name in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "truncated"):
            assert torch.equal(getattr(a.rollouts, name), getattr(b.rollouts, name)), name
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt"):
        load_groups(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_groups(tmp_path / "missing.pt")


def test_near_miss_group_changes_only_the_final_number():

    assert (
        near_miss_text("7 * 3 = 21. The answer is \\boxed{21}.", "21")
        == "7 * 3 = 21. The answer is \\boxed{22}."
    )
    assert near_miss_text("so 4", "5") == "so 6"  # 4 + 1 would be the right answer: skip to 4 + 2
    tok = load_tokenizer()
    texts = [
        "2 + 3 = 5. The answer is \\boxed{5}.",
        "The answer is \\boxed{6}.",
        "no idea",
        "\\boxed{5}",
    ]
    rows = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
    width = max(map(len, rows))
    ids = torch.full((4, width), tok.pad_token_id)
    mask = torch.zeros((4, width), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), True
    prompt = torch.tensor(tok("What is 2 + 3?", add_special_tokens=False)["input_ids"])
    g = Group.from_tensors(
        prompt, ids, mask, [1.0, 0.0, 0.0, 1.0], question_id="q", answer="5", texts=texts
    )
    near = near_miss_group(g, tok)
    assert near.rollouts.texts[0] == texts[0] and near.rollouts.texts[3] == texts[3]
    assert (
        near.rollouts.texts[1] == "2 + 3 = 5. The answer is \\boxed{6}."
    )  # copied from a correct one
    assert near.rollouts.texts[2] == "\\boxed{6}"
    assert torch.equal(near.rewards, g.rewards)
    assert torch.equal(
        near.rollouts.completion_ids[0][near.rollouts.completion_mask[0]], ids[0][mask[0]]
    )


def test_near_miss_group_on_token_ids_shares_every_other_token_and_keeps_truncation():
    """Near-miss rows are their source's token ids with only the final number's tokens changed:
    not a re-tokenisation of the decoded text, and no EOS added to a truncated source."""

    tok = load_tokenizer()

    def enc(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    eos = tok.eos_token_id
    # Correct row 0 ended with EOS; its prefix is spelled one character per token, a split the
    # tokenizer would not make itself (sampled ids need not be the canonical tokenisation).
    prefix0 = [i for ch in "2 + 17 = 19. The answer is \\boxed{" for i in enc(ch)]
    assert prefix0 != enc("2 + 17 = 19. The answer is \\boxed{")
    # Correct row 3 was truncated (no EOS), with a multi-byte character before its final number.
    prefix3 = enc("so 2 + 17 → ")
    rows = [
        prefix0 + enc("19") + enc("}.") + [eos],  # correct
        enc("no idea") + [eos],  # wrong, ended
        enc("it is 7"),  # wrong, truncated
        prefix3 + enc("19") + enc(" and"),
    ]  # correct, truncated
    truncated = [False, True, False, True]  # the wrong rows' flags: the opposite of their sources'
    width = max(map(len, rows))
    ids = torch.full((4, width), tok.pad_token_id)
    mask = torch.zeros((4, width), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), True
    texts = [tok.decode(r, skip_special_tokens=True) for r in rows]
    g = Group.from_tensors(
        torch.tensor(enc("What is 2 + 17?")),
        ids,
        mask,
        [1.0, 0.0, 0.0, 1.0],
        question_id="q",
        answer="19",
        texts=texts,
        truncated=truncated,
    )

    near = near_miss_group(g, tok)

    expected = [
        rows[0],
        prefix0 + enc("20") + enc("}.") + [eos],  # copies row 0: only the answer differs
        prefix3 + enc("20") + enc(" and"),  # copies row 3: still no EOS
        rows[3],
    ]
    r = near.rollouts
    assert [r.completion_ids[i][r.completion_mask[i]].tolist() for i in range(4)] == expected
    assert r.truncated.tolist() == [False, False, True, True]
    assert r.texts[1] == "2 + 17 = 19. The answer is \\boxed{20}."
    assert r.texts[2] == "so 2 + 17 → 20 and"
    grade = rewards_mod.math_rewards
    assert grade([texts[0], r.texts[1]], ["19"] * 2, require_boxed=True) == [1.0, 0.0]
    assert grade([texts[3], r.texts[2]], ["19"] * 2, require_boxed=False) == [1.0, 0.0]
    assert torch.equal(near.rewards, g.rewards) and near.question_id == "q/near-miss"

    words = enc("nineteen")  # a correct answer without digits: no final number to change
    no_number = Group.from_tensors(
        torch.tensor([5]),
        torch.tensor([words, words]),
        torch.ones(2, len(words), dtype=torch.bool),
        [1.0, 0.0],
        question_id="z",
        answer="19",
    )
    assert near_miss_group(no_number, tok) is None  # no copy to make: the slot is unfilled
    assert near_miss_group(no_number, tok, keep_unfilled=True) is no_number  # the trainer's mode


@pytest.mark.parametrize(
    "text,gold,expected",
    [
        # a number after the box: the grader reads the box, so the box's number changes
        ("so \\boxed{7}. Question 2: what is 5+1", "7", "so \\boxed{8}. Question 2: what is 5+1"),
        # two boxes: the last one is graded
        ("\\boxed{3} or rather \\boxed{7} then 9", "7", "\\boxed{3} or rather \\boxed{8} then 9"),
        # a box with an expression: its last number
        ("\\boxed{2 \\times 7 = 14} ok 1", "14", "\\boxed{2 \\times 7 = 15} ok 1"),
        # no box: the last number of the text (what the unboxed reward reads)
        ("it is 7 apples, 3 left", "3", "it is 7 apples, 4 left"),
    ],
)
def test_near_miss_text_changes_the_number_the_grader_reads(text, gold, expected):
    assert near_miss_text(text, gold) == expected
    boxed = "boxed" in text
    grade = lambda t: rewards_mod.math_rewards([t], [gold], require_boxed=boxed)  # noqa: E731
    assert grade(text) == [1.0] and grade(expected) == [0.0]  # right becomes wrong


def test_near_miss_text_refuses_a_box_without_a_number():
    # the box is graded; changing the 5 outside it would leave the grade as it was
    with pytest.raises(ValueError, match="no graded number"):
        near_miss_text("5 apples: \\boxed{x}", "x")


def test_near_miss_group_regrades_copies_and_takes_another_source():
    """A copy that still grades right is never used: its slot takes the next correct answer whose
    copy grades wrong; with none, the group cannot be built (None)."""
    tok = load_tokenizer()
    texts = [
        "\\boxed{5}. Then 5+1",  # correct; its copy is "\\boxed{6}. Then 5+1": wrong
        "no",
        "5",  # correct without a box (graded with require_boxed=False); its copy is "6": wrong
        "x",
    ]
    rows = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
    width = max(map(len, rows))
    ids = torch.full((4, width), tok.pad_token_id)
    mask = torch.zeros((4, width), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), True
    g = Group.from_tensors(
        torch.tensor([5]), ids, mask, [1.0, 0.0, 1.0, 0.0], question_id="q", answer="5", texts=texts
    )
    calls = []

    def reward_fn(completions, answers):  # right iff the text is the source's copy of row 0
        calls.append(list(completions))
        return [float(c == "\\boxed{6}. Then 5+1") for c in completions]

    near = near_miss_group(g, tok, reward_fn=reward_fn)
    assert calls == [["\\boxed{6}. Then 5+1", "6"]]  # every copy graded once, in one call
    # slot 0 (row 1) would copy row 0, whose copy grades right: it takes row 2's copy instead
    assert near.rollouts.texts == ["\\boxed{5}. Then 5+1", "6", "5", "6"]
    assert near.rewards.tolist() == [1.0, 0.0, 1.0, 0.0]
    assert near.rollouts.meta["near_miss"] == {
        "rows": [1, 3],
        "sources": [2, 2],
        "unusable_sources": [0],
    }
    # the library's grader agrees that both copies are wrong (require_boxed=False reads "6")
    assert rewards_mod.math_rewards(["6"] * 2, ["5"] * 2, require_boxed=False) == [0.0, 0.0]
    assert near_miss_group(g, tok, reward_fn=lambda c, a: [1.0] * len(c)) is None


def test_balanced_group_keeps_the_first_k_of_each_in_order():
    completions = [[10 + i] * (i + 1) for i in range(8)]  # response i: i + 1 copies of token 10 + i
    group = _group(completions, [1, 0, 0, 1, 1, 0, 0, 0], question_id="q7")
    two = balanced_group(group, 2)
    # first two right: rows 0 and 3; first two wrong: rows 1 and 2 -> rows 0, 1, 2, 3 in sampling
    # order
    assert two.rewards.tolist() == [1.0, 0.0, 0.0, 1.0] and two.group_size == 4 and two.p == 0.5
    for new_row, old_row in enumerate([0, 1, 2, 3]):
        kept = two.rollouts.completion_ids[new_row][two.rollouts.completion_mask[new_row]]
        assert kept.tolist() == completions[old_row]
    assert two.rollouts.completion_ids.shape[1] == 4, (
        "columns only the left-out responses used are trimmed"
    )
    three = balanced_group(group, 3)
    assert three.rewards.tolist() == [1.0, 0.0, 0.0, 1.0, 1.0, 0.0] and three.question_id == "q7"
    assert balanced_group(group, 4) is None  # only three right answers
    with pytest.raises(ValueError, match="k"):
        balanced_group(group, 0)


def test_load_or_sample_groups_lets_one_caller_sample_while_the_others_wait(tmp_path, monkeypatch):
    import threading

    import nthr_book.groups as groups_mod

    calls, sampling = [], threading.Event()

    def slow_sample(model, tokenizer, problems, **kwargs):
        calls.append(kwargs)
        sampling.set()
        time.sleep(1.0)  # the second caller arrives while the first samples
        return [_group([[10, 11], [12]], [1.0, 0.0], question_id=p["id"]) for p in problems]

    monkeypatch.setattr(groups_mod, "sample_groups", slow_sample)
    problems = [{"id": "a", "problem": "1+1", "answer": "2"}]
    kw = dict(group_size=2, max_new_tokens=8, temperature=1.0, seed=3, template="arithmetic")
    path, sources = tmp_path / "groups.pt", {}

    def call(name: str) -> None:
        sources[name] = load_or_sample_groups(path, None, None, problems, **kw)[2]

    first = threading.Thread(target=call, args=("first",))
    first.start()
    assert sampling.wait(timeout=60)
    second = threading.Thread(target=call, args=("second",))  # the file does not exist yet
    second.start()
    first.join(timeout=60)
    second.join(timeout=60)
    assert len(calls) == 1  # without the lock the second caller would sample too
    assert sources == {"first": f"sampled, saved to {path}", "second": f"loaded from {path}"}


def test_load_or_sample_groups_samples_once_then_loads_and_refuses_other_settings(
    tmp_path, monkeypatch
):
    import nthr_book.groups as groups_mod

    calls = []

    def fake_sample(model, tokenizer, problems, **kwargs):
        calls.append(kwargs)
        return [_group([[10, 11], [12]], [1.0, 0.0], question_id=p["id"]) for p in problems]

    monkeypatch.setattr(groups_mod, "sample_groups", fake_sample)
    problems = [
        {"id": "a", "problem": "1+1", "answer": "2"},
        {"id": "b", "problem": "2+2", "answer": "4"},
    ]
    kw = dict(group_size=2, max_new_tokens=8, temperature=1.0, seed=3, template="arithmetic")
    path = tmp_path / "groups.pt"
    first, settings, source = load_or_sample_groups(path, None, None, problems, **kw)
    assert len(calls) == 1 and source.startswith("sampled, saved to") and path.is_file()
    assert settings["problem_ids"] == ["a", "b"] and settings["seed"] == 3
    again, saved, source = load_or_sample_groups(path, None, None, problems, **kw)
    assert len(calls) == 1 and source == f"loaded from {path}"  # no second sampling
    assert [g.question_id for g in again] == ["a", "b"]
    assert torch.equal(again[0].rollouts.completion_ids, first[0].rollouts.completion_ids)
    with pytest.raises(
        ValueError, match=r"groups\.pt was sampled with other settings.*max_new_tokens"
    ):
        load_or_sample_groups(path, None, None, problems, **(kw | {"max_new_tokens": 9}))
    with pytest.raises(ValueError, match=r"problems\[1\] lacks key"):
        load_or_sample_groups(None, None, None, [problems[0], {"id": "c"}], **kw)
    _, _, source = load_or_sample_groups(None, None, None, problems, **kw)
    assert source == "sampled" and len(calls) == 2


# ------------------------------------------------------------------ branched negatives
# The tiny random policy over the embedded tokenizer's vocabulary: its continuations are garbage,
# so a branched answer that stops before the boxed answer is graded wrong.


@pytest.fixture(scope="module")
def tiny_policy():
    return load_policy("tiny-random", device="cpu")


def _enc(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


CORRECT_A = "2 + 3 = 5. The answer is \\boxed{5}."  # ends with EOS
CORRECT_B = "So \\boxed{5}"  # truncated: no EOS


def _mixed_group(tok, wrong_rows=(1, 3, 4), question_id: str = "q", answer: str = "5") -> Group:
    """G = 2 + len(wrong_rows): correct A (with EOS) and B (truncated) in the first two free rows,
    in that order; wrong answers at ``wrong_rows``."""
    eos = tok.eos_token_id
    G = 2 + len(wrong_rows)
    correct = iter([(_enc(tok, CORRECT_A) + [eos], False), (_enc(tok, CORRECT_B), True)])
    wrong = iter([(_enc(tok, t) + [eos], False) for t in ("no idea", "\\boxed{6}", "it is 7")])
    rows, truncated, rewards = [], [], []
    for i in range(G):
        ids, trunc = next(wrong) if i in wrong_rows else next(correct)
        rows.append(ids)
        truncated.append(trunc)
        rewards.append(0.0 if i in wrong_rows else 1.0)
    return Group.from_token_lists(
        _enc(tok, "What is 2 + 3?"),
        rows,
        rewards,
        pad_id=tok.pad_token_id,
        question_id=question_id,
        answer=answer,
        texts=[tok.decode(r, skip_special_tokens=True) for r in rows],
        truncated=truncated,
    )


def _row(group: Group, i: int) -> list[int]:
    ro = group.rollouts
    return ro.completion_ids[i][ro.completion_mask[i]].tolist()


def _sample_by_hand(model, tok, sequences, budgets, temperature, seed) -> list[list[int]]:
    """The library's sampling (rollout.generate under rollout.generation_config) on left-padded
    token-id rows, each row cut after its first EOS and at its own budget."""
    eos, pad = tok.eos_token_id, tok.pad_token_id
    width = max(map(len, sequences))
    ids = torch.tensor([[pad] * (width - len(s)) + s for s in sequences])  # (n, P) left-padded
    att = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in sequences])
    config = rollout_mod.generation_config(
        max_new_tokens=max(budgets), temperature=temperature, eos_token_id=[eos], pad_token_id=pad
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        new = rollout_mod.generate(model, config, input_ids=ids, attention_mask=att)[:, width:]
    out = []
    for row, budget in zip(new.tolist(), budgets):
        cut = row[: row.index(eos) + 1] if eos in row else row
        out.append(cut[:budget])
    return out


def test_branch_prefix_length_is_the_exact_floor_of_f_times_l():
    assert [branch_prefix_length(f, n) for f, n in [(0.5, 7), (0.29, 100), (1.0, 9), (0.0, 9)]] == [
        3,
        29,  # 0.29 * 100 = 28.999999999999996 in floats
        9,
        0,
    ]
    # Brute force against exact rational arithmetic for two-decimal fractions.
    for hundredths in range(101):
        f = hundredths / 100
        for n in range(300):
            assert branch_prefix_length(f, n) == math.floor(Fraction(hundredths, 100) * n), (f, n)


def test_branched_group_shares_the_prefix_and_samples_the_models_continuation(tiny_policy):
    model, tok = tiny_policy
    group = _mixed_group(tok)  # rows: A, wrong, B, wrong, wrong
    kw = dict(temperature=1.0, max_new_tokens=24, seed=3)
    out = branched_group(group, model, tok, 0.5, **kw)

    meta = out.rollouts.meta["branched"]
    answer_a, answer_b = _enc(tok, CORRECT_A), _enc(tok, CORRECT_B)  # without EOS
    assert meta["rows"] == [1, 3, 4] and meta["sources"] == [0, 2, 0]  # round robin over A, B
    sources = [answer_a, answer_b, answer_a]
    assert meta["prefix_lengths"] == [len(s) // 2 for s in sources]  # floor(L / 2)
    assert meta["tries"] == [1, 1, 1]  # garbage after half an answer: wrong at once
    prefixes = [s[: len(s) // 2] for s in sources]
    rows = [_row(out, i) for i in meta["rows"]]
    for row, prefix in zip(rows, prefixes):
        assert row[: len(prefix)] == prefix and len(row) > len(prefix)
    # The continuations are the model's: one seeded call on the three left-padded rows.
    prompt = _enc(tok, "What is 2 + 3?")
    assert len(set(meta["seeds"])) == 1
    expected = _sample_by_hand(
        model,
        tok,
        [prompt + p for p in prefixes],
        [24 - len(p) for p in prefixes],
        1.0,
        meta["seeds"][0],
    )
    assert [row[len(p) :] for row, p in zip(rows, prefixes)] == expected
    eos = tok.eos_token_id
    assert out.rollouts.truncated[meta["rows"]].tolist() == [r[-1] != eos for r in rows]
    # Every branched answer is graded wrong; the correct answers are untouched.
    texts = [tok.decode(r, skip_special_tokens=True) for r in rows]
    assert [out.rollouts.texts[i] for i in meta["rows"]] == texts
    assert rewards_mod.math_rewards(texts, ["5"] * 3, require_boxed=True) == [0.0] * 3
    assert out.rewards.tolist() == [1.0, 0.0, 1.0, 0.0, 0.0]
    for i in (0, 2):
        assert _row(out, i) == _row(group, i) and out.rollouts.texts[i] == group.rollouts.texts[i]
        assert bool(out.rollouts.truncated[i]) == bool(group.rollouts.truncated[i])
    assert torch.equal(out.rollouts.prompt_ids, group.rollouts.prompt_ids)
    assert torch.equal(out.rollouts.prompt_mask, group.rollouts.prompt_mask)
    assert out.question_id == "q/branch0.50" and out.answer == "5"


def test_branched_group_retries_unfilled_slots_in_later_rounds(tiny_policy, monkeypatch):
    """A slot graded correct is sampled again in the next round, alone when it is the only one
    left: its kept continuation is then a plain one-row sample under the round's seed."""
    model, tok = tiny_policy
    real = rewards_mod.math_rewards
    calls = []

    def first_accepted_once(texts, golds, **kwargs):
        calls.append(len(texts))
        scores = real(texts, golds, **kwargs)
        return [1.0] + scores[1:] if len(calls) == 1 else scores

    monkeypatch.setattr(rewards_mod, "math_rewards", first_accepted_once)
    group = _mixed_group(tok)
    out = branched_group(group, model, tok, 0.25, temperature=1.0, max_new_tokens=20, seed=5)
    meta = out.rollouts.meta["branched"]
    assert calls == [3, 1] and meta["tries"] == [2, 1, 1]
    assert meta["seeds"][0] != meta["seeds"][1] == meta["seeds"][2]
    prefix = _enc(tok, CORRECT_A)[: len(_enc(tok, CORRECT_A)) // 4]
    assert meta["prefix_lengths"][0] == len(prefix)
    # One row, no padding: the reference is a single seeded generate call on prompt + prefix.
    prompt = _enc(tok, "What is 2 + 3?")
    eos, budget = tok.eos_token_id, 20 - len(prefix)
    config = rollout_mod.generation_config(
        max_new_tokens=budget, temperature=1.0, eos_token_id=[eos], pad_token_id=eos
    )
    ids = torch.tensor([prompt + prefix])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(meta["seeds"][0])
        new = rollout_mod.generate(
            model, config, input_ids=ids, attention_mask=torch.ones_like(ids)
        )
    new = new[0, ids.shape[1] :].tolist()
    assert _row(out, 1) == prefix + (new[: new.index(eos) + 1] if eos in new else new)


def test_branched_group_drops_a_slot_the_model_never_gets_wrong(tiny_policy, monkeypatch):
    """The first remaining slot of every round is graded correct, so wrong slot 0 (row 1) is never
    filled: partial=True drops its row (G 5 -> 4), partial=False gives None, and keep_unfilled=True
    (the trainer's mode) keeps its own wrong answer, the other slots filled as when dropping."""
    model, tok = tiny_policy
    real = rewards_mod.math_rewards

    def first_always_accepted(texts, golds, **kwargs):
        return [1.0] + real(texts, golds, **kwargs)[1:]

    monkeypatch.setattr(rewards_mod, "math_rewards", first_always_accepted)
    group = _mixed_group(tok)  # rows: A, wrong, B, wrong, wrong
    kw = dict(temperature=1.0, max_new_tokens=20, seed=5, max_tries=3)
    out = branched_group(group, model, tok, 0.5, **kw)
    meta = out.rollouts.meta["branched"]
    assert meta["dropped_rows"] == [1] and meta["rows"] == [3, 4] and meta["tries"] == [1, 1]
    assert out.group_size == 4 and out.rewards.tolist() == [1.0, 1.0, 0.0, 0.0]
    for new_row, old_row in ((0, 0), (1, 2)):  # the correct answers, unchanged
        assert _row(out, new_row) == _row(group, old_row)
    assert branched_group(group, model, tok, 0.5, partial=False, **kw) is None
    kept = branched_group(group, model, tok, 0.5, keep_unfilled=True, **kw)
    meta = kept.rollouts.meta["branched"]
    assert meta["kept_rows"] == [1] and meta["dropped_rows"] == [] and meta["rows"] == [3, 4]
    assert kept.group_size == 5 and kept.rewards.tolist() == [1.0, 0.0, 1.0, 0.0, 0.0]
    for i in (0, 1, 2):  # the correct answers and the unfilled slot: the group's own rows
        assert _row(kept, i) == _row(group, i)
        assert kept.rollouts.texts[i] == group.rollouts.texts[i]
    for new_row, old_row in ((3, 2), (4, 3)):  # the filled slots: as in the dropping mode
        assert _row(kept, new_row) == _row(out, old_row)


def test_branched_group_grades_with_the_reward_fn_it_is_given(tiny_policy, monkeypatch):
    """``reward_fn(texts, answers)`` replaces math_rewards: one that calls everything right
    leaves every slot unfilled (kept with keep_unfilled), one that calls everything wrong fills
    each slot in the first round with the decoded prefix + continuation it was shown."""
    model, tok = tiny_policy

    def no_math_rewards(*args, **kwargs):
        raise AssertionError("math_rewards called although reward_fn was given")

    monkeypatch.setattr(rewards_mod, "math_rewards", no_math_rewards)
    group = _mixed_group(tok)
    kw = dict(temperature=1.0, max_new_tokens=20, seed=2, max_tries=2, keep_unfilled=True)
    shown = []

    def all_right(texts, answers):
        shown.append((list(texts), list(answers)))
        return [1.0] * len(texts)

    out = branched_group(group, model, tok, 0.5, reward_fn=all_right, **kw)
    assert [len(t) for t, _ in shown] == [3, 3] and all(a == ["5"] * 3 for _, a in shown)
    assert out.rollouts.meta["branched"]["kept_rows"] == [1, 3, 4]
    assert all(_row(out, i) == _row(group, i) for i in range(5))

    shown.clear()
    out = branched_group(group, model, tok, 0.5, reward_fn=lambda t, a: [0.0] * len(t), **kw)
    meta = out.rollouts.meta["branched"]
    assert meta["rows"] == [1, 3, 4] and meta["tries"] == [1, 1, 1] and meta["kept_rows"] == []
    assert [out.rollouts.texts[i] for i in (1, 3, 4)] == [
        tok.decode(_row(out, i), skip_special_tokens=True) for i in (1, 3, 4)
    ]


def test_branched_group_is_none_when_no_try_is_wrong(tiny_policy, monkeypatch):
    model, tok = tiny_policy
    group = _mixed_group(tok)
    kw = dict(temperature=1.0, max_new_tokens=24, seed=0)
    # f = 1: a whole boxed answer then garbage still grades correct, in every round.
    assert branched_group(group, model, tok, 1.0, **kw) is None
    calls = []

    def accept_all(texts, golds, **kwargs):
        calls.append(len(texts))
        return [1.0] * len(texts)

    monkeypatch.setattr(rewards_mod, "math_rewards", accept_all)
    assert branched_group(group, model, tok, 0.5, max_tries=3, **kw) is None
    assert calls == [3, 3, 3]  # three rounds of the three wrong slots, then given up


def test_branched_group_is_seeded_and_saved_with_its_record(tiny_policy, tmp_path):
    model, tok = tiny_policy
    group = _mixed_group(tok)
    kw = dict(temperature=1.0, max_new_tokens=16)
    a = branched_group(group, model, tok, 0.5, seed=11, **kw)
    b = branched_group(group, model, tok, 0.5, seed=11, **kw)
    other = branched_group(group, model, tok, 0.5, seed=12, **kw)
    assert torch.equal(a.rollouts.completion_ids, b.rollouts.completion_ids)
    assert a.rollouts.meta == b.rollouts.meta and a.rollouts.texts == b.rollouts.texts
    assert [_row(a, i) for i in (1, 3, 4)] != [_row(other, i) for i in (1, 3, 4)]
    (loaded,) = load_groups(save_groups(tmp_path / "b.pt", [a]))
    assert loaded.rollouts.meta == a.rollouts.meta and loaded.question_id == "q/branch0.50"
    assert torch.equal(loaded.rollouts.completion_ids, a.rollouts.completion_ids)


def test_branched_group_f0_and_bad_input(tiny_policy):
    model, tok = tiny_policy
    group = _mixed_group(tok)
    kw = dict(temperature=1.0, max_new_tokens=24, seed=0)
    assert branched_group(group, model, tok, 0.0, **kw) is group  # natural negatives
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="`fraction`"):
            branched_group(group, model, tok, bad, **kw)
    with pytest.raises(TypeError, match="`fraction`"):
        branched_group(group, model, tok, True, **kw)
    with pytest.raises(ValueError, match="`max_tries`"):
        branched_group(group, model, tok, 0.5, max_tries=0, **kw)
    with pytest.raises(ValueError, match="`max_new_tokens`=4 is shorter"):
        branched_group(group, model, tok, 0.5, **(kw | {"max_new_tokens": 4}))
    right = _mixed_group(tok, wrong_rows=())
    with pytest.raises(ValueError, match="all_correct.*mixed"):
        branched_group(right, model, tok, 0.5, **kw)
    with pytest.raises(ValueError, match="no answer"):
        branched_group(_mixed_group(tok, answer=""), model, tok, 0.5, **kw)


def test_branched_groups_counts_the_groups_it_cannot_fill(tiny_policy, monkeypatch):
    model, tok = tiny_policy
    real = rewards_mod.math_rewards

    def accept_gold_7(texts, golds, **kwargs):
        return [1.0] * len(texts) if golds[0] == "7" else real(texts, golds, **kwargs)

    monkeypatch.setattr(rewards_mod, "math_rewards", accept_gold_7)
    fillable = _mixed_group(tok, wrong_rows=(1,), question_id="a")
    unfillable = _mixed_group(tok, wrong_rows=(0,), question_id="b", answer="7")
    kw = dict(temperature=1.0, max_new_tokens=24, seed=2, max_tries=2)
    out, n_unfilled = branched_groups([unfillable, fillable], model, tok, 0.5, **kw)
    assert n_unfilled == 1 and [g.question_id for g in out] == ["a/branch0.50"]
    alone = branched_group(fillable, model, tok, 0.5, **kw)  # the other group changes nothing
    assert torch.equal(out[0].rollouts.completion_ids, alone.rollouts.completion_ids)


def test_continue_ids_cuts_each_row_at_its_own_budget(tiny_policy):
    model, tok = tiny_policy
    rows = [_enc(tok, "What is 2 + 3?"), _enc(tok, "So")]
    full = rollout_mod.continue_ids(model, tok, rows, max_new_tokens=8, temperature=1.0, seed=4)
    cut = rollout_mod.continue_ids(model, tok, rows, max_new_tokens=[3, 8], temperature=1.0, seed=4)
    assert cut == [full[0][:3], full[1]]
    none = rollout_mod.continue_ids(model, tok, rows, max_new_tokens=[0, 0], seed=4)
    assert none == [[], []]
    with pytest.raises(ValueError, match="max_new_tokens has 1"):
        rollout_mod.continue_ids(model, tok, rows, max_new_tokens=[3])
