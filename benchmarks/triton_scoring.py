"""Ranker scoring through Triton, with dynamic batching on and off, against in-process TorchScript.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/triton_scoring.py              # about 2 minutes
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/triton_scoring.py --seconds 1  # a quicker, noisier run

A synthetic dataset (1,000 users, 1,000 items) is prepared and DeepFM trained on it for one epoch
in a temporary folder, then exported (`inference.export`) and written into two Triton repositories
(`inference.triton.repository`) that differ only in dynamic batching. Both run DeepFM from the
Python backend (the bundled server's only backend) with one CPU instance. Each request is one
user and 200 distinct random items; C client threads each send requests in a closed loop for
--seconds after a warm-up, in two ways:

- encoded requests (C = 1, 8, 32): the padded tensors are built beforehand, and a request is one
  gRPC infer call, or one forward pass of the TorchScript model in this process (the baseline);
- whole scorer calls (C = 1, 32): `TritonScorer` or `TorchScriptScorer`, which encode the 200
  feature rows in the client first, as the pipeline does.

Target: for encoded requests at C = 32, batching on serves at least 2x the requests per second of
batching off. Tables go to stdout, everything to benchmarks/results/triton.json.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import tritonclient.grpc as grpcclient
from report import describe_machine, finish, free_port

from data.dataset import read_dataset
from data.prepare import prepare
from data.synthetic import SyntheticConfig, generate
from inference.export import export_models
from inference.pipeline.scorers import ModelInputs, TorchScriptScorer
from inference.pipeline.types import Candidates, Query
from inference.triton.repository import RepositoryConfig, write_repository
from inference.triton.scorer import TritonScorer
from inference.triton.server import TritonServer
from training.train import RunConfig, train_ranker

ROOT = Path(__file__).resolve().parents[1]
CANDIDATES = 200
CONCURRENCY = (1, 8, 32)
WHOLE_CONCURRENCY = (1, 32)
DISTINCT_REQUESTS = 64
WARM_UP_S = 1.0
TARGET_RATIO = 2.0
MODEL = "deepfm"
RUN = {"train": {"lr": 0.03, "max_epochs": 1, "batch_size": 512, "accelerator": "cpu"},
       "model": {"embedding_dim": 8, "hidden_sizes": [16]}}


def build_model(root: Path) -> Path:
    """Prepares the dataset, trains and exports DeepFM; returns the export directory."""
    dataset = prepare(generate(SyntheticConfig(users=1000, items=1000, interactions=20_000, seed=0)),
                      root / "synthetic", split="temporal", seed=0)
    train_ranker(MODEL, dataset, root / "run", RunConfig.model_validate(RUN))
    export_models({MODEL: root / "run"}, root / "models")
    return dataset


def make_requests(dataset: Path, seed: int = 0) -> list[tuple[Query, Candidates]]:
    """DISTINCT_REQUESTS requests: a random user and CANDIDATES distinct random items, hydrated."""
    ds = read_dataset(dataset, tables=("users", "items"))
    users, items = ds.users.reset_index(drop=True), ds.items.reset_index(drop=True)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(DISTINCT_REQUESTS):
        user = users.iloc[np.full(CANDIDATES, rng.integers(len(users)))].reset_index(drop=True)
        chosen = items.iloc[rng.choice(len(items), CANDIDATES, replace=False)].reset_index(drop=True)
        features = pd.concat([user, chosen], axis=1)
        out.append((Query(int(user["user_id"].iloc[0])), Candidates(
            chosen["item_id"].to_numpy(np.int64), np.full(CANDIDATES, "bench"), np.zeros(CANDIDATES, np.float32),
            features)))
    return out


def run_load(call, n_requests: int, concurrency: int, seconds: float) -> dict:
    """``concurrency`` threads calling ``call(request index)`` in a closed loop: latency percentiles (ms)
    and throughput."""
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    measuring, stop = threading.Event(), threading.Event()

    def client(k: int) -> None:
        i = k
        while not stop.is_set():
            start = time.perf_counter()
            call(i % n_requests)
            if measuring.is_set():
                latencies[k].append(time.perf_counter() - start)
            i += concurrency

    threads = [threading.Thread(target=client, args=(k,)) for k in range(concurrency)]
    for t in threads:
        t.start()
    time.sleep(WARM_UP_S)
    measuring.set()
    start = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    done = np.concatenate([np.asarray(x) for x in latencies]) * 1e3
    return {"concurrency": concurrency, "requests": len(done), "p50_ms": float(np.percentile(done, 50)),
            "p99_ms": float(np.percentile(done, 99)), "requests_per_s": len(done) / elapsed,
            "candidates_per_s": len(done) * CANDIDATES / elapsed}


def infer_inputs(tensors: list[tuple[torch.Tensor, ...]]) -> list[list[grpcclient.InferInput]]:
    """Each request's padded tensors as gRPC infer inputs, built once."""
    out = []
    for request in tensors:
        inputs = []
        for name, tensor in zip(("dense", "ids", "lengths"), request, strict=True):
            array = tensor.numpy()
            inputs.append(grpcclient.InferInput(name, list(array.shape), "FP32" if name == "dense" else "INT64"))
            inputs[-1].set_data_from_numpy(array)
        out.append(inputs)
    return out


def measure_triton(models: Path, repo: Path, batching: bool, requests: list, tensors: list,
                   seconds: float) -> tuple[list, list, dict]:
    """Through a fresh server on ``repo``: rows for encoded requests and for whole scorer calls, and
    how many requests its model executions served."""
    write_repository(models, repo, RepositoryConfig(dynamic_batching=batching))
    model = f"{MODEL}_py"
    with TritonServer(repo, free_port(), free_port(), models=[model]) as server:
        scorer = TritonScorer(server.grpc_url, model, ModelInputs.load(models, MODEL), timeout_s=30.0)
        client = grpcclient.InferenceServerClient(server.grpc_url)
        inputs = infer_inputs(tensors)
        encoded = [run_load(lambda i: client.infer(model, inputs[i]), len(inputs), c, seconds) for c in CONCURRENCY]
        whole = [run_load(lambda i: scorer(*requests[i]), len(requests), c, seconds) for c in WHOLE_CONCURRENCY]
        stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    served = {"requests": int(stats["inference_stats"]["success"]["count"]),
              "executions": int(stats["execution_count"])}
    return encoded, whole, served


def format_rows(paths: dict) -> list[str]:
    lines = ["| path | clients | p50 ms | p99 ms | requests/s | candidates/s |", "|---|---:|---:|---:|---:|---:|"]
    for path, rows in paths.items():
        lines += [f"| {path} | {r['concurrency']} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['requests_per_s']:,.0f} "
                  f"| {r['candidates_per_s']:,.0f} |" for r in rows]
    return lines


def format_table(result: dict) -> str:
    m = result["machine"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; Python {m['python']}, torch {m['torch']} "
        f"({m['torch_threads']} thread); load average {m['load_average_1min']:.1f} at the start",
        f"DeepFM, {CANDIDATES} candidates per request, closed loop, {result['seconds']:g} s per row after "
        f"{WARM_UP_S:g} s of warm-up; Triton: Python backend, 1 CPU instance, gRPC.",
        "",
        "Scoring encoded requests (padded tensors built beforehand):",
        "",
        *format_rows(result["encoded"]),
        "",
        f"Whole scorer calls (encoding the {CANDIDATES} feature rows, then scoring); encoding alone: "
        f"{result['encode_ms']:.2f} ms per request (median, one client):",
        "",
        *format_rows(result["whole"]),
        "",
        "| Triton | requests | model executions | requests per execution |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {path} | {s['requests']:,} | {s['executions']:,} | {s['requests'] / s['executions']:.1f} |"
              for path, s in result["executions"].items()]
    verdict = "pass" if result["passed"] else "FAIL"
    lines += ["", f"Encoded requests at {CONCURRENCY[-1]} clients, batching on / off: {result['ratio']:.2f}x "
              f"requests/s (target >= {TARGET_RATIO:g}x): {verdict}"]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="measured seconds per row")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "triton.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    machine = {**describe_machine(), "torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory(prefix="recstack-triton-bench-") as tmp:
        root = Path(tmp)
        requests = make_requests(build_model(root))
        models = root / "models"
        in_process = TorchScriptScorer(models, MODEL)
        tensors = [in_process.inputs(c.features) for _, c in requests]
        encode_ms = float(np.median([timed(in_process.inputs, c.features) for _, c in requests])) * 1e3

        def forward(i: int) -> None:
            with torch.inference_mode():
                in_process.model(*tensors[i])

        baseline = "in-process TorchScript"
        encoded = {baseline: [run_load(forward, len(tensors), c, args.seconds) for c in CONCURRENCY]}
        whole = {baseline: [run_load(lambda i: in_process(*requests[i]), len(requests), c, args.seconds)
                            for c in WHOLE_CONCURRENCY]}
        executions = {}
        for batching in (True, False):
            path = f"Triton, dynamic batching {'on' if batching else 'off'}"
            encoded[path], whole[path], executions[path] = measure_triton(
                models, root / f"repo-{'on' if batching else 'off'}", batching, requests, tensors, args.seconds)
    on, off = (encoded[f"Triton, dynamic batching {s}"][-1]["requests_per_s"] for s in ("on", "off"))
    result = {"machine": machine, "seconds": args.seconds, "candidates": CANDIDATES, "encode_ms": encode_ms,
              "encoded": encoded, "whole": whole, "executions": executions, "ratio": on / off,
              "target_ratio": TARGET_RATIO, "passed": on / off >= TARGET_RATIO}
    return finish(result, format_table(result), args.json)


def timed(function, *args) -> float:
    start = time.perf_counter()
    function(*args)
    return time.perf_counter() - start


if __name__ == "__main__":
    raise SystemExit(main())
