"""Orderers: the ranking and truncation each makes, and the propensities it records."""

from collections import Counter

import numpy as np
import pytest

from inference.pipeline.bandits import SourceBandit
from inference.pipeline.orderers import ExploreOrderer, MaxPerSourceOrderer, TopKOrderer
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


def bandit_with(counts: dict[str, tuple[int, int]]) -> SourceBandit:
    """A bandit that has served each source n slots, c of them clicked."""
    bandit = SourceBandit()
    for source, (n, c) in counts.items():
        bandit.served([source] * n)
        for _ in range(c):
            bandit.rewarded(source, 1.0)
    return bandit


def test_explore_without_epsilon_is_top_k():
    ranked, propensities = ExploreOrderer(SourceBandit(), epsilon=0.0, seed=0)(Query(user_id=1, k=4), SCORED)
    assert ranked.item_ids.tolist() == [2, 4, 3, 5]
    np.testing.assert_array_equal(propensities, np.ones(4))


@pytest.mark.parametrize("pool", [None, 2])
def test_explore_propensities_are_the_probabilities_of_the_lists_it_draws(pool):
    """Each distinct list's frequency over many draws matches the product of its slots' propensities."""
    scored = Candidates(np.arange(1, 10), np.array(["ann"] * 3 + ["list"] * 3 + ["similar"] * 3),
                        np.linspace(0.9, 0.1, 9).astype(np.float32))
    bandit = bandit_with({"ann": (10, 1), "list": (10, 5), "similar": (10, 2)})
    orderer, draws = ExploreOrderer(bandit, epsilon=0.4, pool=pool, seed=1), 20_000
    lists, probability = Counter(), {}
    for _ in range(draws):
        ranked, propensities = orderer(Query(user_id=1, k=3), scored)
        key = tuple(ranked.item_ids.tolist())
        lists[key] += 1
        probability.setdefault(key, float(np.prod(propensities)))
        assert probability[key] == pytest.approx(float(np.prod(propensities)))
        assert len(set(key)) == 3
    assert len(lists) > 50 and sum(probability.values()) == pytest.approx(1.0, abs=0.03)  # nearly every list
    if pool is not None:  # the third item of a source is only shown once the two above it are
        assert all({1, 2} & set(key[:key.index(3)]) for key in lists if 3 in key)
    for key, count in lists.items():
        p = probability[key]
        assert abs(count / draws - p) < 4 * np.sqrt(p * (1 - p) / draws) + 1e-4, key


def test_explored_slots_go_to_the_sources_the_bandit_finds_rewarding():
    scored = Candidates(np.arange(1, 201), np.array(["ann"] * 100 + ["list"] * 100),
                        np.concatenate([np.linspace(1, 0.5, 100), np.linspace(0.4, 0, 100)]).astype(np.float32))
    bandit = bandit_with({"ann": (1000, 10), "list": (1000, 300)})
    ranked, propensities = ExploreOrderer(bandit, epsilon=0.5, seed=2)(Query(user_id=1, k=100), scored)
    explored = ranked.sources[propensities < 0.5]  # the best remaining item has propensity >= 1 - epsilon
    share = bandit.estimates(np.array(["list"]))[0] / bandit.estimates(np.array(["ann", "list"])).sum()
    assert share > 0.9 and np.mean(explored == "list") > 0.8
    assert (ranked.sources == "list").sum() > 30  # without exploration, none of list's items would be shown


def test_explore_rejects_epsilon_outside_0_1():
    with pytest.raises(ValueError, match=r"epsilon = 1.0; expected a probability in \[0, 1\)"):
        ExploreOrderer(SourceBandit(), epsilon=1.0)
    with pytest.raises(ValueError, match="pool = 0; expected at least 1"):
        ExploreOrderer(SourceBandit(), epsilon=0.1, pool=0)
