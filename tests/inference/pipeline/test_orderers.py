"""Orderers: the ranking and truncation each makes, and the propensities it records."""

import numpy as np
import pytest

from inference.pipeline.orderers import MaxPerSourceOrderer, TopKOrderer
from inference.pipeline.types import Candidates, Query

SCORED = Candidates(np.array([1, 2, 3, 4, 5, 6]), np.array(["ann", "ann", "ann", "popular", "ann", "popular"]),
                    np.array([0.2, 0.9, 0.5, 0.7, 0.5, 0.1], np.float32))


def test_top_k_keeps_the_best_k_by_score_ties_in_input_order():
    ranked, propensities = TopKOrderer()(Query(user_id=1, k=4), SCORED)
    assert ranked.item_ids.tolist() == [2, 4, 3, 5]
    assert ranked.sources.tolist() == ["ann", "popular", "ann", "ann"]
    np.testing.assert_array_equal(ranked.scores, np.array([0.9, 0.7, 0.5, 0.5], np.float32))
    np.testing.assert_array_equal(propensities, np.ones(4))
    assert len(TopKOrderer()(Query(user_id=1, k=50), SCORED)[0]) == len(SCORED)


def test_max_per_source_keeps_each_sources_best_by_score():
    ranked, propensities = MaxPerSourceOrderer(cap=2)(Query(user_id=1), SCORED)
    assert ranked.item_ids.tolist() == [2, 4, 3, 6]  # ann's 5 and 1 come after its best two
    np.testing.assert_array_equal(propensities, np.ones(4))
    with pytest.raises(ValueError, match="cap = 0; expected at least 1"):
        MaxPerSourceOrderer(cap=0)
