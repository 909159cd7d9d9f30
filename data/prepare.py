"""`recstack data prepare`: load a source, check it, split it, fit encoders, write the directory
with its encoded parts.

Every step streams the interaction log: chunks are checked and written as row groups, the split
ranks the written file in DuckDB, the parts are written from it a row group at a time, and the
encoders see the train part's distinct users and items. Only the users and items tables, one
code per row (int8) and the columns of interaction features are held whole.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow.parquet as pq

from data.dataset import Dataset, staging, write_extras, write_parts, write_tables
from data.encoders import FeatureEncoder
from data.schema import Schema
from data.splits import split_interactions
from data.tables import KEYS


def prepare(ds: Dataset, out: Path, split: str = "random", seed: int = 2020, overwrite: bool = False,
            positive_rating: float | None = None) -> Path:
    """Writes ``ds`` as a canonical dataset at ``out`` with a split and encoders fitted on train.

    With ``positive_rating`` the label becomes ``rating >= positive_rating`` (explicit ratings as
    a click-through task). Nothing is written unless every check passes; the write is atomic.
    """
    ds.check_entities()
    with staging(out, overwrite) as tmp:
        chunks = ds.checked_chunks()
        if positive_rating is not None:
            chunks = _rating_labels(chunks, positive_rating, ds.schema.name)
        write_tables(ds, tmp, chunks)
        write_parts(tmp, split_interactions(tmp / "interactions.parquet", split, seed))
        encoder = _fit_on_train(ds.schema, tmp / "split" / "train.parquet", ds.users, ds.items)
        ds.schema = replace(encoder.schema, split={"method": split, "seed": seed})
        ds.schema.save(tmp / "schema.json")
        encoder.save(tmp / "encoders.json")
        write_extras(ds, tmp)
    return Path(out)


def _fit_on_train(schema: Schema, train: Path, users: pd.DataFrame, items: pd.DataFrame) -> FeatureEncoder:
    """`FeatureEncoder.fit` on the train part's file: its distinct user and item ids come from
    DuckDB, and only the columns of interaction features are read."""
    columns = pq.read_schema(train).names
    context = [f.name for f in schema.features if f.table == "interactions" and f.name in columns]
    tables = {"interactions": pd.read_parquet(train, columns=context)}
    with duckdb.connect() as con:
        for name, table in (("users", users), ("items", items)):
            key = KEYS[name]
            ids = con.read_parquet(str(train)).select(key).distinct().fetchnumpy()[key]
            tables[name] = table[table[key].isin(ids)]
    return FeatureEncoder.fit_tables(schema, tables)


def _rating_labels(chunks: Iterator[pd.DataFrame], positive_rating: float, name: str) -> Iterator[pd.DataFrame]:
    for chunk in chunks:
        if "rating" not in chunk.columns:
            raise ValueError(f"positive_rating={positive_rating} needs a rating column; {name!r} has none")
        yield chunk.assign(label=(chunk["rating"] >= positive_rating).astype("float32"))
