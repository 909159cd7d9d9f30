"""The canonical dataset directory that everything downstream reads.

    DIR/
      interactions.parquet   user_id, item_id, timestamp, label, [rating, weight, context...]
      users.parquet          user_id + features
      items.parquet          item_id, category, available, moderated, created_at + features
      schema.json            feature kinds, vocabulary sizes or hashing, embedding dims
      split/{train,valid,test}.parquet   the interaction rows of each part
      encoders.json, encoded/            with a split and fitted encoders: the encoders and each part
                                         encoded for training (see `data.encoded`)
      [extra files a source adds, e.g. ground_truth.npz for synthetic data]

A directory is written into a temporary sibling and renamed into place at the end, so a
failure at any point leaves no directory (or the previous one) behind. The interactions and the
split parts are written a row group at a time, from a log that may arrive in chunks.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from data.schema import Schema
from data.tables import INTERACTIONS, ITEMS, KEYS, USERS, DataError, check_table, parquet_batches

PARTS = ("train", "valid", "test")
CHUNK_ROWS = 1 << 20  # interaction rows read, checked and written at a time; one parquet row group each


@dataclass
class Dataset:
    """Canonical tables; ``split`` holds 0/1/2 (train/valid/test) per interaction row.

    ``log`` is the interactions table, or, for a source too big to hold, a function that yields
    it chunk by chunk (from the first row at every call). `prepare` streams such a log; the
    ``interactions`` property reads it whole.
    """

    log: pd.DataFrame | Callable[[], Iterator[pd.DataFrame]]
    users: pd.DataFrame
    items: pd.DataFrame
    schema: Schema
    split: np.ndarray | None = None
    extras: dict[str, Callable[[Path], None]] = field(default_factory=dict)

    @property
    def interactions(self) -> pd.DataFrame:
        if not isinstance(self.log, pd.DataFrame):
            self.log = pd.concat(list(self.log()), ignore_index=True)
        return self.log

    def interaction_chunks(self) -> Iterator[pd.DataFrame]:
        """The interactions, ``CHUNK_ROWS`` rows at a time (a chunked log's own chunks)."""
        if isinstance(self.log, pd.DataFrame):
            for lo in range(0, len(self.log), CHUNK_ROWS):
                yield self.log.iloc[lo:lo + CHUNK_ROWS]
        else:
            yield from self.log()

    def part(self, name: str) -> pd.DataFrame:
        if self.split is None:
            raise ValueError(f"dataset {self.schema.name!r} has no split")
        return self.interactions[self.split == PARTS.index(name)]

    def check(self) -> Dataset:
        """Checks the canonical columns of all three tables and that ids resolve."""
        self.check_entities()
        self.log = self._check_log(self.interactions, 0)
        if self.split is not None and len(self.split) != len(self.log):
            raise ValueError(f"split has {len(self.split)} codes for {len(self.log)} interactions")
        return self

    def check_entities(self) -> Dataset:
        """Checks the users and items tables: their canonical columns and unique ids."""
        name = self.schema.name
        self.users = check_table(self.users, f"{name}: users", USERS, key=KEYS["users"])
        self.items = check_table(self.items, f"{name}: items", ITEMS, key=KEYS["items"])
        return self

    def checked_chunks(self) -> Iterator[pd.DataFrame]:
        """`interaction_chunks`, each checked as `check` does (after `check_entities`); rows in
        errors count from the log's first row."""
        first_row = 0
        for chunk in self.interaction_chunks():
            yield self._check_log(chunk, first_row)
            first_row += len(chunk)

    def _check_log(self, log: pd.DataFrame, first_row: int) -> pd.DataFrame:
        name = self.schema.name
        log = check_table(log, f"{name}: interactions", INTERACTIONS, first_row=first_row)
        for key, table in (("user_id", self.users), ("item_id", self.items)):
            unknown = ~log[key].isin(table[key]).to_numpy()
            if unknown.any():
                first = log[key].to_numpy()[unknown][:5].tolist()
                raise DataError(
                    f"{name}: interactions: {int(unknown.sum())} rows have a {key} missing from the "
                    f"{key.split('_')[0]}s table, e.g. {first}"
                )
        return log


def write_dataset(ds: Dataset, out: Path, overwrite: bool = False) -> Path:
    """Writes ``ds`` to ``out`` atomically and returns ``out``."""
    with staging(out, overwrite) as tmp:
        write_tables(ds, tmp, ds.interaction_chunks())
        ds.schema.save(tmp / "schema.json")
        if ds.split is not None:
            write_parts(tmp, ds.split)
        write_extras(ds, tmp)
    return Path(out)


@contextmanager
def staging(out: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary sibling of ``out`` to write a dataset into; renamed to ``out`` when the block
    ends, removed when it raises."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=True (--overwrite) to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_tables(ds: Dataset, directory: Path, interactions: Iterable[pd.DataFrame]) -> None:
    """Writes the users and items tables and the ``interactions`` chunks, one row group each."""
    ds.users.to_parquet(directory / "users.parquet", index=False)
    ds.items.to_parquet(directory / "items.parquet", index=False)
    writer = None
    try:
        for chunk in interactions:
            table = pa.Table.from_pandas(chunk, preserve_index=False)
            if writer is None:
                writer = pq.ParquetWriter(directory / "interactions.parquet", table.schema)
            elif not table.schema.equals(writer.schema):
                table = _cast(table, writer.schema, ds.schema.name)
            writer.write_table(table, row_group_size=CHUNK_ROWS)
    finally:
        if writer is not None:
            writer.close()
    if writer is None:
        raise DataError(f"{ds.schema.name}: interactions: empty table (no rows)")


def _cast(table: pa.Table, schema: pa.Schema, name: str) -> pa.Table:
    """A later chunk in the first chunk's column types (pandas infers them chunk by chunk)."""
    if table.schema.names != schema.names:
        raise DataError(f"{name}: interactions: a chunk has columns {table.schema.names}, the first {schema.names}")
    try:
        return table.cast(schema)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise DataError(f"{name}: interactions: a chunk's column types do not match the first chunk's: {e}") from e


def write_parts(directory: Path, codes: np.ndarray) -> None:
    """Writes ``split/{train,valid,test}.parquet`` from ``directory/interactions.parquet`` and one
    code per row, streaming."""
    file = pq.ParquetFile(directory / "interactions.parquet")
    if len(codes) != file.metadata.num_rows:
        raise ValueError(f"split has {len(codes)} codes for {file.metadata.num_rows} interactions")
    (directory / "split").mkdir()
    writers = [pq.ParquetWriter(directory / "split" / f"{part}.parquet", file.schema_arrow) for part in PARTS]
    try:
        lo = 0
        for batch in parquet_batches(directory / "interactions.parquet", CHUNK_ROWS):
            chunk = codes[lo:lo + batch.num_rows]
            for code, writer in enumerate(writers):
                rows = batch.filter(pa.array(chunk == code))
                if rows.num_rows:
                    writer.write_table(pa.Table.from_batches([rows]), row_group_size=CHUNK_ROWS)
            lo += batch.num_rows
    finally:
        for writer in writers:
            writer.close()


def write_extras(ds: Dataset, directory: Path) -> None:
    """The source's extra files, then, for a split dataset with encoders, its encoded parts."""
    for write in ds.extras.values():
        write(directory)
    if (directory / "split").is_dir() and (directory / "encoders.json").is_file():
        from data.encoded import ENCODED, write_encoded  # it reads datasets: imported here, not at the top

        write_encoded(directory, directory / ENCODED)


def _replace_dir(new: Path, out: Path) -> None:
    """Renames ``new`` to ``out``; an existing ``out`` is moved aside first and removed after."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.rename(out, old)
    try:
        os.rename(new, out)
    except BaseException:
        if old is not None:
            os.rename(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_dataset(path: Path, tables: tuple[str, ...] = ("interactions", "users", "items")) -> Dataset:
    """Reads the named tables of a canonical dataset directory; split parts come from `read_part`."""
    path = Path(path)
    if not (path / "schema.json").is_file():
        raise DataError(f"{path}: not a recstack dataset (no schema.json)")
    frames = {t: pd.read_parquet(path / f"{t}.parquet") if t in tables else pd.DataFrame() for t in
              ("interactions", "users", "items")}
    return Dataset(frames["interactions"], frames["users"], frames["items"], Schema.load(path / "schema.json"))


def read_part(path: Path, part: str) -> pd.DataFrame:
    """The interaction rows of one split part (train, valid or test)."""
    if part not in PARTS:
        raise ValueError(f"split part {part!r} is not one of {PARTS}")
    file = Path(path) / "split" / f"{part}.parquet"
    if not file.is_file():
        raise DataError(f"{path}: no split part {part!r} ({file} is missing)")
    return pd.read_parquet(file)
