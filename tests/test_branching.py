"""EAGER's branching decisions on hand-made entropy sequences: threshold, percentile, cap, the no-branch limit,
the vote with ties, the re-allocation arithmetic."""

from __future__ import annotations

import numpy as np
import pytest

from edge_ensemble.branching import EntropyHistory, majority_vote, may_branch, reallocate, topn_entropy
from edge_ensemble.decisions import entropy


def test_topn_entropy_renormalises_the_top_n():
    p = np.array([0.5, 0.25, 0.125, 0.125])
    assert topn_entropy(p, 2) == pytest.approx(entropy(np.array([2 / 3, 1 / 3])))
    assert topn_entropy(p, 10) == pytest.approx(entropy(p))  # n past the vocabulary: the full entropy
    uniform = np.full(1000, 1e-3)
    assert topn_entropy(uniform) == pytest.approx(np.log(20))  # top-20 of a flat distribution


def test_dynamic_threshold_is_the_base_until_the_percentile_passes_it():
    hist = EntropyHistory()
    assert hist.threshold(2.5, 99) == 2.5  # nothing seen yet
    for h in [0.1, 0.2, 0.3, 0.4]:
        hist.add(h)
    assert hist.threshold(2.5, 99) == 2.5
    for h in [3.0] * 10:
        hist.add(h)
    assert hist.threshold(2.5, 99) == pytest.approx(3.0)
    assert hist.threshold(2.5, 0) == 2.5  # the 0th percentile is the minimum, below the base


def test_may_branch_respects_threshold_cap_and_no_branch_limit():
    assert may_branch(3.0, 2.5, 1, 8, 0, 1000)
    assert not may_branch(2.5, 2.5, 1, 8, 0, 1000)  # strictly above the threshold
    assert not may_branch(3.0, 2.5, 8, 8, 0, 1000)  # the cap counts live and finished sequences
    assert may_branch(3.0, 2.5, 7, 8, 999, 1000)
    assert not may_branch(3.0, 2.5, 7, 8, 1000, 1000)  # 1000 tokens without a branch: branching is off


def test_majority_vote_with_ties_and_missing_answers():
    assert majority_vote(["4", "5", "4"], [-1.0, -0.1, -2.0]) == 0  # "4" has two votes; its best branch
    assert majority_vote(["4", "5"], [-1.0, -0.5]) == 1  # a tie: the better mean log-probability wins
    assert majority_vote([None, "7", None], [-0.1, -3.0, -0.2]) == 1  # no answer never wins a vote
    assert majority_vote([None, None], [-0.9, -0.3]) == 1  # free text: the likeliest branch
    with pytest.raises(ValueError):
        majority_vote([], [])


def test_reallocation_splits_the_saved_budget_over_capped_prompts():
    # 4 prompts, M = 8: 32 budgeted, 3 + 8 + 2 + 8 = 21 used -> 11 saved, split over the two capped ones
    assert reallocate([3, 8, 2, 8], [False, True, False, True], 8) == [0, 5, 0, 5]
    assert reallocate([1, 8], [False, True], 2, extra_cap=3) == [0, 0]  # 4 budgeted, 9 used: nothing saved
    assert reallocate([1, 1, 8], [False, False, True], 8) == [0, 0, 14]  # saved 14, cap 24
    assert reallocate([1, 1, 1, 1, 8], [False] * 4 + [True], 2, extra_cap=3) == [0, 0, 0, 0, 0]
    assert reallocate([1] * 9 + [4], [False] * 9 + [True], 4, extra_cap=3) == [0] * 9 + [12]  # capped at 3M
    assert reallocate([2, 2], [False, False], 8) == [0, 0]
