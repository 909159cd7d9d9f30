"""SourceBandit: posterior means from served slots and rewards, shared safely between threads; the
policies (epsilon-greedy, UCB1, Thompson) on simulated Bernoulli arms with known means."""

import threading

import numpy as np
import pytest

from inference.pipeline.bandits import UCB1, EpsilonGreedy, SharedSourceBandit, SourceBandit, Thompson, strategy_arm


def test_estimates_are_beta_1_1_posterior_means():
    bandit = SourceBandit()
    bandit.served(["ann"] * 8 + ["popular"] * 2)
    bandit.rewarded("ann", 1.0)
    bandit.rewarded("ann", 0.5)
    np.testing.assert_allclose(bandit.estimates(np.array(["ann", "popular", "never"])), [2.5 / 10, 1 / 4, 1 / 2])
    assert bandit.snapshot() == {"ann": {"served": 8, "rewards": 1.5, "estimate": 0.25},
                                 "popular": {"served": 2, "rewards": 0, "estimate": 0.25}}


def test_concurrent_updates_are_all_counted():
    bandit = SourceBandit()

    def work() -> None:
        for _ in range(1000):
            bandit.served(["ann", "popular"])
            bandit.rewarded("ann", 1.0)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert bandit.snapshot()["ann"] == {"served": 8000, "rewards": 8000.0, "estimate": 8001 / 8002}


@pytest.mark.parametrize("reward", [-0.1, 1.5, float("nan")])
def test_a_reward_outside_0_1_is_refused(reward):
    with pytest.raises(ValueError, match=r"for source 'ann'; expected a number in \[0, 1\]"):
        SourceBandit().rewarded("ann", reward)


def test_shared_bandits_add_up_every_servers_counts_through_redis(redis_server):
    one, two = (SharedSourceBandit(redis_server.host, redis_server.port, sync_s=60) for _ in range(2))
    try:
        one.served(["ann"] * 8)
        one.rewarded("ann", 1.0)
        two.served(["ann"] * 2 + ["popular"] * 4)
        two.rewarded("popular", 1.0)
        one.served([strategy_arm("diverse")] * 3)  # a strategy's arm, counted beside the sources
        two.rewarded(strategy_arm("diverse"), 1.0)
        assert one.snapshot()["ann"]["served"] == 8  # its own counts count before any sync
        assert one.sync() and two.sync() and one.sync()
        for bandit in (one, two):
            snapshot = bandit.snapshot()
            assert (snapshot["ann"]["served"], snapshot["ann"]["rewards"]) == (10, 1)
            assert (snapshot["popular"]["served"], snapshot["popular"]["rewards"]) == (4, 1)
            assert (snapshot["strategy:diverse"]["served"], snapshot["strategy:diverse"]["rewards"]) == (3, 1)
        np.testing.assert_allclose(two.estimates(np.array(["ann", "popular"])), [2 / 12, 2 / 6])
    finally:
        one.close()
        two.close()
    restarted = SharedSourceBandit(redis_server.host, redis_server.port, sync_s=60)  # starts from everyone's counts
    assert restarted.snapshot()["ann"]["served"] == 10
    restarted.close()


def test_a_shared_bandit_keeps_its_counts_while_redis_is_down(redis_server, caplog):
    bandit = SharedSourceBandit(redis_server.host, redis_server.port, sync_s=60, timeout_s=0.2)
    redis_server.process.kill()
    redis_server.process.wait()
    bandit.served(["ann"] * 3)
    bandit.rewarded("ann", 1.0)
    assert not bandit.sync() and "bandit counts not shared" in caplog.text
    assert bandit.snapshot()["ann"] == {"served": 3, "rewards": 1.0, "estimate": 2 / 5}
    bandit.close()  # its last sync fails too, logged, not raised


MEANS = np.array([0.1, 0.2, 0.3, 0.5])  # Bernoulli arms; the last is the best


def simulate(policy, rounds, seed):
    """(rounds,) arms the policy pulled, each round drawn from its probabilities given the counts so far."""
    rng = np.random.default_rng(seed)
    served, rewards = np.zeros(len(MEANS)), np.zeros(len(MEANS))
    available, pulled = np.ones(len(MEANS), bool), np.zeros(rounds, np.intp)
    for t in range(rounds):
        p = policy.probabilities(served, rewards, available, rng)
        arm = rng.choice(len(MEANS), p=p)
        served[arm] += 1
        rewards[arm] += rng.random() < MEANS[arm]
        pulled[t] = arm
    return pulled


@pytest.fixture(scope="module")
def pulls():
    """10 seeds of 10,000 rounds per policy; plain Thompson sampling is one posterior draw per round."""
    policies = {"epsilon_greedy": EpsilonGreedy(0.1), "ucb1": UCB1(), "thompson": Thompson(draws=1)}
    return {name: [simulate(policy, 10_000, seed) for seed in range(10)] for name, policy in policies.items()}


def test_thompson_and_ucb1_regret_less_than_epsilon_greedy(pulls):
    regret = {name: np.mean([np.sum(MEANS.max() - MEANS[p]) for p in runs]) for name, runs in pulls.items()}
    # epsilon-greedy keeps paying epsilon * mean gap per round: about 0.1 * 0.3 * 10,000 = 300
    assert regret["thompson"] < regret["epsilon_greedy"] and regret["ucb1"] < regret["epsilon_greedy"], regret


def test_every_policy_ends_on_the_best_arm(pulls):
    for name, runs in pulls.items():
        for pulled in runs:
            assert np.mean(pulled[-1000:] == len(MEANS) - 1) >= 0.9, name


@pytest.mark.parametrize("policy", [EpsilonGreedy(0.3), Thompson(draws=1000), Thompson(draws=1000, explore=0.3)])
def test_logged_propensities_match_the_frequencies_of_the_arms_drawn(policy):
    rng = np.random.default_rng(4)
    served, rewards = np.array([20.0, 30.0, 10.0, 25.0]), np.array([4.0, 9.0, 3.0, 6.0])
    available = np.array([True, True, True, False])
    draws, n = np.zeros(4), 4000
    logged = np.zeros(4)
    for _ in range(n):
        p = policy.probabilities(served, rewards, available, rng)
        arm = rng.choice(4, p=p)
        draws[arm] += 1
        logged[arm] += p[arm]
    frequency = draws / n
    mean_logged = np.divide(logged, draws, out=np.zeros(4), where=draws > 0)  # E[p(arm) | arm drawn]
    expected = np.array([np.mean([policy.probabilities(served, rewards, available, rng)[a] for _ in range(50)])
                         for a in range(4)])
    assert frequency[3] == 0 and expected[3] == 0  # an arm with nothing left is never drawn
    se = np.sqrt(expected * (1 - expected) / n)
    assert np.all(np.abs(frequency - expected) <= 3 * se + 1e-12), (frequency, expected)
    drawn = draws > 0
    assert np.all(np.abs(mean_logged[drawn] - expected[drawn]) < 0.02)


def test_thompson_explore_is_a_floor_under_every_available_arm():
    rng = np.random.default_rng(0)
    served, rewards = np.array([1000.0, 1000.0, 1000.0, 5.0]), np.array([900.0, 100.0, 50.0, 1.0])
    available = np.array([True, True, True, False])
    plain = Thompson(draws=200).probabilities(served, rewards, available, rng)
    assert plain[1] == plain[2] == 0.0  # arm 0 wins every draw: the others are never shown
    floored = Thompson(draws=200, explore=0.3).probabilities(served, rewards, available, rng)
    assert floored == pytest.approx([0.7 + 0.1, 0.1, 0.1, 0.0])
    with pytest.raises(ValueError, match="explore"):
        Thompson(explore=1.5)


def test_ucb1_tries_every_arm_then_follows_the_bound_and_is_deterministic():
    rng = np.random.default_rng(0)
    available = np.ones(3, bool)
    assert UCB1().probabilities(np.array([2.0, 0.0, 0.0]), np.zeros(3), available, rng).tolist() == [0, 1, 0]
    # means 0.5, 0.4, 0.9 with 10, 100, 10 plays: bounds 0.5 + sqrt(2 ln 120 / 10) = 1.479, 0.4 + 0.309, 1.879
    p = UCB1().probabilities(np.array([10.0, 100.0, 10.0]), np.array([5.0, 40.0, 9.0]), available, rng)
    assert p.tolist() == [0, 0, 1] and UCB1.deterministic and EpsilonGreedy(0.0).deterministic
    assert not Thompson().deterministic and not EpsilonGreedy(0.1).deterministic


@pytest.mark.parametrize(("make", "message"), [
    (lambda: EpsilonGreedy(1.5), r"epsilon = 1.5; expected a probability in \[0, 1\]"),
    (lambda: Thompson(draws=0), "draws = 0; expected at least 1"),
])
def test_bad_policy_parameters_are_refused(make, message):
    with pytest.raises(ValueError, match=message):
        make()
