"""The refresh job behind `recstack refresh`: one new artefact version, built and published.

A version holds, under its directory (see `artifacts`):

    models/       TorchScript query tower and rankers, their interfaces and encoders
    triton/       a Triton model repository of the same models (inference.triton)
    embeddings/   item vectors as parquet shards in layers (`embedding_layers`), and
                  catalogue.parquet (item_id, feature_hash) of the eligible items
    index/        the FAISS item index over the eligible items, and its recall probe
    store/        the store snapshot: users, items, and the candidate lists, one file per kind
    manifest.json lineage, counts, index recall, when each part was built, checksums

`refresh` runs the steps in order: `export_step`, `embeddings_step`, `pools_step` for the lists
counted from the interactions alone, `index_step`, `pools_step` for the lists searched in the
index, `store_step`, then `publish_step`, which verifies checksums and smoke-tests the
version before the pointer switch. A full refresh also computes, before the index exists, what
the later steps need of the two-tower run and of DuckDB (`_compute_ahead`), then frees the run:
at 10M items, the run, DuckDB's memory, the vectors and the index would otherwise be held at once.
A failure or a kill at any step leaves the previous version published.

An items table may carry ``created_at`` (the "new" list ranks by it; otherwise by first
interaction) and ``removed_at`` (an item removed at or before ``now`` leaves the index and
every list; negative means never).

A full refresh rebuilds everything. An incremental one starts from the published version: it
re-embeds only new items and items whose features changed, removes deleted and now
ineligible items from the index, and rebuilds each candidate list whose cadence is due
(``cadence_s`` per list kind), carrying the others over without the removed items. When the
models changed since that version, it does a full refresh instead. What it does not change it
hard-links from the parent (embedding layers, the index base, list files, models), and
`write_manifest` and the publish check hash only the new files, so its cost follows the size
of the change rather than of the catalogue.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from data.config import read_yaml_config
from data.dataset import read_dataset
from inference.artifacts import ArtifactRoot, link_or_copy, read_manifest, write_manifest
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
    Probe,
    build_index,
    choose_params,
    exact_probe,
    load_index,
    measure_recall,
    save_index,
    tune_search,
)
from inference.memory import release_arrow_memory
from inference.refresh import pools
from inference.refresh.rules import Rules, apply_rules, load_rules
from inference.store import (
    LISTS,
    RedisStore,
    Snapshot,
    delete_version,
    load_snapshot_into_redis,
    redis_address,
    redis_base,
    write_snapshot,
)
from inference.triton.repository import write_repository
from inference.version import open_version
from models import RANKERS

log = logging.getLogger(__name__)

LIST_KINDS = ("popular", "trending", "new", "editorial", "similar", "user")
INDEX_KINDS = ("similar", "user")  # lists searched in the index; the others come from the interactions
SHARD_ROWS = 262_144  # rows per embedding shard when an incremental refresh compacts the layers
MAX_STORED, MAX_LAYERS = 1.25, 8  # compact the embedding layers beyond these (stored / live vectors, layers)
CATALOGUE, PROBE = "catalogue.parquet", "probe.npz"
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
    memory_limit_gb: float = Field(4, gt=0)  # DuckDB's memory for the pool queries; past it, it spills to disk
    threads: int | None = Field(None, ge=1)  # DuckDB's threads; None: one per CPU
    temp_directory: Path | None = None  # where DuckDB spills; None: the system's temporary directory


class RefreshConfig(_Strict):
    """A YAML refresh config (see configs/refresh.yaml); every field has a default."""

    retrieval: str = "two_tower"  # run directory under --models with the two-tower model
    rankers: list[str] = list(RANKERS)  # ranker run directories under --models
    target_recall: float = Field(0.95, gt=0, le=1)
    index: dict = {}  # IndexParams fields overriding what choose_params picks
    pools: PoolOptions = PoolOptions()
    rules: list[dict] = []  # static eligibility rules, as in a rules file (inference.refresh.rules)
    cadence_s: dict[str, float] = {kind: 0 for kind in LIST_KINDS}  # rebuild a list kind when older
    retention: int = Field(5, ge=1)
    redis: str | None = Field(None, pattern=r"^[^:\s]+:\d+$")  # "host:port": also load each version's store there
    accelerator: str = "cpu"
    devices: int = Field(1, ge=1)
    engine: Literal["local", "ray"] = "local"  # where item embeddings are computed (inference.refresh.ray_engine)
    ray_address: str | None = None  # engine ray: "host:port" or "ray://host:port"; None: RAY_ADDRESS, else a local Ray

    @model_validator(mode="after")
    def _known_list_kinds(self) -> RefreshConfig:
        unknown = sorted(set(self.cadence_s) - set(LIST_KINDS))
        if unknown:
            raise ValueError(f"cadence_s names {unknown}; expected list kinds {LIST_KINDS}")
        return self


def load_refresh_config(path: Path | None) -> RefreshConfig:
    return read_yaml_config(path, RefreshConfig)


@dataclass
class Inputs:
    """What one refresh reads: the dataset, the trained runs, the config, and the parent version."""

    events: pools.Events  # the dataset's positive interactions, queried on disk (`pools.open_events`)
    users: pd.DataFrame
    items: pd.DataFrame
    retrieval: TrainedRun | None  # None once a full refresh computed all it needs of it (`_compute_ahead`)
    rankers: dict[str, Path]
    versions: dict[str, str]  # each run's `run_version`, by run name
    config: RefreshConfig
    rules: Rules
    now: int
    parent: Path | None  # the published version an incremental refresh starts from
    parent_manifest: dict | None  # its manifest
    computed: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # by `_once`


def refresh(data_dir: Path, models_dir: Path, root: Path, config: RefreshConfig, incremental: bool = False,
            now: int | None = None) -> dict:
    """Builds and publishes a new version under ``root``; returns its manifest."""
    opts = config.pools
    with pools.open_events(data_dir, pools.DuckDBOptions(opts.memory_limit_gb, opts.threads,
                                                         opts.temp_directory)) as events:
        inputs = read_inputs(data_dir, events, models_dir, root, config, incremental, now)
        release_arrow_memory()  # the tables the frames were read through
        artifacts = ArtifactRoot(root)
        started = time.time()
        with artifacts.build() as (version, staging):
            manifest = {"version": version, "parent": inputs.parent.name if inputs.parent else None,
                        "mode": "incremental" if inputs.parent else "full", "created_at": started,
                        "now": inputs.now, "data": str(Path(data_dir).resolve()), "step_seconds": {},
                        "index_config": _index_config(config)}
            timer = _StepTimer(manifest["step_seconds"])
            with timer("export"):
                manifest["models"] = export_step(inputs, staging)
            with timer("embeddings"):
                catalogue = embeddings_step(inputs, staging, version)
                manifest["catalogue"] = catalogue.counts
            with timer("lists"):  # DuckDB's memory is spent before the vectors and the index are held
                built, lists = pools_step(inputs, catalogue, None, started,
                                          [kind for kind in LIST_KINDS if kind not in INDEX_KINDS])
                if inputs.parent is None:
                    _compute_ahead(inputs, catalogue.ids)
            with timer("index"):
                index = index_step(inputs, staging, catalogue)
                manifest["index"] = index.info()
            with timer("pools"):
                searched, more = pools_step(inputs, catalogue, index, started, INDEX_KINDS)
                manifest["lists"], lists = {**built, **searched}, {**lists, **more}
            del catalogue, index  # the store step needs neither: free the vectors and the index (GiBs at scale)
            with timer("store"):
                manifest["redis_base"] = store_step(inputs, staging, lists, version)
            del lists
            manifest["seconds"] = round(time.time() - started, 3)
            manifest = write_manifest(staging, manifest, inputs.parent)
    parent = inputs.parent
    del inputs  # the smoke check opens the whole version: free the items, users and runs first (GiBs at scale)
    release_arrow_memory()
    publish_step(artifacts, version, parent, config.redis)
    artifacts.prune(config.retention, (lambda old: delete_version(*redis_address(config.redis), old))
                    if config.redis else None)
    return manifest


class _StepTimer:
    """``with timer(name):`` records the block's wall seconds under ``name``; what pyarrow freed in
    the block goes back to the system before the next step."""

    def __init__(self, seconds: dict[str, float]) -> None:
        self.seconds = seconds

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        release_arrow_memory()
        self.seconds[name] = round(time.perf_counter() - start, 3)


def read_inputs(data_dir: Path, events: pools.Events, models_dir: Path, root: Path, config: RefreshConfig,
                incremental: bool, now: int | None) -> Inputs:
    """Reads and checks everything before any file is written; the interactions (``events``, of
    ``data_dir``) stay on disk."""
    dataset = read_dataset(data_dir, tables=("users", "items"))
    runs = {name: Path(models_dir) / name for name in [config.retrieval, *config.rankers]}
    missing = [str(p) for p in runs.values() if not (p / "run.json").is_file()]
    if missing:
        raise ValueError(f"--models {models_dir}: no training run in {missing}")
    retrieval = load_run(runs[config.retrieval])
    versions = {name: retrieval.version if name == config.retrieval else run_version(path)
                for name, path in runs.items()}
    if config.engine == "ray":  # an unreachable cluster fails before anything is built
        from inference.refresh.ray_engine import check_address, ray_address

        check_address(ray_address(config.ray_address))
    parent, parent_manifest = _parent(root, versions, config) if incremental else (None, None)
    if now is None:
        now = int(pools.read_last_time(events))
    else:
        events.until(now)  # a refresh as of a past time: no later row counts anywhere
    return Inputs(events, dataset.users, dataset.items, retrieval, {n: runs[n] for n in config.rankers}, versions,
                  config, load_rules({"rules": config.rules}), now, parent, parent_manifest)


def _parent(root: Path, versions: dict[str, str], config: RefreshConfig) -> tuple[Path | None, dict | None]:
    """The published version an incremental refresh can start from and its manifest, or (None,
    None) with the reason logged."""
    current = ArtifactRoot(root).current()
    if current is None:
        log.warning("no published version under %s: doing a full refresh", root)
        return None, None
    parent = ArtifactRoot(root).path(current)
    manifest = read_manifest(parent)
    if manifest["models"] != versions:
        log.warning("models changed since %s: doing a full refresh", current)
    elif manifest.get("index_config") != _index_config(config):
        log.warning("the index settings changed since %s: doing a full refresh", current)
    elif "stored" not in manifest["catalogue"]:
        log.warning("%s predates layered embeddings: doing a full refresh", current)
    else:
        return parent, manifest
    return None, None


def _index_config(config: RefreshConfig) -> dict:
    """The settings an index is built from: when they change, the parent's index cannot be reused."""
    return {"index": config.index, "target_recall": config.target_recall}


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
    """An incremental refresh's change: ids to remove from the index, then ids and vectors (N, D)
    to add; ``gone``, the parent's items that are no longer eligible (a subset of ``removed``)."""

    removed: np.ndarray
    added: np.ndarray
    vectors: np.ndarray
    gone: np.ndarray


@dataclass
class Catalogue:
    """The eligible items of a version, where their vectors are, and the change from the parent's."""

    ids: np.ndarray
    layers: list[Path]  # embedding layers, oldest first; `read_item_embeddings` of them, filtered to ``ids``
    counts: dict
    delta: Delta | None  # None in a full refresh
    _embeddings: tuple[np.ndarray, np.ndarray] | None = None

    def embeddings(self) -> tuple[np.ndarray, np.ndarray]:
        """(item ids (N,), vectors (N, D)) of the eligible items, read once from the layers."""
        if self._embeddings is None:
            ids, vectors, _ = read_item_embeddings(*self.layers)
            keep = np.isin(ids, self.ids)
            self._embeddings = (ids, vectors) if keep.all() else (ids[keep], vectors[keep])  # no copy of GiBs
        return self._embeddings

    def release(self) -> None:
        """Frees the vectors `embeddings` read (GiBs at scale); a later call reads them again."""
        self._embeddings = None
        release_arrow_memory()  # they are pyarrow's buffers


def embedding_layers(directory: Path) -> list[Path]:
    """The embedding layers of a version directory, oldest first: ``embeddings/<version>/``, each
    holding the vectors that version computed. An item's vector is in the newest layer holding it."""
    layers = [d for d in (Path(directory) / "embeddings").iterdir() if d.is_dir()]
    return sorted(layers, key=lambda d: int(d.name.removeprefix("v")))


def read_embeddings(directory: Path) -> tuple[np.ndarray, np.ndarray]:
    """(item ids (N,), vectors (N, D)) of the eligible items of the version in ``directory``."""
    ids = pd.read_parquet(Path(directory) / "embeddings" / CATALOGUE, columns=["item_id"])["item_id"].to_numpy()
    return Catalogue(ids, embedding_layers(directory), {}, None).embeddings()


def embeddings_step(inputs: Inputs, staging: Path, version: str) -> Catalogue:
    """Item vectors of the eligible items into ``embeddings/``, as layers (`embedding_layers`).

    A full refresh embeds every item into one layer. An incremental one hard-links the parent's
    layers and embeds only new items and items whose features changed into its own, unless the
    layers would then hold more than `MAX_STORED` times the live vectors or `MAX_LAYERS`
    layers: then it writes all vectors into one new layer.
    """
    eligible, removed = apply_rules(_live_items(inputs), inputs.rules)
    items = inputs.items[inputs.items["item_id"].isin(eligible)]
    hashes = _feature_hashes(items)
    out, counts = staging / "embeddings", {"items": len(items), "ineligible": len(removed)}
    export = _embedding_exporter(inputs.config)
    ids = hashes["item_id"].to_numpy()
    if inputs.parent is None:
        export(inputs.retrieval, items, out / version)
        hashes.to_parquet(out / CATALOGUE, index=False)
        return Catalogue(ids, [out / version], {**counts, "stored": len(items)}, None)
    old = pd.read_parquet(inputs.parent / "embeddings" / CATALOGUE)
    stale = _changed(hashes, old)  # new, or features changed
    old_ids = old["item_id"].to_numpy()
    gone = ~np.isin(old_ids, ids)
    dropped = old_ids[gone | np.isin(old_ids, ids[stale])]  # gone, or to re-embed
    if stale.any():
        export(inputs.retrieval, items[stale], out / version)
        new_ids, new_vectors, _ = read_item_embeddings(out / version)
    else:
        new_ids, new_vectors = np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
    parent_layers = embedding_layers(inputs.parent)
    stored = inputs.parent_manifest["catalogue"]["stored"] + len(new_ids)
    if stored > MAX_STORED * len(ids) or len(parent_layers) >= MAX_LAYERS:  # compact into one layer
        all_ids, vectors = Catalogue(ids, [*parent_layers, out / version], {}, None).embeddings()
        shutil.rmtree(out / version, ignore_errors=True)
        _write_layer(out / version, all_ids, vectors, inputs.versions[inputs.config.retrieval])
        layers, stored, known = [out / version], len(all_ids), (all_ids, vectors)
    else:
        for layer in parent_layers:
            for shard in layer.iterdir():
                link_or_copy(shard, out / layer.name / shard.name)
        layers = [out / layer.name for layer in parent_layers] + ([out / version] if len(new_ids) else [])
        known = None  # read from the layers only if a later step needs every vector
    hashes.to_parquet(out / CATALOGUE, index=False)
    counts.update(reembedded=int(stale.sum()), new=int((~np.isin(ids, old_ids)).sum()), dropped=int(gone.sum()),
                  stored=stored, layers=len(layers))
    return Catalogue(ids, layers, counts, Delta(dropped, new_ids, new_vectors, old_ids[gone]), known)


def _embedding_exporter(config: RefreshConfig) -> Callable[[TrainedRun, pd.DataFrame, Path], None]:
    """The engine's item embedding export: (run, item rows, layer directory) -> shards in it."""
    if config.engine == "ray":
        from inference.refresh.ray_engine import export_item_embeddings_ray  # imports Ray only when used

        return lambda trained, items, out: export_item_embeddings_ray(trained, items, out, config.ray_address)
    return lambda trained, items, out: export_item_embeddings(trained, items, out, accelerator=config.accelerator,
                                                              devices=config.devices)


def _write_layer(directory: Path, ids: np.ndarray, vectors: np.ndarray, version: str) -> None:
    """``ids`` (N,) and ``vectors`` (N, D) as shards of `SHARD_ROWS` rows into ``directory``."""
    directory.mkdir(parents=True)

    def write(shard: int) -> None:
        rows = slice(shard * SHARD_ROWS, (shard + 1) * SHARD_ROWS)
        write_embedding_shard(directory / f"part-000-{shard:06d}.parquet", ids[rows], vectors[rows], version)

    with ThreadPoolExecutor() as pool:  # parquet writes release the GIL
        list(pool.map(write, range(-(-len(ids) // SHARD_ROWS))))


def index_step(inputs: Inputs, staging: Path, catalogue: Catalogue) -> ItemIndex:
    """The item index into ``index/``: built from the embeddings, or the parent's index with the
    delta applied (saved as that change alone while it is small: `save_index`). Its search is
    then widened until recall@100 on the recall probe reaches the target (or it scans
    everything), unless the config's ``index`` fixes nprobe or ef_search.

    The probe (``index/probe.npz``) is `RECALL_QUERIES` query-tower outputs with their exact
    neighbours. An incremental refresh keeps the parent's queries (the models are the same) and
    updates their neighbours with the delta (`Probe.updated`), so it never scans the catalogue;
    when too many neighbours are gone it takes new queries and scans.
    """
    delta = catalogue.delta
    if delta is None:
        ids, vectors = catalogue.embeddings()
        overrides = dict(inputs.config.index)
        params = choose_params(len(ids), vectors.shape[1], inputs.config.target_recall,
                               kind=overrides.pop("kind", None), metric=overrides.pop("metric", "ip"))
        index = build_index(ids, vectors, dataclasses.replace(params, **overrides))
        probe = None
    else:
        index = load_index(inputs.parent / "index")
        index.remove(delta.removed)
        if len(delta.added):
            index.add(delta.added, delta.vectors)
        path = inputs.parent / "index" / PROBE
        probe = Probe.load(path).updated(delta.removed, delta.added, delta.vectors) if path.is_file() else None
    if probe is None:
        ids, vectors = catalogue.embeddings()
        probe = exact_probe(ids, vectors, _probe_queries(inputs), index.params.metric)
    if set(SEARCH_FIELD.values()) & set(inputs.config.index):  # the config fixed the breadth: only measure
        index.recall = measure_recall(index, probe)
    else:
        tune_search(index, probe, inputs.config.target_recall)
    if index.recall["recall@100"] < inputs.config.target_recall:
        log.warning("index recall@100 %.3f is below the target %.3f", index.recall["recall@100"],
                    inputs.config.target_recall)
    save_index(index, staging / "index")
    probe.save(staging / "index" / PROBE)
    return index


def pools_step(inputs: Inputs, catalogue: Catalogue, index: ItemIndex | None, started: float,
               kinds: Sequence[str]) -> tuple[dict, dict[str, pd.DataFrame | None]]:
    """The candidate list ``kinds`` (`INDEX_KINDS` need the ``index``), each rebuilt when its
    cadence is due (always in a full refresh) and otherwise carried over from the parent without
    items that are no longer eligible;
    ({kind: built_at, rows, rebuilt}, {kind: its lists, or None to keep the parent's file as it is})."""
    built, lists = {}, {}
    parent_built = inputs.parent_manifest["lists"] if inputs.parent is not None else None
    for kind in kinds:
        parent_file = inputs.parent / "store" / LISTS / f"{kind}.parquet" if inputs.parent is not None else None
        due = (parent_file is None or not parent_file.is_file()
               or started - parent_built[kind]["built_at"] >= inputs.config.cadence_s.get(kind, 0))
        if due:
            lists[kind] = frame = _build_list(kind, inputs, catalogue, index)
            built[kind] = {"built_at": started, "rows": len(frame), "rebuilt": True}
            continue
        ids = pq.read_table(parent_file, columns=["item_id"])["item_id"].to_numpy()
        gone = np.isin(ids, catalogue.delta.gone)
        lists[kind] = pd.read_parquet(parent_file)[~gone] if gone.any() else None
        built[kind] = {"built_at": parent_built[kind]["built_at"], "rows": int((~gone).sum()), "rebuilt": False}
    return built, lists


def store_step(inputs: Inputs, staging: Path, lists: dict[str, pd.DataFrame | None], version: str) -> str | None:
    """The store snapshot into ``store/``: user and item features, and the lists (the parent's file of
    each kind ``lists`` maps to None, hard-linked); with ``redis`` configured, also into Redis under
    ``version`` (readers only use it once it is published). Returns the full version whose keys
    it reads through in Redis (the manifest's ``redis_base``): None when it was loaded in full.

    An incremental refresh loads its store as a delta over the full version its parent reads
    through (`load_snapshot_into_redis`), unless that version is not in Redis or its directory
    is gone; retention keeps a base while a kept version reads through it (`ArtifactRoot.prune`)."""
    (staging / "store").mkdir()
    tables = write_snapshot(staging / "store", inputs.users, inputs.items,
                            {kind: frame for kind, frame in lists.items() if frame is not None})
    for kind in (kind for kind, frame in lists.items() if frame is None):
        link_or_copy(inputs.parent / "store" / LISTS / f"{kind}.parquet", staging / "store" / LISTS / f"{kind}.parquet")
    if not inputs.config.redis:
        return None
    host, port = redis_address(inputs.config.redis)
    delete_version(host, port, version)  # left by a build of this number that never published
    base = redis_base(host, port, inputs.parent.name) if inputs.parent is not None else None
    over = Snapshot(base, inputs.parent.parent / base / "store") if base is not None else None
    if over is not None and not over.directory.is_dir():
        log.warning("%s reads through %s in redis, whose directory is gone: loading the store in full",
                    inputs.parent.name, base)
        over = None
    return load_snapshot_into_redis(staging / "store", host, port, version, base=over, tables=tables)


def publish_step(artifacts: ArtifactRoot, version: str, parent: Path | None, redis: str | None) -> None:
    """Publishes ``version`` once it loads and answers a smoke query, its store read from Redis when
    ``redis`` ("host:port") is set, as the servers will read it (the snapshot files are not loaded)."""
    def smoke(directory: Path) -> None:
        served = open_version(directory, None if redis is None else
                              lambda name: RedisStore(*redis_address(redis), name, timeout_s=5.0))
        served.store.close()

    artifacts.publish(version, smoke=smoke, trusted=parent.name if parent else None)


def _build_list(kind: str, inputs: Inputs, catalogue: Catalogue, index: ItemIndex) -> pd.DataFrame:
    opts, now, eligible, events = inputs.config.pools, inputs.now, catalogue.ids, inputs.events
    if kind == "popular":
        return pools.build_popular(events, now, opts.half_life_s, opts.popular_k, eligible)
    if kind == "trending":
        return pools.build_trending(events, now, opts.trending_recent_s, opts.trending_baseline_s, opts.trending_k,
                                    eligible=eligible)
    if kind == "new":
        if "created_at" in inputs.items.columns:
            ids, first_seen = inputs.items["item_id"].to_numpy(), inputs.items["created_at"].to_numpy()
        else:
            ids, first_seen = pools.read_first_seen(events)
        return pools.build_new_items(ids, first_seen, now, opts.new_max_age_s, opts.new_k, eligible)
    if kind == "editorial":
        if opts.editorial is None:
            return pd.DataFrame({"list": pd.Series(dtype=str), "item_id": pd.Series(dtype=np.int64),
                                 "score": pd.Series(dtype=np.float32)})
        return pools.read_editorial(opts.editorial, inputs.items["item_id"].to_numpy(), eligible)
    if kind == "similar":
        ids, vectors = catalogue.embeddings()
        chosen = np.isin(ids, _similar_seeds(inputs, eligible))
        ids, vectors = ids[chosen], vectors[chosen]
        catalogue.release()  # the lists after these search the index alone: free every item's vector
        return pools.build_similar_items(ids, vectors, index.search, opts.similar_k, eligible)
    return pools.build_user_lists(inputs.users["user_id"].to_numpy(), _user_queries(inputs), index.search, events,
                                  opts.user_n, eligible)


def _compute_ahead(inputs: Inputs, eligible: np.ndarray) -> None:
    """A full refresh's query vectors (the recall probe's and every user's) and similar-list seeds,
    computed before the index is built; then the two-tower run, which nothing later needs, is freed
    (its item table and the encoders' item vocabulary are GiBs at 10M items)."""
    _probe_queries(inputs)
    _user_queries(inputs)
    _similar_seeds(inputs, eligible)
    inputs.retrieval = None
    gc.collect()  # the Lightning module's reference cycles hold the tensors until a full collection


def _once(inputs: Inputs, key: str, compute: Callable[[], np.ndarray]) -> np.ndarray:
    """``compute()``, computed once per refresh and kept in ``inputs.computed``."""
    if key not in inputs.computed:
        inputs.computed[key] = compute()
    return inputs.computed[key]


def _probe_queries(inputs: Inputs) -> np.ndarray:
    """The recall probe's queries: the first `RECALL_QUERIES` users' query vectors."""
    return _once(inputs, "probe", lambda: _user_vectors(inputs, inputs.users["user_id"].to_numpy()[:RECALL_QUERIES]))


def _user_queries(inputs: Inputs) -> np.ndarray:
    """Every user's query vector, for the user lists."""
    return _once(inputs, "users", lambda: _user_vectors(inputs, inputs.users["user_id"].to_numpy()))


def _similar_seeds(inputs: Inputs, eligible: np.ndarray) -> np.ndarray:
    """The items that get similar lists: the `PoolOptions.similar_items` most popular eligible ones."""
    opts = inputs.config.pools
    return _once(inputs, "seeds", lambda: pools.build_popular(inputs.events, inputs.now, opts.half_life_s,
                                                              opts.similar_items, eligible)["item_id"].to_numpy())


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
    sequences = {f.name: pools.read_latest_items(inputs.events, user_ids, f.max_len)
                 for f in trained.encoder.schema.features if f.kind == "sequence" and f.name in names}
    out = []
    with torch.no_grad():
        for start in range(0, len(users), batch_size):
            batch = users.iloc[start:start + batch_size].assign(
                **{name: latest.slice(start, batch_size).to_pylist() for name, latest in sequences.items()})
            out.append(trained.module(trained.encoder.encode(batch, names)))
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


def _changed(hashes: pd.DataFrame, old: pd.DataFrame) -> np.ndarray:
    """(N,) bool, one per row of ``hashes``: the item is not in ``old`` or its feature hash differs."""
    rows = pd.Index(old["item_id"].to_numpy()).get_indexer(hashes["item_id"].to_numpy())
    before = old["feature_hash"].to_numpy()[rows]  # rows of new items (-1) are masked below
    return (rows < 0) | (before != hashes["feature_hash"].to_numpy())


def _feature_hashes(items: pd.DataFrame) -> pd.DataFrame:
    """(item_id, feature_hash): a hash of each item's feature values, to find changed items."""
    features = items.drop(columns="item_id")
    lists = [c for c in features.columns if features[c].dtype == object]  # may hold lists: hash their text
    features = features.astype({c: str for c in lists})
    # categorize=False gives the same hashes without factorizing each text column (2.5x faster with 1M titles)
    hashes = pd.util.hash_pandas_object(features, index=False, categorize=False)
    return pd.DataFrame({"item_id": items["item_id"].to_numpy(), "feature_hash": hashes.to_numpy()})


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

