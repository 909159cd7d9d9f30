"""DataModules over a canonical dataset directory. Training batches stream from the dataset's
encoded parts (`data.encoded.BatchStream`); what is not a split part's rows (the item corpus,
the per-user evaluation queries) is encoded batch by batch with the dataset's fitted
`FeatureEncoder`, the same code that encodes online requests.

- `RankingDataModule`: labelled interaction rows of each split part.
- `RetrievalDataModule`: the train part's positive rows as (query, item) batches, and one
  evaluation query per user for full-corpus ranking on valid and test.

Recent-item sequences come from train rows only, so no valid or test item leaks into a
query, whatever the split.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from data.dataset import read_dataset, read_part
from data.encoded import ENCODED, POSITIVES, BatchStream, EncodedPart, StreamConfig, with_sequences
from data.encoders import Batch, FeatureEncoder, join_features
from data.schema import FeatureSpec


class EncodedRows(Dataset):
    """Rows of a joined frame, encoded a whole batch at a time (``__getitems__``).

    Each item is a tuple: one `Batch` per feature group in ``groups``, then the row positions (B,).
    """

    def __init__(self, frame: pd.DataFrame, encoder: FeatureEncoder, groups: list[list[str]]) -> None:
        self.frame = frame.reset_index(drop=True)
        self.encoder = encoder
        self.groups = groups

    def __len__(self) -> int:
        return len(self.frame)

    def __getitems__(self, rows: list[int]) -> tuple:
        chunk = self.frame.iloc[rows]
        return (*(self.encoder.encode(chunk, names) for names in self.groups), torch.as_tensor(rows))

    def __getitem__(self, row: int) -> tuple:
        return self.__getitems__([row])


def as_is(batch):
    return batch


class _EncodedDataModule(L.LightningDataModule):
    """Loads the encoder; train batches stream in an order drawn from (seed, epoch), so that a
    resumed run sees the same order as an uninterrupted one, on one device or several.

    ``batch_size`` is the global batch over all devices; ``num_workers`` DataLoader workers per
    device each read a share of the rows.
    """

    def __init__(self, data_dir: Path, batch_size: int = 1024, seed: int = 0, eval_batch_size: int = 4096,
                 num_workers: int = 0) -> None:
        super().__init__()
        self.data_dir = Path(data_dir)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.encoder = FeatureEncoder.load(self.data_dir / "encoders.json")
        self.schema = self.encoder.schema

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def _stream(self, part: str, groups: list[list[str]], train: bool) -> BatchStream:
        world, rank = self._world()
        if train:
            workers = self.num_workers
            config = StreamConfig(self.batch_size, world * max(workers, 1), seed=self.seed)
        else:  # each rank reads its own contiguous share in order, as many rows as the others
            workers = 0
            config = StreamConfig(self.eval_batch_size * world, world, shuffle=False, even=True)
        return BatchStream(EncodedPart(self.data_dir / ENCODED / part), self.schema, groups, config,
                           epoch=lambda: self.trainer.current_epoch if self.trainer is not None else 0,
                           rank=rank, workers=workers)

    def _loader(self, rows: EncodedRows) -> DataLoader:
        world, rank = self._world()
        sampler = DistributedSampler(rows, num_replicas=world, rank=rank, shuffle=False)
        return DataLoader(rows, batch_size=self.eval_batch_size, sampler=sampler, collate_fn=as_is)


class RankingDataModule(_EncodedDataModule):
    """Labelled rows of train/valid/test; ``batch_size`` is the global batch over all devices."""

    def __init__(self, data_dir: Path, features: list[str], batch_size: int = 1024, seed: int = 0,
                 num_workers: int = 0) -> None:
        super().__init__(data_dir, batch_size, seed, num_workers=num_workers)
        self.features = features

    def train_dataloader(self) -> BatchStream:
        return self._stream("train", [self.features], train=True)

    def val_dataloader(self) -> BatchStream:
        return self._stream("valid", [self.features], train=False)

    def test_dataloader(self) -> BatchStream:
        return self._stream("test", [self.features], train=False)


@dataclass
class EvalQueries:
    """One query per user: ``rows`` encodes them; per user, item positions (into the corpus) to
    exclude (already seen) and the relevant ones."""

    rows: EncodedRows
    exclude: list[np.ndarray]
    relevant: list[np.ndarray]


class RetrievalDataModule(_EncodedDataModule):
    """Positive train rows as (query batch, item batch, rows); the item corpus; eval queries."""

    def __init__(self, data_dir: Path, query_features: list[str], item_features: list[str],
                 batch_size: int = 1024, seed: int = 0, num_workers: int = 0) -> None:
        super().__init__(data_dir, batch_size, seed, num_workers=num_workers)
        self.query_features = query_features
        self.item_features = item_features

    def setup(self, stage: str | None = None) -> None:
        ds = read_dataset(self.data_dir, tables=("users", "items"))
        parts = {p: read_part(self.data_dir, p) for p in ("train", "valid", "test")}
        train = parts["train"][parts["train"][self.schema.label] > 0]
        sequences = [f for f in self.schema.features if f.kind == "sequence" and f.name in self.query_features]
        train = with_sequences(train, sequences)
        self.items = ds.items.reset_index(drop=True)
        self.corpus = EncodedRows(self.items, self.encoder, [self.item_features])
        self.train_rows = EncodedRows(join_features(train, ds.users, ds.items), self.encoder,
                                      [self.query_features, self.item_features])
        position = pd.Index(self.items["item_id"])
        seen = {"valid": [parts["train"]], "test": [parts["train"], parts["valid"]]}
        self.queries = {
            part: _eval_queries(parts[part], pd.concat(seen[part]), train, ds.users, position, sequences,
                                self.encoder, self.query_features)
            for part in ("valid", "test")
        }
        self.item_log_q = _log_popularity(EncodedPart(self.data_dir / ENCODED / POSITIVES),
                                          self.schema.feature("item_id").num_embeddings)

    def train_dataloader(self) -> BatchStream:
        return self._stream(POSITIVES, [self.query_features, self.item_features], train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.queries["valid"].rows)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.queries["test"].rows)

    def corpus_batches(self) -> list[Batch]:
        """The whole item corpus in item-table order, in eval-sized batches."""
        n = len(self.corpus)
        return [self.corpus.__getitems__(list(range(s, min(s + self.eval_batch_size, n))))[0]
                for s in range(0, n, self.eval_batch_size)]


def _eval_queries(part: pd.DataFrame, seen: pd.DataFrame, train: pd.DataFrame, users: pd.DataFrame,
                  position: pd.Index, sequences: list[FeatureSpec], encoder: FeatureEncoder,
                  features: list[str]) -> EvalQueries:
    """Users with a positive in ``part``; each query's history is the user's latest train items."""
    positives = part[part[encoder.schema.label] > 0]
    user_ids = np.sort(positives["user_id"].unique())
    frame = users.set_index("user_id").loc[user_ids].reset_index()
    if sequences:
        ordered = train.sort_values(["user_id", "timestamp"], kind="stable")
        history = ordered.groupby("user_id")["item_id"].agg(list)
        for f in sequences:
            frame[f.name] = [history.get(u, [])[-f.max_len:] for u in user_ids]
    for name in features:  # request context is unknown for an offline query: OOV / missing
        if name not in frame.columns:
            frame[name] = np.nan
    return EvalQueries(
        rows=EncodedRows(frame, encoder, [features]),
        exclude=_positions_per_user(seen, user_ids, position),
        relevant=_positions_per_user(positives, user_ids, position),
    )


def _positions_per_user(rows: pd.DataFrame, user_ids: np.ndarray, position: pd.Index) -> list[np.ndarray]:
    grouped = rows.assign(pos=position.get_indexer(rows["item_id"])).groupby("user_id")["pos"].unique()
    return [np.asarray(grouped.get(u, []), dtype=np.int64) for u in user_ids]


def _log_popularity(positives: EncodedPart, num_embeddings: int) -> torch.Tensor:
    """log q per encoded item id: its share of train positives (unseen ids get the rarest share)."""
    counts = np.zeros(num_embeddings, dtype=np.int64)
    files = {}
    for g in range(len(positives.sizes)):
        counts += np.bincount(positives.read_group(g, ["id.item_id"], files)["id.item_id"].to_numpy(),
                              minlength=num_embeddings)
    counts = torch.from_numpy(counts).float().clamp(min=1)
    return torch.log(counts / counts.sum())
