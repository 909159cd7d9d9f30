"""Candidate sources: ``(query, k) -> Candidates``, at most k items, best first, each source's own scores.

    AnnSource           the index's nearest items to the query tower's embedding of the request
    ListSource          a candidate list of the store: "popular", "editorial", "user:{user_id}", ...
    SimilarItemsSource  the "similar:<item>" lists of the query's recent items, merged by best score
    FavouriteCategorySource  the newest items of the category the query's recent items favour

Each source's config spec (its ``kind:`` in the pipeline's ``sources:``) is defined beside it,
and `SOURCE_SPECS` lists them: a new source is its class, its spec, and an entry there.

`request_features` gathers the request's own features (the user's, the recent items', the
context's); the query tower reads them here, and the executor joins them to item features.
"""

from __future__ import annotations

import string
from collections import Counter
from typing import Literal, Protocol

import numpy as np
import pandas as pd
import torch
from pydantic import Field

from data.columns import FeatureColumns, equal_to
from data.schema import Schema
from data.tables import KEYS
from inference.pipeline.scorers import ModelInputs
from inference.pipeline.spec import StageSpec
from inference.pipeline.types import Candidates, Query
from inference.store import Store
from inference.version import ServingVersion

QUERY_TOWER = "query_tower"  # the query tower's name among a version's exported models


class CandidateSource(Protocol):
    """Proposes candidates for a request."""

    name: str

    def __call__(self, query: Query, k: int) -> Candidates:
        """At most ``k`` candidates, best first; ``sources`` is this source's name, ``scores`` its own."""
        ...


def request_features(query: Query, store: Store, schema: Schema) -> dict[str, object]:
    """The request's own features by name: ``user_id``, the user's features (missing for an
    anonymous or unknown user, which the encoders read as out-of-vocabulary ids and missing
    numbers), each sequence feature as the query's recent items, and ``query.context``."""
    user = {} if query.user_id is None else store.user_features(query.user_id) or {}
    row = {KEYS["users"]: query.user_id}
    row |= {f.name: user.get(f.name) for f in schema.features if f.table == "users" and f.name != KEYS["users"]}
    row |= {f.name: list(query.recent_items) for f in schema.features if f.kind == "sequence"}
    clash = sorted(set(row) & set(query.context))
    if clash:
        raise ValueError(f"query.context holds {clash}, which are user or sequence features; "
                         "expected request-time features only")
    return row | query.context


def query_row(query: Query, store: Store, schema: Schema) -> pd.DataFrame:
    """`request_features` as a one-row frame."""
    return FeatureColumns.from_values([request_features(query, store, schema)]).to_frame()


class AnnSource:
    """The items nearest to the request's query-tower embedding in the version's index.

    An anonymous or unknown user is embedded from the features the request still has (recent
    items, context); ValueError when the tower reads a feature the request cannot supply.
    """

    name = "ann"

    def __init__(self, version: ServingVersion) -> None:
        self.inputs = ModelInputs.load(version.directory / "models", QUERY_TOWER)
        if self.inputs.output != "embedding":
            raise ValueError(f"model {QUERY_TOWER!r} outputs {self.inputs.output!r}; expected 'embedding'")
        self.tower, self.index, self.store = version.query_tower, version.index, version.store

    def __call__(self, query: Query, k: int) -> Candidates:
        row = FeatureColumns.from_values([request_features(query, self.store, self.inputs.encoder.schema)])
        missing = [name for name in self.inputs.features if name not in row]
        if missing:
            raise ValueError(f"the query tower reads {missing}, which are neither user nor sequence features; "
                             "expected them in query.context")
        with torch.inference_mode():
            vector = self.tower(*self.inputs(row)).numpy()  # (1, D)
        ids, scores = self.index.search(vector, k)  # (1, k') each
        return Candidates(ids[0], np.full(len(ids[0]), self.name), scores[0])


class ListSource:
    """The first k items of a store list; ``template`` may name ``{user_id}`` ("user:{user_id}"),
    and is then empty for an anonymous user. Named after the list's kind (before any ':')."""

    def __init__(self, store: Store, template: str) -> None:
        fields = {field for _, field, _, _ in string.Formatter().parse(template) if field is not None}
        if fields - {"user_id"}:
            raise ValueError(f"list template {template!r} names {sorted(fields)}; expected at most {{user_id}}")
        self.name = template.partition(":")[0]
        self.store, self.template, self.per_user = store, template, bool(fields)

    def __call__(self, query: Query, k: int) -> Candidates:
        if self.per_user and query.user_id is None:
            ids, scores = np.zeros(0, np.int64), np.zeros(0, np.float32)
        else:
            ids, scores = self.store.get_list(self.template.format(user_id=query.user_id))
        return Candidates(ids[:k], np.full(min(k, len(ids)), self.name), scores[:k])


class SimilarItemsSource:
    """Items similar to the query's ``recent`` most recent items: their "similar:<item>" lists,
    merged, an item appearing in several lists keeping its best score."""

    name = "similar"

    def __init__(self, store: Store, recent: int = 5) -> None:
        if recent < 1:
            raise ValueError(f"recent = {recent}; expected at least 1 recent item")
        self.store, self.recent = store, recent

    def __call__(self, query: Query, k: int) -> Candidates:
        lists = [self.store.get_list(f"similar:{item}") for item in query.recent_items[-self.recent:]]
        ids = np.concatenate([np.zeros(0, np.int64), *(ids for ids, _ in lists)])
        scores = np.concatenate([np.zeros(0, np.float32), *(scores for _, scores in lists)])
        best_first = np.argsort(-scores, kind="stable")
        _, first = np.unique(ids[best_first], return_index=True)  # each item's best row
        keep = best_first[np.sort(first)][:k]
        return Candidates(ids[keep], np.full(len(keep), self.name), scores[keep])


class FavouriteCategorySource:
    """The newest items of the request's favourite category: the most frequent value of item
    ``column`` among the query's recent items (the most recent wins a tie), else, for a user
    without recent items, among the items of the user's store list "user:{user_id}"; then the
    items of store list ``list_name`` ("new": newest first) that have that value, in its order.
    Empty when neither names a category."""

    name = "favourite_category"

    def __init__(self, store: Store, column: str = "category", list_name: str = "new") -> None:
        columns = store.item_columns()
        if column not in columns:
            raise ValueError(f"item column {column!r} is not in store version {store.version!r}; it has {columns}")
        self.store, self.column, self.list_name = store, column, list_name

    def favourite(self, query: Query) -> object | None:
        """The favourite value of ``column`` for ``query``, None when its items name none."""
        liked = np.asarray(query.recent_items[::-1], np.int64)  # most recent first
        if len(liked) == 0 and query.user_id is not None:
            liked = self.store.get_list(f"user:{query.user_id}")[0]
        values = self.store.item_features(liked).columns[self.column]
        values = values[~pd.isna(values)]
        return Counter(values).most_common(1)[0][0] if len(values) else None

    def __call__(self, query: Query, k: int) -> Candidates:
        favourite = self.favourite(query)
        if favourite is None:
            return Candidates(np.zeros(0, np.int64), np.zeros(0, str), np.zeros(0, np.float32))
        ids, scores = self.store.get_list(self.list_name)
        keep = np.flatnonzero(equal_to(self.store.item_features(ids).columns[self.column], favourite))[:k]
        return Candidates(ids[keep], np.full(len(keep), self.name), scores[keep])


class SourceSpec(StageSpec):
    """What every source's spec has: how the pipeline runs it."""

    quota: int = Field(100, ge=1)  # at most this many candidates from the source
    timeout_s: float = Field(0.05, gt=0)
    fail_open: bool = True  # a failure or timeout drops the source's candidates instead of failing the request


class AnnSpec(SourceSpec):
    kind: Literal["ann"]

    def build(self, version: ServingVersion) -> CandidateSource:
        return AnnSource(version)


class ListSpec(SourceSpec):
    kind: Literal["list"]
    list_name: str  # a store list; may name {user_id}

    def build(self, version: ServingVersion) -> CandidateSource:
        return ListSource(version.store, self.list_name)


class SimilarSpec(SourceSpec):
    kind: Literal["similar"]
    recent: int = Field(5, ge=1)  # of the query's most recent items

    def build(self, version: ServingVersion) -> CandidateSource:
        return SimilarItemsSource(version.store, self.recent)


class FavouriteCategorySpec(SourceSpec):
    kind: Literal["favourite_category"]
    column: str = "category"  # the item column whose favourite value the items share
    list_name: str = "new"  # the store list they come from, in its order

    def build(self, version: ServingVersion) -> CandidateSource:
        return FavouriteCategorySource(version.store, self.column, self.list_name)


SOURCE_SPECS = (AnnSpec, ListSpec, SimilarSpec, FavouriteCategorySpec)
