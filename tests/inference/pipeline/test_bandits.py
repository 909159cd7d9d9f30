"""SourceBandit: posterior means from served slots and rewards, shared safely between threads."""

import threading

import numpy as np
import pytest

from inference.pipeline.bandits import SharedSourceBandit, SourceBandit


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
        assert one.snapshot()["ann"]["served"] == 8  # its own counts count before any sync
        assert one.sync() and two.sync() and one.sync()
        for bandit in (one, two):
            snapshot = bandit.snapshot()
            assert (snapshot["ann"]["served"], snapshot["ann"]["rewards"]) == (10, 1)
            assert (snapshot["popular"]["served"], snapshot["popular"]["rewards"]) == (4, 1)
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
