"""Orderers: the ranking and truncation each makes, and the propensities it records."""

from collections import Counter

import numpy as np
import pandas as pd
import pytest

from inference.pipeline.bandits import UCB1, EpsilonGreedy, SourceBandit, Thompson, strategy_arm
from inference.pipeline.orderers import (
    BanditOrderer,
    BoostOrderer,
    ExploreOrderer,
    MaxPerSourceOrderer,
    MMROrderer,
    PinOrderer,
    SpacingOrderer,
    StrategyBanditOrderer,
    TopKOrderer,
    by_score,
)
from inference.pipeline.types import Candidates, Query

SCORED = Candidates(np.array([1, 2, 3, 4, 5, 6]), np.array(["ann", "ann", "ann", "popular", "ann", "popular"]),
                    np.array([0.2, 0.9, 0.5, 0.7, 0.5, 0.1], np.float32))
RANKED = SCORED.take(by_score(SCORED))  # what the executor hands the first orderer: 2, 4, 3, 5, 1, 6


def test_top_k_keeps_the_best_k_by_score_ties_in_input_order():
    ranked, propensities = TopKOrderer()(Query(user_id=1, k=4), RANKED)
    assert ranked.item_ids.tolist() == [2, 4, 3, 5]
    assert ranked.sources.tolist() == ["ann", "popular", "ann", "ann"]
    np.testing.assert_array_equal(ranked.scores, np.array([0.9, 0.7, 0.5, 0.5], np.float32))
    np.testing.assert_array_equal(propensities, np.ones(4))
    assert len(TopKOrderer()(Query(user_id=1, k=50), RANKED)[0]) == len(SCORED)


def test_max_per_source_keeps_each_sources_best_by_score():
    ranked, propensities = MaxPerSourceOrderer(cap=2)(Query(user_id=1), RANKED)
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
    ranked, propensities = ExploreOrderer(SourceBandit(), epsilon=0.0, seed=0)(Query(user_id=1, k=4), RANKED)
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


def with_items(values: dict[str, list], scores=None) -> Candidates:
    """Ranked candidates 1..N (scores descending unless given) hydrated with item columns ``values``."""
    n = len(next(iter(values.values())))
    scores = np.linspace(1.0, 0.1, n) if scores is None else np.asarray(scores)
    return Candidates(np.arange(1, n + 1), np.array(["ann"] * n), scores.astype(np.float32), pd.DataFrame(values))


def naive_mmr(relevance, similarity, lambda_, slots):
    """MMR by its definition: each next item maximises lambda rel - (1 - lambda) max sim to those chosen."""
    chosen = [0]
    while len(chosen) < slots:
        gains = {i: lambda_ * relevance[i] - (1 - lambda_) * max(similarity[i][j] for j in chosen)
                 for i in range(len(relevance)) if i not in chosen}
        chosen.append(max(gains, key=lambda i: (gains[i], -i)))
    return chosen


def test_mmr_lambda_1_keeps_the_ranking_and_lambda_0_takes_the_least_similar_next():
    scored = with_items({"category": ["a", "a", "b", "a", "c"]})
    assert MMROrderer("category", 1.0)(Query(user_id=1, k=5), scored)[0].item_ids.tolist() == [1, 2, 3, 4, 5]
    assert MMROrderer("category", 0.0)(Query(user_id=1, k=5), scored)[0].item_ids.tolist() == [1, 3, 5, 2, 4]
    # genres by Jaccard: after {x, y}, {w} shares nothing, then {y, z} (1/3) before {x} (1/2)
    genres = with_items({"genres": [["x", "y"], ["x"], ["y", "z"], ["w"]]})
    assert MMROrderer("genres", 0.0)(Query(user_id=1, k=4), genres)[0].item_ids.tolist() == [1, 4, 3, 2]


@pytest.mark.parametrize("lambda_", [0.3, 0.6, 0.9])
def test_mmr_matches_its_definition_and_rearranges_only_the_first_depth_slots(lambda_):
    rng = np.random.default_rng(int(lambda_ * 10))
    genres = [sorted(set(rng.choice(list("abcdef"), size=rng.integers(1, 4)).tolist())) for _ in range(30)]
    scores = np.sort(rng.random(30))[::-1]
    scored = with_items({"genres": genres}, scores)
    relevance = (scores - scores.min()) / (scores.max() - scores.min())
    similarity = [[len(set(a) & set(b)) / len(set(a) | set(b)) for b in genres] for a in genres]
    ranked, propensities = MMROrderer("genres", lambda_, depth=8)(Query(user_id=1, k=5), scored)
    expected = naive_mmr(relevance, similarity, lambda_, 8)
    assert (ranked.item_ids[:8] - 1).tolist() == expected
    assert (ranked.item_ids[8:] - 1).tolist() == [i for i in range(30) if i not in expected]
    np.testing.assert_array_equal(propensities, np.ones(30))


def test_spacing_never_breaks_its_gap_while_an_alternative_exists():
    rng = np.random.default_rng(3)
    for trial in range(50):
        categories = rng.choice(["a", "b", "c"], size=20, p=[0.6, 0.3, 0.1]).tolist()
        scored = with_items({"category": categories})
        orderer = SpacingOrderer("category", gap=2)
        ranked, _ = orderer(Query(user_id=1, k=12), scored)
        shown = [categories[i - 1] for i in ranked.item_ids]
        assert sorted(ranked.item_ids.tolist()) == list(range(1, 21))  # only reordered
        broken = 0
        for slot in range(12):
            if shown[slot] in shown[max(0, slot - 2):slot]:  # a repeat within the gap ...
                broken += 1  # ... only when every item left (this one and below) repeats too
                assert set(shown[slot:]) <= set(shown[max(0, slot - 2):slot]), (trial, shown)
        assert orderer.broken == broken


def test_spacing_says_so_when_no_alternative_exists():
    orderer = SpacingOrderer("category", gap=1)
    ranked, _ = orderer(Query(user_id=1, k=4), with_items({"category": ["a", "a", "a", "b"]}))
    assert ranked.item_ids.tolist() == [1, 4, 2, 3]  # a b a, then a right after a: no b left
    assert orderer.broken == 1


def test_boost_raises_matching_scores_up_to_its_cap_and_ranks_again():
    scored = with_items({"category": ["a", "b", "a", "b", "b"]}, [0.9, 0.8, 0.7, 0.3, 0.2])
    is_b = lambda c: np.array([v == "b" for v in c.features["category"]])  # noqa: E731
    ranked, propensities = BoostOrderer(is_b, multiply=2.0, cap=2)(Query(user_id=1, k=5), scored)
    assert ranked.item_ids.tolist() == [2, 1, 3, 4, 5]  # 2: 1.6; 4: 0.6 stays below 3's 0.7; 5 is past the cap
    np.testing.assert_allclose(ranked.scores, [1.6, 0.9, 0.7, 0.6, 0.2], rtol=1e-6)
    ranked, _ = BoostOrderer(is_b, add=0.55)(Query(user_id=1, k=5), scored)
    assert ranked.item_ids.tolist() == [2, 1, 4, 5, 3]


def test_pins_land_at_their_positions_when_the_items_are_candidates():
    scored = with_items({"category": list("abcdef")})
    ranked, propensities = PinOrderer(lambda: np.array([6, 99, 5]), [0, 1, 3])(Query(user_id=1, k=6), scored)
    assert ranked.item_ids.tolist() == [6, 1, 2, 5, 3, 4]  # 99 was not proposed or was filtered: not added
    ranked, _ = PinOrderer(lambda: np.array([1]), [50])(Query(user_id=1, k=6), scored)
    assert ranked.item_ids.tolist() == [2, 3, 4, 5, 6, 1]  # past the end: last


def test_a_bandit_orderer_takes_each_drawn_sources_best_remaining_item():
    scored = Candidates(np.arange(1, 7), np.array(["ann", "ann", "ann", "list", "list", "list"]),
                        np.linspace(1, 0.5, 6).astype(np.float32))
    rewarding = bandit_with({"ann": (100, 1), "list": (100, 60)})
    ranked, propensities = BanditOrderer(rewarding, UCB1())(Query(user_id=1, k=4), scored)
    assert ranked.item_ids.tolist() == [4, 5, 6, 1]  # list's items in order, then ann once list has none
    assert np.isnan(propensities).all()  # deterministic: degenerate, never a weight of 1
    ranked, propensities = BanditOrderer(rewarding, EpsilonGreedy(0.2), seed=0)(Query(user_id=1, k=6), scored)
    assert sorted(ranked.item_ids.tolist()) == list(range(1, 7))
    assert set(np.round(propensities, 6)) <= {0.9, 0.1, 1.0}  # greedy 1 - e + e/2, other e/2, last source alone
    thompson = BanditOrderer(rewarding, Thompson(draws=2000), seed=1)
    ranked, propensities = thompson(Query(user_id=1, k=1), scored)
    assert ranked.item_ids.tolist() == [4] and propensities[0] > 0.99


STRATEGIES = {"plain": [], "diverse": [MMROrderer("category", 0.0)], "boosted": [
    BoostOrderer(lambda c: np.asarray(c.item_ids == 6), add=1.0)]}


def strategy_bandit(policy, counts=None, seed=0) -> StrategyBanditOrderer:
    return StrategyBanditOrderer(STRATEGIES, bandit_with({strategy_arm(s): n for s, n in (counts or {}).items()}),
                                 policy, seed)


def test_a_strategy_bandit_serves_the_drawn_strategys_chain_and_each_slots_exact_propensity():
    scored = with_items({"category": ["a", "a", "b", "a", "c", "c"]})  # ranked 1..6
    lists = {"plain": [1, 2, 3], "diverse": [1, 3, 5], "boosted": [6, 1, 2]}
    orderer, draws = strategy_bandit(EpsilonGreedy(1.0)), 3000  # each strategy with probability 1/3
    drawn = Counter()
    for _ in range(draws):
        ranked, propensities, strategy = orderer.draw(Query(user_id=1, k=3), scored)
        assert ranked.item_ids.tolist() == lists[strategy.name]
        assert strategy.propensity == pytest.approx(1 / 3)
        # slot 0: item 1 is plain's and diverse's (2/3), item 6 boosted's alone (1/3); then plain and
        # diverse part at slot 1 (1/2 each given item 1), and each list is alone from there
        expected = {"plain": [2 / 3, 1 / 2, 1], "diverse": [2 / 3, 1 / 2, 1], "boosted": [1 / 3, 1, 1]}
        np.testing.assert_allclose(propensities, expected[strategy.name])
        drawn[strategy.name] += 1
    for name, count in drawn.items():
        assert abs(count / draws - 1 / 3) < 3 * np.sqrt(2 / 9 / draws), (name, count)


def test_a_strategy_bandit_favours_the_rewarding_strategy_and_a_deterministic_policy_logs_no_propensity():
    scored = with_items({"category": ["a", "a", "b", "a", "c", "c"]})
    counts = {"plain": (1000, 10), "diverse": (1000, 300), "boosted": (1000, 20)}
    ranked, propensities, strategy = strategy_bandit(UCB1(), counts).draw(Query(user_id=1, k=3), scored)
    assert strategy.name == "diverse" and ranked.item_ids.tolist() == [1, 3, 5]
    assert np.isnan(propensities).all() and np.isnan(strategy.propensity)  # degenerate: replay refuses it
    thompson = strategy_bandit(Thompson(draws=500), counts, seed=3)
    names = Counter(thompson.draw(Query(user_id=1, k=3), scored)[2].name for _ in range(50))
    assert names["diverse"] == 50
    with pytest.raises(ValueError, match=r"strategies \['plain'\]; expected at least 2"):
        StrategyBanditOrderer({"plain": []}, SourceBandit(), UCB1())
