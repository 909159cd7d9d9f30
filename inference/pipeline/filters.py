"""Filters: ``(query, candidates) -> FilterResult``, what they kept and what they removed, with reasons.

    SeenItemsFilter     removes the query's recent items
    ItemFeatureFilter   keeps items whose store feature ``column`` equals a value (e.g. available);
                        the items it keeps carry the store's item columns, which hydration then
                        does not read again

A filter keeps the candidates' order; the pipeline config lists filters cheapest first. Each
filter's config spec (its ``kind:`` in the pipeline's ``filters:``) is defined beside it, and
`FILTER_SPECS` lists them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

import numpy as np

from data.columns import equal_to
from inference.pipeline.spec import StageSpec
from inference.pipeline.types import Candidates, Query
from inference.store import Store

if TYPE_CHECKING:
    from inference.version import ServingVersion


@dataclass(frozen=True)
class FilterResult:
    """``kept`` candidates in input order; ``removed`` (R,) int64 item ids, ``reasons`` (R,) str, one each."""

    kept: Candidates
    removed: np.ndarray
    reasons: np.ndarray

    @classmethod
    def split(cls, candidates: Candidates, keep: np.ndarray, reasons: np.ndarray | str) -> FilterResult:
        """Keeps the candidates where ``keep`` (N,) is True and removes the others; ``reasons`` is
        one str for every removal, or (N,) str, one per candidate."""
        drop = ~keep
        reasons = np.broadcast_to(np.asarray(reasons), keep.shape)[drop]
        return cls(candidates.take(keep), candidates.item_ids[drop], reasons)


class Filter(Protocol):
    """Removes candidates a request must not get, saying why for each."""

    name: str

    def __call__(self, query: Query, candidates: Candidates) -> FilterResult:
        ...


class SeenItemsFilter:
    """Removes the items of ``query.recent_items``, reason "seen"."""

    name = "seen"

    def __call__(self, query: Query, candidates: Candidates) -> FilterResult:
        seen = np.isin(candidates.item_ids, np.asarray(query.recent_items, np.int64))
        return FilterResult.split(candidates, ~seen, "seen")


class ItemFeatureFilter:
    """Keeps items whose store feature ``column`` equals ``equals``; removes the others (a missing
    value counts as different) and items the store does not know, reason "unknown item". The
    kept candidates carry every item column of the store (`Candidates.with_columns`)."""

    def __init__(self, store: Store, column: str, equals: bool | int | float | str) -> None:
        columns = store.item_columns()
        if column not in columns:
            raise ValueError(f"item feature {column!r} is not in store version {store.version!r}; it has {columns}")
        self.name, self.store, self.column, self.equals = column, store, column, equals

    def __call__(self, query: Query, candidates: Candidates) -> FilterResult:
        rows = self.store.item_features(candidates.item_ids)
        equal = equal_to(rows.columns[self.column], self.equals)
        reasons = np.where(rows.found, f"{self.column} != {self.equals!r}", "unknown item")
        return FilterResult.split(candidates.with_columns(rows.columns), rows.found & equal, reasons)


class SeenSpec(StageSpec):
    kind: Literal["seen"]

    def build(self, version: ServingVersion) -> Filter:
        return SeenItemsFilter()


class ItemFeatureSpec(StageSpec):
    kind: Literal["item_feature"]
    column: str
    equals: bool | int | float | str

    def build(self, version: ServingVersion) -> Filter:
        return ItemFeatureFilter(version.store, self.column, self.equals)


FILTER_SPECS = (SeenSpec, ItemFeatureSpec)
