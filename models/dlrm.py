"""DLRM (Naumov et al. 2019): embeddings of the sparse features and an MLP of the dense ones meet
in pairwise dot products (or a DCNv2 cross network, Wang et al. 2021), and an MLP turns that into a logit.

    dense  -> DenseArch  -> (B, D) --\
                                      InteractionArch -> OverArch -> logit (B,)
    sparse -> SparseArch -> (B, F, D) /
"""

from dataclasses import dataclass

import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from data.schema import FeatureSpec
from models.layers import MLP, SparseArch, check_config, embedding_configs

INTERACTIONS = ("dot", "dcn")


@dataclass(frozen=True)
class DLRMConfig:
    features: tuple[FeatureSpec, ...]
    dense_dim: int
    embedding_dim: int | None = None  # None: each feature's own dim, which must then be equal
    dense_sizes: tuple[int, ...] = (64,)  # DenseArch hidden widths; its last layer has width D
    over_sizes: tuple[int, ...] = (64, 32)  # OverArch hidden widths; its last layer has width 1
    interaction: str = "dot"
    dcn_layers: int = 2
    dcn_rank: int = 8
    dropout: float = 0.0  # after each ReLU of DenseArch and OverArch, while training

    def __post_init__(self) -> None:
        check_config(
            self,
            nonempty=("features",),
            positive=("dense_dim", "embedding_dim", "dense_sizes", "over_sizes", "dcn_layers", "dcn_rank"),
            rates=("dropout",),
        )
        if self.interaction not in INTERACTIONS:
            raise ValueError(f"DLRMConfig.interaction = {self.interaction!r}; expected one of {INTERACTIONS}")


class DenseArch(nn.Module):
    """(B, dense_dim) -> (B, D), the same D as the sparse embeddings so they can be dotted."""

    def __init__(self, dense_dim: int, hidden_sizes: tuple[int, ...], embedding_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.mlp = MLP(dense_dim, [*hidden_sizes, embedding_dim], dropout=dropout)

    def forward(self, dense: torch.Tensor) -> torch.Tensor:
        return self.mlp(dense)


class InteractionArch(nn.Module):
    """Dot products of every pair among the dense vector and the F embeddings, after the dense vector:
    (B, D), (B, F, D) -> (B, D + F(F+1)/2)."""

    def __init__(self, num_sparse_features: int, embedding_dim: int) -> None:
        super().__init__()
        pairs = torch.triu_indices(num_sparse_features + 1, num_sparse_features + 1, offset=1)  # (2, F(F+1)/2)
        self.register_buffer("pairs", pairs, persistent=False)
        self.out_features = embedding_dim + pairs.shape[1]

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        vectors = torch.cat([dense.unsqueeze(1), sparse], dim=1)  # (B, F+1, D)
        dots = torch.bmm(vectors, vectors.transpose(1, 2))  # (B, F+1, F+1)
        return torch.cat([dense, dots[:, self.pairs[0], self.pairs[1]]], dim=1)


class CrossLayer(nn.Module):
    """One DCNv2 layer, x0 * (U V x + b) + x, with the (N, N) cross matrix factorised as U V of rank r:
    (B, N), (B, N) -> (B, N)."""

    def __init__(self, width: int, rank: int) -> None:
        super().__init__()
        self.down = nn.Linear(width, rank, bias=False)  # V: (r, N)
        self.up = nn.Linear(rank, width)  # U: (N, r), and b

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x0 * self.up(self.down(x)) + x


class InteractionDCNArch(nn.Module):
    """Low-rank DCNv2 cross layers over the dense vector and the F embeddings, concatenated:
    (B, D), (B, F, D) -> (B, (F+1) D)."""

    def __init__(self, num_sparse_features: int, embedding_dim: int, num_layers: int, rank: int) -> None:
        super().__init__()
        self.out_features = (num_sparse_features + 1) * embedding_dim
        self.layers = nn.ModuleList(CrossLayer(self.out_features, rank) for _ in range(num_layers))

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        x0 = torch.cat([dense, sparse.flatten(1)], dim=1)  # (B, (F+1) D)
        x = x0
        for layer in self.layers:
            x = layer(x0, x)
        return x


class OverArch(nn.Module):
    """(B, in_features) -> logits (B,)."""

    def __init__(self, in_features: int, hidden_sizes: tuple[int, ...], dropout: float = 0.0) -> None:
        super().__init__()
        self.mlp = MLP(in_features, [*hidden_sizes, 1], final_activation=False, dropout=dropout)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp(features).squeeze(1)


class DLRM(nn.Module):
    """forward(dense (B, dense_dim), sparse KJT) -> logits (B,)."""

    def __init__(self, config: DLRMConfig) -> None:
        super().__init__()
        self.sparse_arch = SparseArch(embedding_configs(config.features, config.embedding_dim))
        num_sparse, dim = self.sparse_arch.num_features, self.sparse_arch.embedding_dim
        self.dense_arch = DenseArch(config.dense_dim, config.dense_sizes, dim, config.dropout)
        if config.interaction == "dcn":
            self.interaction_arch = InteractionDCNArch(num_sparse, dim, config.dcn_layers, config.dcn_rank)
        else:
            self.interaction_arch = InteractionArch(num_sparse, dim)
        self.over_arch = OverArch(self.interaction_arch.out_features, config.over_sizes, config.dropout)

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        embedded_dense = self.dense_arch(dense)  # (B, D)
        embedded_sparse = self.sparse_arch(sparse)  # (B, F, D)
        interactions = self.interaction_arch(embedded_dense, embedded_sparse)
        return self.over_arch(interactions)
