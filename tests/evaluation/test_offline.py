"""`evaluate offline` on the tiny synthetic dataset's refreshed version: the batched run answers
as the serving pipeline does, the report's numbers match naive recomputations, the figures plot
the JSON's values, and the command line reports bad input with exit code 2."""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from data.synthetic import load_ground_truth
from evaluation import offline
from evaluation.offline import (
    OfflineConfig,
    evaluate_offline,
    expected_clicks,
    format_table,
    hydrate_batch,
    read_held_out,
    run_pipeline,
)
from evaluation.plots import FIGURES, build_figures, figure_series, write_report
from inference.artifacts import ArtifactRoot
from inference.pipeline.config import load_pipeline_config
from inference.pipeline.executor import Hydrator, open_pipeline
from inference.pipeline.types import Query
from inference.refresh.job import RefreshConfig, refresh
from recstack.cli import main

PIPELINE = Path(__file__).parents[2] / "configs" / "pipeline.yaml"
K = 10


@pytest.fixture(scope="module")
def served(tiny_dataset, trained_runs, tmp_path_factory):
    """(artefact root, pipeline config path) of a version refreshed from the tiny dataset's runs."""
    root = tmp_path_factory.mktemp("offline")
    refresh(tiny_dataset, trained_runs["two_tower"].parent, root / "artifacts",
            RefreshConfig(pools={"user_n": 20, "similar_k": 10, "similar_items": 50}))
    config = yaml.safe_load(PIPELINE.read_text())
    for source in config["sources"]:
        source["timeout_s"] = 5.0  # serving answers on a busy test machine too, for the comparison
    (root / "pipeline.yaml").write_text(yaml.safe_dump(config))
    return root / "artifacts", root / "pipeline.yaml"


@pytest.fixture(scope="module")
def pipeline(served):
    artifacts, config = served
    root = ArtifactRoot(artifacts)
    pipe = open_pipeline(load_pipeline_config(config), root.path(root.current()))
    yield pipe
    pipe.close()


@pytest.fixture(scope="module")
def report(pipeline, tiny_dataset):
    return evaluate_offline(pipeline, tiny_dataset, OfflineConfig("valid", (5, K), users=60, truth=True,
                                                                  resamples=200))


def test_batched_run_answers_as_the_serving_pipeline(pipeline, tiny_dataset):
    held_out = read_held_out(tiny_dataset, "valid", [], users=30, seed=1)
    lists = run_pipeline(pipeline, held_out, K, batch_size=7)  # batches end inside the user list
    ann = pipeline.stages.sources[0]
    for u, user in enumerate(held_out.user_ids):
        query = Query(int(user), {}, tuple(held_out.history[u].tolist()), K)
        answer = pipeline(query).item_ids
        np.testing.assert_array_equal(lists.final[u, :len(answer)], answer)
        assert (lists.final[u, len(answer):] == -1).all()
        everything = ann.source(query, 200).item_ids
        unseen = everything[~np.isin(everything, held_out.history[u])][:K]
        np.testing.assert_array_equal(lists.retrieval[u], unseen)
        relevant = held_out.relevant[u]
        found = {slot.source.name: set(slot.source(query, slot.quota).item_ids[:slot.quota]) & set(relevant)
                 for slot in pipeline.stages.sources}
        for name, hits in found.items():
            others = set().union(*(h for other, h in found.items() if other != name))
            assert lists.source_hits[name][u] == len(hits)
            assert lists.alone_hits[name][u] == len(hits - others)
    assert held_out.user_ids.tolist() == sorted(held_out.user_ids.tolist())


@pytest.mark.parametrize("by_source", [False, True])
def test_batch_hydration_gives_the_hydrators_rows(pipeline, tiny_dataset, by_source):
    hydrator = Hydrator(pipeline.stages.hydrator.store, pipeline.stages.hydrator.schema, by_source)
    held_out = read_held_out(tiny_dataset, "valid", [], users=3, seed=2)
    queries = [Query(int(user), {}, tuple(history.tolist()), K)
               for user, history in zip(held_out.user_ids, held_out.history, strict=True)]
    candidates = [pipeline.stages.sources[0].source(query, 20) for query in queries]
    expected = pd.concat([hydrator(q, c).features for q, c in zip(queries, candidates, strict=True)],
                         ignore_index=True)
    batch = hydrate_batch(hydrator, queries, candidates)
    pd.testing.assert_frame_equal(batch.features, expected)
    assert ("retrieval_score" in batch.features) == by_source
    np.testing.assert_array_equal(batch.item_ids, np.concatenate([c.item_ids for c in candidates]))


def test_held_out_users_history_and_relevant_items(tiny_dataset):
    train, valid, test = (pd.read_parquet(tiny_dataset / "split" / f"{p}.parquet") for p in ("train", "valid", "test"))
    held_out = read_held_out(tiny_dataset, "test", [])
    assert held_out.user_ids.tolist() == sorted(test.loc[test["label"] > 0, "user_id"].unique().tolist())
    before = pd.concat([train, valid]).sort_values("timestamp", kind="stable")
    user = held_out.user_ids[0]
    assert held_out.history[0].tolist() == before.loc[before["user_id"] == user, "item_id"].tolist()
    assert set(held_out.relevant[0]) == set(test.loc[(test["user_id"] == user) & (test["label"] > 0), "item_id"])
    holders = before.groupby("item_id")["user_id"].nunique()
    item = holders.index[0]
    position = held_out.item_ids.tolist().index(item)
    assert held_out.item_share[position] == pytest.approx(holders[item] / before["user_id"].nunique())
    sample = read_held_out(tiny_dataset, "test", [], users=10, seed=3)
    assert len(sample.user_ids) == 10 and set(sample.user_ids) <= set(held_out.user_ids)


def test_report_matches_naive_recomputation(report, pipeline, tiny_dataset):
    held_out = read_held_out(tiny_dataset, "valid", [], users=60, seed=0)
    lists = run_pipeline(pipeline, held_out, K)
    recall = np.mean([len(set(top[top >= 0]) & set(rel)) / len(rel)
                      for top, rel in zip(lists.final, held_out.relevant, strict=True)])
    assert report["lists"]["pipeline"][f"recall@{K}"] == pytest.approx(recall)
    names = [slot.source.name for slot in pipeline.stages.sources]
    assert list(report["sources"]) == names
    shares = sum(report["sources"][name][f"share@{K}"] for name in names)
    assert shares == pytest.approx(np.mean(lists.final >= 0))  # every filled slot has one source
    hits_by_source = sum(report["sources"][name][f"recall@{K}"] for name in names)
    assert hits_by_source == pytest.approx(recall)
    stages = list(report["stages"])
    assert stages == ["blend", "filter:seen", "filter:available"]
    recalls = [report["stages"][name]["recall"] for name in stages]
    assert recalls == sorted(recalls, reverse=True)  # filters only remove candidates
    assert report["stages"]["blend"]["recall"] >= max(s["recall"] for s in report["sources"].values())
    paired = report["paired"][f"ndcg@{K}"]
    difference = report["lists"]["pipeline"][f"ndcg@{K}"] - report["lists"]["retrieval"][f"ndcg@{K}"]
    assert paired["mean"] == pytest.approx(difference)
    assert paired["low"] <= paired["mean"] <= paired["high"]
    for name in ("pipeline", "retrieval", "popularity"):
        assert 0 < report["beyond"][name][f"coverage@{K}"] <= 1
        assert 0 <= report["beyond"][name][f"diversity@{K}"] <= 1 and report["beyond"][name][f"novelty@{K}"] >= 0
    assert report["beyond"]["popularity"][f"novelty@{K}"] < report["beyond"]["retrieval"][f"novelty@{K}"]
    assert "pipeline - retrieval alone" in format_table(report)


def test_expected_clicks_against_a_brute_force_oracle(report, tiny_dataset):
    truth = report["truth"]
    for name in ("pipeline", "retrieval"):
        assert 0 < truth[name][f"clicks@{K}"] <= truth["oracle"][f"clicks@{K}"]
    held_out = read_held_out(tiny_dataset, "valid", [], users=5, seed=2)
    items = pd.read_parquet(tiny_dataset / "items.parquet")
    ground = load_ground_truth(tiny_dataset)
    best = []
    for u, user in enumerate(held_out.user_ids):
        candidates = items.loc[items["available"] & ~items["item_id"].isin(held_out.history[u]), "item_id"].to_numpy()
        p = ground.click_probability(np.full(len(candidates), user), candidates, held_out.times[u])
        best.append(np.sort(p)[::-1][:K].sum())
    clicks = expected_clicks(tiny_dataset, held_out, {}, (K,), items)
    assert clicks["oracle"][f"clicks@{K}"] == pytest.approx(np.mean(best), rel=1e-5)


def test_figures_plot_the_json_values(report, tmp_path):
    loaded = json.loads(json.dumps(report))  # what report.json holds
    figures = build_figures(loaded)
    assert list(figures) == list(FIGURES)
    for name, series in figure_series(loaded).items():
        lines = figures[name].axes[0].get_lines()
        assert [line.get_label() for line in lines] == list(series)
        for line, values in zip(lines, series.values(), strict=True):
            assert line.get_xdata().tolist() == loaded["ks"]
            assert line.get_ydata().tolist() == values
    assert figure_series(loaded)["coverage"]["pipeline"] == [loaded["beyond"]["pipeline"][f"coverage@{k}"]
                                                              for k in loaded["ks"]]
    written = write_report(loaded, format_table(loaded), tmp_path / "report")
    assert sorted(p.name for p in written) == sorted(["report.json", "report.html", *(f"{n}.png" for n in FIGURES)])
    assert json.loads((tmp_path / "report" / "report.json").read_text()) == loaded
    page = (tmp_path / "report" / "report.html").read_text()
    assert all(f'src="{name}.png"' in page for name in FIGURES)
    assert (tmp_path / "report" / "ndcg_by_stage.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_writes_the_report(served, tiny_dataset, tmp_path, capsys):
    artifacts, config = served
    args = ["evaluate", "offline", "--artifacts", str(artifacts), "--config", str(config), "--data",
            str(tiny_dataset), "--part", "test", "--k", "5", "--users", "20", "--out", str(tmp_path / "out")]
    assert main(args) == 0
    captured = capsys.readouterr()
    printed = json.loads(captured.out.splitlines()[-1])
    assert printed["version"] == "v0001" and printed["users"] == 20 and printed["ks"] == [5]
    assert "ranked lists" in captured.err
    assert json.loads((tmp_path / "out" / "report.json").read_text()) == printed
    assert (tmp_path / "out" / "report.html").is_file()


def test_cli_bad_input_exits_2(served, tiny_dataset, tmp_path, capsys, monkeypatch):
    artifacts, config = served
    base = ["evaluate", "offline", "--artifacts", str(artifacts), "--config", str(config)]
    assert main([*base, "--data", str(tiny_dataset), "--k", "10", "101"]) == 2
    assert "--k 101 exceeds max_k = 100" in capsys.readouterr().err
    empty = tmp_path / "empty"
    shutil.copytree(tiny_dataset, empty)
    valid = pd.read_parquet(empty / "split" / "valid.parquet")
    valid.iloc[:0].to_parquet(empty / "split" / "valid.parquet")
    assert main([*base, "--data", str(empty), "--part", "valid"]) == 2
    assert "the valid part holds no positive rows (0 rows)" in capsys.readouterr().err
    monkeypatch.setattr(offline, "request_context", lambda pipeline: ["hour"])  # a tower reading the hour
    assert main([*base, "--data", str(tiny_dataset)]) == 2
    assert "the test rows lack request context ['hour'], which the pipeline reads" in capsys.readouterr().err
    monkeypatch.undo()
    assert main([*base, "--data", str(tiny_dataset), "--truth", "--k", "5", "--users", "3",
                 "--diversity-column", "colour"]) == 2
    assert "items have no column 'colour'" in capsys.readouterr().err


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="part 'train'"):
        OfflineConfig(part="train")
    with pytest.raises(ValueError, match=r"ks \[10, 10\]"):
        OfflineConfig(ks=(10, 10))
    with pytest.raises(ValueError, match="users = 0"):
        OfflineConfig(users=0)
