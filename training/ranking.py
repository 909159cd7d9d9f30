"""Click-through ranking: a thin LightningModule around DeepFM, DLRM or the linear model.

It owns the loss (binary cross-entropy on logits), the optimizer and the metrics (AUC, log
loss, calibration from `evaluation.metrics`); `forward` is inference and returns
probabilities.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from data.encoders import Batch
from data.schema import FeatureSpec
from evaluation import metrics
from models.deepfm import DeepFM, DeepFMConfig
from models.dlrm import DLRM, DLRMConfig
from models.linear import LinearConfig, LinearModel
from training.lean_module import LeanModule
from training.optimizers import DENSE_ADAM, EmbeddingOptimizer, build_optimizer

RANKERS = {"deepfm": (DeepFM, DeepFMConfig), "dlrm": (DLRM, DLRMConfig), "linear": (LinearModel, LinearConfig)}


def build_ranker(name: str, features: list[FeatureSpec], dense_dim: int, options: dict) -> nn.Module:
    """A ranker over ``features`` (sparse ones embedded) and ``dense_dim`` dense columns;
    ``options`` are its config's other fields."""
    if name not in RANKERS:
        raise ValueError(f"ranker {name!r} is not one of {tuple(RANKERS)}")
    model, config = RANKERS[name]
    return model(config(tuple(f for f in features if f.sparse), dense_dim, **options))


class RankingModule(LeanModule):
    """Trains ``model`` (dense (B, n), KJT -> logits (B,)) on labelled batches; its embedding tables
    update by ``embedding_optimizer``, the rest by Adam(lr, weight_decay)."""

    def __init__(self, model: nn.Module, lr: float = 1e-3, weight_decay: float = 0.0,
                 embedding_optimizer: EmbeddingOptimizer = DENSE_ADAM) -> None:
        super().__init__()
        self.model = model
        self.lr = lr
        self.weight_decay = weight_decay
        self.embedding_optimizer = embedding_optimizer
        self._outputs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # probs, labels, rows

    def forward(self, batch: Batch) -> torch.Tensor:
        """Click probabilities (B,)."""
        return torch.sigmoid(self.model(batch.dense, batch.sparse))

    def training_loss(self, step: tuple) -> torch.Tensor:
        batch = step[0]
        loss = F.binary_cross_entropy_with_logits(self.model(batch.dense, batch.sparse), batch.labels)
        self.log_train_loss(loss)
        return loss

    def validation_step(self, step: tuple, _: int) -> None:
        batch, rows = step
        self._outputs.append((self(batch).float(), batch.labels, rows))

    test_step = validation_step

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")

    def _log_metrics(self, prefix: str) -> None:
        """AUC is not a mean over batches: every rank's predictions are gathered first. The
        distributed sampler repeats a few rows to give each rank as many; each row counts once."""
        probs, labels, rows = (torch.cat(parts) for parts in zip(*self._outputs, strict=True))
        self._outputs.clear()
        if self.trainer.world_size > 1:
            probs, labels, rows = (self.all_gather(t).flatten() for t in (probs, labels, rows))
            _, first = np.unique(rows.cpu().numpy(), return_index=True)
            probs, labels = probs[first], labels[first]
        values = {
            "auc": metrics.auc(labels, probs),
            "logloss": metrics.log_loss(labels, probs),
            "calibration": metrics.calibration(labels, probs),
        }
        self.log_dict({f"{prefix}_{k}": v for k, v in values.items()}, prog_bar=prefix == "val")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return build_optimizer(self.model, self.lr, self.weight_decay, self.embedding_optimizer)
