"""Bandits over candidate sources: which sources earn rewards (clicks) when their items are shown.

Policies choose among arms (sources) from their counts, each as the probability of every arm,
so that the orderer drawing from them logs the propensity of what it drew:

    EpsilonGreedy  the best posterior mean with probability 1 - epsilon, else a uniform arm
    UCB1           the best upper confidence bound, mean + sqrt(2 ln N / n) (Auer et al. 2002):
                   deterministic, so its propensities are degenerate
    Thompson       the arm whose Beta(1 + rewards, 1 + failures) draw is highest; its probabilities
                   are estimated from ``draws`` posterior draws and the arm is drawn from them, so
                   the logged propensity is exact given the estimate (draws=1 is plain Thompson);
                   ``explore`` mixes in uniform draws, a floor under every arm's propensity

`SourceBandit` keeps, per source, the slots it served and the rewards they earned, with a
Beta(1, 1) prior: its estimate of a source's reward per slot is (rewards + 1) / (served + 2).
One bandit outlives artefact versions: the service counts each answered slot (`served`) and
each feedback event (`rewarded`), and `ExploreOrderer` (orderers.py) reads the estimates to
decide where exploration goes. Rewards are in [0, 1] (a click is 1).

A `StrategyBanditOrderer` (orderers.py) keeps its strategies' counts in the same bandit, each
under its arm's name `strategy_arm` (``strategy:<name>``), apart from the sources'.

`SharedSourceBandit` shares the counts of every server behind a load balancer through a Redis
hash, so the handlers stay stateless and a restarted one resumes where they all are.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import redis

from inference.store import connect

log = logging.getLogger(__name__)

SHARED_KEY = "recstack:bandit"  # a hash: served:<source> and rewards:<source>, over every version and server


def strategy_arm(strategy: str) -> str:
    """The name a `SourceBandit` counts the slots and rewards of ``strategy`` under."""
    return f"strategy:{strategy}"


class SourceBandit:
    """Thread-safe per-source counts of served slots and rewards, and their posterior means."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._served: Counter[str] = Counter()
        self._rewards: Counter[str] = Counter()

    def served(self, sources: Iterable[str]) -> None:
        """Counts one served slot for each source named (one name per slot)."""
        with self._lock:
            self._served.update(sources)

    def rewarded(self, source: str, reward: float) -> None:
        """Adds ``reward`` in [0, 1] to what ``source``'s slots earned."""
        if not 0.0 <= reward <= 1.0:
            raise ValueError(f"reward = {reward!r} for source {source!r}; expected a number in [0, 1]")
        with self._lock:
            self._rewards[source] += reward

    def estimates(self, sources: np.ndarray) -> np.ndarray:
        """(S,) float64 posterior mean reward per slot of each of the (S,) ``sources``."""
        served, rewards = self.counts(sources)
        return (rewards + 1.0) / (served + 2.0)

    def counts(self, sources: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(S,) float64 served slots and (S,) rewards of each of the (S,) ``sources``."""
        served, rewards = self._counts()
        return (np.array([served[s] for s in sources.tolist()], np.float64),
                np.array([rewards[s] for s in sources.tolist()], np.float64))

    def snapshot(self) -> dict[str, dict[str, float]]:
        """{source: {"served", "rewards", "estimate"}} for every source seen so far."""
        served, rewards = self._counts()
        return {s: {"served": served[s], "rewards": rewards[s], "estimate": (rewards[s] + 1.0) / (served[s] + 2.0)}
                for s in sorted(set(served) | set(rewards))}

    def close(self) -> None:
        """Nothing to release here; `SharedSourceBandit` sends what it holds."""

    def _counts(self) -> tuple[Counter[str], Counter[str]]:
        with self._lock:
            return Counter(self._served), Counter(self._rewards)


class SharedSourceBandit(SourceBandit):
    """A `SourceBandit` over the counts of every server, kept in the Redis hash `SHARED_KEY`.

    Each server counts its own slots and rewards here and, every ``sync_s`` seconds on a
    background thread, adds them to the hash and reads back everyone's totals; its estimates are
    the last totals read plus what it has not sent yet. A Redis failure is logged and the counts
    wait for the next sync: the bandit never delays or fails a request. Call `close` when done
    (it sends what is left).
    """

    def __init__(self, host: str, port: int, sync_s: float = 1.0, timeout_s: float = 0.5) -> None:
        super().__init__()
        self._client = connect(host, port, timeout_s)
        self._where = f"{host}:{port}"
        self._totals: tuple[Counter[str], Counter[str]] = (Counter(), Counter())
        self._stop = threading.Event()
        self.sync()
        self._thread = threading.Thread(target=self._sync_every, args=(sync_s,), daemon=True, name="bandit-sync")
        self._thread.start()

    def sync(self) -> bool:
        """Sends the counts not sent yet and reads everyone's totals; False (logged) if Redis failed."""
        with self._lock:  # take what is pending; new counts go on accumulating meanwhile
            served, rewards, self._served, self._rewards = self._served, self._rewards, Counter(), Counter()
        try:
            pipe = self._client.pipeline(transaction=False)
            for kind, counts in (("served", served), ("rewards", rewards)):
                for source, n in counts.items():
                    pipe.hincrbyfloat(SHARED_KEY, f"{kind}:{source}", n)
            pipe.hgetall(SHARED_KEY)
            stored = pipe.execute()[-1]
        except redis.RedisError as error:
            log.warning("bandit counts not shared (redis at %s: %s: %s); they wait for the next sync",
                        self._where, type(error).__name__, error)
            with self._lock:
                self._served.update(served)
                self._rewards.update(rewards)
            return False
        totals: tuple[Counter[str], Counter[str]] = (Counter(), Counter())
        for field, value in stored.items():
            kind, _, source = field.decode().partition(":")
            totals[0 if kind == "served" else 1][source] = float(value)
        with self._lock:
            self._totals = totals
        return True

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sync()
        self._client.close()

    def _counts(self) -> tuple[Counter[str], Counter[str]]:
        with self._lock:
            return self._totals[0] + self._served, self._totals[1] + self._rewards

    def _sync_every(self, sync_s: float) -> None:
        while not self._stop.wait(sync_s):
            self.sync()


class BanditPolicy(Protocol):
    """Chooses among K arms from their counts."""

    deterministic: bool  # its probabilities are 0 or 1: no propensity to weight by

    def probabilities(self, served: np.ndarray, rewards: np.ndarray, available: np.ndarray,
                      rng: np.random.Generator) -> np.ndarray:
        """(K,) probability of choosing each arm, from (K,) served and rewards; 0 where not ``available``."""
        ...


@dataclass(frozen=True)
class EpsilonGreedy:
    """The arm of best posterior mean (rewards + 1) / (served + 2), first of ties, with probability
    1 - epsilon; a uniform available arm otherwise. epsilon 0 is greedy, and deterministic."""

    epsilon: float

    def __post_init__(self) -> None:
        if not 0.0 <= self.epsilon <= 1.0:
            raise ValueError(f"epsilon = {self.epsilon!r}; expected a probability in [0, 1]")

    @property
    def deterministic(self) -> bool:
        return self.epsilon == 0.0

    def probabilities(self, served: np.ndarray, rewards: np.ndarray, available: np.ndarray,
                      rng: np.random.Generator) -> np.ndarray:
        greedy = np.argmax(np.where(available, (rewards + 1.0) / (served + 2.0), -np.inf))
        p = np.where(available, self.epsilon / available.sum(), 0.0)
        p[greedy] += 1.0 - self.epsilon
        return p


@dataclass(frozen=True)
class UCB1:
    """Each available arm once (first unplayed first), then the best mean + sqrt(2 ln N / n), N the
    available arms' plays; deterministic."""

    deterministic = True

    def probabilities(self, served: np.ndarray, rewards: np.ndarray, available: np.ndarray,
                      rng: np.random.Generator) -> np.ndarray:
        unplayed = available & (served == 0)
        if unplayed.any():
            arm = np.argmax(unplayed)
        else:
            total = served[available].sum()
            with np.errstate(divide="ignore", invalid="ignore"):
                bound = np.minimum(rewards / served, 1.0) + np.sqrt(2.0 * np.log(total) / served)
            arm = np.argmax(np.where(available, bound, -np.inf))
        return np.eye(len(served))[arm]


@dataclass(frozen=True)
class Thompson:
    """The share of ``draws`` posterior draws (Beta(1 + rewards, 1 + failures) per arm) each arm
    wins; with probability ``explore``, a uniform available arm instead.

    Without ``explore`` an arm that won none of the draws has propensity 0: it is never shown, so
    an off-policy estimate (`evaluation.replay`) has no logged slot of it to weight, and a slot
    drawn from 1 of 200 draws weighs 200. With it, every available arm's propensity is at least
    explore / arms, which bounds every weight.
    """

    draws: int = 200  # the estimates' standard error is at most 0.5 / sqrt(draws)
    explore: float = 0.0
    deterministic = False

    def __post_init__(self) -> None:
        if self.draws < 1:
            raise ValueError(f"draws = {self.draws}; expected at least 1 posterior draw")
        if not 0.0 <= self.explore <= 1.0:
            raise ValueError(f"explore = {self.explore!r}; expected a probability in [0, 1]")

    def probabilities(self, served: np.ndarray, rewards: np.ndarray, available: np.ndarray,
                      rng: np.random.Generator) -> np.ndarray:
        arms = np.flatnonzero(available)
        wins = rng.beta(1.0 + rewards[arms], 1.0 + np.maximum(served[arms] - rewards[arms], 0.0),
                        size=(self.draws, len(arms)))  # (draws, available arms)
        p = np.zeros(len(served))
        p[arms] = ((1.0 - self.explore) * np.bincount(np.argmax(wins, axis=1), minlength=len(arms)) / self.draws
                   + self.explore / len(arms))
        return p
