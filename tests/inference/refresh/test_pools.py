import gc
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from data.encoders import recent_items
from inference.refresh.pools import (
    POOL_COLUMNS,
    DuckDBOptions,
    Events,
    build_cooccurrence_similar,
    build_new_items,
    build_popular,
    build_similar_items,
    build_trending,
    build_user_lists,
    open_events,
    read_editorial,
    read_first_seen,
    read_last_time,
    read_latest_items,
)

NOW = 1_700_000_000
HOUR, DAY = 3600, 86_400


class BruteForce:
    """Exact inner-product search over (ids, vectors); records (queries, k) of each call.

    Past the catalogue it returns min(k, N) columns, like `inference.index`, or with ``pad``
    k columns padded with id -1, like raw FAISS.
    """

    def __init__(self, ids: np.ndarray, vectors: np.ndarray, pad: bool = False):
        self.ids, self.vectors, self.pad, self.calls = ids, vectors, pad, []

    def __call__(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        self.calls.append((len(queries), k))
        scores = queries @ self.vectors.T  # (B, N)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        width = k if self.pad else order.shape[1]
        ids = np.full((len(queries), width), -1, dtype=np.int64)
        out = np.full((len(queries), width), -np.inf, dtype=np.float32)
        ids[:, :order.shape[1]] = self.ids[order]
        out[:, :order.shape[1]] = np.take_along_axis(scores, order, axis=1)
        return ids, out


def _lists(pool: pd.DataFrame) -> dict[str, list[int]]:
    return {name: group["item_id"].tolist() for name, group in pool.groupby("list", sort=False, observed=True)}


def _check_pool(pool: pd.DataFrame) -> None:
    assert tuple(pool.columns) == POOL_COLUMNS
    assert pool["item_id"].dtype == np.int64 and pool["score"].dtype == np.float32
    assert not pool.duplicated(["list", "item_id"]).any()


OPTIONS = DuckDBOptions(memory_limit_gb=0.5, threads=2)


@pytest.fixture
def events_of(tmp_path):
    """``events_of(frame)``: the frame written to parquet and opened as `Events` (closed after the test)."""
    opened = []

    def open_frame(frame: pd.DataFrame) -> Events:
        path = tmp_path / f"interactions-{len(opened)}.parquet"
        frame.to_parquet(path, index=False)
        opened.append(Events(path, "label", OPTIONS))
        return opened[-1]

    yield open_frame
    for events in opened:
        events.close()


def _events(item_ids, timestamps) -> pd.DataFrame:
    n = len(item_ids)
    return pd.DataFrame(
        {
            "user_id": np.arange(n),
            "item_id": np.asarray(item_ids, dtype=np.int64),
            "timestamp": np.asarray(timestamps, dtype=np.int64),
            "label": np.ones(n, np.float32),
        }
    )


def test_popular_decay_halves_a_count_after_each_half_life(events_of):
    h = 6 * HOUR
    events = events_of(_events([1, 2, 3, 3, 4, 5], [NOW, NOW - h, NOW - 2 * h, NOW - 2 * h, NOW - 3 * h, NOW + 60]))
    pool = build_popular(events, NOW, h, k=10)
    _check_pool(pool)
    assert pool["list"].eq("popular").all()
    # item 5 is after now: ignored; 2 and 3 tie at 0.5 and the smaller id ranks first
    assert pool["item_id"].tolist() == [1, 2, 3, 4]
    assert pool["score"].tolist() == [1.0, 0.5, 0.5, 0.125]
    assert build_popular(events, NOW, h, k=2)["item_id"].tolist() == [1, 2]


def test_popular_matches_a_pandas_reference(events_of):
    rng = np.random.default_rng(0)
    frame = _events(rng.integers(0, 300, 5000), NOW - rng.integers(0, 30 * DAY, 5000))
    half_life = 3 * DAY
    reference = (
        frame.assign(w=0.5 ** ((NOW - frame["timestamp"]) / half_life))
        .groupby("item_id")["w"]
        .sum()
        .sort_values(ascending=False)
        .head(20)
    )
    pool = build_popular(events_of(frame), NOW, half_life, k=20)
    assert pool["item_id"].tolist() == reference.index.tolist()
    np.testing.assert_allclose(pool["score"], reference.to_numpy(), rtol=1e-6)


def test_trending_ranks_a_planted_spike_first(events_of):
    rng = np.random.default_rng(1)
    # 100 items with a steady ~10 events a day over 29 days, item 7 with 60 extra in the last day,
    # item 500 with a single event and nothing before it
    steady = rng.integers(0, 100, 29_000)
    steady_ts = NOW - rng.integers(0, 29 * DAY, 29_000)
    items = np.concatenate([steady, np.full(60, 7), [500]])
    times = np.concatenate([steady_ts, NOW - rng.integers(0, DAY, 60), [NOW - HOUR]])
    pool = build_trending(events_of(_events(items, times)), NOW, recent_s=DAY, baseline_s=28 * DAY, k=5)
    _check_pool(pool)
    assert pool["item_id"].iloc[0] == 7
    assert pool["score"].iloc[0] > 3
    assert (pool["score"] > 1).all() and pool["list"].eq("trending").all()
    # the lone event scores (1 + prior) / prior and stays far below the spike
    lone = build_trending(events_of(_events([500], [NOW - HOUR])), NOW, recent_s=DAY, baseline_s=28 * DAY, k=5)
    assert lone["score"].tolist() == [np.float32(6 / 5)]


def test_trending_score_follows_the_documented_formula(events_of):
    # item 1: 3 recent, 8 baseline over a baseline 4x the recent window -> (3+2)/(8/4+2) = 1.25
    # item 2: 1 recent, 8 baseline -> (1+2)/(2+2) < 1, not rising; item 3: only older than both windows
    recent, baseline, older = NOW - HOUR, NOW - 2 * DAY, NOW - 6 * DAY
    events = events_of(_events(
        [1] * 3 + [1] * 8 + [2] + [2] * 8 + [3] * 5,
        [recent] * 3 + [baseline] * 8 + [recent] + [baseline] * 8 + [older] * 5,
    ))
    pool = build_trending(events, NOW, recent_s=DAY, baseline_s=4 * DAY, k=5, prior=2.0)
    assert pool["item_id"].tolist() == [1]
    assert pool["score"].tolist() == [np.float32(1.25)]


def test_new_items_newest_first_within_max_age():
    ids = np.array([10, 11, 12, 13, 14, 15])
    first_seen = NOW - np.array([5, 100, 50, 101, -10, 50])
    pool = build_new_items(ids, first_seen, NOW, max_age_s=100, k=10)
    _check_pool(pool)
    # 13 is one second too old, 14 is not out yet; 12 and 15 tie on age
    assert pool["item_id"].tolist() == [10, 12, 15, 11]
    np.testing.assert_allclose(pool["score"], [0.95, 0.5, 0.5, 0.0])
    assert build_new_items(ids, first_seen, NOW, max_age_s=100, k=2)["item_id"].tolist() == [10, 12]
    with pytest.raises(ValueError, match=r"first_seen is missing for 1 items, e.g. \[11\]"):
        build_new_items(ids, np.where(ids == 11, np.nan, first_seen), NOW, 100, k=2)
    with pytest.raises(ValueError, match="first_seen has shape"):
        build_new_items(ids, first_seen[:3], NOW, 100, k=2)


def test_similar_items_exclude_self_and_match_brute_force():
    rng = np.random.default_rng(2)
    ids = rng.permutation(10_000)[:300].astype(np.int64)
    vectors = rng.standard_normal((300, 8)).astype(np.float32)
    search = BruteForce(ids, vectors)
    pool = build_similar_items(ids, vectors, search, k=5, batch_size=64)
    _check_pool(pool)
    sims = vectors @ vectors.T
    np.fill_diagonal(sims, -np.inf)
    expected = {f"similar:{i}": ids[np.argsort(-row)[:5]].tolist() for i, row in zip(ids, sims, strict=True)}
    assert _lists(pool) == expected
    assert list(_lists(pool)) == [f"similar:{i}" for i in ids]  # lists follow item_ids
    np.testing.assert_allclose(pool["score"], np.sort(sims, axis=1)[:, ::-1][:, :5].ravel(), rtol=1e-5)
    assert max(b for b, _ in search.calls) <= 64


def test_user_lists_exclude_seen_items_and_still_hold_n(events_of):
    rng = np.random.default_rng(3)
    item_ids = np.arange(100, 400, dtype=np.int64)
    items = rng.standard_normal((300, 8)).astype(np.float32)
    user_ids = np.arange(50, dtype=np.int64) * 7
    users = rng.standard_normal((50, 8)).astype(np.float32)
    # each user has seen a varying number of their own best items, so a plain top-n would be all seen
    best = np.argsort(-(users @ items.T), axis=1)
    seen = pd.DataFrame(
        [(u, item_ids[j]) for u, row, m in zip(user_ids, best, rng.integers(0, 40, 50), strict=True) for j in row[:m]]
        + [(9999, 100)],
        columns=["user_id", "item_id"],
    )
    search = BruteForce(item_ids, items)
    seen_events = events_of(seen.assign(timestamp=NOW, label=1.0))
    pool = build_user_lists(user_ids, users, search, seen_events, n=10, batch_size=16)
    _check_pool(pool)
    lists = _lists(pool)
    assert list(lists) == [f"user:{u}" for u in user_ids]
    for u, row in zip(user_ids, best, strict=True):
        seen_by_u = set(seen.loc[seen["user_id"] == u, "item_id"])
        reference = [i for i in item_ids[row] if i not in seen_by_u][:10]
        assert lists[f"user:{u}"] == reference
    assert max(b for b, _ in search.calls) <= 16

    search.calls.clear()  # a cap on the results a batch searches for cuts batches by their users' k
    assert _lists(build_user_lists(user_ids, users, search, seen_events, n=10, batch_results=120)) == lists
    assert len(search.calls) > 50 / 12 and all(b * k <= 120 for b, k in search.calls)


@pytest.mark.parametrize("pad", [False, True])
def test_user_lists_refetch_past_ineligible_items_and_stop_when_the_index_runs_out(pad, events_of):
    rng = np.random.default_rng(4)
    item_ids = np.arange(200, dtype=np.int64)
    items = rng.standard_normal((200, 4)).astype(np.float32)
    users = rng.standard_normal((3, 4)).astype(np.float32)
    eligible = item_ids[item_ids % 10 == 0]  # 20 items
    # user 2 has seen all but 3 eligible items
    seen = events_of(pd.DataFrame({"user_id": 2, "item_id": eligible[3:], "timestamp": NOW, "label": 1.0}))
    search = BruteForce(item_ids, items, pad)
    pool = build_user_lists(np.arange(3), users, search, seen, n=8, eligible=eligible)
    lists = _lists(pool)
    order = np.argsort(-(users @ items.T), axis=1)
    for u in (0, 1):
        assert lists[f"user:{u}"] == [i for i in item_ids[order[u]] if i % 10 == 0][:8]
    assert sorted(lists["user:2"]) == eligible[:3].tolist()
    assert max(k for _, k in search.calls) >= 200  # it doubled k until the index ran out


def test_cooccurrence_finds_a_planted_pair(events_of):
    rng = np.random.default_rng(5)
    background = pd.DataFrame({"user_id": rng.integers(0, 400, 3000), "item_id": rng.integers(0, 200, 3000)})
    pair_users = np.arange(1000, 1030)
    planted = pd.DataFrame({"user_id": np.repeat(pair_users, 2), "item_id": np.tile([500, 501], 30)})
    noise = pd.DataFrame({"user_id": pair_users, "item_id": rng.integers(0, 200, 30)})
    frame = pd.concat([background, planted, noise], ignore_index=True)
    frame["timestamp"] = np.arange(len(frame))
    pool = build_cooccurrence_similar(events_of(frame), k=5)
    _check_pool(pool)
    lists = _lists(pool)
    assert lists["similar:500"][0] == 501 and lists["similar:501"][0] == 500
    assert pool.loc[pool["list"] == "similar:500", "score"].iloc[0] == 1.0
    anchored = build_cooccurrence_similar(events_of(frame), k=5, anchors=np.array([500, 7]))
    assert list(_lists(anchored)) == ["similar:7", "similar:500"]
    assert _lists(anchored)["similar:500"] == lists["similar:500"]


def _cooccurrence_reference(events: pd.DataFrame, k: int, max_history: int,
                            eligible: np.ndarray | None = None) -> dict[str, list[int]]:
    """Dense cosine over each user's ``max_history`` latest distinct items, one user at a time."""
    history = {}
    for user, rows in events.groupby("user_id"):
        latest: dict[int, tuple[float, int]] = {}  # item -> (-time, row) of its latest row
        for row, (item, time) in enumerate(zip(rows["item_id"], rows["timestamp"], strict=True)):
            latest[item] = min(latest.get(item, (np.inf, 0)), (-time, row))
        history[user] = sorted(latest, key=latest.get)[:max_history]
    ids = np.unique([i for items in history.values() for i in items])
    m = np.zeros((len(history), len(ids)))
    for u, items in enumerate(history.values()):
        m[u, np.searchsorted(ids, items)] = 1
    counts, degree = m.T @ m, m.sum(0)
    out = {}
    for i, row in zip(ids, counts, strict=True):
        scored = [(-(c / np.sqrt(degree[ids == i][0] * d)), j) for j, c, d in zip(ids, row, degree, strict=True)
                  if c > 0 and j != i and (eligible is None or j in eligible)]
        if scored:
            out[f"similar:{i}"] = [j for _, j in sorted(scored)[:k]]
    return out


def test_cooccurrence_matches_dense_cosine(events_of):
    rng = np.random.default_rng(6)
    frame = pd.DataFrame(
        {
            "user_id": rng.integers(0, 60, 600),
            "item_id": rng.integers(0, 80, 600) * 3,
            "timestamp": rng.integers(0, 1000, 600),
        }
    )
    assert _lists(build_cooccurrence_similar(events_of(frame), k=4)) == _cooccurrence_reference(frame, 4, 100)


def test_cooccurrence_keeps_only_each_users_recent_history(events_of):
    # user 0 saw 1, then 2, then 3: with a history of 2, item 1 shares no user with 2 or 3
    events = events_of(pd.DataFrame({"user_id": [0, 0, 0, 1, 1], "item_id": [1, 2, 3, 1, 4],
                                     "timestamp": [1, 2, 3, 1, 2]}))
    assert _lists(build_cooccurrence_similar(events, k=5, max_history=2)) == {
        "similar:1": [4],
        "similar:2": [3],
        "similar:3": [2],
        "similar:4": [1],
    }
    assert _lists(build_cooccurrence_similar(events, k=5))["similar:1"] == [2, 3, 4]


def _write(tmp_path, text: str, name: str = "editorial.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_editorial_keeps_file_order_or_score_order(tmp_path):
    known = np.arange(100)
    pool = read_editorial(_write(tmp_path, "item_id\n42\n\n7\n13\n"), known)
    _check_pool(pool)
    assert pool["item_id"].tolist() == [42, 7, 13] and pool["list"].eq("editorial").all()
    np.testing.assert_allclose(pool["score"], [1, 2 / 3, 1 / 3])
    scored = read_editorial(_write(tmp_path, "item_id,score\n42,0.5\n7,0.9\n13,0.5\n"), known, eligible=[7, 42])
    assert scored["item_id"].tolist() == [7, 42] and scored["score"].tolist() == [np.float32(0.9), 0.5]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty editorial file"),
        ("item_id\n", "line 1: a header but no items"),
        ("id,score\n1,2\n", "line 1: header 'id,score'"),
        ("item_id\n1\n\nabc\n", "line 4: item_id 'abc' is not an integer"),
        ("item_id\n1\n2\n3\n99999\n", "line 5: item_id 99999 is not a known item"),
        ("item_id,score\n1,0.5\n2\n", r"line 3: expected 2 fields \(item_id,score\), got 1"),
        ("item_id,score\n1,high\n", "line 2: score 'high' is not a number"),
        ("item_id,score\n1,nan\n", "line 2: score 'nan' is not a finite number"),
        ("item_id\n5\n6\n5\n", "line 4: item_id 5 repeats line 2"),
    ],
)
def test_editorial_errors_name_the_file_and_line(tmp_path, text, message):
    path = _write(tmp_path, text)
    with pytest.raises(ValueError, match=message) as e:
        read_editorial(path, np.arange(100))
    assert str(e.value).startswith(str(path))


def test_bad_arguments_name_the_value(events_of, tmp_path):
    frame = _events([1, 2], [NOW, NOW])
    events = events_of(frame)
    with pytest.raises(ValueError, match="k must be an integer > 0, got 0"):
        build_popular(events, NOW, 10.0, k=0)
    with pytest.raises(ValueError, match="half_life_s must be > 0, got 0"):
        build_popular(events, NOW, 0, k=5)
    with pytest.raises(ValueError, match="baseline_s must be > 0, got -1"):
        build_trending(events, NOW, 10, -1, k=5)
    with pytest.raises(ValueError, match="max_history must be an integer > 0, got 0"):
        build_cooccurrence_similar(events, k=5, max_history=0)
    with pytest.raises(ValueError, match="interactions are missing column 'timestamp'"):
        events_of(frame.drop(columns="timestamp"))
    with pytest.raises(ValueError, match="interactions column 'user_id' has type VARCHAR"):
        events_of(frame.astype({"user_id": str}))
    with pytest.raises(ValueError, match="no such interactions file"):
        Events(tmp_path / "missing.parquet")
    with pytest.raises(ValueError, match="not a recstack dataset"):
        open_events(tmp_path)
    with pytest.raises(ValueError, match="memory_limit_gb must be > 0, got 0"):
        DuckDBOptions(memory_limit_gb=0)
    with pytest.raises(ValueError, match="threads must be an integer > 0, got 0"):
        DuckDBOptions(threads=0)
    with pytest.raises(ValueError, match="max_age_s must be > 0"):
        build_new_items(np.array([1]), np.array([NOW]), NOW, 0, k=5)
    vectors = np.ones((2, 3), dtype=np.float32)
    with pytest.raises(ValueError, match=r"item_ids repeats ids, e.g. \[4\]"):
        build_similar_items(np.array([4, 4]), vectors, BruteForce(np.array([1, 2]), vectors), k=1)
    with pytest.raises(ValueError, match=r"user_vectors has shape \(2, 3\); expected \(3, D\)"):
        build_user_lists(np.arange(3), vectors, BruteForce(np.array([1, 2]), vectors), events, n=1)

    def wide_search(queries, k):
        return np.zeros((len(queries), k + 1), dtype=np.int64), np.zeros((len(queries), k + 1), dtype=np.float32)

    with pytest.raises(ValueError, match=r"search returned ids \(2, 3\) .* expected \(2, at most 2\)"):
        build_similar_items(np.array([1, 2]), vectors, wide_search, k=1)


def _tied_dataset(directory: Path) -> Path:
    """A dataset directory whose interactions tie often: 40 items, whole-day timestamps, labels 0/1."""
    rng = np.random.default_rng(7)
    n = 6000
    frame = pd.DataFrame({"user_id": rng.integers(0, 150, n), "item_id": rng.integers(0, 40, n) * 5,
                          "timestamp": NOW - rng.integers(0, 60, n) * DAY, "label": rng.integers(0, 2, n)})
    directory.mkdir()
    frame.to_parquet(directory / "interactions.parquet")
    (directory / "schema.json").write_text('{"name": "tied", "features": []}')
    return directory


@pytest.fixture(params=["tiny", "tied"])
def dataset_dir(request, tmp_path):
    return request.getfixturevalue("tiny_dataset") if request.param == "tiny" else _tied_dataset(tmp_path / "tied")


def _ranked(name: str, scores: dict[int, float], k: int) -> pd.DataFrame:
    """The top k of ``scores`` (item -> score), by score then smaller id, as a pool."""
    top = sorted(scores, key=lambda i: (-scores[i], i))[:k]
    return pd.DataFrame({"list": name, "item_id": np.array(top, dtype=np.int64),
                         "score": np.array([scores[i] for i in top], dtype=np.float32)})


def _popular_reference(events: pd.DataFrame, now: int, half_life: float, k: int) -> pd.DataFrame:
    """Each item's weights summed exactly (math.fsum), weights from libm's pow."""
    past = events[events["timestamp"] <= now]
    return _ranked("popular", {item: math.fsum(math.pow(0.5, (now - t) / half_life) for t in times.astype(float))
                               for item, times in past.groupby("item_id")["timestamp"]}, k)


def _trending_reference(events: pd.DataFrame, now: int, recent_s: float, baseline_s: float, k: int,
                        prior: float = 5.0) -> pd.DataFrame:
    t = events["timestamp"].astype(float)
    window = events[(t <= now) & (t > now - recent_s - baseline_s)]
    recent = (window["timestamp"] > now - recent_s).groupby(window["item_id"]).agg(["sum", "count"])
    scores = {item: (r + prior) / ((c - r) * recent_s / baseline_s + prior)
              for item, r, c in zip(recent.index, recent["sum"].astype(float), recent["count"], strict=True)}
    return _ranked("trending", {item: s for item, s in scores.items() if s > 1}, k)


def _same_lists(built: pd.DataFrame, expected: pd.DataFrame) -> None:
    _check_pool(built)
    assert built["list"].tolist() == expected["list"].tolist()
    assert built["item_id"].tolist() == expected["item_id"].tolist()
    np.testing.assert_array_equal(built["score"].to_numpy(), expected["score"].to_numpy())


def test_pools_equal_naive_references_on_the_test_datasets(dataset_dir):
    positives = pd.read_parquet(dataset_dir / "interactions.parquet")
    positives = positives[positives["label"] > 0]
    now = int(positives["timestamp"].max())
    items, users = np.unique(positives["item_id"]), np.unique(positives["user_id"])
    rng = np.random.default_rng(8)
    item_vectors = rng.standard_normal((len(items), 4)).astype(np.float32)
    user_vectors = rng.standard_normal((len(users), 4)).astype(np.float32)
    search = BruteForce(items, item_vectors)
    best = items[np.argsort(-(user_vectors @ item_vectors.T), axis=1, kind="stable")]
    seen = positives.groupby("user_id")["item_id"].agg(set)
    with open_events(dataset_dir, OPTIONS) as events:
        for eligible in (None, items[rng.random(len(items)) < 0.7]):
            allowed = positives if eligible is None else positives[positives["item_id"].isin(eligible)]
            for half_life in (HOUR, DAY, 7 * DAY):
                _same_lists(build_popular(events, now, half_life, 1000, eligible),
                            _popular_reference(allowed, now, half_life, 1000))
            for recent, baseline in ((DAY, 30 * DAY), (7 * DAY, 14 * DAY)):
                _same_lists(build_trending(events, now, recent, baseline, 1000, eligible=eligible),
                            _trending_reference(allowed, now, recent, baseline, 1000))
            for history in (3, 100):
                assert (_lists(build_cooccurrence_similar(events, 7, history, eligible))
                        == _cooccurrence_reference(positives, 7, history, None if eligible is None else set(eligible)))
            lists = _lists(build_user_lists(users, user_vectors, search, events, 6, eligible, batch_size=16))
            unseen = {u: [i for i in row if i not in seen[u] and (eligible is None or i in eligible)]
                      for u, row in zip(users, best, strict=True)}
            assert lists == {f"user:{u}": items[:6] for u, items in unseen.items()}
        first = positives.groupby("item_id")["timestamp"].min()
        ids, first_seen = read_first_seen(events)
        assert ids.tolist() == first.index.tolist() and first_seen.tolist() == first.tolist()


@pytest.mark.parametrize("until", [None, 0.5])
def test_latest_items_and_last_time_equal_the_frame_computation(dataset_dir, until):
    """What the refresh computed from the whole interaction frame: each user's latest items as
    `recent_items` of a probe row after all of theirs, and the last positive time; after
    `Events.until` a time (the median one), those of the rows up to it alone."""
    positives = pd.read_parquet(dataset_dir / "interactions.parquet")
    positives = positives[positives["label"] > 0][["user_id", "item_id", "timestamp"]]
    if until is not None:
        cut = int(positives["timestamp"].quantile(until))
        positives = positives[positives["timestamp"] <= cut]
    users = np.append(np.unique(positives["user_id"])[::-1], 10**9)  # not sorted; the last one has no rows
    probe = pd.DataFrame({"user_id": users, "item_id": -1, "timestamp": np.iinfo(np.int64).max})
    rows = pd.concat([positives, probe], ignore_index=True)
    with open_events(dataset_dir, OPTIONS) as events:
        if until is not None:
            events.until(cut)
        assert read_last_time(events) == positives["timestamp"].max()
        for max_len in (1, 3, 50):
            expected = recent_items(rows, max_len).iloc[len(positives):].tolist()
            assert read_latest_items(events, users, max_len).to_pylist() == expected


def test_popular_sums_are_exact_whatever_the_row_order(events_of):
    # 0.1 + 0.2 + 0.3 is 0.6000000000000001 added left to right, 0.6 right to left: summed in file order,
    # item 2 (0.1, 0.2, 0.3) would outrank item 1 (0.3, 0.2, 0.1); an exact sum
    # ties the two items in any order (the weights are those of the ages below at a half-life of 1)
    ages = -np.log2([0.1, 0.2, 0.3])
    frame = _events([1, 1, 1, 2, 2, 2], [0, 0, 0, 0, 0, 0]).assign(timestamp=-np.concatenate([ages[::-1], ages]))
    pool = build_popular(events_of(frame), 0, 1.0, k=2)
    assert pool["item_id"].tolist() == [1, 2] and pool["score"].tolist() == [np.float32(0.6)] * 2
    weights = [math.pow(0.5, a) for a in ages]
    assert sum(weights) != sum(weights[::-1])  # the case is one where the order matters


def test_duckdb_runs_within_its_memory_limit_spilling_under_temp_directory(tmp_path):
    rng = np.random.default_rng(9)
    n = 200_000
    path = tmp_path / "interactions.parquet"
    pd.DataFrame({"user_id": rng.integers(0, 25_000, n), "item_id": rng.integers(0, 5_000, n),
                  "timestamp": rng.integers(0, 10**6, n)}).to_parquet(path)
    spill = tmp_path / "spill"
    spill.mkdir()
    with Events(path, options=DuckDBOptions(memory_limit_gb=0.05, threads=1, temp_directory=spill)) as events:
        settings = dict(events.con.execute("SELECT name, value FROM duckdb_settings() "
                                           "WHERE name IN ('memory_limit', 'temp_directory', 'threads')").fetchall())
        assert settings["memory_limit"] == "47.6 MiB" and settings["threads"] == "1"
        assert [Path(settings["temp_directory"])] == list(spill.iterdir())  # the connection's own directory
        pool = build_cooccurrence_similar(events, k=3, max_history=20)  # 1.4M pairs
    assert pool["list"].nunique() == 5_000
    assert not list(spill.iterdir())


def test_events_left_open_remove_their_spill_directory_when_collected(tmp_path):
    path = tmp_path / "interactions.parquet"
    _events([1], [NOW]).to_parquet(path)
    events = Events(path, options=DuckDBOptions(temp_directory=tmp_path))
    spill = events.spill
    assert spill.parent == tmp_path and spill.is_dir()
    del events
    gc.collect()
    assert not spill.exists()
