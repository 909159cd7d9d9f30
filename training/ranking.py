"""Click-through ranking: a thin LightningModule around DeepFM, DLRM or the linear model.

It owns the loss (binary cross-entropy on logits), the optimizer and the metrics (AUC, log
loss, calibration from `evaluation.metrics`); `forward` is inference and returns
probabilities.
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from data.encoders import Batch
from data.schema import FeatureSpec
from evaluation import metrics
from models.deepfm import DeepFM, DeepFMConfig
from models.dlrm import DLRM, DLRMConfig
from models.linear import LinearConfig, LinearModel

RANKERS = ("deepfm", "dlrm", "linear")


def build_ranker(name: str, features: list[FeatureSpec], dense_dim: int, options: dict) -> nn.Module:
    """A ranker over ``features`` (sparse ones embedded) and ``dense_dim`` dense columns."""
    features = tuple(f for f in features if f.sparse)
    if name == "deepfm":
        return DeepFM(DeepFMConfig(features, dense_dim, **options))
    if name == "dlrm":
        return DLRM(DLRMConfig(features, dense_dim, **options))
    if name == "linear":
        return LinearModel(LinearConfig(features, dense_dim, **options))
    raise ValueError(f"ranker {name!r} is not one of {RANKERS}")


class RankingModule(L.LightningModule):
    """Trains ``model`` (dense (B, n), KJT -> logits (B,)) on labelled batches."""

    def __init__(self, model: nn.Module, lr: float = 1e-3, weight_decay: float = 0.0) -> None:
        super().__init__()
        self.model = model
        self.lr = lr
        self.weight_decay = weight_decay
        self._outputs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, batch: Batch) -> torch.Tensor:
        """Click probabilities (B,)."""
        return torch.sigmoid(self.model(batch.dense, batch.sparse))

    def training_step(self, step: tuple, _: int) -> torch.Tensor:
        batch = step[0]
        loss = F.binary_cross_entropy_with_logits(self.model(batch.dense, batch.sparse), batch.labels)
        self.log("train_loss", loss, batch_size=len(batch), prog_bar=True)
        return loss

    def validation_step(self, step: tuple, _: int) -> None:
        self._outputs.append((self(step[0]).float(), step[0].labels))

    test_step = validation_step

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")

    def _log_metrics(self, prefix: str) -> None:
        """AUC is not a mean over batches: every rank's predictions are gathered first."""
        probs = torch.cat([p for p, _ in self._outputs])
        labels = torch.cat([y for _, y in self._outputs])
        self._outputs.clear()
        if self.trainer.world_size > 1:
            probs, labels = self.all_gather(probs).flatten(), self.all_gather(labels).flatten()
        values = {
            "auc": metrics.auc(labels, probs),
            "logloss": metrics.log_loss(labels, probs),
            "calibration": metrics.calibration(labels, probs),
        }
        self.log_dict({f"{prefix}_{k}": v for k, v in values.items()}, prog_bar=prefix == "val")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
