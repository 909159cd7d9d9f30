"""Orderers: ``(query, scored) -> (ranked candidates, propensities)``; they may drop or reorder
candidates, never add any. A propensity (M,) float64 is the probability that the orderer puts
that item in that slot: 1.0 for a deterministic orderer.

    TopKOrderer          the k best by score (a final orderer)
    ExploreOrderer       the k best by score, each slot explored with probability epsilon: one of the
                         best items of a source a `SourceBandit` finds rewarding (a final orderer)
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
    ``epsilon``, explores: it takes a random one of the ``pool`` best remaining items (default:
    all of them) of a source drawn in proportion to ``bandit``'s estimates (among the sources with
    items left), so those candidates can be shown and an off-policy estimate of another ranking
    has support. A smaller pool explores less far down the ranking, with larger propensities.

    A slot's propensity is the probability of its item given the slots above it,
    (1 - epsilon) [it is the best remaining item] + epsilon q_s / min(n_s, pool), with q_s its
    source's share of the estimates and n_s the source's remaining items; the product over the
    slots is the probability of the whole list. ``seed`` fixes the draws (tests); by default they
    differ per run.
    """

    name = "explore"

    def __init__(self, bandit: SourceBandit, epsilon: float, pool: int | None = None, seed: int | None = None) -> None:
        if not 0.0 <= epsilon < 1.0:
            raise ValueError(f"epsilon = {epsilon!r}; expected a probability in [0, 1)")
        if pool is not None and pool < 1:
            raise ValueError(f"pool = {pool}; expected at least 1 item to explore, or None for all")
        self.bandit, self.epsilon, self.pool = bandit, epsilon, pool
        self._rng = np.random.default_rng(seed)
        self._lock = threading.Lock()  # a Generator is not thread-safe; requests run on many threads

    def __call__(self, query: Query, scored: Candidates) -> tuple[Candidates, np.ndarray]:
        order = by_score(scored)
        names, source_of = np.unique(scored.sources[order], return_inverse=True)
        remaining = [np.flatnonzero(source_of == s).tolist() for s in range(len(names))]  # ranks, best first
        weights = self.bandit.estimates(names)  # (S,)
        slots = min(query.k, len(order))
        with self._lock:
            explores, draws = self._rng.random(slots) < self.epsilon, self._rng.random((slots, 2))
        chosen, propensities = np.zeros(slots, np.intp), np.zeros(slots)
        for slot in range(slots):
            left = np.array([len(r) for r in remaining])
            reach = left if self.pool is None else np.minimum(left, self.pool)  # (S,) items exploration draws from
            share = np.where(left > 0, weights, 0.0) / weights[left > 0].sum()  # (S,)
            greedy = min(np.flatnonzero(left), key=lambda s: remaining[s][0])  # the source of the best item
            source, position = greedy, 0
            if explores[slot]:
                source = min(int(np.searchsorted(np.cumsum(share), draws[slot, 0], side="right")), len(names) - 1)
                source = source if left[source] else int(np.flatnonzero(left)[-1])  # cumsum rounding at the end
                position = int(draws[slot, 1] * reach[source])
            chosen[slot] = remaining[source].pop(position)
            best = source == greedy and position == 0
            propensities[slot] = (1.0 - self.epsilon) * best + self.epsilon * share[source] / reach[source]
        return scored.take(order[chosen]), np.minimum(propensities, 1.0)  # (1 - e) + e q / n may round above 1


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
