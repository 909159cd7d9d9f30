"""Encoded parts and their streams: the same batches as pandas encoding, a shard order set by
(seed, epoch), units that partition the rows, and nothing read whole."""

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from data import encoded
from data.dataset import PARTS, read_dataset, read_part
from data.encoded import (
    ENCODED,
    POSITIVES,
    BatchStream,
    Block,
    EncodeConfig,
    EncodedPart,
    Layout,
    StreamConfig,
    encode_dataset,
    unit_micro_batches,
    with_sequences,
)
from data.encoders import FeatureEncoder, join_features
from data.prepare import prepare
from data.schema import FeatureSpec
from data.synthetic import SyntheticConfig, generate
from data.tables import DataError

ROW_GROUP = 500
GROUPS = {
    part: [["user_id", "age", "recent"], ["item_id", "tags", "price"]] if part == POSITIVES
    else [["user_id", "segment", "age", "country", "item_id", "tags", "price"]]
    for part in (*PARTS, POSITIVES)
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Synthetic rows with a multi-hot item feature and a recent-items sequence, encoded in row
    groups of 500 rows, three to a shard."""
    ds = generate(SyntheticConfig(users=120, items=80, interactions=6_000, seed=3))
    rng = np.random.default_rng(0)
    ds.items["tags"] = [[f"t{t}" for t in rng.integers(0, 12, rng.integers(0, 4))] for _ in range(len(ds.items))]
    ds.schema = ds.schema.with_features([*ds.schema.features, FeatureSpec("tags", "items", "multi_hot"),
                                         FeatureSpec("recent", "interactions", "sequence", max_len=3,
                                                     source="item_id")])
    out = prepare(ds, tmp_path_factory.mktemp("encoded") / "ds", split="random", seed=5)
    encode_dataset(out, EncodeConfig(row_group_rows=ROW_GROUP, shard_row_groups=3))
    return out


def pandas_rows(dataset: Path, part: str) -> pd.DataFrame:
    """The part's joined rows as the pandas path built them, in part order."""
    tables = read_dataset(dataset, tables=("users", "items"))
    rows = read_part(dataset, "train" if part == POSITIVES else part)
    if part == POSITIVES:
        encoder = FeatureEncoder.load(dataset / "encoders.json")
        rows = with_sequences(rows[rows["label"] > 0], [encoder.schema.feature("recent")])
    return join_features(rows, tables.users, tables.items).reset_index(drop=True)


def stream(dataset: Path, part: str, config: StreamConfig, epoch: int = 0, rank: int = 0) -> BatchStream:
    schema = FeatureEncoder.load(dataset / "encoders.json").schema
    return BatchStream(EncodedPart(dataset / ENCODED / part), schema, GROUPS[part], config, lambda: epoch, rank)


def assert_same_batch(a, b) -> None:
    assert a.sparse.keys() == b.sparse.keys()
    assert torch.equal(a.sparse.values(), b.sparse.values())
    assert torch.equal(a.sparse.lengths(), b.sparse.lengths())
    assert torch.equal(a.dense, b.dense)
    assert torch.equal(a.labels, b.labels)


def test_parts_are_sharded_row_groups(dataset):
    for part in (*PARTS, POSITIVES):
        encoded_part = EncodedPart(dataset / ENCODED / part)
        assert encoded_part.num_rows == len(pandas_rows(dataset, part))
        assert set(encoded_part.sizes[:-1]) == {ROW_GROUP}
        assert [pq.ParquetFile(f).metadata.num_row_groups for f in encoded_part.files][:-1] == [3] * (
            len(encoded_part.files) - 1)
    columns = EncodedPart(dataset / ENCODED / POSITIVES).columns
    assert pq.read_schema(EncodedPart(dataset / ENCODED / POSITIVES).files[0]).field("id.recent").type == \
        pa.list_(pa.int64())
    assert {"dense.price", "id.price", "id.tags", "id.recent", "label"} <= set(columns)
    assert "id.recent" not in EncodedPart(dataset / ENCODED / "train").columns


@pytest.mark.parametrize("part", [*PARTS, POSITIVES])
@pytest.mark.parametrize("shuffle", [False, True])
def test_streamed_batches_equal_pandas_encoded_batches(dataset, part, shuffle):
    encoder = FeatureEncoder.load(dataset / "encoders.json")
    frame = pandas_rows(dataset, part)
    config = StreamConfig(256, units=2, shuffle=shuffle, seed=1, buffer_rows=700)
    seen = []
    for rank in (0, 1):
        for *batches, rows in stream(dataset, part, config, rank=rank):
            for names, batch in zip(GROUPS[part], batches, strict=True):
                assert_same_batch(batch, encoder.encode(frame.iloc[rows.numpy()], names))
            seen.extend(rows.tolist())
    assert sorted(seen) == list(range(len(frame)))
    assert (seen == sorted(seen)) != shuffle


def test_shard_order_is_set_by_seed_and_epoch(dataset):
    def rows(seed: int, epoch: int) -> list[int]:
        config = StreamConfig(256, seed=seed, buffer_rows=0)  # no buffer: rows follow the row groups
        return [r for *_, b in stream(dataset, "train", config, epoch) for r in b.tolist()]

    first = rows(0, 0)
    assert rows(0, 0) == first
    assert rows(0, 1) != first and rows(1, 0) != first
    groups = np.array(first) // ROW_GROUP
    order = groups[np.r_[True, groups[1:] != groups[:-1]]]  # each row group's rows come together
    assert sorted(order) == list(range(len(order))) and list(order) != sorted(order)


@pytest.mark.parametrize("units", [1, 2, 3, 4])
@pytest.mark.parametrize("even", [False, True])
def test_units_partition_the_rows(dataset, units, even):
    part = EncodedPart(dataset / ENCODED / "valid")
    config = StreamConfig(64 * units, units=units, seed=2, even=even, buffer_rows=300)
    layout = Layout(ids=("id.user_id",), lists=(), dense=())
    per_unit = [[b.rows.tolist() for b in unit_micro_batches(part, layout, config, 1, u)] for u in range(units)]
    assert len({len(batches) for batches in per_unit}) == 1  # every unit gives as many micro-batches
    rows = [r for batches in per_unit for b in batches for r in b]
    counts = np.bincount(rows, minlength=part.num_rows)
    if even:  # as many rows per unit; the padding repeats the first rows of the epoch's order
        assert len({sum(map(len, batches)) for batches in per_unit}) == 1
        assert counts.min() == 1 and counts.sum() - part.num_rows == -part.num_rows % units
    else:
        assert counts.tolist() == [1] * part.num_rows


def test_shuffle_buffer_holds_a_bounded_number_of_rows():
    def block(start: int) -> Block:
        rows = np.arange(start, start + 100)
        offsets = np.r_[0, np.cumsum(rows % 3)]  # row r has r % 3 values, all equal to r
        return Block(rows[:, None], ((offsets, np.repeat(rows, rows % 3)),), rows[:, None].astype(np.float32),
                     rows.astype(np.float32), rows)

    held, out = [], []
    for window, order in encoded._shuffled((block(s) for s in range(0, 5_000, 100)), 1_000,
                                           np.random.default_rng(0)):
        held.append(len(window))
        mixed = window.take(order)
        offsets, values = mixed.lists[0]
        for k, row in enumerate(mixed.rows):  # every column of a row moved with it
            assert mixed.ids[k, 0] == mixed.dense[k, 0] == mixed.labels[k] == row
            assert values[offsets[k]:offsets[k + 1]].tolist() == [row] * (row % 3)
        out.extend(mixed.rows.tolist())
    assert max(held) <= 1_000 + 100  # never more than the buffer and one block
    assert sorted(out) == list(range(5_000)) and out != sorted(out)


def test_no_part_is_read_whole(dataset, tmp_path, monkeypatch):
    """Encoding reads each part in shard-sized batches and reading an encoded part reads row
    groups; the only parquet files read whole are the users and items tables."""
    largest = {"batch": 0, "group": 0}
    whole = []
    iter_batches, read_row_group, read_parquet = (pq.ParquetFile.iter_batches, pq.ParquetFile.read_row_group,
                                                  pd.read_parquet)

    def counted_batches(self, *args, **kwargs):
        for batch in iter_batches(self, *args, **kwargs):
            largest["batch"] = max(largest["batch"], batch.num_rows)
            yield batch

    def counted_group(self, *args, **kwargs):
        table = read_row_group(self, *args, **kwargs)
        largest["group"] = max(largest["group"], table.num_rows)
        return table

    def recorded_read(path, *args, **kwargs):
        whole.append(Path(path).name)
        return read_parquet(path, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", counted_batches)
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", counted_group)
    monkeypatch.setattr(pd, "read_parquet", recorded_read)
    copy = tmp_path / "ds"
    ds = generate(SyntheticConfig(users=50, items=40, interactions=3_000, seed=4))
    prepare(ds, copy, split="temporal", seed=1)
    whole.clear()
    largest.update(batch=0, group=0)
    encode_dataset(copy, EncodeConfig(row_group_rows=100, shard_row_groups=2))
    assert sorted(whole) == ["items.parquet", "users.parquet"]  # no sequence feature: nothing else
    assert largest["batch"] == 200  # a shard's rows at a time
    schema = FeatureEncoder.load(copy / "encoders.json").schema
    train = BatchStream(EncodedPart(copy / ENCODED / "train"), schema, [["user_id", "price"]], StreamConfig(128),
                        lambda: 0)
    rows = sum(len(rows) for _, rows in train)
    assert rows == len(read_parquet(copy / "split" / "train.parquet")) and largest["group"] == 100


def test_bad_inputs_name_the_problem(dataset, tmp_path):
    with pytest.raises(ValueError, match="batch_size = 100 must be a positive multiple of the 3"):
        StreamConfig(100, units=3)
    with pytest.raises(ValueError, match="row_group_rows must be >= 1"):
        EncodeConfig(row_group_rows=0)
    with pytest.raises(DataError, match="recstack data encode"):
        EncodedPart(tmp_path)
    schema = FeatureEncoder.load(dataset / "encoders.json").schema
    with pytest.raises(ValueError, match=r"features \['colour'\] are not in schema"):
        BatchStream(EncodedPart(dataset / ENCODED / "train"), schema, [["colour"]], StreamConfig(8), lambda: 0)
    with pytest.raises(ValueError, match=r"lacks columns \['id.recent'\]"):
        BatchStream(EncodedPart(dataset / ENCODED / "train"), schema, [["recent"]], StreamConfig(8), lambda: 0)
    with pytest.raises(ValueError, match="cannot feed 5000 stream units"):
        list(stream(dataset, "valid", StreamConfig(5000, units=5000)))
