"""`recstack train --strategy model_parallel` on 2 CPU ranks (gloo) against one process on the tiny
dataset: the same weights and metrics, a SIGKILLed run resumed, the serving export, and bad runs.

Every training run is a `recstack` process of its own, as the sharded ones must be.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.distributed as dist
import yaml

from data.dataset import read_dataset, read_part
from data.encoders import FeatureEncoder, join_features
from evaluation import metrics
from inference.export import PaddedInput, export_models, load_run
from inference.pipeline.scorers import pad_batch
from models.layers import SparseArch, embedding_configs
from training.model_parallel import shard_tables
from training.optimizers import EmbeddingOptimizer, fused_optimizer

ROOT = Path(__file__).resolve().parents[2]
EPOCHS, BATCH = 2, 512
DLRM = {"train": {"lr": 0.03}, "model": {"embedding_dim": 8, "dense_sizes": [16], "over_sizes": [16]},
        "embedding_optimizer": {"kind": "rowwise_adagrad", "lr": 0.05}}
# One process with two DataLoader workers streams the batches that two ranks stream together.
ONE_PROCESS = {**DLRM, "train": {**DLRM["train"], "num_workers": 2}}
# (YAML run config, train command, --sharding): the two sharding types torchrec offers on the CPU
RUNS = {
    "table_wise": (DLRM, ["ranker", "--model", "dlrm"], "table_wise"),
    "column_wise": (DLRM, ["ranker", "--model", "dlrm"], "column_wise"),
}
RANKER_METRICS = [f"{p}_{m}" for p in ("val", "test") for m in ("auc", "logloss", "calibration")]
# Each rank's loss is the mean over half the batch: the sums that make a step's gradients differ
# from one process's in float32 rounding only (seen after 64 steps: weights within 5.4e-7,
# metrics within 9e-7, while the tables moved by 0.24 to 0.85).
TOLERANCE = 1e-5

needs_gloo = pytest.mark.skipif(not dist.is_gloo_available(), reason="torch.distributed has no gloo backend")


def train_args(name: str, data: Path, out: Path, config: Path, *extra: str) -> list[str]:
    _, command, _ = RUNS[name]
    return ["train", *command, "--data", str(data), "--out", str(out), "--config", str(config),
            "--max-epochs", str(EPOCHS), "--batch-size", str(BATCH), "--accelerator", "cpu", *extra]


def sharded_command(name: str, data: Path, out: Path, config: Path) -> list[str]:
    args = train_args(name, data, out, config, "--devices", "2", "--strategy", "model_parallel",
                      "--sharding", RUNS[name][2])
    return [sys.executable, "-m", "recstack", *args]


def recstack(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)


def placement(log: str) -> dict[str, dict]:
    """The table placement the strategy logs: table -> {"sharding_type", "ranks"}."""
    line = next(line for line in log.splitlines() if "model_parallel tables: " in line)
    return json.loads(line.split("model_parallel tables: ", 1)[1])


def best_state(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def configs(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("mp_configs")
    for name, config in {**{name: config for name, (config, _, _) in RUNS.items()}, "one": ONE_PROCESS}.items():
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(config))
    return {name: folder / f"{name}.yaml" for name in [*RUNS, "one"]}


@pytest.fixture(scope="module")
def runs(tiny_dataset, configs, tmp_path_factory) -> dict[str, dict]:
    """Per sharding: its 2-rank model-parallel run (out, log) and the one-process run (out) of the same config."""
    root = tmp_path_factory.mktemp("mp_runs")
    single = root / "single"
    done = recstack([sys.executable, "-m", "recstack", *train_args("table_wise", tiny_dataset, single, configs["one"])])
    assert done.returncode == 0, done.stderr[-3000:]
    result = {}
    for name in RUNS:
        sharded = root / name
        done = recstack(sharded_command(name, tiny_dataset, sharded, configs[name]))
        assert done.returncode == 0, done.stderr[-3000:]
        result[name] = {"sharded": sharded, "log": done.stdout + done.stderr, "single": single}
    return result


@needs_gloo
@pytest.mark.parametrize("name", list(RUNS))
def test_two_ranks_match_one_process(name, runs):
    run = runs[name]
    tables = placement(run["log"])
    assert {t["sharding_type"] for t in tables.values()} == {RUNS[name][2]}
    assert {rank for t in tables.values() for rank in t["ranks"]} == {0, 1}  # both ranks hold tables

    sharded, single = (json.loads((run[k] / "metrics.json").read_text()) for k in ("sharded", "single"))
    assert (sharded["best_epoch"], sharded["epochs"]) == (single["best_epoch"], single["epochs"])
    for metric in RANKER_METRICS:
        assert sharded[metric] == pytest.approx(single[metric], abs=TOLERANCE), metric
    weights = best_state(run["sharded"])
    reference = best_state(run["single"])
    assert weights.keys() == reference.keys()
    for key, tensor in reference.items():
        torch.testing.assert_close(weights[key], tensor, rtol=0, atol=TOLERANCE, msg=key)


@needs_gloo
def test_sigkilled_run_resumes_to_the_uninterrupted_result(tiny_dataset, configs, runs, tmp_path):
    """Every rank dies at once, as when a job's node fails; the same command then resumes."""
    out = tmp_path / "run"
    command = sharded_command("table_wise", tiny_dataset, out, configs["table_wise"])
    last = out / "checkpoints" / "last.ckpt"
    with open(tmp_path / "killed.log", "w") as log:
        killed = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 300
        while not last.is_file():
            assert killed.poll() is None, f"exit {killed.returncode} before a checkpoint"
            assert time.monotonic() < deadline, "no checkpoint after 300 s"
            time.sleep(0.02)
        os.killpg(killed.pid, signal.SIGKILL)  # rank 0 and the rank it launched
    assert killed.wait() == -signal.SIGKILL
    killed_epoch = torch.load(last, weights_only=True)["epoch"]
    assert killed_epoch < EPOCHS - 1 and not (out / "metrics.json").exists()
    uninterrupted = runs["table_wise"]["sharded"]
    assert json.loads((uninterrupted / "metrics.json").read_text())["best_epoch"] > killed_epoch

    resumed = recstack(command)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    logs = sorted(out.glob("logs/version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1]))
    assert pd.read_csv(logs[-1])["epoch"].min() == killed_epoch + 1
    assert json.loads((out / "metrics.json").read_text()) == pytest.approx(
        json.loads((uninterrupted / "metrics.json").read_text()), abs=1e-6)
    weights, reference = best_state(out), best_state(uninterrupted)
    for key, tensor in reference.items():
        torch.testing.assert_close(weights[key], tensor, rtol=0, atol=1e-6, msg=key)


@needs_gloo
@pytest.mark.parametrize("name", list(RUNS))
def test_export_is_the_single_process_export_of_the_sharded_weights(name, runs, tiny_dataset, tmp_path):
    sharded = runs[name]["sharded"]
    export_models({name: sharded}, tmp_path)
    exported = torch.jit.load(str(tmp_path / f"{name}.pt"))

    # one process, from the same weights: the module the run's config builds, loaded unsharded
    trained = load_run(sharded)
    keys = [f.name for f in trained.encoder.schema.features if f.name in trained.features["features"] and f.sparse]
    single = torch.jit.script(PaddedInput(trained.module.model, keys, probabilities=True))

    encoder = FeatureEncoder.load(tiny_dataset / "encoders.json")
    ds = read_dataset(tiny_dataset, tables=("users", "items"))
    rows = join_features(read_part(tiny_dataset, "test"), ds.users, ds.items)
    names = [f.name for f in encoder.schema.features if f.name in trained.features["features"]]
    batch = encoder.encode(rows, names)
    padded = pad_batch(batch)
    with torch.no_grad():
        probs = exported(*padded)
        assert torch.equal(probs, single(*padded))
    # and it scores the test rows as the sharded model did on its two ranks
    written = json.loads((sharded / "metrics.json").read_text())
    assert metrics.auc(batch.labels, probs) == pytest.approx(written["test_auc"], abs=1e-6)
    assert metrics.log_loss(batch.labels, probs) == pytest.approx(written["test_logloss"], abs=1e-6)


@pytest.mark.parametrize(("config", "extra", "named"), [
    ("model:\n  embedding_dim: 8\n", ["--strategy", "model_parallel"], "embedding_optimizer.kind = 'adam'"),
    ("train:\n  sharding: diagonal\n", [], "diagonal"),
])
def test_bad_model_parallel_run_exits_2_naming_what_is_wrong(config, extra, named, tiny_dataset, tmp_path):
    (tmp_path / "run.yaml").write_text(config)
    args = train_args("table_wise", tiny_dataset, tmp_path / "out", tmp_path / "run.yaml", *extra)
    done = recstack([sys.executable, "-m", "recstack", *args])
    assert done.returncode == 2
    assert "recstack: error:" in done.stderr and named in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'group'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@needs_gloo
def test_shard_tables_refuses_what_it_cannot_shard(tiny_dataset, one_rank_group):
    features = FeatureEncoder.load(tiny_dataset / "encoders.json").schema.features
    rowwise = fused_optimizer(EmbeddingOptimizer(kind="rowwise_adagrad"), 0.01, 0.0)
    with pytest.raises(ValueError, match=r"sharding = 'row_wise': torchrec does not offer it on cpu"):
        shard_tables(SparseArch(embedding_configs(features, 8)), rowwise, "row_wise", torch.device("cpu"))
    with pytest.raises(ValueError, match=r"sharding = 'diagonal'; expected one of"):
        shard_tables(SparseArch(embedding_configs(features, 8)), rowwise, "diagonal", torch.device("cpu"))
    with pytest.raises(ValueError, match=r"table 'user_id' has dim 6; fbgemm's fused kernels expect a multiple of 4"):
        shard_tables(SparseArch(embedding_configs(features, 6)), rowwise, "table_wise", torch.device("cpu"))
    adam = fused_optimizer(EmbeddingOptimizer(kind="sparse_adam", weight_decay=0), 0.01, 0.0)
    with pytest.raises(ValueError, match=r"table optimizer Adam \(ADAM\): fbgemm's CPU kernels have"):
        shard_tables(SparseArch(embedding_configs(features, 8)), adam, "table_wise", torch.device("cpu"))
    tied = torch.nn.ModuleList([SparseArch(embedding_configs(features, 8)) for _ in range(2)])
    tied[1].ebc.embedding_bags["item_id"].weight = tied[0].ebc.embedding_bags["item_id"].weight
    with pytest.raises(ValueError, match=r"table 'item_id' is shared by two embedding collections"):
        shard_tables(tied, rowwise, "table_wise", torch.device("cpu"))
