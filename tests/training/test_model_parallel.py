"""`recstack train --strategy model_parallel` on 2 CPU ranks (gloo) against one process on the tiny
dataset, for DLRM, DeepFM, the linear model and the two-tower model: the same weights and metrics,
a SIGKILLed run resumed, the serving export, checkpoints written shard by shard, and bad runs.

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
import torch.distributed.checkpoint as dcp
import yaml
from torch.distributed.checkpoint import FileSystemReader

from data.dataset import read_dataset, read_part
from data.encoders import FeatureEncoder, join_features
from evaluation import metrics
from inference.export import PaddedInput, export_models, load_run
from inference.pipeline.scorers import pad_batch
from models.layers import SparseArch, embedding_configs
from training.model_parallel import (
    ModelParallelStrategy,
    average_sparse_gradients,
    checkpoint_file,
    read_weights,
    shard_tables,
    split_collections,
)
from training.optimizers import EmbeddingOptimizer, fused_optimizer

ROOT = Path(__file__).resolve().parents[2]
EPOCHS, BATCH = 2, 512
ROWWISE = {"kind": "rowwise_adagrad", "lr": 0.05}
# (YAML run config, train command) per model. DLRM's tables are all sharded, the linear model's
# (dim 1) all replicated, DeepFM has both: sharded second-order tables and replicated first-order
# ones. The two-tower model's drawn negatives are the one random thing in training, which every rank
# must draw as one process does.
MODELS = {
    "dlrm": ({"train": {"lr": 0.03}, "model": {"embedding_dim": 8, "dense_sizes": [16], "over_sizes": [16]},
              "embedding_optimizer": ROWWISE}, ["ranker", "--model", "dlrm"]),
    "deepfm": ({"train": {"lr": 0.03}, "model": {"embedding_dim": 8, "hidden_sizes": [16]},
                "embedding_optimizer": ROWWISE}, ["ranker", "--model", "deepfm"]),
    "linear": ({"train": {"lr": 0.03}, "embedding_optimizer": ROWWISE}, ["ranker", "--model", "linear"]),
    "retrieval": ({"train": {"lr": 0.01}, "loss": {"negatives": 16},
                   "model": {"embedding_dim": 8, "hidden_sizes": [32], "output_dim": 16},
                   "embedding_optimizer": ROWWISE}, ["retrieval"]),
}
# sharded run -> (model, --sharding); column_wise splits only wide tables (the planner's columns are
# 128 wide at least): test_each_rank_writes_only_its_own_columns_of_a_split_table
RUNS = {
    "dlrm": ("dlrm", "table_wise"),
    "deepfm": ("deepfm", "table_wise"),
    "linear": ("linear", "table_wise"),
    "retrieval": ("retrieval", "table_wise"),
}
METRICS = {
    "ranker": [f"{p}_{m}" for p in ("val", "test") for m in ("auc", "logloss", "calibration")],
    "retrieval": [f"{p}_{m}@10" for p in ("val", "test") for m in ("recall", "precision", "hit", "mrr", "ndcg", "map")],
}
# "Matches one process": two ranks, each streaming half of every global batch of B rows, against
# one process whose two DataLoader workers stream those same halves into batches of B. Each rank's
# loss is the mean over its half (for retrieval, its queries over every rank's items, gathered);
# the sums that make a step's gradients differ from one process's in float32 rounding only (seen
# after 64 steps: weights within 6e-7, metrics within 9e-7, while the tables moved by 0.24 to 0.85).
TOLERANCE = 1e-5

needs_gloo = pytest.mark.skipif(not dist.is_gloo_available(), reason="torch.distributed has no gloo backend")


def train_args(model: str, data: Path, out: Path, config: Path, *extra: str, epochs: int = EPOCHS) -> list[str]:
    return ["train", *MODELS[model][1], "--data", str(data), "--out", str(out), "--config", str(config),
            "--max-epochs", str(epochs), "--batch-size", str(BATCH), "--accelerator", "cpu", *extra]


def sharded_command(name: str, data: Path, out: Path, config: Path) -> list[str]:
    model, sharding = RUNS[name]
    args = train_args(model, data, out, config, "--devices", "2", "--strategy", "model_parallel",
                      "--sharding", sharding)
    return [sys.executable, "-m", "recstack", *args]


def recstack(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)


def failure(done: subprocess.CompletedProcess) -> str:
    """Why a run failed: every rank's error lines (a rank that dies first is seen by the others as a
    closed connection, and its own traceback sits far above theirs), then the end of the output."""
    errors = [line for line in done.stderr.splitlines() if line.startswith("[rank") and "Error" in line]
    return "\n".join([*errors, done.stderr[-2000:]])


def placement(log: str) -> dict[str, dict]:
    """The table placement the strategy logs: table -> {"sharding_type", "ranks"}."""
    line = next(line for line in log.splitlines() if "model_parallel tables: " in line)
    return json.loads(line.split("model_parallel tables: ", 1)[1])


def best_state(run: Path) -> dict[str, torch.Tensor]:
    return read_weights(run / "checkpoints" / "best.ckpt")


@pytest.fixture(scope="module")
def configs(tmp_path_factory) -> dict[str, Path]:
    """Per model, its run config ("dlrm") and the one-process config with two workers ("dlrm_one")."""
    folder = tmp_path_factory.mktemp("mp_configs")
    paths = {}
    for model, (config, _) in MODELS.items():
        one = {**config, "train": {**config["train"], "num_workers": 2}}
        for name, value in ((model, config), (f"{model}_one", one)):
            paths[name] = folder / f"{name}.yaml"
            paths[name].write_text(yaml.safe_dump(value))
    return paths


@pytest.fixture(scope="module")
def runs(tiny_dataset, configs, tmp_path_factory) -> dict[str, dict]:
    """Per sharded run: its 2-rank model-parallel run (out, log) and the one-process run (out) of its model."""
    root = tmp_path_factory.mktemp("mp_runs")
    single = {}
    for model in MODELS:
        single[model] = root / f"{model}_single"
        done = recstack([sys.executable, "-m", "recstack",
                         *train_args(model, tiny_dataset, single[model], configs[f"{model}_one"])])
        assert done.returncode == 0, failure(done)
    result = {}
    for name, (model, _) in RUNS.items():
        sharded = root / name
        done = recstack(sharded_command(name, tiny_dataset, sharded, configs[model]))
        assert done.returncode == 0, failure(done)
        result[name] = {"sharded": sharded, "log": done.stdout + done.stderr, "single": single[model]}
    return result


@needs_gloo
@pytest.mark.parametrize("name", list(RUNS))
def test_two_ranks_match_one_process(name, runs):
    run = runs[name]
    weights = best_state(run["sharded"])
    tables = placement(run["log"])
    for table, where in tables.items():  # a table fbgemm's fused kernels cannot step stays whole on each rank
        path, _, bag = table.rpartition(".")
        dim = weights[f"{path}.embedding_bags.{bag}.weight"].shape[1]
        assert where["sharding_type"] == ("replicated" if dim % 4 else RUNS[name][1]), table
    assert {rank for t in tables.values() for rank in t["ranks"]} == {0, 1}  # both ranks hold tables

    sharded, single = (json.loads((run[k] / "metrics.json").read_text()) for k in ("sharded", "single"))
    assert (sharded["best_epoch"], sharded["epochs"]) == (single["best_epoch"], single["epochs"])
    task = json.loads((run["sharded"] / "run.json").read_text())["task"]
    for metric in METRICS[task]:
        assert sharded[metric] == pytest.approx(single[metric], abs=TOLERANCE), metric
    reference = best_state(run["single"])
    assert weights.keys() == reference.keys()
    for key, tensor in reference.items():
        torch.testing.assert_close(weights[key], tensor, rtol=0, atol=TOLERANCE, msg=key)


@needs_gloo
@pytest.mark.parametrize("name", ["deepfm", "retrieval"])  # DeepFM has sharded and replicated tables
def test_sigkilled_run_resumes_to_the_uninterrupted_result(name, tiny_dataset, configs, runs, tmp_path):
    """Every rank dies at once, as when a job's node fails; the same command then resumes."""
    out = tmp_path / "run"
    command = sharded_command(name, tiny_dataset, out, configs[RUNS[name][0]])
    last = out / "checkpoints" / "last.ckpt"
    with open(tmp_path / "killed.log", "w") as log:
        killed = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 300
        while not last.exists():  # a link to a whole checkpoint, or nothing
            assert killed.poll() is None, f"exit {killed.returncode} before a checkpoint"
            assert time.monotonic() < deadline, "no checkpoint after 300 s"
            time.sleep(0.02)
        os.killpg(killed.pid, signal.SIGKILL)  # rank 0 and the rank it launched
    assert killed.wait() == -signal.SIGKILL
    killed_epoch = torch.load(checkpoint_file(last), weights_only=True)["epoch"]
    assert killed_epoch < EPOCHS - 1 and not (out / "metrics.json").exists()
    uninterrupted = runs[name]["sharded"]
    assert json.loads((uninterrupted / "metrics.json").read_text())["best_epoch"] > killed_epoch

    resumed = recstack(command)
    assert resumed.returncode == 0, failure(resumed)

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
    check_export(runs[name]["sharded"], tiny_dataset, tmp_path)


def check_export(sharded: Path, tiny_dataset: Path, out: Path) -> None:
    """The export of run ``sharded`` equals the one-process model loaded with its weights, and a ranker's
    scores the test rows as the sharded model did on its two ranks."""
    export_models({"model": sharded}, out)
    exported = torch.jit.load(str(out / "model.pt"))
    interface = json.loads((out / "model.json").read_text())

    # one process, from the same weights: the module the run's config builds, loaded unsharded
    trained = load_run(sharded)
    ranker = interface["task"] == "ranker"
    model = trained.module.model if ranker else trained.module.model.query_tower
    single = torch.jit.script(PaddedInput(model, interface["sparse"], probabilities=ranker))

    encoder = FeatureEncoder.load(tiny_dataset / "encoders.json")
    ds = read_dataset(tiny_dataset, tables=("users", "items"))
    rows = join_features(read_part(tiny_dataset, "test"), ds.users, ds.items)
    batch = encoder.encode(rows, interface["features"])
    padded = pad_batch(batch)
    with torch.no_grad():
        outputs = exported(*padded)
        assert torch.equal(outputs, single(*padded))
    if ranker:
        written = json.loads((sharded / "metrics.json").read_text())
        assert metrics.auc(batch.labels, outputs) == pytest.approx(written["test_auc"], abs=1e-6)
        assert metrics.log_loss(batch.labels, outputs) == pytest.approx(written["test_logloss"], abs=1e-6)


@needs_gloo
def test_each_rank_writes_only_its_own_columns_of_a_split_table(tiny_dataset, tmp_path):
    """At dim 256 the planner splits every table's columns over the two ranks (128 each, the narrowest
    column shard it makes); each rank's shard file holds its own columns of the weights and its own rows
    of their optimizer state, and the export puts the tables together whole. The tables have a few
    hundred rows and one epoch runs."""
    dlrm = MODELS["dlrm"][0]
    config = tmp_path / "wide.yaml"
    config.write_text(yaml.safe_dump({**dlrm, "model": {**dlrm["model"], "embedding_dim": 256}}))
    out = tmp_path / "run"
    args = train_args("dlrm", tiny_dataset, out, config, "--devices", "2", "--strategy", "model_parallel",
                      "--sharding", "column_wise", epochs=1)
    done = recstack([sys.executable, "-m", "recstack", *args])
    assert done.returncode == 0, failure(done)
    tables = placement(done.stdout + done.stderr)
    assert tables

    metadata = FileSystemReader(out / "checkpoints" / "best.ckpt").read_metadata()
    files = {}  # checkpoint key -> {file: offsets of the chunks it holds}
    for index, stored in metadata.storage_data.items():
        files.setdefault(index.fqn, {}).setdefault(stored.relative_path, []).append(list(index.offset))
    for table, where in tables.items():
        path, _, bag = table.rpartition(".")
        weight = f"{path}.embedding_bags.{bag}.weight"
        rows = metadata.state_dict_metadata[f"state_dict.{weight}"].size[0]
        assert where == {"sharding_type": "column_wise", "ranks": [0, 1],
                         "shards": [{"rank": 0, "offsets": [0, 0], "sizes": [rows, 128]},
                                    {"rank": 1, "offsets": [0, 128], "sizes": [rows, 128]}]}, table
        assert files[f"state_dict.{weight}"] == {"__0_0.distcp": [[0, 0]], "__1_0.distcp": [[0, 128]]}, table
        # row-wise Adagrad: one float per row of each column shard
        assert files[f"tables.state.{weight}.{bag}.momentum1"] == {"__0_0.distcp": [[0]],
                                                                  "__1_0.distcp": [[rows]]}, table
    check_export(out, tiny_dataset, tmp_path / "export")


def test_a_crash_while_saving_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    rowwise = fused_optimizer(EmbeddingOptimizer(kind="rowwise_adagrad"), 0.01, 0.0)
    strategy = ModelParallelStrategy("table_wise", rowwise)  # one process: rank 0 of one
    last = tmp_path / "last.ckpt"
    strategy.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "epoch": 0}, last)
    save = dcp.save

    def crash(state, checkpoint_id):  # the shards are written, then the process dies
        save(state, checkpoint_id=checkpoint_id)
        raise SystemExit(-9)

    monkeypatch.setattr(dcp, "save", crash)
    with pytest.raises(SystemExit):
        strategy.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "epoch": 1}, last)
    assert len(list(tmp_path.glob(".last.ckpt.*"))) == 2  # the previous checkpoint and the half-written one
    assert torch.load(checkpoint_file(last), weights_only=True)["epoch"] == 0
    assert torch.equal(read_weights(last)["w"], torch.zeros(3))

    monkeypatch.setattr(dcp, "save", save)
    strategy.save_checkpoint({"state_dict": {"w": torch.full((3,), 2.0)}, "epoch": 2}, last)
    assert torch.load(checkpoint_file(last), weights_only=True)["epoch"] == 2
    assert torch.equal(read_weights(last)["w"], torch.full((3,), 2.0))
    assert [p.name for p in tmp_path.glob(".last.ckpt.*")] == [last.readlink().name]  # the others deleted


@pytest.mark.parametrize(("config", "extra", "named"), [
    ("model:\n  embedding_dim: 8\n", ["--strategy", "model_parallel"], "embedding_optimizer.kind = 'adam'"),
    ("train:\n  sharding: diagonal\n", [], "diagonal"),
])
def test_bad_model_parallel_run_exits_2_naming_what_is_wrong(config, extra, named, tiny_dataset, tmp_path):
    (tmp_path / "run.yaml").write_text(config)
    args = train_args("dlrm", tiny_dataset, tmp_path / "out", tmp_path / "run.yaml", *extra)
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
    adam = fused_optimizer(EmbeddingOptimizer(kind="sparse_adam", weight_decay=0), 0.01, 0.0)
    with pytest.raises(ValueError, match=r"table optimizer Adam \(ADAM\): fbgemm's CPU kernels have"):
        shard_tables(SparseArch(embedding_configs(features, 8)), adam, "table_wise", torch.device("cpu"))
    with pytest.raises(ValueError, match=r"Linear has no EmbeddingBagCollection"):
        shard_tables(torch.nn.Linear(2, 1), rowwise, "table_wise", torch.device("cpu"))


@needs_gloo
def test_replicated_tables_gradients_are_gathered_after_the_backward(one_rank_group):
    """On one rank, the mean over the ranks is the rank's own gradient, its repeated rows summed; a
    table no batch read keeps no gradient. (Two ranks: test_two_ranks_match_one_process, DeepFM.)"""
    read, unread = (torch.nn.EmbeddingBag(5, 2, mode="sum", sparse=True) for _ in range(2))
    read(torch.tensor([3, 1, 3]), torch.tensor([0])).sum().backward()
    average_sparse_gradients([read.weight, unread.weight])
    assert read.weight.grad.is_sparse and unread.weight.grad is None
    torch.testing.assert_close(read.weight.grad.to_dense(), torch.tensor([[0, 0], [1, 1], [0, 0], [2, 2], [0, 0.]]))


def test_collections_that_fused_kernels_cannot_step_or_that_share_a_table_are_replicated(tiny_dataset):
    features = FeatureEncoder.load(tiny_dataset / "encoders.json").schema.features
    eight, six = (SparseArch(embedding_configs(features, dim)).ebc for dim in (8, 6))
    tied = [SparseArch(embedding_configs(features, 8)).ebc for _ in range(2)]
    tied[1].embedding_bags["item_id"].weight = tied[0].embedding_bags["item_id"].weight
    sharded, replicated = split_collections([eight, six, *tied])
    assert sharded == [eight] and replicated == [six, *tied]
