"""Request latency of the pipeline over a refreshed synthetic catalogue, in process and over HTTP.

    python benchmarks/pipeline.py            # 1M items, 20k users, 2M interactions
    python benchmarks/pipeline.py --small    # 50k items: a quick run
    python benchmarks/pipeline.py --baseline 1d4bccd --repeats 3   # also that commit, in turn

Steps: the synthetic dataset of benchmarks/refresh.py; untrained two-tower, DeepFM and linear
runs (latency does not depend on what the weights learnt); a full refresh (`rankers: [deepfm,
linear]`); the pipeline of configs/pipeline.yaml with every timeout raised to 5 s (this measures
the work, not the deadlines), warmed up; then the same requests (random known users, each with
their 5 latest items as the session, k = 20) answered one at a time in process, the baseline,
and over HTTP through the app `recstack serve` runs (uvicorn on loopback; the client runs in this
process). It reports p50 / p99 / mean per path, the HTTP overhead as a ratio to the baseline, and
each stage's mean, and the process CPU time per request (every thread's), which a busy machine
changes less than the wall times.

With ``--baseline COMMIT``, that commit (extracted with ``git archive``) and this tree answer the
same requests over the same catalogue in process, each in a fresh interpreter, in turn
``--repeats`` times; the in-process row is then this tree's median p50 run, and the run passes
when every run gave the same answers (a digest of each response's items, scores and propensities).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch
import yaml
from refresh import FULL, SMALL, untrained_run
from report import arguments, describe_machine, finish

from data.dataset import read_dataset
from data.prepare import prepare
from data.synthetic import SyntheticConfig, generate
from inference.artifacts import ArtifactRoot
from inference.pipeline.config import PipelineConfig
from inference.pipeline.executor import build_pipeline
from inference.pipeline.types import Query
from inference.refresh.job import RefreshConfig, refresh
from inference.service import Recommender, serve_in_thread
from inference.version import open_version

ROOT = Path(__file__).resolve().parents[1]
CONFIG = RefreshConfig(rankers=["deepfm", "linear"], pools={"similar_items": 10_000})
K, RECENT = 20, 5


def pipeline_config() -> PipelineConfig:
    raw = yaml.safe_load((ROOT / "configs" / "pipeline.yaml").read_text())
    for source in raw["sources"]:
        source["timeout_s"] = 5.0
    return PipelineConfig.model_validate(raw)


def make_queries(data_dir: Path, n: int, seed: int) -> list[Query]:
    """``n`` random users with interactions, each with their ``RECENT`` latest items, oldest first."""
    rows = read_dataset(data_dir, tables=("interactions",)).interactions.sort_values("timestamp", kind="stable")
    latest = rows.groupby("user_id")["item_id"].apply(lambda items: tuple(items.to_numpy()[-RECENT:].tolist()))
    users = np.random.default_rng(seed).choice(latest.index.to_numpy(), n)
    return [Query(int(u), recent_items=latest[u], k=K) for u in users]


def percentiles(seconds: list[float]) -> dict:
    ms = 1e3 * np.asarray(seconds)
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean())}


def time_in_process(root: Path, queries: list[Query]) -> tuple[dict, dict]:
    pipeline = build_pipeline(pipeline_config(), open_version(ArtifactRoot(root).path("v0001")))
    try:
        pipeline.warm_up(queries[0])
        seconds, cpu, answers = [], 0.0, hashlib.sha256()
        load = os.getloadavg()[0]
        for query in queries:
            start, cpu_start = time.perf_counter(), time.process_time()
            response = pipeline(query)
            seconds.append(time.perf_counter() - start)
            cpu += time.process_time() - cpu_start
            for column in (response.item_ids, response.scores, response.propensities):
                answers.update(column.tobytes())
        snapshot = pipeline.stats.snapshot()["stages"]
        stages = {name: counts["total_ms"] / counts["calls"] for name, counts in snapshot.items()}
    finally:
        pipeline.close()
    return percentiles(seconds) | {"cpu_ms": 1e3 * cpu / len(queries), "load_average_1min": load,
                                   "answers_sha256": answers.hexdigest()}, stages


def time_tree(tree: Path, root: Path, args) -> dict:
    """`time_in_process` over the catalogue in ``root`` with the code of the checkout ``tree``, in a
    fresh interpreter; ``{"latency": ..., "stages_ms": ...}``."""
    command = [sys.executable, __file__, "--time-in-process", str(root), "--requests", str(args.requests),
               "--seed", str(args.seed)]
    out = subprocess.run(command, cwd=tree, env=os.environ | {"PYTHONPATH": str(tree)}, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.splitlines()[-1])


def time_http(root: Path, queries: list[Query]) -> dict:
    recommender = Recommender(root, pipeline_config())
    try:
        with serve_in_thread(recommender) as url:
            seconds = []
            for query in queries:
                body = json.dumps({"user_id": query.user_id, "recent_items": list(query.recent_items), "k": query.k})
                request = urllib.request.Request(f"{url}/recommend", data=body.encode(),
                                                 headers={"Content-Type": "application/json"})
                start = time.perf_counter()
                with urllib.request.urlopen(request, timeout=30) as reply:
                    reply.read()
                seconds.append(time.perf_counter() - start)
    finally:
        recommender.close()
    return percentiles(seconds)


def format_table(result: dict) -> str:
    m, s, t = result["machine"], result["sizes"], result["latency"]
    base = t["in_process"]["p50_ms"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; one torch thread; "
        f"load average {m['load_average_1min']:.1f} at the start",
        f"Sizes: {s['items']:,} items, {s['users']:,} users, {s['interactions']:,} interactions; "
        f"{result['requests']} requests, k = {K}, {RECENT} recent items each; index {result['index']}",
        "",
        "| path | p50 ms | p99 ms | mean ms | p50 / in process |",
        "|---|---:|---:|---:|---:|",
        *[f"| {name.replace('_', ' ')} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} | {row['mean_ms']:.2f} | "
          f"{row['p50_ms'] / base:.2f} |" for name, row in t.items()],
        "",
        "| stage (in process) | mean ms |",
        "|---|---:|",
        *[f"| {name} | {ms:.2f} |" for name, ms in result["stages_ms"].items()],
    ]
    if result["runs"]:
        lines += ["", "| run | tree | p50 ms | p99 ms | mean ms | CPU ms / request | load average |",
                  "|---:|---|---:|---:|---:|---:|---:|",
                  *[f"| {i} | {tree} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} | {row['mean_ms']:.2f} | "
                    f"{row['cpu_ms']:.2f} | {row['load_average_1min']:.1f} |"
                    for i, run in enumerate(result["runs"], 1) for tree, row in run.items()],
                  "", f"This tree / baseline, medians over the runs: p50 {result['ratio']['p50']:.2f}, "
                      f"CPU per request {result['ratio']['cpu']:.2f}; the same answers (items, scores, "
                      f"propensities) in every run: {result['passed']}"]
    return "\n".join(lines)


def compare(root: Path, args) -> tuple[list[dict], dict, dict]:
    """``args.repeats`` runs of ``args.baseline`` then this tree (`time_tree`) over the catalogue in
    ``root``: each run's latency by tree, this tree's median-p50 run (latency, stages), and the
    ratios of the medians."""
    with tempfile.TemporaryDirectory() as scratch:
        archive = subprocess.run(["git", "archive", args.baseline], cwd=ROOT, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", scratch], input=archive.stdout, check=True)
        timed = [(time_tree(Path(scratch), root, args), time_tree(ROOT, root, args)) for _ in range(args.repeats)]
    baseline, mine = ([run[i]["latency"] for run in timed] for i in (0, 1))
    median = sorted(range(len(mine)), key=lambda i: mine[i]["p50_ms"])[len(mine) // 2]
    ratio = {key: float(np.median([m[f"{key}_ms"] for m in mine]) / np.median([b[f"{key}_ms"] for b in baseline]))
             for key in ("p50", "cpu")}
    runs = [{f"baseline {args.baseline}": b, "this tree": m} for b, m in zip(baseline, mine, strict=True)]
    return runs, timed[median][1], ratio


def main() -> int:
    parser = arguments(__doc__, "pipeline")
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--baseline", help="a commit whose pipeline answers the same requests in turn with this tree's")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each tree with --baseline")
    parser.add_argument("--time-in-process", type=Path, help=argparse.SUPPRESS)  # time_tree's child: one run
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.time_in_process:
        latency, stages = time_in_process(args.time_in_process / "artifacts",
                                          make_queries(args.time_in_process / "data", args.requests, args.seed))
        print(json.dumps({"latency": latency, "stages_ms": stages}))
        return 0
    sizes = SMALL if args.small else FULL
    machine = describe_machine()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = prepare(generate(SyntheticConfig(**sizes, seed=args.seed)), tmp / "data", split="temporal",
                       seed=args.seed)
        for model in ("two_tower", "deepfm", "linear"):
            untrained_run(data, tmp / "models" / model, model)
        manifest = refresh(data, tmp / "models", tmp / "artifacts", CONFIG)
        queries = make_queries(data, args.requests, args.seed)
        runs, ratio = [], None
        if args.baseline:
            runs, median, ratio = compare(tmp, args)
            in_process, stages = median["latency"], median["stages_ms"]
        else:
            in_process, stages = time_in_process(tmp / "artifacts", queries)
        http = time_http(tmp / "artifacts", queries)
    index = manifest["index"]
    result = {"machine": machine, "sizes": sizes, "requests": args.requests, "seed": args.seed,
              "index": f"{index['kind']} {json.dumps({k: v for k, v in index['params'].items() if v and k != 'kind'})}",
              "latency": {"in_process": in_process, "over_http": http}, "stages_ms": stages, "runs": runs,
              "ratio": ratio,
              "passed": len({row["answers_sha256"] for run in runs for row in run.values()}) <= 1}
    return finish(result, format_table(result), args.out)


if __name__ == "__main__":
    raise SystemExit(main())
