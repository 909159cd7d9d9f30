"""Loading a store snapshot into Redis: `load_snapshot_into_redis` against a per-row baseline.

    python benchmarks/redis_load.py            # 1M items, 500k users, 10M list rows
    python benchmarks/redis_load.py --small    # 100k items: a quick run

A synthetic snapshot (items: category, price, year, tags, available; users: age, country; lists:
one of 20 items per user) is written once, then loaded into a private redis-server (no
persistence) twice, each time into an empty server: by `load_snapshot_into_redis` (JSON built a
column at a time with Arrow, lists packed at once, MSET commands packed as Arrow buffers and
pipelined) and by the per-row encoding it replaced (`json.dumps` per row and `_pack_list` per
list, redis-py's `mset`; the lists grouped by the store's current `_list_runs`). Both are read
back and must answer alike. Then the next version (1% of items with a new price, 0.5% new items;
users and lists hard-linked, as an incremental refresh carries them) is loaded as a delta over
the first, as `recstack refresh --incremental` does, and must answer as its snapshot. No pass
line: the ratios are the result.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from contextlib import contextmanager
from itertools import islice
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import redis
from report import describe_machine, finish

from inference.store import LISTS, EmbeddedStore, RedisStore, Snapshot, load_snapshot_into_redis, write_snapshot

ROOT = Path(__file__).resolve().parents[1]
FULL = {"items": 1_000_000, "users": 500_000}
SMALL = {"items": 100_000, "users": 50_000}
LIST_LENGTH = 20


def make_snapshot(directory: Path, items: int, users: int) -> None:
    rng = np.random.default_rng(0)
    tags = np.array(["action", "drama", "comedy", "docs", "kids"], dtype=object)
    catalogue = pd.DataFrame({
        "item_id": np.arange(1, items + 1),
        "category": rng.choice([f"category {c}" for c in range(200)], items),
        "price": rng.gamma(2.0, 10.0, items).astype(np.float32),
        "year": np.where(rng.random(items) < 0.05, np.nan, rng.integers(1950, 2026, items)).astype(np.float32),
        "tags": [tags[rng.random(5) < 0.3].tolist() for _ in range(items)],
        "available": rng.random(items) < 0.95,
    })
    people = pd.DataFrame({"user_id": np.arange(1, users + 1), "age": rng.integers(16, 90, users),
                           "country": rng.choice(["fr", "de", "us", "jp", "br"], users)})
    lists = pd.DataFrame({"list": np.repeat([f"user:{u}" for u in range(1, users + 1)], LIST_LENGTH),
                          "item_id": rng.integers(1, items + 1, users * LIST_LENGTH),
                          "score": rng.random(users * LIST_LENGTH).astype(np.float32)})
    write_snapshot(directory, people, catalogue, lists)


def next_snapshot(snapshot: Path, directory: Path) -> None:
    """The snapshot's next version: 1% of items get a new price, 0.5% new items; users and lists hard-linked."""
    rng = np.random.default_rng(1)
    items = pd.read_parquet(snapshot / "items.parquet")
    changed = rng.choice(len(items), len(items) // 100, replace=False)
    items.loc[changed, "price"] = items.loc[changed, "price"] * 1.5 + 1
    added = items.iloc[rng.choice(len(items), len(items) // 200, replace=False)].assign(
        item_id=lambda new: np.arange(len(new)) + items["item_id"].max() + 1)
    (directory / LISTS).mkdir(parents=True)
    pd.concat([items, added], ignore_index=True).to_parquet(directory / "items.parquet", index=False)
    for name in ["users.parquet", *(f"{LISTS}/{p.name}" for p in (snapshot / LISTS).iterdir())]:
        os.link(snapshot / name, directory / name)


def timed_delta_load(snapshot: Path, following: Path, scratch: Path) -> tuple[float, float, int, bool]:
    """Seconds to load ``following`` as a delta over ``snapshot`` (loaded first, untimed) and to
    load it in full into another empty server; the keys the delta wrote; whether it answers as
    its snapshot on a sample of items, users and lists."""
    with redis_server(scratch) as client:
        load_snapshot_into_redis(snapshot, "127.0.0.1", 6390, "v0001", 60.0)
        keys = client.dbsize()
        started = time.perf_counter()
        base = load_snapshot_into_redis(following, "127.0.0.1", 6390, "v0002", 60.0, Snapshot("v0001", snapshot))
        seconds = time.perf_counter() - started
        keys = client.dbsize() - keys
        store, embedded = RedisStore("127.0.0.1", 6390, "v0002", timeout_s=10), EmbeddedStore.open(following, "v0002")
        items, users = (pq.read_metadata(following / f"{table}.parquet").num_rows for table in ("items", "users"))
        ids = np.arange(0, items + 2, 97)  # with unknown ids at both ends
        same = (base == "v0001" and store.item_features(ids).features.equals(embedded.item_features(ids).features)
                and all(store.user_features(u) == embedded.user_features(u)
                        and np.array_equal(store.get_list(f"user:{u}")[0], embedded.get_list(f"user:{u}")[0])
                        for u in range(0, users + 2, 997)))
        store.close()
    with redis_server(scratch):
        started = time.perf_counter()
        load_snapshot_into_redis(following, "127.0.0.1", 6390, "v0002", 60.0)
        full_seconds = time.perf_counter() - started
    return seconds, full_seconds, keys, same


def baseline_load(directory: Path, client: redis.Redis, version: str) -> None:
    """The per-row load `load_snapshot_into_redis` replaced: JSON per row, redis-py MSET of 5,000 keys."""
    from inference.store import _key, _list_runs, _pack_list, read_lists

    def write(pairs) -> None:
        pairs = iter(pairs)
        while batch := dict(islice(pairs, 5_000)):
            client.mset(batch)

    for kind in ("user", "item"):
        table = pq.read_table(directory / f"{kind}s.parquet")
        ids, features = table[f"{kind}_id"], table.drop_columns([f"{kind}_id"])
        rows = zip(*(column.to_pylist() for column in features.columns), strict=True)
        keys = (_key(version, kind, i) for i in ids.to_pylist())
        write((key, json.dumps(row, separators=(",", ":"))) for key, row in zip(keys, rows, strict=True))
        client.set(_key(version, "schema", kind), features.schema.serialize().to_pybytes())
    names, bounds, ids, scores = _list_runs(read_lists(directory))
    write((_key(version, "list", name), _pack_list(ids[s:e], scores[s:e]))
          for name, s, e in zip(names, bounds[:-1], bounds[1:], strict=True))
    client.set(_key(version, "complete"), 1)


@contextmanager
def redis_server(directory: Path, port: int = 6390):
    process = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                "--appendonly", "no", "--dir", str(directory)], stdout=subprocess.DEVNULL)
    client = redis.Redis("127.0.0.1", port, socket_timeout=60)
    try:
        for _ in range(200):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        yield client
    finally:
        client.close()
        process.kill()
        process.wait()


def timed_load(snapshot: Path, scratch: Path, load) -> tuple[float, float, dict, pd.DataFrame]:
    """Seconds to load into an empty server, its memory (MiB), and what it answers for some ids."""
    with redis_server(scratch) as client:
        started = time.perf_counter()
        load(client)
        seconds = time.perf_counter() - started
        memory = client.info("memory")["used_memory"] / 2**20
        store = RedisStore("127.0.0.1", client.connection_pool.connection_kwargs["port"], "v0001", timeout_s=10)
        answers = {"user": store.user_features(12_345), "list": store.get_list("user:777")[0].tolist()}
        items = store.item_features(np.arange(0, 200_000, 997)).features
        store.close()
    return seconds, memory, answers, items


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="100k items: a quick run")
    args = parser.parse_args()
    sizes = SMALL if args.small else FULL
    with tempfile.TemporaryDirectory() as tmp:
        snapshot, scratch = Path(tmp) / "snapshot", Path(tmp) / "redis"
        snapshot.mkdir()
        scratch.mkdir()
        make_snapshot(snapshot, sizes["items"], sizes["users"])
        runs = {
            "load_snapshot_into_redis": timed_load(
                snapshot, scratch, lambda c: load_snapshot_into_redis(snapshot, "127.0.0.1", 6390, "v0001", 60.0)),
            "baseline (json.dumps per row, redis-py mset)": timed_load(
                snapshot, scratch, lambda c: baseline_load(snapshot, c, "v0001")),
        }
        reference = EmbeddedStore.open(snapshot, "v0001").item_features(np.arange(0, 200_000, 997)).features
        next_snapshot(snapshot, Path(tmp) / "next")
        delta_s, full_s, delta_keys, delta_same = timed_delta_load(snapshot, Path(tmp) / "next", scratch)
        shutil.rmtree(scratch)
    (new_s, new_mib, new_answers, new_items), (old_s, old_mib, old_answers, old_items) = runs.values()
    pd.testing.assert_frame_equal(new_items, reference)
    pd.testing.assert_frame_equal(old_items, reference)
    keys = sizes["items"] + sizes["users"] * 2
    lines = [f"Redis load of {sizes['items']:,} items, {sizes['users']:,} users and {sizes['users']:,} lists of "
             f"{LIST_LENGTH} ({keys:,} keys), one client, loopback", "",
             "| load | seconds | keys/s | redis MiB | time / baseline |", "|---|---:|---:|---:|---:|"]
    for name, (seconds, mib, _, _) in runs.items():
        lines.append(f"| {name} | {seconds:.2f} | {keys / seconds:,.0f} | {mib:,.0f} | {seconds / old_s:.3f} |")
    lines += ["", "The next version (1% of items changed, 0.5% added; users and lists linked):", "",
              "| load | seconds | keys written | time / full |", "|---|---:|---:|---:|",
              f"| in full | {full_s:.2f} | {keys + sizes['items'] // 200:,} | 1.000 |",
              f"| as a delta over the first | {delta_s:.2f} | {delta_keys:,} | {delta_s / full_s:.3f} |",
              "", f"The delta answers as its snapshot: {delta_same}"]
    same = new_answers == old_answers and delta_same
    result = {"machine": describe_machine(), "sizes": sizes, "keys": keys,
              "seconds": {name: run[0] for name, run in runs.items()},
              "redis_mib": {name: run[1] for name, run in runs.items()}, "ratio": new_s / old_s,
              "next_version": {"full_s": full_s, "delta_s": delta_s, "delta_keys": delta_keys,
                               "delta_ratio": delta_s / full_s, "same_answers": delta_same},
              "same_answers": same, "passed": same}
    return finish(result, "\n".join(lines), ROOT / "benchmarks" / "results" / "redis_load.json")


if __name__ == "__main__":
    raise SystemExit(main())
