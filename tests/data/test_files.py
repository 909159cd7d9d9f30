import pandas as pd
import pytest

from data import files
from data.files import describe_column, load_files, load_mapping_file, parse_mapping
from data.tables import DataError

MAPPING = {"user_id": "uid", "item_id": "sku", "timestamp": "ts", "label": "clicked"}


def interactions(**overrides):
    df = pd.DataFrame({"uid": ["u1", "u2", "u1", "u3"], "sku": [10, 11, 11, 12],
                       "ts": [100, 200, 300, 400], "clicked": [1, 0, 1, 1]})
    for column, values in overrides.items():
        df[column] = values
    return df


def write_csv(path, df):
    df.to_csv(path, index=False)
    return path


def rows_named(message, row, text):
    """True when the message shows data row ``row`` and it contains ``text``."""
    return any(line.split()[:1] == [str(row)] and text in line for line in message.splitlines())


def test_csv_files_with_a_mapping(tmp_path):
    users = pd.DataFrame({"uid": ["u1", "u2", "u3"], "age": [31, 45, 27], "country": ["FR", "US", "FR"]})
    items = pd.DataFrame({"sku": [10, 11, 12, 13], "price": [9.5, 20.0, 3.25, 7.0],
                          "brand": ["a", "b", "a", "c"], "available": ["true", "false", "1", "0"]})
    ds = load_files(write_csv(tmp_path / "log.csv", interactions()),
                    write_csv(tmp_path / "users.csv", users),
                    write_csv(tmp_path / "items.csv", items), MAPPING, name="shop").check()

    assert ds.interactions["label"].tolist() == [1.0, 0.0, 1.0, 1.0]
    assert ds.interactions["user_id"].tolist() == ["u1", "u2", "u1", "u3"]
    assert ds.items["available"].tolist() == [True, False, True, False]
    assert (ds.items["category"] == "unknown").all() and not ds.items["moderated"].any()
    # item 13 was never shown: it gets the last interaction time
    assert ds.items["created_at"].tolist() == [100, 200, 400, 400]
    specs = {f.name: (f.table, f.kind, f.buckets) for f in ds.schema.features}
    assert specs == {
        "user_id": ("users", "categorical", None),
        "item_id": ("items", "categorical", None),
        "category": ("items", "categorical", None),
        "age": ("users", "numerical", 8),
        "country": ("users", "categorical", None),
        "price": ("items", "numerical", 8),
        "brand": ("items", "categorical", None),
    }
    assert ds.schema.name == "shop" and ds.schema.source["mapping"] == MAPPING


def test_parquet_without_label_or_side_files(tmp_path):
    log = interactions(ts=pd.to_datetime([100, 200, 300, 400], unit="s")).drop(columns="clicked")
    log["tags"] = [["x"], ["y", "z"], [], ["x"]]
    log.to_parquet(tmp_path / "log.parquet")
    unlabelled = {k: v for k, v in MAPPING.items() if k != "label"}
    ds = load_files(tmp_path / "log.parquet", mapping=unlabelled).check()
    assert ds.interactions["timestamp"].tolist() == [100, 200, 300, 400]
    assert (ds.interactions["label"] == 1.0).all()
    assert ds.users["user_id"].tolist() == ["u1", "u2", "u3"]
    assert ds.items["item_id"].tolist() == [10, 11, 12]
    assert ds.items["created_at"].tolist() == [100, 200, 400]
    assert ds.schema.names == ["user_id", "item_id", "category"]


def test_parquet_item_features(tmp_path):
    interactions().to_parquet(tmp_path / "log.parquet")
    items = pd.DataFrame({"sku": [10, 11, 12], "category": ["shoes", "hats", "shoes"],
                          "colors": [["red"], ["blue", "red"], []], "created_at": pd.to_datetime(
                              ["2024-01-01", "2024-01-02", "2024-01-03"], utc=True)})
    items.to_parquet(tmp_path / "items.parquet")
    ds = load_files(tmp_path / "log.parquet", items=tmp_path / "items.parquet", mapping=MAPPING).check()
    assert ds.items["category"].tolist() == ["shoes", "hats", "shoes"]
    assert ds.items["created_at"].tolist() == [1704067200, 1704153600, 1704240000]
    assert ds.schema.feature("colors").kind == "multi_hot"


def test_many_distinct_strings_are_hashed():
    spec = describe_column(pd.Series([f"s{i}" for i in range(100_001)], name="query"), "users")
    assert spec.kind == "categorical" and spec.hash_buckets
    assert describe_column(pd.Series(["a", "b"], name="small"), "users").hash_buckets is None


def test_missing_column_names_file_and_column(tmp_path):
    path = write_csv(tmp_path / "log.csv", interactions().drop(columns="ts"))
    with pytest.raises(DataError, match=r"log\.csv: missing column 'timestamp'"):
        load_files(path, mapping={k: v for k, v in MAPPING.items() if k != "timestamp"})


def test_mapped_column_in_no_file(tmp_path):
    path = write_csv(tmp_path / "log.csv", interactions())
    with pytest.raises(DataError, match=r"log\.csv: missing column 'time' \(mapped to 'timestamp'\)"):
        load_files(path, mapping=MAPPING | {"timestamp": "time"})


def test_wrong_dtype_names_file_column_and_row(tmp_path):
    path = write_csv(tmp_path / "log.csv", interactions(ts=[100, "yesterday", 300, 400]))
    with pytest.raises(DataError, match=r"log\.csv: column 'timestamp' has the wrong dtype") as e:
        load_files(path, mapping=MAPPING)
    assert "1 row;" in str(e.value) and rows_named(str(e.value), 2, "yesterday")


def test_null_id_names_file_column_and_row(tmp_path):
    path = write_csv(tmp_path / "log.csv", interactions(sku=[10, 11, None, 12]))
    with pytest.raises(DataError, match=r"log\.csv: column 'item_id' has a null id in 1 row") as e:
        load_files(path, mapping=MAPPING)
    assert rows_named(str(e.value), 3, "u1")


def test_duplicate_item_ids_name_the_items_file(tmp_path):
    log = write_csv(tmp_path / "log.csv", interactions())
    items = write_csv(tmp_path / "items.csv", pd.DataFrame({"sku": [10, 11, 12, 11], "brand": list("abcd")}))
    with pytest.raises(DataError, match=r"items\.csv: column 'item_id' has duplicate ids in 2 rows") as e:
        load_files(log, items=items, mapping=MAPPING)
    assert rows_named(str(e.value), 2, "b") and rows_named(str(e.value), 4, "d")


def test_item_columns_in_the_file_are_checked(tmp_path):
    log = write_csv(tmp_path / "log.csv", interactions())
    items = write_csv(tmp_path / "items.csv", pd.DataFrame({"sku": [10, 11, 12], "available": ["yes", "1", "0"]}))
    with pytest.raises(DataError, match=r"items\.csv: column 'available' has the wrong dtype") as e:
        load_files(log, items=items, mapping=MAPPING)
    assert rows_named(str(e.value), 1, "yes")


@pytest.mark.parametrize(("content", "reason"), [("", "0 bytes"), ("uid,sku,ts,clicked\n", "a header but no rows")])
def test_empty_files_are_named(tmp_path, content, reason):
    (tmp_path / "users.csv").write_text(content)
    log = write_csv(tmp_path / "log.csv", interactions())
    with pytest.raises(DataError, match=rf"users\.csv: empty file \({reason}\)"):
        load_files(log, users=tmp_path / "users.csv", mapping=MAPPING)


def test_parse_mapping():
    assert parse_mapping(["user_id=uid", " item_id = sku "]) == {"user_id": "uid", "item_id": "sku"}
    for bad in (["user_id"], ["=uid"], ["user_id="], ["user_id=a", "user_id=b"]):
        with pytest.raises(ValueError, match="--map"):
            parse_mapping(bad)
    with pytest.raises(ValueError, match="userid.*keys must be among"):
        parse_mapping(["userid=uid"])


def test_load_mapping_file(tmp_path):
    path = tmp_path / "map.yaml"
    path.write_text("user_id: uid\nitem_id: sku\n")
    assert load_mapping_file(path) == {"user_id": "uid", "item_id": "sku"}
    path.write_text("user_id: uid\nprice: cost\n")
    with pytest.raises(ValueError, match=r"map\.yaml: bad column mapping: price: Extra inputs"):
        load_mapping_file(path)
    path.write_text("- user_id\n")
    with pytest.raises(ValueError, match="expected a YAML mapping"):
        load_mapping_file(path)


def test_log_read_in_chunks_equals_one_read(tmp_path, monkeypatch):
    log = write_csv(tmp_path / "log.csv", interactions(uid=["u1", "u2", "u1", "u3"]))
    whole = load_files(log, mapping=MAPPING)
    monkeypatch.setattr(files, "CHUNK_ROWS", 3)
    chunked = load_files(log, mapping=MAPPING)
    assert [len(c) for c in chunked.interaction_chunks()] == [3, 1]
    pd.testing.assert_frame_equal(chunked.interactions, whole.interactions)
    pd.testing.assert_frame_equal(chunked.users, whole.users)
    pd.testing.assert_frame_equal(chunked.items, whole.items)


def test_bad_row_in_a_later_chunk_is_counted_from_the_file_start(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "CHUNK_ROWS", 3)
    path = write_csv(tmp_path / "log.csv", interactions(ts=[100, 200, 300, "soon"]))
    with pytest.raises(DataError, match=r"log\.csv: column 'timestamp' has the wrong dtype") as e:
        load_files(path, mapping=MAPPING)
    assert rows_named(str(e.value), 4, "soon")
