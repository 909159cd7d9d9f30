"""Feature encoders: raw feature columns -> embedding ids and dense floats for a model.

`FeatureEncoder.fit` learns one small encoder per schema feature from the training rows;
`encode` turns a joined frame (see `join_features`), or the same rows as `FeatureColumns`
(aligned arrays, which the request path builds without a frame), into a `Batch`:

    categorical                 vocabulary: ids 1..V, most frequent in train first, 0 = OOV
    categorical + hash_buckets  stable hash of the value as a string, modulo hash_buckets
    numerical                   a dense column standardised with train mean/std (missing -> 0);
                                with ``buckets`` also a quantile bucket id (0 = missing, 1..B)
    multi_hot                   list cells: each token through a vocabulary (or a hash)
    sequence                    list cells of raw ids, oldest first: the last max_len through
                                the source feature's encoder, sharing its embedding table

`recent_items` builds the sequence column of an interactions table.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from data.columns import FeatureColumns
from data.schema import Schema, default_embedding_dim
from data.tables import KEYS


@dataclass(frozen=True)
class Batch:
    """B encoded examples.

    ``sparse`` has one key per sparse feature (values int64, lengths int32, key-major),
    ``dense`` is (B, n_dense) float32 and ``labels`` is (B,) float32, or None when the frame
    has no label column.
    """

    sparse: KeyedJaggedTensor
    dense: torch.Tensor
    labels: torch.Tensor | None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """The batch on ``device``; Lightning moves batches with this method."""
        labels = None if self.labels is None else self.labels.to(device, non_blocking=non_blocking)
        return Batch(
            self.sparse.to(device, non_blocking=non_blocking),
            self.dense.to(device, non_blocking=non_blocking),
            labels,
        )

    def __len__(self) -> int:
        return self.dense.shape[0]


class CategoricalEncoder:
    """Vocabulary lookup: known values -> 1..V (descending train count, then value), others -> 0."""

    def __init__(self, vocab: pd.Index) -> None:
        self.vocab = vocab

    @property
    def vocab_size(self) -> int:
        """Embedding rows, the OOV row included."""
        return len(self.vocab) + 1

    @classmethod
    def fit(cls, values: pd.Series | np.ndarray) -> CategoricalEncoder:
        counts = pd.Series(values).value_counts()  # drops missing values
        order = np.lexsort((counts.index.to_numpy(), -counts.to_numpy()))  # count desc, value
        return cls(counts.index[order])

    def transform(self, values: pd.Series | np.ndarray) -> np.ndarray:
        """(N,) raw values -> (N,) int64 ids."""
        return self.vocab.get_indexer(values).astype(np.int64) + 1

    def to_dict(self) -> dict:
        return {"type": "categorical", "vocab": self.vocab.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> CategoricalEncoder:
        return cls(pd.Index(d["vocab"]))


class HashEncoder:
    """Hashes str(value) with pandas' fixed-key SipHash, so 7 and "7" share a bucket on any
    machine; there is no OOV row."""

    vocab_size = None

    def __init__(self, buckets: int) -> None:
        self.buckets = buckets

    def transform(self, values: pd.Series | np.ndarray) -> np.ndarray:
        """(N,) raw values -> (N,) int64 ids in [0, buckets)."""
        strings = np.asarray(values).astype(str).astype(object)
        return (pd.util.hash_array(strings) % np.uint64(self.buckets)).astype(np.int64)

    def to_dict(self) -> dict:
        return {"type": "hash", "buckets": self.buckets}

    @classmethod
    def from_dict(cls, d: dict) -> HashEncoder:
        return cls(d["buckets"])


class NumericEncoder:
    """Train mean/std standardisation and, with quantile ``boundaries``, bucket ids."""

    vocab_size = None

    def __init__(self, mean: float, std: float, boundaries: np.ndarray | None) -> None:
        self.mean = mean
        self.std = std
        self.boundaries = boundaries

    @classmethod
    def fit(cls, values: pd.Series, buckets: int | None) -> NumericEncoder:
        x = _floats(values)
        x = x[~np.isnan(x)]
        mean = float(x.mean()) if len(x) else 0.0
        std = float(x.std()) if len(x) else 0.0
        boundaries = None
        if buckets:
            # B - 1 inner boundaries make B buckets of about equal train mass
            q = np.arange(1, buckets) / buckets
            boundaries = np.quantile(x, q) if len(x) else np.zeros(len(q))
        return cls(mean, std if std > 0 else 1.0, boundaries)

    def standardise(self, values: pd.Series) -> np.ndarray:
        """(N,) numbers -> (N,) float32, missing -> 0 (the train mean)."""
        x = _floats(values)
        return np.where(np.isnan(x), 0.0, (x - self.mean) / self.std).astype(np.float32)

    def bucketise(self, values: pd.Series) -> np.ndarray:
        """(N,) numbers -> (N,) int64 bucket ids 1..B, missing -> 0."""
        x = _floats(values)
        ids = np.searchsorted(self.boundaries, x, side="right") + 1
        return np.where(np.isnan(x), 0, ids).astype(np.int64)

    def to_dict(self) -> dict:
        boundaries = None if self.boundaries is None else self.boundaries.tolist()
        return {"type": "numerical", "mean": self.mean, "std": self.std, "boundaries": boundaries}

    @classmethod
    def from_dict(cls, d: dict) -> NumericEncoder:
        boundaries = None if d["boundaries"] is None else np.array(d["boundaries"], dtype=np.float64)
        return cls(d["mean"], d["std"], boundaries)


class MultiHotEncoder:
    """List cells -> token ids through ``tokens``, keeping each cell's last ``max_len``."""

    def __init__(self, tokens: CategoricalEncoder | HashEncoder, max_len: int | None = None) -> None:
        self.tokens = tokens
        self.max_len = max_len

    @property
    def vocab_size(self) -> int | None:
        return self.tokens.vocab_size

    @classmethod
    def fit(cls, cells: pd.Series, hash_buckets: int | None, max_len: int | None) -> MultiHotEncoder:
        if hash_buckets:
            return cls(HashEncoder(hash_buckets), max_len)
        return cls(CategoricalEncoder.fit(_flatten(cells)[0]), max_len)

    def transform(self, cells: pd.Series) -> tuple[np.ndarray, np.ndarray]:
        """B list cells -> (N,) int64 ids and (B,) int32 lengths; a missing cell is empty."""
        tokens, lengths = _flatten(cells, self.max_len)
        return self.tokens.transform(tokens), lengths

    def to_dict(self) -> dict:
        return {"type": "multi_hot", "tokens": self.tokens.to_dict(), "max_len": self.max_len}

    @classmethod
    def from_dict(cls, d: dict) -> MultiHotEncoder:
        return cls(_encoder_from_dict(d["tokens"]), d["max_len"])


_ENCODERS = {
    "categorical": CategoricalEncoder,
    "hash": HashEncoder,
    "numerical": NumericEncoder,
    "multi_hot": MultiHotEncoder,
}


Encoder = CategoricalEncoder | HashEncoder | NumericEncoder | MultiHotEncoder


def _encoder_from_dict(d: dict) -> Encoder:
    return _ENCODERS[d["type"]].from_dict(d)


class FeatureEncoder:
    """Every feature's encoder for one schema; fitted on train, saved beside a model."""

    def __init__(self, schema: Schema, encoders: dict[str, Encoder]) -> None:
        """``schema`` is fitted; ``encoders`` maps each non-sequence feature to its encoder."""
        self._schema = schema
        self._encoders = dict(encoders)
        for f in schema.features:
            if f.kind == "sequence":
                self._encoders[f.name] = MultiHotEncoder(encoders[f.source], f.max_len)

    @classmethod
    def fit(
        cls, schema: Schema, train: pd.DataFrame, users: pd.DataFrame, items: pd.DataFrame
    ) -> FeatureEncoder:
        """Fits each feature on the rows of its table that ``train`` touches.

        Interaction features see ``train``; user (item) features see the users (items) whose
        id occurs in ``train``. Sequences are not fitted: they use their source's encoder.
        """
        return cls.fit_tables(schema, {
            "interactions": train,
            "users": users[users[KEYS["users"]].isin(train[KEYS["users"]])],
            "items": items[items[KEYS["items"]].isin(train[KEYS["items"]])],
        })

    @classmethod
    def fit_tables(cls, schema: Schema, tables: dict[str, pd.DataFrame]) -> FeatureEncoder:
        """Fits each feature on its table in ``tables`` (interactions, users, items): the train
        rows and the users and items they touch, as `fit` picks them."""
        _check_config(schema)
        encoders = {}
        for f in schema.features:
            if f.kind == "sequence":
                continue
            table = tables[f.table]
            if f.name not in table.columns:
                raise ValueError(
                    f"feature {f.name!r}: no column {f.name!r} in the {f.table} table; "
                    f"it has {list(table.columns)}"
                )
            values = table[f.name]
            if f.kind == "numerical":
                encoders[f.name] = NumericEncoder.fit(values, f.buckets)
            elif f.kind == "multi_hot":
                encoders[f.name] = MultiHotEncoder.fit(values, f.hash_buckets, f.max_len)
            elif f.hash_buckets:
                encoders[f.name] = HashEncoder(f.hash_buckets)
            else:
                encoders[f.name] = CategoricalEncoder.fit(values)
        return cls(_fitted_schema(schema, encoders), encoders)

    @property
    def schema(self) -> Schema:
        """The input schema with vocab_size and embedding_dim filled in."""
        return self._schema

    def save(self, path: Path) -> None:
        encoders = {
            f.name: self._encoders[f.name].to_dict()
            for f in self._schema.features
            if f.kind != "sequence"
        }
        Path(path).write_text(json.dumps({"schema": self._schema.to_dict(), "encoders": encoders}))

    @classmethod
    def load(cls, path: Path) -> FeatureEncoder:
        d = json.loads(Path(path).read_text())
        encoders = {n: _encoder_from_dict(e) for n, e in d["encoders"].items()}
        return cls(Schema.from_dict(d["schema"]), encoders)

    def encode(self, frame: pd.DataFrame | FeatureColumns, names: list[str] | None = None) -> Batch:
        """A joined frame of B rows (sequences as lists), or its `FeatureColumns`, -> a `Batch` of
        the features ``names`` (default: all), keyed and ordered as in the schema."""
        wanted = self._schema.names if names is None else names
        unknown = sorted(set(wanted) - set(self._schema.names))
        if unknown:
            raise ValueError(f"features {unknown} are not in schema {self._schema.name!r}; it has {self._schema.names}")
        features = [f for f in self._schema.features if f.name in wanted]
        missing = [f.name for f in features if f.name not in frame]
        if missing:
            raise ValueError(f"frame lacks feature columns {missing}; it has {list(frame)}")
        n_rows = len(frame)
        ids, lengths, dense = [], [], []
        for f in features:
            encoder, column = self._encoders[f.name], frame[f.name]
            if f.kind == "numerical":
                dense.append(encoder.standardise(column))
            if not f.sparse:
                continue
            if isinstance(encoder, MultiHotEncoder):
                values, counts = encoder.transform(column)
            else:
                values = encoder.bucketise(column) if f.kind == "numerical" else encoder.transform(column)
                counts = np.ones(n_rows, dtype=np.int32)
            ids.append(values)
            lengths.append(counts)
        sparse = KeyedJaggedTensor(
            keys=[f.name for f in features if f.sparse],
            values=torch.from_numpy(np.concatenate(ids) if ids else np.zeros(0, np.int64)),
            lengths=torch.from_numpy(np.concatenate(lengths) if lengths else np.zeros(0, np.int32)),
            stride=n_rows,
        )
        dense_array = np.stack(dense, axis=1) if dense else np.zeros((n_rows, 0), np.float32)
        labels = None
        if self._schema.label in frame:
            labels = torch.from_numpy(np.asarray(frame[self._schema.label], np.float32))
        return Batch(sparse, torch.from_numpy(dense_array), labels)  # dense (B, n_dense)


def join_features(interactions: pd.DataFrame, users: pd.DataFrame, items: pd.DataFrame) -> pd.DataFrame:
    """Interaction rows with their user's and item's columns, by left joins.

    The result has the rows, order and index of ``interactions``; a user or item missing
    from its table gets missing features, which encode as OOV ids or missing numbers.
    """
    seen = set(interactions.columns)
    for name, table in (("users", users), ("items", items)):
        clash = sorted((seen & set(table.columns)) - {KEYS[name]})
        if clash:
            raise ValueError(f"{name} table repeats columns {clash} of the tables joined before it")
        seen |= set(table.columns)
    out = interactions.merge(users, on=KEYS["users"], how="left", validate="many_to_one")
    out = out.merge(items, on=KEYS["items"], how="left", validate="many_to_one")
    out.index = interactions.index
    return out


def recent_items(interactions: pd.DataFrame, max_len: int) -> pd.Series:
    """Per interaction row, the item_ids its user interacted with before it: oldest first,
    the most recent ``max_len``, aligned with ``interactions.index``.

    Before means an earlier timestamp. Rows of the same user at the same timestamp are not
    in each other's history (their order in a file is usually arbitrary, and using it would
    leak); within a history, equal timestamps keep row order.
    """
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    users = pd.factorize(interactions["user_id"])[0]
    times = interactions["timestamp"].to_numpy()
    order = np.lexsort((times, users))  # by user, then time; stable, so ties keep row order
    users, times = users[order], times[order]
    items = interactions["item_id"].to_numpy()[order]
    position = np.arange(len(order))
    new_user = np.diff(users, prepend=-1) != 0
    new_time = new_user | (np.diff(times, prepend=times[:1]) != 0)
    user_start = np.maximum.accumulate(np.where(new_user, position, 0))
    end = np.maximum.accumulate(np.where(new_time, position, 0))  # first row at this time
    start = np.maximum(user_start, end - max_len)
    # back to input order; each history is a slice of the sorted items
    starts, ends = np.empty_like(start), np.empty_like(end)
    starts[order], ends[order] = start, end
    histories = [items[s:e].tolist() for s, e in zip(starts, ends, strict=True)]
    return pd.Series(histories, index=interactions.index, dtype=object)


def _check_config(schema: Schema) -> None:
    for f in schema.features:
        if f.hash_buckets and f.kind == "numerical":
            raise ValueError(
                f"feature {f.name!r}: hash_buckets={f.hash_buckets} set on a numerical feature; "
                "hashing applies to categorical and multi_hot features"
            )
        if f.buckets is not None and (f.kind != "numerical" or f.buckets < 1):
            raise ValueError(
                f"feature {f.name!r}: buckets={f.buckets} on a {f.kind} feature; "
                "expected buckets >= 1 on a numerical feature"
            )
        if f.kind == "sequence" and schema.feature(f.source).kind != "categorical":
            raise ValueError(
                f"sequence feature {f.name!r}: source {f.source!r} is a "
                f"{schema.feature(f.source).kind} feature; expected a categorical id feature"
            )


def _fitted_schema(schema: Schema, encoders: dict[str, Encoder]) -> Schema:
    """Fills vocab_size and embedding_dim; a sequence copies its source's table settings."""
    fitted = {}
    for f in schema.features:
        if f.kind != "sequence":
            f = replace(f, vocab_size=encoders[f.name].vocab_size)
            if f.sparse and f.embedding_dim is None:
                f = replace(f, embedding_dim=default_embedding_dim(f.num_embeddings))
            fitted[f.name] = f
    for f in schema.features:
        if f.kind == "sequence":
            source = fitted[f.source]
            fitted[f.name] = replace(
                f,
                vocab_size=source.vocab_size,
                hash_buckets=source.hash_buckets,
                embedding_dim=source.embedding_dim,
            )
    return schema.with_features([fitted[n] for n in schema.names])


def _floats(values: pd.Series | np.ndarray) -> np.ndarray:
    if isinstance(values, np.ndarray) and values.dtype.kind in "fiub":  # no missing value but NaN
        return values.astype(np.float64)
    return pd.Series(values).to_numpy(dtype=np.float64, na_value=np.nan)


def _flatten(cells: pd.Series, max_len: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """B list cells -> (N,) tokens and (B,) int32 lengths, keeping each cell's last max_len."""
    cells = [c if isinstance(c, list | tuple | np.ndarray) else () for c in cells]
    lengths = np.fromiter(map(len, cells), np.int64, len(cells))
    # empty cells are skipped: np.asarray(()) is float64 and would turn int tokens into floats
    parts = [np.asarray(c) for c in cells if len(c)]
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=object)
    if max_len is not None:
        ends = np.cumsum(lengths)
        from_end = np.repeat(ends, lengths) - np.arange(ends[-1] if len(ends) else 0)  # 1 = last
        tokens = tokens[from_end <= max_len]
        lengths = np.minimum(lengths, max_len)
    return tokens, lengths.astype(np.int32)
