"""`--engine ray` against `--engine local` on a synthetic catalogue, full and incremental, in one run.

    python benchmarks/refresh_engines.py            # 100k items, 10k users, 500k interactions
    python benchmarks/refresh_engines.py --small    # 20k items: a quick run
    python benchmarks/refresh_engines.py --data out/ml-100k --models out/models   # a prepared dataset
                                                    # and its runs (two_tower), copied: 1% of items
                                                    # copied under new ids before the incremental one

Steps (the helpers of benchmarks/refresh.py): prepare the dataset and an untrained two-tower run;
a full refresh with each engine into its own artefact root; change the catalogue (1% of items
get a new price, 0.5% new items appear); an incremental refresh with each engine. Ray is a
local one started once for the run (2 CPUs, so 2 actors), so the times compare the work, not
Ray's start; the local engine runs in this process with its default threads.

It passes when each pair of versions is the same: the same item ids with vectors within 1e-6,
the same lists (names and items in order; scores within 1e-5) and the same checksums for every
file that does not hold vectors or what is computed from them (embedding shards, the index, the
similar-item and user lists, whose last bits follow the vectors').
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import ray
from refresh import CONFIG, change_catalogue, untrained_run
from report import arguments, describe_machine, finish

from data.prepare import prepare
from data.synthetic import SyntheticConfig, generate
from inference.artifacts import ArtifactRoot, verify_version
from inference.refresh.job import read_embeddings, refresh
from inference.store import read_lists

ROOT = Path(__file__).resolve().parents[1]
FULL = {"users": 10_000, "items": 100_000, "interactions": 500_000}
SMALL = {"users": 2_000, "items": 20_000, "interactions": 100_000}
VECTOR_ATOL, SCORE_ATOL = 1e-6, 1e-5
FROM_VECTORS = ("embeddings/v", "index/", "store/lists/similar", "store/lists/user")


def compare_versions(ray_dir: Path, local_dir: Path) -> dict:
    """How the version the ray engine built differs from the local engine's."""
    ray_ids, ray_vectors = read_embeddings(ray_dir)
    local_ids, local_vectors = read_embeddings(local_dir)
    same_ids = bool(np.array_equal(np.sort(ray_ids), np.sort(local_ids)))
    vector_gap = float(np.abs(ray_vectors[np.argsort(ray_ids)] - local_vectors[np.argsort(local_ids)]).max()) \
        if same_ids else float("inf")
    ray_lists, local_lists = (read_lists(d / "store").to_pandas() for d in (ray_dir, local_dir))
    same_lists = ray_lists[["list", "item_id"]].equals(local_lists[["list", "item_id"]])
    score_gap = float(np.abs(ray_lists["score"] - local_lists["score"]).max()) if same_lists else float("inf")
    files = [verify_version(d)["files"] for d in (ray_dir, local_dir)]
    differing = sorted(p for p in files[0].keys() | files[1].keys()
                       if not p.startswith(FROM_VECTORS) and files[0].get(p) != files[1].get(p))
    return {"same_ids": same_ids, "vector_gap": vector_gap, "same_lists": bool(same_lists), "score_gap": score_gap,
            "differing_files": differing,
            "same": same_ids and vector_gap <= VECTOR_ATOL and same_lists and score_gap <= SCORE_ATOL
            and not differing}


def add_items(data_dir: Path, seed: int) -> dict:
    """1% of the items copied under new ids: a catalogue change any items table allows."""
    items = pd.read_parquet(data_dir / "items.parquet")
    new = items.sample(frac=0.01, random_state=seed)
    new["item_id"] = np.arange(len(new)) + items["item_id"].max() + 1
    pd.concat([items, new], ignore_index=True).to_parquet(data_dir / "items.parquet", index=False)
    return {"new": len(new)}


def timed(data: Path, models: Path, root: Path, engine: str, incremental: bool) -> tuple[float, dict]:
    start = time.perf_counter()
    manifest = refresh(data, models, root, CONFIG.model_copy(update={"engine": engine}), incremental)
    return time.perf_counter() - start, manifest


def format_table(result: dict) -> str:
    m, s = result["machine"], result["sizes"]
    data = s.get("data") or f"{s['items']:,} items, {s['users']:,} users, {s['interactions']:,} interactions"
    lines = [f"refresh engines: {data}; {m['cores']} cores, load {m['load_average_1min']:.1f} "
             "(shared machine: times are noisy)",
             f"{'refresh':<12} {'local s':>9} {'ray s':>9} {'embed local':>12} {'embed ray':>10} "
             f"{'vector gap':>11} {'lists':>6} {'files':>6}"]
    for mode, row in result["runs"].items():
        c = row["compare"]
        lines.append(f"{mode:<12} {row['seconds']['local']:>9.1f} {row['seconds']['ray']:>9.1f} "
                     f"{row['embeddings_s']['local']:>12.1f} {row['embeddings_s']['ray']:>10.1f} "
                     f"{c['vector_gap']:>11.1e} {'same' if c['same_lists'] else 'DIFF':>6} "
                     f"{'same' if not c['differing_files'] else 'DIFF':>6}")
    lines.append(f"passed: {result['passed']}")
    return "\n".join(lines)


def main() -> int:
    parser = arguments(__doc__, "refresh_engines")
    parser.add_argument("--data", type=Path, help="a prepared dataset instead of the synthetic one (copied)")
    parser.add_argument("--models", type=Path, help="with --data: the directory holding its two_tower run")
    args = parser.parse_args()
    if (args.data is None) != (args.models is None):
        parser.error("--data and --models go together")
    sizes = SMALL if args.small else FULL
    machine = describe_machine()
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=1024**3, logging_level="WARNING",
             log_to_driver=False)
    runs = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            if args.data is None:
                data = prepare(generate(SyntheticConfig(**sizes, seed=args.seed)), tmp / "data", split="temporal",
                               seed=args.seed)
                untrained_run(data, tmp / "models" / "two_tower")
                models, change = tmp / "models", change_catalogue
            else:
                data, models, change = shutil.copytree(args.data, tmp / "data"), args.models, add_items
                sizes = {"data": str(args.data)}
            for mode, version in (("full", "v0001"), ("incremental", "v0002")):
                if mode == "incremental":
                    change(data, args.seed)
                row = {"seconds": {}, "embeddings_s": {}}
                for engine in ("local", "ray"):
                    row["seconds"][engine], manifest = timed(data, models, tmp / engine, engine,
                                                             mode == "incremental")
                    row["embeddings_s"][engine] = manifest["step_seconds"]["embeddings"]
                    row.setdefault("catalogue", manifest["catalogue"])
                row["compare"] = compare_versions(ArtifactRoot(tmp / "ray").path(version),
                                                  ArtifactRoot(tmp / "local").path(version))
                runs[mode] = row
    finally:
        ray.shutdown()
    result = {"machine": machine, "sizes": sizes, "seed": args.seed, "runs": runs,
              "passed": all(row["compare"]["same"] for row in runs.values())}
    return finish(result, format_table(result), args.out)


if __name__ == "__main__":
    raise SystemExit(main())
