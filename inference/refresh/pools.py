"""Candidate pools that the refresh job builds offline and writes into the store.

Every builder returns a pool: one long frame with columns ``list`` (str), ``item_id``
(int64) and ``score`` (float32), each list's rows in rank order (best first). The lists:

    popular        time-decayed interaction counts             build_popular
    trending       recent rate over baseline rate, smoothed    build_trending
    new            items first seen lately, newest first       build_new_items
    editorial      a hand-made CSV list                        read_editorial
    similar:{id}   item-to-item from embeddings                build_similar_items
                   or, without embeddings, from co-occurrence  build_cooccurrence_similar
    user:{id}      per-user retrieval minus seen items         build_user_lists

The interactions stay on disk: `Events` (`open_events` for a dataset directory) is a DuckDB
view over the parquet file, and the lists built from it are SQL queries that DuckDB runs out
of core, spilling to disk past its memory limit (`DuckDBOptions`). Only per-item and per-user
results come back to Python, and user lists stream each batch of users' seen items. The refresh
reads the rest of what it needs from interactions here too (`read_last_time`, `read_latest_items`),
so it never loads the interaction table.

The builders count every interaction row they are given, so the job decides what counts
(e.g. positive labels only: `Events`' ``label``; rows up to a time: `Events.until`). Builders
that take ``now`` also ignore rows after it. Every builder takes ``eligible``, the item
ids that passed the static rules (`inference.refresh.rules.apply_rules`), or None for every
item; ineligible items are dropped before the top k is taken, so a list stays full while
enough eligible items exist.

Lists rank by the score in float64, then the smaller item id first. Scores are computed in
DOUBLE in the order their formulas are written; popular's sum is exact (see `build_popular`),
so it does not depend on the order DuckDB's threads add the rows in, and items with the same
rows tie exactly.

A ``search`` is the index's search (`inference.index.ItemIndex.search`):
``search(queries (B, D) float32, k) -> (ids (B, k') int64, scores (B, k'))``, best first,
``k' <= k``. Fewer than k results for a row (``k' < k``, or ids of -1 padding the row, as
raw FAISS does) mean the index has no more for it.
"""

from __future__ import annotations

import csv
import math
import shutil
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa

from data.schema import Schema
from data.tables import duckdb_connection
from inference.scratch import scratch_dir

Search = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]

POOL_COLUMNS = ("list", "item_id", "score")
MAX_HISTORY = 100  # most recent distinct items per user in co-occurrence counts
STREAM_ROWS = 1 << 20  # rows per record batch when user lists stream their seen items from DuckDB
BATCH_RESULTS = 1 << 21  # results a batch of user lists searches for at once: ~25 MB of ids, a few times that to filter


@dataclass(frozen=True)
class DuckDBOptions:
    """How the pool queries may use the machine: DuckDB spills to a temporary directory under
    ``temp_directory`` (the system's when None) past ``memory_limit_gb``, and runs on ``threads``
    (``os.cpu_count()`` when None)."""

    memory_limit_gb: float = 4.0
    threads: int | None = None
    temp_directory: Path | None = None

    def __post_init__(self) -> None:
        _check_positive("memory_limit_gb", self.memory_limit_gb)
        if self.threads is not None:
            _check_count("threads", self.threads)


class Events:
    """The interaction rows the pools count: one parquet file that DuckDB reads, never loaded whole.

    The file has integer ``user_id`` and ``item_id`` and a numeric ``timestamp`` (seconds); when
    ``label`` names one of its columns, only rows with ``label > 0`` count. Queries see the view
    ``events(user_id, item_id, timestamp DOUBLE, row)``, ``row`` being the row's place in the file.
    Close it (or use it in a ``with`` block) to remove DuckDB's spill directory; one left open is
    removed when it is garbage collected or the interpreter exits. A killed process leaves it: the
    next `Events` made on the machine removes it (`inference.scratch`).
    """

    def __init__(self, path: Path, label: str | None = None, options: DuckDBOptions | None = None) -> None:
        path, options = Path(path), options or DuckDBOptions()
        if not path.is_file():
            raise ValueError(f"{path}: no such interactions file")
        self.spill = scratch_dir("recstack-duckdb-", options.temp_directory)
        try:
            self.con = duckdb_connection(options.memory_limit_gb, self.spill, options.threads)
        except BaseException:
            shutil.rmtree(self.spill, ignore_errors=True)
            raise
        self._finalizer = weakref.finalize(self, _close, self.con, self.spill)
        try:
            source = f"read_parquet('{_quote(path)}', file_row_number = true)"
            types = dict(self.con.execute(f"SELECT column_name, column_type FROM (DESCRIBE SELECT * FROM {source})")
                         .fetchall())
            for column, kinds in (("user_id", _INTEGER), ("item_id", _INTEGER), ("timestamp", _NUMERIC)):
                if column not in types:
                    raise ValueError(f"{path}: interactions are missing column {column!r}; they have "
                                     f"{[c for c in types if c != 'file_row_number']}")
                if types[column] not in kinds:
                    raise ValueError(f"{path}: interactions column {column!r} has type {types[column]}; "
                                     f"expected one of {sorted(kinds)}")
            positive = f'WHERE "{label}" > 0' if label is not None and label in types else ""
            self.con.execute(f"CREATE VIEW all_events AS SELECT user_id, item_id, timestamp::DOUBLE AS timestamp, "
                             f"file_row_number AS row FROM {source} {positive}")
            self.con.execute("CREATE VIEW events AS SELECT * FROM all_events")
        except BaseException:
            self.close()
            raise

    def until(self, now: int) -> None:
        """From here on every query sees only the rows at or before ``now``: a refresh as of a past
        time (its seen items, latest items and last time too) sees what it would have seen then."""
        self.con.execute(f"CREATE OR REPLACE VIEW events AS SELECT * FROM all_events WHERE timestamp <= {int(now)}")

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> Events:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def _close(con: duckdb.DuckDBPyConnection, spill: Path) -> None:
    con.close()
    shutil.rmtree(spill, ignore_errors=True)


def open_events(data_dir: Path, options: DuckDBOptions | None = None) -> Events:
    """The positive interactions of a canonical dataset directory (see `data.dataset`)."""
    data_dir = Path(data_dir)
    if not (data_dir / "schema.json").is_file():
        raise ValueError(f"{data_dir}: not a recstack dataset (no schema.json)")
    return Events(data_dir / "interactions.parquet", Schema.load(data_dir / "schema.json").label, options)


def build_popular(events: Events, now: int, half_life_s: float, k: int,
                  eligible: np.ndarray | None = None) -> pd.DataFrame:
    """The "popular" list: ``score = sum over the item's rows of 0.5 ** ((now - timestamp) / half_life_s)``.

    Each item's weights are added as integers (HUGEINT) in units of 2**-96 of its largest
    weight, rounded to a power of two, and the total is rounded to the nearest double once:
    the sum is the same in any row order and on any number of threads.
    """
    _check_positive("half_life_s", half_life_s)
    _check_count("k", k)
    with _allowed(events, eligible) as allowed:
        top = events.con.execute(f"""
            WITH weighted AS (
                SELECT item_id, pow(0.5, ($now - timestamp) / $half_life) AS weight
                FROM events WHERE timestamp <= $now AND {allowed}),
            exponent AS (  -- of each item's largest weight: its weights are summed in units of 2**(e - 95),
                           -- scaled by 2**(95 - e) in two factors, as that alone can pass a double's range
                SELECT item_id, floor(log2(max(weight))) AS e FROM weighted WHERE weight > 0 GROUP BY item_id)
            SELECT item_id, coalesce(  -- through text: DuckDB's HUGEINT to DOUBLE cast can be an ulp off
                sum(CAST(weight * $up * pow(2, 95 - 600 - e) AS HUGEINT))::VARCHAR::DOUBLE
                * pow(2, any_value(e) - 95 + 600) * $down, 0) AS score
            FROM weighted LEFT JOIN exponent USING (item_id)
            GROUP BY item_id ORDER BY score DESC, item_id LIMIT $k""",
            {"now": now, "half_life": float(half_life_s), "k": k, "up": 2.0 ** 600, "down": 2.0 ** -600}).fetchnumpy()
    return _named("popular", top)


def build_trending(events: Events, now: int, recent_s: float, baseline_s: float, k: int, prior: float = 5.0,
                   eligible: np.ndarray | None = None) -> pd.DataFrame:
    """The "trending" list: items whose rate in the recent window rises above their baseline rate.

    The recent window is ``(now - recent_s, now]`` and the baseline window the ``baseline_s``
    seconds before it. Per item, with ``recent`` and ``baseline`` the row counts in each:

        expected = baseline * recent_s / baseline_s        # the baseline rate over the recent window
        score    = (recent + prior) / (expected + prior)

    ``prior`` pseudo-events pull both counts toward a ratio of 1, so one recent event on an
    empty baseline scores (1 + prior) / prior (1.2 with the default), far below a real spike.
    Only rising items (score > 1) are listed.
    """
    _check_positive("recent_s", recent_s)
    _check_positive("baseline_s", baseline_s)
    _check_positive("prior", prior)
    _check_count("k", k)
    with _allowed(events, eligible) as allowed:
        top = events.con.execute(f"""
            SELECT item_id, score FROM (
                SELECT item_id, (recent + $prior) / (baseline * $recent_s / $baseline_s + $prior) AS score FROM (
                    SELECT item_id, count(*) FILTER (timestamp > $now - $recent_s) AS recent,
                           count(*) FILTER (timestamp <= $now - $recent_s) AS baseline
                    FROM events WHERE timestamp <= $now AND timestamp > $now - $recent_s - $baseline_s AND {allowed}
                    GROUP BY item_id))
            WHERE score > 1 ORDER BY score DESC, item_id LIMIT $k""",
            {"now": now, "recent_s": float(recent_s), "baseline_s": float(baseline_s), "prior": float(prior),
             "k": k}).fetchnumpy()
    return _named("trending", top)


def read_first_seen(events: Events) -> tuple[np.ndarray, np.ndarray]:
    """(item ids (N,) ascending, the timestamp of each one's first row (N,) float64)."""
    first = events.con.execute("SELECT item_id, min(timestamp) AS first FROM events GROUP BY item_id "
                               "ORDER BY item_id").fetchnumpy()
    return first["item_id"].astype(np.int64), first["first"]


def read_last_time(events: Events) -> float:
    """The timestamp of the latest row; ValueError when there is none."""
    [(last,)] = events.con.execute("SELECT max(timestamp) FROM events").fetchall()
    if last is None:
        raise ValueError("the interactions have no rows that count (all labels <= 0, or an empty file)")
    return last


def read_latest_items(events: Events, user_ids: np.ndarray, max_len: int) -> pa.LargeListArray:
    """(U,) lists of int64: each user's ``max_len`` latest items, oldest first, aligned with
    ``user_ids`` (empty for a user without rows). Rows at the same time keep file order."""
    _check_count("max_len", max_len)
    ids = _check_ids("user_ids", user_ids)
    with _registered(events.con, "users", pa.table({"user_id": ids, "user_row": np.arange(len(ids))})):
        latest = events.con.execute("""
            SELECT user_row, item_id FROM events JOIN users USING (user_id)
            QUALIFY row_number() OVER (PARTITION BY user_row ORDER BY timestamp DESC, row DESC) <= $max_len
            ORDER BY user_row, timestamp, row""", {"max_len": max_len}).fetchnumpy()
    offsets = np.concatenate([[0], np.cumsum(np.bincount(latest["user_row"], minlength=len(ids)))])
    return pa.LargeListArray.from_arrays(offsets, latest["item_id"].astype(np.int64))


def build_new_items(item_ids: np.ndarray, first_seen: np.ndarray, now: int, max_age_s: float, k: int,
                    eligible: np.ndarray | None = None) -> pd.DataFrame:
    """The "new" list: items with ``0 <= now - first_seen <= max_age_s``, newest first.

    ``first_seen`` (N,) holds each item's first appearance in int seconds: its ``created_at``
    or its first interaction, whichever the caller chooses. ``score = 1 - age / max_age_s``.
    """
    _check_positive("max_age_s", max_age_s)
    _check_count("k", k)
    ids = _check_ids("item_ids", item_ids)
    first_seen = np.asarray(first_seen)
    if first_seen.shape != ids.shape:
        raise ValueError(f"first_seen has shape {first_seen.shape}; expected one timestamp per item, {ids.shape}")
    if not np.issubdtype(first_seen.dtype, np.number):
        raise ValueError(f"first_seen must hold timestamps in seconds, got dtype {first_seen.dtype}")
    missing = np.isnan(first_seen.astype(np.float64))
    if missing.any():
        raise ValueError(f"first_seen is missing for {int(missing.sum())} items, e.g. {ids[missing][:5].tolist()}")
    age = now - first_seen.astype(np.float64)
    new = (age >= 0) & (age <= max_age_s)
    return _top("new", ids[new], 1 - age[new] / max_age_s, k, eligible)


def read_editorial(path: Path, known_item_ids: np.ndarray, eligible: np.ndarray | None = None) -> pd.DataFrame:
    """The "editorial" list from a CSV file, one item a line under a header:

        item_id,score
        42,0.9
        17,0.8

    ``score`` is optional. With it, items rank by score (file order breaks ties); without
    it, the file order is the rank and ``score = 1 - position / items``. Blank lines are
    skipped. An empty file, a bad header, a malformed row, a repeated id or an id missing
    from ``known_item_ids`` raises ValueError naming the file and the line.
    """
    path = Path(path)
    header, lines, rows = _read_csv(path)
    if header is None:
        raise ValueError(f"{path}: empty editorial file; expected a header 'item_id[,score]' and one item a line")
    if not rows:
        raise ValueError(f"{path}, line {lines[0]}: a header but no items")
    ids = np.empty(len(rows), dtype=np.int64)
    scores = np.empty(len(rows), dtype=np.float64)
    first_line: dict[int, int] = {}
    for i, (line, fields) in enumerate(zip(lines[1:], rows, strict=True)):
        if len(fields) != len(header):
            raise ValueError(f"{path}, line {line}: expected {len(header)} fields ({','.join(header)}), "
                             f"got {len(fields)}: {','.join(fields)!r}")
        record = dict(zip(header, fields, strict=True))
        try:
            ids[i] = int(record["item_id"])
        except ValueError:
            raise ValueError(f"{path}, line {line}: item_id {record['item_id']!r} is not an integer") from None
        if ids[i] in first_line:
            raise ValueError(f"{path}, line {line}: item_id {ids[i]} repeats line {first_line[ids[i]]}")
        first_line[ids[i]] = line
        try:
            scores[i] = float(record["score"]) if "score" in record else 1 - i / len(rows)
        except ValueError:
            raise ValueError(f"{path}, line {line}: score {record['score']!r} is not a number") from None
        if not math.isfinite(scores[i]):
            raise ValueError(f"{path}, line {line}: score {record['score']!r} is not a finite number")
    unknown = ~np.isin(ids, np.asarray(known_item_ids))
    if unknown.any():
        first = int(np.argmax(unknown))
        raise ValueError(f"{path}, line {lines[1 + first]}: item_id {ids[first]} is not a known item "
                         f"({int(unknown.sum())} unknown in all)")
    order = np.argsort(-scores, kind="stable")
    ids, scores = ids[order], scores[order]
    keep = _is_eligible(ids, eligible)
    return _pool(np.full(int(keep.sum()), "editorial", dtype=object), ids[keep], scores[keep])


def build_similar_items(item_ids: np.ndarray, item_vectors: np.ndarray, search: Search, k: int,
                        eligible: np.ndarray | None = None, batch_size: int = 1024) -> pd.DataFrame:
    """Lists "similar:{id}": each item's k nearest items in ``search``'s index, itself excluded.

    ``item_vectors`` (N, D) are the embeddings of ``item_ids`` (N,), used as the queries; the
    index is searched ``batch_size`` items at a time. Every item gets a list, eligible or not
    (a user may have just seen an item that is now blocked); only its contents are filtered.
    """
    _check_count("k", k)
    _check_count("batch_size", batch_size)
    ids = _check_ids("item_ids", item_ids)
    vectors = _check_vectors("item_vectors", item_vectors, len(ids))
    batches = ((rows, rows, ids[rows]) for rows in np.array_split(np.arange(len(ids)), range(batch_size, len(ids),
                                                                                            batch_size)))
    rows, found, scores = _search_batches(search, vectors, k, batches, eligible)
    return _pool(_row_names("similar:", ids, rows), found, scores)


def build_cooccurrence_similar(events: Events, k: int, max_history: int = MAX_HISTORY,
                               eligible: np.ndarray | None = None, anchors: np.ndarray | None = None) -> pd.DataFrame:
    """Lists "similar:{id}" from shared users, the fallback when items have no embeddings.

    Each user's history is their ``max_history`` most recent distinct items (an item counts at
    its latest row; equal times keep file order), which bounds the pairs at
    ``users * max_history**2``. For items i != j the score is the cosine of their binary user
    columns,

        score(i, j) = users(i and j) / sqrt(users(i) * users(j)),

    Item i's list holds the k best eligible j with at least one shared user, ties by smaller id.
    Lists are built for the ``anchors`` items (every item when None), eligible or not; lists
    follow item ids.
    """
    _check_count("k", k)
    _check_count("max_history", max_history)
    with (_allowed(events, eligible, "b.item_id") as allowed,
          _allowed(events, anchors, "a.item_id", "anchors") as anchored):
        pairs = events.con.execute(f"""
            WITH latest AS (
                SELECT user_id, item_id FROM (
                    SELECT * FROM events
                    QUALIFY row_number() OVER (PARTITION BY user_id, item_id ORDER BY timestamp DESC, row) = 1)
                QUALIFY row_number() OVER (PARTITION BY user_id ORDER BY timestamp DESC, row) <= $max_history),
            degree AS (SELECT item_id, count(*) AS users FROM latest GROUP BY item_id),
            shared AS (
                SELECT a.item_id AS anchor, b.item_id AS other, count(*) AS users
                FROM latest a JOIN latest b ON a.user_id = b.user_id AND a.item_id <> b.item_id
                WHERE {anchored} AND {allowed}
                GROUP BY anchor, other)
            SELECT anchor, other, shared.users / sqrt(da.users * db.users::DOUBLE) AS score
            FROM shared JOIN degree da ON da.item_id = anchor JOIN degree db ON db.item_id = other
            QUALIFY row_number() OVER (PARTITION BY anchor ORDER BY score DESC, other) <= $k
            ORDER BY anchor, score DESC, other""", {"max_history": max_history, "k": k}).fetchnumpy()
    return _pool(_names("similar:", pairs["anchor"]), pairs["other"], pairs["score"])


def build_user_lists(user_ids: np.ndarray, user_vectors: np.ndarray, search: Search, events: Events, n: int,
                     eligible: np.ndarray | None = None, batch_size: int = 32768,
                     batch_results: int = BATCH_RESULTS) -> pd.DataFrame:
    """Lists "user:{id}": each user's n best unseen items from ``search``'s index.

    ``user_vectors`` (U, D) are the query-tower embeddings of ``user_ids`` (U,); a user has seen
    the items of their ``events`` rows, which stream from DuckDB one batch of users at a time.
    Every list holds n items unless the index runs out of unseen eligible ones (see
    `_search_batches` for how it over-fetches). A batch holds at most ``batch_size`` users, and
    at most ``batch_results`` results searched for at once (users x their batch's k): large
    batches let an IVF index search list by list, the cap bounds their memory.
    """
    _check_count("n", n)
    _check_count("batch_size", batch_size)
    _check_count("batch_results", batch_results)
    ids = _check_ids("user_ids", user_ids)
    vectors = _check_vectors("user_vectors", user_vectors, len(ids))
    users = pa.table({"user_id": ids, "row": np.arange(len(ids))})
    with _registered(events.con, "users", users):
        seen = events.con.execute("SELECT users.row, count(DISTINCT item_id) AS items FROM events "
                                  "JOIN users USING (user_id) GROUP BY users.row").fetchnumpy()
    need = np.full(len(ids), n, dtype=np.int64)  # results to ask for: n past each user's seen items
    need[seen["row"]] += seen["items"]
    order = np.argsort(need, kind="stable")
    batches, lo = [], 0
    while lo < len(order):  # needs ascend along order, so a batch's k is its last user's need
        hi = min(lo + batch_size, len(order))
        if (hi - lo) * need[order[hi - 1]] > batch_results:
            hi = lo + max(1, batch_results // int(need[order[hi - 1]]))
        batches.append(order[lo:hi])
        lo = hi
    batch_of = np.empty(len(ids), dtype=np.int64)
    for b, rows in enumerate(batches):
        batch_of[rows] = b
    with events.con.cursor() as stream:  # its own connection: closing it ends the stream however the loop ends
        stream.register("users", users.append_column("batch", pa.array(batch_of)))
        pairs = stream.sql("SELECT batch, users.row, item_id FROM events JOIN users USING (user_id) ORDER BY batch")
        rows, found, scores = _search_batches(search, vectors, n, _by_batch(pairs.to_arrow_reader(STREAM_ROWS),
                                                                            batches), eligible)
    return _pool(_row_names("user:", ids, rows), found, scores)


def _by_batch(reader: pa.RecordBatchReader, batches: list[np.ndarray]) -> Iterator[tuple[np.ndarray, ...]]:
    """(rows, excluded rows, excluded items) per batch of ``batches``, from a reader of
    (batch, row, item_id) records sorted by batch."""
    batch, row, item = (np.zeros(0, dtype=np.int64) for _ in range(3))
    chunks = iter(reader)
    for b, rows in enumerate(batches):
        while not len(batch) or batch[-1] <= b:
            chunk = next(chunks, None)
            if chunk is None:
                break
            batch, row, item = (np.concatenate([old, chunk.column(i).to_numpy()])
                                for i, old in enumerate((batch, row, item)))
        cut = int(np.searchsorted(batch, b, side="right"))
        yield rows, row[:cut], item[:cut]
        batch, row, item = batch[cut:], row[cut:], item[cut:]


def _search_batches(search: Search, queries: np.ndarray, n: int, batches: Iterator[tuple[np.ndarray, ...]],
                    eligible: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The first n results per query row that are eligible and not excluded for that row.

    ``batches`` yields (rows, excluded rows, excluded items): the query rows searched together
    and the (row, item) pairs they exclude. A batch is searched with ``k = n + its most
    exclusions in one row``; a row still short of n after filtering (ineligible results) is
    searched again with k doubled until it has n or the index returns fewer than k (it has no
    more). Returns rows, ids, scores: long arrays, rows ascending, each row's results in rank order.
    The results go straight to their row's n slots, so a million users' lists are never copied
    to be sorted; the long arrays are views of the slots when every row has n results.
    """
    eligible_ids = None if eligible is None else pd.Index(np.unique(eligible))
    found = np.full((len(queries), n), -1, dtype=np.int64)
    scores = np.zeros((len(queries), n), dtype=np.float32)
    counts = np.zeros(len(queries), dtype=np.int64)
    for rows, excluded_rows, excluded_items in batches:
        # hash lookups (pd.Index): ~10x faster than binary search over a million ids
        excluded_ids = pd.Index(np.unique(excluded_items))
        width = max(len(excluded_ids), 1)
        local = pd.Index(rows).get_indexer(excluded_rows)  # each excluded row's place in the batch
        keys = np.unique(local * width + _lookup(excluded_ids, excluded_items))
        k = n + int(np.bincount(keys // width, minlength=len(rows)).max(initial=0))
        keys = pd.Index(keys)  # one key per distinct (row, excluded item) pair
        place = np.arange(len(rows))
        while len(rows):
            ids, got = _call_search(search, queries[rows], k)
            code = _lookup(excluded_ids, ids)  # -1 where no row excludes the id
            excluded = (code >= 0) & (_lookup(keys, place[:, None] * width + code) >= 0)
            valid = (ids >= 0) & ~excluded
            if eligible_ids is not None:
                valid &= _lookup(eligible_ids, ids) >= 0
            taken = valid & (np.cumsum(valid, axis=1) <= n)
            done = (taken.sum(axis=1) == n) | (ids.shape[1] < k) | (ids < 0).any(axis=1)
            r, c = np.nonzero(taken[done])
            slot = np.cumsum(taken[done], axis=1)[r, c] - 1  # each result's rank in its row
            found[rows[done][r], slot], scores[rows[done][r], slot] = ids[done][r, c], got[done][r, c]
            counts[rows[done]] = taken[done].sum(axis=1)
            rows, place, k = rows[~done], place[~done], 2 * k
    rows = np.repeat(np.arange(len(queries), dtype=np.int32), counts)  # the list names' codes, not copied
    if (counts == n).all():
        return rows, found.reshape(-1), scores.reshape(-1)
    kept = np.arange(n) < counts[:, None]  # (rows, n): the filled slots, each row's first counts
    return rows, found[kept], scores[kept]


def _call_search(search: Search, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    ids, scores = search(np.ascontiguousarray(queries, dtype=np.float32), k)
    ids, scores = np.asarray(ids), np.asarray(scores)
    if ids.ndim != 2 or ids.shape != scores.shape or len(ids) != len(queries) or ids.shape[1] > k:
        raise ValueError(f"search returned ids {ids.shape} and scores {scores.shape} for {len(queries)} queries "
                         f"and k={k}; expected ({len(queries)}, at most {k}) each")
    return ids.astype(np.int64, copy=False), scores


_INTEGER = {"TINYINT", "SMALLINT", "INTEGER", "BIGINT", "UTINYINT", "USMALLINT", "UINTEGER", "UBIGINT"}
_NUMERIC = _INTEGER | {"FLOAT", "DOUBLE"}


@contextmanager
def _registered(con: duckdb.DuckDBPyConnection, name: str, table: pa.Table) -> Iterator[None]:
    con.register(name, table)
    try:
        yield
    finally:
        con.unregister(name)


@contextmanager
def _allowed(events: Events, ids: np.ndarray | None, column: str = "item_id", name: str = "eligible") -> Iterator[str]:
    """A SQL condition: ``column`` is one of ``ids`` (always true when None), registered as table ``name``."""
    if ids is None:
        yield "TRUE"
        return
    with _registered(events.con, name, pa.table({"item_id": np.asarray(ids, dtype=np.int64)})):
        yield f"{column} IN (SELECT item_id FROM {name})"


def _named(name: str, top: dict[str, np.ndarray]) -> pd.DataFrame:
    return _pool(np.full(len(top["item_id"]), name, dtype=object), top["item_id"], top["score"])


def _top(name: str, ids: np.ndarray, scores: np.ndarray, k: int, eligible: np.ndarray | None) -> pd.DataFrame:
    keep = _is_eligible(ids, eligible)
    ids, scores = ids[keep], scores[keep]
    order = np.lexsort((ids, -scores))[:k]
    return _pool(np.full(len(order), name, dtype=object), ids[order], scores[order])


def _pool(lists: np.ndarray | pd.Categorical, item_ids: np.ndarray, scores: np.ndarray) -> pd.DataFrame:
    # copy=False: the frame holds the arrays themselves (a hundred million user-list rows are 1.2 GB)
    return pd.DataFrame({"list": lists, "item_id": np.asarray(item_ids, dtype=np.int64),
                         "score": np.asarray(scores, dtype=np.float32)}, copy=False)


def _names(prefix: str, ids: np.ndarray) -> np.ndarray:
    return (prefix + pd.Series(ids).astype(str)).to_numpy(dtype=object)


def _row_names(prefix: str, ids: np.ndarray, rows: np.ndarray) -> pd.Categorical:
    """The list name "{prefix}{ids[row]}" of each of ``rows`` as codes into the names of the
    distinct ``ids``: a million users' hundred million rows hold a 4-byte code each, not a string."""
    return pd.Categorical.from_codes(rows, _names(prefix, ids))


def _is_eligible(ids: np.ndarray, eligible: np.ndarray | None) -> np.ndarray:
    return np.ones(np.shape(ids), dtype=bool) if eligible is None else np.isin(ids, eligible)


def _lookup(index: pd.Index, values: np.ndarray) -> np.ndarray:
    """Position of each value in the unique ``index``, -1 where absent; same shape as values."""
    return index.get_indexer(values.ravel()).reshape(values.shape)


def _quote(path: Path) -> str:
    return str(path).replace("'", "''")


def _read_csv(path: Path) -> tuple[list[str] | None, list[int], list[list[str]]]:
    """Header, line numbers (header first) and data rows of a CSV file; blank lines skipped."""
    if not path.is_file():
        raise ValueError(f"{path}: no such editorial file")
    header, lines, rows = None, [], []
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        try:
            for fields in reader:
                fields = [field.strip() for field in fields]
                if len(fields) <= 1 and not any(fields):
                    continue
                lines.append(reader.line_num)
                if header is None:
                    header = fields
                    if sorted(header) not in (["item_id"], ["item_id", "score"]):
                        raise ValueError(f"{path}, line {reader.line_num}: header {','.join(header)!r}; "
                                         "expected 'item_id' or 'item_id,score'")
                else:
                    rows.append(fields)
        except (csv.Error, UnicodeDecodeError) as e:
            raise ValueError(f"{path}, line {reader.line_num}: not readable as CSV: {e}") from e
    return header, lines, rows


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


def _check_count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value <= 0:
        raise ValueError(f"{name} must be an integer > 0, got {value!r}")


def _check_ids(name: str, ids: np.ndarray) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.ndim != 1 or not (np.issubdtype(ids.dtype, np.integer) or ids.size == 0):
        raise ValueError(f"{name} must be a 1-d integer array, got shape {ids.shape} and dtype {ids.dtype}")
    if not pd.Index(ids).is_unique:  # hashed, not sorted: the sort only names the repeats
        unique, counts = np.unique(ids, return_counts=True)
        raise ValueError(f"{name} repeats ids, e.g. {unique[counts > 1][:5].tolist()}")
    return ids.astype(np.int64, copy=False)


def _check_vectors(name: str, vectors: np.ndarray, rows: int) -> np.ndarray:
    vectors = np.asarray(vectors)
    if vectors.ndim != 2 or len(vectors) != rows:
        raise ValueError(f"{name} has shape {vectors.shape}; expected ({rows}, D), one row per id")
    return vectors
