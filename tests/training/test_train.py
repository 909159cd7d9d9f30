"""`recstack train` on a tiny dataset: two CPU processes against one, a SIGKILLed run resumed, the
printed and written metrics, and config errors.

The reference runs go through `recstack.cli.main` in this process; the two-process run and the
killed run need processes of their own.
"""

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
import torch.distributed as dist
import yaml

from recstack.cli import main
from training.data import RankingDataModule

ROOT = Path(__file__).resolve().parents[2]
EPOCHS, BATCH = 2, 512
CONFIGS = {
    # lr 0.03: 2 epochs of 32 steps are then enough to learn well above chance (val AUC ~0.66)
    "ranker": {"train": {"lr": 0.03}, "model": {"embedding_dim": 8, "dense_sizes": [16], "over_sizes": [16]}},
    # drawn negatives: the one random thing in training, so resuming must reproduce the draws
    "retrieval": {"train": {"lr": 0.01}, "loss": {"negatives": 16}, "model": {"hidden_sizes": [32], "output_dim": 16}},
}
COMMANDS = {"ranker": ["ranker", "--model", "dlrm"], "retrieval": ["retrieval"]}
METRICS = {
    "ranker": [f"{p}_{m}" for p in ("val", "test") for m in ("auc", "logloss", "calibration")],
    "retrieval": [f"{p}_{m}@10" for p in ("val", "test") for m in ("recall", "precision", "hit", "mrr", "ndcg", "map")],
}
# Two ranks each average the loss over half of the same global batch and DDP averages their
# gradients, which is the full batch's gradient up to float32 rounding in the sum (~1e-7
# relative); 2 epochs of Adam do not grow that past 1e-5. One eval row counted twice, as the
# padding of an even split does, would move these metrics by ~3e-4.
DDP_TOLERANCE = 1e-5


@dataclass
class Run:
    task: str
    out: Path
    code: int
    stdout: str

    @property
    def metrics(self) -> dict:
        return json.loads((self.out / "metrics.json").read_text())


def train_args(task: str, data: Path, out: Path, config: Path, *extra: str) -> list[str]:
    return ["train", *COMMANDS[task], "--data", str(data), "--out", str(out), "--config", str(config),
            "--max-epochs", str(EPOCHS), "--batch-size", str(BATCH), "--accelerator", "cpu", *extra]


def main_here(args: list[str]) -> tuple[int, str]:
    """`recstack ARGS` in this process: (exit code, stdout). The process-wide state that training
    sets (seeds, deterministic algorithms, PL_* variables) is put back for later tests."""
    environ, deterministic, rng = dict(os.environ), torch.are_deterministic_algorithms_enabled(), torch.get_rng_state()
    stdout = io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout):
            code = main(args)
    finally:
        os.environ.clear()
        os.environ.update(environ)
        torch.use_deterministic_algorithms(deterministic)
        torch.set_rng_state(rng)
    return code, stdout.getvalue()


@pytest.fixture(scope="module")
def configs(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("configs")
    for task, config in CONFIGS.items():
        (folder / f"{task}.yaml").write_text(yaml.safe_dump(config))
    return {task: folder / f"{task}.yaml" for task in CONFIGS}


@pytest.fixture(scope="module")
def reference_runs(tiny_dataset, configs, tmp_path_factory) -> dict[str, Run]:
    """One uninterrupted one-process run per task, through the CLI."""
    runs = {}
    for task in CONFIGS:
        out = tmp_path_factory.mktemp(task) / "run"
        runs[task] = Run(task, out, *main_here(train_args(task, tiny_dataset, out, configs[task])))
    return runs


def test_two_ranks_split_each_batch_of_two_workers(tiny_dataset):
    """Two ranks and one process with two DataLoader workers both stream two units: the k-th
    batches of the two ranks together hold the rows of the k-th batch of the one process."""

    def batches(world: int, rank: int, epoch: int, workers: int = 0) -> list[list[int]]:
        data = RankingDataModule(tiny_dataset, ["user_id"], batch_size=BATCH, seed=0, num_workers=workers)
        data.trainer = SimpleNamespace(world_size=world, global_rank=rank, current_epoch=epoch)
        return [rows.tolist() for _, rows in data.train_dataloader()]

    for epoch in (0, 1):
        one = batches(1, 0, epoch, workers=2)
        two = [batches(2, rank, epoch) for rank in (0, 1)]
        assert len(one) == len(two[0]) == len(two[1]) == -(-16_008 // 2 // (BATCH // 2))
        for k, rows in enumerate(one):
            assert two[0][k] + two[1][k] == rows
        assert sorted(r for b in one for r in b) == list(range(16_008))  # every row once
    assert batches(1, 0, 0) != batches(1, 0, 1)  # a new order each epoch


@pytest.mark.skipif(not dist.is_gloo_available(), reason="torch.distributed has no gloo backend")
@pytest.mark.parametrize("task", ["ranker", "retrieval"])
def test_two_cpu_processes_match_one_with_two_workers(task, tiny_dataset, tmp_path):
    """Two ranks stream the batches that one process with two DataLoader workers streams (retrieval
    gathers the items of both halves, so that each query meets the in-batch negatives of the batch)."""
    (tmp_path / "workers.yaml").write_text(yaml.safe_dump({**CONFIGS[task], "train": {
        **CONFIGS[task]["train"], "num_workers": 2}}))
    (tmp_path / "ddp.yaml").write_text(yaml.safe_dump(CONFIGS[task]))
    one = Run(task, tmp_path / "one", *main_here(train_args(task, tiny_dataset, tmp_path / "one",
                                                           tmp_path / "workers.yaml")))
    out = tmp_path / "ddp"
    args = train_args(task, tiny_dataset, out, tmp_path / "ddp.yaml", "--devices", "2", "--strategy", "ddp")
    done = subprocess.run([sys.executable, "-m", "recstack", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    assert sum(line.startswith("{") for line in done.stdout.splitlines()) == 1  # rank 0 alone prints
    two = Run(task, out, done.returncode, done.stdout)
    assert (two.metrics["best_epoch"], two.metrics["epochs"]) == (one.metrics["best_epoch"], one.metrics["epochs"])
    for name in METRICS[task]:
        assert two.metrics[name] == pytest.approx(one.metrics[name], abs=DDP_TOLERANCE), name
    # it really ran on two ranks: rank 0 logs the loss of its own half of each batch
    losses = [pd.read_csv(r.out / "logs" / "version_0" / "metrics.csv")["train_loss"].dropna() for r in (one, two)]
    assert losses[0].iloc[0] != pytest.approx(losses[1].iloc[0], abs=1e-3)


@pytest.mark.parametrize("task", ["ranker", "retrieval"])
def test_sigkilled_run_resumes_to_the_uninterrupted_result(task, tiny_dataset, configs, reference_runs, tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "recstack", *train_args(task, tiny_dataset, out, configs[task])]
    last = out / "checkpoints" / "last.ckpt"
    with open(tmp_path / "killed.log", "w") as log:
        killed = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + 300
        while not last.is_file():
            assert killed.poll() is None, f"exit {killed.returncode} before a checkpoint"
            assert time.monotonic() < deadline, "no checkpoint after 300 s"
            time.sleep(0.02)
        os.kill(killed.pid, signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL  # killed, not finished
    killed_epoch = torch.load(last, weights_only=False)["epoch"]
    assert killed_epoch < EPOCHS - 1 and not (out / "metrics.json").exists()
    # the metrics compared are the best epoch's, which must be one trained after the kill
    assert reference_runs[task].metrics["best_epoch"] > killed_epoch

    resumed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    # it went on from the checkpoint rather than starting again: its log starts at the next epoch
    logs = sorted(out.glob("logs/version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1]))
    assert pd.read_csv(logs[-1])["epoch"].min() == killed_epoch + 1
    assert Run(task, out, 0, "").metrics == pytest.approx(reference_runs[task].metrics, abs=1e-6)


@pytest.mark.parametrize("task", ["ranker", "retrieval"])
def test_train_prints_the_metrics_it_writes(task, reference_runs):
    run = reference_runs[task]
    assert run.code == 0
    printed = json.loads(run.stdout.strip().splitlines()[-1])
    assert printed == run.metrics
    assert set(printed) == {*METRICS[task], "best_epoch", "epochs"}
    assert printed["epochs"] == EPOCHS and 0 <= printed["best_epoch"] < EPOCHS
    assert {p.name for p in (run.out / "checkpoints").iterdir()} == {"best.ckpt", "last.ckpt"}
    assert json.loads((run.out / "run.json").read_text())["config"]["train"]["max_epochs"] == EPOCHS


def test_ranker_learns(reference_runs):
    """Well above chance on held-out rows (the true click probabilities give ~0.78)."""
    assert reference_runs["ranker"].metrics["val_auc"] > 0.6


@pytest.mark.parametrize(("task", "config", "extra", "named"), [
    ("ranker", "train:\n  lr_rate: 0.1\n", [], "lr_rate"),
    ("ranker", "featurs: [user_id]\n", [], "featurs"),
    ("ranker", "model:\n  embedding_dim: 8\n  hidden: [8]\n", [], "hidden"),
    ("retrieval", "model:\n  dims: 8\n", [], "dims"),
    ("ranker", "features: [user_id, colour]\n", [], "colour"),
    ("retrieval", "query_features: [user_id, colour]\n", [], "colour"),
    ("ranker", "train: [1, 2\n", [], "not valid YAML"),
    ("ranker", "train:\n  seed: -1\n", [], "seed"),
    ("ranker", "", ["--devices", "2"], "batch_size = 511"),
    ("ranker", "", ["--max-epochs", "0"], "max_epochs"),
])
def test_bad_config_exits_2_naming_what_is_wrong(task, config, extra, named, tiny_dataset, tmp_path, capsys):
    (tmp_path / "run.yaml").write_text(config)
    args = train_args(task, tiny_dataset, tmp_path / "out", tmp_path / "run.yaml")
    args[args.index("--batch-size") + 1] = "511"
    code, _ = main_here(args + extra)
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("recstack: error:") and named in err
    assert not (tmp_path / "out").exists()
