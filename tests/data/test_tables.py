import numpy as np
import pandas as pd
import pytest

from data.tables import INTERACTIONS, ITEMS, DataError, check_table, read_table


def _interactions(**overrides):
    df = pd.DataFrame({"user_id": [1, 2, 3], "item_id": [10, 11, 12],
                       "timestamp": [100, 200, 300], "label": [1.0, 0.0, 1.0]})
    for k, v in overrides.items():
        df[k] = v
    return df


def test_valid_table_is_coerced_to_canonical_dtypes():
    out = check_table(_interactions(timestamp=["1970-01-01T00:01:40Z"] * 3), "x.csv", INTERACTIONS)
    assert out["timestamp"].tolist() == [100, 100, 100]
    assert out["label"].dtype == np.float32
    assert out["user_id"].dtype == np.int64


def test_missing_column_names_file_and_column():
    with pytest.raises(DataError, match=r"x\.csv: missing column 'label'"):
        check_table(_interactions().drop(columns="label"), "x.csv", INTERACTIONS)


def test_wrong_dtype_names_the_first_offending_rows():
    df = _interactions(timestamp=[100, "yesterday", "soon"])
    with pytest.raises(DataError) as e:
        check_table(df, "x.csv", INTERACTIONS)
    msg = str(e.value)
    assert "x.csv: column 'timestamp' has the wrong dtype" in msg
    assert "2 rows" in msg and "yesterday" in msg and "soon" in msg
    # data rows are counted from 1: 'yesterday' is row 2
    assert any(line.split()[:1] == ["2"] and "yesterday" in line for line in msg.splitlines())


def test_null_id_is_reported_with_its_row():
    df = _interactions(user_id=[1.0, np.nan, 3.0])
    with pytest.raises(DataError, match=r"column 'user_id' has a null id in 1 row") as e:
        check_table(df, "x.csv", INTERACTIONS)
    assert "\n2 " in str(e.value)


def test_fractional_ids_are_a_wrong_dtype():
    with pytest.raises(DataError, match="'item_id' has the wrong dtype"):
        check_table(_interactions(item_id=[1.0, 2.5, 3.0]), "x.csv", INTERACTIONS)


def test_duplicate_keys_list_every_copy():
    items = pd.DataFrame({"item_id": [7, 8, 7], "category": "a", "available": True,
                          "moderated": False, "created_at": 0})
    with pytest.raises(DataError, match=r"items\.csv: column 'item_id' has duplicate ids in 2 rows") as e:
        check_table(items, "items.csv", ITEMS, key="item_id")
    assert "\n1 " in str(e.value) and "\n3 " in str(e.value)


def test_bool_words_are_accepted_and_others_rejected():
    items = pd.DataFrame({"item_id": [1, 2], "category": "a", "available": ["true", "0"],
                          "moderated": ["no", "false"], "created_at": 0})
    with pytest.raises(DataError, match="'moderated' has the wrong dtype"):
        check_table(items, "i", ITEMS)
    items["moderated"] = ["False", "1"]
    assert check_table(items, "i", ITEMS)["available"].tolist() == [True, False]


@pytest.mark.parametrize("content", ["", "user_id,item_id,timestamp,label\n"])
def test_empty_files_are_rejected(tmp_path, content):
    path = tmp_path / "empty.csv"
    path.write_text(content)
    with pytest.raises(DataError, match=r"empty\.csv: empty file"):
        read_table(path)


def test_mapping_renames_and_names_missing_source_column(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("uid,sku,ts,clicked\n1,2,3,1\n")
    df = read_table(path, {"user_id": "uid", "item_id": "sku"})
    assert list(df.columns) == ["user_id", "item_id", "ts", "clicked"]
    with pytest.raises(DataError, match=r"log\.csv: missing column 'time'"):
        read_table(path, {"timestamp": "time"})
