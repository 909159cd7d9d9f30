"""SourceBandit: posterior means from served slots and rewards, shared safely between threads."""

import threading

import numpy as np
import pytest

from inference.pipeline.bandits import SourceBandit


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
