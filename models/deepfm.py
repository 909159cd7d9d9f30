"""DeepFM (Guo et al. 2017): a factorization machine and a deep MLP sharing one set of embeddings.

logit = first order (a weight per id and per dense column)
      + second order (dot products of every pair of feature embeddings)
      + deep (an MLP over all embeddings and the dense features)
"""

from dataclasses import dataclass

import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from data.schema import FeatureSpec
from models.layers import MLP, SparseArch, check_config, embedding_configs
from models.linear import LinearConfig, LinearModel


@dataclass(frozen=True)
class DeepFMConfig:
    features: tuple[FeatureSpec, ...]
    dense_dim: int = 0
    embedding_dim: int | None = None  # None: each feature's own dim, which must then be equal
    hidden_sizes: tuple[int, ...] = (64, 32)
    dropout: float = 0.0  # after each hidden layer of the deep part, while training

    def __post_init__(self) -> None:
        check_config(
            self,
            nonempty=("features",),
            non_negative=("dense_dim",),
            positive=("embedding_dim", "hidden_sizes"),
            rates=("dropout",),
        )


class FactorizationMachine(nn.Module):
    """Sum over feature pairs i < j of <v_i, v_j>: (B, F, D) -> (B,).

    Computed in O(F D) as half of (square of the sum - sum of the squares) (Rendle 2010).
    """

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        square_of_sum = embeddings.sum(dim=1).pow(2)  # (B, D)
        sum_of_squares = embeddings.pow(2).sum(dim=1)  # (B, D)
        return 0.5 * (square_of_sum - sum_of_squares).sum(dim=1)


class DeepFM(nn.Module):
    """forward(dense (B, dense_dim), sparse KJT) -> logits (B,)."""

    def __init__(self, config: DeepFMConfig) -> None:
        super().__init__()
        self.first_order = LinearModel(LinearConfig(config.features, config.dense_dim))
        self.sparse_arch = SparseArch(embedding_configs(config.features, config.embedding_dim))
        self.second_order = FactorizationMachine()
        deep_in = self.sparse_arch.num_features * self.sparse_arch.embedding_dim + config.dense_dim
        self.deep = MLP(deep_in, [*config.hidden_sizes, 1], final_activation=False, dropout=config.dropout)

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        embeddings = self.sparse_arch(sparse)  # (B, F, D)
        deep_logit = self.deep(torch.cat([embeddings.flatten(1), dense], dim=1)).squeeze(1)  # (B,)
        return self.first_order(dense, sparse) + self.second_order(embeddings) + deep_logit
