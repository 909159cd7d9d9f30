"""Train/valid/test splits of the interaction rows of a parquet file, each deterministic by seed.

Every method returns one code per row: 0 train, 1 valid, 2 test (see `data.dataset.PARTS`).
Ties in time are broken by a seeded random key (row i's key is the i-th draw of
``numpy.random.default_rng(seed).random``), then by row number, so the same seed gives the
same split. The file is read a row group at a time; the ranking runs in DuckDB, which spills
to disk past its memory limit, so a log of any length splits in bounded memory.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data.tables import duckdb_connection, parquet_batches

TRAIN, VALID, TEST = 0, 1, 2
METHODS = ("random", "temporal", "user-temporal", "leave-last")
MEMORY_LIMIT_GB = 2
BATCH_ROWS = 1 << 20


def split_interactions(path: Path, method: str, seed: int, **kwargs) -> np.ndarray:
    """Codes for the rows of the parquet file at ``path`` (user_id, timestamp) by one of `METHODS`.

    random          per user, a seeded random ``valid``/``test`` fraction (rounded down) of their
                    rows; the rest, at least one row per user, is train
    temporal        global time split: the oldest rows train, the newest ``test`` fraction (rounded)
                    test; every train row is no later than every valid row, and those no later
                    than every test row
    user-temporal   per user, in time order: the newest ``test`` fraction (rounded down) of their
                    rows test, the ``valid`` fraction before those valid, the rest (at least one
                    row) train; every user in valid or test has train history
    leave-last      per user, the last ``n`` rows test and the ``n`` before them valid; users with
                    at most ``2 * n`` rows stay wholly in train
    """
    if method not in METHODS:
        raise ValueError(f"split method {method!r} is not one of {METHODS}")
    n = pq.ParquetFile(path).metadata.num_rows
    sql, params = _leave_last(**kwargs) if method == "leave-last" else _fractions(method, n, **kwargs)
    codes = np.empty(n, dtype=np.int8)
    with tempfile.TemporaryDirectory(prefix="split-", dir=Path(path).parent) as tmp:
        keys = Path(tmp) / "keys.parquet"
        _write_keys(path, seed, keys)
        with duckdb_connection(MEMORY_LIMIT_GB, Path(tmp)) as con:
            con.read_parquet(str(keys)).create_view("keys")
            for batch in con.sql(sql, params=params).to_arrow_reader(BATCH_ROWS):
                codes[batch["row"].to_numpy()] = batch["code"].to_numpy()
    return codes


def _write_keys(path: Path, seed: int, keys: Path) -> None:
    """user_id, timestamp, the tie-breaking key and the row number of each row of ``path``."""
    rng = np.random.default_rng(seed)
    first = 0
    with pq.ParquetWriter(keys, pa.schema([pq.read_schema(path).field("user_id"), ("timestamp", pa.int64()),
                                           ("tiebreak", pa.float64()), ("row", pa.int64())])) as writer:
        for batch in parquet_batches(path, BATCH_ROWS, ["user_id", "timestamp"]):
            n = batch.num_rows
            writer.write_table(pa.table({
                "user_id": batch["user_id"],
                "timestamp": batch["timestamp"].cast(pa.int64()),
                "tiebreak": rng.random(n),
                "row": np.arange(first, first + n, dtype=np.int64),
            }), row_group_size=BATCH_ROWS)
            first += n


def _fractions(method: str, n: int, valid: float = 0.1, test: float = 0.1) -> tuple[str, dict]:
    """(SQL, parameters) for the fraction-based methods: rows ranked in an order, within each
    user or over all ``n`` rows, the first ``test`` fraction test and the next ``valid`` fraction valid."""
    if not (0 <= valid < 1 and 0 <= test < 1 and valid + test < 1):
        raise ValueError(f"valid={valid} and test={test} must be fractions in [0, 1) summing to below 1")
    if method == "temporal":  # rounded counts of the whole log, newest rows first
        window = "ORDER BY timestamp DESC, tiebreak DESC, row DESC"
        n_test, n_valid = int(round(n * test)), int(round(n * valid))
    else:  # per user, rounded down
        order = "tiebreak, row" if method == "random" else "timestamp DESC, tiebreak, row"
        window = f"PARTITION BY user_id ORDER BY {order}"
        n_test, n_valid = "floor(count(*) OVER users * $test)", "floor(count(*) OVER users * $valid)"
    sql = f"""
        SELECT row, CASE WHEN rank < n_test THEN {TEST} WHEN rank < n_test + n_valid THEN {VALID}
                         ELSE {TRAIN} END::TINYINT AS code
        FROM (SELECT row, row_number() OVER ({window}) - 1 AS rank, {n_test} AS n_test, {n_valid} AS n_valid
              FROM keys WINDOW users AS (PARTITION BY user_id))"""
    return sql, {} if method == "temporal" else {"valid": float(valid), "test": float(test)}


def _leave_last(n: int = 1) -> tuple[str, dict]:
    """(SQL, parameters) for leave-last: each user's rows ranked newest first."""
    if n < 1:
        raise ValueError(f"leave-last n must be >= 1, got {n}")
    sql = f"""
        SELECT row, CASE WHEN count <= 2 * $last THEN {TRAIN} WHEN rank < $last THEN {TEST}
                         WHEN rank < 2 * $last THEN {VALID} ELSE {TRAIN} END::TINYINT AS code
        FROM (SELECT row, row_number() OVER users - 1 AS rank, count(*) OVER (PARTITION BY user_id) AS count
              FROM keys WINDOW users AS (PARTITION BY user_id ORDER BY timestamp DESC, tiebreak DESC, row DESC))"""
    return sql, {"last": n}
