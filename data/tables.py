"""Reading and checking input tables.

Every loader ends here: a table is read (CSV, TSV or parquet), its columns renamed to the
canonical names, and checked. A failed check raises `DataError` naming the file, the column
and the first offending rows, so a user can open the file and find them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

SHOWN_ROWS = 5


class DataError(ValueError):
    """An input table that cannot become a canonical dataset."""


@dataclass(frozen=True)
class Column:
    """A canonical column: ``dtype`` is one of id, int, time, float, bool, str, list."""

    name: str
    dtype: str
    required: bool = True


INTERACTIONS = (
    Column("user_id", "id"),
    Column("item_id", "id"),
    Column("timestamp", "time"),
    Column("label", "float"),
)
USERS = (Column("user_id", "id"),)
ITEMS = (
    Column("item_id", "id"),
    Column("category", "str"),
    Column("available", "bool"),
    Column("moderated", "bool"),
    Column("created_at", "time"),
)
KEYS = {"users": "user_id", "items": "item_id"}
UNREADABLE = (pd.errors.ParserError, pd.errors.EmptyDataError, pa.ArrowException, OSError, ValueError)


def read_table(path: Path, mapping: dict[str, str] | None = None, sep: str | None = None) -> pd.DataFrame:
    """Reads a CSV/TSV/parquet file and renames source columns to canonical ones.

    ``mapping`` maps canonical name -> column name in the file. The frame keeps the file's
    row order, so row numbers in errors count data rows of the file from 1.
    """
    path = _existing(path)
    try:
        if path.suffix == ".parquet":
            df = pd.read_parquet(path)
        else:
            df = pd.read_csv(path, sep=_delimiter(path, sep), skipinitialspace=True)
    except UNREADABLE as e:
        raise DataError(f"{path}: cannot be read as a table: {e}") from e
    if df.empty:
        raise DataError(f"{path}: empty file (a header but no rows)")
    if mapping:
        missing = [src for src in mapping.values() if src not in df.columns]
        if missing:
            raise DataError(
                f"{path}: missing column {missing[0]!r} named in the column mapping; "
                f"the file has columns {list(df.columns)}"
            )
        df = df.rename(columns={src: name for name, src in mapping.items()})
    return df


def parquet_batches(path: Path, rows: int, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
    """The record batches of a parquet file, ``rows`` rows at a time, in bounded memory."""
    # with pre_buffer on (the default), pyarrow 25 keeps every row group it has read until the end
    return pq.ParquetFile(path, pre_buffer=False).iter_batches(batch_size=rows, columns=columns)


def duckdb_connection(memory_limit_gb: float, temp_directory: Path,
                      threads: int | None = None) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection for out-of-core queries: it spills to ``temp_directory`` past
    ``memory_limit_gb``, runs on ``threads`` (one per CPU when None) and does not keep rows in
    insertion order (queries that need an order say ORDER BY)."""
    return duckdb.connect(config={"memory_limit": f"{memory_limit_gb}GB", "threads": threads or os.cpu_count() or 1,
                                  "temp_directory": str(temp_directory), "preserve_insertion_order": False})


def read_chunks(path: Path, rows: int, sep: str | None = None) -> Iterator[pd.DataFrame]:
    """`read_table` without a mapping, ``rows`` rows at a time: parquet by record batches, CSV and
    TSV by pandas' chunked reader (which infers column types chunk by chunk)."""
    path = _existing(path)
    read = 0
    try:
        if path.suffix == ".parquet":
            chunks = (batch.to_pandas() for batch in parquet_batches(path, rows))
        else:
            chunks = pd.read_csv(path, sep=_delimiter(path, sep), skipinitialspace=True, chunksize=rows)
        for chunk in chunks:
            if len(chunk):
                read += len(chunk)
                yield chunk
    except UNREADABLE as e:
        raise DataError(f"{path}: cannot be read as a table: {e}") from e
    if not read:
        raise DataError(f"{path}: empty file (a header but no rows)")


def _existing(path: Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file (0 bytes)")
    return path


def _delimiter(path: Path, sep: str | None) -> str:
    return sep or ("\t" if path.suffix in (".tsv", ".tab") else ",")


def check_table(df: pd.DataFrame, where: str, columns: tuple[Column, ...], key: str | None = None,
                first_row: int = 0) -> pd.DataFrame:
    """Checks and coerces ``columns`` of ``df``; ``where`` names the file in errors, where row
    numbers count from ``first_row`` (the rows of a file before a chunk ``df``).

    Returns a copy whose checked columns have their canonical dtypes: ids int64 or str,
    times int64 unix seconds, floats float32, bools bool.
    """
    if df.empty:
        raise DataError(f"{where}: empty table (no rows)")
    out = df.copy()
    for col in columns:
        if col.name not in out.columns:
            if col.required:
                raise DataError(f"{where}: missing column {col.name!r}; the table has columns {list(df.columns)}")
            continue
        values = out[col.name]
        nulls = _null_mask(values)
        if nulls.any():
            what = "null id" if col.dtype == "id" else "null value"
            raise DataError(f"{where}: column {col.name!r} has a {what} in {_rows(df, nulls, first_row)}")
        coerced, bad = _coerce(values, col.dtype)
        if bad.any():
            raise DataError(
                f"{where}: column {col.name!r} has the wrong dtype: expected {_EXPECTED[col.dtype]}, "
                f"found {values.dtype} with values that do not convert in {_rows(df, bad, first_row)}"
            )
        out[col.name] = coerced
    if key is not None:
        dup = out[key].duplicated(keep=False).to_numpy()
        if dup.any():
            raise DataError(f"{where}: column {key!r} has duplicate ids in {_rows(df, dup, first_row)}")
    return out


_EXPECTED = {
    "id": "integers or strings",
    "int": "integers",
    "time": "unix seconds or ISO-8601 datetimes",
    "float": "numbers",
    "bool": "booleans (true/false or 0/1)",
    "str": "strings",
    "list": "lists",
}


def _null_mask(values: pd.Series) -> np.ndarray:
    if values.dtype == object:
        # list cells are not null even when empty; pd.isna on them would test elements
        cells = (not isinstance(v, list | tuple | np.ndarray) and pd.isna(v) for v in values)
        return np.fromiter(cells, bool, len(values))
    return values.isna().to_numpy()


def _coerce(values: pd.Series, dtype: str) -> tuple[pd.Series, np.ndarray]:
    """Returns the converted column and a mask of the rows that did not convert."""
    none = np.zeros(len(values), dtype=bool)
    if dtype == "id":
        if pd.api.types.is_integer_dtype(values):
            return values.astype("int64"), none
        if pd.api.types.is_float_dtype(values):
            bad = (values != np.floor(values)).to_numpy()
            return values.astype("int64") if not bad.any() else values, bad
        if values.dtype == object or pd.api.types.is_string_dtype(values):
            bad = np.array([not isinstance(v, str | int | np.integer) for v in values], dtype=bool)
            return values.astype(str), bad
        return values, ~none
    if dtype in ("int", "float"):
        numeric = pd.to_numeric(values, errors="coerce")
        if pd.api.types.is_bool_dtype(numeric):
            numeric = numeric.astype("int64")  # True/False count as 1/0
        bad = numeric.isna().to_numpy()
        if dtype == "int":
            bad |= (numeric != np.floor(numeric)).to_numpy()
            return (numeric.astype("int64") if not bad.any() else values), bad
        return numeric.astype("float32"), bad
    if dtype == "time":
        if pd.api.types.is_datetime64_any_dtype(values):
            return _epoch_seconds(values), none
        seconds = pd.to_numeric(values, errors="coerce")
        text = seconds.isna()
        if text.any():
            parsed = pd.to_datetime(values[text].astype(str), errors="coerce", utc=True, format="ISO8601")
            seconds[text] = _epoch_seconds(parsed)
        bad = seconds.isna().to_numpy()
        return (seconds.astype("int64") if not bad.any() else values), bad
    if dtype == "bool":
        if pd.api.types.is_bool_dtype(values):
            return values, none
        words = values.astype(str).str.strip().str.lower()
        truth = words.map({"true": True, "1": True, "1.0": True, "false": False, "0": False, "0.0": False})
        bad = truth.isna().to_numpy()
        return (truth.astype(bool) if not bad.any() else values), bad
    if dtype == "str":
        return values.astype(str), none
    if dtype == "list":
        bad = np.array([not isinstance(v, list | tuple | np.ndarray) for v in values], dtype=bool)
        return values, bad
    raise ValueError(f"unknown column dtype {dtype!r}; expected one of {sorted(_EXPECTED)}")


def _epoch_seconds(values: pd.Series) -> pd.Series:
    if values.dt.tz is None:
        values = values.dt.tz_localize("UTC")
    return (values - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)


def _rows(df: pd.DataFrame, mask: np.ndarray, first_row: int) -> str:
    """'N rows; first offending rows (data rows counted from 1): ...' with the rows shown."""
    idx = np.flatnonzero(mask)
    shown = df.iloc[idx[:SHOWN_ROWS]].copy()
    shown.index = first_row + idx[:SHOWN_ROWS] + 1
    shown.index.name = "row"
    head = f"{len(idx)} row{'s' if len(idx) > 1 else ''}; first offending rows (data rows counted from 1):"
    return head + "\n" + shown.to_string(max_cols=8, max_colwidth=30)
