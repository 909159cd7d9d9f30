"""Filters on a hand-made store: what each keeps, in order, and the reason for each removal."""

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from data.schema import FeatureSpec, Schema
from inference.pipeline.executor import Hydrator
from inference.pipeline.filters import FilterResult, ItemFeatureFilter, SeenItemsFilter
from inference.pipeline.types import Candidates, Query
from inference.store import EmbeddedStore, write_snapshot


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    directory = tmp_path_factory.mktemp("store")
    users = pd.DataFrame({"user_id": [1], "age": [30]})
    items = pd.DataFrame({"item_id": [10, 11, 12, 13], "available": [True, False, True, None],
                          "category": ["a", "b", "a", "b"]})
    lists = pd.DataFrame({"list": ["popular"], "item_id": [10], "score": [1.0]})
    write_snapshot(directory, users, items, lists)
    return EmbeddedStore.open(directory, "v1")


def candidates(ids):
    n = len(ids)
    return Candidates(np.array(ids, np.int64), np.full(n, "test"), np.arange(n, 0, -1).astype(np.float32))


def test_seen_items_filter_removes_the_recent_items():
    result = SeenItemsFilter()(Query(user_id=1, recent_items=(12, 99, 10)), candidates([10, 11, 12, 13]))
    assert result.kept.item_ids.tolist() == [11, 13] and result.kept.scores.tolist() == [3.0, 1.0]
    assert result.removed.tolist() == [10, 12] and result.reasons.tolist() == ["seen", "seen"]
    nothing_seen = SeenItemsFilter()(Query(user_id=1), candidates([10, 11]))
    assert nothing_seen.kept.item_ids.tolist() == [10, 11] and len(nothing_seen.removed) == 0


def test_item_feature_filter_keeps_equal_items_and_says_why_it_removed_the_others(store):
    result = ItemFeatureFilter(store, "available", True)(Query(user_id=1), candidates([13, 12, 99, 11, 10]))
    assert result.kept.item_ids.tolist() == [12, 10]
    assert result.kept.sources.tolist() == ["test", "test"] and result.kept.scores.tolist() == [4.0, 1.0]
    reasons = dict(zip(result.removed.tolist(), result.reasons.tolist(), strict=True))
    assert reasons == {13: "available != True", 99: "unknown item", 11: "available != True"}  # missing: not equal
    by_category = ItemFeatureFilter(store, "category", "b")(Query(user_id=1), candidates([10, 11, 13]))
    assert by_category.kept.item_ids.tolist() == [11, 13] and by_category.reasons.tolist() == ["category != 'b'"]
    assert len(ItemFeatureFilter(store, "available", True)(Query(user_id=1), candidates([])).kept) == 0


def test_item_feature_filter_refuses_an_unknown_column(store):
    with pytest.raises(ValueError, match=r"item feature 'in_stock' is not in store version 'v1'; it has \["):
        ItemFeatureFilter(store, "in_stock", True)


def test_filter_result_split_keeps_one_reason_per_removed_item():
    result = FilterResult.split(candidates([1, 2, 3]), np.array([True, False, False]), np.array(["x", "y", "z"]))
    assert result.kept.item_ids.tolist() == [1]
    assert result.removed.tolist() == [2, 3] and result.reasons.tolist() == ["y", "z"]


def test_item_feature_filter_hands_the_store_rows_it_read_to_hydration(store):
    schema = Schema("s", (FeatureSpec("user_id", "users", "categorical"), FeatureSpec("age", "users", "numerical"),
                          FeatureSpec("item_id", "items", "categorical")))
    kept = ItemFeatureFilter(store, "available", True)(Query(user_id=1), candidates([12, 99, 10])).kept
    assert list(kept.columns) == ["available", "category"] and kept.columns["category"].tolist() == ["a", "a"]
    reads = []
    counting = SimpleNamespace(item_columns=store.item_columns, user_features=store.user_features,
                               item_features=lambda ids: reads.append(ids) or store.item_features(ids))
    hydrated = Hydrator(counting, schema)(Query(user_id=1), kept)
    fresh = Hydrator(counting, schema)(Query(user_id=1), candidates([12, 10]))
    assert len(reads) == 1  # only the candidates that carry no item columns are read
    pd.testing.assert_frame_equal(hydrated.features, fresh.features)
    assert list(hydrated.columns) == ["user_id", "age", "item_id", "available", "category"]
