"""Checks the GPU Triton repository: KIND_GPU configs, and its TorchScript files on CUDA equal to CPU.

    python benchmarks/triton_gpu_check.py   # the CUDA check only where torch sees a GPU

DeepFM, DLRM and the two-tower model are trained for one epoch on a small synthetic dataset (on
CPU, in a temporary folder), exported, and written as a repository with `--gpu`
(`RepositoryConfig(gpu=True)`). Every config.pbtxt must parse as Triton's ModelConfig with only
KIND_GPU instance groups. Each libtorch model's ``1/model.pt`` is then loaded onto CUDA, as Triton's
PyTorch backend would, and run on 300 encoded test rows; its output must equal the same file run
on CPU within 1e-5 (third call, after TorchScript's profiling runs). Without CUDA the configs are
still checked and the CUDA comparison is skipped with a message. JSON goes to
benchmarks/results/triton_gpu_check.json ($OUT when set).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch
from google.protobuf import text_format
from report import describe_machine, finish
from tritonclient.grpc import model_config_pb2 as pb

from data.dataset import read_dataset, read_part
from data.encoders import join_features
from data.prepare import prepare
from data.synthetic import SyntheticConfig, generate
from inference.export import export_models
from inference.pipeline.scorers import ModelInputs
from inference.triton.repository import RepositoryConfig, write_repository
from training.train import RunConfig, train_ranker, train_retrieval

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-5
ROWS = 300
RUNS = {
    "two_tower": {"train": {"lr": 0.01, "max_epochs": 1, "batch_size": 512, "accelerator": "cpu"},
                  "model": {"hidden_sizes": [32], "output_dim": 16}},
    "deepfm": {"train": {"lr": 0.03, "max_epochs": 1, "batch_size": 512, "accelerator": "cpu"},
               "model": {"embedding_dim": 8, "hidden_sizes": [16]}},
    "dlrm": {"train": {"lr": 0.03, "max_epochs": 1, "batch_size": 512, "accelerator": "cpu"},
             "model": {"embedding_dim": 8, "dense_sizes": [16], "over_sizes": [16]}},
}


def build_repository(root: Path) -> tuple[Path, Path, Path]:
    """(dataset, export directory, GPU repository) for the small models of RUNS."""
    dataset = prepare(generate(SyntheticConfig(users=300, items=200, interactions=5000, seed=0)),
                      root / "synthetic", split="temporal", seed=0)
    for name, raw in RUNS.items():
        config = RunConfig.model_validate(raw)
        if name == "two_tower":
            train_retrieval(dataset, root / "runs" / name, config)
        else:
            train_ranker(name, dataset, root / "runs" / name, config)
    models = root / "models"
    export_models({name: root / "runs" / name for name in RUNS}, models)
    repo = root / "repo"
    write_repository(models, repo, RepositoryConfig(gpu=True))
    return dataset, models, repo


def check_configs(repo: Path) -> dict[str, bool]:
    """Per model: its config parses and every instance group is KIND_GPU."""
    kinds = {}
    for path in sorted(repo.glob("*/config.pbtxt")):
        config = text_format.Parse(path.read_text(), pb.ModelConfig())
        kinds[path.parent.name] = all(g.kind == pb.ModelInstanceGroup.KIND_GPU for g in config.instance_group)
    return kinds


def compare_on_cuda(dataset: Path, models: Path, repo: Path) -> dict[str, float]:
    """Per libtorch model: largest |CUDA - CPU| of its repository TorchScript file on encoded test rows."""
    ds = read_dataset(dataset, tables=("users", "items"))
    rows = join_features(read_part(dataset, "test").head(ROWS), ds.users, ds.items).reset_index(drop=True)
    rows = rows.assign(recent_items=[[1, 2, 3]] * len(rows))  # a session for a query tower that reads one
    diffs = {}
    for name in RUNS:
        tensors = ModelInputs.load(models, name)(rows)
        path = str(repo / name / "1" / "model.pt")
        with torch.inference_mode():
            cpu = torch.jit.load(path, map_location="cpu")(*tensors)
            cuda_model = torch.jit.load(path, map_location="cuda")
            on_cuda = [t.cuda() for t in tensors]
            for _ in range(3):
                got = cuda_model(*on_cuda)
        diffs[name] = (got.cpu() - cpu).abs().max().item()
    return diffs


def format_table(result: dict) -> str:
    m = result["machine"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores; GPU: {result['gpu'] or 'none'}; torch {result['torch']}", "",
             "| check | value | result |", "|---|---:|---|"]
    for name, ok in result["configs"].items():
        lines.append(f"| {name}/config.pbtxt parses, KIND_GPU only | | {'pass' if ok else 'FAIL'} |")
    if result["cuda_max_abs_diff"] is None:
        lines += ["", "CUDA: skipped, torch sees no CUDA device; run this on a GPU machine (benchmarks/gpu_check.sh)."]
    for name, diff in (result["cuda_max_abs_diff"] or {}).items():
        lines.append(f"| {name}/1/model.pt on CUDA vs CPU, max abs diff | {diff:.1e} "
                     f"| {'pass' if diff <= TOLERANCE else 'FAIL'} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    results = Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "benchmarks" / "results"
    parser.add_argument("--json", type=Path, default=results / "triton_gpu_check.json")
    args = parser.parse_args()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    with tempfile.TemporaryDirectory(prefix="recstack-triton-gpu-") as tmp:
        dataset, models, repo = build_repository(Path(tmp))
        configs = check_configs(repo)
        diffs = compare_on_cuda(dataset, models, repo) if gpu else None
    passed = all(configs.values()) and all(d <= TOLERANCE for d in (diffs or {}).values())
    result = {"machine": describe_machine(), "gpu": gpu, "torch": torch.__version__, "configs": configs,
              "cuda_max_abs_diff": diffs, "tolerance": TOLERANCE, "passed": passed}
    return finish(result, format_table(result), args.json)


if __name__ == "__main__":
    raise SystemExit(main())
