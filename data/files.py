"""A canonical dataset from the user's own CSV, TSV or parquet files.

A column mapping (canonical name -> source column) renames columns in every file that has
the source column; each mapped source column must be in at least one file. Then:

    interactions  user_id, item_id, timestamp required; a missing label is 1.0 (implicit)
    users         the file, or the distinct interaction user ids
    items         the file, or the distinct interaction item ids; columns it lacks get
                  category "unknown", available True, moderated False and created_at =
                  the item's first interaction (the last interaction time if it has none)

Every table is checked with `data.tables.check_table`, so a bad file raises `DataError`
naming the file, the column and the offending rows. Features are user_id, item_id,
category and every other users/items column: numbers are numerical with 8 buckets, list
cells multi_hot, anything else categorical, hashed when it has over 100,000 values.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from data.dataset import CHUNK_ROWS, Dataset
from data.schema import FeatureSpec, Schema
from data.tables import INTERACTIONS, ITEMS, USERS, DataError, check_table, read_chunks, read_table

HASHING_THRESHOLD = 100_000
HASH_BUCKETS = 1 << 20
BUCKETS = 8
ENTITY_COLUMNS = {c.name for c in (*USERS, *ITEMS)}  # not features, except the ids and category


class ColumnMapping(BaseModel):
    """Canonical column -> source column; unknown canonical names are rejected."""

    model_config = ConfigDict(extra="forbid")

    user_id: str | None = None
    item_id: str | None = None
    timestamp: str | None = None
    label: str | None = None
    rating: str | None = None
    weight: str | None = None
    category: str | None = None
    available: str | None = None
    moderated: str | None = None
    created_at: str | None = None


def load_files(
    interactions: Path,
    users: Path | None = None,
    items: Path | None = None,
    mapping: dict[str, str] | None = None,
    name: str = "files",
) -> Dataset:
    """Reads, renames and checks the files; see the module doc for defaults and features.

    The interactions file is read ``CHUNK_ROWS`` rows at a time: once here, to check it and
    find its users and each item's first time, and again whenever the Dataset's log is read.
    """
    paths = {"interactions": interactions, "users": users, "items": items}
    paths = {table: Path(path) for table, path in paths.items() if path is not None}
    mapping = validate_mapping(mapping or {}, "load_files")
    header = next(read_chunks(paths["interactions"], 1))  # the log's first row, for its columns
    frames = {table: read_table(path) for table, path in paths.items() if table != "interactions"}
    frames = rename_columns({"interactions": header, **frames}, paths, mapping)
    renames = {src: canonical for canonical, src in mapping.items() if src in header.columns}

    def log() -> Iterator[pd.DataFrame]:
        first_row = 0
        for chunk in read_chunks(paths["interactions"], CHUNK_ROWS):
            chunk = chunk.rename(columns=renames)
            if "label" not in chunk.columns:
                chunk["label"] = np.float32(1.0)
            yield check_table(chunk, str(paths["interactions"]), INTERACTIONS, first_row=first_row)
            first_row += len(chunk)

    user_ids, first_seen, last_time = _scan(log())
    user_table = frames.get("users", pd.DataFrame({"user_id": user_ids}))
    item_table = frames.get("items", pd.DataFrame({"item_id": first_seen.index}))
    user_table = check_table(user_table, origin(paths, "users"), USERS, key="user_id")
    item_table = add_item_defaults(item_table, first_seen, last_time)
    item_table = check_table(item_table, origin(paths, "items"), ITEMS, key="item_id")

    source = {"loader": "files", **{t: str(p) for t, p in paths.items()}, "mapping": mapping}
    schema = Schema(name, describe_features(user_table, item_table), source=source)
    return Dataset(log, user_table, item_table, schema)


def _scan(log: Iterator[pd.DataFrame]) -> tuple[np.ndarray, pd.Series, int]:
    """The distinct user ids in order of appearance, each item's first time, the last time."""
    users, first_seen, last_times = [], [], []
    for chunk in log:
        users.append(chunk["user_id"].unique())
        first_seen = [pd.concat([*first_seen, chunk.groupby("item_id")["timestamp"].min()]).groupby(level=0).min()]
        last_times.append(chunk["timestamp"].max())
    return pd.unique(np.concatenate(users)), first_seen[0], max(last_times)


def rename_columns(
    frames: dict[str, pd.DataFrame], paths: dict[str, Path], mapping: dict[str, str]
) -> dict[str, pd.DataFrame]:
    """Applies ``mapping`` to every frame holding a source column."""
    unused = {n: src for n, src in mapping.items() if not any(src in df for df in frames.values())}
    if unused:
        found = {str(paths[table]): list(df.columns) for table, df in frames.items()}
        raise DataError(
            f"{', '.join(found)}: missing column {', '.join(map(repr, unused.values()))} "
            f"(mapped to {', '.join(map(repr, unused))}); the files have {found}"
        )
    renamed = {}
    for table, df in frames.items():
        names = {src: name for name, src in mapping.items() if src in df.columns}
        clash = [name for src, name in names.items() if name != src and name in df.columns]
        if clash:
            raise DataError(
                f"{paths[table]}: the column mapping renames a column to {clash[0]!r}, "
                "which the file already has"
            )
        renamed[table] = df.rename(columns=names)
    return renamed


def origin(paths: dict[str, Path], table: str) -> str:
    """The file a table came from, for error messages."""
    return str(paths[table]) if table in paths else f"{table} (built from the interaction ids)"


def add_item_defaults(items: pd.DataFrame, first_seen: pd.Series, last_time: int) -> pd.DataFrame:
    """Fills the canonical item columns that ``items`` lacks."""
    out = items.copy()
    for column, value in (("category", "unknown"), ("available", True), ("moderated", False)):
        if column not in out.columns:
            out[column] = value
    if "created_at" not in out.columns:
        out["created_at"] = out["item_id"].map(first_seen).fillna(last_time).astype("int64")
    return out


def describe_features(users: pd.DataFrame, items: pd.DataFrame) -> tuple[FeatureSpec, ...]:
    """The ids and category, then one feature per other users/items column."""
    features = [
        FeatureSpec("user_id", "users", "categorical"),
        FeatureSpec("item_id", "items", "categorical"),
        FeatureSpec("category", "items", "categorical"),
    ]
    for table, df in (("users", users), ("items", items)):
        features += [describe_column(df[c], table) for c in df.columns if c not in ENTITY_COLUMNS]
    return tuple(features)


def describe_column(values: pd.Series, table: str) -> FeatureSpec:
    """numerical (numbers), multi_hot (list cells) or categorical (hashed past 100,000 values)."""
    name = str(values.name)
    if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
        return FeatureSpec(name, table, "numerical", buckets=BUCKETS)
    first = values.dropna().iloc[0] if values.notna().any() else None
    if isinstance(first, list | tuple | np.ndarray):
        return FeatureSpec(name, table, "multi_hot")
    hashed = values.nunique() > HASHING_THRESHOLD
    return FeatureSpec(name, table, "categorical", hash_buckets=HASH_BUCKETS if hashed else None)


def parse_mapping(pairs: list[str]) -> dict[str, str]:
    """CLI ``--map`` items like ``user_id=uid`` -> {"user_id": "uid"}."""
    mapping = {}
    for pair in pairs:
        name, sep, source = (part.strip() for part in pair.partition("="))
        if not sep or not name or not source:
            raise ValueError(f"--map {pair!r}: expected CANONICAL=SOURCE, e.g. user_id=uid")
        if name in mapping:
            raise ValueError(f"--map {pair!r}: {name!r} is already mapped to {mapping[name]!r}")
        mapping[name] = source
    return validate_mapping(mapping, "--map")


def load_mapping_file(path: Path) -> dict[str, str]:
    """A YAML file of ``canonical: source`` lines -> the mapping."""
    data = yaml.safe_load(Path(path).read_text())
    if not isinstance(data, dict):
        raise ValueError(
            f"{path}: expected a YAML mapping of canonical: source column, got {type(data).__name__}"
        )
    return validate_mapping(data, str(path))


def validate_mapping(data: dict, where: str) -> dict[str, str]:
    """Rejects keys that are not canonical columns and values that are not strings."""
    try:
        return ColumnMapping.model_validate(data).model_dump(exclude_none=True)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise ValueError(
            f"{where}: bad column mapping: {problems}; "
            f"keys must be among {list(ColumnMapping.model_fields)}"
        ) from e
