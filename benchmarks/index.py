"""Times each item-index kind (`inference/index.py`) against exact search in the same run.

    OMP_NUM_THREADS=1 nice python benchmarks/index.py                  # 100k and 1M items, 64 dims
    OMP_NUM_THREADS=1 python benchmarks/index.py --sizes 100000        # a quicker run

Vectors: unit vectors of 64 dims from a seeded Gaussian mixture. 1,000 centres are drawn
uniformly on the sphere; an item is a centre plus N(0, spread^2 / 64) noise in each dim,
normalised, so with spread 1 an item's cosine to its centre is about 0.7, to another item of its
cluster about 0.5, and to other clusters' items about 0. The queries are drawn from the same
mixture. Metric: inner product (the cosine, for unit vectors), as the two-tower model scores.

At each size, exact search (kind "flat", FAISS on the CPU) is the baseline, and every kind is
built with the parameters `choose_params(N, 64, 0.95, kind)` picks (the table lists them).
Measures: build time; bytes per item of the saved index (FAISS file and id table, over N);
recall@10 and @100 against numpy brute force (`measure_recall`); single-query latency at k = 100,
one query per `ItemIndex.search` call, p50 and p99 over the queries; batch QPS, all queries in
one call, best of 3. FAISS and torch run on ``--threads`` threads.

Target: at 1,000,000 items the default kind (what `choose_params(N, 64)` picks) reaches
recall@100 >= 0.95 with a single-query p50 at least 50x below exact search's. A run without
1,000,000 items cannot check it, and exits 1.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import torch
from report import describe_machine, finish

from inference.index import KINDS, ItemIndex, build_index, choose_params, exact_probe, measure_recall, save_index

ROOT = Path(__file__).resolve().parents[1]

DIM = 64
CLUSTERS = 1000
K = 100
TARGET_ITEMS = 1_000_000
TARGET_RECALL = 0.95
TARGET_SPEEDUP = 50


def make_mixture(items: int, queries: int, spread: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors: items (N, DIM) and queries (Q, DIM), both drawn from one Gaussian mixture."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((CLUSTERS, DIM), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)

    def draw(n: int) -> np.ndarray:
        x = centres[rng.integers(0, CLUSTERS, n)]
        x += spread / math.sqrt(DIM) * rng.standard_normal((n, DIM), dtype=np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    return draw(items), draw(queries)


def saved_bytes(index: ItemIndex) -> int:
    with tempfile.TemporaryDirectory(prefix="index-bench-") as tmp:
        save_index(index, tmp)
        return sum(path.stat().st_size for path in Path(tmp).iterdir())


def time_queries(index: ItemIndex, queries: np.ndarray) -> dict:
    """Single-query p50 / p99 ms (one query per call) and batch QPS (all queries in one call, best of 3)."""
    for query in queries[:10]:  # warm-up
        index.search(query[None], K)
    single = []
    for query in queries:
        start = time.perf_counter()
        index.search(query[None], K)
        single.append(time.perf_counter() - start)
    batch = []
    for _ in range(3):
        start = time.perf_counter()
        index.search(queries, K)
        batch.append(time.perf_counter() - start)
    return {"p50_ms": 1e3 * float(np.percentile(single, 50)), "p99_ms": 1e3 * float(np.percentile(single, 99)),
            "qps": len(queries) / min(batch)}


def measure_kind(kind: str, ids: np.ndarray, vectors: np.ndarray, queries: np.ndarray, seed: int) -> dict:
    params = choose_params(len(ids), DIM, TARGET_RECALL, kind)
    start = time.perf_counter()
    index = build_index(ids, vectors, params, backend="faiss", seed=seed)
    build_s = time.perf_counter() - start
    row = {"kind": kind, "params": {k: v for k, v in vars(params).items() if v is not None and k != "kind"},
           "backend": index.backend, "build_s": build_s, "bytes_per_item": saved_bytes(index) / len(ids)}
    row.update(measure_recall(index, exact_probe(ids, vectors, queries, k=K), ks=(10, K)))
    row.update(time_queries(index, queries))
    return row


def measure_size(items: int, args: argparse.Namespace) -> dict:
    vectors, queries = make_mixture(items, args.queries, args.spread, args.seed)
    ids = np.random.default_rng(args.seed).permutation(items).astype(np.int64) * 7 + 1000  # not 0..N-1
    default = choose_params(items, DIM).kind
    rows = []
    for kind in KINDS:
        print(f"{items:,} items: {kind} ...", flush=True)
        rows.append({**measure_kind(kind, ids, vectors, queries, args.seed), "default": kind == default})
    exact = rows[0]
    for row in rows:
        row["p50_speedup"] = exact["p50_ms"] / row["p50_ms"]
        row["qps_ratio"] = row["qps"] / exact["qps"]
    return {"items": items, "default_kind": default, "rows": rows}


def check_target(sizes: list[dict]) -> dict:
    at_target = [s for s in sizes if s["items"] == TARGET_ITEMS]
    if not at_target:
        return {"checked": False, "passed": False}
    row = next(r for r in at_target[0]["rows"] if r["default"])
    return {"checked": True, "kind": row["kind"], "recall@100": row["recall@100"], "p50_speedup": row["p50_speedup"],
            "passed": row["recall@100"] >= TARGET_RECALL and row["p50_speedup"] >= TARGET_SPEEDUP}


def format_params(params: dict) -> str:
    return ", ".join(f"{name} {value}" for name, value in params.items() if name != "metric") or "-"


def format_table(result: dict) -> str:
    m, verdict = result["machine"], (lambda ok: "pass" if ok else "FAIL")  # noqa: E731
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; Python {m['python']}, numpy {m['numpy']}, "
        f"faiss {m['faiss']}, torch {m['torch']}; {result['threads']} thread(s); "
        f"load average {m['load_average_1min']:.1f} at the start",
        f"Data: unit vectors of {DIM} dims from a Gaussian mixture of {CLUSTERS:,} centres, spread "
        f"{result['spread']}; {result['queries']:,} queries from the same mixture; seed {result['seed']}; "
        f"metric ip; k = {K}; exact search (flat) is the baseline",
        "",
        "| items | kind | params (choose_params, target 0.95) | build s | bytes / item | recall@10 | recall@100 "
        "| p50 ms | p99 ms | p50 speed-up vs exact | batch QPS | QPS vs exact |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for size in result["sizes"]:
        for r in size["rows"]:
            kind = f"**{r['kind']}** (default)" if r["default"] else r["kind"]
            lines.append(
                f"| {size['items']:,} | {kind} | {format_params(r['params'])} | {r['build_s']:.1f} "
                f"| {r['bytes_per_item']:.0f} | {r['recall@10']:.4f} | {r['recall@100']:.4f} | {r['p50_ms']:.3f} "
                f"| {r['p99_ms']:.3f} | {r['p50_speedup']:.1f} | {r['qps']:,.0f} | {r['qps_ratio']:.1f} |")
    target = result["target"]
    lines += ["", "| check at 1,000,000 items | value | target | result |", "|---|---:|---:|---|"]
    if target["checked"]:
        lines += [
            f"| default kind ({target['kind']}) recall@100 | {target['recall@100']:.4f} | >= {TARGET_RECALL} "
            f"| {verdict(target['recall@100'] >= TARGET_RECALL)} |",
            f"| exact p50 / default p50 | {target['p50_speedup']:.1f} | >= {TARGET_SPEEDUP} "
            f"| {verdict(target['p50_speedup'] >= TARGET_SPEEDUP)} |",
        ]
    else:
        lines.append(f"| not run: --sizes lacks {TARGET_ITEMS:,} | | | FAIL |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, TARGET_ITEMS], help="numbers of items")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--spread", type=float, default=1.0, help="noise around each centre (see above)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "index.json")
    args = parser.parse_args(argv)
    faiss.omp_set_num_threads(args.threads)
    torch.set_num_threads(args.threads)

    machine = {**describe_machine(), "faiss": faiss.__version__, "torch": torch.__version__}
    sizes = [measure_size(items, args) for items in args.sizes]
    target = check_target(sizes)
    result = {"machine": machine, "threads": args.threads, "queries": args.queries, "spread": args.spread,
              "seed": args.seed, "sizes": sizes, "target": target, "passed": target["passed"]}
    return finish(result, format_table(result), args.json)


if __name__ == "__main__":
    raise SystemExit(main())
