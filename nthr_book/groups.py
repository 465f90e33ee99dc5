"""Groups: one question's G sampled responses with their rewards, saved once and reused.

Every experiment on one question (Δ(x) in ``nthr_book.lld``, token scores in notebook 03, the
threshold explorer in notebook 04) starts from a ``Group``: a single-group ``Rollouts`` of G rows,
the rewards (G,), the question id and gold answer. ``load_or_sample_groups`` is the one way the
notebooks get them: it loads a saved file when its sampling settings match, else samples, grades
and saves atomically, so every update rule is compared on the same answers. Three constructions
build the groups of controlled experiments: ``near_miss_group`` (docs/method.md §5: each wrong
answer replaced by a correct one with its final number changed), ``branched_group`` (each wrong
answer replaced by the model's own wrong continuation of a correct answer's first fraction f) and
``balanced_group`` (k right, k wrong).

Why one long module: the Group type, its file format and the constructions that make new groups
from old ones must agree on the same fields; each function is short.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from torch import Tensor, nn

from nthr_book import rewards as _rewards
from nthr_book import rollout as _rollout
from nthr_book.io import atomic_torch_save
from nthr_book.rollout import Rollouts

__all__ = [
    "GROUPS_FORMAT",
    "SAMPLING_KEYS",
    "Group",
    "balanced_group",
    "branch_prefix_length",
    "branched_group",
    "branched_groups",
    "groups_from_rollouts",
    "load_groups",
    "load_or_sample_groups",
    "near_miss_group",
    "near_miss_ids",
    "near_miss_text",
    "sample_groups",
    "save_groups",
    "source_question_id",
]

# The format tag saved files carry (its text predates this module; files written before it still
# load).
GROUPS_FORMAT = "nthr_book.lld.groups/1"
# Settings that must match between a saved groups file and the call that wants to reuse it.
SAMPLING_KEYS = (
    "problem_ids",
    "group_size",
    "max_new_tokens",
    "temperature",
    "seed",
    "template",
    "require_boxed",
)


@dataclass
class Group:
    """One question's group: a single-group ``Rollouts`` (G rows), rewards (G,), question id and
    answer."""

    rollouts: Rollouts  # num_groups == 1: G rows
    rewards: Tensor  # (G,) float, 1.0 = correct
    question_id: str
    answer: str = ""
    problem: str = ""  # the question text (without the chat template), for display

    def __post_init__(self) -> None:
        if not isinstance(self.rollouts, Rollouts):
            raise TypeError(
                f"Group {self.question_id!r}: `rollouts` must be a Rollouts, "
                f"got {type(self.rollouts).__name__}"
            )
        if self.rollouts.num_groups != 1:
            raise ValueError(
                f"Group {self.question_id!r}: `rollouts` must hold exactly one group, "
                f"got {self.rollouts.num_groups}"
            )
        rewards = torch.as_tensor(self.rewards, dtype=torch.float32)
        if tuple(rewards.shape) != (self.rollouts.group_size,):
            raise ValueError(
                f"Group {self.question_id!r}: `rewards` must have shape (G,) = "
                f"({self.rollouts.group_size},), got {tuple(rewards.shape)}"
            )
        if bool(rewards.isnan().any()):
            raise ValueError(f"Group {self.question_id!r}: `rewards` contains NaN")
        self.rewards = rewards.cpu()
        self.question_id = str(self.question_id)

    @classmethod
    def from_tensors(
        cls,
        prompt_ids: Tensor,
        completion_ids: Tensor,
        completion_mask: Tensor,
        rewards: Sequence[float] | Tensor,
        *,
        prompt_mask: Tensor | None = None,
        question_id: str = "q",
        answer: str = "",
        problem: str = "",
        texts: Sequence[str] | None = None,
        truncated: Sequence[bool] | Tensor | None = None,
    ) -> Group:
        """A Group from raw tensors: prompt_ids (P,) or (G, P), completion_ids/mask (G, T), rewards
        (G,), truncated (G,) bool for rows that ended without EOS (default: none)."""
        G = completion_ids.shape[0]
        if truncated is None:
            truncated = torch.zeros(G, dtype=torch.bool)
        truncated = torch.as_tensor(truncated, dtype=torch.bool).to(completion_ids.device)
        if tuple(truncated.shape) != (G,):
            raise ValueError(
                f"`truncated` must have shape (G,) = ({G},), got {tuple(truncated.shape)}"
            )
        if prompt_ids.dim() == 1:
            prompt_ids = prompt_ids[None].expand(G, -1)
        if prompt_mask is None:
            prompt_mask = torch.ones_like(prompt_ids)
        elif prompt_mask.dim() == 1:
            prompt_mask = prompt_mask[None].expand(G, -1)
        completion_mask = completion_mask.bool()
        rollouts = Rollouts(
            prompt_ids=prompt_ids.long().clone(),
            prompt_mask=prompt_mask.long().clone(),
            completion_ids=completion_ids.long().clone(),
            completion_mask=completion_mask.clone(),
            texts=list(texts) if texts is not None else [""] * G,
            truncated=truncated,
            group_size=G,
            prompts=[problem],
            meta={},
        )
        return cls(
            rollouts, torch.as_tensor(rewards, dtype=torch.float32), question_id, answer, problem
        )

    @classmethod
    def from_token_lists(
        cls,
        prompt_ids: Sequence[int] | Tensor,
        completions: Sequence[Sequence[int]],
        rewards: Sequence[float] | Tensor,
        *,
        pad_id: int = 0,
        **kwargs: Any,
    ) -> Group:
        """A Group from one prompt and G token-id lists (right-padded with ``pad_id``, masked);
        ``kwargs`` go to ``from_tensors`` (question_id, answer, problem, texts, truncated)."""
        if not completions or any(len(c) == 0 for c in completions):
            raise ValueError("`completions` must be G >= 1 non-empty token-id lists")
        ids, mask = _right_padded(completions, pad_id)
        return cls.from_tensors(
            torch.as_tensor(prompt_ids, dtype=torch.long), ids, mask, rewards, **kwargs
        )

    @property
    def group_size(self) -> int:
        """G, the number of responses."""
        return self.rollouts.group_size

    @property
    def correct(self) -> Tensor:
        """(G,) bool: ``rewards.is_correct`` (reward > 0.5)."""
        return _rewards.is_correct(self.rewards)

    @property
    def n_correct(self) -> int:
        """N+, the number of correct responses."""
        return int(self.correct.sum())

    @property
    def p(self) -> float:
        """p = N+ / G."""
        return self.n_correct / self.group_size

    @property
    def status(self) -> str:
        """ "mixed", "all_correct" or "all_wrong" (the reason a homogeneous group is dropped)."""
        if self.n_correct == 0:
            return "all_wrong"
        if self.n_correct == self.group_size:
            return "all_correct"
        return "mixed"


def _right_padded(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """(ids, mask): token-id lists as a (G, T) long tensor right-padded with ``pad_id`` and its
    (G, T) bool mask, True on the listed tokens."""
    G, T = len(rows), max(len(r) for r in rows)
    ids = torch.full((G, T), pad_id, dtype=torch.long)  # (G, T) right-padded
    mask = torch.zeros((G, T), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.as_tensor(list(r), dtype=torch.long)
        mask[i, : len(r)] = True
    return ids, mask


def _pad_id(tokenizer) -> int:
    """The tokenizer's pad id, else its EOS id, else 0."""
    return next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)


def _trim(r: Rollouts) -> Rollouts:
    """Drop prompt columns that are padding in every row and completion columns after the last
    valid token."""
    pm, cm = r.prompt_mask, r.completion_mask.bool()
    real_cols = pm.bool().any(0).nonzero()
    first = int(real_cols[0]) if real_cols.numel() else 0
    valid_cols = cm.any(0).nonzero()
    last = int(valid_cols[-1]) + 1 if valid_cols.numel() else 1
    return Rollouts(
        prompt_ids=r.prompt_ids[:, first:],
        prompt_mask=pm[:, first:],
        completion_ids=r.completion_ids[:, :last],
        completion_mask=cm[:, :last],
        texts=r.texts,
        truncated=r.truncated,
        group_size=r.group_size,
        prompts=r.prompts,
        meta=r.meta,
    )


def groups_from_rollouts(
    rollouts: Rollouts,
    rewards: Tensor | Sequence[float],
    question_ids: Sequence[str],
    answers: Sequence[str],
    problems: Sequence[str] | None = None,
) -> list[Group]:
    """Split a group-major batch into one (padding-trimmed) Group per prompt; rewards
    (num_groups, G) or (N,)."""
    num_groups, G = rollouts.num_groups, rollouts.group_size
    rewards = torch.as_tensor(rewards, dtype=torch.float32).reshape(-1)
    if rewards.numel() != num_groups * G:
        raise ValueError(f"`rewards` holds {rewards.numel()} values for {num_groups} groups of {G}")
    for name, seq in (("question_ids", question_ids), ("answers", answers), ("problems", problems)):
        if seq is not None and len(seq) != num_groups:
            raise ValueError(f"`{name}` has {len(seq)} items for {num_groups} groups")
    rewards = rewards.view(num_groups, G)
    out = []
    for g in range(num_groups):
        sub = _trim(rollouts.select_groups([g]))
        sub.meta = {}  # per-batch settings live in the saved file's settings, not in every group
        out.append(
            Group(
                sub,
                rewards[g],
                str(question_ids[g]),
                str(answers[g]),
                "" if problems is None else str(problems[g]),
            )
        )
    return out


def _problem_fields(problems: Iterable[dict]) -> tuple[list[str], list[str], list[str]]:
    """(ids, problem texts, answers) from dicts with id/problem/answer; errors name the row."""
    ids, texts, answers = [], [], []
    for i, row in enumerate(problems):
        if not isinstance(row, dict):
            raise TypeError(
                f"problems[{i}] must be a dict with id/problem/answer, got {type(row).__name__}"
            )
        missing = [k for k in ("id", "problem", "answer") if k not in row]
        if missing:
            raise ValueError(f"problems[{i}] lacks key(s) {missing} (needs id, problem, answer)")
        ids.append(str(row["id"]))
        texts.append(str(row["problem"]))
        answers.append(str(row["answer"]))
    if len(set(ids)) != len(ids):
        dup = sorted({x for x in ids if ids.count(x) > 1})
        raise ValueError(f"problems have duplicate id(s) {dup[:5]}")
    return ids, texts, answers


def sample_groups(
    model: nn.Module,
    tokenizer,
    problems: Iterable[dict],
    *,
    group_size: int = 8,
    max_new_tokens: int,
    temperature: float = 1.0,
    seed: int = 0,
    template: str = "boxed",
    require_boxed: bool = True,
    batch_size: int | None = None,
    progress: bool = False,
) -> list[Group]:
    """Sample and grade ``group_size`` responses per problem (seeded); one Group each,
    homogeneous ones kept."""
    from nthr_book.data import build_prompt

    ids, texts, answers = _problem_fields(problems)
    if not ids:
        raise ValueError("`problems` is empty")
    prompts = [build_prompt(tokenizer, t, template) for t in texts]
    rollouts = _rollout.generate_groups(
        model,
        tokenizer,
        prompts,
        group_size,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        batch_size=batch_size,
        seed=seed,
        progress=progress,
    )
    golds = [a for a in answers for _ in range(group_size)]  # group-major, like rollouts.texts
    scores = _rewards.math_rewards(list(rollouts.texts), golds, require_boxed=require_boxed)
    return groups_from_rollouts(rollouts, scores, ids, answers, texts)


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def graded_number_span(text: str) -> tuple[int, int] | None:
    """(start, end) of the number the reward reads: the last number inside the final ``\\boxed{}``
    when ``text`` has one (``rewards.boxed_span``), else the last number of the text; None when
    there is none there (a box without a number: changing a number outside it would not change the
    grade)."""
    box = _rewards.boxed_span(text)
    lo, hi = box if box is not None else (0, len(text))
    last = None
    for last in _NUMBER.finditer(text, lo, hi):  # noqa: B007 (the last match is the one wanted)
        pass
    return None if last is None else last.span()


def _changed_number(number: str, answer: str) -> str:
    """The near-miss replacement of a final number: + 1 for integers (+ 2 when + 1 is the answer),
    else a "1" appended."""
    try:
        new = str(int(number) + 1)
    except ValueError:
        new = number + "1"
    if new == str(answer).strip():
        new = str(int(number) + 2) if number.lstrip("-").isdigit() else new + "1"
    return new


def near_miss_text(text: str, answer: str) -> str:
    """``text`` with the number the reward reads changed (``graded_number_span``; answer + 1 for
    integers): a nearly-correct wrong answer."""
    span = graded_number_span(text)
    if span is None:
        raise ValueError(f"no graded number to change in {text[:80]!r}")
    a, b = span
    return text[:a] + _changed_number(text[a:b], answer) + text[b:]


def near_miss_ids(completion_ids: Sequence[int] | Tensor, tokenizer, answer: str) -> list[int]:
    """``completion_ids`` with only the graded number's tokens re-encoded (near_miss_text on ids):
    every other token, and the trailing EOS or its absence (truncation), kept. Notebook 02."""
    if isinstance(completion_ids, Tensor):
        completion_ids = completion_ids.tolist()
    ids = [int(i) for i in completion_ids]
    special = set(tokenizer.all_special_ids)
    n = len(ids)
    while n and ids[n - 1] in special:  # the trailing EOS (if the response ended) is kept verbatim
        n -= 1
    body, tail = ids[:n], ids[n:]

    def decode(tokens: list[int]) -> str:
        return tokenizer.decode(tokens, clean_up_tokenization_spaces=False)

    text = decode(body)
    span = graded_number_span(text)
    if span is None:
        raise ValueError(f"no graded number to change in {text[:80]!r}")
    start, end = span
    # Tokens [a, b) hold the number: body[:b] is the shortest prefix whose text reaches its end,
    # body[:a] the longest that stops at or before its start (prefixes that end inside a multi-byte
    # character do not decode to a prefix of the text and are skipped).
    a = b = n
    chars_a = chars_b = len(text)
    for k in range(n, -1, -1):
        prefix = decode(body[:k])
        if not text.startswith(prefix):
            continue
        if len(prefix) >= end:
            b, chars_b = k, len(prefix)
        elif len(prefix) <= start:
            a, chars_a = k, len(prefix)
            break
    changed = _changed_number(text[start:end], answer)
    # what tokens [a, b) become: their text with the number changed
    piece = text[chars_a:start] + changed + text[end:chars_b]
    out = body[:a] + list(tokenizer(piece, add_special_tokens=False)["input_ids"]) + body[b:]
    if decode(out) != text[:start] + changed + text[end:]:
        raise ValueError(
            f"the tokenizer encodes {piece!r} differently on its own than in context; "
            "near-miss ids need context-free pieces (byte-level BPE, as SmolLM2 and "
            "Qwen2.5 use)"
        )
    return out + tail


def _grade(
    texts: list[str],
    answer: str,
    require_boxed: bool,
    reward_fn: Callable[[list[str], list[str]], Sequence[float]] | None,
) -> list[float]:
    """Rewards of ``texts`` against ``answer``: as ``sample_groups`` grades, or by ``reward_fn``."""
    if not texts:
        return []
    golds = [answer] * len(texts)
    if reward_fn is None:
        return _rewards.math_rewards(texts, golds, require_boxed=require_boxed)
    return [float(x) for x in reward_fn(texts, golds)]


def near_miss_group(
    group: Group,
    tokenizer,
    *,
    require_boxed: bool = True,
    reward_fn: Callable[[list[str], list[str]], Sequence[float]] | None = None,
    keep_unfilled: bool = False,
) -> Group | None:
    """The controlled LLD experiment (docs/method.md §5): keep the correct responses, replace each
    incorrect one by a copy of a correct response whose graded number is changed, so right and wrong
    share almost every token.

    Built on token ids (``near_miss_ids``): the copy shares every token of its source except those
    of the number the reward reads (inside the final ``\\boxed{}``, ``graded_number_span``), and
    keeps the source's truncation (no EOS when the source had none). Every copy is graded as the
    group was (``require_boxed``, or the ``reward_fn(texts, answers)`` it was graded by) and only a
    copy graded wrong is used: the k-th incorrect slot copies the (k mod N+)-th correct response,
    or the next one in turn whose copy grades wrong. When no correct response gives such a copy
    (no number to change, or a copy still graded right), the result is None, or with
    ``keep_unfilled=True`` (the trainer's ``negatives="near_miss"``) the group itself. Copies carry
    their own (graded) rewards; ``rollouts.meta["near_miss"]`` records the rows replaced and their
    sources. Introduced in notebook 02.
    """
    if group.status != "mixed":
        raise ValueError(
            f"Group {group.question_id!r} is {group.status}: near-miss negatives need a mixed group"
        )
    ro, G = group.rollouts, group.group_size
    right = [i for i in range(G) if bool(group.correct[i])]
    wrong = [i for i in range(G) if not bool(group.correct[i])]
    copies: dict[int, list[int]] = {}  # correct row -> its near-miss copy (when it has a number)
    for source in right:
        try:
            ids = ro.completion_ids[source][ro.completion_mask[source].bool()].tolist()
            copies[source] = near_miss_ids(ids, tokenizer, group.answer)
        except ValueError:
            continue
    texts = {s: tokenizer.decode(ids, skip_special_tokens=True) for s, ids in copies.items()}
    scores = dict(zip(texts, _grade(list(texts.values()), group.answer, require_boxed, reward_fn)))
    usable = {s for s, r in scores.items() if not _rewards.is_correct(r)}  # copies graded wrong
    if not usable:
        return group if keep_unfilled else None
    # wrong slot k takes correct row k mod N+, or the next one in turn with a usable copy
    sources = {}
    for k, row in enumerate(wrong):
        order = [right[(k + j) % len(right)] for j in range(len(right))]
        sources[row] = next(s for s in order if s in usable)
    rows, row_texts, rewards, origin = [], [], [], []
    for i in range(G):
        if i in sources:
            rows.append(copies[sources[i]])
            row_texts.append(texts[sources[i]])
            rewards.append(scores[sources[i]])
        else:
            rows.append(ro.completion_ids[i][ro.completion_mask[i].bool()].tolist())
            row_texts.append(ro.texts[i])
            rewards.append(float(group.rewards[i]))
        origin.append(sources.get(i, i))
    completion_ids, completion_mask = _right_padded(rows, _pad_id(tokenizer))  # (G, T)
    device = ro.completion_ids.device
    out = Group.from_tensors(
        ro.prompt_ids,
        completion_ids.to(device),
        completion_mask.to(device),
        torch.tensor(rewards, dtype=group.rewards.dtype),
        prompt_mask=ro.prompt_mask,
        question_id=f"{group.question_id}/near-miss",
        answer=group.answer,
        problem=group.problem,
        texts=row_texts,
        truncated=ro.truncated.cpu()[origin],
    )
    out.rollouts.meta = dict(ro.meta) | {
        "source_question_id": source_question_id(group),
        "slot_rows": list(range(G)),
        "near_miss": {
            "rows": wrong,
            "sources": [sources[r] for r in wrong],
            "unusable_sources": [s for s in right if s not in usable],
        },
    }
    return out


def source_question_id(group: Group) -> str:
    """The id of the sampled question a constructed group (near-miss, branched) was built from;
    the group's own id for a sampled group."""
    return group.rollouts.meta.get("source_question_id", group.question_id)


def slot_rows(group: Group) -> list[int]:
    """For each row of ``group``, the row of the sampled group whose slot it fills: a constructed
    group (branched with dropped slots, near-miss) records them; a sampled group's are 0..G-1."""
    return list(group.rollouts.meta.get("slot_rows", range(group.group_size)))


def select_rows(group: Group, rows: Sequence[int]) -> Group:
    """The sub-group of ``group``'s rows ``rows`` (positions, kept in the order given), with the
    same question id, answer and meta, and ``meta["slot_rows"]`` narrowed to them."""
    ro = group.rollouts
    idx = torch.as_tensor(list(rows), dtype=torch.long)
    if idx.numel() == 0 or int(idx.min()) < 0 or int(idx.max()) >= group.group_size:
        raise ValueError(
            f"Group {group.question_id!r}: rows {list(rows)} must be non-empty positions < "
            f"{group.group_size}"
        )
    on = idx.to(ro.completion_ids.device)
    out = Group.from_tensors(
        ro.prompt_ids[on],
        ro.completion_ids[on],
        ro.completion_mask[on],
        group.rewards[idx],
        prompt_mask=ro.prompt_mask[on],
        question_id=group.question_id,
        answer=group.answer,
        problem=group.problem,
        texts=[ro.texts[i] for i in idx.tolist()],
    )
    out.rollouts.truncated = ro.truncated[idx.to(ro.truncated.device)].clone()
    out.rollouts = _trim(out.rollouts)  # drop completion columns only the left-out rows used
    slots = slot_rows(group)
    out.rollouts.meta = dict(ro.meta) | {"slot_rows": [slots[i] for i in idx.tolist()]}
    return out


def branch_prefix_length(fraction: float, length: int) -> int:
    """floor(f·L), the tokens a branched answer copies from its correct source of L tokens.

    The 1e-9 absorbs the float rounding of f·L (0.29·100 = 28.999999999999996 is 29 tokens); a
    product that is truly within 1e-9 below an integer would need L > 1e8 for a 2-decimal f.
    """
    return math.floor(fraction * length + 1e-9)


def _branch_seed(seed: int, question_id: str, try_index: int) -> int:
    """The seed of one try round of ``branched_group``: a 63-bit hash of (seed, question id, try),
    so groups and rounds draw different numbers while the fraction shares them (common random
    numbers across f)."""
    digest = hashlib.sha256(f"{seed}/{question_id}/{try_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _source_answer(ro: Rollouts, row: int, eos_ids: set[int]) -> list[int]:
    """Row ``row``'s answer tokens without its trailing EOS (a truncated row has none)."""
    ids = ro.completion_ids[row][ro.completion_mask[row].bool()].tolist()
    return ids[:-1] if ids and ids[-1] in eos_ids else ids


def branched_group(
    group: Group,
    model: nn.Module,
    tokenizer,
    fraction: float,
    *,
    temperature: float,
    max_new_tokens: int,
    seed: int,
    max_tries: int = 4,
    require_boxed: bool = True,
    partial: bool = True,
    keep_unfilled: bool = False,
    reward_fn: Callable[[list[str], list[str]], Sequence[float]] | None = None,
) -> Group | None:
    """Branching negatives, a knob between natural and near-miss ones (docs/method.md §5): keep the
    correct responses, replace each wrong one by the model's own continuation of a correct prefix.

    Wrong slot k (in row order) copies the first floor(f·L) tokens of the (k mod N+)-th correct
    response (``branch_prefix_length``; L counts its tokens without the trailing EOS) and lets the
    model continue from prompt + prefix at ``temperature`` for at most ``max_new_tokens`` - prefix
    new tokens (``rollout.continue_ids``: the library's sampling). The whole answer is graded like
    ``sample_groups`` grades (``rewards.math_rewards`` against ``group.answer``; pass the
    ``require_boxed`` the group was graded with, or the ``reward_fn(texts, answers)`` it was graded
    by) and kept when wrong. Up to ``max_tries`` rounds:
    round t samples every slot still unfilled in one ``generate`` call, seeded from (``seed``, the
    question id, t), so a slot's sample also depends on which slots share its round. A slot still
    unfilled after ``max_tries`` rounds (the model completed its correct start correctly every
    time) is dropped from the group with ``partial=True`` (G shrinks; ``meta["branched"]
    ["dropped_rows"]`` names them), and makes the result None with ``partial=False``; None too when
    no slot is filled. With ``keep_unfilled=True`` (the trainer's ``negatives="branched"``) such a
    slot keeps the group's own wrong response instead, so G stays and the result is never None.
    f = 0 returns ``group`` itself (natural negatives); f = 1 continues after a whole correct
    answer.

    The correct rows keep their ids, masks, rewards, texts and truncation; ``rollouts.meta
    ["branched"]`` records the settings and, per wrong slot, its row, source row, prefix length,
    tries used and round seed (saved by ``save_groups``). Question id: ``"<id>/branch0.50"``.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
        raise TypeError(f"`fraction` must be a number in [0, 1], got {type(fraction).__name__}")
    if not 0 <= fraction <= 1:
        raise ValueError(f"`fraction` must be in [0, 1], got {fraction}")
    if fraction == 0:
        return group
    for name, value, low in (("max_new_tokens", max_new_tokens, 1), ("max_tries", max_tries, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"`{name}` must be an int >= {low}, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"`seed` must be an int, got {type(seed).__name__}")
    if group.status != "mixed":
        raise ValueError(
            f"Group {group.question_id!r} is {group.status}: branched negatives need a mixed group"
        )
    if not group.answer.strip():
        raise ValueError(
            f"Group {group.question_id!r} has no answer: branched negatives are graded against it"
        )
    ro, G = group.rollouts, group.group_size
    right = [i for i in range(G) if bool(group.correct[i])]
    wrong = [i for i in range(G) if not bool(group.correct[i])]
    eos_ids = set(_rollout._eos_ids(model, tokenizer))
    prompt = ro.prompt_ids[0][ro.prompt_mask[0].bool()].tolist()  # (P,) the shared prompt
    # Per wrong slot k: its source correct row, the prefix it copies and its budget of new tokens.
    sources = [right[k % len(right)] for k in range(len(wrong))]
    prefixes = []
    for source in sources:
        answer = _source_answer(ro, source, eos_ids)
        prefixes.append(answer[: branch_prefix_length(fraction, len(answer))])
    budgets = [max_new_tokens - len(p) for p in prefixes]
    if min(budgets) < 0:
        k = budgets.index(min(budgets))
        raise ValueError(
            f"Group {group.question_id!r}: `max_new_tokens`={max_new_tokens} is shorter than the "
            f"{len(prefixes[k])}-token prefix of correct response {sources[k]}; pass the "
            "max_new_tokens the group was sampled with"
        )

    kept: dict[int, tuple[list[int], float, int, int]] = {}  # slot -> (ids, reward, tries, seed)
    for t in range(max_tries):
        todo = [k for k in range(len(wrong)) if k not in kept]  # slots of this round, in order
        if not todo:
            break
        round_seed = _branch_seed(seed, group.question_id, t)
        continuations = _rollout.continue_ids(
            model,
            tokenizer,
            [prompt + prefixes[k] for k in todo],
            max_new_tokens=[budgets[k] for k in todo],
            temperature=temperature,
            seed=round_seed,
        )
        answers = [prefixes[k] + c for k, c in zip(todo, continuations)]
        texts = tokenizer.batch_decode(answers, skip_special_tokens=True)
        scores = _grade(texts, group.answer, require_boxed, reward_fn)
        for k, ids, score in zip(todo, answers, scores):
            if not _rewards.is_correct(score):
                kept[k] = (ids, float(score), t + 1, round_seed)
    if not keep_unfilled and (not kept or (not partial and len(kept) < len(wrong))):
        return None

    # rows of the new group: every correct one, and each wrong slot that was filled (in row order)
    filled = sorted(kept)  # wrong-slot indices k
    replacement = {wrong[k]: kept[k] for k in filled}  # row -> (ids, reward, tries, seed)
    keep_rows = [i for i in range(G) if keep_unfilled or bool(group.correct[i]) or i in replacement]
    rows, texts, truncated, rewards = [], [], [], []
    for i in keep_rows:
        if i in replacement:
            ids, score = replacement[i][0], replacement[i][1]
            rows.append(ids)
            texts.append(tokenizer.decode(ids, skip_special_tokens=True))
            truncated.append(not (ids and ids[-1] in eos_ids))
            rewards.append(score)
        else:
            rows.append(ro.completion_ids[i][ro.completion_mask[i].bool()].tolist())
            texts.append(ro.texts[i])
            truncated.append(bool(ro.truncated[i]))
            rewards.append(float(group.rewards[i]))
    completion_ids, completion_mask = _right_padded(rows, _pad_id(tokenizer))  # (G', T)
    device = ro.completion_ids.device
    index = torch.tensor(keep_rows, device=ro.prompt_ids.device)
    out = Group.from_tensors(
        ro.prompt_ids[index],
        completion_ids.to(device),
        completion_mask.to(device),
        torch.tensor(rewards, dtype=group.rewards.dtype),
        prompt_mask=ro.prompt_mask[index],
        question_id=f"{group.question_id}/branch{fraction:.2f}",
        answer=group.answer,
        problem=group.problem,
        texts=texts,
        truncated=torch.tensor(truncated),
    )
    out.rollouts.meta = dict(ro.meta) | {
        "source_question_id": source_question_id(group),
        "slot_rows": keep_rows,
        "branched": {
            "fraction": float(fraction),
            "temperature": float(temperature),
            "max_new_tokens": max_new_tokens,
            "seed": seed,
            "max_tries": max_tries,
            "require_boxed": require_boxed,
            "partial": partial,
            "keep_unfilled": keep_unfilled,
            "rows": [wrong[k] for k in filled],
            "sources": [sources[k] for k in filled],
            "prefix_lengths": [len(prefixes[k]) for k in filled],
            "tries": [kept[k][2] for k in filled],
            "seeds": [kept[k][3] for k in filled],
            # unfilled slots: dropped, or kept with their own answer (``keep_unfilled``)
            "dropped_rows": []
            if keep_unfilled
            else [wrong[k] for k in range(len(wrong)) if k not in kept],
            "kept_rows": [wrong[k] for k in range(len(wrong)) if k not in kept]
            if keep_unfilled
            else [],
        },
    }
    return out


def branched_groups(
    groups: Iterable[Group],
    model: nn.Module,
    tokenizer,
    fraction: float,
    *,
    temperature: float,
    max_new_tokens: int,
    seed: int,
    max_tries: int = 4,
    require_boxed: bool = True,
    partial: bool = True,
    progress: bool = False,
) -> tuple[list[Group], int]:
    """(branched, n_unfilled): ``branched_group`` of each (mixed) group with the same settings, the
    groups it returned None for left out and counted. Each group's rounds are seeded from ``seed``
    and its own question id, so a group's result does not depend on the others."""
    groups = list(groups)
    if progress:
        from tqdm.auto import tqdm

        groups = tqdm(groups, desc=f"branch f={fraction:.2f}", leave=False)
    out, n_unfilled = [], 0
    for group in groups:
        branched = branched_group(
            group,
            model,
            tokenizer,
            fraction,
            temperature=temperature,
            max_new_tokens=max_new_tokens,
            seed=seed,
            max_tries=max_tries,
            require_boxed=require_boxed,
            partial=partial,
        )
        if branched is None:
            n_unfilled += 1
        else:
            out.append(branched)
    return out, n_unfilled


def balanced_group(group: Group, k: int) -> Group | None:
    """The first ``k`` correct and ``k`` incorrect responses of ``group`` (G = 2k, p = 1/2), in
    their sampled order (the balanced 4+/4- probe of docs/results.md); None when it has fewer of
    either."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"`k` must be an int >= 1, got {k!r}")
    right = group.correct.nonzero().flatten()[:k]
    wrong = (~group.correct).nonzero().flatten()[:k]
    if len(right) < k or len(wrong) < k:
        return None
    rows = torch.cat([right, wrong]).sort().values  # (2k,) row indices, sampling order kept
    return select_rows(group, rows.tolist())


def save_groups(path: str | Path, groups: Sequence[Group], *, settings: dict | None = None) -> Path:
    """Atomically save groups (token ids, texts, rewards, ids, answers) and their sampling
    settings."""
    payload_groups = []
    for i, g in enumerate(groups):
        if not isinstance(g, Group):
            raise TypeError(f"groups[{i}] must be a Group, got {type(g).__name__}")
        r = {f.name: getattr(g.rollouts, f.name) for f in fields(g.rollouts)}
        r = {k: (v.detach().cpu() if isinstance(v, Tensor) else v) for k, v in r.items()}
        r["meta"] = _jsonable(r["meta"])
        payload_groups.append(
            {
                "rollouts": r,
                "rewards": g.rewards.cpu(),
                "question_id": g.question_id,
                "answer": g.answer,
                "problem": g.problem,
            }
        )
    payload = {
        "format": GROUPS_FORMAT,
        "settings": _jsonable(settings or {}),
        "groups": payload_groups,
    }
    return atomic_torch_save(payload, path)


def load_groups(
    path: str | Path, *, device: str | torch.device | None = None, return_settings: bool = False
) -> list[Group] | tuple[list[Group], dict]:
    """Groups saved by ``save_groups`` (and, with return_settings, the settings they were sampled
    with)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"groups file {path} does not exist")
    payload = torch.load(path, map_location=device or "cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != GROUPS_FORMAT:
        raise ValueError(
            f"{path} is not a groups file written by nthr_book.groups.save_groups "
            f"(format {GROUPS_FORMAT!r})"
        )
    groups = []
    for i, g in enumerate(payload["groups"]):
        try:
            groups.append(
                Group(
                    Rollouts(**g["rollouts"]),
                    g["rewards"],
                    g["question_id"],
                    g["answer"],
                    g.get("problem", ""),
                )
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}: group {i} is malformed: {err}") from err
    return (groups, dict(payload["settings"])) if return_settings else groups


def _jsonable(obj: Any) -> Any:
    """A copy of ``obj`` made of JSON types (what torch.load(weights_only=True) accepts)."""
    return json.loads(json.dumps(obj, default=str))


def _check_same_sampling(path: Path, saved: dict, wanted: dict) -> None:
    """Raise when a saved groups file was sampled with other settings than the ones asked for."""
    diff = [k for k in SAMPLING_KEYS if saved.get(k) != wanted[k]]
    if diff:
        detail = "; ".join(
            f"{k}: file {_short(saved.get(k))} vs call {_short(wanted[k])}" for k in diff
        )
        raise ValueError(
            f"groups file {path} was sampled with other settings ({detail}); "
            "delete the file or pass another groups_path"
        )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def load_or_sample_groups(
    path: str | Path | None,
    model: nn.Module,
    tokenizer,
    problems: Iterable[dict],
    *,
    group_size: int = 8,
    max_new_tokens: int,
    temperature: float = 1.0,
    seed: int = 0,
    template: str = "boxed",
    require_boxed: bool = True,
    batch_size: int | None = None,
    progress: bool = False,
) -> tuple[list[Group], dict, str]:
    """(groups, settings, source): the groups saved at ``path`` when its sampling settings match the
    call's, else sampled (seeded), graded and saved there. Notebooks 03 and 04 call it, and so does
    ``lld_sweep.lld_experiment``: the series samples one file and reuses it.

    A file sampled with other settings raises ``ValueError`` naming the settings that differ, rather
    than being overwritten. ``path=None`` samples without saving. A lock file beside ``path``
    (``<path>.lock``) makes callers in other processes wait while one samples, then load its file.
    """
    problems = list(problems)
    ids, _, _ = _problem_fields(problems)
    sampling = {
        "problem_ids": ids,
        "group_size": group_size,
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "seed": seed,
        "template": template,
        "require_boxed": require_boxed,
    }
    if path is None:
        return _sample_and_save(None, model, tokenizer, problems, sampling, batch_size, progress)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # one process samples, the others wait and load (make demo runs two notebooks at a time)
    with FileLock(f"{path}.lock"):
        if path.exists():
            groups, saved = load_groups(path, return_settings=True)
            _check_same_sampling(path, saved, _jsonable(sampling))
            return groups, saved, f"loaded from {path}"
        return _sample_and_save(path, model, tokenizer, problems, sampling, batch_size, progress)


def _sample_and_save(
    path: Path | None,
    model: nn.Module,
    tokenizer,
    problems: list[dict],
    sampling: dict,
    batch_size: int | None,
    progress: bool,
) -> tuple[list[Group], dict, str]:
    """``load_or_sample_groups``' sampling: the groups, their settings, and where they went."""
    options = {name: value for name, value in sampling.items() if name != "problem_ids"}
    groups = sample_groups(
        model, tokenizer, problems, **options, batch_size=batch_size, progress=progress
    )
    settings = sampling | {
        "model": str(getattr(getattr(model, "config", None), "_name_or_path", ""))
    }
    if path is None:
        return groups, settings, "sampled"
    save_groups(path, groups, settings=settings)
    return groups, settings, f"sampled, saved to {path}"
