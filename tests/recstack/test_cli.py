"""The command line as a user runs it: a subprocess, its exit code, its output and its files.
The refresh and artefact commands run in this process (`main`), which keeps their tests quick."""

import argparse
import json
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

import models
from inference.impressions import Feedback, Impression, ImpressionLog, logged_slots
from inference.pipeline.config import load_pipeline_config
from inference.pipeline.types import Query
from inference.service import Recommender
from recstack import recommend_cli
from recstack.cli import build_parser, main
from training.ranking import RANKERS

PIPELINE = Path(__file__).parents[2] / "configs" / "pipeline.yaml"
PREFIX = "recstack: error: "


def recstack(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "recstack", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd)


def test_version():
    out = recstack("--version")
    assert out.returncode == 0 and out.stdout.startswith("recstack ")


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The subcommands of ``parser`` by name; {} when it has none."""
    return next((a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)), {})


def command_groups(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(the words that name a group, its subcommands) for every group of commands under ``parser``."""
    if commands := subcommands(parser):
        yield path, tuple(commands)
        for name, sub in commands.items():
            yield from command_groups(sub, (*path, name))


def one_error_line(err: str) -> str:
    """The one line of ``err`` that reports an error, checked to be the only one."""
    lines = [line for line in err.splitlines() if line.startswith(PREFIX)]
    assert len(lines) == 1 and "error:" not in err.replace(lines[0], ""), err
    return lines[0]


def test_every_command_group_requires_its_subcommand(capsys):
    groups = dict(command_groups(build_parser()))
    assert set(groups) >= {(), ("data",), ("train",), ("artifacts",), ("triton",), ("evaluate",)}
    for path, choices in groups.items():
        with pytest.raises(SystemExit) as exit:
            main(list(path))
        err = capsys.readouterr().err
        assert exit.value.code == 2 and err.startswith(f"usage: recstack {' '.join(path)}".rstrip() + " ")
        assert one_error_line(err) == f"{PREFIX}the following arguments are required: {{{','.join(choices)}}}"


@pytest.mark.parametrize("args, message", [
    (["train", "ranker", "--model", "mf", "--data", "d", "--out", "o"], "argument --model: invalid choice: 'mf'"),
    (["evaluate", "drift", "--reference", "d"], "the following arguments are required: --current"),
    (["serve", "--artifacts", "a", "--config", "c", "--port", "eighty"], "argument --port: invalid int value"),
])
def test_a_usage_error_prints_usage_and_one_error_line(args, message, capsys):
    with pytest.raises(SystemExit) as exit:
        main(args)
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.startswith(f"usage: recstack {args[0]}")
    assert one_error_line(err).startswith(PREFIX + message) and err.splitlines()[-1].startswith(PREFIX)


@pytest.mark.parametrize("args, message", [
    (["data", "prepare", "--dataset", "movielens", "--out", "{tmp}/ml"], "--path is required for this dataset"),
    (["data", "stats", "{tmp}"], "not a recstack dataset"),
    (["recommend", "--artifacts", "{tmp}", "--config", "{tmp}/none.yaml"], "none.yaml"),
    (["evaluate", "replay", "--log", "{tmp}", "--artifacts", "{tmp}", "--config", "c", "--last", "0"], "--last 0"),
    (["serve", "--artifacts", "{tmp}", "--config", "c", "--workers", "0"], "--workers 0"),
    (["serve", "--artifacts", "{tmp}", "--config", "c", "--torch-threads", "0"], "--torch-threads 0"),
])
def test_bad_input_prints_one_error_line_and_exits_2(args, message, tmp_path, capsys):
    assert main([a.format(tmp=tmp_path) for a in args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and one_error_line(err).startswith(PREFIX) and message in err


def test_a_failing_command_prints_one_error_line_and_exits_1(monkeypatch, capsys):
    class Failing:  # a pipeline whose fail-closed source failed
        def warm_up(self, query):
            pass

        def __call__(self, query):
            raise RuntimeError("source 'ann' failed")

        def close(self):
            pass

    monkeypatch.setattr(recommend_cli, "published_pipeline", lambda root, config: ("v0001", Failing()))
    assert main(["recommend", "--artifacts", "a", "--config", "c"]) == 1
    assert capsys.readouterr().err == f"{PREFIX}source 'ann' failed\n"


def test_model_choices_are_the_models_packages_rankers():
    ranker = subcommands(subcommands(build_parser())["train"])["ranker"]
    model = next(action for action in ranker._actions if action.dest == "model")
    assert tuple(model.choices) == models.RANKERS == tuple(RANKERS)


def test_prepare_synthetic_then_stats(tmp_path):
    out = recstack("data", "prepare", "--dataset", "synthetic", "--users", 200, "--items", 100,
                   "--interactions", 3000, "--seed", 7, "--split", "temporal", "--out", tmp_path / "syn")
    assert out.returncode == 0, out.stderr
    for name in ("interactions.parquet", "users.parquet", "items.parquet", "schema.json", "encoders.json",
                 "ground_truth.npz", "split/train.parquet", "split/valid.parquet", "split/test.parquet"):
        assert (tmp_path / "syn" / name).is_file(), name
    stats = json.loads(recstack("data", "stats", tmp_path / "syn", "--json").stdout)
    assert (stats["interactions"], stats["users"], stats["items"]) == (3000, 200, 100)
    assert stats["train_rows"] + stats["valid_rows"] + stats["test_rows"] == 3000
    schema = json.loads((tmp_path / "syn" / "schema.json").read_text())
    assert schema["split"] == {"method": "temporal", "seed": 7}
    assert all("embedding_dim" in f for f in schema["features"] if f["kind"] != "numerical")


def test_prepare_refuses_to_overwrite_without_the_flag(tmp_path):
    args = ["data", "prepare", "--dataset", "synthetic", "--users", 50, "--items", 40,
            "--interactions", 500, "--out", tmp_path / "syn"]
    assert recstack(*args).returncode == 0
    again = recstack(*args)
    assert again.returncode == 2 and "already exists" in again.stderr
    assert recstack(*args, "--overwrite").returncode == 0


def test_ml100k_statistics(tmp_path):
    out = recstack("data", "prepare", "--dataset", "ml-100k", "--out", tmp_path / "ml")
    assert out.returncode == 0, out.stderr
    stats = json.loads(recstack("data", "stats", tmp_path / "ml", "--json").stdout)
    assert (stats["interactions"], stats["users"], stats["items"]) == (100_000, 943, 1682)
    assert "100,000" in out.stdout and "1,682" in out.stdout


def test_obd_random_all_keeps_propensities(tmp_path):
    out = recstack("data", "prepare", "--dataset", "obd", "--out", tmp_path / "obd")
    assert out.returncode == 0, out.stderr
    inter = pd.read_parquet(tmp_path / "obd" / "interactions.parquet")
    assert len(inter) == 10_000
    assert inter["propensity"].between(0, 1, inclusive="right").all()


GOOD = "uid,sku,ts,clicked\n1,10,100,1\n2,11,200,0\n3,10,300,1\n"
BAD_INPUTS = {
    "missing column": ("uid,sku,clicked\n1,10,1\n", "missing column", "ts"),
    "wrong dtype": ("uid,sku,ts,clicked\n1,10,100,1\n2,11,yesterday,0\n", "wrong dtype", "yesterday"),
    "null id": ("uid,sku,ts,clicked\n1,10,100,1\n,11,200,0\n", "null id", "user_id"),
    "empty file": ("", "empty file", "log.csv"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_interactions_file_fails_cleanly(tmp_path, case):
    content, expected, detail = BAD_INPUTS[case]
    (tmp_path / "log.csv").write_text(content)
    out = recstack("data", "prepare", "--dataset", "files", "--path", tmp_path / "log.csv",
                   "--map", "user_id=uid", "item_id=sku", "timestamp=ts", "label=clicked", "--out", tmp_path / "ds")
    assert out.returncode == 2
    assert "log.csv" in out.stderr and expected in out.stderr and detail in out.stderr
    assert "Traceback" not in out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.csv"]


def test_duplicate_item_ids_fail_cleanly(tmp_path):
    (tmp_path / "log.csv").write_text(GOOD)
    (tmp_path / "items.csv").write_text("sku,category\n10,shoes\n11,hats\n10,socks\n")
    out = recstack("data", "prepare", "--dataset", "files", "--path", tmp_path / "log.csv",
                   "--items-file", tmp_path / "items.csv", "--map", "user_id=uid", "item_id=sku",
                   "timestamp=ts", "label=clicked", "--out", tmp_path / "ds")
    assert out.returncode == 2
    assert "items.csv" in out.stderr and "'item_id' has duplicate ids in 2 rows" in out.stderr
    assert "socks" in out.stderr
    assert not (tmp_path / "ds").exists()


def test_refresh_and_artifacts_commands(tiny_dataset, trained_runs, tmp_path, capsys):
    models, artifacts = str(trained_runs["two_tower"].parent), str(tmp_path / "artifacts")
    refresh = ["refresh", "--data", str(tiny_dataset), "--models", models, "--artifacts", artifacts]
    assert main(refresh) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["version"] == "v0001"
    assert main([*refresh, "--incremental"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["mode"] == "incremental"
    assert main(["artifacts", "list", "--artifacts", artifacts, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(row["version"], row["current"]) for row in listed] == [("v0001", False), ("v0002", True)]
    assert main(["artifacts", "rollback", "--artifacts", artifacts]) == 0
    assert capsys.readouterr().out.strip() == "v0001"
    assert main(["recommend", "--artifacts", artifacts, "--config", str(PIPELINE), "--user", "7", "--recent", "3", "4",
                 "--k", "5"]) == 0
    answer = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert answer["version"] == "v0001" and len(answer["items"]) == 5
    assert not {3, 4} & {item["item_id"] for item in answer["items"]}  # seen in the session
    assert [item["display"] for item in answer["items"]] == [{"title": f"item {item['item_id']}"}  # the store's
                                                             for item in answer["items"]]  # (configs' display)
    assert answer["stages"]["scorer"]["out"] >= 5


@pytest.mark.parametrize("args, named", [
    (["refresh", "--models", "{tmp}/none"], "no training run"),
    (["artifacts", "rollback"], "no version older"),
    (["recommend", "--config", str(PIPELINE)], "no published version"),
    (["recommend", "--config", str(PIPELINE), "--context", "hour"], "expected NAME=VALUE"),
])
def test_refresh_and_artifacts_errors_exit_2(args, named, tiny_dataset, tmp_path, capsys):
    base = {"refresh": ["--data", str(tiny_dataset), "--artifacts", str(tmp_path / "a")],
            "artifacts": ["--artifacts", str(tmp_path / "a")],
            "recommend": ["--artifacts", str(tmp_path / "a")]}[args[0]]
    assert main([a.format(tmp=tmp_path) for a in args] + base) == 2
    assert named in capsys.readouterr().err


def test_serve_answers_over_http_until_interrupted(tiny_dataset, trained_runs, tmp_path):
    artifacts = tmp_path / "artifacts"
    assert main(["refresh", "--data", str(tiny_dataset), "--models", str(trained_runs["two_tower"].parent),
                 "--artifacts", str(artifacts)]) == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = yaml.safe_load(PIPELINE.read_text())
    for source in config["sources"]:
        source["timeout_s"] = 5.0  # the example's milliseconds are for an idle server, not a busy test machine
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(config))
    linear = {**config, "scorer": [{"kind": "torchscript", "model": "linear"}]}
    (tmp_path / "linear.yaml").write_text(yaml.safe_dump(linear))
    server = subprocess.Popen([sys.executable, "-m", "recstack", "serve", "--artifacts", str(artifacts), "--config",
                               str(tmp_path / "pipeline.yaml"), "--port", str(port), "--log", str(tmp_path / "log"),
                               "--log-keep-days", "30",
                               "--shadow-config", str(tmp_path / "linear.yaml"), "--shadow-sample", "1",
                               "--experiment-config", str(tmp_path / "linear.yaml"), "--experiment-name", "lin",
                               "--experiment-share", "0.5"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as reply:
                    assert json.loads(reply.read())["version"] == "v0001"
                    break
            except OSError:
                assert server.poll() is None, server.stdout.read().decode()
                assert time.monotonic() < deadline, "recstack serve did not answer /healthz in 120 s"
                time.sleep(0.2)
        answers = []
        for user in range(1, 11):
            request = urllib.request.Request(f"http://127.0.0.1:{port}/recommend",
                                             data=json.dumps({"user_id": user, "k": 3}).encode(),
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=10) as reply:
                answers.append(json.loads(reply.read()))
        assert all(len(answer["items"]) == 3 for answer in answers)
        assert {answer["variant"] for answer in answers} == {"control", "lin"}  # users 1-10 hash to both arms
        time.sleep(1)  # the shadow runs off the request thread
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/shadow?k=3", timeout=10) as reply:
            shadow = json.loads(reply.read())
        control = sum(answer["variant"] == "control" for answer in answers)
        assert shadow["counts"]["requests"] == control and shadow["comparison"]["k"] == 3
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=30) == 0
    finally:
        server.kill()
        server.wait()
    logged = logged_slots(tmp_path / "log")  # written out on shutdown
    assert logged["item_id"].tolist() == [item["item_id"] for answer in answers for item in answer["items"]]
    assert logged.drop_duplicates("request_id")["variant"].tolist() == [answer["variant"] for answer in answers]


def test_evaluate_replay_estimates_a_config_from_an_exploring_servers_log(tiny_dataset, trained_runs, tmp_path,
                                                                        capsys):
    artifacts = str(tmp_path / "artifacts")
    assert main(["refresh", "--data", str(tiny_dataset), "--models", str(trained_runs["two_tower"].parent),
                 "--artifacts", artifacts]) == 0
    config = yaml.safe_load(PIPELINE.read_text())
    for source in config["sources"]:
        source["timeout_s"] = 5.0  # the example's milliseconds are for an idle server, not a busy test machine
    (tmp_path / "top_k.yaml").write_text(yaml.safe_dump(config))
    config["orderers"][-1] = {"kind": "explore", "epsilon": 0.3, "seed": 0}
    (tmp_path / "explore.yaml").write_text(yaml.safe_dump(config))
    log = ImpressionLog(tmp_path / "log")
    recommender = Recommender(Path(artifacts), load_pipeline_config(tmp_path / "explore.yaml"), log=log)
    try:
        for user in range(1, 41):
            served = recommender.recommend(Query(user_id=user, k=5))
            recommender.feedback(served.request_id, int(served.response.item_ids[user % 5]), 1.0)
    finally:
        recommender.close()
        log.close()
    replay = ["evaluate", "replay", "--log", str(tmp_path / "log"), "--artifacts", artifacts, "--depth", "1", "5"]
    assert main([*replay, "--config", str(tmp_path / "top_k.yaml")]) == 0
    report = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert report["requests"] == 40 and report["failed"] == 0 and [d["depth"] for d in report["depths"]] == [1, 5]
    top1, top5 = report["depths"]
    assert top1["logged"]["value"] == pytest.approx(8 / 40)  # one click per request, at slot user % 5
    assert 0 < top5["matched"] < top1["matched"] <= 1  # the candidate is the logging pipeline without exploring
    assert top1["candidate"]["std_error"] > 0 and top1["effective_sample_size"] > 1
    assert main([*replay, "--config", str(tmp_path / "top_k.yaml"), "--last", "10"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["requests"] == 10
    assert main([*replay, "--config", str(tmp_path / "explore.yaml")]) == 2
    assert "replay estimates deterministic rankings" in capsys.readouterr().err


def test_evaluate_drift_compares_every_model_input_between_two_samples(tiny_dataset, capsys):
    drift = ["evaluate", "drift", "--reference", str(tiny_dataset), "--current", str(tiny_dataset)]
    assert main([*drift, "--reference-part", "train", "--current-part", "train"]) == 0
    same = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert same["alerts"] == [] and all(row["psi"] == pytest.approx(0, abs=1e-12) for row in same["features"])
    assert main([*drift, "--reference-part", "train", "--current-part", "test", "--psi-alert", "1e-9",
                 "--fail-on-alert"]) == 1
    moved = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert moved["rows"]["reference"] > moved["rows"]["current"] > 0
    kinds = {row["column"]: row["kind"] for row in moved["features"]}
    assert kinds["item_id"] == "categorical" and "numerical" in kinds.values()
    assert moved["alerts"] and set(moved["alerts"]) <= set(kinds)


def test_evaluate_ab_reads_an_experiment_from_the_impression_log(tmp_path, capsys):
    rng = np.random.default_rng(0)
    log = ImpressionLog(tmp_path / "log")
    for n in range(600):
        user = int(rng.integers(0, 300))
        arm = "bigger-pool" if user % 2 else "control"
        log.write(Impression(f"r{n}", 1.7e9 + n, "v0001", arm, user, {}, (), 3, (1, 2, 3), ("ann",) * 3,
                             (0.9, 0.5, 0.1), (1.0, 1.0, 1.0)))
        if rng.random() < (0.6 if arm == "control" else 0.9):
            log.write(Feedback(f"r{n}", 1, 1.0, 1.7e9 + n + 1))
    log.close()
    assert main(["evaluate", "ab", "--log", str(tmp_path / "log"), "--treatment", "bigger-pool"]) == 0
    report = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert set(report["arms"]) == {"control", "bigger-pool"}
    assert report["arms"]["control"]["requests"] + report["arms"]["bigger-pool"]["requests"] == 600
    assert report["comparison"]["low"] < 0.3 < report["comparison"]["high"] and report["comparison"]["p_value"] < 1e-3
    assert not report["sample_ratio_alarm"]
    assert main(["evaluate", "ab", "--log", str(tmp_path / "log"), "--treatment", "other"]) == 2
    assert "expected 'control' and 'other'" in capsys.readouterr().err


def test_a_run_trained_in_one_directory_refreshes_from_another(tiny_dataset, trained_runs, tmp_path, monkeypatch,
                                                               capsys):
    models = tmp_path / "runs"
    shutil.copytree(trained_runs["two_tower"].parent, models, ignore=shutil.ignore_patterns("linear"))
    trained = recstack("train", "ranker", "--model", "linear", "--data", tiny_dataset.name, "--out",
                       models / "linear", "--max-epochs", 1, "--batch-size", 512, "--accelerator", "cpu",
                       cwd=tiny_dataset.parent)  # the dataset named relative to where training runs, as in a Makefile
    assert trained.returncode == 0, trained.stderr
    assert json.loads((models / "linear" / "run.json").read_text())["data"] == str(tiny_dataset.resolve())
    elsewhere = tmp_path / "cron"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # as cron starts it
    assert main(["refresh", "--data", str(tiny_dataset), "--models", str(models), "--artifacts",
                 str(tmp_path / "artifacts")]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["version"] == "v0001"
