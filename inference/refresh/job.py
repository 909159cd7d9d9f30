"""The refresh job behind `recstack refresh`: one new artefact version, built and published.

A version holds, under its directory (see `artifacts`):

    models/       TorchScript query tower and rankers, their interfaces and encoders
    triton/       a Triton model repository of the same models (inference.triton)
    embeddings/   item vectors as parquet shards, and catalogue.parquet (item_id, feature_hash)
    index/        the FAISS item index over the eligible items
    store/        the store snapshot: users, items, and every candidate list
    manifest.json lineage, counts, index recall, when each part was built, checksums

`refresh` runs the steps in order: `export_step`, `embeddings_step`, `index_step`,
`pools_step`, `store_step`, then `publish_step`, which verifies checksums and smoke-tests the
version before the pointer switch. A failure or a kill at any step leaves the previous version published.

An items table may carry ``created_at`` (the "new" list ranks by it; otherwise by first
interaction) and ``removed_at`` (an item removed at or before ``now`` leaves the index and
every list; negative means never).

A full refresh rebuilds everything. An incremental one starts from the published version: it
re-embeds only new items and items whose features changed, removes deleted and now
ineligible items from the index, and rebuilds each candidate list whose cadence is due
(``cadence_s`` per list kind), carrying the others over without the removed items. When the
models changed since that version, it does a full refresh instead.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from data.dataset import read_dataset
from data.encoders import recent_items
from inference.export import (
    TrainedRun,
    export_item_embeddings,
    export_models,
    load_run,
    read_item_embeddings,
    run_version,
    write_embedding_shard,
)
from inference.index import (
    SEARCH_FIELD,
    ItemIndex,
    build_index,
    choose_params,
    load_index,
    measure_recall,
    save_index,
    tune_search,
)
from inference.refresh import pools
from inference.refresh.artifacts import ArtifactRoot, link_or_copy, read_manifest, write_manifest
from inference.refresh.rules import Rules, apply_rules, load_rules
from inference.store import EmbeddedStore, delete_version, load_snapshot_into_redis, write_snapshot
from inference.triton.repository import write_repository

log = logging.getLogger(__name__)

LIST_KINDS = ("popular", "trending", "new", "editorial", "similar", "user")
SHARD_ROWS = 262_144  # rows per embedding shard an incremental refresh writes
RECALL_QUERIES = 100  # query-tower outputs the index recall is measured on (SE ~0.002 at 0.95)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PoolOptions(_Strict):
    popular_k: int = Field(500, ge=1)
    half_life_s: float = Field(7 * 86400, gt=0)
    trending_k: int = Field(200, ge=1)
    trending_recent_s: float = Field(86400, gt=0)
    trending_baseline_s: float = Field(30 * 86400, gt=0)
    new_k: int = Field(200, ge=1)
    new_max_age_s: float = Field(30 * 86400, gt=0)
    similar_k: int = Field(50, ge=1)
    similar_items: int = Field(10_000, ge=0)  # lists for this many of the most popular items
    user_n: int = Field(100, ge=1)
    editorial: Path | None = None  # CSV: item_id,score


class RefreshConfig(_Strict):
    """A YAML refresh config (see configs/refresh.yaml); every field has a default."""

    retrieval: str = "two_tower"  # run directory under --models with the two-tower model
    rankers: list[str] = ["deepfm", "dlrm", "linear"]  # ranker run directories under --models
    target_recall: float = Field(0.95, gt=0, le=1)
    index: dict = {}  # IndexParams fields overriding what choose_params picks
    pools: PoolOptions = PoolOptions()
    rules: list[dict] = []  # static eligibility rules, as in a rules file (inference.refresh.rules)
    cadence_s: dict[str, float] = {kind: 0 for kind in LIST_KINDS}  # rebuild a list kind when older
    retention: int = Field(5, ge=1)
    redis: str | None = Field(None, pattern=r"^[^:\s]+:\d+$")  # "host:port": also load each version's store there
    accelerator: str = "cpu"
    devices: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _known_list_kinds(self) -> RefreshConfig:
        unknown = sorted(set(self.cadence_s) - set(LIST_KINDS))
        if unknown:
            raise ValueError(f"cadence_s names {unknown}; expected list kinds {LIST_KINDS}")
        return self


def load_refresh_config(path: Path | None) -> RefreshConfig:
    try:
        raw = yaml.safe_load(Path(path).read_text()) if path else {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not valid YAML: {e}") from e
    try:
        return RefreshConfig.model_validate(raw or {})
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


@dataclass
class Inputs:
    """What one refresh reads: the dataset, the trained runs, the config, and the parent version."""

    interactions: pd.DataFrame  # positive rows only
    users: pd.DataFrame
    items: pd.DataFrame
    retrieval: TrainedRun
    rankers: dict[str, Path]
    versions: dict[str, str]  # each run's `run_version`, by run name
    config: RefreshConfig
    rules: Rules
    now: int
    parent: Path | None  # the published version an incremental refresh starts from


def refresh(data_dir: Path, models_dir: Path, root: Path, config: RefreshConfig, incremental: bool = False,
            now: int | None = None) -> dict:
    """Builds and publishes a new version under ``root``; returns its manifest."""
    inputs = read_inputs(data_dir, models_dir, root, config, incremental, now)
    artifacts = ArtifactRoot(root)
    started = time.time()
    with artifacts.build() as (version, staging):
        manifest = {"version": version, "parent": inputs.parent.name if inputs.parent else None,
                    "mode": "incremental" if inputs.parent else "full", "created_at": started,
                    "now": inputs.now, "data": str(Path(data_dir).resolve()), "step_seconds": {}}
        timer = _StepTimer(manifest["step_seconds"])
        with timer("export"):
            manifest["models"] = export_step(inputs, staging)
        with timer("embeddings"):
            catalogue = embeddings_step(inputs, staging)
            manifest["catalogue"] = catalogue.counts
        with timer("index"):
            index = index_step(inputs, staging, catalogue)
            manifest["index"] = index.info()
        with timer("pools"):
            manifest["lists"], lists = pools_step(inputs, catalogue, index, started)
        with timer("store"):
            store_step(inputs, staging, lists, version)
        manifest["seconds"] = round(time.time() - started, 3)
        manifest = write_manifest(staging, manifest)
    publish_step(artifacts, version)
    for old in artifacts.prune(config.retention):
        if config.redis:
            delete_version(*_redis_address(config.redis), old)
    return manifest


class _StepTimer:
    """``with timer(name):`` records the block's wall seconds under ``name``."""

    def __init__(self, seconds: dict[str, float]) -> None:
        self.seconds = seconds

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - start, 3)


def read_inputs(data_dir: Path, models_dir: Path, root: Path, config: RefreshConfig, incremental: bool,
                now: int | None) -> Inputs:
    """Reads and checks everything before any file is written."""
    dataset = read_dataset(data_dir)
    label = dataset.schema.label
    positives = dataset.interactions
    if label in positives.columns:
        positives = positives[positives[label] > 0]
    runs = {name: Path(models_dir) / name for name in [config.retrieval, *config.rankers]}
    missing = [str(p) for p in runs.values() if not (p / "run.json").is_file()]
    if missing:
        raise ValueError(f"--models {models_dir}: no training run in {missing}")
    retrieval = load_run(runs[config.retrieval])
    versions = {name: retrieval.version if name == config.retrieval else run_version(path)
                for name, path in runs.items()}
    parent = None
    if incremental:
        current = ArtifactRoot(root).current()
        if current is None:
            log.warning("no published version under %s: doing a full refresh", root)
        else:
            parent = ArtifactRoot(root).path(current)
            if read_manifest(parent)["models"] != versions:
                log.warning("models changed since %s: doing a full refresh", current)
                parent = None
    return Inputs(positives, dataset.users, dataset.items, retrieval,
                  {n: runs[n] for n in config.rankers}, versions, config, load_rules({"rules": config.rules}),
                  int(positives["timestamp"].max()) if now is None else now, parent)


def export_step(inputs: Inputs, staging: Path) -> dict[str, str]:
    """TorchScript query tower and rankers into ``models/`` and the Triton model repository built
    from them into ``triton/`` (both hard-linked from the parent when unchanged); their versions."""
    runs = {"query_tower": inputs.retrieval.directory, **inputs.rankers}
    if inputs.parent is not None:
        for path in [*(inputs.parent / "models").rglob("*"), *(inputs.parent / "triton").rglob("*")]:
            if path.is_file():
                link_or_copy(path, staging / path.relative_to(inputs.parent))
    else:
        export_models(runs, staging / "models")
        write_repository(staging / "models", staging / "triton")
    return inputs.versions


@dataclass
class Delta:
    """An incremental refresh's change to the index: ids to remove, then ids and vectors (N, D) to add."""

    removed: np.ndarray
    added: np.ndarray
    vectors: np.ndarray


@dataclass
class Catalogue:
    """The eligible items of a version with their vectors (N, D), and the change from the parent's."""

    ids: np.ndarray
    vectors: np.ndarray
    eligible: np.ndarray
    counts: dict
    delta: Delta | None  # None in a full refresh


def embeddings_step(inputs: Inputs, staging: Path) -> Catalogue:
    """Item vectors of the eligible items into ``embeddings/``: all of them, or, incrementally, the
    parent's vectors with new and changed items re-embedded."""
    eligible, removed = apply_rules(_live_items(inputs), inputs.rules)
    items = inputs.items[inputs.items["item_id"].isin(eligible)]
    hashes = _feature_hashes(items)
    out, counts = staging / "embeddings", {"items": len(items), "ineligible": len(removed)}
    export = {"accelerator": inputs.config.accelerator, "devices": inputs.config.devices}
    if inputs.parent is None:
        export_item_embeddings(inputs.retrieval, items, out, **export)
        hashes.to_parquet(out / "catalogue.parquet", index=False)
        ids, vectors, _ = read_item_embeddings(out)
        return Catalogue(ids, vectors, eligible, counts, None)
    old = pd.read_parquet(inputs.parent / "embeddings" / "catalogue.parquet")
    unchanged = hashes.merge(old, on=["item_id", "feature_hash"])["item_id"].to_numpy()
    stale = ~hashes["item_id"].isin(unchanged).to_numpy()  # new, or features changed
    old_ids, old_vectors, version = read_item_embeddings(inputs.parent / "embeddings")
    keep = np.isin(old_ids, unchanged)
    new_ids, new_vectors = np.zeros(0, np.int64), np.zeros((0, old_vectors.shape[1]), np.float32)
    if stale.any():
        delta_dir = staging / "delta"
        export_item_embeddings(inputs.retrieval, items[stale], delta_dir, **export)
        new_ids, new_vectors, _ = read_item_embeddings(delta_dir)
        shutil.rmtree(delta_dir)
    ids, vectors = np.concatenate([old_ids[keep], new_ids]), np.concatenate([old_vectors[keep], new_vectors])
    out.mkdir()

    def write(shard: int) -> None:
        rows = slice(shard * SHARD_ROWS, (shard + 1) * SHARD_ROWS)
        write_embedding_shard(out / f"part-000-{shard:06d}.parquet", ids[rows], vectors[rows], version)

    with ThreadPoolExecutor() as pool:  # parquet writes release the GIL
        list(pool.map(write, range(-(-len(ids) // SHARD_ROWS))))
    hashes.to_parquet(out / "catalogue.parquet", index=False)
    counts.update(reembedded=int(stale.sum()), new=int((~hashes["item_id"].isin(old["item_id"])).sum()),
                  dropped=int((~np.isin(old_ids, ids)).sum()))
    return Catalogue(ids, vectors, eligible, counts, Delta(old_ids[~keep], new_ids, new_vectors))


def index_step(inputs: Inputs, staging: Path, catalogue: Catalogue) -> ItemIndex:
    """The item index into ``index/``: built from the embeddings, or the parent's index with the
    delta applied. Its search is then widened until recall@100 against exact search, on
    query-tower outputs, reaches the target (or it scans everything), unless the config's
    ``index`` fixes nprobe or ef_search."""
    ids, vectors, delta = catalogue.ids, catalogue.vectors, catalogue.delta
    queries = _user_vectors(inputs, inputs.users["user_id"].to_numpy()[:RECALL_QUERIES])
    if delta is None:
        overrides = dict(inputs.config.index)
        params = choose_params(len(ids), vectors.shape[1], inputs.config.target_recall,
                               kind=overrides.pop("kind", None), metric=overrides.pop("metric", "ip"))
        index = build_index(ids, vectors, dataclasses.replace(params, **overrides))
    else:
        index = load_index(inputs.parent / "index")
        index.remove(delta.removed)
        index.add(delta.added, delta.vectors)
    if set(SEARCH_FIELD.values()) & set(inputs.config.index):  # the config fixed the breadth: only measure
        index.recall = measure_recall(index, ids, vectors, queries)
    else:
        tune_search(index, ids, vectors, queries, inputs.config.target_recall)
    if index.recall["recall@100"] < inputs.config.target_recall:
        log.warning("index recall@100 %.3f is below the target %.3f", index.recall["recall@100"],
                    inputs.config.target_recall)
    save_index(index, staging / "index")
    return index


def pools_step(inputs: Inputs, catalogue: Catalogue, index: ItemIndex, started: float) -> tuple[dict, pd.DataFrame]:
    """Every candidate list, each kind rebuilt when its cadence is due (always in a full refresh) and
    otherwise carried over from the parent without ineligible items; ({kind: built_at, rows}, lists)."""
    parent_lists = parent_built = None
    if inputs.parent is not None:
        parent_lists = pd.read_parquet(inputs.parent / "store" / "lists.parquet")
        parent_built = read_manifest(inputs.parent)["lists"]
        # each row's list kind, via the few distinct list names
        names = parent_lists["list"].astype("category")
        kind_of_name = np.array([name.partition(":")[0] for name in names.cat.categories])
        kinds = kind_of_name[names.cat.codes.to_numpy()]
        parent_lists = parent_lists[np.isin(parent_lists["item_id"].to_numpy(), catalogue.eligible)]
        kinds = kinds[parent_lists.index.to_numpy()]
    built, frames = {}, []
    for kind in LIST_KINDS:
        due = parent_lists is None or started - parent_built[kind]["built_at"] >= inputs.config.cadence_s.get(kind, 0)
        if due:
            frame, built_at = _build_list(kind, inputs, catalogue, index), started
        else:
            frame = parent_lists[kinds == kind]
            built_at = parent_built[kind]["built_at"]
        built[kind] = {"built_at": built_at, "rows": len(frame), "rebuilt": due}
        frames.append(frame)
    return built, pd.concat(frames, ignore_index=True)


def store_step(inputs: Inputs, staging: Path, lists: pd.DataFrame, version: str) -> None:
    """The store snapshot into ``store/``: user and item features, and the lists; with ``redis``
    configured, also into Redis under ``version`` (readers only use it once it is published)."""
    (staging / "store").mkdir()
    write_snapshot(staging / "store", inputs.users, inputs.items, lists)
    if inputs.config.redis:
        host, port = _redis_address(inputs.config.redis)
        delete_version(host, port, version)  # left by a build of this number that never published
        load_snapshot_into_redis(staging / "store", host, port, version)


def _redis_address(address: str) -> tuple[str, int]:
    host, port = address.rsplit(":", 1)
    return host, int(port)


def publish_step(artifacts: ArtifactRoot, version: str) -> None:
    artifacts.publish(version, smoke=open_version)


@dataclass
class ServingVersion:
    """What a server needs from one version, loaded."""

    directory: Path
    manifest: dict
    store: EmbeddedStore
    index: ItemIndex
    query_tower: torch.jit.ScriptModule


def open_version(directory: Path) -> ServingVersion:
    """Loads a version and runs a smoke query (the index's neighbours of a query, the popular list);
    raises if anything is missing or answers nothing. `LiveArtifacts` uses it as its loader."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    store = EmbeddedStore.open(directory / "store", manifest["version"])
    index = load_index(directory / "index")
    query_tower = torch.jit.load(str(directory / "models" / "query_tower.pt"))
    found, _ = index.search(np.eye(1, index.dim, dtype=np.float32), 10)
    if found.shape[1] == 0:
        raise ValueError(f"{directory}: smoke query found no items in the index")
    if len(store.get_list("popular")[0]) == 0:
        raise ValueError(f"{directory}: smoke query found an empty popular list")
    return ServingVersion(directory, manifest, store, index, query_tower)


def _build_list(kind: str, inputs: Inputs, catalogue: Catalogue, index: ItemIndex) -> pd.DataFrame:
    opts, rows, now, eligible = inputs.config.pools, inputs.interactions, inputs.now, catalogue.eligible
    if kind == "popular":
        return pools.build_popular(rows, now, opts.half_life_s, opts.popular_k, eligible)
    if kind == "trending":
        return pools.build_trending(rows, now, opts.trending_recent_s, opts.trending_baseline_s, opts.trending_k,
                                    eligible=eligible)
    if kind == "new":
        if "created_at" in inputs.items.columns:
            first_seen = inputs.items.set_index("item_id")["created_at"]
        else:
            first_seen = rows.groupby("item_id")["timestamp"].min()
        return pools.build_new_items(first_seen.index.to_numpy(), first_seen.to_numpy(), now, opts.new_max_age_s,
                                     opts.new_k, eligible)
    if kind == "editorial":
        if opts.editorial is None:
            return pd.DataFrame({"list": pd.Series(dtype=str), "item_id": pd.Series(dtype=np.int64),
                                 "score": pd.Series(dtype=np.float32)})
        return pools.read_editorial(opts.editorial, inputs.items["item_id"].to_numpy(), eligible)
    if kind == "similar":
        hot = pools.build_popular(rows, now, opts.half_life_s, opts.similar_items, eligible)["item_id"]
        chosen = np.isin(catalogue.ids, hot)
        return pools.build_similar_items(catalogue.ids[chosen], catalogue.vectors[chosen], index.search,
                                         opts.similar_k, eligible)
    users = inputs.users["user_id"].to_numpy()
    return pools.build_user_lists(users, _user_vectors(inputs, users), index.search, rows, opts.user_n, eligible)


def _live_items(inputs: Inputs) -> pd.DataFrame:
    """The catalogue as of ``now``: items with a ``removed_at`` at or before it are gone (a negative
    ``removed_at`` means never removed)."""
    if "removed_at" not in inputs.items.columns:
        return inputs.items
    removed_at = inputs.items["removed_at"]
    return inputs.items[(removed_at < 0) | (removed_at > inputs.now)]


def _user_vectors(inputs: Inputs, user_ids: np.ndarray, batch_size: int = 4096) -> np.ndarray:
    """Query-tower embeddings (U, D) of ``user_ids`` as of now: their features and latest items."""
    trained = inputs.retrieval
    names = trained.features["query"]
    users = inputs.users.set_index("user_id").loc[user_ids].reset_index()
    sequences = [f for f in trained.encoder.schema.features if f.kind == "sequence" and f.name in names]
    for f in sequences:
        users[f.name] = _latest_items(inputs.interactions, user_ids, f.max_len)
    out = []
    with torch.no_grad():
        for start in range(0, len(users), batch_size):
            out.append(trained.module(trained.encoder.encode(users.iloc[start:start + batch_size], names)))
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


def _latest_items(interactions: pd.DataFrame, user_ids: np.ndarray, max_len: int) -> list[list[int]]:
    """Each user's most recent ``max_len`` items, oldest first: `recent_items` of a probe row after all."""
    probe = pd.DataFrame({"user_id": user_ids, "item_id": -1, "timestamp": np.iinfo(np.int64).max})
    theirs = interactions[interactions["user_id"].isin(user_ids)]
    rows = pd.concat([theirs[["user_id", "item_id", "timestamp"]], probe], ignore_index=True)
    return recent_items(rows, max_len).iloc[len(theirs):].tolist()


def _feature_hashes(items: pd.DataFrame) -> pd.DataFrame:
    """(item_id, feature_hash): a hash of each item's feature values, to find changed items."""
    features = items.drop(columns="item_id")
    lists = [c for c in features.columns if features[c].dtype == object]  # may hold lists: hash their text
    features = features.astype({c: str for c in lists})
    return pd.DataFrame({"item_id": items["item_id"].to_numpy(),
                         "feature_hash": pd.util.hash_pandas_object(features, index=False).to_numpy()})


def describe(root: Path) -> list[dict]:
    """One row per complete version: name, published or not, mode, created time, items, index recall."""
    artifacts = ArtifactRoot(root)
    current = artifacts.current()
    rows = []
    for version in artifacts.versions():
        manifest = read_manifest(artifacts.path(version))
        rows.append({"version": version, "current": version == current, "mode": manifest.get("mode"),
                     "created_at": manifest.get("created_at"), "items": manifest.get("catalogue", {}).get("items"),
                     **(manifest.get("index", {}).get("recall") or {})})
    return rows

