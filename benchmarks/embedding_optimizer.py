"""Row-wise Adagrad on the embedding tables against dense Adam: speed and memory, and test AUC.

    python benchmarks/embedding_optimizer.py speed          # CPU: 26 x 200k x 64 both kinds, 26 x 1M x 64 row-wise
    python benchmarks/embedding_optimizer.py speed --device cuda   # + 26 x 1M x 128, batch 16,384, bf16, row-wise
    python benchmarks/embedding_optimizer.py speed --quick     # a smoke run with small tables (gpu_check --dry-run)
    python benchmarks/embedding_optimizer.py auc               # ML-100K and synthetic click-through, DLRM

``speed`` trains `train_throughput`'s DLRM on its batches (log-uniform, Zipf-like ids) with the
plain loop of `train_throughput.train_plain`: the dense layers by Adam, the tables by dense Adam
or by row-wise Adagrad (`training.optimizers`). Each (tables, kind) runs in a child process of its
own, so its peak RSS (``ru_maxrss``) is its own: the tables, the optimizer state, the gradients
and the batches. On the same machine the pair at 26 x 200k runs back to back, and the run passes
when row-wise Adagrad reaches 3x dense Adam's samples/s there and 26 x 1M x 64 peaks within 10 GiB.
Dense Adam is not run at 26 x 1M x 64: it would hold the weights, their dense gradient and
Adam's two moments, 4 x 26 x 1M x 64 x 4 bytes = 24.8 GiB, plus a table-sized temporary
(``exp_avg_sq.sqrt()``) per step, and so needs more than 26 GiB.

``auc`` trains DLRM with configs/<dataset>_ctr_dlrm.yaml on MovieLens-100K click-through (rating
>= 4, temporal split, as `make demo` prepares it) and on synthetic click-through (random split),
both prepared afresh under ``--out``, once with dense Adam and once per ``--lrs`` with
row-wise Adagrad, for each of ``--seeds``. Row-wise Adagrad's lr is the one with the best mean
validation AUC; the run passes when, seed by seed, its test AUC is at least dense Adam's - 0.005.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
from report import describe_machine, finish
from train_throughput import LARGE, WARMUP_STEPS, Workload, build_model, make_batches, train_plain

from training.optimizers import EmbeddingOptimizer

ROOT = Path(__file__).resolve().parents[1]
BATCH = 2048
BOTH = Workload(tables=26, rows=200_000, dim=64, batch=BATCH, bf16=False)  # dense Adam fits here
BIG = Workload(tables=26, rows=1_000_000, dim=64, batch=BATCH, bf16=False)  # dense Adam does not
QUICK_BOTH = Workload(tables=26, rows=20_000, dim=64, batch=BATCH, bf16=False)
QUICK_BIG = Workload(tables=26, rows=100_000, dim=64, batch=BATCH, bf16=False)
ROWWISE_LR = 0.05  # the speed runs time steps; the lr only has to be sane
SPEEDUP = 3.0
PEAK_RSS_GIB = 10.0
AUC_MARGIN = 0.005
SYNTHETIC = {"users": 500, "items": 500, "interactions": 300_000}


def run_one(work: Workload, kind: str, steps: int, device: str, seed: int) -> dict:
    """In this process: ``WARMUP_STEPS`` + ``steps`` plain-loop steps; samples/s and peak memory."""
    start = time.perf_counter()
    model = build_model(work, seed).to(device)
    batches = make_batches(work, seed, torch.device(device))
    built_s = time.perf_counter() - start
    schedule = [batches[i % len(batches)] for i in range(WARMUP_STEPS + steps)]
    tables = EmbeddingOptimizer(kind, lr=ROWWISE_LR) if kind == "rowwise_adagrad" else EmbeddingOptimizer()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    timing = train_plain(model, schedule, work.bf16, tables)
    return {
        "workload": asdict(work), "kind": kind, "device": device, "steps": steps, "built_s": built_s,
        "samples_per_s": steps * work.batch / timing.wall_s,
        "samples_per_cpu_s": steps * work.batch / timing.cpu_s,
        "last_loss": timing.last_loss,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,  # KiB on Linux
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
    }


def run_child(work: Workload, kind: str, steps: int, device: str, seed: int, threads: int) -> dict:
    """`run_one` in a fresh process, so that its peak RSS is its own."""
    spec = json.dumps({"work": asdict(work), "kind": kind, "steps": steps, "device": device, "seed": seed})
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run([sys.executable, __file__, "child", spec], capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"{kind} on {Workload(**asdict(work))} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def speed(args: argparse.Namespace) -> dict:
    both, big = (QUICK_BOTH, QUICK_BIG) if args.quick else (BOTH, BIG)
    runs = [run_child(both, kind, args.steps, args.device, args.seed, args.threads)
            for kind in ("adam", "rowwise_adagrad")]
    runs.append(run_child(big, "rowwise_adagrad", args.steps, args.device, args.seed, args.threads))
    if args.device == "cuda":
        runs.append(run_child(LARGE, "rowwise_adagrad", args.steps, args.device, args.seed, args.threads))
    adam, rowwise = runs[0], runs[1]
    speedup = rowwise["samples_per_s"] / adam["samples_per_s"]
    return {
        "machine": {**describe_machine(), "torch": torch.__version__, "threads": args.threads},
        "mode": "speed", "quick": args.quick, "runs": runs, "speedup": speedup,
        "cpu_speedup": rowwise["samples_per_cpu_s"] / adam["samples_per_cpu_s"],
        "dense_adam_big_gib": 4 * big.tables * big.rows * big.dim * 4 / 2**30,
        # a quick run's small tables say nothing about the targets: it only has to run
        "passed": args.quick or (speedup >= SPEEDUP and runs[2]["peak_rss_gib"] <= PEAK_RSS_GIB),
    }


def format_speed(result: dict) -> str:
    m = result["machine"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, torch {m['torch']} ({m['threads']} "
        f"threads); load average {m['load_average_1min']:.1f} at the start. DLRM, plain loop, "
        f"{WARMUP_STEPS} warm-up then {result['runs'][0]['steps']} timed steps; each row in its own process.",
        "",
        "| tables x rows x dim, batch | device | precision | tables' optimizer | samples/s | samples/CPU-s "
        "| peak RSS GiB | peak GPU GiB |",
        "|---|---|---|---|---:|---:|---:|---:|",
    ]
    for r in result["runs"]:
        work = Workload(**r["workload"])
        gpu = f"{r['peak_gpu_gib']:.1f}" if r["peak_gpu_gib"] is not None else ""
        lines.append(f"| {work} | {r['device']} | {'bf16' if work.bf16 else 'fp32'} | {r['kind']} "
                     f"| {r['samples_per_s']:,.0f} | {r['samples_per_cpu_s']:,.0f} | {r['peak_rss_gib']:.2f} | {gpu} |")
    big = result["runs"][2]
    lines += [
        "",
        f"Row-wise Adagrad / dense Adam at {Workload(**result['runs'][0]['workload'])}: {result['speedup']:.1f}x "
        f"samples/s ({result['cpu_speedup']:.1f}x by CPU time); target >= {SPEEDUP}x.",
        f"{Workload(**big['workload'])} with row-wise Adagrad: peak RSS {big['peak_rss_gib']:.2f} GiB; target <= "
        f"{PEAK_RSS_GIB} GiB. Dense Adam there would hold 4 table-sized tensors, "
        f"{result['dense_adam_big_gib']:.1f} GiB, plus a table-sized temporary each step: not run.",
    ]
    if len(result["runs"]) > 3:
        large = result["runs"][3]
        lines.append(f"{Workload(**large['workload'])}, bf16, row-wise Adagrad: {large['samples_per_s']:,.0f} "
                     f"samples/s, peak GPU {large['peak_gpu_gib']:.1f} GiB (goal on an H200: >= 1M samples/s "
                     "within 16 GiB).")
    lines.append("Result: quick run, no verdict (small tables)." if result["quick"]
                 else f"Result: {'pass' if result['passed'] else 'FAIL'}.")
    return "\n".join(lines)


def auc_parity(args: argparse.Namespace) -> dict:
    from data.movielens import load_ml100k
    from data.prepare import prepare
    from data.synthetic import SyntheticConfig, generate
    from training.train import load_config, train_ranker

    out = Path(args.out or tempfile.mkdtemp(prefix="embedding_optimizer_"))
    datasets = {
        "ml-100k": (lambda: prepare(load_ml100k(), out / "ml-100k", split="temporal", positive_rating=4),
                    ROOT / "configs" / "ml100k_ctr_dlrm.yaml"),
        "synthetic": (lambda: prepare(generate(SyntheticConfig(**SYNTHETIC, seed=0)), out / "synthetic",
                                      split="random", seed=0), ROOT / "configs" / "synthetic_ctr_dlrm.yaml"),
    }
    results = {}
    for name in args.datasets:
        make_data, config_path = datasets[name]
        data_dir = make_data()
        variants = {"adam": EmbeddingOptimizer(), **{f"rowwise_adagrad lr {lr:g}": EmbeddingOptimizer(
            "rowwise_adagrad", lr=lr) for lr in args.lrs}}
        runs: dict[str, list[dict]] = {}
        for label, tables in variants.items():
            for seed in args.seeds:
                config = load_config(config_path, seed=seed, accelerator="cpu")
                config = config.model_copy(update={"embedding_optimizer": tables})
                start = time.perf_counter()
                run_dir = out / "runs" / name / label.replace(" ", "_") / str(seed)
                metrics = train_ranker("dlrm", data_dir, run_dir, config)
                runs.setdefault(label, []).append({"seed": seed, "val_auc": metrics["val_auc"],
                                                   "test_auc": metrics["test_auc"], "best_epoch": metrics["best_epoch"],
                                                   "train_s": time.perf_counter() - start})
                print(name, label, runs[label][-1], flush=True)
        chosen = max((label for label in runs if label != "adam"),
                     key=lambda label: statistics.mean(r["val_auc"] for r in runs[label]))
        diffs = [r["test_auc"] - a["test_auc"] for r, a in zip(runs[chosen], runs["adam"], strict=True)]
        results[name] = {"data": str(data_dir), "config": str(config_path.relative_to(ROOT)), "runs": runs,
                         "chosen": chosen, "test_auc_diffs": diffs, "passed": min(diffs) >= -AUC_MARGIN}
    return {"machine": {**describe_machine(), "torch": torch.__version__}, "mode": "auc", "seeds": args.seeds,
            "datasets": results, "passed": all(r["passed"] for r in results.values())}


def format_auc(result: dict) -> str:
    lines = [f"DLRM test AUC, dense Adam against row-wise Adagrad on the tables (dense layers: Adam in both); "
             f"seeds {result['seeds']}; row-wise lr chosen on mean validation AUC.", "",
             "| dataset | tables' optimizer | mean val AUC | test AUC per seed | mean test AUC |",
             "|---|---|---:|---|---:|"]
    for name, r in result["datasets"].items():
        for label, runs in r["runs"].items():
            mark = " (chosen)" if label == r["chosen"] else ""
            per_seed = ", ".join(f"{x['test_auc']:.4f}" for x in runs)
            lines.append(f"| {name} | {label}{mark} | {statistics.mean(x['val_auc'] for x in runs):.4f} "
                         f"| {per_seed} | {statistics.mean(x['test_auc'] for x in runs):.4f} |")
    lines.append("")
    for name, r in result["datasets"].items():
        diffs = ", ".join(f"{d:+.4f}" for d in r["test_auc_diffs"])
        lines.append(f"{name}: chosen {r['chosen']}, test AUC - dense Adam's per seed {diffs}; "
                     f"target >= -{AUC_MARGIN}: {'pass' if r['passed'] else 'FAIL'}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    child = sub.add_parser("child", help="internal: one speed run, as JSON on stdout")
    child.add_argument("spec")
    run = sub.add_parser("speed", help="samples/s and peak memory")
    run.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    run.add_argument("--steps", type=int, default=10, help=f"timed steps per run, after {WARMUP_STEPS} warm-up")
    run.add_argument("--threads", type=int, default=1, help="torch threads of each run (OMP_NUM_THREADS)")
    run.add_argument("--quick", action="store_true", help="26 x 20k and 26 x 100k tables: a smoke run")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "embedding_optimizer.json")
    quality = sub.add_parser("auc", help="test AUC of dense Adam and row-wise Adagrad")
    quality.add_argument("--datasets", nargs="+", choices=("ml-100k", "synthetic"), default=["ml-100k", "synthetic"])
    quality.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    quality.add_argument("--lrs", type=float, nargs="+", default=[0.01, 0.03, 0.1], help="row-wise Adagrad lrs")
    quality.add_argument("--out", type=Path, help="folder for the synthetic dataset and the runs (default: temp)")
    quality.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "embedding_optimizer_auc.json")
    args = parser.parse_args(argv)

    if args.mode == "child":
        spec = json.loads(args.spec)
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        print(json.dumps(run_one(Workload(**spec["work"]), spec["kind"], spec["steps"], spec["device"], spec["seed"])))
        return 0
    if args.mode == "speed":
        if args.steps < 1 or args.threads < 1:
            raise ValueError(f"--steps {args.steps}, --threads {args.threads}; expected both >= 1")
        if args.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda, but torch sees no CUDA device; expected one, or --device cpu")
        result = speed(args)
        return finish(result, format_speed(result), args.json)
    torch.set_num_threads(1)
    result = auc_parity(args)
    return finish(result, format_auc(result), args.json)


if __name__ == "__main__":
    raise SystemExit(main())
