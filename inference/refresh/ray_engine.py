"""The refresh's Ray engine: item embeddings exported with Ray Data, on a local Ray or an existing cluster.

`export_item_embeddings_ray` is the `--engine ray` counterpart of `inference.export.export_item_embeddings`:
the item table is cut into shards of ``batch_size`` rows, one Ray Data block each, and embedded on
an actor pool whose actors (`ItemTowerEmbedder`) take the item tower once, from the object store
(so the cluster's workers need recstack installed, not the driver's files); one GPU per actor when
the cluster has GPUs. The driver writes the vectors it gets back with `write_embedding_shard` under
the names and row ranges the local engine uses, so both engines write the same layers. The index,
the pools, the store and the publish stay on the driver.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import numpy as np
import pandas as pd
import ray
import torch

from inference.export import TrainedRun, write_embedding_shard
from training.data import EncodedRows

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 2.0  # an unreachable address fails within this, before Ray's own minute-long retries
ACTOR_RESTARTS = 2  # a dead actor (its node lost, or killed) is restarted this often before the export fails


def ray_address(address: str | None) -> str | None:
    """The cluster to use: ``address``, else ``RAY_ADDRESS``, else None (a local Ray)."""
    return address or os.environ.get("RAY_ADDRESS") or None


def check_address(address: str | None) -> None:
    """Raises ValueError unless ``address`` ("host:port" or "ray://host:port") is None or
    accepts a TCP connection within `CONNECT_TIMEOUT_S`."""
    if address is None:
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"ray address {address!r}: expected host:port or ray://host:port")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as error:
        raise ValueError(f"ray address {address!r}: cannot connect to {host}:{port} ({error})") from None


class ItemTowerEmbedder:
    """A Ray Data actor: takes the item tower once, then embeds batches of item rows.

    A batch is a frame of item table rows plus ``shard``; it returns ``item_id`` (B,),
    ``vector`` (B, D) float32 and ``shard`` (B,)."""

    def __init__(self, trained_ref: ray.ObjectRef) -> None:
        trained: TrainedRun = ray.get(trained_ref)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.module = trained.module.to(self.device).eval()
        self.encoder, self.names = trained.encoder, trained.features["items"]

    def __call__(self, batch: pd.DataFrame) -> dict[str, np.ndarray]:
        items, _ = EncodedRows(batch.drop(columns="shard"), self.encoder, [self.names]).__getitems__(
            list(range(len(batch))))
        with torch.no_grad():
            vectors = self.module.embed_items(items.to(self.device)).float().cpu().numpy()  # (B, D)
        return {"item_id": batch["item_id"].to_numpy(np.int64), "vector": vectors,
                "shard": batch["shard"].to_numpy()}


def export_item_embeddings_ray(trained: TrainedRun, items: pd.DataFrame, out: Path, address: str | None = None,
                               batch_size: int = 8192) -> None:
    """Embeds the rows of ``items`` with the item tower on Ray into shards in ``out``:
    ``part-000-<shard>.parquet``, shard i holding rows [i * batch_size, (i + 1) * batch_size).

    Uses the Ray this process is connected to, else connects to ``address`` (`ray_address`) or
    starts a local one, which it stops afterwards. Raises if an actor dies more than
    `ACTOR_RESTARTS` times or a batch fails; shards written before are left in ``out``.
    """
    if trained.run["task"] != "retrieval":
        raise ValueError(f"{trained.directory} is a {trained.run['task']} run; item embeddings need a retrieval run")
    if batch_size < 1:
        raise ValueError(f"batch_size {batch_size}: expected at least 1")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = not ray.is_initialized()
    if started:
        address = ray_address(address)
        check_address(address)
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    try:
        _embed(trained, items.reset_index(drop=True), out, batch_size)
    finally:
        if started:
            ray.shutdown()


def _embed(trained: TrainedRun, items: pd.DataFrame, out: Path, batch_size: int) -> None:
    if len(items) == 0:
        return
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    actors = gpus or max(1, int(resources.get("CPU", 1)))
    shard = np.arange(len(items)) // batch_size
    frames = [items.iloc[i * batch_size:(i + 1) * batch_size].assign(shard=i) for i in range(int(shard[-1]) + 1)]
    dataset = ray.data.from_pandas(frames).map_batches(
        ItemTowerEmbedder, fn_constructor_args=(ray.put(trained),), batch_size=batch_size, batch_format="pandas",
        compute=ray.data.ActorPoolStrategy(size=min(actors, len(frames))), num_gpus=1 if gpus else 0,
        max_restarts=ACTOR_RESTARTS, max_task_retries=ACTOR_RESTARTS)
    rows_left = np.bincount(shard)
    pieces: dict[int, list[dict]] = {}
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        for i in np.unique(batch["shard"]):  # a shard is written once all its rows are back
            mine = batch["shard"] == i
            pieces.setdefault(int(i), []).append({"item_id": batch["item_id"][mine], "vector": batch["vector"][mine]})
            rows_left[i] -= int(mine.sum())
            if rows_left[i] == 0:
                parts = pieces.pop(int(i))
                write_embedding_shard(out / f"part-000-{int(i):06d}.parquet",
                                      np.concatenate([p["item_id"] for p in parts]),
                                      np.concatenate([p["vector"] for p in parts]), trained.version)
    log.info("embedded %d items on ray (%d shards, %d actors)", len(items), len(frames), min(actors, len(frames)))
