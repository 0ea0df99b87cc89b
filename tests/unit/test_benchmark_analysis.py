"""Tests for the benchmarks' analysis helpers, on small hand-worked examples."""

from __future__ import annotations

import numpy as np
from benchmarks.hasy_agreement import pair_figures


def test_pair_figures_count_the_most_confused_pairs_and_the_merge_gain() -> None:
    # Classes a and b look alike: 5 true b said a, 1 true a said b; c and a: 1 error.
    truth = [0] * 9 + [1] * 7 + [2] * 4
    said = [0] * 8 + [1] + [0] * 5 + [1] * 2 + [2] * 3 + [0]
    figures = pair_figures(np.array(truth), np.array(said), ("a", "b", "c"), pairs=1)
    assert figures["errors"] == 7
    assert figures["errors_in_most_confused_pairs"] == 6
    assert figures["most_confused_pairs"] == [
        {"classes": ["a", "b"], "confused": [1, 5], "right": [8, 2]}
    ]
    # Saying a for the whole pair: the 5 b-said-a stay wrong, the 1 a-said-b turns right and
    # the 2 b-said-b turn wrong (-1); saying b: 5 right, 8 a lost (-3). Neither helps.
    assert figures["merge_to_better_class_gain_upper_bound"] == 0


def test_pair_figures_gain_when_one_class_is_mostly_wrong() -> None:
    # Class b is said 4 times, 3 of them for true a: saying a for the pair gains 3 - 1 = 2.
    truth = [0] * 6 + [1] * 2
    said = [0] * 3 + [1] * 3 + [1, 0]
    figures = pair_figures(np.array(truth), np.array(said), ("a", "b"), pairs=3)
    assert figures["errors"] == 4 and figures["errors_in_most_confused_pairs"] == 4
    assert figures["merge_to_better_class_gain_upper_bound"] == 2
