import numpy as np
import pandas as pd
import pytest
import torch

from data.encoders import FeatureEncoder, HashEncoder, join_features, recent_items
from data.schema import FeatureSpec, Schema, default_embedding_dim

SCHEMA = Schema(
    name="tiny",
    features=(
        FeatureSpec("item_id", "interactions", "categorical"),
        FeatureSpec("genres", "items", "multi_hot"),
        FeatureSpec("history", "interactions", "sequence", source="item_id", max_len=2),
        FeatureSpec("price", "items", "numerical", buckets=2),
    ),
)
TRAIN = pd.DataFrame({"user_id": [1, 1, 2, 3], "item_id": [10, 20, 20, 30], "label": [1.0] * 4})
USERS = pd.DataFrame({"user_id": [1, 2, 3]})
ITEMS = pd.DataFrame(
    {
        "item_id": [10, 20, 30, 40],
        "genres": [["a", "b"], ["b"], [], ["z", "a"]],
        "price": [1.0, 3.0, np.nan, 100.0],  # train items: mean 2, std 1, median 2
    }
)


def tiny_frame() -> pd.DataFrame:
    rows = pd.DataFrame({"user_id": [1, 2, 3], "item_id": [20, 40, 30], "label": [1.0, 0.0, 1.0]})
    frame = join_features(rows, USERS, ITEMS)
    frame["history"] = [[10], [10, 99, 30], []]
    return frame


def assert_same_batch(a, b) -> None:
    assert a.sparse.keys() == b.sparse.keys()
    assert torch.equal(a.sparse.values(), b.sparse.values())
    assert torch.equal(a.sparse.lengths(), b.sparse.lengths())
    assert torch.equal(a.dense, b.dense)
    assert (a.labels is None and b.labels is None) or torch.equal(a.labels, b.labels)


def test_hand_built_batch():
    batch = FeatureEncoder.fit(SCHEMA, TRAIN, USERS, ITEMS).encode(tiny_frame())
    # item_id: 20 (twice in train) -> 1, 10 -> 2, 30 -> 3, unseen 40 -> 0
    # genres: b (2 train items) -> 1, a -> 2, z (item 40 is not in train) -> 0
    # history: the last 2 ids through item_id's vocabulary; 99 -> 0
    # price buckets: below the median 2 -> 1, from 2 on -> 2, missing -> 0
    assert batch.sparse.keys() == ["item_id", "genres", "history", "price"]
    assert batch.sparse.values().tolist() == [1, 0, 3, 1, 0, 2, 2, 0, 3, 2, 2, 0]
    assert batch.sparse.lengths().tolist() == [1, 1, 1, 1, 2, 0, 1, 2, 0, 1, 1, 1]
    assert batch.sparse.values().dtype == torch.int64
    assert batch.sparse.stride() == 3
    assert torch.equal(batch.dense, torch.tensor([[1.0], [98.0], [0.0]]))
    assert torch.equal(batch.labels, torch.tensor([1.0, 0.0, 1.0]))


def test_encoding_a_subset_keeps_schema_order():
    encoder = FeatureEncoder.fit(SCHEMA, TRAIN, USERS, ITEMS)
    batch = encoder.encode(tiny_frame()[["price", "item_id", "label"]], ["price", "item_id"])
    assert batch.sparse.keys() == ["item_id", "price"]
    assert batch.sparse.values().tolist() == [1, 0, 3, 2, 2, 0]
    assert torch.equal(batch.dense, torch.tensor([[1.0], [98.0], [0.0]]))
    assert len(batch.to("cpu")) == 3
    with pytest.raises(ValueError, match=r"features \['colour'\] are not in schema 'tiny'"):
        encoder.encode(tiny_frame(), ["colour"])


def test_schema_sizes_filled():
    encoder = FeatureEncoder.fit(SCHEMA, TRAIN, USERS, ITEMS)
    schema = encoder.schema
    assert [schema.feature(n).vocab_size for n in ("item_id", "genres", "history")] == [4, 3, 4]
    assert schema.feature("price").num_embeddings == 3  # buckets 1..2 and 0 for missing
    assert schema.feature("item_id").embedding_dim == default_embedding_dim(4)
    assert schema.feature("history").embedding_dim == schema.feature("item_id").embedding_dim


def test_round_trip_gives_identical_batches(tmp_path):
    rng = np.random.default_rng(0)
    n = 200
    schema = Schema(
        name="random",
        features=(
            FeatureSpec("user_id", "interactions", "categorical", hash_buckets=97),
            FeatureSpec("item_id", "interactions", "categorical"),
            FeatureSpec("city", "users", "categorical"),
            FeatureSpec("age", "users", "numerical"),
            FeatureSpec("tags", "items", "multi_hot"),
            FeatureSpec("price", "items", "numerical", buckets=4),
            FeatureSpec("history", "interactions", "sequence", source="item_id", max_len=3),
        ),
    )
    users = pd.DataFrame(
        {"user_id": [f"u{i}" for i in range(30)], "city": rng.choice(["x", "y", "z"], 30),
         "age": rng.normal(40, 10, 30)}
    )
    items = pd.DataFrame(
        {"item_id": np.arange(50), "price": rng.exponential(10, 50),
         "tags": [list(rng.choice(["p", "q", "r", "s"], rng.integers(0, 3))) for _ in range(50)]}
    )
    interactions = pd.DataFrame(
        {"user_id": rng.choice(users["user_id"], n), "item_id": rng.integers(0, 60, n),
         "timestamp": rng.integers(0, 100, n), "label": rng.integers(0, 2, n).astype(float)}
    )
    frame = join_features(interactions, users, items)
    frame["history"] = recent_items(interactions, max_len=5)
    encoder = FeatureEncoder.fit(schema, interactions[:150], users, items)
    encoder.save(tmp_path / "encoder.json")
    loaded = FeatureEncoder.load(tmp_path / "encoder.json")
    assert loaded.schema == encoder.schema
    assert_same_batch(loaded.encode(frame), encoder.encode(frame))
    batch = loaded.encode(frame)
    assert batch.dense.shape == (n, 2) and batch.dense.dtype == torch.float32
    assert batch.sparse.lengths().tolist()[: 3 * n] == [1] * (3 * n)


def test_unknown_and_missing_values_map_to_zero():
    encoder = FeatureEncoder.fit(SCHEMA, TRAIN, USERS, ITEMS)
    frame = tiny_frame()
    frame["item_id"] = [10, 999, "x"]
    frame["genres"] = [["nope"], None, ["b"]]
    frame["price"] = [2.0, 0.5, None]  # a value on the boundary goes to the upper bucket
    sparse = encoder.encode(frame).sparse.to_dict()
    assert sparse["item_id"].values().tolist() == [2, 0, 0]
    assert sparse["genres"].values().tolist() == [0, 1]
    assert sparse["genres"].lengths().tolist() == [1, 0, 1]
    assert sparse["price"].values().tolist() == [2, 1, 0]


def test_fitted_on_train_only():
    valid = pd.DataFrame({"user_id": [4], "item_id": [40], "label": [1.0]})
    schema = Schema(
        name="users",
        features=(
            FeatureSpec("item_id", "interactions", "categorical"),
            FeatureSpec("city", "users", "categorical"),
        ),
    )
    users = pd.DataFrame({"user_id": [1, 2, 3, 4], "city": ["a", "a", "b", "only_valid"]})
    encoder = FeatureEncoder.fit(schema, TRAIN, users, ITEMS)
    assert encoder.schema.feature("city").vocab_size == 3  # a, b and OOV
    sparse = encoder.encode(join_features(valid, users, ITEMS)).sparse
    assert sparse.values().tolist() == [0, 0]


def test_hashing_is_stable_and_in_range():
    # computed once with pandas' SipHash on str(value); must not change across runs or machines
    encoder = HashEncoder(1000)
    assert encoder.transform(pd.Series(["user_1", "user_2", "Ω", 123])).tolist() == [149, 578, 774, 91]
    assert encoder.transform(np.array([7])).tolist() == encoder.transform(np.array(["7"])).tolist()
    ids = HashEncoder(13).transform(np.arange(10_000))
    assert ids.min() >= 0 and ids.max() < 13 and len(np.unique(ids)) == 13


def test_recent_items_hand_case():
    interactions = pd.DataFrame(
        {
            "user_id": ["A", "B", "A", "A", "A", "B", "A"],
            "item_id": [1, 7, 2, 3, 4, 8, 5],
            "timestamp": [5, 1, 3, 5, 9, 2, 1],
        },
        index=[10, 11, 12, 13, 14, 15, 16],
    )
    # A in time order: 5@1, 2@3, 1@5, 3@5 (a tie: row order), 4@9
    got = recent_items(interactions, max_len=2)
    assert got.index.tolist() == [10, 11, 12, 13, 14, 15, 16]
    assert got.tolist() == [[5, 2], [], [5], [5, 2], [1, 3], [7], []]
    assert recent_items(interactions, max_len=10)[14] == [5, 2, 1, 3]
    with pytest.raises(ValueError, match="max_len"):
        recent_items(interactions, max_len=0)


def test_missing_columns_are_named():
    encoder = FeatureEncoder.fit(SCHEMA, TRAIN, USERS, ITEMS)
    with pytest.raises(ValueError, match=r"\['genres', 'price'\]"):
        encoder.encode(tiny_frame().drop(columns=["genres", "price"]))


@pytest.mark.parametrize(
    ("features", "named"),
    [
        ((FeatureSpec("price", "items", "numerical", hash_buckets=8),), "hash_buckets=8"),
        ((FeatureSpec("item_id", "items", "categorical", buckets=4),), "buckets=4"),
        (
            (
                FeatureSpec("price", "items", "numerical"),
                FeatureSpec("history", "interactions", "sequence", source="price", max_len=2),
            ),
            "source 'price'",
        ),
    ],
)
def test_bad_config_raises(features, named):
    with pytest.raises(ValueError, match=named):
        FeatureEncoder.fit(Schema(name="bad", features=features), TRAIN, USERS, ITEMS)


def test_join_features_keeps_rows_and_rejects_clashes():
    rows = pd.DataFrame({"user_id": [3, 1, 3], "item_id": [40, 10, 77]}, index=[5, 6, 7])
    frame = join_features(rows, USERS, ITEMS)
    assert frame.index.tolist() == [5, 6, 7]
    assert frame["item_id"].tolist() == [40, 10, 77]
    assert frame["price"].tolist()[:2] == [100.0, 1.0] and np.isnan(frame["price"].iloc[2])
    with pytest.raises(ValueError, match="price"):
        join_features(rows, USERS.assign(price=1.0), ITEMS)
