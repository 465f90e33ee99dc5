"""Rollouts: layout, EOS masking, seeding, prompt sharing, save/load."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from nthr_book.models import load_policy
from nthr_book.rollout import Rollouts, completion_mask_from_eos, generate_groups, generation_config


def test_completion_mask_stops_after_first_eos():
    ids = torch.tensor([[5, 6, 2, 7, 2], [5, 6, 7, 8, 9], [2, 1, 1, 1, 1]])
    mask, truncated = completion_mask_from_eos(ids, [2])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert truncated.tolist() == [False, True, False]


def _prompts(tok):
    return [
        tok.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False
        )
        for q in ("What is 2 + 2?", "Say a long sentence about the sea and the sky, please.")
    ]


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
    assert torch.equal(a.prompt_ids[0], a.prompt_ids[2]) and not torch.equal(
        a.prompt_ids[2], a.prompt_ids[3]
    )
    assert (a.completion_ids[~a.completion_mask] == tok.pad_token_id).all()


def test_greedy_shared_prompt_equals_plain_generate():
    model, tok = load_policy("tiny-random")
    prompts = _prompts(tok)
    shared = generate_groups(model, tok, prompts, 2, max_new_tokens=5, temperature=0.0)
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    ref = model.generate(**enc, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)[
        :, enc["input_ids"].shape[1] :
    ]
    for g in range(2):
        row = shared.completion_ids[2 * g][shared.completion_mask[2 * g]]
        assert torch.equal(row, ref[g][: len(row)])


def test_prompts_with_a_shared_start_prefill_it_once_and_sample_the_same():
    # Few-shot prompts: a long start every prompt shares, then questions of different lengths.
    # The shared start is prefilled once for the call; greedy samples must equal plain generate's
    # on the left-padded batch, and seeded samples those of share_prompt=False.
    from nthr_book.data import build_prompt

    model, tok = load_policy("tiny-random")
    questions = ("What is 2 + 2?", "What is 17 * 3 + 5 - 1?", "Compute 123 + 456 + 789 + 1011.")
    prompts = [build_prompt(tok, q, "arithmetic") for q in questions]
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    assert len(set(enc["attention_mask"].sum(-1).tolist())) == 3  # three lengths: real padding
    greedy = generate_groups(model, tok, prompts, 2, max_new_tokens=6, temperature=0.0)
    ref = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    ref = ref[:, enc["input_ids"].shape[1] :]
    for g in range(3):
        for row in (2 * g, 2 * g + 1):
            got = greedy.completion_ids[row][greedy.completion_mask[row]]
            assert torch.equal(got, ref[g][: len(got)]), (g, row)
    kw = dict(max_new_tokens=6, temperature=1.0, seed=3)
    shared = generate_groups(model, tok, prompts, 2, **kw)
    plain = generate_groups(model, tok, prompts, 2, share_prompt=False, **kw)
    assert torch.equal(shared.completion_ids, plain.completion_ids)
    assert torch.equal(shared.prompt_ids, plain.prompt_ids)  # the rollouts keep left padding


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_shared_start_cache_gives_the_logits_of_a_whole_forward(arch):
    # float64 reference: the next-token logits of each left-padded prompt from one whole forward,
    # against those from the cache (shared start once, own rest per prompt, repeated G = 2 times)
    # and the last token. GPT-2's absolute positions make a wrong position id visible (RoPE is
    # blind to a shift common to all tokens).
    from transformers import GPT2Config, GPT2LMHeadModel

    from nthr_book.models import tiny_random_model
    from nthr_book.rollout import _shared_prompt_cache

    torch.manual_seed(0)
    if arch == "llama":
        model = tiny_random_model(64, hidden_size=32, num_kv_heads=4)
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4))
    model = model.eval().double()
    start = [5, 6, 7, 8, 9, 10]  # every prompt's first tokens (a few-shot header)
    prompts = [start + [11, 12, 13], start + [14], start + [15, 16, 17, 18, 19]]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    att = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    position_ids = (att.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        whole = model(input_ids=ids, attention_mask=att, position_ids=position_ids).logits[:, -1]
        laid, laid_att, extra = _shared_prompt_cache(model, ids, att, 2)
        assert extra is not None and list(extra.values())[0].get_seq_length() == width - 1
        laid, laid_att = laid.repeat_interleave(2, 0), laid_att.repeat_interleave(2, 0)
        last = model(
            input_ids=laid[:, -1:],
            attention_mask=laid_att,
            position_ids=(laid_att.cumsum(-1) - 1)[:, -1:],
            **extra,
        ).logits[:, -1]
    assert torch.equal(laid_att.sum(-1), att.sum(-1).repeat_interleave(2))  # same tokens kept
    assert_close(last, whole.repeat_interleave(2, 0), rtol=1e-10, atol=1e-10)


def test_save_load_and_select_groups(tmp_path):
    model, tok = load_policy("tiny-random")
    ro = generate_groups(model, tok, _prompts(tok), 2, max_new_tokens=4, seed=0)
    path = ro.save(tmp_path / "ro.pt")
    back = Rollouts.load(path)
    assert torch.equal(back.completion_ids, ro.completion_ids) and back.texts == ro.texts
    sub = ro.select_groups([1])
    assert sub.num_groups == 1 and torch.equal(sub.completion_ids, ro.completion_ids[2:4])


# ------------------------------------------------------ sampling is exactly softmax(logits / T)


class _IntTokenizer:
    """Fake tokenizer: a prompt is space-separated token ids; pad 0, EOS 1, BOS 2 (left padding)."""

    pad_token_id, bos_token_id = 0, 2
    padding_side = "left"

    def __init__(self, eos_token_id: int = 1):
        self.eos_token_id = eos_token_id

    def __call__(self, texts, return_tensors="pt", padding=True, add_special_tokens=False):
        rows = [[int(t) for t in s.split()] for s in texts]
        width = max(map(len, rows))
        ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])  # (B, P) left-padded
        att = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        return {"input_ids": ids, "attention_mask": att}

    def batch_decode(self, ids, skip_special_tokens=True):
        return [" ".join(str(int(t)) for t in row) for row in ids]


def _tiny_llama(polluted: bool, eos: int = 1):
    """A 2-layer Llama (vocab 64); ``polluted`` gives it a hub-like generation_config."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=2,
        eos_token_id=eos,
        pad_token_id=0,
        initializer_range=0.2,
    )  # far from uniform logits, so that min_p bites
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg).eval()
    ids = dict(eos_token_id=eos, pad_token_id=0, bos_token_id=2)
    hub_like = dict(
        repetition_penalty=1.5,
        no_repeat_ngram_size=2,
        top_k=5,
        top_p=0.5,
        min_p=0.2,
        typical_p=0.9,
        min_new_tokens=3,
        do_sample=True,
        temperature=0.7,
    )
    model.generation_config = GenerationConfig(**ids, **(hub_like if polluted else {}))
    return model


_PROMPTS = ["5 9 12 7", "30 31"]


def _greedy_by_hand(model, prompt: str, steps: int, eos: int, min_new_tokens: int = 0) -> list[int]:
    """Argmax of the full forward pass, token by token (no cache, no padding), EOS masked early."""
    ids = torch.tensor([[int(t) for t in prompt.split()]])  # (1, P)
    out = []
    with torch.no_grad():
        for t in range(steps):
            logits = model(ids).logits[0, -1].double()  # (V,)
            if t < min_new_tokens:
                logits[eos] = -float("inf")
            nxt = int(logits.argmax())
            out.append(nxt)
            if nxt == eos:
                break
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


def _rows(ro) -> list[list[int]]:
    return [ro.completion_ids[i][ro.completion_mask[i]].tolist() for i in range(len(ro))]


def test_greedy_ignores_the_models_generation_config():
    polluted, clean = _tiny_llama(True), _tiny_llama(False)
    own = polluted.generation_config
    kw = dict(max_new_tokens=24, temperature=0.0)
    got = generate_groups(polluted, _IntTokenizer(), _PROMPTS, 1, **kw)
    ref = generate_groups(clean, _IntTokenizer(), _PROMPTS, 1, **kw)
    assert _rows(got) == _rows(ref)
    # Plain argmax repeats itself here: no_repeat_ngram_size=2 or the penalty would forbid it.
    assert _rows(got) == [_greedy_by_hand(clean, p, 24, eos=1) for p in _PROMPTS]
    assert polluted.generation_config is own and own.repetition_penalty == 1.5  # put back


def test_min_new_tokens_is_explicit_and_off_by_default():
    first = _greedy_by_hand(_tiny_llama(False), _PROMPTS[0], 1, eos=1)[0]  # make it the EOS id
    model, tok = _tiny_llama(True, eos=first), _IntTokenizer(eos_token_id=first)  # model's own: 3
    kw = dict(max_new_tokens=8, temperature=0.0)
    plain = generate_groups(model, tok, _PROMPTS[:1], 1, **kw)
    assert _rows(plain) == [[first]]
    held = generate_groups(model, tok, _PROMPTS[:1], 1, min_new_tokens=4, **kw)
    assert _rows(held) == [_greedy_by_hand(model, _PROMPTS[0], 8, eos=first, min_new_tokens=4)]
    assert len(_rows(held)[0]) > 4 and first not in _rows(held)[0][:4]
    assert held.meta["min_new_tokens"] == 4


def test_seeded_samples_equal_those_of_a_clean_generation_config():
    kw = dict(max_new_tokens=12, temperature=0.8, seed=3)
    got = generate_groups(_tiny_llama(True), _IntTokenizer(), _PROMPTS, 8, **kw)
    ref = generate_groups(_tiny_llama(False), _IntTokenizer(), _PROMPTS, 8, **kw)
    assert torch.equal(got.completion_ids, ref.completion_ids)


def test_first_token_distribution_is_softmax_of_logits_over_temperature():
    model, temperature, n = _tiny_llama(True), 0.8, 20_000
    with torch.no_grad():
        logits = model(torch.tensor([[5, 9, 12, 7]])).logits[0, -1].double()  # (V,)
    p = torch.softmax(logits / temperature, dim=-1)  # (V,) float64 reference
    ro = generate_groups(
        model, _IntTokenizer(), _PROMPTS[:1], n, max_new_tokens=1, temperature=temperature, seed=0
    )
    freq = torch.bincount(ro.completion_ids[:, 0], minlength=p.numel()).double() / n  # (V,)
    tv = 0.5 * (freq - p).abs().sum()
    # E[TV] <= 1/2 sum_k sqrt(p_k (1 - p_k) / n) (Jensen). One sample moves TV by <= 1/n, so
    # McDiarmid gives P(TV > E[TV] + t) <= exp(-2 n t^2): t for a false failure rate of 1e-6.
    bound = 0.5 * torch.sqrt(p * (1 - p) / n).sum() + math.sqrt(math.log(1e6) / (2 * n))
    assert tv < bound, f"TV {tv:.4f} >= {bound:.4f}"
    # top_k applies when the caller asks for it, and then only the k most likely tokens occur.
    top3 = generate_groups(
        model,
        _IntTokenizer(),
        _PROMPTS[:1],
        500,
        max_new_tokens=1,
        temperature=temperature,
        top_k=3,
        seed=0,
    )
    assert set(top3.completion_ids[:, 0].tolist()) <= set(p.topk(3).indices.tolist())


def test_generation_config_checks_name_the_argument():
    ids = dict(eos_token_id=1, pad_token_id=0)
    bad = [
        ("top_k", -1),
        ("top_p", 0.0),
        ("temperature", -1.0),
        ("min_new_tokens", 5),
        ("max_new_tokens", 0),
    ]
    for name, value in bad:
        with pytest.raises(ValueError, match=name):
            generation_config(**{"max_new_tokens": 4, name: value}, **ids)
    greedy = generation_config(max_new_tokens=4, temperature=0.0, **ids)
    assert greedy.do_sample is False and greedy.repetition_penalty == 1.0 and greedy.min_p is None


def test_concat_repads_and_keeps_every_row():
    """Rollouts.concat of two batches with different widths equals each part row by row."""

    def part(P: int, T: int, groups: int, offset: int) -> Rollouts:
        n = 2 * groups
        ids = torch.arange(n * P).view(n, P) + offset
        comp = torch.arange(n * T).view(n, T) + 100 + offset
        mask = torch.ones(n, T, dtype=torch.bool)
        mask[0, -1] = False  # a shorter completion, right-padded
        return Rollouts(
            prompt_ids=ids,
            prompt_mask=torch.ones(n, P, dtype=torch.long),
            completion_ids=comp,
            completion_mask=mask,
            texts=[f"t{offset}{i}" for i in range(n)],
            truncated=torch.zeros(n, dtype=torch.bool),
            group_size=2,
            prompts=[f"p{offset}{g}" for g in range(groups)],
        )

    a, b = part(3, 4, 1, 0), part(5, 2, 2, 1000)
    c = Rollouts.concat([a, b], pad_id=-1)
    assert len(c) == 6 and c.num_groups == 3 and c.prompts == a.prompts + b.prompts
    assert c.prompt_ids.shape == (6, 5) and c.completion_ids.shape == (6, 4)
    # prompts are left-padded (mask 0 on the pad), completions right-padded (mask False on the pad)
    assert torch.equal(c.prompt_ids[:2, 2:], a.prompt_ids) and (c.prompt_ids[:2, :2] == -1).all()
    assert torch.equal(c.prompt_mask[:2].sum(1), torch.tensor([3, 3]))
    assert (
        torch.equal(c.completion_ids[2:, :2], b.completion_ids)
        and (c.completion_ids[2:, 2:] == -1).all()
    )
    assert torch.equal(c.completion_mask[:2], a.completion_mask)
    assert not c.completion_mask[2:, 2:].any()
    assert c.texts == a.texts + b.texts and c.meta["rounds"] == 2
