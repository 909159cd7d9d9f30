"""`recstack data candidates`: a ranker's table of what retrieval proposes, on retrieval's own split.

The rankers then learn to re-rank the candidates the pipeline will give them, on the same
dataset and split as the two-tower model. For each part (train, valid, test) of a canonical
dataset, the table holds the part's rows and, per positive row, ``negatives`` sampled rows of
the same user, time and context, drawn by the config's shares from:

    retrieval   the user's top ``pool`` items by the two-tower model (the ANN source's view)
    popular     items drawn in proportion to their train positives
    random      items drawn uniformly from the catalogue

Every row, sampled or not, gets the impression columns ``source`` ("ann" when the item is among
the user's top ``pool`` items, seen ones included, else "popular" when it is among the
``popular_k`` most popular items, else "random": blending's first-source-wins order) and
``retrieval_score``, the two-tower cosine of user and item. Both are schema features a ranker
config may select; the two-tower model trained on the train positives, so on train rows both are
in-sample (higher for positives than on held-out rows), and serving must supply them to the
ranker.

Pools, popularity and retrieval scores come from the train part alone, and the two-tower run
must have trained on this dataset's train part (`check_retrieval_run`). No sampled row is a
pair the user has in any part, so no valid or test pair appears among the train rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from data.config import read_yaml_config
from data.dataset import PARTS, Dataset, read_dataset, read_part
from data.encoders import FeatureEncoder
from data.schema import FeatureSpec

SOURCES = ("ann", "popular", "random")  # the ``source`` values, in blending order
SCORE_BLOCK = 1 << 24  # user x item scores per block when taking each user's top items (64 MiB)
MAX_REDRAWS = 100  # rounds of redrawing negatives that hit a pair the user has
CANDIDATES_FILE = "candidates.json"  # what built the table: config, retrieval run and its version


class NegativeShares(BaseModel):
    """The share of sampled negatives drawn from each kind; they sum to 1."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    retrieval: float = Field(0.5, ge=0)
    popular: float = Field(0.25, ge=0)
    random: float = Field(0.25, ge=0)

    @model_validator(mode="after")
    def _sum_to_one(self) -> NegativeShares:
        total = self.retrieval + self.popular + self.random
        if not np.isclose(total, 1.0):
            raise ValueError(f"negative shares {self.model_dump()} sum to {total}; expected 1")
        return self


class CandidatesConfig(BaseModel):
    """A YAML candidates config (see configs/candidates.yaml); every field has a default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    retrieval: str = "two_tower"  # run directory under --models holding the two-tower model
    pool: int = Field(200, ge=1)  # the user's top unseen retrieval items that hard negatives come from
    popular_k: int = Field(100, ge=1)  # the popular list's length, for the ``source`` column
    negatives: int = Field(4, ge=0)  # sampled negatives per positive row
    shares: NegativeShares = NegativeShares()
    seed: int = Field(0, ge=0)


def load_candidates_config(path: Path | None) -> CandidatesConfig:
    return read_yaml_config(path, CandidatesConfig)


def check_retrieval_run(run_dir: Path, data_dir: Path) -> dict:
    """The ``run.json`` of ``run_dir``; ValueError unless it is a retrieval run trained on a
    dataset whose train part equals the one of ``data_dir`` (so it saw no valid or test row)."""
    run_file = Path(run_dir) / "run.json"
    if not run_file.is_file():
        raise ValueError(f"{run_dir}: no run.json; expected a two-tower training run")
    run = json.loads(run_file.read_text())
    if run.get("task") != "retrieval":
        raise ValueError(f"{run_dir}: a {run.get('task')!r} run; expected a 'retrieval' run")
    ours, theirs = read_part(data_dir, "train"), read_part(run["data"], "train")
    keys = ["user_id", "item_id", "timestamp"]
    if not (len(ours) == len(theirs) and ours[keys].reset_index(drop=True).equals(theirs[keys].reset_index(drop=True))):
        raise ValueError(f"{run_dir} trained on the train part of {run['data']} ({len(theirs)} rows), which is "
                         f"not the train part of {data_dir} ({len(ours)} rows); expected the same split")
    return run


@dataclass(frozen=True)
class Pools:
    """What negatives are drawn from: ``pool`` (U, pool) each user's best unseen item rows (-1
    pads), ``popularity`` (I,) train positives per item, all from the train part; ``known`` the
    sorted pair codes (user row * I + item row) of every pair in any part, never drawn. Rows
    index ``user_row`` and ``item_row``, the users and items tables' ids."""

    user_row: pd.Index
    item_row: pd.Index
    pool: np.ndarray
    popularity: np.ndarray
    known: np.ndarray


def build_candidates(data_dir: Path, models_dir: Path, config: CandidatesConfig) -> Dataset:
    """The candidate table of the dataset in ``data_dir`` (see the module docstring), its encoders
    fitted on its train part; `write_dataset` writes it."""
    from inference.export import load_run  # loads the training stack only when a table is built

    run_dir = Path(models_dir) / config.retrieval
    check_retrieval_run(run_dir, data_dir)
    ds = read_dataset(data_dir, tables=("users", "items"))
    parts = [read_part(data_dir, part) for part in PARTS]
    label = ds.schema.label
    if not (parts[0][label] > 0).any():
        raise ValueError(f"{data_dir}: the train part has no positive rows; expected some to build pools from")
    trained = load_run(run_dir)
    item_ids = ds.items["item_id"].to_numpy(np.int64)
    user_ids = ds.users["user_id"].to_numpy(np.int64)
    train_pos = parts[0][parts[0][label] > 0]
    users = _user_vectors(trained, ds.users, train_pos)  # (U, D)
    items = _item_vectors(trained, ds.items)  # (I, D)
    user_row, item_row = pd.Index(user_ids), pd.Index(item_ids)
    seen = _pair_codes(user_row, item_row, train_pos, len(item_ids))
    pool = _top_unseen(users, items, seen, config.pool)  # (U, pool) item rows, -1 past the end
    popularity = np.bincount(item_row.get_indexer(train_pos["item_id"]), minlength=len(item_ids)).astype(np.float64)
    popular = np.lexsort((item_ids, -popularity))[:config.popular_k]  # count desc, then id
    known = _pair_codes(user_row, item_row, pd.concat(parts), len(item_ids))
    pools = Pools(user_row, item_row, pool, popularity, known)
    context = [f.name for f in ds.schema.features if f.table == "interactions" and f.kind != "sequence"]
    rng = np.random.default_rng(config.seed)
    tables = []
    for rows in parts:
        rows = rows[["user_id", "item_id", "timestamp", label, *context]].reset_index(drop=True)
        sampled = _sample_negatives(rows[rows[label] > 0], label, config, pools, rng)
        # each row followed by its sampled negatives, as one impression
        tables.append(pd.concat([rows, sampled]).sort_index(kind="stable").reset_index(drop=True))
    interactions = pd.concat(tables, ignore_index=True)
    u, i = user_row.get_indexer(interactions["user_id"]), item_row.get_indexer(interactions["item_id"])
    proposed = _top_unseen(users, items, np.zeros(0, np.int64), config.pool)  # what ANN proposes, seen or not
    interactions["source"] = _sources(u, i, proposed, popular, len(item_ids))
    interactions["retrieval_score"] = np.einsum("nd,nd->n", users[u], items[i]).astype(np.float32)
    split = np.repeat(np.arange(len(PARTS), dtype=np.int8), [len(t) for t in tables])
    schema = ds.schema.with_features([*ds.schema.features, FeatureSpec("source", "interactions", "categorical"),
                                      FeatureSpec("retrieval_score", "interactions", "numerical", buckets=10)])
    out = Dataset(interactions, ds.users, ds.items, schema, split).check()
    encoder = FeatureEncoder.fit(schema, out.part("train"), ds.users, ds.items)
    out.schema = encoder.schema
    lineage = {"data": str(Path(data_dir).resolve()), "retrieval": str(run_dir.resolve()),
               "retrieval_version": trained.version, "config": config.model_dump(),
               "rows": {p: len(t) for p, t in zip(PARTS, tables, strict=True)}}
    out.extras["encoders"] = lambda d: encoder.save(d / "encoders.json")
    out.extras["lineage"] = lambda d: (d / CANDIDATES_FILE).write_text(json.dumps(lineage, indent=2) + "\n")
    return out


def _user_vectors(trained, users: pd.DataFrame, train_pos: pd.DataFrame) -> np.ndarray:
    """Query-tower embeddings (U, D) of every user; a sequence feature holds the user's latest
    train items (oldest first)."""
    names = trained.features["query"]
    frame = users.reset_index(drop=True)
    sequences = [f for f in trained.encoder.schema.features if f.kind == "sequence" and f.name in names]
    if sequences:
        history = train_pos.sort_values(["user_id", "timestamp"], kind="stable").groupby("user_id")["item_id"].agg(list)
        for f in sequences:
            frame[f.name] = [history.get(u, [])[-f.max_len:] for u in frame["user_id"]]
    return _embed(frame, lambda batch: trained.module(trained.encoder.encode(batch, names)))


def _item_vectors(trained, items: pd.DataFrame) -> np.ndarray:
    """Item-tower embeddings (I, D) of every item, in table order."""
    names = trained.features["items"]
    return _embed(items.reset_index(drop=True), lambda batch: trained.module.embed_items(trained.encoder.encode(
        batch, names)))


def _embed(frame: pd.DataFrame, tower, batch_size: int = 8192) -> np.ndarray:
    with torch.inference_mode():
        parts = [tower(frame.iloc[s:s + batch_size]).float().numpy() for s in range(0, len(frame), batch_size)]
    return np.concatenate(parts).astype(np.float32)


def _pair_codes(user_row: pd.Index, item_row: pd.Index, rows: pd.DataFrame, n_items: int) -> np.ndarray:
    """Sorted unique codes user_row * n_items + item_row of the (user, item) pairs in ``rows``."""
    return np.unique(user_row.get_indexer(rows["user_id"]).astype(np.int64) * n_items
                     + item_row.get_indexer(rows["item_id"]))


def _top_unseen(users: np.ndarray, items: np.ndarray, seen: np.ndarray, k: int) -> np.ndarray:
    """(U, k) item rows: each user's k best items by cosine, best first, their ``seen`` pairs left
    out; -1 pads a user with fewer unseen items."""
    n_users, n_items = len(users), len(items)
    k_eff = min(k, n_items)
    out = np.full((n_users, k), -1, np.int64)
    block = max(1, SCORE_BLOCK // max(n_items, 1))
    for start in range(0, n_users, block):
        stop = min(start + block, n_users)
        scores = torch.from_numpy(users[start:stop] @ items.T)  # (B, I)
        codes = seen[(seen >= start * n_items) & (seen < stop * n_items)] - start * n_items
        scores.view(-1)[torch.from_numpy(codes)] = -np.inf
        best, rows = torch.topk(scores, k_eff, dim=1)  # (B, k_eff), sorted
        out[start:stop, :k_eff] = np.where(torch.isinf(best).numpy(), -1, rows.numpy())
    return out


def _sample_negatives(positives: pd.DataFrame, label: str, config: CandidatesConfig, pools: Pools,
                      rng: np.random.Generator) -> pd.DataFrame:
    """``config.negatives`` rows per positive row: its index and columns, another item, label 0. An item is
    redrawn while the pair is one the user has in any part (``pools.known``); a draw still
    unresolved after `MAX_REDRAWS` rounds (a user who has nearly every item) is dropped."""
    n = len(positives) * config.negatives
    users = np.repeat(pools.user_row.get_indexer(positives["user_id"]), config.negatives)
    shares = config.shares
    kinds = rng.choice(3, size=n, p=[shares.retrieval, shares.popular, shares.random])
    sizes = (pools.pool >= 0).sum(axis=1)
    kinds[(kinds == 0) & (sizes[users] == 0)] = 2  # an empty pool: a random item instead
    items = np.empty(n, np.int64)
    pending = np.arange(n)
    n_items = len(pools.item_row)
    for _ in range(MAX_REDRAWS):
        items[pending] = _draw(kinds[pending], users[pending], pools.pool, sizes, pools.popularity, rng)
        pending = pending[np.isin(users[pending].astype(np.int64) * n_items + items[pending], pools.known)]
        if len(pending) == 0:
            break
    keep = np.ones(n, bool)
    keep[pending] = False
    out = positives.iloc[np.repeat(np.arange(len(positives)), config.negatives)[keep]].copy()  # keeps their index
    out["item_id"] = pools.item_row.to_numpy()[items[keep]]
    out[label] = np.zeros(len(out), positives[label].dtype)
    return out


def _draw(kinds: np.ndarray, users: np.ndarray, pool: np.ndarray, sizes: np.ndarray, popularity: np.ndarray,
          rng: np.random.Generator) -> np.ndarray:
    """One item row per draw: kind 0 from the user's retrieval pool, 1 by popularity, 2 uniformly."""
    items = rng.integers(len(popularity), size=len(kinds))
    hard = kinds == 0
    items[hard] = pool[users[hard], (rng.random(hard.sum()) * sizes[users[hard]]).astype(np.int64)]
    by_popularity = kinds == 1
    items[by_popularity] = rng.choice(len(popularity), size=by_popularity.sum(), p=popularity / popularity.sum())
    return items


def _sources(users: np.ndarray, items: np.ndarray, pool: np.ndarray, popular: np.ndarray,
             n_items: int) -> np.ndarray:
    """Per (user row, item row): "ann" when the item is in the user's ``pool`` row (-1 pads), else
    "popular" when it is in the ``popular`` item rows, else "random"."""
    pooled = np.arange(len(pool))[:, None] * n_items + pool  # (U, pool) pair codes
    in_pool = np.isin(users.astype(np.int64) * n_items + items, pooled[pool >= 0])
    return np.where(in_pool, SOURCES[0], np.where(np.isin(items, popular), SOURCES[1], SOURCES[2])).astype(object)
