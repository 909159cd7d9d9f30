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
import torch.nn.functional as F
from torchrec import KeyedJaggedTensor

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

    def training_loss(self, step: tuple) -> torch.Tensor:
        query, items, _rows = step
        item_ids = items.sparse[self.item_id].values()  # (B,) encoded ids, one per row
        extra_log_q = None
        if self.loss.negatives:
            data = self.trainer.datamodule
            # a function of (seed, step), not of the global RNG, so a resumed run draws what an
            # uninterrupted one would; every rank draws the same ones, as one process would
            rng = np.random.default_rng([data.seed, self.global_step])
            drawn = rng.integers(len(data.corpus), size=self.loss.negatives).tolist()
            # one pass through the item tower: torchrec's fused kernels step a table once per pass
            items = join_rows(items, data.corpus.__getitems__(drawn)[0].to(self.device))
            # uniform draws: q = 1 / corpus size for each
            extra_log_q = torch.full((self.loss.negatives,), -np.log(len(data.corpus)), device=self.device) \
                if self.loss.logq else None
        embedded = self.embed_items(items)  # (B + negatives, D)
        item_emb, extra = embedded[:len(item_ids)], embedded[len(item_ids):] if self.loss.negatives else None
        first, share = 0, 1.0
        if self.trainer.world_size > 1:
            item_emb, item_ids, first, share = self._gather_items(item_emb, item_ids)
        log_q = self._log_q()[item_ids] if self.loss.logq else None
        loss = sampled_softmax_loss(self(query), item_emb, log_q, self.loss.temperature, extra, extra_log_q,
                                    item_ids, first)
        self.log_train_loss(loss)
        return loss * share

    def _gather_items(self, item_emb: torch.Tensor,
                      item_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, float]:
        """Every rank's items of the global batch, in rank order (as one process's batch holds its
        workers' rows), so that each query meets the in-batch negatives it would meet in one process:
        (embeddings (N, D), with their gradients; ids (N,); the row of this rank's first item; this
        rank's share of the loss). The last batch of an epoch may give the ranks a row more or less;
        DDP averages the ranks' gradients equally, so a rank holding n of the N rows weighs its mean
        loss by W n / N to make that average the mean over the N rows."""
        rows = len(item_ids)
        sizes = self.all_gather(torch.tensor(rows, device=self.device)).tolist()  # (W,)
        pad = max(sizes) - rows  # all_gather takes tensors of one shape
        gathered = self.all_gather(F.pad(item_emb, (0, 0, 0, pad)), sync_grads=True)  # (W, max, D)
        ids = self.all_gather(F.pad(item_ids, (0, pad)))  # (W, max)
        item_emb = torch.cat([emb[:n] for emb, n in zip(gathered, sizes, strict=True)])
        item_ids = torch.cat([i[:n] for i, n in zip(ids, sizes, strict=True)])
        return item_emb, item_ids, sum(sizes[:self.global_rank]), len(sizes) * rows / sum(sizes)

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


def join_rows(first: Batch, second: Batch) -> Batch:
    """The rows of ``first``, then those of ``second`` (batches of the same features), as one batch
    without labels."""
    parts = first.sparse.to_dict(), second.sparse.to_dict()
    keys = first.sparse.keys()
    sparse = KeyedJaggedTensor(
        keys=keys,
        values=torch.cat([part[k].values() for k in keys for part in parts]),
        lengths=torch.cat([part[k].lengths() for k in keys for part in parts]),
    )
    return Batch(sparse, torch.cat([first.dense, second.dense]), None)


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
