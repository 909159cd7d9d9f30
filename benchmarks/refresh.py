"""Full against incremental refresh of a synthetic catalogue, in one run.

    python benchmarks/refresh.py            # 1M items, 20k users, 2M interactions
    python benchmarks/refresh.py --small    # 50k items: a quick run
    python benchmarks/refresh.py --redis    # each version also loaded into a local redis-server
                                            # (the incremental one as a delta over the first)

Steps: prepare the dataset and a two-tower run (weights at initialisation: the benchmark times
the work, which does not depend on what the weights learnt); a full refresh (timed); change
the catalogue (1% of items get a new price, 0.5% new items appear); an incremental refresh
(timed); a full refresh of the changed catalogue (timed) as the reference. Each refresh
runs in this process, one thread, with the same config: user and similar-item lists on a
daily cadence (carried over by the incremental refresh), the other lists rebuilt.

It passes when the incremental refresh takes at most 0.1x the wall time of a full refresh (the
faster of the two: on a shared machine the load can change between them),
and, on queries from 1,000 unchanged items, the incremental index's recall@100 against exact
search is within 0.01 of the full rebuild's. With ``--redis`` it also counts the keys each
version wrote, and the incremental version must answer from Redis as its snapshot does (a
sample of users, items and lists); Redis is emptied before the reference full refresh, so
that it loads into an empty server as the first one did.
"""

from __future__ import annotations

import json
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from redis_load import redis_server
from report import arguments, describe_machine, finish

from data.encoders import FeatureEncoder
from data.prepare import prepare
from data.synthetic import SyntheticConfig, generate
from inference.artifacts import ArtifactRoot
from inference.index import load_index, search_exact
from inference.refresh.job import RefreshConfig, read_embeddings, refresh
from inference.store import EmbeddedStore, RedisStore, read_lists
from training.train import RunConfig, build_ranking_module, build_retrieval_module

ROOT = Path(__file__).resolve().parents[1]
FULL = {"users": 20_000, "items": 1_000_000, "interactions": 2_000_000}
SMALL = {"users": 5_000, "items": 50_000, "interactions": 200_000}
CONFIG = RefreshConfig(rankers=[], cadence_s={"user": 86400, "similar": 86400}, pools={"similar_items": 10_000})
MAX_RATIO, RECALL_GAP = 0.1, 0.01
REDIS_PORT = 6391


def untrained_run(data_dir: Path, out: Path, model: str = "two_tower") -> None:
    """A run directory of ``model`` ("two_tower" or a ranker) whose best checkpoint holds the
    initial weights: benchmarks time work, which does not depend on what the weights learnt."""
    schema = FeatureEncoder.load(data_dir / "encoders.json").schema
    torch.manual_seed(0)
    if model == "two_tower":
        config = RunConfig(model={"hidden_sizes": [64], "output_dim": 64})
        module, run = build_retrieval_module(schema, config)[0], {"task": "retrieval"}
    else:
        config = RunConfig(model={} if model == "linear" else {"embedding_dim": 16})
        module, run = build_ranking_module(model, schema, config)[0], {"task": "ranker", "model": model}
    (out / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": module.state_dict(), "epoch": 0}, out / "checkpoints" / "best.ckpt")
    (out / "run.json").write_text(json.dumps({**run, "data": str(data_dir), "config": config.model_dump(mode="json")}))


def change_catalogue(data_dir: Path, seed: int) -> dict:
    """1% of live items get a new price; 0.5% new items (copies of live ones under new ids)."""
    rng = np.random.default_rng(seed)
    items = pd.read_parquet(data_dir / "items.parquet")
    live = np.flatnonzero(items["removed_at"].to_numpy() < 0)
    changed = rng.choice(live, len(items) // 100, replace=False)
    items.loc[changed, "price"] = items.loc[changed, "price"] * 1.5 + 1
    new = items.iloc[rng.choice(live, len(items) // 200, replace=False)].copy()
    new["item_id"] = np.arange(len(new)) + items["item_id"].max() + 1
    pd.concat([items, new], ignore_index=True).to_parquet(data_dir / "items.parquet", index=False)
    return {"changed": len(changed), "new": len(new)}


def timed_refresh(data_dir: Path, models: Path, root: Path, incremental: bool,
                  config: RefreshConfig = CONFIG) -> tuple[float, dict]:
    start = time.perf_counter()
    manifest = refresh(data_dir, models, root, config, incremental)
    return time.perf_counter() - start, manifest


def compare_indexes(incremental_dir: Path, full_dir: Path, queries: int = 1000) -> dict:
    """Recall@100 of both indexes against exact search over the same vectors, on queries that are
    vectors of unchanged items, and how many of the top 100 the two agree on."""
    ids, vectors = read_embeddings(full_dir)
    rng = np.random.default_rng(0)
    sample = vectors[rng.choice(len(ids), queries, replace=False)]
    exact, _ = search_exact(ids, vectors, sample, 100)
    found = {name: load_index(d / "index").search(sample, 100)[0]
             for name, d in (("incremental", incremental_dir), ("full", full_dir))}
    recall = {name: float(np.mean([len(np.intersect1d(f, e)) / 100 for f, e in zip(got, exact, strict=True)]))
              for name, got in found.items()}
    agree = np.mean([len(np.intersect1d(a, b)) / 100 for a, b in zip(found["incremental"], found["full"],
                                                                     strict=True)])
    return {"recall@100_incremental": recall["incremental"], "recall@100_full": recall["full"],
            "top100_agreement": float(agree)}


def compare_redis(version_dir: Path, port: int, samples: int = 2000) -> bool:
    """Whether the version in ``version_dir`` answers from Redis as from its snapshot, on a sample
    of its users, items (and unknown ids) and lists."""
    rng = np.random.default_rng(0)
    store = version_dir / "store"
    embedded = EmbeddedStore.open(store, version_dir.name)
    on_redis = RedisStore("127.0.0.1", port, version_dir.name, timeout_s=10)
    users = pd.read_parquet(store / "users.parquet", columns=["user_id"])["user_id"].to_numpy()
    items = pd.read_parquet(store / "items.parquet", columns=["item_id"])["item_id"].to_numpy()
    names = read_lists(store)["list"].unique().to_pylist()
    same = all(on_redis.user_features(u) == embedded.user_features(u) for u in rng.choice(users, samples).tolist())
    requested = np.append(rng.choice(items, 10 * samples), [-1, items.max() + 1])
    got, want = on_redis.item_features(requested), embedded.item_features(requested)
    same &= bool(np.array_equal(got.found, want.found)) and got.features.equals(want.features)
    for name in [*rng.choice(names, samples).tolist(), "popular", "trending", "new", "unknown"]:
        same &= all(np.array_equal(a, b) for a, b in zip(on_redis.get_list(name), embedded.get_list(name), strict=True))
    on_redis.close()
    return same


def format_table(result: dict) -> str:
    m, s, t = result["machine"], result["sizes"], result["seconds"]
    c = result["compare"]
    base = min(t["full"], t["full_changed"])  # the baseline: the faster full refresh
    return "\n".join([
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; one torch thread; "
        f"load average {m['load_average_1min']:.1f} at the start",
        f"Sizes: {s['items']:,} items, {s['users']:,} users, {s['interactions']:,} interactions"
        f"{' (every version also loaded into a local redis-server)' if result['redis'] else ''}; "
        f"changed {result['catalogue']['changed']:,} items, added {result['catalogue']['new']:,}; "
        f"index {result['index']['kind']} {json.dumps({k: v for k, v in result['index']['params'].items() if v})}",
        "",
        "| refresh | wall (s) | ratio to the faster full |",
        "|---|---:|---:|",
        f"| full | {t['full']:.1f} | {t['full'] / base:.2f} |",
        f"| incremental | {t['incremental']:.1f} | {t['incremental'] / base:.3f} (target <= {MAX_RATIO}) |",
        f"| full, changed catalogue | {t['full_changed']:.1f} | {t['full_changed'] / base:.2f} |",
        "",
        "| step (s) | full | incremental |",
        "|---|---:|---:|",
        *[f"| {step} | {result['steps']['full'][step]:.1f} | {result['steps']['incremental'][step]:.1f} |"
          for step in result["steps"]["full"]],
        f"| inputs, manifest, publish | {t['full'] - sum(result['steps']['full'].values()):.1f} | "
        f"{t['incremental'] - sum(result['steps']['incremental'].values()):.1f} |",
        "",
        "| index after the change | recall@100 vs exact |",
        "|---|---:|",
        f"| incremental | {c['recall@100_incremental']:.4f} |",
        f"| full rebuild | {c['recall@100_full']:.4f} |",
        f"| gap (target <= {RECALL_GAP}) | {abs(c['recall@100_incremental'] - c['recall@100_full']):.4f} |",
        f"| top-100 agreement between the two | {c['top100_agreement']:.4f} |",
        *([] if not result["redis"] else [
            "",
            f"Redis keys written: full {result['redis_keys']['full']:,}, incremental "
            f"{result['redis_keys']['incremental']:,} (a delta over {result['redis_keys']['base']}); "
            f"the incremental version answers as its snapshot: {result['redis_keys']['same_answers']}"]),
        "",
        f"Result: {'pass' if result['passed'] else 'FAIL'}",
    ])


def main() -> int:
    parser = arguments(__doc__, "refresh")
    parser.add_argument("--redis", action="store_true", help="load every version into a local redis-server too")
    args = parser.parse_args()
    torch.set_num_threads(1)
    sizes = SMALL if args.small else FULL
    machine = describe_machine()
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        tmp = Path(tmp)
        config, client, redis_keys = CONFIG, None, {}
        if args.redis:
            (tmp / "redis").mkdir()
            client = stack.enter_context(redis_server(tmp / "redis", REDIS_PORT))
            config = CONFIG.model_copy(update={"redis": f"127.0.0.1:{REDIS_PORT}"})
        data = prepare(generate(SyntheticConfig(**sizes, seed=args.seed)), tmp / "data", split="temporal",
                       seed=args.seed)
        untrained_run(data, tmp / "models" / "two_tower")
        seconds = {}
        seconds["full"], first = timed_refresh(data, tmp / "models", tmp / "a", False, config)
        catalogue = change_catalogue(data, args.seed)
        if client is not None:
            redis_keys["full"] = client.dbsize()
        seconds["incremental"], incremental = timed_refresh(data, tmp / "models", tmp / "a", True, config)
        if client is not None:
            redis_keys.update(incremental=client.dbsize() - redis_keys["full"], base=incremental["redis_base"],
                              same_answers=compare_redis(ArtifactRoot(tmp / "a").path("v0002"), REDIS_PORT))
            client.flushall()  # the reference loads into an empty server too, as its own v0001
        seconds["full_changed"], _ = timed_refresh(data, tmp / "models", tmp / "b", False, config)
        compare = compare_indexes(ArtifactRoot(tmp / "a").path("v0002"), ArtifactRoot(tmp / "b").path("v0001"))
    passed = (seconds["incremental"] <= MAX_RATIO * min(seconds["full"], seconds["full_changed"])
              and abs(compare["recall@100_incremental"] - compare["recall@100_full"]) <= RECALL_GAP
              and redis_keys.get("same_answers", True))
    result = {"machine": machine, "sizes": sizes, "seed": args.seed, "redis": args.redis, "seconds": seconds,
              "catalogue": catalogue, "redis_keys": redis_keys,
              "index": first["index"], "steps": {"full": first["step_seconds"],
                                                 "incremental": incremental["step_seconds"]},
              "incremental_manifest": {k: incremental[k] for k in ("catalogue", "lists")},
              "compare": compare, "passed": bool(passed)}
    return finish(result, format_table(result), args.out)


if __name__ == "__main__":
    raise SystemExit(main())
