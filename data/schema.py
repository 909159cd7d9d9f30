"""The feature schema stored as `schema.json` in every canonical dataset.

Each feature names the table that holds its column, its kind, and how it becomes an
embedding row: a vocabulary (``vocab_size`` rows, row 0 is out-of-vocabulary) or hashing
(``hash_buckets`` rows). Numerical features feed the dense tensor; with ``buckets`` set
they also get a bucket id for an embedding.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

KINDS = ("categorical", "numerical", "multi_hot", "sequence")
TABLES = ("interactions", "users", "items")


def default_embedding_dim(cardinality: int) -> int:
    """6 x cardinality^(1/4), clipped to [4, 64] (the rule used by DCN, Wang et al. 2017)."""
    return int(min(64, max(4, round(6 * max(cardinality, 1) ** 0.25))))


@dataclass(frozen=True)
class FeatureSpec:
    """One model input. ``source`` names the id feature a sequence shares its vocabulary with."""

    name: str
    table: str
    kind: str
    vocab_size: int | None = None
    hash_buckets: int | None = None
    embedding_dim: int | None = None
    buckets: int | None = None
    max_len: int | None = None
    source: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"feature {self.name!r}: kind {self.kind!r} is not one of {KINDS}")
        if self.table not in TABLES:
            raise ValueError(f"feature {self.name!r}: table {self.table!r} is not one of {TABLES}")
        if self.kind == "sequence" and (self.source is None or not self.max_len):
            raise ValueError(f"sequence feature {self.name!r} needs a source id feature and max_len")
        if self.hash_buckets is not None and self.hash_buckets < 1:
            raise ValueError(f"feature {self.name!r}: hash_buckets must be >= 1, got {self.hash_buckets}")

    @property
    def sparse(self) -> bool:
        """True when the feature is looked up in an embedding table."""
        return self.kind != "numerical" or bool(self.buckets)

    @property
    def num_embeddings(self) -> int | None:
        """Rows of its embedding table, once fitted; a bucket id of 0 means a missing number."""
        if self.kind == "numerical":
            return self.buckets + 1 if self.buckets else None
        return self.hash_buckets or self.vocab_size


@dataclass(frozen=True)
class Schema:
    """Everything downstream needs to know about a dataset's columns."""

    name: str
    features: tuple[FeatureSpec, ...]
    label: str = "label"
    split: dict = field(default_factory=dict)
    source: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = [f.name for f in self.features]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"schema {self.name!r}: duplicate feature names {duplicated}")
        for f in self.features:
            if f.source is not None and f.source not in names:
                raise ValueError(f"feature {f.name!r}: source {f.source!r} is not a feature")

    def feature(self, name: str) -> FeatureSpec:
        for f in self.features:
            if f.name == name:
                return f
        raise KeyError(f"schema {self.name!r} has no feature {name!r}; it has {self.names}")

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.features]

    def with_features(self, features: list[FeatureSpec]) -> Schema:
        return replace(self, features=tuple(features))

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "label": self.label,
            "split": self.split,
            "source": self.source,
            "features": [{k: v for k, v in asdict(f).items() if v is not None} for f in self.features],
        }

    @classmethod
    def from_dict(cls, d: dict) -> Schema:
        return cls(
            name=d["name"],
            features=tuple(FeatureSpec(**f) for f in d["features"]),
            label=d.get("label", "label"),
            split=d.get("split", {}),
            source=d.get("source", {}),
        )

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> Schema:
        return cls.from_dict(json.loads(Path(path).read_text()))
