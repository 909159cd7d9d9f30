"""Baselines for retrieval, measured by the same full-corpus evaluation as the two-tower model.

- `popularity_scores` / `evaluate_popularity`: every user gets the items in order of their
  train interaction counts, minus the items the user has already seen.
- `BPRModule` / `train_bpr`: plain matrix factorisation (`models.mf`) trained with the BPR loss,
  one uniformly drawn unseen item per positive; selected on validation NDCG@K like the
  two-tower model.

Both read `RetrievalDataModule`'s evaluation queries and score them with
`training.retrieval.evaluate_rankings`.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch

from data.encoders import Batch
from models.mf import MatrixFactorization, bpr_loss
from training.data import RetrievalDataModule
from training.retrieval import FullCorpusEvaluation, evaluate_rankings
from training.train import RunConfig, fit


def popularity_scores(train: pd.DataFrame, item_ids: pd.Series | np.ndarray) -> np.ndarray:
    """The number of positive ``train`` rows of each of ``item_ids`` (I,), float64; 0 for unseen items."""
    counts = train.loc[train["label"] > 0, "item_id"].value_counts()
    return counts.reindex(pd.Index(item_ids), fill_value=0).to_numpy(dtype=np.float64)


def evaluate_popularity(data: RetrievalDataModule, part: str, k: int = 10) -> dict[str, float]:
    """Metrics@k on ``part`` (valid or test) of the ranking by train popularity; ``data`` is set up."""
    popularity = popularity_scores(data.train_rows.frame, data.items["item_id"])
    queries = data.queries[part]
    rows = list(range(len(queries.relevant)))
    return evaluate_rankings(np.broadcast_to(popularity, (len(rows), len(popularity))), queries, rows, k)


class BPRModule(FullCorpusEvaluation):
    """Trains a `MatrixFactorization` with the BPR loss on a `RetrievalDataModule` whose query
    features are ``["user_id"]`` and item features ``["item_id"]``.

    Each positive (user, item) row is paired with one item drawn uniformly from the corpus
    among those the user has no train row with. ``weight_decay`` is Adam's L2 penalty, the
    Gaussian prior of BPR-Opt.
    """

    def __init__(self, model: MatrixFactorization, lr: float = 1e-3, weight_decay: float = 0.0, k: int = 10) -> None:
        super().__init__()
        if k < 1:
            raise ValueError(f"k = {k}; expected k >= 1")
        self.model = model
        self.lr = lr
        self.weight_decay = weight_decay
        self.k = k

    def setup(self, stage: str) -> None:
        """The corpus's encoded item ids (I,) and which (user, item) pairs have a train row."""
        data = self.trainer.datamodule
        self.corpus_ids = torch.cat([b.sparse["item_id"].values() for b in data.corpus_batches()])
        train = data.encoder.encode(data.train_rows.frame, ["user_id", "item_id"]).sparse
        seen = torch.zeros(self.model.user_embedding.num_embeddings, self.model.item_embedding.num_embeddings,
                           dtype=torch.bool)
        seen[train["user_id"].values(), train["item_id"].values()] = True
        self.seen = seen

    def forward(self, query: Batch) -> torch.Tensor:
        """Scores (B, I) of each query's user for every corpus item, in corpus order."""
        return self.model(query.sparse["user_id"].values(), self.corpus_ids.to(self.device))

    def training_loss(self, step: tuple) -> torch.Tensor:
        query, items, _rows = step
        users, positives = query.sparse["user_id"].values(), items.sparse["item_id"].values()
        negatives = self._unseen_items(users.cpu()).to(self.device)
        loss = bpr_loss(self.model.score(users, positives), self.model.score(users, negatives))
        self.log("train_loss", loss, batch_size=len(users), prog_bar=True)
        return loss

    def _unseen_items(self, users: torch.Tensor) -> torch.Tensor:
        """One encoded item id per user (B,), uniform over the corpus items the user has not seen.

        Draws are a function of (seed, step, rank), as in `RetrievalModule`, so a resumed run
        draws what an uninterrupted one would.
        """
        rng = np.random.default_rng([self.trainer.datamodule.seed, self.global_step, self.global_rank])
        items = self.corpus_ids[rng.integers(len(self.corpus_ids), size=len(users))]
        redraw = self.seen[users, items]
        while redraw.any():  # every user has unseen items, and most draws are unseen
            items[redraw] = self.corpus_ids[rng.integers(len(self.corpus_ids), size=int(redraw.sum()))]
            redraw = self.seen[users, items]
        return items

    def corpus_scores(self, query: Batch) -> torch.Tensor:
        return self(query)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)


def train_bpr(data_dir: Path, out: Path, config: RunConfig) -> dict | None:
    """Trains BPR-MF on a dataset's train positives, written and selected like `train_retrieval`:
    ``config.model`` holds `MatrixFactorization`'s ``dim`` and ``item_bias``."""
    data = RetrievalDataModule(data_dir, ["user_id"], ["item_id"], config.train.batch_size, config.train.seed)
    sizes = {name: data.schema.feature(name).num_embeddings for name in ("user_id", "item_id")}
    L.seed_everything(config.train.seed, workers=True)
    model = MatrixFactorization(sizes["user_id"], sizes["item_id"], **config.model)
    module = BPRModule(model, config.train.lr, config.train.weight_decay, config.loss.k)
    return fit(module, data, out, config, monitor=f"val_ndcg@{config.loss.k}", run={"task": "bpr"})
