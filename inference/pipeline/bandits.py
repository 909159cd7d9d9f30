"""Bandits over candidate sources: which sources earn rewards (clicks) when their items are shown.

`SourceBandit` keeps, per source, the slots it served and the rewards they earned, with a
Beta(1, 1) prior: its estimate of a source's reward per slot is (rewards + 1) / (served + 2).
One bandit outlives artefact versions: the service counts each answered slot (`served`) and
each feedback event (`rewarded`), and `ExploreOrderer` (orderers.py) reads the estimates to
decide where exploration goes. Rewards are in [0, 1] (a click is 1).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable

import numpy as np


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
        with self._lock:
            served = np.array([self._served[s] for s in sources.tolist()], np.float64)
            rewards = np.array([self._rewards[s] for s in sources.tolist()], np.float64)
        return (rewards + 1.0) / (served + 2.0)

    def snapshot(self) -> dict[str, dict[str, float]]:
        """{source: {"served", "rewards", "estimate"}} for every source seen so far."""
        with self._lock:
            names = sorted(set(self._served) | set(self._rewards))
            counts = {s: (self._served[s], self._rewards[s]) for s in names}
        return {s: {"served": n, "rewards": r, "estimate": (r + 1.0) / (n + 2.0)} for s, (n, r) in counts.items()}
