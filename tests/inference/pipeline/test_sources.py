"""Candidate sources on a refreshed version: ANN equals brute force over the trained tower's
embeddings and works without a known user; lists and similar items read the store's lists."""

from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch

from data.dataset import read_dataset
from data.schema import FeatureSpec, Schema
from inference.export import load_run
from inference.pipeline.sources import AnnSource, FavouriteCategorySource, ListSource, SimilarItemsSource, query_row
from inference.pipeline.types import Query
from inference.refresh.job import read_embeddings
from inference.store import read_lists


def test_ann_equals_brute_force_over_the_eager_towers(version, tiny_dataset, trained_runs):
    found = AnnSource(version)(Query(user_id=7), 15)
    trained = load_run(trained_runs["two_tower"])
    users = read_dataset(tiny_dataset, tables=("users",)).users
    with torch.no_grad():
        query = trained.module(trained.encoder.encode(users[users["user_id"] == 7], trained.features["query"]))
    ids, vectors = read_embeddings(version.directory)
    exact = vectors @ query.numpy()[0]
    best = np.argsort(-exact)[:15]
    np.testing.assert_array_equal(found.item_ids, ids[best])
    np.testing.assert_allclose(found.scores, exact[best], atol=1e-5)
    assert (found.sources == "ann").all()


def test_ann_embeds_anonymous_and_unknown_users_as_out_of_vocabulary(version):
    source = AnnSource(version)
    anonymous, unknown = source(Query(user_id=None), 10), source(Query(user_id=10**9), 10)
    assert len(anonymous) == 10
    np.testing.assert_array_equal(anonymous.item_ids, unknown.item_ids)  # both: every user feature missing
    assert not np.array_equal(anonymous.item_ids, source(Query(user_id=7), 10).item_ids)


def test_ann_names_features_the_request_cannot_supply(version):
    source = AnnSource(version)
    source.inputs.features = [*source.inputs.features, "hour"]  # as if the tower read a request-time feature
    with pytest.raises(ValueError, match=r"reads \['hour'\].*expected them in query.context"):
        source(Query(user_id=7), 10)


def test_query_row_holds_user_features_sequences_and_context(version):
    schema = Schema("s", (FeatureSpec("user_id", "users", "categorical"), FeatureSpec("age", "users", "numerical"),
                          FeatureSpec("item_id", "items", "categorical"),
                          FeatureSpec("recent", "interactions", "sequence", max_len=2, source="item_id")))
    row = query_row(Query(user_id=7, context={"hour": 9}, recent_items=(4, 5, 6)), version.store, schema)
    expected = {"user_id": 7, "age": version.store.user_features(7)["age"], "recent": [4, 5, 6], "hour": 9}
    assert row.to_dict("records") == [expected]
    anonymous = query_row(Query(user_id=None), version.store, schema).to_dict("records")[0]
    assert anonymous["user_id"] is None and anonymous["age"] is None and anonymous["recent"] == []
    with pytest.raises(ValueError, match=r"query.context holds \['age'\]"):
        query_row(Query(user_id=7, context={"age": 30}), version.store, schema)


def test_list_source_reads_the_named_list(version):
    popular_ids, popular_scores = version.store.get_list("popular")
    popular = ListSource(version.store, "popular")(Query(user_id=7), 5)
    np.testing.assert_array_equal(popular.item_ids, popular_ids[:5])
    np.testing.assert_array_equal(popular.scores, popular_scores[:5])
    assert popular.sources.tolist() == ["popular"] * 5

    per_user = ListSource(version.store, "user:{user_id}")
    assert per_user.name == "user"
    np.testing.assert_array_equal(per_user(Query(user_id=7), 100).item_ids, version.store.get_list("user:7")[0])
    assert len(per_user(Query(user_id=None), 100)) == 0
    assert len(ListSource(version.store, "no such list")(Query(user_id=7), 5)) == 0
    with pytest.raises(ValueError, match=r"names \['item_id'\]; expected at most \{user_id\}"):
        ListSource(version.store, "similar:{item_id}")


def test_similar_items_merge_the_recent_items_lists_by_best_score(version):
    names = read_lists(version.directory / "store").column("list").unique().to_pylist()
    older, a, b = [int(name.partition(":")[2]) for name in names if name.startswith("similar:")][:3]
    found = SimilarItemsSource(version.store, recent=3)(Query(user_id=7, recent_items=(older, a, 10**9, b)), 12)

    lists = pd.concat([pd.DataFrame(dict(zip(("item_id", "score"), version.store.get_list(f"similar:{i}"),
                                             strict=True))) for i in (a, b)])
    best = lists.groupby("item_id")["score"].max().sort_values(ascending=False, kind="stable")
    assert set(found.item_ids) <= set(best.index) and len(found) == min(12, len(best))
    np.testing.assert_array_equal(found.scores, best.to_numpy()[:len(found)])
    np.testing.assert_array_equal(found.scores, best.loc[found.item_ids].to_numpy())  # each item's best score
    assert (found.sources == "similar").all()
    assert len(SimilarItemsSource(version.store)(Query(user_id=7), 10)) == 0
    with pytest.raises(ValueError, match="recent = 0"):
        SimilarItemsSource(version.store, recent=0)


def test_favourite_category_gives_the_newest_items_of_the_recent_items_favourite(version, tiny_dataset):
    items = read_dataset(tiny_dataset, tables=("items",)).items.set_index("item_id")
    new_ids, _ = version.store.get_list("new")
    favourite, other = items.loc[new_ids, "category"].value_counts().index[:2]
    recent = (*items.index[items["category"] == favourite][:3], *items.index[items["category"] == other][:2])
    found = FavouriteCategorySource(version.store)(Query(user_id=7, recent_items=recent), 10)
    in_category = [i for i in new_ids if items.loc[i, "category"] == favourite]
    assert len(in_category) >= 2  # a list to check
    np.testing.assert_array_equal(found.item_ids, in_category[:10])
    assert (found.sources == "favourite_category").all()
    assert np.all(np.diff(items.loc[found.item_ids, "created_at"].to_numpy()) <= 0)  # newest first


def test_favourite_category_ties_go_to_the_most_recent_item(version, tiny_dataset):
    items = read_dataset(tiny_dataset, tables=("items",)).items
    first, second = items.groupby("category")["item_id"].first().iloc[:2]
    category = items.set_index("item_id")["category"]
    source = FavouriteCategorySource(version.store)
    assert source.favourite(Query(None, recent_items=(first, second))) == category[second]
    assert source.favourite(Query(None, recent_items=(second, first))) == category[first]


def test_favourite_category_falls_back_to_the_users_store_list_or_gives_nothing(version, tiny_dataset):
    items = read_dataset(tiny_dataset, tables=("items",)).items.set_index("item_id")
    source = FavouriteCategorySource(version.store)
    listed, _ = version.store.get_list("user:7")
    expected = Counter(items.loc[listed, "category"]).most_common(1)[0][0]
    assert len(listed) > 0 and source.favourite(Query(user_id=7)) == expected
    assert len(source(Query(user_id=None), 10)) == 0
    assert len(source(Query(user_id=10**9), 10)) == 0  # unknown user: no list, no recent items


def test_favourite_category_names_a_missing_column(version):
    with pytest.raises(ValueError, match="item column 'colour' is not in store version"):
        FavouriteCategorySource(version.store, column="colour")
