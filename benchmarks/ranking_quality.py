"""Ranking quality of linear, DeepFM and DLRM on MovieLens-100K and on synthetic data.

    python benchmarks/ranking_quality.py                # the full run (~8 minutes on one CPU thread)
    python benchmarks/ranking_quality.py --quick        # a smoke run: small synthetic data, 2 epochs
    python benchmarks/ranking_quality.py --only ml-100k # one dataset; --seed 1 trains every model with seed 1

Both datasets are prepared afresh (in a temporary folder, or under --out), and each model is
trained through `training.train.train_ranker` with its config from configs/:

- MovieLens-100K as click-through (label: rating >= 4) under a temporal split. DeepFM and DLRM
  pass when their test AUC is at least 0.02 above the logistic regression (`linear`).
- The synthetic generator under a random split. The Bayes-optimal test AUC ranks the test rows
  by the generator's true click probability; DeepFM and DLRM pass at 0.97 of it.

The synthetic sizes give users and items 3,200 train rows each on average: with hundreds per
user the 16-dim tastes are too noisy to learn, and AUC / Bayes stays near 0.93-0.96. None of the
rankers sees time, while the generator's tastes drift over the period, so even a perfect
time-free model falls short of the Bayes AUC; the "frozen taste" line measures that ceiling.
Tables go to stdout and everything to benchmarks/results/ranking_quality.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import lightning
import numpy as np
import torch
from report import describe_machine

from data.dataset import read_part
from data.movielens import load_ml100k
from data.prepare import prepare
from data.synthetic import SyntheticConfig, generate, load_ground_truth
from evaluation.metrics import auc
from models import RANKERS
from training.train import load_config, train_ranker

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ("ml-100k", "synthetic")
FULL = {"users": 500, "items": 500, "interactions": 2_000_000}
QUICK = {"users": 200, "items": 200, "interactions": 100_000}
QUICK_EPOCHS = 2
SEED = 0
ML_MARGIN = 0.02  # AUC over the linear model
BAYES_RATIO = 0.97  # share of the Bayes-optimal AUC


def train_models(dataset: str, data_dir: Path, runs: Path, max_epochs: int | None, seed: int) -> list[dict]:
    """Trains every model on ``data_dir`` with configs/<dataset>_ctr_<model>.yaml; test metrics and seconds."""
    rows = []
    for model in RANKERS:
        config_path = ROOT / "configs" / f"{dataset}_ctr_{model}.yaml"
        config = load_config(config_path, max_epochs=max_epochs, seed=seed)
        start = time.perf_counter()
        result = train_ranker(model, data_dir, runs / model, config)
        rows.append({
            "model": model,
            "config": str(config_path.relative_to(ROOT)),
            "auc": result["test_auc"],
            "logloss": result["test_logloss"],
            "calibration": result["test_calibration"],
            "val_auc": result["val_auc"],
            "best_epoch": result["best_epoch"],
            "epochs": result["epochs"],
            "train_s": time.perf_counter() - start,
        })
    return rows


def run_movielens(out: Path, max_epochs: int | None, seed: int, split: str) -> dict:
    data_dir = prepare(load_ml100k(), out / "ml-100k", split=split, positive_rating=4)
    rows = train_models("ml100k", data_dir, out / "runs" / "ml-100k", max_epochs, seed)
    linear = next(r["auc"] for r in rows if r["model"] == "linear")
    for r in rows:
        r["auc_over_linear"] = r["auc"] - linear
        r["passed"] = None if r["model"] == "linear" else r["auc_over_linear"] >= ML_MARGIN
    return {
        "command": f"recstack data prepare --dataset ml-100k --split {split} --positive-rating 4 --out {data_dir}",
        "split": split,
        "rows_per_part": _rows_per_part(data_dir),
        "models": rows,
    }


def run_synthetic(out: Path, sizes: dict, max_epochs: int | None, seed: int) -> dict:
    data_dir = prepare(generate(SyntheticConfig(**sizes, seed=SEED)), out / "synthetic", split="random", seed=SEED)
    test = read_part(data_dir, "test")
    bayes = auc(test["label"], test["click_prob"])
    truth = load_ground_truth(data_dir)
    mid_period = np.full(len(test), truth.start + truth.seconds // 2)
    frozen = auc(test["label"], truth.click_probability(test["user_id"].to_numpy(), test["item_id"].to_numpy(),
                                                        mid_period))
    rows = train_models("synthetic", data_dir, out / "runs" / "synthetic", max_epochs, seed)
    for r in rows:
        r["ratio_to_bayes"] = r["auc"] / bayes
        r["passed"] = None if r["model"] == "linear" else r["ratio_to_bayes"] >= BAYES_RATIO
    return {
        "command": (f"recstack data prepare --dataset synthetic --users {sizes['users']} --items {sizes['items']} "
                    f"--interactions {sizes['interactions']} --seed {SEED} --split random --out {data_dir}"),
        "sizes": sizes,
        "rows_per_part": _rows_per_part(data_dir),
        "bayes_auc": bayes,
        "frozen_taste_auc": frozen,
        "models": rows,
    }


def _rows_per_part(data_dir: Path) -> dict:
    return {part: len(read_part(data_dir, part)) for part in ("train", "valid", "test")}


def _verdict(passed: bool | None) -> str:
    return "baseline" if passed is None else "pass" if passed else "FAIL"


def format_movielens(result: dict) -> str:
    lines = [
        "| model | test AUC | AUC - linear | target | result | logloss | calibration | best epoch | train s |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in result["models"]:
        over, target = ("", "") if r["passed"] is None else (f"{r['auc_over_linear']:+.4f}", f">= {ML_MARGIN}")
        lines.append(f"| {r['model']} | {r['auc']:.4f} | {over} | {target} | {_verdict(r['passed'])} | "
                     f"{r['logloss']:.4f} | {r['calibration']:.3f} | {r['best_epoch']} | {r['train_s']:.0f} |")
    return "\n".join(lines)


def format_synthetic(result: dict) -> str:
    bayes = result["bayes_auc"]
    lines = [
        "| model | test AUC | Bayes AUC | AUC / Bayes | target | result | logloss | calibration | best epoch "
        "| train s |",
        "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in result["models"]:
        target = "" if r["passed"] is None else f">= {BAYES_RATIO}"
        lines.append(f"| {r['model']} | {r['auc']:.4f} | {bayes:.4f} | {r['ratio_to_bayes']:.4f} | {target} | "
                     f"{_verdict(r['passed'])} | {r['logloss']:.4f} | {r['calibration']:.3f} | {r['best_epoch']} | "
                     f"{r['train_s']:.0f} |")
    return "\n".join(lines)


def format_report(result: dict) -> str:
    m = result["machine"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, torch threads {m['torch_threads']}; Python {m['python']}, "
        f"torch {m['torch']}, lightning {m['lightning']}; load average {m['load_average_1min']:.1f} at the start; "
        f"training seed {result['seed']}" + ("; QUICK run" if result["quick"] else ""),
    ]
    if "ml-100k" in result:
        ml = result["ml-100k"]
        lines += [
            "",
            f"## MovieLens-100K, label rating >= 4, {ml['split']} split",
            f"`{ml['command']}`; rows train/valid/test: {_parts(ml)}",
            "",
            format_movielens(ml),
        ]
    if "synthetic" in result:
        syn = result["synthetic"]
        s = syn["sizes"]
        lines += [
            "",
            "## Synthetic, random split",
            f"`{syn['command']}`; {s['users']:,} users, {s['items']:,} items, {s['interactions']:,} interactions; "
            f"rows train/valid/test: {_parts(syn)}",
            f"Bayes AUC {syn['bayes_auc']:.4f}; with each user's taste frozen at mid-period (the ceiling without "
            f"time features) {syn['frozen_taste_auc']:.4f} = {syn['frozen_taste_auc'] / syn['bayes_auc']:.4f} of "
            "Bayes",
            "",
            format_synthetic(syn),
        ]
    return "\n".join(lines)


def _parts(result: dict) -> str:
    return " / ".join(f"{n:,}" for n in result["rows_per_part"].values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help=f"synthetic data at {QUICK} and {QUICK_EPOCHS} epochs per model")
    parser.add_argument("--only", choices=DATASETS, help="run one dataset (default: both)")
    parser.add_argument("--ml-split", choices=("temporal", "user-temporal"), default="temporal",
                        help="MovieLens-100K split: global time order (default), or each user's rows in time order")
    parser.add_argument("--seed", type=int, default=SEED, help=f"training seed of every model (default {SEED})")
    parser.add_argument("--out", type=Path, help="new folder to keep the datasets and runs in (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "ranking_quality.json")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on a shared machine, threads that outnumber the free "
                             "cores spin-wait and run ~10x slower)")
    args = parser.parse_args(argv)
    if args.out is not None and args.out.exists() and any(args.out.iterdir()):
        raise SystemExit(f"--out {args.out} is not empty; a run there would resume old checkpoints")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    max_epochs = QUICK_EPOCHS if args.quick else None

    machine = {**describe_machine(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
               "lightning": lightning.__version__}
    with tempfile.TemporaryDirectory(prefix="ranking-quality-") as tmp:
        out = args.out or Path(tmp)
        result = {
            "machine": machine,
            "quick": args.quick,
            "seed": args.seed,
            "targets": {"auc_over_linear": ML_MARGIN, "ratio_to_bayes": BAYES_RATIO},
        }
        if args.only in (None, "ml-100k"):
            result["ml-100k"] = run_movielens(out, max_epochs, args.seed, args.ml_split)
        if args.only in (None, "synthetic"):
            result["synthetic"] = run_synthetic(out, QUICK if args.quick else FULL, max_epochs, args.seed)
    checked = [r["passed"] for name in DATASETS if name in result for r in result[name]["models"]]
    result["passed"] = all(p for p in checked if p is not None)
    print(format_report(result))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.json}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
