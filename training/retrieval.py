"""Two-tower retrieval: a thin LightningModule that owns the sampled-softmax loss, the optimizer
and full-corpus evaluation.

Validation ranks every item in the corpus for one query per user, removes the items the user
already interacted with, and reports Recall/NDCG/MRR/Hit/Precision@K from
`evaluation.metrics`. `evaluate_rankings` is that step on its own, so that the baselines in
`training.baselines` are measured by the same code.
"""

from __future__ import annotations

from dataclasses import dataclass

import lightning as L
import numpy as np
import torch

from data.encoders import Batch
from evaluation import metrics
from models.two_tower import TwoTower, TwoTowerConfig, sampled_softmax_loss
from training.data import EvalQueries


class FullCorpusEvaluation(L.LightningModule):
    """Validation and test by `evaluate_rankings` of ``corpus_scores``; subclasses set ``k``."""

    k: int

    def corpus_scores(self, query: Batch) -> torch.Tensor:
        raise NotImplementedError

    def validation_step(self, step: tuple, _: int) -> None:
        self._evaluate(step, "valid", "val")

    def test_step(self, step: tuple, _: int) -> None:
        self._evaluate(step, "test", "test")

    def _evaluate(self, step: tuple, part: str, prefix: str) -> None:
        query, rows = step
        results = evaluate_rankings(self.corpus_scores(query), self.trainer.datamodule.queries[part],
                                    rows.tolist(), self.k)
        for name, value in results.items():
            self.log(f"{prefix}_{name}", value, batch_size=len(rows), sync_dist=True,
                     prog_bar=name == f"ndcg@{self.k}" and prefix == "val")


@dataclass(frozen=True)
class SampledSoftmax:
    """The retrieval loss: in-batch sampled softmax at ``temperature``; ``logq`` subtracts each
    in-batch item's log popularity from its logit; ``negatives`` extra items per step are drawn
    uniformly from the corpus (mixed negative sampling). ``k`` is the cut-off of the metrics."""

    temperature: float = 0.05
    logq: bool = True
    negatives: int = 0
    k: int = 10

    def __post_init__(self) -> None:
        if self.k < 1 or self.negatives < 0 or self.temperature <= 0:
            raise ValueError(f"k = {self.k}, negatives = {self.negatives}, temperature = {self.temperature}; "
                             "expected k >= 1, negatives >= 0 and temperature > 0")


class RetrievalModule(FullCorpusEvaluation):
    """Trains a `TwoTower` on (query batch, item batch) pairs of positives with ``loss``."""

    def __init__(self, config: TwoTowerConfig, loss: SampledSoftmax = SampledSoftmax(), lr: float = 1e-3,
                 weight_decay: float = 0.0) -> None:
        super().__init__()
        self.model = TwoTower(config)
        self.item_id = config.item_id
        self.loss = loss
        self.lr = lr
        self.weight_decay = weight_decay
        self.k = loss.k
        self._item_emb: torch.Tensor | None = None

    def forward(self, query: Batch) -> torch.Tensor:
        """Query embeddings (B, D)."""
        return self.model.query_tower(query.dense, query.sparse)

    def embed_items(self, items: Batch) -> torch.Tensor:
        """Item embeddings (B, D)."""
        return self.model.item_tower(items.dense, items.sparse)

    def predict_step(self, step: tuple, _: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(item embeddings (B, D), row positions (B,)) of a batch of item rows."""
        items, rows = step
        return self.embed_items(items), rows

    def training_step(self, step: tuple, _: int) -> torch.Tensor:
        query, items, _rows = step
        item_ids = items.sparse[self.item_id].values()  # (B,) encoded ids, one per row
        log_q = self._log_q()[item_ids] if self.loss.logq else None
        extra, extra_log_q = None, None
        if self.loss.negatives:
            data = self.trainer.datamodule
            # a function of (seed, step, rank), not of the global RNG, so a resumed run draws what
            # an uninterrupted one would
            rng = np.random.default_rng([data.seed, self.global_step, self.global_rank])
            drawn = rng.integers(len(data.corpus), size=self.loss.negatives).tolist()
            extra = self.embed_items(data.corpus.__getitems__(drawn)[0].to(self.device))
            # uniform draws: q = 1 / corpus size for each
            extra_log_q = torch.full((self.loss.negatives,), -np.log(len(data.corpus)), device=self.device) \
                if self.loss.logq else None
        loss = sampled_softmax_loss(self(query), self.embed_items(items), log_q, self.loss.temperature,
                                    extra, extra_log_q, item_ids)
        self.log("train_loss", loss, batch_size=len(query), prog_bar=True)
        return loss

    def _log_q(self) -> torch.Tensor:
        log_q = self.trainer.datamodule.item_log_q
        if log_q.device != self.device:
            self.trainer.datamodule.item_log_q = log_q = log_q.to(self.device)
        return log_q

    def on_validation_epoch_start(self) -> None:
        self._item_emb = self._corpus_embeddings()

    on_test_epoch_start = on_validation_epoch_start

    @torch.no_grad()
    def _corpus_embeddings(self) -> torch.Tensor:
        return torch.cat([self.embed_items(b.to(self.device)) for b in self.trainer.datamodule.corpus_batches()])

    def corpus_scores(self, query: Batch) -> torch.Tensor:
        """Each query's score for every corpus item: (B, I)."""
        return self(query) @ self._item_emb.T

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)


def evaluate_rankings(scores: torch.Tensor | np.ndarray, queries: EvalQueries, rows: list[int],
                      k: int) -> dict[str, float]:
    """Recall/NDCG/MRR/Hit/Precision@k of the eval queries ``rows``, each averaged over those queries.

    ``scores`` (len(rows), I) holds each query's score for every item of the corpus, in corpus
    order; the query's excluded (already seen) items are removed before the top k are taken.
    Every eval query has a relevant item, so a mean over a batch weighted by its size is the
    mean over all queries.
    """
    if hasattr(scores, "detach"):
        scores = scores.detach().float().cpu().numpy()
    topk = metrics.topk_from_scores(scores, k, exclude=[queries.exclude[r] for r in rows])
    per_user = metrics.per_user_retrieval_metrics(topk, [queries.relevant[r] for r in rows], k)
    return {name: float(values.mean()) for name, values in per_user.items()}
