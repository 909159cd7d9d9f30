"""What an embedded store's lists cost a server process: memory beyond the ids and scores, and a lookup.

    python benchmarks/store_lists.py             # 100k and 1M user lists of 10 items, plus 10 shared lists
    python benchmarks/store_lists.py --small     # 10k and 100k

Each server process (each worker of `recstack serve --workers N`) holds the version's lists in an
`EmbeddedStore`. The ids and scores are two arrays either way. The baseline is the structure the
store used before: a dict from each name to a tuple of two read-only views of those arrays, one
Python object group per list. The store now keeps the names sorted as UTF-8 bytes with each list's
bounds (`inference.store._Lists`). Memory is what tracemalloc counts as live once the structure is
built from the same table, less the two arrays (Arrow's, which tracemalloc does not see). A lookup
is the median of 5 timings of 20,000 `get` calls on random names (a tenth of them unknown). Passes
when the store's structure takes at most a tenth of the dict's memory and a lookup stays under 5 us.
"""

from __future__ import annotations

import gc
import statistics
import timeit
import tracemalloc

import numpy as np
import pyarrow as pa
from report import arguments, describe_machine, finish

from inference.store import _EMPTY_LIST, _list_runs, _Lists, _read_only

ITEMS_PER_LIST = 10
LOOKUPS = 20_000
MAX_LOOKUP_US = 5.0


def lists_table(users: int, seed: int) -> pa.Table:
    """``users`` lists "user:<id>" and 10 shared ones, `ITEMS_PER_LIST` random items each."""
    names = [f"user:{u}" for u in range(users)] + [f"similar:{i}" for i in range(10)]
    rng = np.random.default_rng(seed)
    rows = len(names) * ITEMS_PER_LIST
    return pa.table({"list": pa.array(np.repeat(names, ITEMS_PER_LIST)).dictionary_encode(),
                     "item_id": rng.integers(0, 10**7, rows), "score": rng.random(rows, dtype=np.float32)})


def dict_of_views(lists: pa.Table) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The baseline: name -> (ids view, scores view)."""
    names, bounds, ids, scores = _list_runs(lists)
    ids, scores = _read_only(ids), _read_only(scores)
    return {name: (ids[s:e], scores[s:e]) for name, s, e in zip(names, bounds[:-1], bounds[1:], strict=True)}


def measure(build, lists: pa.Table, names: list[str]) -> dict:
    gc.collect()
    tracemalloc.start()
    built = build(lists)
    gc.collect()
    live = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    get = built.get if isinstance(built, _Lists) else (lambda name: built.get(name, _EMPTY_LIST))
    calls = iter(names * 6)
    timings = timeit.repeat(lambda: get(next(calls)), number=LOOKUPS, repeat=5)
    return {"mib": live / 2**20, "bytes_per_list": live / len(lists["list"].chunk(0).dictionary),
            "lookup_us": statistics.median(timings) / LOOKUPS * 1e6}


def main() -> int:
    args = arguments(__doc__, "store_lists").parse_args()
    sizes = (10_000, 100_000) if args.small else (100_000, 1_000_000)
    rng = np.random.default_rng(args.seed)
    rows = []
    for users in sizes:
        lists = lists_table(users, args.seed)
        names = [f"user:{u}" for u in rng.integers(0, users * 10 // 9, LOOKUPS)]  # ~10% past the last user
        baseline, store = measure(dict_of_views, lists, names), measure(_Lists, lists, names)
        rows.append({"lists": users + 10, "dict": baseline, "store": store,
                     "memory_ratio": store["mib"] / baseline["mib"],
                     "passed": store["mib"] <= baseline["mib"] / 10 and store["lookup_us"] < MAX_LOOKUP_US})
    result = {"machine": describe_machine(), "sizes": rows, "passed": all(r["passed"] for r in rows)}
    m = result["machine"]
    table = [f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; Python {m['python']}, numpy "
             f"{m['numpy']}; load average {m['load_average_1min']:.1f} at the start", "",
             "| lists | dict of views: MiB, bytes a list | store: MiB, bytes a list | store / dict, memory "
             "| lookup us, dict / store | result |", "|---:|---|---|---:|---|---|"]
    for r in rows:
        d, s = r["dict"], r["store"]
        table.append(f"| {r['lists']:,} | {d['mib']:.1f}, {d['bytes_per_list']:.0f} | {s['mib']:.1f}, "
                     f"{s['bytes_per_list']:.0f} | {r['memory_ratio']:.3f} | {d['lookup_us']:.2f} / "
                     f"{s['lookup_us']:.2f} | {'pass' if r['passed'] else 'FAIL'} |")
    return finish(result, "\n".join(table), args.out)


if __name__ == "__main__":
    raise SystemExit(main())
