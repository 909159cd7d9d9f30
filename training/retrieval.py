"""Two-tower retrieval: a thin LightningModule that owns the sampled-softmax loss, the optimizer
and full-corpus evaluation.

Validation ranks every item in the corpus for one query per user, removes the items the user
already interacted with, and reports Recall/NDCG/MRR/Hit/Precision@K from
`evaluation.metrics`. `evaluate_rankings` is that step on its own, so that the baselines in
`training.baselines` are measured by the same code.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from data.encoders import Batch
from evaluation import metrics
from models.two_tower import TwoTower, TwoTowerConfig, sampled_softmax_loss
from training.data import EvalQueries
from training.lean_module import LeanModule
from training.optimizers import DENSE_ADAM, EmbeddingOptimizer, build_optimizer


class FullCorpusEvaluation(LeanModule):
    """Validation and test by `rank_queries` of ``corpus_scores``; subclasses set ``k``.

    Metrics are means over queries of every rank's results: the distributed sampler repeats a
    few queries to give each rank as many, and each query counts once.
    """

    k: int
    _outputs: list[tuple[torch.Tensor, torch.Tensor]]  # per query: rows (B,), metrics (B, M)

    def corpus_scores(self, query: Batch) -> torch.Tensor:
        raise NotImplementedError

    def on_validation_epoch_start(self) -> None:
        self._outputs = []

    on_test_epoch_start = on_validation_epoch_start

    def validation_step(self, step: tuple, _: int) -> None:
        self._rank(step, "valid")

    def test_step(self, step: tuple, _: int) -> None:
        self._rank(step, "test")

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")

    def _rank(self, step: tuple, part: str) -> None:
        query, rows = step
        per_query = rank_queries(self.corpus_scores(query), self.trainer.datamodule.queries[part], rows.tolist(),
                                 self.k)
        values = torch.from_numpy(np.stack(list(per_query.values()), axis=1)).to(self.device)  # (B, M)
        self._outputs.append((rows.to(self.device), values))
        self._names = list(per_query)

    def _log_metrics(self, prefix: str) -> None:
        rows, values = (torch.cat(parts) for parts in zip(*self._outputs, strict=True))
        if self.trainer.world_size > 1:
            rows, values = self.all_gather(rows).flatten(), self.all_gather(values).flatten(0, 1)
            _, first = np.unique(rows.cpu().numpy(), return_index=True)
            values = values[torch.from_numpy(first).to(values.device)]
        means = values.double().mean(dim=0)
        for name, value in zip(self._names, means.tolist(), strict=True):
            self.log(f"{prefix}_{name}", value, prog_bar=name == f"ndcg@{self.k}" and prefix == "val")


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
    """Trains a `TwoTower` on (query batch, item batch) pairs of positives with ``loss``; its
    embedding tables update by ``embedding_optimizer``, the rest by Adam(lr, weight_decay)."""

    def __init__(self, config: TwoTowerConfig, loss: SampledSoftmax = SampledSoftmax(), lr: float = 1e-3,
                 weight_decay: float = 0.0, embedding_optimizer: EmbeddingOptimizer = DENSE_ADAM) -> None:
        super().__init__()
        self.model = TwoTower(config)
        self.item_id = config.item_id
        self.loss = loss
        self.lr = lr
        self.weight_decay = weight_decay
        self.embedding_optimizer = embedding_optimizer
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
        self.log_train_loss(loss, len(query))
        return loss

    def _log_q(self) -> torch.Tensor:
        log_q = self.trainer.datamodule.item_log_q
        if log_q.device != self.device:
            self.trainer.datamodule.item_log_q = log_q = log_q.to(self.device)
        return log_q

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self._item_emb = self._corpus_embeddings()

    on_test_epoch_start = on_validation_epoch_start

    @torch.no_grad()
    def _corpus_embeddings(self) -> torch.Tensor:
        return torch.cat([self.embed_items(b.to(self.device)) for b in self.trainer.datamodule.corpus_batches()])

    def corpus_scores(self, query: Batch) -> torch.Tensor:
        """Each query's score for every corpus item: (B, I)."""
        return self(query) @ self._item_emb.T

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return build_optimizer(self.model, self.lr, self.weight_decay, self.embedding_optimizer)


def rank_queries(scores: torch.Tensor | np.ndarray, queries: EvalQueries, rows: list[int],
                 k: int) -> dict[str, np.ndarray]:
    """Recall/NDCG/MRR/Hit/Precision@k of each eval query in ``rows``: {"recall@k": (len(rows),), ...}.

    ``scores`` (len(rows), I) holds each query's score for every item of the corpus, in corpus
    order; the query's excluded (already seen) items are removed before the top k are taken.
    """
    if hasattr(scores, "detach"):
        scores = scores.detach().float().cpu().numpy()
    topk = metrics.topk_from_scores(scores, k, exclude=[queries.exclude[r] for r in rows])
    return metrics.per_user_retrieval_metrics(topk, [queries.relevant[r] for r in rows], k)


def evaluate_rankings(scores: torch.Tensor | np.ndarray, queries: EvalQueries, rows: list[int],
                      k: int) -> dict[str, float]:
    """`rank_queries`, each metric averaged over the queries (every eval query has a relevant item)."""
    return {name: float(values.mean()) for name, values in rank_queries(scores, queries, rows, k).items()}
