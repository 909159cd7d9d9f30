"""FeatureColumns: typed like the frames they replace, taken and encoded alike."""

import numpy as np
import pandas as pd
import pytest

from data.columns import FeatureColumns, equal_to
from data.encoders import FeatureEncoder
from data.schema import FeatureSpec, Schema

ROW = {"user_id": 7, "segment": "a", "age": 31.5, "active": True, "recent": [4, 5], "device": None}


def test_values_are_typed_as_a_one_row_frame_types_them():
    got = FeatureColumns.from_values([ROW]).to_frame()
    pd.testing.assert_frame_equal(got, pd.DataFrame([ROW]))
    rows = [ROW, ROW | {"user_id": None, "age": np.float32(2.5)}]  # as the one-row frames, concatenated
    pd.testing.assert_frame_equal(FeatureColumns.from_values(rows).to_frame(),
                                  pd.concat([pd.DataFrame([row]) for row in rows], ignore_index=True))


def test_take_and_select_follow_the_rows_and_names_asked_for():
    frame = pd.DataFrame({"a": [1, 2, 3], "b": pd.array([True, None, False], "boolean"), "c": ["x", "y", None]})
    columns = FeatureColumns.from_frame(frame)
    pd.testing.assert_frame_equal(columns.take(np.array([2, 0])).to_frame(),
                                  frame.iloc[[2, 0]].reset_index(drop=True))
    pd.testing.assert_frame_equal(columns.take(np.array([False, True, True])).select(["c", "a"]).to_frame(),
                                  frame.iloc[1:, [2, 0]].reset_index(drop=True))
    assert len(columns.take(np.zeros(3, bool))) == 0 and list(columns) == ["a", "b", "c"]


def test_bad_rows_are_refused():
    with pytest.raises(ValueError, match=r"columns \{'b': 2\} differ in length from the 3 rows"):
        FeatureColumns({"a": np.zeros(3), "b": np.zeros(2)}, 3)
    with pytest.raises(ValueError, match=r"a row names the columns \['a'\]; expected those of the first row"):
        FeatureColumns.from_values([{"a": 1, "b": 2}, {"a": 1}])


def test_equal_to_counts_a_missing_value_as_different():
    assert equal_to(pd.array([True, None, False], "boolean"), True).tolist() == [True, False, False]
    assert equal_to(np.array([1.0, np.nan]), 1.0).tolist() == [True, False]
    assert equal_to(np.array(["a", None], object), "a").tolist() == [True, False]


def test_columns_encode_as_their_frame():
    schema = Schema("s", (FeatureSpec("user_id", "users", "categorical"), FeatureSpec("age", "users", "numerical",
                                                                                       buckets=2),
                          FeatureSpec("item_id", "items", "categorical"),
                          FeatureSpec("recent", "interactions", "sequence", max_len=2, source="item_id")))
    users = pd.DataFrame({"user_id": [1, 2], "age": [20.0, 40.0]})
    items = pd.DataFrame({"item_id": [4, 5, 6]})
    train = pd.DataFrame({"user_id": [1, 2, 2], "item_id": [4, 5, 6], "recent": [[], [4], [4, 5]]})
    encoder = FeatureEncoder.fit(schema, train, users, items)
    frame = pd.DataFrame({"user_id": [2, 9], "age": [40.0, np.nan], "item_id": [6, 4], "recent": [[4, 5, 6], []]})
    want, got = encoder.encode(frame), encoder.encode(FeatureColumns.from_frame(frame))
    assert got.sparse.keys() == want.sparse.keys()
    for a, b in [(got.sparse.values(), want.sparse.values()), (got.sparse.lengths(), want.sparse.lengths()),
                 (got.dense, want.dense)]:
        np.testing.assert_array_equal(a.numpy(), b.numpy())
