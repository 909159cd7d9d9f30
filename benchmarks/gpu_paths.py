"""Runs the CUDA paths besides training, TorchScript export and exact retrieval, on CPU and CUDA.

    python benchmarks/gpu_paths.py                 # the CUDA column only where torch sees a GPU
    python benchmarks/gpu_paths.py --items 100000  # a quicker retrieval check

Export: DLRM, DeepFM and the two-tower query tower (what serving loads) are scripted with
`torch.jit.script` on CPU and saved, then loaded onto each device (``map_location``) and run beside
the eager model on that device. The comparison uses the third call, by which TorchScript's
profiling executor has specialised (on CUDA, possibly fused) the graph. It passes within 1e-5.

Retrieval: exact top-k by inner product (``torch.topk`` over item vectors times queries) over
``--items`` random unit vectors of 64 dims, one query at a time and in batches of queries. Each
device's ids are checked against float64 scores on CPU: recall@k must be 1.0, where an id within
1e-5 of the k-th best float64 score counts as found, since float32 sums on different devices may
order near-ties differently.

`benchmarks/gpu_check.sh` runs this with the training benchmark on a GPU machine.
"""

from __future__ import annotations

import argparse
import copy
import io
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from report import finish
from torch import nn
from torchrec import KeyedJaggedTensor
from train_throughput import describe_machine, format_machine

from data.schema import FeatureSpec
from models.deepfm import DeepFM, DeepFMConfig
from models.dlrm import DLRM, DLRMConfig
from models.two_tower import TwoTower, TwoTowerConfig

ROOT = Path(__file__).resolve().parents[1]
EXPORT_TOLERANCE = 1e-5
TIE_TOLERANCE = 1e-5
DIM = 64
K = 100
QUERY_BATCH = 256
SINGLE_QUERIES = 20  # timed one at a time, after one warm-up query
RECALL_QUERIES = 64  # checked against float64, which is slow on CPU

QUERY_FEATURES = (
    FeatureSpec("user_id", "users", "categorical", vocab_size=1000, embedding_dim=16),
    FeatureSpec("device", "interactions", "categorical", vocab_size=4, embedding_dim=16),
    FeatureSpec("recent_items", "interactions", "sequence", max_len=5, source="item_id"),
    FeatureSpec("hour", "interactions", "numerical"),
)
ITEM_FEATURES = (
    FeatureSpec("item_id", "items", "categorical", vocab_size=5000, embedding_dim=16),
    FeatureSpec("category", "items", "categorical", vocab_size=20, embedding_dim=16),
)


def make_export_inputs(batch: int, generator: torch.Generator) -> tuple[torch.Tensor, KeyedJaggedTensor]:
    """Dense (B, 1) and a KJT over every sparse feature on CPU; a sequence holds 0 to max_len ids."""
    features = {f.name: f for f in (*QUERY_FEATURES, *ITEM_FEATURES) if f.sparse}
    values, lengths = [], []
    for f in features.values():
        rows = features[f.source or f.name].num_embeddings  # a sequence reads its source's table
        if f.max_len:
            counts = torch.randint(0, f.max_len + 1, (batch,), generator=generator, dtype=torch.int32)
        else:
            counts = torch.ones(batch, dtype=torch.int32)
        lengths.append(counts)
        values.append(torch.randint(0, rows, (int(counts.sum()),), generator=generator))
    sparse = KeyedJaggedTensor(keys=list(features), values=torch.cat(values), lengths=torch.cat(lengths), stride=batch)
    return torch.randn(batch, 1, generator=generator), sparse


def export_models() -> dict[str, nn.Module]:
    features = QUERY_FEATURES + ITEM_FEATURES
    tower = TwoTowerConfig(QUERY_FEATURES, ITEM_FEATURES, query_dense_dim=1)
    return {
        "DLRM": DLRM(DLRMConfig(features, dense_dim=1)),
        "DeepFM": DeepFM(DeepFMConfig(features, dense_dim=1)),
        "two-tower query tower": TwoTower(tower).query_tower,
    }


def script_to_bytes(model: nn.Module) -> bytes:
    """The module scripted and saved on CPU, as an export would write it."""
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(model.eval()), buffer)
    return buffer.getvalue()


def check_export(model: nn.Module, saved: bytes, device: torch.device, dense: torch.Tensor,
                 sparse: KeyedJaggedTensor) -> float:
    """Largest |scripted - eager| on ``device``: ``saved`` loaded there against a copy of ``model``."""
    scripted = torch.jit.load(io.BytesIO(saved), map_location=device)
    eager = copy.deepcopy(model).to(device)
    dense, sparse = dense.to(device), sparse.to(device)
    with torch.no_grad():
        for _ in range(3):
            got = scripted(dense, sparse)
        return (got - eager(dense, sparse)).abs().max().item()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def top_k(items: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Ids (Q, K) of the K items with the largest inner product with each query: (N, D), (Q, D)."""
    return torch.topk(queries @ items.T, K, dim=1).indices  # scores (Q, N)


def time_retrieval(items: torch.Tensor, queries: torch.Tensor) -> dict:
    """Milliseconds per query, one at a time (median) and in batches; the batched ids, on CPU."""
    device = items.device
    single = []
    for q in queries[: SINGLE_QUERIES + 1]:
        start = time.perf_counter()
        top_k(items, q.unsqueeze(0))
        synchronize(device)
        single.append(time.perf_counter() - start)
    top_k(items, queries[:QUERY_BATCH])  # warm-up at the batch shape
    synchronize(device)
    start = time.perf_counter()
    ids = torch.cat([top_k(items, chunk) for chunk in queries.split(QUERY_BATCH)])
    synchronize(device)
    batched = time.perf_counter() - start
    return {"single_ms": statistics.median(single[1:]) * 1e3, "batched_ms": batched * 1e3 / len(queries),
            "ids": ids.cpu()}


def recall_with_ties(ids: torch.Tensor, reference: torch.Tensor) -> float:
    """Share of the returned ids (Q, K) whose reference score (Q, N) is within TIE_TOLERANCE of the
    k-th best reference score of its query."""
    kth = torch.topk(reference, K, dim=1).values[:, -1:]  # (Q, 1)
    return (reference.gather(1, ids) >= kth - TIE_TOLERANCE).double().mean().item()


def run_checks(devices: list[torch.device], num_items: int, num_queries: int, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    models = export_models()
    saved = {name: script_to_bytes(model) for name, model in models.items()}
    dense, sparse = make_export_inputs(64, generator)
    items = F.normalize(torch.randn(num_items, DIM, generator=generator), dim=1)
    queries = F.normalize(torch.randn(num_queries, DIM, generator=generator), dim=1)
    reference = queries[:RECALL_QUERIES].double() @ items.double().T  # (RECALL_QUERIES, N)
    result = {}
    for device in devices:
        export = {name: check_export(model, saved[name], device, dense, sparse) for name, model in models.items()}
        retrieval = time_retrieval(items.to(device), queries.to(device))
        ids = retrieval.pop("ids")[:RECALL_QUERIES]
        result[device.type] = {"export_max_abs_diff": export, **retrieval, "recall": recall_with_ties(ids, reference)}
    return result


def judge(checks: dict) -> dict[str, bool]:
    """Pass or fail per export model and for recall, over every device that ran."""
    verdicts = {name: all(c["export_max_abs_diff"][name] <= EXPORT_TOLERANCE for c in checks.values())
                for name in checks["cpu"]["export_max_abs_diff"]}
    return {**verdicts, "recall": all(c["recall"] == 1.0 for c in checks.values())}


def format_table(result: dict) -> str:
    checks, verdicts = result["checks"], result["verdicts"]
    columns = ("cpu", "cuda")

    def cells(key: str, spec: str, name: str | None = None) -> str:
        """One cell per device: checks[device][key] (or [key][name]) formatted with ``spec``."""
        values = [(checks[c][key] if name is None else checks[c][key][name]) if c in checks else None
                  for c in columns]
        return " | ".join("skipped" if v is None else format(v, spec) for v in values)

    def verdict(key: str) -> str:
        return "pass" if verdicts[key] else "FAIL"

    lines = [
        format_machine(result["machine"]),
        f"Exact top-{K} over {result['items']:,} x {DIM} float32 unit vectors; {result['queries']:,} queries in "
        f"batches of {QUERY_BATCH}; recall against float64 scores on CPU over {RECALL_QUERIES} queries.",
        "",
        "| check | CPU | CUDA | result |",
        "|---|---:|---:|---|",
    ]
    for name in checks["cpu"]["export_max_abs_diff"]:
        lines.append(f"| {name}: TorchScript (scripted on CPU) vs eager, max abs diff "
                     f"| {cells('export_max_abs_diff', '.1e', name)} | {verdict(name)} |")
    lines += [
        f"| top-{K}, one query at a time (ms per query) | {cells('single_ms', '.3f')} | |",
        f"| top-{K}, batches of {QUERY_BATCH} (ms per query) | {cells('batched_ms', '.4f')} | |",
        f"| recall@{K} against float64 | {cells('recall', '.4f')} "
        f"| {verdict('recall')} |",
    ]
    if "cuda" not in checks:
        lines += ["", "CUDA: skipped, torch sees no CUDA device; benchmarks/gpu_check.sh runs this on a GPU machine."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_paths.json")
    args = parser.parse_args(argv)
    if args.items < K or args.queries < RECALL_QUERIES:
        raise ValueError(f"--items {args.items}, --queries {args.queries}; expected at least {K} and {RECALL_QUERIES}")

    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    checks = run_checks(devices, args.items, args.queries, args.seed)
    verdicts = judge(checks)
    result = {"machine": describe_machine(devices[-1]), "items": args.items, "queries": args.queries,
              "checks": checks, "verdicts": verdicts, "passed": all(verdicts.values())}
    return finish(result, format_table(result), args.json)


if __name__ == "__main__":
    raise SystemExit(main())
