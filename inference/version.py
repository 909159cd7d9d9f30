"""One published artefact version, loaded for serving: its manifest, store, item index and
query tower (the layout is described in `inference.refresh.job`, which builds versions).

Serving code reads versions through this module only, so a server loads none of the offline
code that builds them (Lightning, training, the refresh job)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from inference.artifacts import read_manifest
from inference.index import ItemIndex, load_index
from inference.store import EmbeddedStore, Store


@dataclass
class ServingVersion:
    """What a server needs from one version, loaded."""

    directory: Path
    manifest: dict
    store: Store
    index: ItemIndex
    query_tower: torch.jit.ScriptModule


def open_version(directory: Path, open_store: Callable[[str], Store] | None = None) -> ServingVersion:
    """Loads a version and runs a smoke query (the index's neighbours of a query, the popular list);
    raises if anything is missing or answers nothing. `LiveArtifacts` uses it as its loader.

    The store is the version's embedded snapshot, or ``open_store(version)`` (e.g. a `RedisStore`
    of the version's keys), in which case the snapshot is not loaded."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    if open_store is None:
        store = EmbeddedStore.open(directory / "store", manifest["version"])
    else:
        store = open_store(manifest["version"])
    index = load_index(directory / "index")
    query_tower = torch.jit.load(str(directory / "models" / "query_tower.pt"))
    found, _ = index.search(np.eye(1, index.dim, dtype=np.float32), 10)
    if found.shape[1] == 0:
        raise ValueError(f"{directory}: smoke query found no items in the index")
    if len(store.get_list("popular")[0]) == 0:
        raise ValueError(f"{directory}: smoke query found an empty popular list")
    return ServingVersion(directory, manifest, store, index, query_tower)
