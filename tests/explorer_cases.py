"""The threshold explorer's tiny case: a random model over V = 64 tokens and three hand-made groups.

Shared by ``tests/test_explorer.py`` and ``tests/test_widgets.py``; the fixtures that build it once
per test file (``explorer_model``, ``explorer_groups``, ``explorer_scores``) are in
``tests/conftest.py``.
"""

from __future__ import annotations

from nthr_book import nthr
from nthr_book.groups import Group

V = 64  # tiny vocabulary: the full-vocabulary brute force stays cheap


def make_group(
    qid: str, responses: list[list[int]], rewards: list[float], prompt: list[int]
) -> Group:
    """A Group from token-id lists (right-padded with id 2, masked)."""
    return Group.from_token_lists(
        prompt, responses, rewards, pad_id=2, question_id=qid, problem=f"problem {qid}", answer="7"
    )


def make_groups() -> list[Group]:
    """q0 and q1 mixed, q2 homogeneous (listed between them, so the explorer must skip it)."""
    # q0: incorrect responses reuse the correct ones' tokens (high scores) and add others (low
    # scores)
    q0 = make_group(
        "q0",
        [
            [10, 11, 12, 13, 14],
            [10, 11, 12, 20, 21, 22],
            [10, 11, 12, 15],
            [30, 31, 10, 11, 12, 13, 32],
        ],
        [1.0, 0.0, 1.0, 0.0],
        [5, 6, 7],
    )
    q1 = make_group(
        "q1", [[40, 41, 42], [40, 41, 43, 44], [45, 40, 41], [46, 47]], [0.0, 1.0, 0.0, 0.0], [8, 9]
    )
    homogeneous = make_group("q2", [[10, 11], [12, 13]], [1.0, 1.0], [5])
    return [q0, homogeneous, q1]


def interior_beta(gs, vocab: str = "generated") -> float:
    """A β whose τ falls strictly inside the incorrect tokens' scores (so the selection is
    non-trivial)."""
    s, mask, correct = gs.scores(vocab), gs.completion_mask, gs.correct
    neg = s[(~correct)[:, None] & mask].sort().values
    target = float((neg[len(neg) // 2 - 1] + neg[len(neg) // 2]) / 2)
    min_sbar = float(nthr.self_influence(s, mask, correct).min())
    return target / min_sbar
