"""The online store: one set of behaviour tests run against both backends, then Redis versions and failures."""

import os
import signal
import time

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import redis

from inference.store import (
    LISTS,
    EmbeddedStore,
    RedisStore,
    Snapshot,
    StoreError,
    StoreUnavailable,
    delete_version,
    load_snapshot_into_redis,
    read_lists,
    redis_base,
    write_snapshot,
)

FAILURE_TIMEOUT_S = 0.3
MARGIN_S = 0.5  # scheduling slack on a shared 2-core machine
BIG_ID = 2**40


def make_users() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "user_id": np.array([42, 7, 1_000_000_007], dtype=np.int64),
            "age": [31, 25, 60],
            "country": ["fr", "de", "日本"],
            "activity": [0.1, 2.5, np.nan],
            "weight": np.array([0.3, 1.0, -2.5], dtype=np.float32),
            "recent": [[5, 3], [], [1]],
            "premium": [True, False, True],
        }
    )


def make_items(title_suffix: str = "") -> pd.DataFrame:
    return pd.DataFrame(
        {
            "item_id": np.array([10, 3, 5, 8, 1, BIG_ID], dtype=np.int64),
            "genres": [[1, 4], [2], [], [0, 1, 2], [7], [3]],
            "title": [f"{t}{title_suffix}" for t in ("Heat", "Alien", "Fargo", "Brazil", "Up", "Big")],
            "price": np.array([9.99, 0.1, 3.5, 12.0, 1e-8, 7.25], dtype=np.float32),
            "year": pd.array([1995, 1979, None, 1985, 2009, 1988], dtype="Int64"),
            "available": [True, True, False, True, False, True],
        }
    )


def make_lists(popular: tuple[int, ...] = (3, 10, 5)) -> pd.DataFrame:
    rows = [("popular", item, score) for item, score in zip(popular, (0.9, 0.5, 0.1), strict=True)]
    rows += [("similar:3", 5, 2.0), ("user:42", 1, -1.5), ("similar:3", 8, 1.0)]  # lists interleave
    return pd.DataFrame(rows, columns=["list", "item_id", "score"])


@pytest.fixture
def snapshot_dir(tmp_path):
    directory = tmp_path / "v1"
    directory.mkdir()
    write_snapshot(directory, make_users(), make_items(), make_lists())
    return directory


@pytest.fixture(params=["embedded", "redis"])
def open_store(request):
    """Opens snapshots as stores of one backend; the Redis one loads them into a private server first."""
    opened = []

    def open_(directory, version: str):
        if request.param == "embedded":
            store = EmbeddedStore.open(directory, version)
        else:
            server = request.getfixturevalue("redis_server")
            load_snapshot_into_redis(directory, server.host, server.port, version)
            store = RedisStore(server.host, server.port, version, timeout_s=2.0)
        opened.append(store)
        return store

    yield open_
    for store in opened:
        store.close()


@pytest.fixture
def store(open_store, snapshot_dir):
    return open_store(snapshot_dir, "v1")


def assert_rows_match(rows, items: pd.DataFrame, requested: np.ndarray) -> None:
    """Checks item rows against pandas' own lookup of the same ids."""
    reference = items.set_index("item_id").reindex(requested)
    np.testing.assert_array_equal(rows.item_ids, requested)
    np.testing.assert_array_equal(rows.found, np.isin(requested, items["item_id"]))
    assert list(rows.features.columns) == list(reference.columns)
    assert len(rows.features) == len(requested)
    for column in reference.columns:
        for i, (got, want) in enumerate(zip(rows.features[column], reference[column], strict=True)):
            if not rows.found[i]:
                assert got is None or pd.isna(got), (column, i, got)
            elif isinstance(want, list):
                np.testing.assert_array_equal(got, want)
                assert np.asarray(got).dtype == np.int64
            elif pd.isna(want):
                assert pd.isna(got), (column, i, got)
            else:
                assert got == want, (column, i, got, want)


def test_version(store):
    assert store.version == "v1"


def test_user_features_round_trip_with_types(store):
    expected = {
        "age": 31,
        "country": "fr",
        "activity": 0.1,
        "weight": float(np.float32(0.3)),
        "recent": [5, 3],
        "premium": True,
    }
    got = store.user_features(np.int64(42))
    assert got == expected
    assert {k: type(v) for k, v in got.items()} == {k: type(v) for k, v in expected.items()}
    assert store.user_features(1_000_000_007)["activity"] is None  # NaN is stored as missing
    assert store.user_features(1_000_000_007)["country"] == "日本"
    assert store.user_features(7)["recent"] == []


def test_unknown_user_is_none(store):
    assert store.user_features(8) is None
    assert store.user_features(-1) is None


def test_item_features_align_with_request(store):
    requested = np.array([5, 999, 3, 5, BIG_ID, -1, 10, 0, BIG_ID + 1], dtype=np.int64)
    rows = store.item_features(requested)
    assert rows.found.tolist() == [True, False, True, True, True, False, True, False, False]
    assert_rows_match(rows, make_items(), requested)
    assert rows.features["title"].tolist()[:4] == ["Fargo", None, "Alien", "Fargo"]
    dtypes = rows.features.dtypes.astype(str).to_dict()
    assert dtypes == {
        "genres": "object",
        "title": "object",
        "price": "float32",
        "year": "Int64",
        "available": "boolean",
    }
    assert rows.features["price"].iloc[0] == np.float32(3.5)
    assert pd.isna(rows.features["year"].iloc[0])  # a known item with a missing value, unlike row 1


def test_item_features_of_no_ids(store):
    rows = store.item_features(np.zeros(0, dtype=np.int32))
    assert rows.item_ids.dtype == np.int64 and rows.found.shape == (0,)
    assert list(rows.features.columns) == ["genres", "title", "price", "year", "available"]
    assert len(rows.features) == 0


def test_item_features_match_pandas_on_a_random_catalogue(tmp_path, open_store):
    rng = np.random.default_rng(0)
    n = 2_000
    items = pd.DataFrame(
        {
            "item_id": rng.choice(10 * n, n, replace=False).astype(np.int64),
            "genres": [rng.integers(0, 19, rng.integers(0, 4)).tolist() for _ in range(n)],
            "title": [f"t{i}" for i in range(n)],
            "price": rng.random(n).astype(np.float32),
            "year": pd.array(rng.integers(1920, 2020, n), dtype="Int64"),
            "available": rng.random(n) < 0.5,
        }
    )
    directory = tmp_path / "random"
    directory.mkdir()
    write_snapshot(directory, make_users(), items, make_lists())
    requested = rng.integers(0, 10 * n, 3_000)
    rows = open_store(directory, "random").item_features(requested)
    assert 0 < rows.found.sum() < len(requested)
    assert_rows_match(rows, items, requested)


def test_lists_in_rank_order(store):
    ids, scores = store.get_list("popular")
    assert ids.dtype == np.int64 and scores.dtype == np.float32
    np.testing.assert_array_equal(ids, [3, 10, 5])
    np.testing.assert_array_equal(scores, np.float32([0.9, 0.5, 0.1]))
    ids, scores = store.get_list("similar:3")
    np.testing.assert_array_equal(ids, [5, 8])
    np.testing.assert_array_equal(scores, np.float32([2.0, 1.0]))
    with pytest.raises(ValueError, match="read-only"):
        ids[0] = 99


def test_unknown_list_is_empty(store):
    ids, scores = store.get_list("trending")
    assert ids.shape == scores.shape == (0,)
    assert ids.dtype == np.int64 and scores.dtype == np.float32


def test_bad_requests_raise(store):
    with pytest.raises(ValueError, match="expected a 1-D integer array"):
        store.item_features(np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="expected a 1-D integer array"):
        store.item_features(np.array([[1, 2]]))
    with pytest.raises(TypeError):
        store.user_features(4.5)


# Snapshot validation


@pytest.mark.parametrize(
    ("table", "frame", "message"),
    [
        ("users", make_users().drop(columns="user_id"), r"users: missing id column 'user_id'"),
        (
            "items",
            pd.concat([make_items(), make_items().iloc[[1]]]),
            r"items: column 'item_id' has duplicate ids \[3\]",
        ),
        (
            "items",
            make_items().astype({"item_id": "Int64"}).replace({3: None}),
            r"items: column 'item_id' has null ids",
        ),
        (
            "users",
            make_users().astype({"user_id": float}),
            r"users: column 'user_id' has dtype float64; expected integer",
        ),
        ("users", make_users()[["user_id"]], r"users: no feature columns besides 'user_id'"),
        ("items", make_items().assign(added=pd.Timestamp("2024-01-01")), r"items: column 'added' has type timestamp"),
        ("items", make_items().assign(mixed=[1, "a", 2, 3, 4, 5]), r"items: column 'mixed' cannot be stored"),
        ("lists", make_lists().drop(columns="score"), r"lists: missing column 'score'"),
        ("lists", make_lists().replace({"popular": None}), r"lists: column 'list' has null values at rows \[0, 1, 2\]"),
        ("lists", make_lists().astype({"item_id": float}), r"lists: column 'item_id' has dtype float64"),
        ("lists", make_lists().replace({"popular": 7}), r"lists: column 'list' holds mixed-integer; expected str"),
    ],
)
def test_write_snapshot_rejects_bad_tables(tmp_path, table, frame, message):
    tables = {"users": make_users(), "items": make_items(), "lists": make_lists(), table: frame}
    with pytest.raises(ValueError, match=message):
        write_snapshot(tmp_path, **tables)
    assert list(tmp_path.iterdir()) == []  # nothing written when any table is bad


def test_bad_version_and_missing_directory_raise(tmp_path, snapshot_dir):
    with pytest.raises(ValueError, match="version 'v:1'"):
        EmbeddedStore.open(snapshot_dir, "v:1")
    with pytest.raises(ValueError, match="does not exist"):
        write_snapshot(tmp_path / "absent", make_users(), make_items(), make_lists())
    with pytest.raises(ValueError, match="timeout_s=0"):
        RedisStore("127.0.0.1", 1, "v1", timeout_s=0)


# Redis versions


def redis_keys(server, version: str) -> list[bytes]:
    with redis.Redis(server.host, server.port) as client:
        return list(client.scan_iter(match=f"recstack:{version}:*"))


def test_redis_refuses_an_incomplete_version(redis_server, snapshot_dir):
    host, port = redis_server.host, redis_server.port
    message = r"version 'v1' is not complete in redis at .* \(no key 'recstack:v1:complete'\)"
    with pytest.raises(StoreError, match=message):
        RedisStore(host, port, "v1")
    load_snapshot_into_redis(snapshot_dir, host, port, "v1")
    with redis.Redis(host, port) as client:
        client.delete("recstack:v1:complete")  # as if the load had crashed before its last write
    with pytest.raises(StoreError, match="not complete"):
        RedisStore(host, port, "v1")


def test_redis_reload_clears_leftovers_and_refuses_a_complete_version(redis_server, snapshot_dir):
    host, port = redis_server.host, redis_server.port
    with redis.Redis(host, port) as client:
        client.mset({"recstack:v1:begun": 1, "recstack:v1:item:12345": "[]"})  # left by a crashed load
    load_snapshot_into_redis(snapshot_dir, host, port, "v1")
    assert b"recstack:v1:item:12345" not in redis_keys(redis_server, "v1")
    assert not RedisStore(host, port, "v1").item_features(np.array([12345])).found[0]
    with pytest.raises(StoreError, match="already complete"):
        load_snapshot_into_redis(snapshot_dir, host, port, "v1")


def test_redis_versions_side_by_side_and_delete(redis_server, snapshot_dir, tmp_path):
    host, port = redis_server.host, redis_server.port
    v2_dir = tmp_path / "v2"
    v2_dir.mkdir()
    write_snapshot(v2_dir, make_users().iloc[:1], make_items(" II"), make_lists(popular=(8, 1, BIG_ID)))
    load_snapshot_into_redis(snapshot_dir, host, port, "v1")
    v1 = RedisStore(host, port, "v1")
    load_snapshot_into_redis(v2_dir, host, port, "v2")  # while v1 is open
    v2 = RedisStore(host, port, "v2")

    assert v1.item_features(np.array([3])).features["title"].tolist() == ["Alien"]
    assert v2.item_features(np.array([3])).features["title"].tolist() == ["Alien II"]
    assert v1.user_features(7) is not None and v2.user_features(7) is None
    np.testing.assert_array_equal(v2.get_list("popular")[0], [8, 1, BIG_ID])
    np.testing.assert_array_equal(v1.get_list("popular")[0], [3, 10, 5])
    np.testing.assert_array_equal(v1.get_list("similar:3")[0], [5, 8])

    delete_version(host, port, "v1")
    assert redis_keys(redis_server, "v1") == []
    for call in (lambda: v1.get_list("popular"), lambda: v1.user_features(42), lambda: v1.item_features(np.array([3]))):
        with pytest.raises(StoreError, match="not complete"):
            call()
    with pytest.raises(StoreError, match="not complete"):
        RedisStore(host, port, "v1")
    assert v2.item_features(np.array([3])).features["title"].tolist() == ["Alien II"]
    v1.close()
    v2.close()


# Redis failures


def calls(store):
    """Each store call with its operation name, the way the error must report it."""
    return [
        ("user_features", lambda: store.user_features(42)),
        ("item_features", lambda: store.item_features(np.array([3, 5]))),
        ("get_list", lambda: store.get_list("popular")),
    ]


def assert_unavailable_in_time(call, operation: str, where: str, at_least_s: float = 0.0) -> None:
    start = time.monotonic()
    with pytest.raises(StoreUnavailable) as raised:
        call()
    elapsed = time.monotonic() - start
    assert at_least_s <= elapsed < FAILURE_TIMEOUT_S + MARGIN_S, (operation, elapsed)
    assert where in str(raised.value) and operation in str(raised.value)


def test_redis_killed_server_raises_store_unavailable(redis_server, snapshot_dir):
    host, port = redis_server.host, redis_server.port
    where = f"{host}:{port}"
    load_snapshot_into_redis(snapshot_dir, host, port, "v1")
    store = RedisStore(host, port, "v1", timeout_s=FAILURE_TIMEOUT_S)
    assert store.user_features(42)["age"] == 31
    os.kill(redis_server.process.pid, signal.SIGKILL)
    redis_server.process.wait()
    for operation, call in calls(store):
        assert_unavailable_in_time(call, operation, where)
    assert_unavailable_in_time(lambda: RedisStore(host, port, "v1", timeout_s=FAILURE_TIMEOUT_S), "open", where)
    assert_unavailable_in_time(
        lambda: delete_version(host, port, "v1", timeout_s=FAILURE_TIMEOUT_S), "delete_version", where
    )
    assert_unavailable_in_time(
        lambda: load_snapshot_into_redis(snapshot_dir, host, port, "v2", timeout_s=FAILURE_TIMEOUT_S),
        "load_snapshot_into_redis",
        where,
    )
    store.close()


def test_redis_paused_server_times_out_then_recovers(redis_server, snapshot_dir):
    host, port = redis_server.host, redis_server.port
    where = f"{host}:{port}"
    load_snapshot_into_redis(snapshot_dir, host, port, "v1")
    store = RedisStore(host, port, "v1", timeout_s=FAILURE_TIMEOUT_S)
    assert store.get_list("popular")[0].tolist() == [3, 10, 5]
    os.kill(redis_server.process.pid, signal.SIGSTOP)
    try:
        for operation, call in calls(store):
            assert_unavailable_in_time(call, operation, where, at_least_s=0.9 * FAILURE_TIMEOUT_S)
    finally:
        os.kill(redis_server.process.pid, signal.SIGCONT)
    assert store.user_features(42)["age"] == 31
    np.testing.assert_array_equal(store.item_features(np.array([3, 999])).found, [True, False])
    store.close()


def test_redis_round_trips_awkward_values_exactly(redis_server, tmp_path):
    """Values the column-at-a-time JSON encoding must escape or spell out, read back from Redis
    exactly as the embedded store holds them."""
    texts = ['say "hi"', "back\\slash", "new\nline\ttab", "\x00\x1f ctrl", "日本 ☃ \U0001f600", "", None]
    n = len(texts)
    items = pd.DataFrame({
        "item_id": np.arange(1, n + 1, dtype=np.int64),
        "text": texts,
        "wide": [5e-324, 1.7976931348623157e308, -0.0, np.inf, -np.inf, 0.1 + 0.2, np.nan],
        "narrow": np.array([1e-45, 3.4028235e38, -0.0, np.inf, 0.1, 16777217, np.nan], dtype=np.float32),
        "big": [2**63 - 1, -(2**63), 0, 1, -1, 10**18, 7],
        "flag": [True, False, None, True, False, None, True],
        "words": [['a"b', "c\\d"], [], None, ["日本"], [""], ["x", "y", "z"], ["\n"]],
        "scores": [[0.1, 1e300], [np.inf], [], None, [-0.0], [1.5], [2.0]],
    })
    directory = tmp_path / "awkward"
    directory.mkdir()
    write_snapshot(directory, make_users(), items, make_lists())
    load_snapshot_into_redis(directory, redis_server.host, redis_server.port, "awkward")
    on_redis = RedisStore(redis_server.host, redis_server.port, "awkward", timeout_s=2.0)
    embedded = EmbeddedStore.open(directory, "awkward")
    try:
        ids = np.arange(0, n + 2)  # with unknown ids at both ends
        got, want = on_redis.item_features(ids), embedded.item_features(ids)
        np.testing.assert_array_equal(got.found, want.found)
        for column in items.columns[1:]:
            for a, b in zip(got.features[column], want.features[column], strict=True):
                assert repr(a) == repr(b), (column, a, b)  # repr: -0.0 differs from 0.0, NaN equals NaN
        for user in make_users()["user_id"]:
            assert on_redis.user_features(user) == embedded.user_features(user)
    finally:
        on_redis.close()


def test_lists_spanning_read_chunks_or_split_between_groups_read_whole(tmp_path, open_store):
    rng = np.random.default_rng(1)
    big = rng.integers(0, 10**9, 300_000)  # longer than one read batch of the parquet file
    first = pd.DataFrame({"list": ["big"] * len(big) + ["x", "x"], "item_id": np.append(big, [1, 2]),
                          "score": np.arange(len(big) + 2, dtype=np.float32)})
    second = pd.DataFrame({"list": ["x", "y"], "item_id": [3, 4], "score": [0.5, 0.25]})  # "x" again, in another group
    directory = tmp_path / "chunked"
    directory.mkdir()
    write_snapshot(directory, make_users(), make_items(), {"a": first, "b": second})
    store = open_store(directory, "chunked")
    ids, scores = store.get_list("big")
    np.testing.assert_array_equal(ids, big)
    np.testing.assert_array_equal(scores, np.arange(len(big), dtype=np.float32))
    assert store.get_list("x")[0].tolist() == [1, 2, 3]  # group after group, rank order kept
    assert store.get_list("y")[0].tolist() == [4]


def test_each_list_is_found_by_its_own_name_alone(tmp_path, open_store):
    """Names that prefix one another, non-ASCII ones and thousands of users' each find their own
    rows; names of no list (a prefix of one, one longer than any) are empty."""
    rng = np.random.default_rng(2)
    names = ["user:1", "user:10", "user:100", "user:1000000", "similar:1", "genre:é", "popular",
             *(f"user:{u}" for u in rng.choice(10**6, 2_000, replace=False) + 2_000_000)]
    lengths = rng.integers(1, 6, len(names))
    frame = pd.DataFrame({"list": np.repeat(names, lengths), "item_id": np.arange(lengths.sum()),
                          "score": rng.random(lengths.sum()).astype(np.float32)})
    directory = tmp_path / "named"
    directory.mkdir()
    write_snapshot(directory, make_users(), make_items(), {"all": frame})
    store = open_store(directory, "named")
    for name, rows in frame.groupby("list", sort=False):
        ids, scores = store.get_list(name)
        assert ids.tolist() == rows["item_id"].tolist() and scores.tolist() == rows["score"].tolist(), name
    for unknown in ("user:", "user:1000", "user:10000000", "genre:e", "", "popular!"):
        assert store.get_list(unknown)[0].size == 0, unknown


def test_categorical_list_names_write_the_files_their_strings_do(tmp_path):
    """A ``list`` column of codes into names (as the refresh's pools build large groups), with
    names no row uses, writes the same files as the names as strings, in order or interleaved."""
    names = ["user:9", "user:1", "unused", "user:5"]
    for codes in ([0, 0, 1, 3, 3], [3, 0, 3, 1, 0]):
        strings = pd.DataFrame({"list": [names[c] for c in codes], "item_id": np.arange(5), "score": np.ones(5)})
        coded = strings.assign(list=pd.Categorical.from_codes(codes, names))
        for name, frame in (("strings", strings), ("coded", coded)):
            (tmp_path / name).mkdir(exist_ok=True)
            write_snapshot(tmp_path / name, make_users(), make_items(), frame)
        read = [pq.read_table(tmp_path / name / LISTS / "all.parquet", read_dictionary=["list"])
                for name in ("strings", "coded")]
        assert read[0].equals(read[1]) and read[1]["list"].chunk(0).dictionary.to_pylist() == list(
            dict.fromkeys(strings["list"]))


def test_redis_reads_integral_floats_back_as_floats(redis_server, snapshot_dir):
    load_snapshot_into_redis(snapshot_dir, redis_server.host, redis_server.port, "integral")
    store = RedisStore(redis_server.host, redis_server.port, "integral", timeout_s=2.0)
    try:
        weight = store.user_features(7)["weight"]  # 1.0, which Arrow spells "1" and JSON reads as an int
        assert type(weight) is float and weight == 1.0
    finally:
        store.close()


# Redis deltas: versions that write only their changes over a full base


def with_filler(items: pd.DataFrame, title_suffix: str = "") -> pd.DataFrame:
    """``items`` and 100 more, so that a few changes are a delta (`REBASE_SHARE`)."""
    filler = pd.concat([make_items(title_suffix)] * 17, ignore_index=True).iloc[:100]
    filler = filler.assign(item_id=np.arange(1000, 1100), **{c: 0 for c in items.columns if c not in filler})
    return pd.concat([items, filler], ignore_index=True)


def write_version(tmp_path, name: str, users: pd.DataFrame, items: pd.DataFrame, groups: dict,
                  linked: dict | None = None):
    """A snapshot directory of ``items`` `with_filler`; ``linked`` maps group names to a directory whose file of
    that group is hard-linked in (a list kind the refresh carried over)."""
    directory = tmp_path / name
    directory.mkdir(parents=True)
    write_snapshot(directory, users, with_filler(items), groups)
    for group, source in (linked or {}).items():
        os.link(source / LISTS / f"{group}.parquet", directory / LISTS / f"{group}.parquet")
    return directory


def list_frame(lists: dict) -> pd.DataFrame:
    rows = [(name, item, score) for name, entries in lists.items() for item, score in entries]
    return pd.DataFrame(rows, columns=["list", "item_id", "score"]).astype({"item_id": np.int64, "score": float})


def delta_versions(tmp_path) -> dict:
    """v1 (a base) and three later snapshots: changed, added and removed users, items and lists; an item
    changed back to v1's value; a price from 0.0 to -0.0; a list spanning two groups, one of them linked."""
    v1 = write_version(tmp_path, "v1", make_users(), make_items().assign(price=np.float32([9.99, 0.1, 3.5, 0, 1, 7])),
                       {"hot": list_frame({"popular": [(3, 0.9), (10, 0.5)], "similar:3": [(5, 2.0)]}),
                        "old": list_frame({"retired": [(1, 1.0)]}),
                        "user": list_frame({"similar:3": [(8, 1.0)], "user:42": [(1, -1.5)], "user:7": [(3, 1.0)]})})
    users2 = pd.concat([make_users().iloc[:2], make_users().iloc[[0]].assign(user_id=99)], ignore_index=True)
    users2.loc[1, "age"] = 26
    items2 = make_items().assign(price=np.float32([9.99, 0.1, 3.5, -0.0, 1, 7]))
    items2.loc[1, "title"] = "Aliens"
    items2.at[0, "genres"] = [1, 5]
    items2.loc[2, "year"] = 2001
    items2 = pd.concat([items2[items2["item_id"] != 1], items2.iloc[[0]].assign(item_id=11)], ignore_index=True)
    v2 = write_version(tmp_path, "v2", users2, items2,
                       {"hot": list_frame({"popular": [(10, 0.9), (3, 0.5)], "similar:3": [(1, 2.0)]}),
                        "fresh": list_frame({"new": [(11, 1.0)]})}, linked={"user": v1})
    items3 = items2.copy()
    items3.loc[1, "title"] = "Alien"  # back to v1's
    items3.loc[0, "available"] = False
    v3 = write_version(tmp_path, "v3", make_users(), items3, {"fresh": list_frame({"new": []})},
                       linked={"hot": v2, "user": v1})
    v4 = write_version(tmp_path, "v4", make_users(), items3.assign(rank=np.arange(len(items3))),  # a new column
                       {"hot": list_frame({"popular": [(5, 1.0)]})})
    return {"v1": v1, "v2": v2, "v3": v3, "v4": v4}


def assert_answers_as_snapshot(server, version: str, directory) -> None:
    """Every user, item and list of every snapshot in ``directory``'s folder, and unknown ones, read from Redis
    as ``version`` and from its own snapshot: the same answers."""
    snapshots = sorted(p for p in directory.parent.iterdir() if (p / "items.parquet").is_file())
    users = set().union(*(pd.read_parquet(p / "users.parquet")["user_id"] for p in snapshots)) | {12345}
    items = np.array(sorted(set().union(*(pd.read_parquet(p / "items.parquet")["item_id"] for p in snapshots))))
    names = set().union(*(read_lists(p).column("list").to_pylist() for p in snapshots)) | {"unknown"}
    embedded = EmbeddedStore.open(directory, version)
    on_redis = RedisStore(server.host, server.port, version, timeout_s=2.0)
    try:
        for user in sorted(users):
            assert on_redis.user_features(user) == embedded.user_features(user), (version, user)
        requested = np.append(items, [-1, 999])
        got, want = on_redis.item_features(requested), embedded.item_features(requested)
        np.testing.assert_array_equal(got.found, want.found)
        assert list(got.features.columns) == list(want.features.columns)
        for column in want.features.columns:
            for i, (a, b) in enumerate(zip(got.features[column], want.features[column], strict=True)):
                assert repr(a) == repr(b), (version, column, requested[i], a, b)  # -0.0 is not 0.0
        for name in sorted(names):
            for a, b in zip(on_redis.get_list(name), embedded.get_list(name), strict=True):
                np.testing.assert_array_equal(a, b, err_msg=f"{version} {name}")
    finally:
        on_redis.close()


def test_redis_deltas_write_only_their_changes_and_answer_as_their_snapshots(redis_server, tmp_path):
    host, port = redis_server.host, redis_server.port
    snapshots = delta_versions(tmp_path / "snapshots")
    assert load_snapshot_into_redis(snapshots["v1"], host, port, "v1") is None
    assert redis_base(host, port, "v1") == "v1" and redis_base(host, port, "v2") is None
    assert load_snapshot_into_redis(snapshots["v2"], host, port, "v2", base=Snapshot("v1", snapshots["v1"])) == "v1"
    assert redis_base(host, port, "v2") == "v1"  # a delta's successor reads through the same base
    assert load_snapshot_into_redis(snapshots["v3"], host, port, "v3", base=Snapshot("v1", snapshots["v1"])) == "v1"
    assert load_snapshot_into_redis(snapshots["v4"], host, port, "v4", base=Snapshot("v1", snapshots["v1"])) is None

    metadata = {"schema:user", "schema:item", "base", "begun", "complete"}
    written = {version: {key.decode().removeprefix(f"recstack:{version}:") for key in redis_keys(redis_server, version)}
               for version in ("v2", "v3")}
    assert written["v2"] == metadata | {  # user:42 and user:7 (lists in a linked group) are the base's
        "user:7", "user:99", "user:1000000007", "item:10", "item:3", "item:5", "item:8", "item:1", "item:11",
        "list:popular", "list:similar:3", "list:retired", "list:new"}
    assert written["v3"] == metadata | {  # its users are v1's; item 3 is back to v1's; an empty list is no list
        "item:10", "item:5", "item:8", "item:1", "item:11", "list:popular", "list:similar:3", "list:retired"}
    with redis.Redis(host, port) as client:
        assert client.get("recstack:v2:item:1") == b"" and client.get("recstack:v2:list:retired") == b""
        assert client.smembers("recstack:v1:dependents") == {b"v2", b"v3"}
    assert len(redis_keys(redis_server, "v4")) > 100  # a schema change loads in full
    for version, directory in snapshots.items():
        assert_answers_as_snapshot(redis_server, version, directory)
    assert RedisStore(host, port, "v2").base == "v1" and RedisStore(host, port, "v4").base is None

    v1_items = make_items().assign(price=np.float32([9.99, 0.1, 3.5, 0, 1, 7]))
    same = write_version(tmp_path / "snapshots", "same", make_users(), v1_items, {},
                         linked={group: snapshots["v1"] for group in ("hot", "old", "user")})
    load_snapshot_into_redis(same, host, port, "same", base=Snapshot("v1", snapshots["v1"]))
    assert len(redis_keys(redis_server, "same")) == len(metadata)  # nothing differs from v1
    assert_answers_as_snapshot(redis_server, "same", same)


def test_redis_delta_from_the_tables_write_snapshot_returns_equals_one_from_its_files(redis_server, tmp_path):
    """`write_snapshot` returns the tables as its files read back (a list column's value field
    named as parquet names it), so loading from them writes the keys and values the files give."""
    host, port = redis_server.host, redis_server.port
    snapshots = delta_versions(tmp_path / "snapshots")
    load_snapshot_into_redis(snapshots["v1"], host, port, "v1")
    items = with_filler(make_items().assign(price=np.float32([9.99, 0.1, 3.5, 0, 1, 7])))
    items.at[0, "genres"] = [1, 5]
    items.loc[1, "title"] = "Aliens"
    directory = tmp_path / "next"
    directory.mkdir()
    tables = write_snapshot(directory, make_users(), items, {"hot": list_frame({"popular": [(10, 0.9)]})})
    for table, name in zip(tables, ("users", "items"), strict=True):
        read = pq.read_table(directory / f"{name}.parquet")
        assert table.equals(read)
        assert table.schema.serialize().to_pybytes() == read.schema.serialize().to_pybytes()
    base = Snapshot("v1", snapshots["v1"])
    assert load_snapshot_into_redis(directory, host, port, "files", base=base) == "v1"
    assert load_snapshot_into_redis(directory, host, port, "tables", base=base, tables=tables) == "v1"
    with redis.Redis(host, port) as client:
        stored = [{key.decode().removeprefix(f"recstack:{version}:"): client.get(key)
                   for key in redis_keys(redis_server, version)} for version in ("files", "tables")]
    assert stored[0] == stored[1]
    assert {"item:10", "item:3", "list:popular"} <= stored[0].keys()


def test_redis_retention_keeps_a_base_while_a_delta_reads_through_it(redis_server, tmp_path):
    host, port = redis_server.host, redis_server.port
    snapshots = delta_versions(tmp_path / "snapshots")
    base = Snapshot("v1", snapshots["v1"])
    load_snapshot_into_redis(snapshots["v1"], host, port, "v1")
    for version in ("v2", "v3"):
        load_snapshot_into_redis(snapshots[version], host, port, version, base=base)
    v2 = RedisStore(host, port, "v2", timeout_s=2.0)
    with pytest.raises(StoreError, match=r"version 'v1' is the base of \['v2', 'v3'\]"):
        delete_version(host, port, "v1")
    delete_version(host, port, "v3")
    assert redis_keys(redis_server, "v3") == []
    assert_answers_as_snapshot(redis_server, "v2", snapshots["v2"])
    with redis.Redis(host, port) as client:
        client.delete("recstack:v1:complete")  # the base gone under a delta: its reads fail, never answer "unknown"
    with pytest.raises(StoreError, match=r"version 'v2' or its base 'v1' is not complete"):
        v2.item_features(np.array([3]))
    assert redis_base(host, port, "v2") is None  # nothing to load a delta over
    with pytest.raises(StoreError, match="'v1' is not complete"):
        load_snapshot_into_redis(snapshots["v3"], host, port, "v3", base=base)
    delete_version(host, port, "v2")
    delete_version(host, port, "v1")
    assert redis_keys(redis_server, "*") == []
    v2.close()


def test_redis_delta_loads_in_full_when_it_changes_too_much_and_refuses_a_delta_base(redis_server, tmp_path):
    host, port = redis_server.host, redis_server.port
    snapshots = delta_versions(tmp_path / "snapshots")
    load_snapshot_into_redis(snapshots["v1"], host, port, "v1")
    changed = tmp_path / "changed"
    changed.mkdir()
    write_snapshot(changed, make_users(), with_filler(make_items(" II"), " II"), {"all": make_lists()})
    assert load_snapshot_into_redis(changed, host, port, "changed", base=Snapshot("v1", snapshots["v1"])) is None
    assert_answers_as_snapshot(redis_server, "changed", changed)
    load_snapshot_into_redis(snapshots["v2"], host, port, "v2", base=Snapshot("v1", snapshots["v1"]))
    with pytest.raises(StoreError, match="base 'v2' is a delta itself"):
        load_snapshot_into_redis(snapshots["v3"], host, port, "v3", base=Snapshot("v2", snapshots["v2"]))
    with pytest.raises(StoreError, match="base 'absent' is not complete"):
        load_snapshot_into_redis(snapshots["v3"], host, port, "v3", base=Snapshot("absent", snapshots["v2"]))
    assert redis_base(host, port, "v3") is None
    ages = make_users()[["user_id", "age"]]
    none = write_version(tmp_path / "snapshots", "none", ages.iloc[:0], make_items(), {"all": make_lists()})
    back = write_version(tmp_path / "snapshots", "back", ages, make_items(), {"all": make_lists()})
    load_snapshot_into_redis(none, host, port, "none")  # a base without users
    assert load_snapshot_into_redis(back, host, port, "back", base=Snapshot("none", none)) == "none"
    assert_answers_as_snapshot(redis_server, "back", back)
