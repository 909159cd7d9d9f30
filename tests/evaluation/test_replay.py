"""Replay: the prefix-weighted IPS of a candidate ranking from an exploring pipeline's log,
checked by hand and against the true value on simulated traffic."""

import numpy as np
import pandas as pd
import pytest

from evaluation.replay import logged_queries, replay
from inference.pipeline.bandits import SourceBandit, Thompson, strategy_arm
from inference.pipeline.orderers import BanditOrderer, BoostOrderer, ExploreOrderer, StrategyBanditOrderer
from inference.pipeline.types import Candidates, Query


def slots_of(requests: list[dict]) -> pd.DataFrame:
    """Logged slots (as `logged_slots` reads them) of requests {"items", "propensities", "rewards"}."""
    rows = []
    for n, request in enumerate(requests):
        slots = zip(request["items"], request["propensities"], request["rewards"], strict=True)
        for position, (item, p, r) in enumerate(slots):
            rows.append({"request_id": f"r{n}", "position": position, "item_id": item, "propensity": p, "reward": r,
                         "user_id": request.get("user_id", n), "context": {"hour": 20}, "recent_items": (1, 2),
                         "k": len(request["items"])})
    return pd.DataFrame(rows)


def test_prefix_weights_by_hand():
    slots = slots_of([
        {"items": [1, 2], "propensities": [0.5, 0.25], "rewards": [1.0, 1.0]},  # the candidate's list
        {"items": [1, 3], "propensities": [0.5, 0.5], "rewards": [0.0, 1.0]},   # agrees at slot 0 only
        {"items": [4, 2], "propensities": [0.2, 1.0], "rewards": [1.0, 0.0]},   # differs at slot 0
    ])
    top1, top2 = replay(slots, lambda query: np.array([1, 2]), depths=[1, 2])
    # slot 0 terms: 1/0.5, 0/0.5, 0 -> mean 2/3; slot 1 adds 1/(0.5*0.25) = 8 for the first request only
    assert top1.candidate.value == pytest.approx(2 / 3) and top1.matched == pytest.approx(2 / 3)
    assert top2.candidate.value == pytest.approx((2 + 8) / 3) and top2.matched == pytest.approx(1 / 3)
    assert top1.logged.value == pytest.approx(2 / 3) and top2.logged.value == pytest.approx(4 / 3)
    assert top2.effective_sample_size == pytest.approx(1.0)


def test_logged_queries_rebuild_each_request():
    queries = logged_queries(slots_of([{"items": [5, 6], "propensities": [1, 1], "rewards": [0, 0], "user_id": 9}]))
    assert queries == {"r0": Query(user_id=9, context={"hour": 20}, recent_items=(1, 2), k=2)}


def test_replay_recovers_a_different_rankings_true_value_from_an_exploring_log():
    rng = np.random.default_rng(0)
    items = np.arange(10)
    click = np.linspace(0.05, 0.5, 10)  # item i's click probability at the top slot
    position_bias = np.array([1.0, 0.6, 0.4])
    logging_scores = np.linspace(1, 0, 10).astype(np.float32)  # the logged ranker prefers the worst items
    candidates = Candidates(items, np.array(["ann"] * 6 + ["popular"] * 4), logging_scores)
    orderer = ExploreOrderer(SourceBandit(), epsilon=0.6, seed=1)
    requests = []
    for _ in range(30_000):
        ranked, propensities = orderer(Query(user_id=1, k=3), candidates)
        rewards = (rng.random(3) < click[ranked.item_ids] * position_bias).astype(float)
        requests.append({"items": ranked.item_ids.tolist(), "propensities": propensities.tolist(), "rewards": rewards})
    slots = slots_of(requests)
    best_first = items[np.argsort(-click)]  # the candidate: the truly best items first
    estimates = replay(slots, lambda query: best_first, depths=[1, 3])
    for estimate in estimates:
        truth = float((click[best_first[:estimate.depth]] * position_bias[:estimate.depth]).sum())
        assert abs(estimate.candidate.value - truth) < 3.5 * estimate.candidate.std_error, (estimate, truth)
        assert estimate.logged.high < truth  # the logged ranker does worse; replay sees the candidate's gain
    assert 0 < estimates[1].matched < estimates[0].matched < 1


def test_bad_logs_and_depths_name_the_problem():
    slots = slots_of([{"items": [1, 2], "propensities": [1.0, 1.0], "rewards": [0.0, 1.0]}])
    with pytest.raises(ValueError, match=r"lack columns \['propensity'\]"):
        replay(slots.drop(columns="propensity"), lambda q: np.array([1]), [1])
    with pytest.raises(ValueError, match="no served slots"):
        replay(slots.iloc[:0], lambda q: np.array([1]), [1])
    with pytest.raises(ValueError, match=r"depths \[3\]; expected some in \[1, 2\]"):
        replay(slots, lambda q: np.array([1]), [3])


def test_replay_refuses_slots_a_deterministic_policy_chose():
    slots = slots_of([{"items": [1, 2], "propensities": [0.5, np.nan], "rewards": [0.0, 1.0]},
                      {"items": [2, 1], "propensities": [0.5, 0.5], "rewards": [0.0, 1.0]}])
    assert replay(slots, lambda q: np.array([1]), [1])[0].matched == 0.5  # within depth 1 all is weighted
    with pytest.raises(ValueError, match=r"1 logged slots within depth 2 have no propensity.*requests \['r0'\]"):
        replay(slots, lambda q: np.array([1, 2]), [2])


def bandit_log(seed, requests=800):
    """A feed whose sources differ a little in click rate, served by a Thompson `bandit` orderer that
    learns from each click as the service's feedback would; the logged slots and the truth model."""
    rng = np.random.default_rng(seed)
    sources = np.repeat(["ann", "popular", "similar"], 4)
    click = np.concatenate([np.linspace(0.22, 0.15, 4), np.linspace(0.20, 0.10, 4), np.linspace(0.21, 0.12, 4)])
    position_bias = np.array([1.0, 0.7, 0.5])
    candidates = Candidates(np.arange(12), sources, np.linspace(1, 0, 12).astype(np.float32))
    bandit = SourceBandit()
    orderer = BanditOrderer(bandit, Thompson(draws=50), seed=seed)
    logged = []
    for _ in range(requests):
        ranked, propensities = orderer(Query(user_id=1, k=3), candidates)
        rewards = (rng.random(3) < click[ranked.item_ids] * position_bias).astype(float)
        bandit.served(ranked.sources.tolist())
        for source, reward in zip(ranked.sources, rewards, strict=True):
            bandit.rewarded(source, reward)
        logged.append({"items": ranked.item_ids.tolist(), "propensities": propensities.tolist(), "rewards": rewards})
    return slots_of(logged), click, position_bias


def test_replay_of_a_bandit_orderers_log_covers_the_candidates_true_value():
    """Over 50 seeds, the 95% interval of a fixed candidate's top-2 reward covers its true value in at
    least 90% of runs, although the logging bandit's propensities change as it learns (48 here)."""
    candidate = np.array([0, 8])  # ann's best, then similar's best: a list the bandit draws in ~11% of requests
    covered = 0
    for seed in range(50):
        slots, click, position_bias = bandit_log(seed)
        truth = float((click[candidate] * position_bias[:2]).sum())
        (estimate,) = replay(slots, lambda query: candidate, depths=[2])
        covered += estimate.candidate.low <= truth <= estimate.candidate.high
    assert covered >= 45, covered


def strategy_log(seed, requests=300):
    """A feed served by a Thompson bandit over three strategies, "plain" (the ranking: 0 1 2),
    "second" (item 5 boosted into slot 1: 0 5 1) and "first" (item 6 boosted to the top: 6 0 1),
    learning per slot from each click as the service's feedback would; the logged slots and the
    truth model."""
    rng = np.random.default_rng(seed)
    click = np.array([0.20, 0.18, 0.16, 0.15, 0.20, 0.17, 0.19, 0.10])
    position_bias = np.array([1.0, 0.7, 0.5])
    candidates = Candidates(np.arange(8), np.array(["ann"] * 8), np.linspace(1, 0, 8).astype(np.float32))
    strategies = {"plain": [], "second": [BoostOrderer(lambda c: np.asarray(c.item_ids == 5), add=0.6)],
                  "first": [BoostOrderer(lambda c: np.asarray(c.item_ids == 6), add=1.0)]}
    bandit = SourceBandit()
    # 1,000 posterior draws estimate even a small probability as above 0: a strategy the estimate puts
    # at 0 is never drawn, so the log would lack support for it
    orderer = StrategyBanditOrderer(strategies, bandit, Thompson(draws=1000), seed=seed)
    logged = []
    for _ in range(requests):
        ranked, propensities, strategy = orderer.draw(Query(user_id=1, k=3), candidates)
        rewards = (rng.random(3) < click[ranked.item_ids] * position_bias).astype(float)
        bandit.served([strategy_arm(strategy.name)] * 3)
        for reward in rewards:
            bandit.rewarded(strategy_arm(strategy.name), reward)
        logged.append({"items": ranked.item_ids.tolist(), "propensities": propensities.tolist(), "rewards": rewards})
    return slots_of(logged), click, position_bias


def test_replay_of_a_strategy_bandits_log_covers_a_strategys_true_value():
    """Over 20 seeds, the 95% interval of the plain list's top-3 reward covers its true value in at
    least 17 runs, although the bandit's probabilities change as it learns, and plain and second share
    slot 0 (its propensity is then their summed probability)."""
    plain = np.array([0, 1, 2])
    covered = 0
    for seed in range(20):
        slots, click, position_bias = strategy_log(seed)
        assert set(slots.loc[slots["position"] == 0, "item_id"]) == {0, 6}
        truth = float((click[plain] * position_bias).sum())
        (estimate,) = replay(slots, lambda query: plain, depths=[3])
        covered += estimate.candidate.low <= truth <= estimate.candidate.high
    assert covered >= 17, covered
