"""The two-tower retrieval model: a query tower and an item tower map into one space of unit vectors,
and a query's score for an item is their dot product (the cosine).

The query tower embeds the user id, user features, the recent items (the mean of their rows in
the item tower's id table, so history and candidates live in one space) and the request context.
The item tower embeds the item id and item features; an item id the vocabulary does not know
(row 0; hashed ids have no such row) contributes nothing, so a new item is placed by its features
alone. Each tower is exported on its own: the query tower for serving, the item tower for the
offline item embeddings.

Training uses ``sampled_softmax_loss`` below: in-batch negatives with the logQ correction of
Yi et al. 2019 and, optionally, mixed uniform negatives (Yang et al. 2020).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor

from data.schema import FeatureSpec
from models.layers import MLP, check_config, embedding_configs


@dataclass(frozen=True)
class TwoTowerConfig:
    """Each tower's dense tensor holds the numerical features of its own feature list."""

    query_features: tuple[FeatureSpec, ...]
    item_features: tuple[FeatureSpec, ...]
    item_id: str = "item_id"  # the item feature holding the id, one per row
    query_dense_dim: int = 0
    item_dense_dim: int = 0
    hidden_sizes: tuple[int, ...] = (128, 64)
    output_dim: int = 32
    embedding_dim: int | None = None  # None: each feature's own dim; else every table's

    def __post_init__(self) -> None:
        check_config(
            self,
            nonempty=("query_features", "item_features"),
            non_negative=("query_dense_dim", "item_dense_dim"),
            positive=("hidden_sizes", "output_dim", "embedding_dim"),
        )
        ids = sorted(f.name for f in self.item_features if f.kind == "categorical")
        if self.item_id not in ids:
            raise ValueError(
                f"TwoTowerConfig.item_id = {self.item_id!r}; expected a categorical item feature, one of {ids}"
            )
        both = sorted({f.name for f in self.item_features} & {f.name for f in self.query_features})
        if both:
            raise ValueError(f"features {both} are in both towers; expected each feature in one tower")


def pooled_dim(tables: list[EmbeddingBagConfig]) -> int:
    """Width of the pooled embeddings of all features, concatenated."""
    return sum(t.embedding_dim * len(t.feature_names) for t in tables)


class QueryTower(nn.Module):
    """forward(dense (B, query_dense_dim), sparse KJT) -> query embeddings (B, output_dim), unit length."""

    def __init__(self, config: TwoTowerConfig) -> None:
        super().__init__()
        tables = embedding_configs(config.query_features, config.embedding_dim, sources=config.item_features)
        self.ebc = EmbeddingBagCollection(tables)
        self.feature_names = [name for t in tables for name in t.feature_names]
        widths = [*config.hidden_sizes, config.output_dim]
        self.mlp = MLP(pooled_dim(tables) + config.query_dense_dim, widths, final_activation=False)

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        pooled = self.ebc(sparse).to_dict()  # by name: a sharded collection returns its tables grouped by rank
        features = [pooled[name] for name in self.feature_names] + [dense]  # (B, sum of feature dims + dense)
        return F.normalize(self.mlp(torch.cat(features, dim=1)), dim=1)


class ItemTower(nn.Module):
    """forward(dense (B, item_dense_dim), sparse KJT with one id per row) -> item embeddings
    (B, output_dim), unit length."""

    def __init__(self, config: TwoTowerConfig) -> None:
        super().__init__()
        tables = embedding_configs(config.item_features, config.embedding_dim)
        self.ebc = EmbeddingBagCollection(tables)
        self.item_id = config.item_id
        id_spec = next(f for f in config.item_features if f.name == config.item_id)
        # Hashed ids have no out-of-vocabulary row (every bucket is an item), and no id is -1.
        self.unknown_id = 0 if id_spec.hash_buckets is None else -1
        self.other_features = [name for t in tables for name in t.feature_names if name != config.item_id]
        widths = [*config.hidden_sizes, config.output_dim]
        self.mlp = MLP(pooled_dim(tables) + config.item_dense_dim, widths, final_activation=False)

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        pooled = self.ebc(sparse).to_dict()
        known = (sparse[self.item_id].values() != self.unknown_id).unsqueeze(1)  # (B, 1)
        features = [pooled[self.item_id] * known] + [pooled[name] for name in self.other_features] + [dense]
        return F.normalize(self.mlp(torch.cat(features, dim=1)), dim=1)


class TwoTower(nn.Module):
    """forward(query_dense (B, query_dense_dim), item_dense (B, item_dense_dim), sparse KJT holding the
    features of both towers) -> scores (B,) of each query row with the item in the same row."""

    def __init__(self, config: TwoTowerConfig) -> None:
        super().__init__()
        self.query_tower = QueryTower(config)
        self.item_tower = ItemTower(config)
        # A sequence of item ids in the query tower reads the item tower's id table: one tensor, two holders.
        item_bags = self.item_tower.ebc.embedding_bags
        for name, bag in self.query_tower.ebc.embedding_bags.items():
            if name in item_bags:
                bag.weight = item_bags[name].weight

    def score(self, query_emb: torch.Tensor, item_emb: torch.Tensor) -> torch.Tensor:
        """Cosine of aligned rows: (B, D), (B, D) -> (B,). The towers' outputs are already unit length."""
        return (query_emb * item_emb).sum(dim=1)

    def forward(self, query_dense: torch.Tensor, item_dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        return self.score(self.query_tower(query_dense, sparse), self.item_tower(item_dense, sparse))


def sampled_softmax_loss(
    query_emb: torch.Tensor,
    item_emb: torch.Tensor,
    item_log_q: torch.Tensor | None,
    temperature: float,
    extra_negatives: torch.Tensor | None = None,
    extra_log_q: torch.Tensor | None = None,
    item_ids: torch.Tensor | None = None,
    first: int = 0,
) -> torch.Tensor:
    """Softmax cross-entropy of each query (B, D) over its own item and every other candidate -> scalar.

    The candidates are the batch's items (N, D), query row i's own item being row ``first + i``
    (N is B, or more where the queries are one rank's share of a batch whose items every rank
    gathered), and, optionally, ``extra_negatives`` (E, D) drawn uniformly from the corpus (mixed
    negative sampling, Yang et al. 2020). A candidate sampled with probability q has log q
    (``item_log_q`` (N,), ``extra_log_q`` (E,)) subtracted from its logit, so that popular items are
    not over-penalised for showing up as negatives often (Yi et al. 2019). With ``item_ids`` (N,),
    an item that is also another row's positive is not that row's negative. Extra negatives are not
    checked for hits.
    """
    if temperature <= 0:
        raise ValueError(f"temperature = {temperature}; expected > 0")
    batch = query_emb.shape[0]
    if query_emb.shape[1:] != item_emb.shape[1:] or not 0 <= first <= item_emb.shape[0] - batch:
        raise ValueError(f"query_emb {tuple(query_emb.shape)} and item_emb {tuple(item_emb.shape)} with first = "
                         f"{first}; expected one dim and the queries' items at rows first .. first + B - 1")
    if extra_negatives is not None and (item_log_q is None) != (extra_log_q is None):
        raise ValueError(
            "item_log_q and extra_log_q: expected both or neither, since correcting one kind of negative "
            "and not the other skews the softmax"
        )
    positives = torch.arange(first, first + batch, device=query_emb.device)  # (B,)
    logits = query_emb @ item_emb.T / temperature  # (B, N); row i's positive is column first + i
    if item_log_q is not None:
        logits = logits - item_log_q
    if item_ids is not None:
        same_item = item_ids[positives, None] == item_ids[None, :]  # (B, N)
        same_item[torch.arange(batch), positives] = False
        logits = logits.masked_fill(same_item, float("-inf"))
    if extra_negatives is not None:
        extra = query_emb @ extra_negatives.T / temperature  # (B, E)
        if extra_log_q is not None:
            extra = extra - extra_log_q
        logits = torch.cat([logits, extra], dim=1)  # (B, N + E)
    return F.cross_entropy(logits, positives)
