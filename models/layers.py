"""Infrastructure every model shares: the MLP, the embedding tables and config checks."""

from collections.abc import Sequence

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, PoolingType

from data.schema import FeatureSpec

# Bags of several ids are averaged so that a long history does not outweigh a single id.
POOLING = {
    "categorical": PoolingType.SUM,
    "numerical": PoolingType.SUM,
    "multi_hot": PoolingType.MEAN,
    "sequence": PoolingType.MEAN,
}


class MLP(nn.Sequential):
    """Linear layers of ``layer_sizes`` widths, each followed by a ReLU (the last one only with
    ``final_activation``) and, while training, by dropout of rate ``dropout`` after each ReLU.
    (B, in_features) -> (B, layer_sizes[-1])."""

    def __init__(
        self, in_features: int, layer_sizes: Sequence[int], final_activation: bool = True, dropout: float = 0.0
    ) -> None:
        layers: list[nn.Module] = []
        for i, width in enumerate(layer_sizes):
            layers.append(nn.Linear(in_features, width))
            if i < len(layer_sizes) - 1 or final_activation:
                layers.append(nn.ReLU())
                if dropout:
                    layers.append(nn.Dropout(dropout))
            in_features = width
        super().__init__(*layers)


def embedding_configs(
    features: Sequence[FeatureSpec],
    embedding_dim: int | None = None,
    sources: Sequence[FeatureSpec] = (),
) -> list[EmbeddingBagConfig]:
    """One table per sparse feature, named after it; a sequence feature joins its source's table.

    ``embedding_dim`` replaces every feature's own dim when set. ``sources`` are features outside
    ``features`` whose table a sequence may read (the item id, for the query tower's history); the
    table is then named after the source so the model can tie it to the source's own table. A table
    that holds a sequence pools by mean, which for its source's single id per row equals the sum.
    """
    sparse = [f for f in features if f.sparse]
    if not sparse:
        raise ValueError(
            f"no sparse feature among {[f.name for f in features]}; expected at least one categorical, "
            "multi_hot, sequence or bucketed numerical feature"
        )
    known = {f.name: f for f in (*sources, *features)}
    tables: dict[str, EmbeddingBagConfig] = {}
    for f in sparse:
        if f.kind not in POOLING:
            raise ValueError(f"feature {f.name!r}: kind {f.kind!r} is not one of {tuple(POOLING)}")
        owner = f
        if f.kind == "sequence":
            if f.source not in known:
                raise ValueError(
                    f"sequence feature {f.name!r} reads the table of {f.source!r}, which is not among {sorted(known)}"
                )
            owner = known[f.source]
            if f.num_embeddings not in (None, owner.num_embeddings):
                raise ValueError(
                    f"sequence feature {f.name!r} has {f.num_embeddings} rows; expected its source "
                    f"{owner.name!r}'s {owner.num_embeddings}"
                )
        rows, dim = owner.num_embeddings, embedding_dim or owner.embedding_dim
        if rows is None or rows < 1 or dim is None or dim < 1:
            raise ValueError(
                f"sparse feature {owner.name!r} has num_embeddings={rows}, embedding_dim={dim}; "
                "expected both >= 1 (fit the encoders first)"
            )
        if owner.name not in tables:
            tables[owner.name] = EmbeddingBagConfig(
                name=owner.name, num_embeddings=rows, embedding_dim=dim, feature_names=[], pooling=POOLING[owner.kind]
            )
        tables[owner.name].feature_names.append(f.name)
        if POOLING[f.kind] == PoolingType.MEAN:
            tables[owner.name].pooling = PoolingType.MEAN
    return list(tables.values())


class SparseArch(nn.Module):
    """Pools each sparse feature from its table and stacks them: KJT -> (B, F, D).

    Every table must have the same dim D, since the models that stack them take dot products.
    """

    def __init__(self, tables: list[EmbeddingBagConfig]) -> None:
        super().__init__()
        dims = {name: t.embedding_dim for t in tables for name in t.feature_names}
        if len(set(dims.values())) != 1:
            raise ValueError(
                f"sparse features have embedding dims {dims}; expected one dim for all of them "
                "(set the model config's embedding_dim)"
            )
        self.ebc = EmbeddingBagCollection(tables)
        self.feature_names = list(dims)
        self.num_features = len(dims)
        self.embedding_dim = next(iter(dims.values()))

    def forward(self, sparse: KeyedJaggedTensor) -> torch.Tensor:
        pooled = self.ebc(sparse).to_dict()  # by name: a sharded collection returns its tables grouped by rank
        return torch.stack([pooled[name] for name in self.feature_names], dim=1)  # (B, F, D)


def check_config(
    config: object,
    nonempty: Sequence[str] = (),
    non_negative: Sequence[str] = (),
    positive: Sequence[str] = (),
    rates: Sequence[str] = (),
) -> None:
    """Raise ValueError naming the first field of ``config`` that is empty or out of range.

    Size fields may hold an int, a tuple of ints (layer widths) or None (not set); ``rates``
    (dropout) must lie in [0, 1).
    """
    owner = type(config).__name__
    for name in nonempty:
        if not getattr(config, name):
            raise ValueError(f"{owner}.{name} is empty; expected at least one FeatureSpec")
    for minimum, names in ((0, non_negative), (1, positive)):
        for name in names:
            value = getattr(config, name)
            values = value if isinstance(value, tuple | list) else (value,)
            if any(v is not None and v < minimum for v in values):
                raise ValueError(f"{owner}.{name} = {value!r}; expected values >= {minimum}")
    for name in rates:
        value = getattr(config, name)
        if not 0 <= value < 1:
            raise ValueError(f"{owner}.{name} = {value!r}; expected a rate in [0, 1)")
