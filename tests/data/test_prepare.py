import json

import pyarrow.parquet as pq
import pytest

from data import dataset, splits, synthetic
from data.dataset import Dataset, read_part
from data.prepare import prepare
from data.splits import METHODS
from data.synthetic import SyntheticConfig, generate

CONFIG = SyntheticConfig(users=150, items=120, interactions=5000, seed=2)


def _tables(directory):
    """Every parquet file's rows and the JSON files of a dataset directory, by relative path."""
    tables = {str(p.relative_to(directory)): pq.read_table(p) for p in directory.rglob("*.parquet")}
    jsons = {str(p.relative_to(directory)): json.loads(p.read_text()) for p in directory.rglob("*.json")}
    return tables, jsons


@pytest.mark.parametrize("method", METHODS)
def test_streamed_prepare_equals_prepare_of_the_whole_table(tmp_path, monkeypatch, method):
    monkeypatch.setattr(synthetic, "LOG_CHUNK", 900)  # the log arrives in slices of about 900 rows
    whole = generate(CONFIG)
    whole = Dataset(whole.interactions, whole.users, whole.items, whole.schema, extras=whole.extras)
    expected = prepare(whole, tmp_path / "whole", split=method, seed=3)

    monkeypatch.setattr(dataset, "CHUNK_ROWS", 700)  # the parts are written 700 rows at a time
    monkeypatch.setattr(splits, "BATCH_ROWS", 500)
    streamed = prepare(generate(CONFIG), tmp_path / "streamed", split=method, seed=3)

    assert pq.ParquetFile(streamed / "interactions.parquet").metadata.num_row_groups > 1
    tables, jsons = _tables(streamed)
    expected_tables, expected_jsons = _tables(expected)
    assert jsons == expected_jsons and tables.keys() == expected_tables.keys()
    for name, table in tables.items():
        assert table.equals(expected_tables[name]), name
    assert sum(len(read_part(streamed, part)) for part in dataset.PARTS) == CONFIG.interactions


def test_positive_rating_needs_a_rating_column(tmp_path):
    with pytest.raises(ValueError, match="positive_rating=4 needs a rating column"):
        prepare(generate(CONFIG), tmp_path / "out", positive_rating=4)
    assert list(tmp_path.iterdir()) == []
