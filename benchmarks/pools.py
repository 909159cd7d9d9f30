"""Candidate pools in DuckDB against the pandas pools they replaced, on one synthetic log, in one run.

    python benchmarks/pools.py                  # 1M items, 100k users, 10M interactions: both engines
    python benchmarks/pools.py --small          # 50k items, 10k users, 1M interactions: a quick run
    python benchmarks/pools.py --items 10000000 --users 1000000 --interactions 100000000 --no-baseline

Steps: write a synthetic interaction log to parquet, a row group at a time (items drawn from a
power law, times over 90 days, 80% positive labels); then build the lists the refresh builds
from interactions, each engine in a child process whose wall time and peak RSS come from wait4:

    popular (k 500), trending (k 200), new (first interactions, k 200), the 10,000 hottest items
    (the similar lists' anchors), and a list of 10 unseen items for every user

User lists search a fixed index, the same ranking for every user, hottest items first, so each
list must skip the user's seen items: the work measured is the exclusion, not a search.

- ``duckdb``: `inference.refresh.pools` over the parquet file, with a memory limit
  (``--memory-gb``) and one thread per core;
- ``pandas``: the pandas builders of revision ``--baseline`` (loaded with ``git show``), after
  reading the file into a frame as the refresh then did.

It passes when both engines give the same lists, ties included, and the DuckDB one stays within
its memory limit plus 2 GiB for the interpreter, the user lists and the frames returned
(``--no-baseline``: the DuckDB engine alone, e.g. at a size the pandas one cannot hold).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from report import describe_machine, finish

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from inference.refresh import pools  # noqa: E402

FULL = {"users": 100_000, "items": 1_000_000, "interactions": 10_000_000}
SMALL = {"users": 10_000, "items": 50_000, "interactions": 1_000_000}
BASELINE = "5b5d2ae"  # the last revision whose pools ran in pandas
DAY = 86_400
NOW = 1_700_000_000
ROW_GROUP = 5_000_000
LISTS = {"popular": 500, "trending": 200, "new": 200, "hot": 10_000, "user": 10}
HEADROOM_GIB = 2.0


def write_log(path: Path, sizes: dict, seed: int) -> None:
    """``sizes['interactions']`` rows of (user_id, item_id, timestamp, label), a row group at a time."""
    rng = np.random.default_rng(seed)
    ids = rng.permutation(sizes["items"])  # item ids in popularity order, so ids do not follow it
    schema = pa.schema([("user_id", pa.int64()), ("item_id", pa.int64()), ("timestamp", pa.int64()),
                        ("label", pa.float32())])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, sizes["interactions"], ROW_GROUP):
            n = min(ROW_GROUP, sizes["interactions"] - start)
            rank = (sizes["items"] * rng.random(n) ** 3).astype(np.int64)  # a power law: low ranks are hot
            writer.write_table(pa.table({
                "user_id": rng.integers(0, sizes["users"], n), "item_id": ids[rank],
                "timestamp": NOW - rng.integers(0, 90 * DAY, n),
                "label": (rng.random(n) < 0.8).astype(np.float32)}, schema=schema))


def fixed_search(ranking: np.ndarray):
    """The same ranking for every query: hottest first, scores falling with rank."""
    def search(queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = min(k, len(ranking))
        ids = np.broadcast_to(ranking[:k], (len(queries), k))
        return ids, np.broadcast_to(-np.arange(k, dtype=np.float32), (len(queries), k))
    return search


def build_lists(engine: ModuleType, source: object, first_seen: Callable[[], tuple], users: np.ndarray,
                seconds: dict[str, float]) -> dict[str, pd.DataFrame]:
    """Every list of `LISTS` from ``engine``'s builders over ``source`` (its interactions), timed into ``seconds``."""
    built = {}
    for name, k in LISTS.items():
        start = time.perf_counter()
        if name in ("popular", "hot"):
            built[name] = engine.build_popular(source, NOW, 7 * DAY, k)
        elif name == "trending":
            built[name] = engine.build_trending(source, NOW, DAY, 30 * DAY, k)
        elif name == "new":
            built[name] = engine.build_new_items(*first_seen(), NOW, 30 * DAY, k)
        else:
            search = fixed_search(built["hot"]["item_id"].to_numpy())
            built[name] = engine.build_user_lists(users, np.zeros((len(users), 1), np.float32), search, source, k)
        seconds[name] = time.perf_counter() - start
    return built


def build_duckdb(data: Path, users: np.ndarray, memory_gb: float) -> tuple[dict[str, pd.DataFrame], dict]:
    """The lists and the seconds each took, from `inference.refresh.pools`."""
    seconds = {}
    with pools.Events(data, "label", pools.DuckDBOptions(memory_limit_gb=memory_gb)) as events:
        return build_lists(pools, events, lambda: pools.read_first_seen(events), users, seconds), seconds


def build_pandas(data: Path, users: np.ndarray, revision: str) -> tuple[dict[str, pd.DataFrame], dict]:
    """The lists and the seconds each took (and the read), from the pandas pools of ``revision``."""
    source = subprocess.run(["git", "show", f"{revision}:inference/refresh/pools.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location("baseline_pools", f.name)
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)
    os.unlink(f.name)
    start = time.perf_counter()
    rows = pd.read_parquet(data)
    rows = rows[rows["label"] > 0]
    seconds = {"read": time.perf_counter() - start}

    def first_seen() -> tuple[np.ndarray, np.ndarray]:
        first = rows.groupby("item_id")["timestamp"].min()
        return first.index.to_numpy(), first.to_numpy()

    return build_lists(old, rows, first_seen, users, seconds), seconds


def run_child(engine: str, data: Path, out: Path, args: argparse.Namespace) -> dict:
    """Wall seconds, CPU seconds, peak RSS (GiB) and per-list seconds of one engine in a child process."""
    cmd = [sys.executable, __file__, "--child", engine, "--data", str(data), "--out", str(out),
           "--users", str(args.users), "--memory-gb", str(args.memory_gb), "--baseline", args.baseline]
    start = time.perf_counter()
    child = subprocess.Popen(cmd, cwd=ROOT)
    _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {os.waitstatus_to_exitcode(status)}")
    return {"wall_s": time.perf_counter() - start, "cpu_s": usage.ru_utime + usage.ru_stime,
            "peak_rss_gib": usage.ru_maxrss / 2**20, "lists_s": json.loads((out / "seconds.json").read_text())}


def child_main(args: argparse.Namespace) -> int:
    users = np.arange(args.users, dtype=np.int64)
    if args.child == "duckdb":
        built, seconds = build_duckdb(args.data, users, args.memory_gb)
    else:
        built, seconds = build_pandas(args.data, users, args.baseline)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, frame in built.items():
        frame.to_parquet(args.out / f"{name}.parquet", index=False)
    (args.out / "seconds.json").write_text(json.dumps(seconds))
    return 0


def same_lists(a: Path, b: Path) -> dict[str, bool]:
    return {name: pd.read_parquet(a / f"{name}.parquet").equals(pd.read_parquet(b / f"{name}.parquet"))
            for name in LISTS}


def format_table(result: dict) -> str:
    m, s = result["machine"], result["sizes"]
    engines = result["engines"]
    rows = ["| engine | wall (s) | CPU (s) | peak RSS (GiB) | "
            + " | ".join(f"{name} (s)" for name in ["read", *LISTS]) + " |",
            "|---|---:|---:|---:|" + "---:|" * (len(LISTS) + 1)]
    for engine, r in engines.items():
        per = " | ".join(f"{r['lists_s'][name]:.1f}" if name in r["lists_s"] else "" for name in ["read", *LISTS])
        rows.append(f"| {engine} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['peak_rss_gib']:.2f} | {per} |")
    same = result.get("same_lists")
    return "\n".join([
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; Python {m['python']}, "
        f"pandas {m['pandas']}, pyarrow {m['pyarrow']}; load average {m['load_average_1min']:.1f} at the start",
        f"Sizes: {s['users']:,} users, {s['items']:,} items, {s['interactions']:,} interactions "
        f"({result['log_gib']:.2f} GiB of parquet), seed {result['seed']}; "
        f"DuckDB memory limit {result['memory_gb']} GiB",
        "", *rows, "",
        "Same lists as the baseline, ties included: "
        + ("not run" if same is None else ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in same.items())),
        f"DuckDB peak RSS within its limit + {HEADROOM_GIB} GiB: "
        + ("pass" if result["within_memory"] else "FAIL"),
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help=f"quick run at {SMALL}")
    for name in FULL:
        parser.add_argument(f"--{name}", type=int, help=f"default {FULL[name]:,} ({SMALL[name]:,} with --small)")
    parser.add_argument("--no-baseline", action="store_true", help="run the DuckDB engine alone")
    parser.add_argument("--baseline", default=BASELINE, help="the revision whose pandas pools to run")
    parser.add_argument("--memory-gb", type=float, default=3.0, help="DuckDB's memory limit")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, help="where the log is written (default: a temporary directory)")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "pools.json")
    parser.add_argument("--child", choices=["duckdb", "pandas"], help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child_main(args)
    sizes = {name: getattr(args, name) or (SMALL if args.small else FULL)[name] for name in FULL}
    args.users = sizes["users"]

    machine = describe_machine()
    with tempfile.TemporaryDirectory(prefix="pools-", dir=args.workdir) as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        write_log(tmp / "interactions.parquet", sizes, args.seed)
        print(f"wrote {sizes['interactions']:,} interactions in {time.perf_counter() - start:.0f} s", flush=True)
        engines = {"duckdb": run_child("duckdb", tmp / "interactions.parquet", tmp / "duckdb", args)}
        if not args.no_baseline:
            engines["pandas"] = run_child("pandas", tmp / "interactions.parquet", tmp / "pandas", args)
        same = None if args.no_baseline else same_lists(tmp / "duckdb", tmp / "pandas")
        log_gib = (tmp / "interactions.parquet").stat().st_size / 2**30
    within = engines["duckdb"]["peak_rss_gib"] <= args.memory_gb + HEADROOM_GIB
    result = {"machine": machine, "sizes": sizes, "seed": args.seed, "memory_gb": args.memory_gb,
              "baseline": None if args.no_baseline else args.baseline, "log_gib": log_gib, "engines": engines,
              "same_lists": same, "within_memory": within,
              "passed": within and (same is None or all(same.values()))}
    return finish(result, format_table(result), args.json)


if __name__ == "__main__":
    raise SystemExit(main())
