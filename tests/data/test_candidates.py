"""The candidate table: built from train only, no held-out pair among its train rows, and a
ranker trains on it unchanged."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from data.candidates import CANDIDATES_FILE, CandidatesConfig, build_candidates, load_candidates_config
from data.dataset import read_part, write_dataset
from data.encoders import FeatureEncoder
from recstack.cli import main
from training.train import RunConfig, train_ranker

SMALL = CandidatesConfig(pool=20, popular_k=10, negatives=3)


@pytest.fixture(scope="module")
def table(tiny_dataset, trained_runs):
    return build_candidates(tiny_dataset, trained_runs["two_tower"].parent, SMALL)


def _pairs(frame: pd.DataFrame) -> set[tuple[int, int]]:
    return set(zip(frame["user_id"].tolist(), frame["item_id"].tolist(), strict=True))


def _sampled(rows: pd.DataFrame, original: pd.DataFrame) -> pd.DataFrame:
    """The rows of a candidate part that are not rows of the dataset's part."""
    keys = ["user_id", "item_id", "timestamp", "label"]
    merged = rows.merge(original[keys].drop_duplicates(), on=keys, how="left", indicator=True)
    return rows[merged["_merge"].eq("left_only").to_numpy()]


def _copy(dataset, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy)
    return copy


def test_no_valid_or_test_pair_among_train_rows(table, tiny_dataset):
    """Each part holds its own rows and sampled rows whose pairs the user has in no part. (The
    synthetic log exposes some pairs more than once, in several parts; ML-100K has no repeats.)"""
    parts = {part: read_part(tiny_dataset, part) for part in ("train", "valid", "test")}
    everything = _pairs(pd.concat(parts.values()))
    for part, original in parts.items():
        rows = table.part(part)
        sampled = _sampled(rows, original)
        assert len(rows) - len(sampled) == len(original)
        assert len(sampled) and not _pairs(sampled) & everything
        assert (sampled["label"] == 0).all()
    held_out = _pairs(parts["valid"]) | _pairs(parts["test"])
    assert not (_pairs(table.part("train")) - _pairs(parts["train"])) & held_out


def test_every_positive_row_gets_its_negatives_beside_it(table, tiny_dataset):
    for part in ("train", "valid", "test"):
        original, rows = read_part(tiny_dataset, part), table.part(part)
        positives = int((original["label"] > 0).sum())
        assert len(rows) == len(original) + SMALL.negatives * positives
        assert rows["label"].sum() == original["label"].sum()
    train = table.part("train").reset_index(drop=True)
    first = int(np.flatnonzero(train["label"].to_numpy() > 0)[0])
    impression = train.iloc[first:first + 1 + SMALL.negatives]
    assert impression["user_id"].nunique() == 1 and impression["timestamp"].nunique() == 1
    assert impression["label"].tolist() == [1.0] + [0.0] * SMALL.negatives


def test_pools_and_sources_come_from_train_only(table, tiny_dataset, trained_runs, tmp_path):
    """Moving every valid and test row to other items changes nothing the train rows were built
    from: the same original train rows carry the same source and retrieval score."""
    copy = _copy(tiny_dataset, tmp_path)
    rng = np.random.default_rng(0)
    for part in ("valid", "test"):
        rows = read_part(copy, part)
        rows["item_id"] = rng.permutation(rows["item_id"].to_numpy())[::-1]
        rows.to_parquet(copy / "split" / f"{part}.parquet", index=False)
    moved = build_candidates(copy, trained_runs["two_tower"].parent, SMALL)
    keys = ["user_id", "item_id", "timestamp"]
    original = read_part(tiny_dataset, "train")[keys]
    before = table.part("train").merge(original, on=keys).sort_values(keys, kind="stable")
    after = moved.part("train").merge(original, on=keys).sort_values(keys, kind="stable")
    assert len(before) == len(original)
    pd.testing.assert_frame_equal(before.reset_index(drop=True), after.reset_index(drop=True))
    popular = table.part("train")["source"] == "popular"
    assert popular.any() and (table.part("train")["source"] == "ann").any()


def test_hard_negatives_come_from_the_users_retrieval_pool(tiny_dataset, trained_runs):
    """With every negative from retrieval, a user's negatives are among their ``pool`` best unseen
    items, and score higher than uniform draws; uniform draws spread over more items."""
    models, original = trained_runs["two_tower"].parent, read_part(tiny_dataset, "train")
    negatives = {}
    for kind in ("retrieval", "random"):
        config = CandidatesConfig(**{**SMALL.model_dump(), "shares": {"retrieval": 0.0, "popular": 0.0,
                                                                      "random": 0.0, kind: 1.0}})
        negatives[kind] = _sampled(build_candidates(tiny_dataset, models, config).part("train"), original)
    per_user = {kind: rows.groupby("user_id")["item_id"].nunique().max() for kind, rows in negatives.items()}
    assert per_user["retrieval"] <= SMALL.pool < per_user["random"]
    assert negatives["retrieval"]["retrieval_score"].mean() > negatives["random"]["retrieval_score"].mean()


def test_the_retrieval_run_must_have_trained_on_this_train_part(tiny_dataset, trained_runs, tmp_path):
    copy = _copy(tiny_dataset, tmp_path)
    train = read_part(copy, "train")
    train.iloc[1:].to_parquet(copy / "split" / "train.parquet", index=False)  # another split
    with pytest.raises(ValueError, match="not the train part"):
        build_candidates(copy, trained_runs["two_tower"].parent, SMALL)
    with pytest.raises(ValueError, match="expected a 'retrieval' run"):
        build_candidates(tiny_dataset, trained_runs["two_tower"].parent, SMALL.model_copy(update={"retrieval": "dlrm"}))
    run = json.loads((trained_runs["two_tower"] / "run.json").read_text())
    assert run["task"] == "retrieval"


def test_bad_configs_name_the_value(tmp_path):
    with pytest.raises(ValueError, match="sum to 1.5"):
        CandidatesConfig.model_validate({"shares": {"retrieval": 1.0, "popular": 0.5, "random": 0.0}})
    path = tmp_path / "c.yaml"
    path.write_text("pool: 10\nnegativs: 3\n")
    with pytest.raises(ValueError, match="negativs"):
        load_candidates_config(path)


def test_a_ranker_trains_on_the_written_table(table, tiny_dataset, trained_runs, tmp_path):
    out = write_dataset(table, tmp_path / "candidates")
    encoder = FeatureEncoder.load(out / "encoders.json")
    assert {"source", "retrieval_score"} <= set(encoder.schema.names)
    lineage = json.loads((out / CANDIDATES_FILE).read_text())
    assert lineage["retrieval_version"].startswith("two_tower@")
    config = RunConfig.model_validate({"train": {"lr": 0.05, "max_epochs": 1, "batch_size": 512, "accelerator": "cpu"},
                                       "features": ["user_id", "item_id", "source", "retrieval_score"]})
    metrics = train_ranker("linear", out, tmp_path / "linear", config)
    assert metrics["val_auc"] > 0.6


def test_cli_writes_the_table(tiny_dataset, trained_runs, tmp_path, capsys):
    config = tmp_path / "candidates.yaml"
    config.write_text("pool: 20\nnegatives: 1\n")
    args = ["data", "candidates", "--data", str(tiny_dataset), "--models", str(trained_runs["two_tower"].parent),
            "--out", str(tmp_path / "out"), "--config", str(config)]
    assert main(args) == 0
    assert "train_rows" in capsys.readouterr().out
    assert main(args) == 2  # --out exists and no --overwrite
    assert "already exists" in capsys.readouterr().err
