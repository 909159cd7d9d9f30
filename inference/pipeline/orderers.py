"""Orderers: ``(query, scored) -> (ranked candidates, propensities)``; they may drop or reorder
candidates, never add any. A propensity (M,) float64 is the probability that the orderer puts
that item in that slot: 1.0 for a deterministic orderer.

    TopKOrderer          the k best by score (a final orderer)
    ExploreOrderer       the k best by score, each slot explored with probability epsilon towards
                         sources a `SourceBandit` finds rewarding (a final orderer)
    MaxPerSourceOrderer  by score, at most ``cap`` items from each source (diversity of sources)
"""

from __future__ import annotations

import threading
from typing import Protocol

import numpy as np
import pandas as pd

from inference.pipeline.bandits import SourceBandit
from inference.pipeline.types import Candidates, Query


class Orderer(Protocol):
    """Ranks scored candidates and records each slot's propensity."""

    name: str

    def __call__(self, query: Query, scored: Candidates) -> tuple[Candidates, np.ndarray]:
        """(M,) ranked candidates taken from ``scored``, and their (M,) propensities."""
        ...


def by_score(scored: Candidates) -> np.ndarray:
    """(N,) positions of ``scored`` by descending score; ties keep their order."""
    return np.argsort(-scored.scores, kind="stable")


class TopKOrderer:
    """The ``query.k`` best candidates by score."""

    name = "top_k"

    def __call__(self, query: Query, scored: Candidates) -> tuple[Candidates, np.ndarray]:
        best = by_score(scored)[:query.k]
        return scored.take(best), np.ones(len(best))


class ExploreOrderer:
    """The ``query.k`` best candidates by score, except that each slot, with probability
    ``epsilon``, explores: it takes the best remaining item of a source drawn in proportion to
    ``bandit``'s estimates (among the sources with items left).

    A slot's propensity is the probability of its item given the slots above it,
    (1 - epsilon) [it is the best remaining item] + epsilon q_s [it is the best remaining item of
    its source s], with q_s source s's share of the estimates; the product over the slots is the
    probability of the whole list. ``seed`` fixes the draws (tests); by default they differ per run.
    """

    name = "explore"

    def __init__(self, bandit: SourceBandit, epsilon: float, seed: int | None = None) -> None:
        if not 0.0 <= epsilon < 1.0:
            raise ValueError(f"epsilon = {epsilon!r}; expected a probability in [0, 1)")
        self.bandit, self.epsilon = bandit, epsilon
        self._rng = np.random.default_rng(seed)
        self._lock = threading.Lock()  # a Generator is not thread-safe; requests run on many threads

    def __call__(self, query: Query, scored: Candidates) -> tuple[Candidates, np.ndarray]:
        order = by_score(scored)
        names, source_of = np.unique(scored.sources[order], return_inverse=True)
        ranks = [np.flatnonzero(source_of == s) for s in range(len(names))]  # each source's items, best first
        weights = self.bandit.estimates(names)  # (S,)
        slots = min(query.k, len(order))
        with self._lock:
            explores, draws = self._rng.random(slots) < self.epsilon, self._rng.random(slots)
        taken = np.zeros(len(names), np.intp)  # items each source has placed so far
        chosen, propensities = np.zeros(slots, np.intp), np.zeros(slots)
        for slot in range(slots):
            alive = taken < [len(r) for r in ranks]
            heads = np.array([r[t] if a else len(order) for r, t, a in zip(ranks, taken, alive, strict=True)])
            greedy = int(np.argmin(heads))  # the source of the best remaining item
            share = np.where(alive, weights, 0.0) / weights[alive].sum()  # (S,)
            source = greedy
            if explores[slot]:
                drawn = int(np.searchsorted(np.cumsum(share), draws[slot], side="right"))
                source = drawn if drawn < len(names) and alive[drawn] else int(np.flatnonzero(alive)[-1])
            chosen[slot] = heads[source]
            propensities[slot] = (1.0 - self.epsilon) * (source == greedy) + self.epsilon * share[source]
            taken[source] += 1
        return scored.take(order[chosen]), propensities


class MaxPerSourceOrderer:
    """All candidates by score, except that only the ``cap`` best of each source stay."""

    name = "max_per_source"

    def __init__(self, cap: int) -> None:
        if cap < 1:
            raise ValueError(f"cap = {cap}; expected at least 1 item per source")
        self.cap = cap

    def __call__(self, query: Query, scored: Candidates) -> tuple[Candidates, np.ndarray]:
        order = by_score(scored)
        sources = pd.Series(scored.sources[order])
        rank_in_source = sources.groupby(sources).cumcount().to_numpy()  # 0 = the source's best
        kept = order[rank_in_source < self.cap]
        return scored.take(kept), np.ones(len(kept))
