"""Logistic regression over the ranking features: the lightweight scorer and the fallback."""

from dataclasses import dataclass

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, KeyedJaggedTensor

from data.schema import FeatureSpec
from models.layers import check_config, embedding_configs


@dataclass(frozen=True)
class LinearConfig:
    features: tuple[FeatureSpec, ...]
    dense_dim: int = 0

    def __post_init__(self) -> None:
        check_config(self, nonempty=("features",), non_negative=("dense_dim",))


class LinearModel(nn.Module):
    """One learned weight per sparse id (a 1-dim embedding bag per feature) plus one per dense column.

    forward(dense (B, dense_dim), sparse KJT) -> logits (B,).
    """

    def __init__(self, config: LinearConfig) -> None:
        super().__init__()
        self.sparse_weights = EmbeddingBagCollection(embedding_configs(config.features, embedding_dim=1))
        # Started at zero: the loss is convex, so it needs no random start (and dense_dim may be 0).
        self.dense_weights = nn.Parameter(torch.zeros(config.dense_dim))
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        sparse_logit = self.sparse_weights(sparse).values().sum(dim=1)  # (B, F) -> (B,)
        return sparse_logit + dense @ self.dense_weights + self.bias
