"""Popularity and BPR-MF baselines on a tiny synthetic dataset with a per-user random split."""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from data.prepare import prepare
from data.synthetic import SyntheticConfig, generate
from models.mf import MatrixFactorization
from training.baselines import BPRModule, evaluate_popularity, popularity_scores, train_bpr
from training.data import EvalQueries, RetrievalDataModule
from training.train import RunConfig

K = 10


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """300 users, 100 items, 20,000 exposures (about 3,400 train clicks)."""
    out = tmp_path_factory.mktemp("baselines") / "synthetic"
    return prepare(generate(SyntheticConfig(users=300, items=100, interactions=20_000, seed=0)), out,
                   split="random", seed=0)


@pytest.fixture(scope="module")
def data(dataset) -> RetrievalDataModule:
    module = RetrievalDataModule(dataset, ["user_id"], ["item_id"], batch_size=256)
    module.setup()
    return module


def test_popularity_scores_count_positive_train_rows():
    train = pd.DataFrame({"item_id": [7, 7, 3, 7, 3, 9], "label": [1.0, 1.0, 1.0, 0.0, 1.0, 0.0]})
    scores = popularity_scores(train, np.array([3, 5, 7, 9]))
    np.testing.assert_array_equal(scores, [2.0, 0.0, 2.0, 0.0])  # 7's third row and 9's are not clicks


def test_popularity_ranks_the_most_clicked_unseen_item_first_and_never_a_seen_one(data):
    counts = popularity_scores(data.train_rows.frame, data.items["item_id"])
    assert counts.max() > counts.min()
    exclude = [e for e in data.queries["test"].exclude if len(e)]
    best_unseen = [np.array([np.argmax(np.where(np.isin(np.arange(len(counts)), e), -1, counts))]) for e in exclude]
    first = _with_test_queries(data, EvalQueries(None, exclude, relevant=best_unseen))
    assert evaluate_popularity(first, "test", K)[f"mrr@{K}"] == 1.0
    seen = _with_test_queries(data, EvalQueries(None, exclude, relevant=exclude))
    assert evaluate_popularity(seen, "test", K)[f"hit@{K}"] == 0.0


def test_popularity_metrics_match_a_reference(data):
    """`evaluate_popularity` against NDCG and recall computed here item by item."""
    counts = popularity_scores(data.train_rows.frame, data.items["item_id"])
    queries = data.queries["valid"]
    ndcg, recall = [], []
    for exclude, relevant in zip(queries.exclude, queries.relevant, strict=True):
        relevant = set(relevant.tolist())
        top = _popularity_top_k(counts, exclude)
        dcg = sum(1 / math.log2(rank + 2) for rank, item in enumerate(top) if item in relevant)
        ideal = sum(1 / math.log2(rank + 2) for rank in range(min(len(relevant), K)))
        ndcg.append(dcg / ideal)
        recall.append(len(relevant & set(top)) / len(relevant))
    results = evaluate_popularity(data, "valid", K)
    assert results[f"ndcg@{K}"] == pytest.approx(np.mean(ndcg))
    assert results[f"recall@{K}"] == pytest.approx(np.mean(recall))


def test_bpr_negatives_are_items_the_user_has_not_seen(data):
    module = BPRModule(MatrixFactorization(data.schema.feature("user_id").num_embeddings,
                                           data.schema.feature("item_id").num_embeddings, dim=4))
    module.trainer = _FakeTrainer(data)
    module.setup("fit")
    users = data.encoder.encode(data.train_rows.frame, ["user_id"]).sparse["user_id"].values()
    negatives = module._unseen_items(users)
    assert not module.seen[users, negatives].any()
    assert len(set(negatives.tolist())) > 10  # spread over the corpus, not one safe item


def test_bpr_training_lowers_the_loss_and_reports_every_metric(dataset, tmp_path):
    config = RunConfig.model_validate({
        "train": {"max_epochs": 3, "batch_size": 256, "lr": 0.01, "accelerator": "cpu"},
        "model": {"dim": 16},
    })
    results = train_bpr(dataset, tmp_path / "bpr", config)
    for prefix in ("val", "test"):
        for name in ("recall", "precision", "hit", "mrr", "ndcg"):
            assert 0 < results[f"{prefix}_{name}@{K}"] <= 1
    assert json.loads((tmp_path / "bpr" / "metrics.json").read_text())["epochs"] == 3
    logged = pd.read_csv(tmp_path / "bpr" / "logs" / "version_0" / "metrics.csv")
    loss_per_epoch = logged.dropna(subset=["train_loss"]).groupby("epoch")["train_loss"].mean()
    assert loss_per_epoch.is_monotonic_decreasing and loss_per_epoch.iloc[-1] < 0.8 * loss_per_epoch.iloc[0]


def _popularity_top_k(counts: np.ndarray, exclude: np.ndarray) -> list[int]:
    """One user's top K by count; a reference that shares no code with `evaluate_popularity`."""
    order = np.lexsort((np.arange(len(counts)), -counts))
    return [int(i) for i in order if i not in set(exclude.tolist())][:K]


def _with_test_queries(data: RetrievalDataModule, queries: EvalQueries) -> SimpleNamespace:
    """What `evaluate_popularity` reads from a data module, with other test queries."""
    return SimpleNamespace(train_rows=data.train_rows, items=data.items, queries={"test": queries})


class _FakeTrainer:
    """What `BPRModule.setup` and its sampler read from a Trainer."""

    def __init__(self, data: RetrievalDataModule) -> None:
        self.datamodule = data
        self.global_step = 0
        self.global_rank = 0
