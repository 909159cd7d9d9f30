"""The online store: user features, item features and candidate lists of one artefact version.

The offline refresh job calls `write_snapshot` to put parquet files into a version
directory. The request handler reads them through the `Store` interface, from one of two backends:

    EmbeddedStore   the snapshot loaded into this process (the default; no server)
    RedisStore      the snapshot in a Redis server shared by stateless request handlers,
                    copied there by `load_snapshot_into_redis`, removed by `delete_version`

Start reading at `Store`. In Redis every key carries its version (``recstack:v0007:item:42``),
so loading a new version never disturbs readers of the old one, and ``recstack:v0007:complete``
is written last: a version without it is refused. Every Redis failure surfaces as
`StoreUnavailable`, after at most the configured timeout.

A version in Redis is either full (a base: every key) or a delta over a base (``recstack:v0008:base``
names it): it holds only the users, items and lists whose value differs from the base's
snapshot, and an empty value (a tombstone) for each one the base has and it lacks; a read
takes the version's key where there is one and the base's otherwise. A delta reads through a
full version, never through another delta, so a lookup is at most two keys in one round trip
however many deltas follow a base. A base lists its deltas (``recstack:v0007:dependents``) and
`delete_version` refuses it while one of them is complete.
"""

from __future__ import annotations

import json
import operator
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from data.columns import FeatureColumns

ID_COLUMNS = {"users": "user_id", "items": "item_id"}
LISTS = "lists"  # the snapshot's folder of list groups
LIST_COLUMNS = ("list", "item_id", "score")
VERSION = re.compile(r"[A-Za-z0-9._-]+")
WRITE_BATCH = 5_000  # keys per MSET, UNLINK or SCAN step when loading or deleting a version
REBASE_SHARE = 0.2  # a delta writing more keys than this share of its users and items is loaded in full
TOMBSTONE = b""  # a delta's value for a key its base has and it lacks (no stored value is empty but a list's)


class StoreError(Exception):
    """The store cannot answer: the version is missing or incomplete, or the server failed."""


class StoreUnavailable(StoreError):
    """The Redis server refused, failed or did not answer within the timeout."""


@dataclass(frozen=True)
class ItemRows:
    """Features of N requested items; row i belongs to ``item_ids[i]``.

    ``item_ids`` (N,) int64 as requested, duplicates kept; ``found`` (N,) bool; ``columns``
    N rows, one column per item feature read. Rows where ``found`` is False hold missing values
    (NA, NaN or None).
    """

    item_ids: np.ndarray
    found: np.ndarray
    columns: FeatureColumns

    @property
    def features(self) -> pd.DataFrame:
        """``columns`` as a frame, index 0..N-1."""
        return self.columns.to_frame()


@dataclass(frozen=True)
class Snapshot:
    """A snapshot directory, as `write_snapshot` wrote it, and the version it belongs to."""

    version: str
    directory: Path


class Store(ABC):
    """One snapshot version, as the request handler reads it."""

    version: str

    @abstractmethod
    def user_features(self, user_id: int) -> dict | None:
        """The user's features by column name (``user_id`` left out), or None for an unknown user."""

    @abstractmethod
    def item_features(self, item_ids: np.ndarray) -> ItemRows:
        """(N,) integer item ids -> their features, aligned with the request."""

    def item_columns(self) -> list[str]:
        """The names of the item feature columns `item_features` returns."""
        return list(self.item_features(np.zeros(0, np.int64)).columns)

    @abstractmethod
    def get_list(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """A candidate list in rank order: read-only (L,) int64 item ids and (L,) float32 scores.

        An unknown list is empty (L = 0).
        """

    @abstractmethod
    def close(self) -> None:
        """Releases what the store holds; it is unusable afterwards."""


def write_snapshot(directory: Path, users: pd.DataFrame, items: pd.DataFrame,
                   lists: pd.DataFrame | Mapping[str, pd.DataFrame]) -> tuple[pa.Table, pa.Table]:
    """Writes ``users.parquet``, ``items.parquet`` and ``lists/<group>.parquet`` into an existing directory.

    ``users`` and ``items`` hold one row per ``user_id`` / ``item_id`` and at least one feature
    column of int, float, bool or str values, or lists of them; integers are stored as int64,
    and NaN as a missing value. ``lists`` is long: ``list`` (the name), ``item_id`` and
    ``score`` (stored as float32), in rank order within each list; other columns are not kept.
    A mapping of group names to such frames writes one file per group (a refresh keeps the
    file of a group it did not rebuild); a frame is the one group "all". A list name belongs to
    one group. Everything is checked before any file is written. Returns the users and items
    tables as reading the files gives them back (`load_snapshot_into_redis` takes them, so as not
    to read the files again).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"snapshot directory {directory} does not exist; the caller creates it")
    groups = {"all": lists} if isinstance(lists, pd.DataFrame) else lists
    tables = {
        "users": _feature_table(users, "users"),
        "items": _feature_table(items, "items"),
        **{f"{LISTS}/{group}": _list_table(frame) for group, frame in groups.items()},
    }
    (directory / LISTS).mkdir(exist_ok=True)
    for name, table in tables.items():
        pq.write_table(table, directory / f"{name}.parquet")
    # the files' schemas: parquet names a list's value field "element" where Arrow names it "item"
    users, items = (tables[name].cast(pq.read_schema(directory / f"{name}.parquet")) for name in ("users", "items"))
    return users, items


def read_lists(directory: Path) -> pa.Table:
    """Every list of the snapshot in ``directory``, long (``list`` dictionary-encoded), group after group."""
    return _read_groups(sorted((Path(directory) / LISTS).glob("*.parquet")))


def _read_groups(paths: list[Path]) -> pa.Table:
    """The list group files at ``paths``, one after the other, as one long table."""
    tables = [pq.read_table(path, read_dictionary=["list"]) for path in paths]
    if not tables:
        return pa.table({"list": pa.array([], pa.string()).dictionary_encode(), "item_id": pa.array([], pa.int64()),
                         "score": pa.array([], pa.float32())})
    return pa.concat_tables(tables)


class EmbeddedStore(Store):
    """A snapshot held in this process: ids sorted once, looked up with `np.searchsorted`."""

    def __init__(self, version: str, users: pa.Table, items: pa.Table, lists: pa.Table) -> None:
        self.version = _check_version(version)
        self._user_ids, self._users = _sort_by_id(users, "user_id")
        self._item_ids, self._items = _sort_by_id(items, "item_id")
        self._lists = _Lists(lists)

    @classmethod
    def open(cls, directory: Path, version: str) -> EmbeddedStore:
        """Loads the snapshot that `write_snapshot` wrote into ``directory``."""
        directory = Path(directory)
        users, items = (pq.read_table(directory / f"{name}.parquet") for name in ("users", "items"))
        return cls(version, users, items, read_lists(directory))

    def user_features(self, user_id: int) -> dict | None:
        user_id = operator.index(user_id)
        pos = int(self._user_ids.searchsorted(user_id))
        if pos == len(self._user_ids) or self._user_ids[pos] != user_id:
            return None
        return self._users.slice(pos, 1).to_pylist()[0]

    def item_features(self, item_ids: np.ndarray) -> ItemRows:
        ids = _check_ids(item_ids)
        pos = self._item_ids.searchsorted(ids)
        found = pos < len(self._item_ids)
        found[found] = self._item_ids[pos[found]] == ids[found]
        rows = self._items.take(pa.array(np.where(found, pos, 0), mask=~found))  # null index -> null row
        return ItemRows(ids, found, _to_columns(rows))

    def get_list(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        return self._lists.get(name)

    def close(self) -> None:
        """Nothing to release: the snapshot goes with the store object."""


class RedisStore(Store):
    """One complete version in a Redis server shared by request handlers; ``base``, the full
    version a delta reads through (None for a full version).

    Each call is one round trip that also checks the ``complete`` key of the version and its
    base, so a version deleted while in use raises `StoreError` instead of answering "unknown".
    Any Redis failure raises `StoreUnavailable` after at most ``timeout_s``, or twice that when
    the call must first connect to a host that drops packets; nothing is retried.
    """

    def __init__(self, host: str, port: int, version: str, timeout_s: float = 0.1) -> None:
        self.version = _check_version(version)
        self._where = f"{host}:{port}"
        self._client = connect(host, port, timeout_s)
        self._chain: tuple[str, ...] = (version,)  # where a key is looked up, this version first
        users, items, base = self._read("open", ("GET", _key(version, "schema", "user")),
                                        ("GET", _key(version, "schema", "item")), ("GET", _key(version, "base")))
        self.base = None if base is None else base.decode()
        if self.base is not None:
            self._chain = (version, self.base)
            self._read("open")  # the base is complete too
        self._user_schema = pa.ipc.read_schema(pa.py_buffer(users))
        self._item_schema = pa.ipc.read_schema(pa.py_buffer(items))

    def user_features(self, user_id: int) -> dict | None:
        value = self._lookup("user_features", "user", operator.index(user_id))
        return None if value is None else dict(zip(self._user_schema.names, json.loads(value), strict=True))

    def item_features(self, item_ids: np.ndarray) -> ItemRows:
        ids = _check_ids(item_ids)
        suffixes = [b"%d" % i for i in ids.tolist()]  # bytes keys: redis-py encodes str keys slowly
        commands = [("MGET", *[_key(version, "item", "").encode() + s for s in suffixes]) for version in self._chain]
        layers = self._read("item_features", *commands) if len(ids) else []
        values = [_first_found(found) for found in zip(*layers, strict=True)]
        missing = [None] * len(self._item_schema)
        decoded = json.loads(b"[" + b",".join(value or b"null" for value in values) + b"]")  # one call, not N
        rows = [missing if row is None else row for row in decoded]
        columns = list(zip(*rows, strict=True)) or [()] * len(self._item_schema)
        arrays = [pa.array(column, type=field.type) for column, field in zip(columns, self._item_schema, strict=True)]
        table = pa.Table.from_arrays(arrays, schema=self._item_schema)
        found = np.array([value is not None for value in values], dtype=bool)
        return ItemRows(ids, found, _to_columns(table))

    def get_list(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        value = self._lookup("get_list", "list", name)
        return _EMPTY_LIST if value is None else _unpack_list(value)

    def close(self) -> None:
        self._client.close()

    def _lookup(self, operation: str, *parts: object) -> bytes | None:
        """The value of one key of this version, else of its base; None when neither has it (or a tombstone)."""
        return _first_found(self._read(operation, *[("GET", _key(version, *parts)) for version in self._chain]))

    def _read(self, operation: str, *commands: tuple) -> list:
        """Runs the commands and the ``complete`` check of the version and its base in one
        MULTI/EXEC, so they see one state."""
        with _failures(self._where, operation, self.version):
            pipe = self._client.pipeline(transaction=True)
            pipe.exists(*[_key(version, "complete") for version in self._chain])
            for command in commands:
                pipe.execute_command(*command)
            complete, *results = pipe.execute()
        if complete < len(self._chain):
            raise _incomplete(self._where, self.version, self.base if len(self._chain) > 1 else None)
        return results


def redis_address(address: str) -> tuple[str, int]:
    """``"host:port"`` -> (host, port), as configs name a Redis server."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"redis address {address!r}; expected host:port, e.g. localhost:6379")
    return host, int(port)


def load_snapshot_into_redis(directory: Path, host: str, port: int, version: str, timeout_s: float = 5.0,
                             base: Snapshot | None = None,
                             tables: tuple[pa.Table, pa.Table] | None = None) -> str | None:
    """Copies the snapshot in ``directory`` into Redis as ``version``, marking it complete last;
    returns the version its reads fall back to (None: it was loaded in full).

    With ``base``, a full version complete in Redis and its snapshot, ``version`` is loaded as a
    delta over it: only the users, items and lists whose stored value would differ from the
    base's, and a tombstone for each one the base has and this snapshot lacks. It is loaded in
    full instead when its feature schemas differ from the base's, or when the delta would write
    more keys than `REBASE_SHARE` of its users and items (the version becomes a new base).
    Leftovers of an earlier load that never completed are removed first; a version that is
    already complete is refused (`delete_version` it to load it again). ``tables``, the users
    and items tables `write_snapshot` returned for ``directory``, spares reading them back.
    """
    version = _check_version(version)
    directory = Path(directory)
    users, items = tables or (pq.read_table(directory / f"{name}.parquet") for name in ("users", "items"))
    where = f"{host}:{port}"
    with connect(host, port, timeout_s) as client, _failures(where, "load_snapshot_into_redis", version):
        if client.exists(_key(version, "complete")):
            raise StoreError(f"version {version!r} is already complete in redis at {where}; delete_version it first")
        _remove(client, version)
        if base is not None:
            _check_base(client, where, base.version)
        writes = None if base is None else _delta_writes(version, directory, users, items, base)
        if writes is None:
            base = None
            names, packed = _packed_lists(read_lists(directory))
            writes = [*(_feature_values(version, kind, table) for kind, table in (("user", users), ("item", items))),
                      (pa.array([_key(version, "list", name) for name in names], pa.string()), packed)]
        client.set(_key(version, "begun"), 1)
        for keys, values in writes:
            _write(client, keys, values)
        for kind, table in (("user", users), ("item", items)):
            schema = table.drop_columns([f"{kind}_id"]).schema
            client.set(_key(version, "schema", kind), schema.serialize().to_pybytes())
        if base is not None:
            client.set(_key(version, "base"), base.version)
            client.sadd(_key(base.version, "dependents"), version)
        client.set(_key(version, "complete"), 1)
    return None if base is None else base.version


def restore_version(directory: Path, host: str, port: int, version: str, timeout_s: float = 5.0,
                    lock_s: int = 600) -> bool:
    """Loads the snapshot in ``directory`` into Redis in full as ``version`` when Redis does not
    hold it complete (it restarted empty, or lost the version); True when this call loaded it.

    Servers that find the version missing at once load it one at a time: the first takes a lock
    key outside the version's keys, which expires after ``lock_s`` seconds should its holder die;
    the others return False and find the version complete once it is loaded."""
    lock = f"recstack-restoring:{_check_version(version)}"
    with connect(host, port, timeout_s) as client, _failures(f"{host}:{port}", "restore_version", version):
        if not client.set(lock, os.getpid(), nx=True, ex=lock_s):
            return False
        try:
            if client.exists(_key(version, "complete")):
                return False
            load_snapshot_into_redis(directory, host, port, version, timeout_s)
            return True
        finally:
            client.delete(lock)


def redis_base(host: str, port: int, version: str, timeout_s: float = 5.0) -> str | None:
    """The full version that ``version`` reads through in Redis: itself when it was loaded in
    full, its base when it was loaded as a delta; None when it or its base is not complete there."""
    version = _check_version(version)
    with connect(host, port, timeout_s) as client, _failures(f"{host}:{port}", "redis_base", version):
        pipe = client.pipeline(transaction=True)
        complete, base = pipe.exists(_key(version, "complete")).get(_key(version, "base")).execute()
        base = version if base is None else base.decode()
        return base if complete and client.exists(_key(base, "complete")) else None


def delete_version(host: str, port: int, version: str, timeout_s: float = 5.0) -> None:
    """Removes every key of ``version`` from Redis; its ``complete`` key goes first, so readers stop at once.

    A base is refused while a complete delta reads through it: delete the deltas first.
    """
    version = _check_version(version)
    where = f"{host}:{port}"
    with connect(host, port, timeout_s) as client, _failures(where, "delete_version", version):
        dependents = sorted(d.decode() for d in client.smembers(_key(version, "dependents"))
                            if client.exists(_key(d.decode(), "complete")))
        if dependents:
            raise StoreError(f"version {version!r} is the base of {dependents} in redis at {where}; "
                             "delete those first")
        _remove(client, version)


def _feature_table(frame: pd.DataFrame, table: str) -> pa.Table:
    id_column = ID_COLUMNS[table]
    if id_column not in frame.columns:
        raise ValueError(f"{table}: missing id column {id_column!r}; it has {list(frame.columns)}")
    ids = frame[id_column]
    if ids.isna().any():
        raise ValueError(
            f"{table}: column {id_column!r} has null ids at rows {np.flatnonzero(ids.isna())[:5].tolist()}"
        )
    if not pd.api.types.is_integer_dtype(ids):
        raise ValueError(f"{table}: column {id_column!r} has dtype {ids.dtype}; expected integer ids")
    duplicates = ids[ids.duplicated()].unique()
    if len(duplicates):
        raise ValueError(f"{table}: column {id_column!r} has duplicate ids {duplicates[:5].tolist()}")
    if len(frame.columns) == 1:
        raise ValueError(f"{table}: no feature columns besides {id_column!r}; expected at least one")
    return pa.table({name: _feature_column(frame[name], table, name) for name in frame.columns})


def _feature_column(values: pd.Series, table: str, name: str) -> pa.Array:
    expected = "expected int, float, bool or str values, or lists of them"
    try:
        array = pa.array(values, from_pandas=True)
    except pa.ArrowException as e:
        raise ValueError(f"{table}: column {name!r} cannot be stored ({e}); {expected}") from e
    is_list = pa.types.is_list(array.type) or pa.types.is_large_list(array.type)
    value_type = array.type.value_type if is_list else array.type
    if pa.types.is_integer(value_type):
        value_type = pa.int64()
    elif pa.types.is_large_string(value_type):
        value_type = pa.string()
    elif not (pa.types.is_floating(value_type) or pa.types.is_boolean(value_type) or pa.types.is_string(value_type)):
        raise ValueError(f"{table}: column {name!r} has type {array.type}; {expected}")
    try:
        return array.cast(pa.list_(value_type) if is_list else value_type)
    except pa.ArrowException as e:  # an unsigned id past int64
        raise ValueError(f"{table}: column {name!r} does not fit {value_type} ({e})") from e


def _list_table(lists: pd.DataFrame) -> pa.Table:
    missing = [column for column in LIST_COLUMNS if column not in lists.columns]
    if missing:
        raise ValueError(f"lists: missing column {missing[0]!r}; it has {list(lists.columns)}")
    for column in LIST_COLUMNS:
        if lists[column].isna().any():
            rows = np.flatnonzero(lists[column].isna())[:5].tolist()
            raise ValueError(f"lists: column {column!r} has null values at rows {rows}")
    try:
        names = _list_names(lists["list"])
    except pa.ArrowException:
        raise ValueError(f"lists: column 'list' holds {pd.api.types.infer_dtype(lists['list'])}; "
                         "expected str names") from None
    if not pd.api.types.is_integer_dtype(lists["item_id"]):
        raise ValueError(f"lists: column 'item_id' has dtype {lists['item_id'].dtype}; expected integer ids")
    if not pd.api.types.is_numeric_dtype(lists["score"]):
        raise ValueError(f"lists: column 'score' has dtype {lists['score'].dtype}; expected numbers")
    table = pa.table(
        {
            "list": names,
            "item_id": pa.array(lists["item_id"].to_numpy(np.int64)),
            "score": pa.array(lists["score"].to_numpy(np.float32)),
        }
    )
    codes = names.indices.to_numpy()
    if (codes[1:] < codes[:-1]).any():  # interleaved: group each list's rows, keeping their order
        table = table.take(np.argsort(codes, kind="stable"))
    return table


def _list_names(values: pd.Series) -> pa.DictionaryArray:
    """The ``list`` column dictionary-encoded, names in the order they first appear. A
    categorical column whose lists come in its categories' order (as the refresh's pools build
    them) is encoded from its codes, without a string per row."""
    if isinstance(values.dtype, pd.CategoricalDtype):
        codes = values.cat.codes.to_numpy()
        if (codes[1:] >= codes[:-1]).all():
            used = np.bincount(codes, minlength=len(values.cat.categories)) > 0
            codes = codes if used.all() else (np.cumsum(used) - 1)[codes]
            return pa.DictionaryArray.from_arrays(codes.astype(np.int32, copy=False),
                                                  pa.array(values.cat.categories[used], pa.string()))
    return pa.array(values, pa.string()).dictionary_encode()


def _sort_by_id(table: pa.Table, id_column: str) -> tuple[np.ndarray, pa.Table]:
    """A feature table -> its (N,) sorted int64 ids and its feature columns in that order."""
    table = table.sort_by(id_column).combine_chunks()
    return table[id_column].to_numpy(), table.drop_columns([id_column])


def _list_runs(lists: pa.Table) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """The long list table -> (names (L,), bounds (L+1,), ids (R,), scores (R,)): list i is rows
    bounds[i]:bounds[i + 1] of ids and scores, in rank order."""
    ids, scores = lists["item_id"].to_numpy(), lists["score"].to_numpy()
    starts, labels, offset = [], [], 0
    for chunk in lists["list"].chunks:  # runs of one name, chunk by chunk: each chunk has its own dictionary
        chunk = chunk if pa.types.is_dictionary(chunk.type) else chunk.dictionary_encode()
        codes = chunk.indices.to_numpy(zero_copy_only=False)
        first = np.flatnonzero(np.diff(codes, prepend=-1))
        names = chunk.dictionary.take(pa.array(codes[first])).to_pylist()
        if labels and names and names[0] == labels[-1]:  # the previous chunk's last list goes on
            first, names = first[1:], names[1:]
        starts.append(offset + first)
        labels += names
        offset += len(chunk)
    starts = np.concatenate([np.zeros(0, np.int64), *starts])
    if len(set(labels)) != len(labels):  # a list in several runs: group its rows, keeping their order
        codes = pd.factorize(np.repeat(labels, np.diff(np.append(starts, len(ids)))))[0]
        order = np.argsort(codes, kind="stable")
        ids, scores, codes = ids[order], scores[order], codes[order]
        starts = np.flatnonzero(np.diff(codes, prepend=-1))
        labels = list(dict.fromkeys(labels))  # factorize numbers names in order of first appearance
    return labels, np.append(starts, len(ids)), ids, scores


class _Lists:
    """The long list table held as one ids and one scores array, with the names sorted (UTF-8
    bytes) and each list's bounds: no Python object per list, which a dict of per-list views
    would cost (about 350 bytes a list, 330 MiB per server process at 1M users)."""

    def __init__(self, lists: pa.Table) -> None:
        names, bounds, ids, scores = _list_runs(lists)
        encoded = np.array([name.encode() for name in names], dtype=np.bytes_)
        order = np.argsort(encoded, kind="stable")
        self._names, self._starts, self._ends = encoded[order], bounds[:-1][order], bounds[1:][order]
        self._ids, self._scores = _read_only(ids), _read_only(scores)

    def get(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(read-only int64 ids, float32 scores) of list ``name`` in rank order; empty when unknown."""
        key = name.encode()
        if len(key) > self._names.itemsize:  # no name is that long; numpy would widen every name to compare
            return _EMPTY_LIST
        pos = int(self._names.searchsorted(key))
        if pos == len(self._names) or self._names[pos] != key:
            return _EMPTY_LIST
        start, end = self._starts[pos], self._ends[pos]
        return self._ids[start:end], self._scores[start:end]


def _packed_lists(lists: pa.Table) -> tuple[list[str], pa.Array]:
    """The long list table -> (names (L,), (L,) binary), all at once: a list of n items packs as 8n
    little-endian int64 id bytes, then 4n float32 score bytes (`_unpack_list` reads it)."""
    names, bounds, ids, scores = _list_runs(lists)
    lengths = np.diff(bounds)
    first = np.repeat(bounds[:-1], lengths)  # (R,) the first row of each row's list
    rank = np.arange(len(ids)) - first
    words = np.empty(3 * len(ids), "<u4")  # a list's ids (2 words each), then its scores (1 word each)
    id_at = 3 * first + 2 * rank  # (R,) the word each row's id starts at
    id_words = ids.astype("<i8").view("<u4")  # (2R,) low and high word of each id
    words[id_at], words[id_at + 1] = id_words[0::2], id_words[1::2]
    words[3 * first + 2 * np.repeat(lengths, lengths) + rank] = scores.astype("<f4").view("<u4")
    offsets = pa.py_buffer((12 * bounds).astype(np.int64))
    return names, pa.Array.from_buffers(pa.large_binary(), len(names), [None, offsets, pa.py_buffer(words)])


def _to_columns(table: pa.Table) -> FeatureColumns:
    """Arrow rows -> arrays, column by column, with no frame (`pa.Table.to_pandas` costs ~0.3 ms per
    call on its own).

    Int and bool columns become nullable pandas arrays, so null rows do not turn them into floats.
    """
    columns = {}
    for name, column in zip(table.column_names, table.columns, strict=True):
        if pa.types.is_integer(column.type) or pa.types.is_boolean(column.type):
            is_bool = pa.types.is_boolean(column.type)
            values = column.fill_null(False if is_bool else 0) if column.null_count else column
            missing = column.is_null().to_numpy() if column.null_count else np.zeros(len(column), bool)
            array_type = pd.arrays.BooleanArray if is_bool else pd.arrays.IntegerArray
            columns[name] = array_type(values.to_numpy(), missing)
        else:
            columns[name] = column.to_numpy(zero_copy_only=False)  # null -> NaN for floats, None otherwise
    return FeatureColumns(columns, len(table))


def _read_only(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


_EMPTY_LIST = (_read_only(np.zeros(0, np.int64)), _read_only(np.zeros(0, np.float32)))


def _check_version(version: str) -> str:
    if not isinstance(version, str) or not VERSION.fullmatch(version):
        raise ValueError(f"version {version!r}: expected letters, digits, '.', '_' or '-' (it names Redis keys)")
    return version


def _check_ids(item_ids: np.ndarray) -> np.ndarray:
    ids = np.asarray(item_ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"item_ids of shape {ids.shape} and dtype {ids.dtype}: expected a 1-D integer array")
    return ids.astype(np.int64, copy=False)


def _key(version: str, *parts: object) -> str:
    return ":".join(["recstack", version, *map(str, parts)])


def _unpack_list(packed: bytes) -> tuple[np.ndarray, np.ndarray]:
    n = len(packed) // 12
    ids = np.frombuffer(packed, "<i8", n).astype(np.int64, copy=False)
    scores = np.frombuffer(packed, "<f4", n, offset=8 * n).astype(np.float32, copy=False)
    return ids, scores


def connect(host: str, port: int, timeout_s: float) -> redis.Redis:
    """A Redis client whose every call fails after ``timeout_s``, with no retries."""
    if not timeout_s > 0:
        raise ValueError(f"timeout_s={timeout_s!r}: expected a positive number of seconds")
    # no retries: each would add up to another timeout_s to what the caller waits
    retry = Retry(NoBackoff(), 0)
    return redis.Redis(host, port, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry=retry)


@contextmanager
def _failures(where: str, operation: str, version: str) -> Iterator[None]:
    """Turns any Redis error into `StoreUnavailable` naming the server and the operation."""
    try:
        yield
    except redis.RedisError as e:
        message = f"redis at {where} failed during {operation} (version {version!r}): {type(e).__name__}: {e}"
        raise StoreUnavailable(message) from e


def _incomplete(where: str, version: str, base: str | None = None) -> StoreError:
    if base is None:
        missing = f"version {version!r} is not complete in redis at {where} (no key {_key(version, 'complete')!r})"
    else:
        missing = (f"version {version!r} or its base {base!r} is not complete in redis at {where} "
                   f"(no key {_key(version, 'complete')!r} or {_key(base, 'complete')!r})")
    return StoreError(f"{missing}: load it with load_snapshot_into_redis, or it was deleted")


def _first_found(values: list[bytes | None]) -> bytes | None:
    """The first stored value of a key's lookups (the version's, then its base's); None when
    none is stored or the first is a tombstone."""
    return next((value for value in values if value is not None), TOMBSTONE) or None


def _check_base(client: redis.Redis, where: str, base: str) -> None:
    pipe = client.pipeline(transaction=True)
    complete, has_base = pipe.exists(_key(base, "complete")).exists(_key(base, "base")).execute()
    if not complete or has_base:
        state = "a delta itself" if complete else "not complete"
        raise StoreError(f"base {base!r} is {state} in redis at {where}; a delta reads through a complete full version")


def _remove(client: redis.Redis, version: str) -> None:
    """Deletes every key of ``version``, its ``complete`` key first and its ``begun`` key last, and
    takes it off its base's dependents.

    A load writes ``begun`` before any other key, so a version with neither key has none: the
    scan of the whole key space is skipped (most calls clear the leftovers of a load that never ran).
    """
    if not client.exists(_key(version, "begun"), _key(version, "complete")):
        return
    client.delete(_key(version, "complete"))
    base = client.get(_key(version, "base"))
    if base is not None:
        client.srem(_key(base.decode(), "dependents"), version)
    begun = _key(version, "begun").encode()
    keys = client.scan_iter(match=_key(version, "*"), count=WRITE_BATCH)
    while batch := list(islice(keys, WRITE_BATCH)):
        if doomed := [key for key in batch if key != begun]:
            client.unlink(*doomed)
    client.delete(begun)


def _delta_writes(version: str, directory: Path, users: pa.Table, items: pa.Table,
                  base: Snapshot) -> list[tuple[pa.Array, pa.Array]] | None:
    """The (keys, values) that load the snapshot in ``directory`` (its ``users`` and ``items``
    read) as a delta over ``base``; None when it must be loaded in full (`load_snapshot_into_redis`)."""
    theirs = {kind: pq.read_table(base.directory / f"{kind}s.parquet") for kind in ("user", "item")}
    if not (users.schema.equals(theirs["user"].schema) and items.schema.equals(theirs["item"].schema)):
        return None
    writes = [_changed_rows(version, "user", users, theirs["user"]),
              _changed_rows(version, "item", items, theirs["item"]),
              _changed_lists(version, directory, base.directory)]
    if sum(len(keys) for keys, _ in writes) > REBASE_SHARE * (len(users) + len(items)):
        return None
    return writes


def _changed_rows(version: str, kind: str, table: pa.Table, base: pa.Table) -> tuple[pa.Array, pa.Array]:
    """(keys, values) of the rows of ``table`` (users or items, as `write_snapshot` wrote them)
    whose stored value would differ from ``base``'s (a new id or a value not the same), then a
    tombstone for each id only ``base`` has."""
    id_column = f"{kind}_id"
    ids, base_ids = table[id_column].to_numpy(), base[id_column].to_numpy()
    shared = min(len(ids), len(base_ids))
    if np.array_equal(ids[:shared], base_ids[:shared]):  # the usual case: the base's ids in order, then new ones
        rows, found = np.arange(len(ids)), np.arange(len(ids)) < shared
        mine, theirs = table.slice(0, shared), base.slice(0, shared)
    else:
        rows, found = _positions(ids, base_ids)
        mine, theirs = table.filter(pa.array(found)), base.take(rows[found])
    same = found.copy()
    for name in table.column_names:
        same[found] &= _same_values(mine[name], theirs[name])
    gone = np.ones(len(base_ids), bool)
    gone[rows[found]] = False
    keys, values = _feature_values(version, kind, table.filter(pa.array(~same)))
    tombstones = base_ids[gone]
    return (pa.concat_arrays([_one_chunk(keys), _id_keys(version, kind, pa.array(tombstones))]),
            pa.concat_arrays([_one_chunk(values), pa.array([TOMBSTONE.decode()] * len(tombstones), pa.string())]))


def _positions(ids: np.ndarray, among: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N,) the row of each of ``ids`` in ``among`` (unique ids), and (N,) whether it is there at all."""
    if len(among) == 0:
        return np.zeros(len(ids), np.int64), np.zeros(len(ids), bool)
    order = np.argsort(among, kind="stable")
    rows = order[np.minimum(np.searchsorted(among[order], ids), len(among) - 1)]
    return rows, among[rows] == ids


def _same_values(a: pa.ChunkedArray, b: pa.ChunkedArray) -> np.ndarray:
    """(N,) bool: row i of two columns of one type would be stored alike (`_json_texts`): both
    missing, or equal values (floats bit for bit, as -0.0 and 0.0 are written apart)."""
    a, b = _one_chunk(a), _one_chunk(b)
    if pa.types.is_list(a.type):
        a, b = _json_texts(a), _json_texts(b)
    elif pa.types.is_floating(a.type):
        bits = pa.int64() if a.type.bit_width == 64 else pa.int32() if a.type.bit_width == 32 else pa.int16()
        a, b = (pa.Array.from_buffers(bits, len(x), x.buffers(), x.null_count, x.offset) for x in (a, b))
    equal = pc.fill_null(pc.equal(a, b), False)
    return pc.or_(equal, pc.and_(a.is_null(), b.is_null())).to_numpy(zero_copy_only=False)


def _changed_lists(version: str, directory: Path, base: Path) -> tuple[pa.Array, pa.Array]:
    """(keys, values) of the lists of the snapshot in ``directory`` whose packed value differs
    from the one in the snapshot in ``base``, then a tombstone for each list only ``base`` has.

    A group file hard-linked from the base's (a list kind the refresh carried over) is the
    same; the lists of the other groups are compared, with those of any linked group whose
    statistics say it may hold one of their names (a list can span groups)."""
    mine, theirs = ({path.name: path for path in (d / LISTS).glob("*.parquet")} for d in (directory, base))
    linked = {group for group in mine.keys() & theirs.keys() if os.path.samefile(mine[group], theirs[group])}
    compared, names = set(), np.array([], str)
    while changed := (mine.keys() | theirs.keys()) - linked - compared:
        compared |= changed
        for files in (mine, theirs):
            for group in changed & files.keys():
                for chunk in pq.read_table(files[group], columns=["list"], read_dictionary=["list"])["list"].chunks:
                    names = np.union1d(names, np.array(chunk.dictionary.to_pylist(), str))
        linked = {group for group in linked if not _may_hold(mine[group], names)}
    new_names, new_packed = _packed_lists(_read_groups([mine[g] for g in sorted(compared & mine.keys())]))
    old_names, old_packed = _packed_lists(_read_groups([theirs[g] for g in sorted(compared & theirs.keys())]))
    rows = pd.Index(old_names).get_indexer(new_names)  # (L,) -1 for a new list
    same = rows >= 0
    if same.any():
        same[same] = pc.equal(new_packed.filter(pa.array(same)), old_packed.take(rows[same])).to_numpy(
            zero_copy_only=False)
    kept = set(new_names)
    gone = [name for name in old_names if name not in kept]
    keys = [_key(version, "list", name) for name in np.array(new_names, object)[~same].tolist() + gone]
    tombstones = pa.array([TOMBSTONE] * len(gone), pa.large_binary())
    values = pa.concat_arrays([new_packed.filter(pa.array(~same)), tombstones])
    return pa.array(keys, pa.string()), values


def _may_hold(path: Path, names: np.ndarray) -> bool:
    """Whether the list group file at ``path`` may hold a list named in ``names`` (sorted), by
    each row group's min and max name."""
    metadata = pq.ParquetFile(path).metadata
    column = metadata.schema.to_arrow_schema().get_field_index("list")
    for group in range(metadata.num_row_groups):
        stats = metadata.row_group(group).column(column).statistics
        if stats is None or not stats.has_min_max:
            return True
        first = np.searchsorted(names, stats.min)
        if first < len(names) and names[first] <= stats.max:
            return True
    return False


def _id_keys(version: str, kind: str, ids: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    return pc.binary_join_element_wise(_key(version, kind, ""), pc.cast(ids, pa.string()), "")


def _feature_values(version: str, kind: str, table: pa.Table) -> tuple[pa.ChunkedArray, pa.ChunkedArray]:
    """(keys, values) of one key per row of a users or items table: its features as a JSON list
    in schema order, encoded a column at a time (floats in their shortest round-trip form: JSON
    round-trips them exactly)."""
    features = table.drop_columns([f"{kind}_id"])
    texts = [_json_texts(column) for column in features.columns]
    values = pc.binary_join_element_wise("[", pc.binary_join_element_wise(*texts, ","), "]", "")
    return _id_keys(version, kind, table[f"{kind}_id"]), values


def _json_texts(column: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """(N,) strings: each value of ``column`` as JSON text, "null" where missing."""
    kind = column.type
    if pa.types.is_string(kind):  # few distinct values (categories) in most columns: escape each once
        encoded = _one_chunk(column.dictionary_encode())
        texts = pa.array([json.dumps(v) for v in encoded.dictionary.to_pylist()], pa.string()).take(encoded.indices)
    elif pa.types.is_list(kind):  # the values' texts, joined within each list
        lists = _one_chunk(column)
        items = pa.ListArray.from_arrays(lists.offsets, _json_texts(lists.values), mask=lists.is_null())
        texts = pc.binary_join_element_wise("[", pc.binary_join(items, ","), "]", "")
    else:  # float32 as its exact float64 value, as Python reads it back (user_features does not re-type)
        texts = pc.cast(pc.cast(column, pa.float64()) if pa.types.is_floating(kind) else column, pa.string())
        if pa.types.is_floating(kind):  # Python's json reads NaN and Infinity, not Arrow's "nan" and "inf",
            infinite = pc.if_else(pc.greater(column, 0), "Infinity", "-Infinity")  # and "1" or "-0" as integers
            texts = pc.if_else(pc.is_nan(column), "NaN", pc.if_else(pc.is_inf(column), infinite, texts))
            integral = pc.match_substring_regex(texts, r"^-?\d+$")
            texts = pc.if_else(integral, pc.binary_join_element_wise(texts, ".0", ""), texts)
    return pc.fill_null(texts, "null")


def _one_chunk(array: pa.Array | pa.ChunkedArray) -> pa.Array:
    return array.combine_chunks() if isinstance(array, pa.ChunkedArray) else array


def _write(client: redis.Redis, keys: pa.Array | pa.ChunkedArray, values: pa.Array | pa.ChunkedArray) -> None:
    """SETs every key to its value (binary or string arrays), `WRITE_BATCH` pairs per MSET.

    The commands are packed here in the Redis protocol, a batch's pairs being one slice of an
    Arrow buffer: redis-py packs each argument in Python, which took longer than the encoding."""
    if len(keys) == 0:
        return
    parts = [b"$", pc.cast(pc.binary_length(keys), pa.string()), b"\r\n", keys, b"\r\n$",  # RESP bulk strings
             pc.cast(pc.binary_length(values), pa.string()), b"\r\n", values, b"\r\n"]
    binary = [pa.scalar(p, pa.large_binary()) if isinstance(p, bytes) else p.cast(pa.large_binary()) for p in parts]
    pairs = _one_chunk(pc.binary_join_element_wise(*binary, pa.scalar(b"", pa.large_binary())))  # 64-bit offsets
    offsets = np.frombuffer(pairs.buffers()[1], np.int64, len(pairs) + 1, pairs.offset * 8)
    data = pairs.buffers()[2]
    starts = range(0, len(pairs), WRITE_BATCH)
    connection = client.connection_pool.get_connection()
    try:
        for start in starts:  # all sent before any reply is read: Redis works while the next batch travels
            end = min(start + WRITE_BATCH, len(pairs))
            header = b"*%d\r\n$4\r\nMSET\r\n" % (2 * (end - start) + 1)
            connection.send_packed_command([header, data[offsets[start]:offsets[end]].to_pybytes()])
        for _ in starts:
            if isinstance(reply := connection.read_response(), Exception):
                raise reply
    except BaseException:
        connection.disconnect()  # a half-sent command leaves the connection unusable
        raise
    finally:
        client.connection_pool.release(connection)

