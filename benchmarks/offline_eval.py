"""`recstack evaluate offline` over 20,000 held-out users of a 1M-item synthetic catalogue.

    python benchmarks/offline_eval.py            # 1M items, 32k users, 2.5M interactions
    python benchmarks/offline_eval.py --small    # 50k items, 2,000 evaluated users: a quick run
    python benchmarks/offline_eval.py --truth    # trained models on small synthetic data, expected clicks

Steps, as in benchmarks/pipeline.py: the synthetic dataset (split at random per user, 80/10/10, so
most users have held-out rows); untrained two-tower, DeepFM and linear runs (the time does not
depend on what the weights learnt); one full refresh from the train part; the pipeline of
configs/pipeline.yaml (max_k 100). Then, timed, `evaluate_offline` of the test part at k = 10, 20,
50 for a seeded sample of the users, with each stage's seconds. The baseline in the same run is
the serving path: the same pipeline answering a sample of the same users one request at a time,
its per-request time scaled to every evaluated user.

It passes when the evaluation takes at most 10 minutes.

With ``--truth`` it measures quality instead of time: a synthetic dataset of `TRUTH_SIZES`
(random split), a two-tower (`TRUTH_RUNS`), DeepFM (configs/synthetic_ctr_deepfm.yaml) and linear
ranker trained on it, one full refresh from the train part, and `evaluate_offline --truth` on the
test part at k = 10.
It passes when the pipeline's expected clicks@10 by the generator's click probabilities are at
least 0.9x the oracle's (the best available unseen items) and above retrieval alone's.
"""

from __future__ import annotations

import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import torch
from pipeline import CONFIG, pipeline_config
from refresh import untrained_run
from report import arguments, describe_machine, finish

from data.dataset import Dataset, read_dataset, read_part, write_dataset
from data.prepare import prepare
from data.synthetic import SyntheticConfig, generate
from evaluation.offline import OfflineConfig, evaluate_offline, read_held_out, request_context
from inference.artifacts import ArtifactRoot
from inference.pipeline.config import PipelineConfig
from inference.pipeline.executor import Pipeline, build_pipeline
from inference.pipeline.types import Query
from inference.refresh.job import refresh
from inference.version import open_version
from training.train import RunConfig, load_config, train_ranker, train_retrieval

ROOT = Path(__file__).resolve().parents[1]
FULL = {"users": 32_000, "items": 1_000_000, "interactions": 2_500_000}
SMALL = {"users": 5_000, "items": 50_000, "interactions": 250_000}
EVALUATED = {"full": 20_000, "small": 2_000}
SERIAL_USERS = 300  # requests of the one-at-a-time baseline
KS = (10, 20, 50)
TARGET_S = 600.0
TRUTH_SIZES = {"users": 2_000, "items": 2_000, "interactions": 200_000}
TRUTH_RUNS = {
    "two_tower": {"train": {"lr": 0.005, "max_epochs": 8, "batch_size": 1024, "patience": 2, "accelerator": "cpu"},
                  "model": {"hidden_sizes": [], "output_dim": 32}},
    "linear": {"train": {"lr": 0.01, "max_epochs": 4, "batch_size": 8192, "accelerator": "cpu"}},
}
TRUTH_TARGETS = {"vs_oracle": 0.9, "vs_retrieval": 1.0}


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


def synthetic_pipeline(root: Path) -> Pipeline:
    """The benchmark pipeline (configs/pipeline.yaml, timeouts 5 s) over the version under ``root``;
    the synthetic models read no request-time features, so none is derived from the clock."""
    config = pipeline_config().model_dump()
    config.pop("time_features", None)
    return build_pipeline(PipelineConfig.model_validate(config), open_version(ArtifactRoot(root).path("v0001")))


def train_part(data: Path, out: Path) -> Path:
    """A dataset at ``out`` whose interactions are the train part of ``data`` (same users, items and
    schema): a version refreshed from it has no pool, list or seen item from a held-out row."""
    tables = read_dataset(data, tables=("users", "items"))
    return write_dataset(Dataset(read_part(data, "train"), tables.users, tables.items, tables.schema), out,
                         overwrite=True)


def build_version(work: Path, sizes: dict, seed: int, trained: bool) -> Path:
    """The dataset of ``sizes`` under ``work``/data and a version refreshed from its train part under
    ``work``/artifacts, from trained or untrained runs; both are reused when ``work`` already holds them."""
    data = work / "data"
    if (work / "artifacts" / "CURRENT").is_file():
        return data
    prepare(generate(SyntheticConfig(**sizes, seed=seed)), data, split="random", seed=seed, overwrite=True)
    models = work / "models"
    if trained:
        train_retrieval(data, models / "two_tower", RunConfig.model_validate(TRUTH_RUNS["two_tower"]))
        deepfm = load_config(ROOT / "configs" / "synthetic_ctr_deepfm.yaml", accelerator="cpu", max_epochs=6)
        train_ranker("deepfm", data, models / "deepfm", deepfm)
        train_ranker("linear", data, models / "linear", RunConfig.model_validate(TRUTH_RUNS["linear"]))
    else:
        for model in ("two_tower", "deepfm", "linear"):
            untrained_run(data, models / model, model)
    refresh(train_part(data, work / "train"), models, work / "artifacts", CONFIG)
    return data


def run_truth(work: Path, seed: int) -> dict:
    """Expected clicks@10 of the pipeline, retrieval alone and the oracle with trained models."""
    data = build_version(work, TRUTH_SIZES, seed, trained=True)
    pipeline = synthetic_pipeline(work / "artifacts")
    try:
        report = evaluate_offline(pipeline, data, OfflineConfig("test", (10,), seed=seed, truth=True))
    finally:
        pipeline.close()
    clicks = {name: values["clicks@10"] for name, values in report["truth"].items()}
    ratios = {"vs_oracle": clicks["pipeline"] / clicks["oracle"],
              "vs_retrieval": clicks["pipeline"] / clicks["retrieval"]}
    return {"sizes": TRUTH_SIZES, "users": report["users"], "clicks@10": clicks, "ratios": ratios,
            "ndcg@10": {name: report["lists"][name]["ndcg@10"] for name in ("pipeline", "retrieval", "popularity")},
            "passed": ratios["vs_oracle"] >= TRUTH_TARGETS["vs_oracle"] and ratios["vs_retrieval"] > 1.0}


def format_truth(result: dict) -> str:
    m, t = result["machine"], result["truth"]
    clicks, ratios = t["clicks@10"], t["ratios"]
    return "\n".join([
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; load average {m['load_average_1min']:.1f}",
        f"Synthetic: {t['sizes']['items']:,} items, {t['sizes']['users']:,} users, {t['sizes']['interactions']:,} "
        f"interactions (random split); {t['users']:,} evaluated users (test part)",
        "",
        "| list | expected clicks@10 | NDCG@10 (held-out clicks) |",
        "|---|---:|---:|",
        *[f"| {name} | {clicks[name]:.4f} | {t['ndcg@10'][name]:.4f} |" for name in ("pipeline", "retrieval")],
        f"| oracle (best available unseen items) | {clicks['oracle']:.4f} | |",
        "",
        "| check | value | target | result |",
        "|---|---:|---:|---|",
        f"| pipeline / oracle | {ratios['vs_oracle']:.3f} | >= {TRUTH_TARGETS['vs_oracle']} | "
        f"{'pass' if ratios['vs_oracle'] >= TRUTH_TARGETS['vs_oracle'] else 'FAIL'} |",
        f"| pipeline / retrieval alone | {ratios['vs_retrieval']:.3f} | > {TRUTH_TARGETS['vs_retrieval']} | "
        f"{'pass' if ratios['vs_retrieval'] > TRUTH_TARGETS['vs_retrieval'] else 'FAIL'} |",
    ])


def main() -> int:
    parser = arguments(__doc__, "offline_eval")
    parser.add_argument("--truth", action="store_true", help="expected clicks with trained models, not time")
    parser.add_argument("--work", type=Path,
                        help="keep the dataset, runs and version here and reuse them (default: a temp dir)")
    args = parser.parse_args()
    with ExitStack() as stack:
        work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="offline-eval-")))
        if args.truth:
            result = {"machine": describe_machine(), "seed": args.seed, "truth": run_truth(work, args.seed)}
            result["passed"] = result["truth"]["passed"]
            return finish(result, format_truth(result), args.out.with_name("offline_truth.json"))
        torch.set_num_threads(1)
        sizes, evaluated = (SMALL, EVALUATED["small"]) if args.small else (FULL, EVALUATED["full"])
        machine = describe_machine()
        data = build_version(work, sizes, args.seed, trained=False)
        pipeline = synthetic_pipeline(work / "artifacts")
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
