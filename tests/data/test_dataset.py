import pandas as pd
import pytest

from data.dataset import Dataset, read_dataset, read_part, write_dataset
from data.schema import FeatureSpec, Schema
from data.tables import DataError


def _dataset(extras=None):
    inter = pd.DataFrame({"user_id": [1, 1, 2], "item_id": [10, 11, 10],
                          "timestamp": [5, 6, 7], "label": [1.0, 0.0, 1.0]})
    users = pd.DataFrame({"user_id": [1, 2]})
    items = pd.DataFrame({"item_id": [10, 11], "category": ["a", "b"], "available": True,
                          "moderated": False, "created_at": 0})
    schema = Schema("tiny", (FeatureSpec("user_id", "users", "categorical"),))
    return Dataset(inter, users, items, schema, split=pd.Series([0, 1, 2]).to_numpy(), extras=extras or {})


def test_write_then_read_round_trips(tmp_path):
    out = write_dataset(_dataset().check(), tmp_path / "ds")
    back = read_dataset(out)
    assert back.schema == _dataset().schema
    assert back.interactions["item_id"].tolist() == [10, 11, 10]
    assert read_part(out, "test")["user_id"].tolist() == [2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_failure_mid_write_leaves_no_directory(tmp_path):
    def crash(_):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_dataset(_dataset({"boom": crash}), tmp_path / "ds")
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_the_previous_directory(tmp_path):
    out = write_dataset(_dataset(), tmp_path / "ds")
    (out / "marker").write_text("previous")

    def crash(_):
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        write_dataset(_dataset({"boom": crash}), out, overwrite=True)
    assert (out / "marker").read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]
    with pytest.raises(FileExistsError, match="already exists"):
        write_dataset(_dataset(), out)
    write_dataset(_dataset(), out, overwrite=True)
    assert not (out / "marker").exists()


def test_check_rejects_interactions_with_unknown_items():
    ds = _dataset()
    ds.interactions.loc[2, "item_id"] = 99
    with pytest.raises(DataError, match=r"1 rows have a item_id missing from the items table, e.g. \[99\]"):
        ds.check()


def test_read_rejects_a_directory_without_schema(tmp_path):
    with pytest.raises(DataError, match="not a recstack dataset"):
        read_dataset(tmp_path)
    with pytest.raises(ValueError, match="'holdout' is not one of"):
        read_part(tmp_path, "holdout")
