"""Orderers: ``(query, scored) -> (ranked candidates, propensities)``; they may drop or reorder
candidates, never add any. A propensity (M,) float64 is the probability that the orderer puts
that item in that slot: 1.0 for a deterministic orderer.

    TopKOrderer          the k best by score (the final orderer)
    MaxPerSourceOrderer  by score, at most ``cap`` items from each source (diversity of sources)
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import pandas as pd

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
