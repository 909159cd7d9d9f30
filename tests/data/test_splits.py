import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from data import splits
from data.splits import METHODS, TEST, TRAIN, VALID


def split_interactions(df, method, seed, **kwargs):
    """The codes `data.splits.split_interactions` gives ``df`` written as a parquet file."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "interactions.parquet"
        df.to_parquet(path, index=False)
        return splits.split_interactions(path, method, seed, **kwargs)


@pytest.fixture(scope="module")
def interactions():
    rng = np.random.default_rng(0)
    n = 5000
    return pd.DataFrame({
        "user_id": rng.integers(0, 200, n),
        "item_id": rng.integers(0, 300, n),
        "timestamp": rng.integers(0, 1000, n),  # many ties on purpose
    })


def reference_split(df, method, seed, valid=0.1, test=0.1, n=1):
    """The split computed row by row in pandas: each user's rows (or all rows, for temporal) in
    the method's order, test first, then valid."""
    df = df.assign(key=np.random.default_rng(seed).random(len(df)), row=np.arange(len(df)))
    groups = [df] if method == "temporal" else [rows for _, rows in df.groupby("user_id")]
    codes = np.full(len(df), TRAIN, dtype=np.int8)
    for rows in groups:
        if method == "random":
            rows = rows.sort_values(["key", "row"])
        elif method == "user-temporal":
            rows = rows.sort_values(["timestamp", "key", "row"], ascending=[False, True, True])
        else:  # temporal and leave-last: newest first
            rows = rows.sort_values(["timestamp", "key", "row"], ascending=False)
        size = len(rows)
        if method == "temporal":
            n_test, n_valid = round(size * test), round(size * valid)
        elif method == "leave-last":
            n_test, n_valid = (n, n) if size > 2 * n else (0, 0)
        else:
            n_test, n_valid = int(np.floor(size * test)), int(np.floor(size * valid))
        codes[rows["row"].to_numpy()[:n_test]] = TEST
        codes[rows["row"].to_numpy()[n_test:n_test + n_valid]] = VALID
    return codes


@pytest.mark.parametrize(("method", "kwargs"), [("random", {}), ("random", {"valid": 0.29, "test": 0.07}),
                                                ("temporal", {"valid": 0.15, "test": 0.25}),
                                                ("user-temporal", {}), ("leave-last", {"n": 2})])
def test_split_matches_a_row_by_row_reference(interactions, method, kwargs, monkeypatch):
    monkeypatch.setattr(splits, "BATCH_ROWS", 1234)  # the file is read and ranked in several batches
    codes = split_interactions(interactions, method, seed=5, **kwargs)
    np.testing.assert_array_equal(codes, reference_split(interactions, method, 5, **kwargs))


def _parts(df, codes):
    return [df[codes == c] for c in (TRAIN, VALID, TEST)]


@pytest.mark.parametrize("method", METHODS)
def test_split_is_deterministic_by_seed_and_covers_every_row(interactions, method):
    a = split_interactions(interactions, method, seed=1)
    assert np.array_equal(a, split_interactions(interactions, method, seed=1))
    assert not np.array_equal(a, split_interactions(interactions, method, seed=2))
    assert set(np.unique(a)) == {TRAIN, VALID, TEST}


@pytest.mark.parametrize("method", METHODS)
def test_no_test_interaction_leaks_into_train(interactions, method):
    df = interactions.reset_index().rename(columns={"index": "row"})
    train, valid, test = _parts(df, split_interactions(df, method, seed=3))
    assert set(train["row"]).isdisjoint(test["row"])
    assert set(train["row"]).isdisjoint(valid["row"])
    assert set(valid["row"]).isdisjoint(test["row"])
    if method == "temporal":
        assert train["timestamp"].max() <= valid["timestamp"].min()
        assert valid["timestamp"].max() <= test["timestamp"].min()
    if method in ("leave-last", "user-temporal"):
        last_train = train.groupby("user_id")["timestamp"].max()
        first_valid, first_test = (part.groupby("user_id")["timestamp"].min() for part in (valid, test))
        assert (last_train.reindex(first_test.index) <= first_test).all()
        assert (last_train.reindex(first_valid.index) <= first_valid).all()
        assert (valid.groupby("user_id")["timestamp"].max().reindex(first_test.index).fillna(-1) <= first_test).all()


def test_temporal_fractions_are_exact(interactions):
    codes = split_interactions(interactions, "temporal", seed=0, valid=0.1, test=0.2)
    assert np.bincount(codes).tolist() == [3500, 500, 1000]


def test_random_split_is_per_user_80_10_10():
    df = pd.DataFrame({"user_id": np.repeat([1, 2], [10, 25]), "timestamp": 0})
    codes = split_interactions(df, "random", seed=0)
    per_user = pd.crosstab(df["user_id"], codes)
    assert per_user.loc[1].tolist() == [8, 1, 1]
    assert per_user.loc[2].tolist() == [21, 2, 2]


def test_user_temporal_split_is_per_user_80_10_10_in_time_order():
    df = pd.DataFrame({"user_id": np.repeat([1, 2], [10, 25]), "timestamp": np.r_[np.arange(10)[::-1], np.arange(25)]})
    codes = split_interactions(df, "user-temporal", seed=0)
    assert codes[:10].tolist() == [TEST, VALID] + [TRAIN] * 8  # user 1's rows run newest first
    assert codes[10:].tolist() == [TRAIN] * 21 + [VALID] * 2 + [TEST] * 2


def test_leave_last_takes_the_latest_and_keeps_short_users_in_train():
    df = pd.DataFrame({"user_id": [1, 1, 1, 1, 2, 2], "timestamp": [4, 1, 3, 2, 5, 6]})
    codes = split_interactions(df, "leave-last", seed=0)
    assert codes.tolist() == [TEST, TRAIN, VALID, TRAIN, TRAIN, TRAIN]


def test_bad_method_and_fractions():
    df = pd.DataFrame({"user_id": [1], "timestamp": [0]})
    with pytest.raises(ValueError, match="'weekly' is not one of"):
        split_interactions(df, "weekly", seed=0)
    with pytest.raises(ValueError, match="valid=0.6 and test=0.5"):
        split_interactions(df, "random", seed=0, valid=0.6, test=0.5)
