"""Rollouts: layout, EOS masking, seeding, prompt sharing, save/load."""

from __future__ import annotations

import torch

from nthr_book.models import load_policy
from nthr_book.rollout import Rollouts, completion_mask_from_eos, generate_groups


def test_completion_mask_stops_after_first_eos():
    ids = torch.tensor([[5, 6, 2, 7, 2], [5, 6, 7, 8, 9], [2, 1, 1, 1, 1]])
    mask, truncated = completion_mask_from_eos(ids, [2])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert truncated.tolist() == [False, True, False]


def _prompts(tok):
    return [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
            for q in ("What is 2 + 2?", "Say a long sentence about the sea and the sky, please.")]


def test_groups_are_group_major_seeded_and_shared_prompt_changes_nothing():
    model, tok = load_policy("tiny-random")
    prompts = _prompts(tok)
    kw = dict(max_new_tokens=6, temperature=1.0, seed=7)
    a = generate_groups(model, tok, prompts, 3, **kw)
    b = generate_groups(model, tok, prompts, 3, **kw)
    plain = generate_groups(model, tok, prompts, 3, share_prompt=False, **kw)
    small = generate_groups(model, tok, prompts, 3, batch_size=3, share_prompt=False, **kw)
    assert a.completion_ids.shape[0] == 6 and a.num_groups == 2
    assert torch.equal(a.completion_ids, b.completion_ids)  # seeded
    assert torch.equal(a.completion_ids, plain.completion_ids)  # prompt sharing: same samples
    assert small.completion_ids.shape[0] == 6  # one group per call works too
    # Group-major: rows 0-2 share prompt 0, rows 3-5 prompt 1.
    assert torch.equal(a.prompt_ids[0], a.prompt_ids[2]) and not torch.equal(a.prompt_ids[2], a.prompt_ids[3])
    assert (a.completion_ids[~a.completion_mask] == tok.pad_token_id).all()


def test_greedy_shared_prompt_equals_plain_generate():
    model, tok = load_policy("tiny-random")
    prompts = _prompts(tok)
    shared = generate_groups(model, tok, prompts, 2, max_new_tokens=5, temperature=0.0)
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    ref = model.generate(**enc, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)[:, enc["input_ids"].shape[1]:]
    for g in range(2):
        row = shared.completion_ids[2 * g][shared.completion_mask[2 * g]]
        assert torch.equal(row, ref[g][: len(row)])


def test_save_load_and_select_groups(tmp_path):
    model, tok = load_policy("tiny-random")
    ro = generate_groups(model, tok, _prompts(tok), 2, max_new_tokens=4, seed=0)
    path = ro.save(tmp_path / "ro.pt")
    back = Rollouts.load(path)
    assert torch.equal(back.completion_ids, ro.completion_ids) and back.texts == ro.texts
    sub = ro.select_groups([1])
    assert sub.num_groups == 1 and torch.equal(sub.completion_ids, ro.completion_ids[2:4])
