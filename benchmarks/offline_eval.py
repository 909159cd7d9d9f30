"""`recstack evaluate offline` over 20,000 held-out users of a 1M-item synthetic catalogue.

    python benchmarks/offline_eval.py            # 1M items, 25k users, 2.5M interactions
    python benchmarks/offline_eval.py --small    # 50k items, 2,000 evaluated users: a quick run

Steps, as in benchmarks/pipeline.py: the synthetic dataset (split at random per user, 80/10/10,
so most users have held-out rows); untrained two-tower, DeepFM and linear runs (the time does
not depend on what the weights learnt); one full refresh; the pipeline of configs/pipeline.yaml
(max_k 100). Then, timed, `evaluate_offline` of the test part at k = 10, 20, 50 for a seeded
sample of the users, with each stage's seconds. The baseline in the same run is the serving
path: the same pipeline answering a sample of the same users one request at a time, its
per-request time scaled to every evaluated user.

It passes when the evaluation takes at most 10 minutes.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from pipeline import CONFIG, pipeline_config
from refresh import untrained_run
from report import describe_machine, finish

from data.prepare import prepare
from data.synthetic import SyntheticConfig, generate
from evaluation.offline import OfflineConfig, evaluate_offline, read_held_out, request_context
from inference.pipeline.executor import build_pipeline
from inference.pipeline.types import Query
from inference.refresh.artifacts import ArtifactRoot
from inference.refresh.job import open_version, refresh

ROOT = Path(__file__).resolve().parents[1]
FULL = {"users": 25_000, "items": 1_000_000, "interactions": 2_500_000}
SMALL = {"users": 5_000, "items": 50_000, "interactions": 250_000}
EVALUATED = {"full": 20_000, "small": 2_000}
SERIAL_USERS = 300  # requests of the one-at-a-time baseline
KS = (10, 20, 50)
TARGET_S = 600.0


def time_serial(pipeline, data_dir: Path, users: int, seed: int) -> float:
    """Seconds per request of the serving path over ``users`` held-out users, one at a time."""
    held_out = read_held_out(data_dir, "test", request_context(pipeline), users, seed)
    queries = [Query(int(u), context, tuple(history.tolist()), max(KS))
               for u, context, history in zip(held_out.user_ids, held_out.contexts, held_out.history, strict=True)]
    pipeline.warm_up(queries[0])
    started = time.perf_counter()
    for query in queries:
        pipeline(query)
    return (time.perf_counter() - started) / len(queries)


def format_table(result: dict) -> str:
    m, s, r = result["machine"], result["sizes"], result["report"]
    seconds = r["seconds"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; one torch thread; "
        f"load average {m['load_average_1min']:.1f} at the start",
        f"Sizes: {s['items']:,} items, {s['users']:,} users, {s['interactions']:,} interactions; "
        f"{r['users']:,} evaluated users (test part), k = {', '.join(map(str, r['ks']))}",
        "",
        "| path | wall s | per user ms |",
        "|---|---:|---:|",
        f"| evaluate offline (batched) | {result['evaluate_s']:.1f} | {1e3 * result['evaluate_s'] / r['users']:.2f} |",
        f"| serving path, one request at a time ({result['serial_users']} users, scaled) | "
        f"{result['serial_s_per_user'] * r['users']:.1f} | {1e3 * result['serial_s_per_user']:.2f} |",
        "",
        "| stage | s | share |",
        "|---|---:|---:|",
        *[f"| {name} | {value:.1f} | {value / result['evaluate_s']:.2f} |" for name, value in seconds.items()],
        "",
        "| check | value | target | result |",
        "|---|---:|---:|---|",
        f"| evaluate offline wall s | {result['evaluate_s']:.1f} | <= {TARGET_S:.0f} | "
        f"{'pass' if result['passed'] else 'FAIL'} |",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "offline_eval.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    sizes, evaluated = (SMALL, EVALUATED["small"]) if args.small else (FULL, EVALUATED["full"])
    machine = describe_machine()
    with tempfile.TemporaryDirectory(prefix="offline-eval-") as tmp:
        tmp = Path(tmp)
        data = prepare(generate(SyntheticConfig(**sizes, seed=args.seed)), tmp / "data", split="random",
                       seed=args.seed)
        for model in ("two_tower", "deepfm", "linear"):
            untrained_run(data, tmp / "models" / model, model)
        refresh(data, tmp / "models", tmp / "artifacts", CONFIG)
        pipeline = build_pipeline(pipeline_config(), open_version(ArtifactRoot(tmp / "artifacts").path("v0001")))
        try:
            started = time.perf_counter()
            report = evaluate_offline(pipeline, data, OfflineConfig("test", KS, evaluated, args.seed))
            evaluate_s = time.perf_counter() - started
            serial = time_serial(pipeline, data, SERIAL_USERS, args.seed + 1)
        finally:
            pipeline.close()
    report.pop("data")
    result = {"machine": machine, "sizes": sizes, "seed": args.seed, "evaluate_s": evaluate_s,
              "serial_users": SERIAL_USERS, "serial_s_per_user": serial, "report": report,
              "ratio_to_serial": evaluate_s / (serial * report["users"]), "passed": evaluate_s <= TARGET_S}
    return finish(result, format_table(result), args.out)


if __name__ == "__main__":
    raise SystemExit(main())
