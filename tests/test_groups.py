"""Tests of nthr_book.groups: the Group type, save/load, and the near-miss and balanced
constructions."""

from __future__ import annotations

import pytest
import torch

import nthr_book.rewards as rewards_mod
from nthr_book.groups import (
    Group,
    balanced_group,
    groups_from_rollouts,
    load_groups,
    load_or_sample_groups,
    near_miss_group,
    near_miss_text,
    save_groups,
)
from nthr_book.models import load_tokenizer
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
    with pytest.raises(ValueError, match="'z'.*no number"):
        near_miss_group(no_number, tok)


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
