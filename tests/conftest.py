"""Fixtures shared by more than one test file: the threshold explorer's tiny case
(``explorer_cases``).

Imports happen inside the fixtures, so test files that never ask for them load nothing more.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def explorer_model():
    """A tiny random policy over the V tokens of the explorer's groups, in eval mode."""
    from explorer_cases import V

    from nthr_book.models import tiny_random_model

    return tiny_random_model(V, seed=0).eval()


@pytest.fixture(scope="module")
def explorer_groups():
    """``explorer_cases.make_groups()``: q0 and q1 mixed, q2 homogeneous."""
    from explorer_cases import make_groups

    return make_groups()


@pytest.fixture(scope="module")
def explorer_scores(explorer_model, explorer_groups):
    """GroupScores of the mixed groups (q0, q1) in both vocabulary modes."""
    from nthr_book.explorer import compute_group_scores

    mixed = [g for g in explorer_groups if g.status == "mixed"]
    return [compute_group_scores(explorer_model, g, vocab=("generated", "full")) for g in mixed]
