"""Pre-encoded inputs: each split part encoded once into parquet shards, streamed into batches.

    DIR/encoded/
      train/ valid/ test/   every row of the part, the features of `encoded_features`
      positives/            the train part's positive rows (label > 0), with the sequence features
        part-00000.parquet  row groups of ``row_group_rows`` rows, ``shard_row_groups`` per file

Columns, one per feature, in the schema's encoding (`data.encoders.FeatureEncoder`):

    id.NAME      sparse ids: int64, or list<int64> for multi_hot and sequence features
                 (parquet keeps a list column as per-row lengths and the flattened values)
    dense.NAME   float32, the standardised number of a numerical feature
    label        float32

`write_encoded` streams each part a shard at a time: the users and items tables are the only
tables held whole (with sequence features, the train part's positives are held whole too, to
find each user's earlier items).

`BatchStream` reads a part as an epoch of batches, with no pandas on the way: row groups ->
numpy `Block`s -> tensors and a KeyedJaggedTensor. An epoch's row-group order is a permutation
drawn from (seed, epoch). The rows of that sequence are cut into ``units`` contiguous ranges,
one per (rank, DataLoader worker); each unit shuffles its range window by window (a few row
groups at a time) and cuts it into micro-batches. A rank's k-th batch is its units' k-th
micro-batches, so the ranks' k-th batches together hold the same rows for any split of the same
number of units into ranks and workers, and a resumed epoch repeats the uninterrupted one.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from data.dataset import PARTS, staging
from data.encoders import Batch, FeatureEncoder, join_features, recent_items
from data.schema import FeatureSpec, Schema
from data.tables import KEYS, DataError, parquet_batches

ENCODED = "encoded"
POSITIVES = "positives"


@dataclass(frozen=True)
class EncodeConfig:
    """Row group and shard sizes of the encoded parts."""

    row_group_rows: int = 16_384
    shard_row_groups: int = 64

    @property
    def shard_rows(self) -> int:
        """Rows of a shard file, encoded in one go."""
        return self.row_group_rows * self.shard_row_groups

    def __post_init__(self) -> None:
        for name in ("row_group_rows", "shard_row_groups"):
            if getattr(self, name) < 1:
                raise ValueError(f"EncodeConfig.{name} must be >= 1, got {getattr(self, name)}")


def encoded_features(schema: Schema, part: str) -> list[FeatureSpec]:
    """The features a part holds: all but the sequences, which only ``positives`` has."""
    return [f for f in schema.features if part == POSITIVES or f.kind != "sequence"]


def encode_dataset(data_dir: Path, config: EncodeConfig = EncodeConfig()) -> Path:
    """(Re)writes ``data_dir/encoded`` from a prepared dataset, atomically; returns its path."""
    data_dir = Path(data_dir)
    if not (data_dir / "encoders.json").is_file():
        raise DataError(f"{data_dir}: not a prepared dataset (no encoders.json)")
    with staging(data_dir / ENCODED, overwrite=True) as tmp:
        write_encoded(data_dir, tmp, config)
    return data_dir / ENCODED


def write_encoded(data_dir: Path, out: Path, config: EncodeConfig = EncodeConfig()) -> None:
    """Encodes each split part of the dataset at ``data_dir`` into ``out/PART/`` shards."""
    data_dir, out = Path(data_dir), Path(out)
    encoder = FeatureEncoder.load(data_dir / "encoders.json")
    # only the columns of the features each table holds, so a column an interaction repeats is not joined twice
    features = encoder.schema.features
    users, items = (pd.read_parquet(data_dir / f"{t}.parquet",
                                    columns=list(dict.fromkeys([KEYS[t], *(f.name for f in features if f.table == t)])))
                    for t in ("users", "items"))
    for part in PARTS:
        chunks = _part_chunks(data_dir, part, config.shard_rows)
        _write_part(out / part, (_joined(c, users, items) for c in chunks), encoder, part, config)
    label = encoder.schema.label
    sequences = [f for f in encoder.schema.features if f.kind == "sequence"]
    if sequences:  # a row's history is the user's earlier positives: they are held in memory
        train = pd.read_parquet(data_dir / "split" / "train.parquet")
        positives = with_sequences(train[train[label] > 0], sequences)
        chunks = (positives.iloc[s:s + config.shard_rows] for s in range(0, len(positives), config.shard_rows))
    else:
        chunks = (c[c[label] > 0] for c in _part_chunks(data_dir, "train", config.shard_rows))
    _write_part(out / POSITIVES, (_joined(c, users, items) for c in chunks), encoder, POSITIVES, config)


def with_sequences(rows: pd.DataFrame, sequences: list[FeatureSpec]) -> pd.DataFrame:
    """``rows`` with each sequence column: the user's earlier items among ``rows``, oldest first."""
    if not sequences:
        return rows
    before = recent_items(rows, max(f.max_len for f in sequences))
    return rows.assign(**{f.name: before.map(lambda items, n=f.max_len: items[-n:]) for f in sequences})


def _joined(rows: pd.DataFrame, users: pd.DataFrame, items: pd.DataFrame) -> pd.DataFrame:
    """``rows`` with their user's and item's feature columns; those tables' values win over an
    interaction's copy of the same column."""
    repeated = (set(users.columns) | set(items.columns)) - set(KEYS.values())
    return join_features(rows.drop(columns=[c for c in rows.columns if c in repeated]), users, items)


def _part_chunks(data_dir: Path, part: str, rows: int) -> Iterator[pd.DataFrame]:
    for batch in parquet_batches(data_dir / "split" / f"{part}.parquet", rows):
        yield batch.to_pandas()


def _write_part(folder: Path, frames: Iterable[pd.DataFrame], encoder: FeatureEncoder, part: str,
                config: EncodeConfig) -> None:
    """Encodes each frame into one shard file of ``row_group_rows`` row groups."""
    features = encoded_features(encoder.schema, part)
    names = [f.name for f in features]
    folder.mkdir(parents=True)
    shard = 0
    for frame in frames:
        if len(frame):
            table = encoded_table(encoder.encode(frame, names), features)
            pq.write_table(table, folder / f"part-{shard:05d}.parquet", row_group_size=config.row_group_rows)
            shard += 1


def encoded_table(batch: Batch, features: list[FeatureSpec]) -> pa.Table:
    """A `Batch` of ``features`` as the columns of an encoded part."""
    columns = {}
    sparse = batch.sparse.to_dict()
    for position, f in enumerate(f for f in features if f.kind == "numerical"):
        columns[f"dense.{f.name}"] = pa.array(batch.dense[:, position].numpy())
    for f in features:
        if not f.sparse:
            continue
        ids = sparse[f.name]
        if _jagged(f):
            offsets = np.concatenate([[0], np.cumsum(ids.lengths().numpy())]).astype(np.int32)
            columns[f"id.{f.name}"] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(ids.values().numpy()))
        else:
            columns[f"id.{f.name}"] = pa.array(ids.values().numpy())
    columns["label"] = pa.array(batch.labels.numpy())
    return pa.table(columns)


class EncodedPart:
    """The row groups of one encoded part, read from the shards' footers only."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.files = sorted(self.folder.glob("part-*.parquet"))
        if not self.files:
            raise DataError(f"{self.folder}: no encoded shards; run `recstack data encode --data DIR` on the dataset")
        self.groups = []  # (file index, row group index)
        sizes = []
        for i, file in enumerate(self.files):
            meta = pq.ParquetFile(file).metadata
            for g in range(meta.num_row_groups):
                self.groups.append((i, g))
                sizes.append(meta.row_group(g).num_rows)
        self.sizes = np.array(sizes, dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.sizes)[:-1]])
        self.columns = pq.read_schema(self.files[0]).names

    @property
    def num_rows(self) -> int:
        return int(self.sizes.sum())

    def read_group(self, g: int, columns: list[str], files: dict[int, pq.ParquetFile]) -> pa.Table:
        """Row group ``g`` (numbered over all the part's shards); ``files`` caches the open shards."""
        i, local = self.groups[g]
        if i not in files:
            files[i] = pq.ParquetFile(self.files[i])
        return files[i].read_row_group(local, columns=columns, use_threads=False)


@dataclass(frozen=True)
class Layout:
    """Which encoded columns a stream reads: single-valued ids, jagged ids, dense floats."""

    ids: tuple[str, ...]
    lists: tuple[str, ...]
    dense: tuple[str, ...]


@dataclass(frozen=True)
class Block:
    """Encoded rows as numpy arrays, in a `Layout`'s column order.

    ids: (n, n_ids) int64, a row's ids side by side; lists: per jagged column (offsets (n + 1,)
    into values, values); dense: (n, n_dense) float32; labels: (n,) float32; rows: (n,) int64 positions in the part.
    """

    ids: np.ndarray
    lists: tuple[tuple[np.ndarray, np.ndarray], ...]
    dense: np.ndarray
    labels: np.ndarray
    rows: np.ndarray

    def __len__(self) -> int:
        return len(self.rows)

    @classmethod
    def from_table(cls, table: pa.Table, layout: Layout, first_row: int) -> Block:
        lists = []
        for name in layout.lists:
            column = table[name].combine_chunks()
            lists.append((column.offsets.to_numpy(), column.values.to_numpy()))
        n = table.num_rows
        return cls(
            np.stack([table[c].to_numpy() for c in layout.ids], axis=1) if layout.ids else np.zeros((n, 0), np.int64),
            tuple(lists),
            np.stack([table[c].to_numpy() for c in layout.dense], axis=1) if layout.dense
            else np.zeros((n, 0), np.float32),
            table["label"].to_numpy(),
            np.arange(first_row, first_row + n, dtype=np.int64),
        )

    def slice(self, lo: int, hi: int) -> Block:
        return Block(self.ids[lo:hi], tuple((o[lo:hi + 1], v) for o, v in self.lists), self.dense[lo:hi],
                     self.labels[lo:hi], self.rows[lo:hi])

    def take(self, index: np.ndarray) -> Block:
        return Block(self.ids[index], tuple(_take_jagged(o, v, index) for o, v in self.lists),
                     self.dense[index], self.labels[index], self.rows[index])

    @staticmethod
    def concat(blocks: list[Block]) -> Block:
        if len(blocks) == 1:
            return blocks[0]
        lists = tuple(_concat_jagged([b.lists[k] for b in blocks]) for k in range(len(blocks[0].lists)))
        return Block(np.concatenate([b.ids for b in blocks]), lists,
                     np.concatenate([b.dense for b in blocks]), np.concatenate([b.labels for b in blocks]),
                     np.concatenate([b.rows for b in blocks]))


def _take_jagged(offsets: np.ndarray, values: np.ndarray, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``index`` of a jagged column, as (offsets from 0, values)."""
    lengths = offsets[index + 1] - offsets[index]
    new = np.concatenate([[0], np.cumsum(lengths)])
    positions = np.repeat(offsets[index] - new[:-1], lengths) + np.arange(new[-1])
    return new, values[positions]


def _concat_jagged(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    values = [v[o[0]:o[-1]] for o, v in parts]
    lengths = [np.diff(o) for o, _ in parts]
    return np.concatenate([[0], np.cumsum(np.concatenate(lengths))]), np.concatenate(values)


@dataclass(frozen=True)
class StreamConfig:
    """How a part becomes an epoch of batches.

    ``batch_size`` is the global batch over ``units`` = ranks x max(workers, 1) micro-batches;
    ``shuffle`` draws the row-group order from (seed, epoch) and mixes the rows of each window of
    consecutive row groups holding ``buffer_rows`` rows; without it rows keep the part's order.
    ``even`` gives every unit as many rows, the last unit repeating the part's first rows, as a
    distributed sampler pads.
    """

    batch_size: int
    units: int = 1
    shuffle: bool = True
    seed: int = 0
    buffer_rows: int = 65_536  # a few row groups; a larger window gathers from far beyond the CPU caches
    even: bool = False

    def __post_init__(self) -> None:
        if self.units < 1 or self.batch_size < self.units or self.batch_size % self.units:
            raise ValueError(f"batch_size = {self.batch_size} must be a positive multiple of the "
                             f"{self.units} stream units (ranks x DataLoader workers)")
        if self.buffer_rows < 0:
            raise ValueError(f"buffer_rows must be >= 0, got {self.buffer_rows}")


def row_group_order(n_groups: int, config: StreamConfig, epoch: int) -> np.ndarray:
    """The epoch's row-group sequence: a permutation drawn from (seed, epoch), or 0..n-1."""
    if not config.shuffle:
        return np.arange(n_groups)
    return np.random.default_rng([config.seed, epoch]).permutation(n_groups)


def unit_ranges(n_rows: int, config: StreamConfig) -> list[tuple[int, int]]:
    """Contiguous [lo, hi) ranges of an epoch's rows, one per unit, sizes differing by at most 1;
    with ``even``, ceil(n_rows / units) rows each, positions past the end wrapping to the start."""
    units = config.units
    if n_rows < units:
        raise ValueError(f"a part of {n_rows} rows cannot feed {units} stream units")
    if config.even:
        size = -(-n_rows // units)
        return [(u * size, (u + 1) * size) for u in range(units)]
    bounds = [u * n_rows // units for u in range(units + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def micro_batch_sizes(unit_rows: int, n_rows: int, config: StreamConfig) -> list[int]:
    """A unit's micro-batch sizes: every unit gives as many, ceil(smallest unit's rows / micro);
    a unit with one more row puts it in its last micro-batch."""
    micro = config.batch_size // config.units
    smallest = min(hi - lo for lo, hi in unit_ranges(n_rows, config))
    steps = math.ceil(smallest / micro)
    return [micro] * (steps - 1) + [unit_rows - (steps - 1) * micro]


class UnitStream(IterableDataset):
    """The micro-batches (`Block` s) of the stream unit one process owns.

    In the main process it owns unit ``rank`` (no workers); in DataLoader worker w of
    ``workers`` it owns unit ``rank * workers + w``.
    """

    def __init__(self, part: EncodedPart, layout: Layout, config: StreamConfig, epoch: int,
                 rank: int, workers: int) -> None:
        self.part, self.layout, self.config, self.epoch = part, layout, config, epoch
        self.rank, self.workers = rank, workers

    def __iter__(self) -> Iterator[Block]:
        info = get_worker_info()
        unit = self.rank if info is None else self.rank * self.workers + info.id
        yield from unit_micro_batches(self.part, self.layout, self.config, self.epoch, unit)


def unit_micro_batches(part: EncodedPart, layout: Layout, config: StreamConfig, epoch: int,
                       unit: int) -> Iterator[Block]:
    """Unit ``unit``'s micro-batches of an epoch."""
    lo, hi = unit_ranges(part.num_rows, config)[unit]
    rng = np.random.default_rng([config.seed, epoch, unit])
    order = row_group_order(len(part.sizes), config, epoch)
    n_rows = part.num_rows
    blocks = _row_range(part, order, lo, min(hi, n_rows), layout)
    if hi > n_rows:  # an even split's padding: the first rows again
        blocks = itertools.chain(blocks, _row_range(part, order, 0, hi - n_rows, layout))
    if config.shuffle and config.buffer_rows:
        windows = _shuffled(blocks, config.buffer_rows, rng)
    else:
        windows = ((block, None) for block in blocks)
    yield from _rechunked(windows, micro_batch_sizes(hi - lo, n_rows, config))


def _row_range(part: EncodedPart, order: np.ndarray, lo: int, hi: int, layout: Layout) -> Iterator[Block]:
    """Rows [lo, hi) of the row groups taken in ``order``, one block per row group touched."""
    files: dict[int, pq.ParquetFile] = {}
    columns = [*layout.ids, *layout.lists, *layout.dense, "label"]
    end = np.cumsum(part.sizes[order])
    for g, stop in zip(order, end, strict=True):
        start = stop - part.sizes[g]
        if stop <= lo:
            continue
        if start >= hi:
            break
        first = max(lo - start, 0)
        block = Block.from_table(part.read_group(g, columns, files), layout, int(part.starts[g]))
        yield block.slice(first, min(hi, stop) - start)


def _shuffled(blocks: Iterable[Block], buffer_rows: int,
              rng: np.random.Generator) -> Iterator[tuple[Block, np.ndarray | None]]:
    """Windows of consecutive blocks holding at least ``buffer_rows`` rows (the last one fewer),
    each with a random order of its rows."""
    pool: list[Block] = []
    held = 0
    for block in blocks:
        pool.append(block)
        held += len(block)
        if held >= buffer_rows:
            yield Block.concat(pool), rng.permutation(held)
            pool, held = [], 0
    if held:
        yield Block.concat(pool), rng.permutation(held)


def _rechunked(windows: Iterable[tuple[Block, np.ndarray | None]], sizes: list[int]) -> Iterator[Block]:
    """The rows of ``windows`` (exactly sum(sizes) of them), each window's in its order (None:
    as they are), cut into blocks of ``sizes`` rows; each row is copied once, into its block."""
    wanted = iter(sizes)
    want, pending, held = next(wanted), [], 0
    for block, order in windows:
        start = 0
        while start < len(block):
            take = min(want - held, len(block) - start)
            end = start + take
            pending.append(block.slice(start, end) if order is None else block.take(order[start:end]))
            start, held = end, held + take
            if held == want:
                yield Block.concat(pending)
                pending, held = [], 0
                want = next(wanted, None)
                if want is None and start < len(block):
                    raise RuntimeError(f"{len(block) - start} rows beyond the planned micro-batches {sizes}")


def _identity(item):
    return item


class BatchStream:
    """One rank's epochs of a part: each batch a tuple of one `Batch` per feature group, then
    the rows' positions in the part (B,).

    ``epoch`` is called when an epoch starts (a Trainer's current epoch); with ``workers``
    DataLoader workers each reads one unit and a batch joins their micro-batches in worker order.
    """

    def __init__(self, part: EncodedPart, schema: Schema, groups: list[list[str]], config: StreamConfig,
                 epoch: Callable[[], int], rank: int = 0, workers: int = 0) -> None:
        if config.units % max(workers, 1):
            raise ValueError(f"{config.units} stream units do not split over {workers} workers")
        unknown = sorted({n for g in groups for n in g} - set(schema.names))
        if unknown:
            raise ValueError(f"features {unknown} are not in schema {schema.name!r}; it has {schema.names}")
        self.part, self.config, self.epoch = part, config, epoch
        self.rank, self.workers = rank, workers
        self.groups = [[f for f in schema.features if f.name in names] for names in groups]
        used = {f.name: f for g in self.groups for f in g}.values()
        self.layout = Layout(
            ids=tuple(f"id.{f.name}" for f in used if f.sparse and not _jagged(f)),
            lists=tuple(f"id.{f.name}" for f in used if _jagged(f)),
            dense=tuple(f"dense.{f.name}" for f in used if f.kind == "numerical"),
        )
        missing = sorted({*self.layout.ids, *self.layout.lists, *self.layout.dense} - set(part.columns))
        if missing:
            raise ValueError(f"{part.folder}: encoded part lacks columns {missing}; it has {part.columns}")

    def __len__(self) -> int:
        lo, hi = unit_ranges(self.part.num_rows, self.config)[0]
        return len(micro_batch_sizes(hi - lo, self.part.num_rows, self.config))

    def __iter__(self) -> Iterator[tuple]:
        units = UnitStream(self.part, self.layout, self.config, self.epoch(), self.rank, max(self.workers, 1))
        if self.workers:
            micro = DataLoader(units, batch_size=None, num_workers=self.workers, collate_fn=_identity)
        else:
            micro = units
        pending = []
        for block in micro:
            pending.append(block)
            if len(pending) == max(self.workers, 1):
                yield self.to_batches(Block.concat(pending))
                pending = []

    def to_batches(self, block: Block) -> tuple:
        """A block of encoded rows -> (one `Batch` per feature group, rows (B,))."""
        labels = torch.from_numpy(np.array(block.labels))
        return (*(self._batch(block, features, labels) for features in self.groups), torch.from_numpy(block.rows))

    def _batch(self, block: Block, features: list[FeatureSpec], labels: torch.Tensor) -> Batch:
        """The `Batch` of ``features`` (schema order) from a block."""
        n_rows = len(block)
        sparse_features = [f for f in features if f.sparse]
        ids = [self.layout.ids.index(f"id.{f.name}") for f in sparse_features if not _jagged(f)]
        if len(ids) == len(sparse_features):  # no jagged feature: one gather, key-major
            values = block.ids[:, ids].T.ravel()
            lengths = np.ones(len(ids) * n_rows, dtype=np.int32)
        else:
            values, lengths = self._jagged_values(block, sparse_features)
        sparse = KeyedJaggedTensor(
            keys=[f.name for f in sparse_features],
            values=torch.from_numpy(values),
            lengths=torch.from_numpy(lengths),
            stride=n_rows,
        )
        dense = [self.layout.dense.index(f"dense.{f.name}") for f in features if f.kind == "numerical"]
        return Batch(sparse, torch.from_numpy(block.dense[:, dense]), labels)  # dense (B, n_dense)

    def _jagged_values(self, block: Block, sparse_features: list[FeatureSpec]) -> tuple[np.ndarray, np.ndarray]:
        """Key-major values (N,) and lengths (F * B,) of features some of which are jagged."""
        n_rows = len(block)
        values = []
        lengths = np.ones(len(sparse_features) * n_rows, dtype=np.int32)
        for k, f in enumerate(sparse_features):
            name = f"id.{f.name}"
            if _jagged(f):
                offsets, flat = block.lists[self.layout.lists.index(name)]
                values.append(flat[offsets[0]:offsets[-1]])
                lengths[k * n_rows:(k + 1) * n_rows] = np.diff(offsets)
            else:
                values.append(block.ids[:, self.layout.ids.index(name)])
        return np.concatenate(values), lengths


def _jagged(f: FeatureSpec) -> bool:
    return f.kind in ("multi_hot", "sequence")
