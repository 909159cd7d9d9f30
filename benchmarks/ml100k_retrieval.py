"""Two-tower retrieval on MovieLens-100K against a popularity ranking and BPR matrix factorisation.

    OMP_NUM_THREADS=1 python benchmarks/ml100k_retrieval.py             # dataset in a temp dir
    OMP_NUM_THREADS=1 python benchmarks/ml100k_retrieval.py --out DIR   # keep dataset and runs in DIR

The protocol: all 100,000 ratings are implicit positives; each user's interactions are split at
random 80/10/10 with seed 2020 (`recstack data prepare --dataset ml-100k --split random --seed
2020`); every model ranks all 1,682 items for each user, validation removes the user's train
items and test removes train and valid items. The three models are scored by one function,
`training.retrieval.evaluate_rankings`, and both trained models are selected on validation
NDCG@10 (best checkpoint, early stopping) by the same `training.train` loop:

- popularity: items by their number of train interactions (`training.baselines`);
- BPR-MF: `models.mf.MatrixFactorization` with the BPR loss (`training.baselines.train_bpr`),
  settings in ``BPR_CONFIG`` below;
- two-tower: `training.train.train_retrieval`, which `recstack train retrieval --config
  configs/ml100k_retrieval.yaml` runs.

Both trained models were tuned on validation NDCG@10 with a dozen short runs each. For scale,
RecBole's quick start trains BPR on its own 80/10/10 random split of ML-100K and reports test
NDCG@10 0.292 (RUCAIBox/RecBole, docs/source/get_started/quick_start.rst).

The run passes when the two-tower's test NDCG@10 is at least 1.95x the popularity ranking's and
at least the BPR model's, and its training (wall time on CPU, data setup included) takes under
5 minutes. On a machine shared with other jobs, OMP_NUM_THREADS=1 steadies the times (see
`train_throughput.py`).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
import torchrec
from report import describe_machine, finish

from data.movielens import load_ml100k
from data.prepare import prepare
from data.stats import dataset_stats
from training.baselines import evaluate_popularity, train_bpr
from training.data import RetrievalDataModule
from training.train import RunConfig, load_config, train_retrieval

ROOT = Path(__file__).resolve().parents[1]
SEED = 2020
K = 10
METRICS = ("recall", "ndcg", "mrr", "hit", "precision")
TWO_TOWER_CONFIG = ROOT / "configs" / "ml100k_retrieval.yaml"
# Best validation NDCG@10 of a grid over lr {1e-3, 2e-3, 5e-3}, weight decay {0, 1e-5, 3e-5,
# 5e-5, 1e-4}, dim {64, 128} and item bias on or off (0.242; dim 128 tied).
BPR_CONFIG = RunConfig.model_validate({
    "train": {"max_epochs": 100, "batch_size": 1024, "lr": 2e-3, "weight_decay": 3e-5, "patience": 10,
              "accelerator": "cpu"},
    "model": {"dim": 64, "item_bias": True},
})
TARGETS = {"vs_popularity": 1.95, "vs_bpr": 1.0, "two_tower_train_s": 300.0}


def timed(run: Callable[[], dict]) -> dict:
    """``run()``'s results with its wall and CPU seconds (all threads of this process)."""
    wall, cpu = time.perf_counter(), time.process_time()
    results = run()
    return {**results, "train_s": time.perf_counter() - wall, "train_cpu_s": time.process_time() - cpu}


def run_popularity(data_dir: Path) -> dict:
    """Popularity has nothing to select: its validation and test metrics, and the time to count."""
    data = RetrievalDataModule(data_dir, ["user_id"], ["item_id"])
    data.setup()
    return {**{f"val_{n}": v for n, v in evaluate_popularity(data, "valid", K).items()},
            **{f"test_{n}": v for n, v in evaluate_popularity(data, "test", K).items()}}


def fresh(run_dir: Path) -> Path:
    """An empty run directory: a checkpoint left from an earlier run would be resumed, not retrained."""
    shutil.rmtree(run_dir, ignore_errors=True)
    return run_dir


def benchmark(work: Path) -> dict:
    data_dir = prepare(load_ml100k(), work / "ml-100k", split="random", seed=SEED, overwrite=True)
    stats = dataset_stats(data_dir)
    two_tower_config = load_config(TWO_TOWER_CONFIG, accelerator="cpu")
    models = {
        "popularity": timed(lambda: run_popularity(data_dir)),
        "bpr_mf": timed(lambda: train_bpr(data_dir, fresh(work / "runs" / "bpr_mf"), BPR_CONFIG)),
        "two_tower": timed(lambda: train_retrieval(data_dir, fresh(work / "runs" / "two_tower"), two_tower_config)),
    }
    ndcg = {name: results[f"test_ndcg@{K}"] for name, results in models.items()}
    ratios = {"vs_popularity": ndcg["two_tower"] / ndcg["popularity"], "vs_bpr": ndcg["two_tower"] / ndcg["bpr_mf"]}
    checks = {
        "vs_popularity": ratios["vs_popularity"] >= TARGETS["vs_popularity"],
        "vs_bpr": ratios["vs_bpr"] >= TARGETS["vs_bpr"],
        "two_tower_train_s": models["two_tower"]["train_s"] < TARGETS["two_tower_train_s"],
    }
    return {
        "machine": {**describe_machine(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                    "lightning": L.__version__, "torchrec": torchrec.__version__},
        "sizes": {key: stats[key] for key in ("users", "items", "interactions", "train_rows", "valid_rows",
                                              "test_rows")},
        "seed": SEED,
        "configs": {"bpr_mf": BPR_CONFIG.model_dump(), "two_tower": two_tower_config.model_dump()},
        "models": models,
        "ratios": ratios,
        "targets": TARGETS,
        "checks": checks,
        "passed": all(checks.values()),
    }


def format_table(result: dict) -> str:
    m, s, models = result["machine"], result["sizes"], result["models"]
    verdict = lambda ok: "pass" if ok else "FAIL"  # noqa: E731
    names = {"popularity": "popularity", "bpr_mf": "BPR-MF", "two_tower": "two-tower"}
    rows = [
        f"| {names[name]} | " + " | ".join(f"{r[f'test_{metric}@{K}']:.4f}" for metric in METRICS)
        + f" | {r[f'val_ndcg@{K}']:.4f} | {_epochs(r)} | {r['train_s']:.1f} | {r['train_cpu_s']:.1f} |"
        for name, r in models.items()
    ]
    ratios, targets, checks = result["ratios"], result["targets"], result["checks"]
    return "\n".join([
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, no GPU used; torch {m['torch']} "
        f"({m['torch_threads']} threads), lightning {m['lightning']}, torchrec {m['torchrec']}; "
        f"load average {m['load_average_1min']:.1f} at the start",
        f"Sizes: {s['users']:,} users, {s['items']:,} items, {s['interactions']:,} interactions; "
        f"train/valid/test rows {s['train_rows']:,} / {s['valid_rows']:,} / {s['test_rows']:,} "
        f"(per-user random split, seed {result['seed']}); full ranking over all {s['items']:,} items",
        "",
        "| model (test, @10) | Recall | NDCG | MRR | Hit | Precision | valid NDCG | best epoch (from 0) / epochs "
        "| train wall s | train CPU s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        "| check | value | target | result |",
        "|---|---:|---:|---|",
        f"| two-tower NDCG@10 / popularity NDCG@10 | {ratios['vs_popularity']:.3f} | >= {targets['vs_popularity']} "
        f"| {verdict(checks['vs_popularity'])} |",
        f"| two-tower NDCG@10 / BPR-MF NDCG@10 | {ratios['vs_bpr']:.3f} | >= {targets['vs_bpr']} "
        f"| {verdict(checks['vs_bpr'])} |",
        f"| two-tower CPU training wall time (s) | {models['two_tower']['train_s']:.1f} "
        f"| < {targets['two_tower_train_s']:.0f} | {verdict(checks['two_tower_train_s'])} |",
    ])


def _epochs(results: dict) -> str:
    return f"{results['best_epoch']} / {results['epochs']}" if "epochs" in results else "-"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="folder for the dataset and the runs (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "ml100k_retrieval.json")
    args = parser.parse_args(argv)
    if args.out:
        result = benchmark(args.out)
    else:
        with tempfile.TemporaryDirectory(prefix="ml100k-retrieval-") as tmp:
            result = benchmark(Path(tmp))
    return finish(result, format_table(result), args.json)


if __name__ == "__main__":
    raise SystemExit(main())
