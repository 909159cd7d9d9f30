"""Trained runs -> serving artefacts: TorchScript models behind a padded tensor interface, and
item embeddings as parquet shards written by Lightning ``predict`` (on any number of devices).

Start with `export_models`, which the refresh job calls. Every exported model takes the same
three tensors, because Triton cannot carry a `KeyedJaggedTensor`:

- ``dense``   (B, n_dense) float32, the numerical features in schema order;
- ``ids``     (B, F, L) int64, sparse feature f of row b in ``ids[b, f, :lengths[b, f]]``;
- ``lengths`` (B, F) int64.

`inference.pipeline.scorers.pad_batch` turns an encoded `Batch` into them. Rankers return click probabilities (B,); the
query tower returns embeddings (B, D). Beside each ``<name>.pt`` a ``<name>.json`` names the
features (in ``ids`` order), the dense columns and the output, and ``<name>.encoders.json`` is
the fitted encoder of the dataset it trained on (models may come from different datasets), so
a server turns raw feature rows into these tensors with the code that trained the model.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import nn
from torch.utils.data import DataLoader
from torchrec import KeyedJaggedTensor

from data.encoders import FeatureEncoder
from training.data import EncodedRows, as_is
from training.model_parallel import read_weights
from training.train import RunConfig, build_ranking_module, build_retrieval_module


class PaddedInput(nn.Module):
    """Runs a (dense, KJT) model on padded id tensors; see the module docstring for shapes."""

    def __init__(self, model: nn.Module, keys: list[str], probabilities: bool) -> None:
        super().__init__()
        self.model = model
        self.keys = keys
        self.probabilities = probabilities

    def forward(self, dense: torch.Tensor, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        b, f, width = ids.shape
        if f != len(self.keys):
            raise ValueError(f"ids has {f} features; expected {len(self.keys)}")
        key_major = lengths.transpose(0, 1).reshape(-1)  # (F * B,): KJT lengths, feature by feature
        mask = torch.arange(width, device=ids.device).unsqueeze(0) < key_major.unsqueeze(1)  # (F * B, L)
        values = ids.transpose(0, 1).reshape(f * b, width)[mask]
        out = self.model(dense, KeyedJaggedTensor(keys=self.keys, values=values, lengths=key_major.int(), stride=b))
        return torch.sigmoid(out) if self.probabilities else out


@dataclass
class TrainedRun:
    """A training run's best checkpoint, loaded: the module, its ``run.json``, the dataset's encoder,
    the feature names it reads (rankers: ``features``; two-tower: ``query`` and ``items``), and
    its `run_version`."""

    directory: Path
    module: L.LightningModule
    run: dict
    encoder: FeatureEncoder
    features: dict[str, list[str]]
    version: str


def run_version(run_dir: Path) -> str:
    """``<run name>@<first 12 hex digits of the best checkpoint's sha256>`` (a sharded checkpoint's:
    of its files' bytes in name order)."""
    checkpoint = Path(run_dir) / "checkpoints" / "best.ckpt"
    digest = hashlib.sha256()
    for file in sorted(checkpoint.iterdir()) if checkpoint.is_dir() else [checkpoint]:
        digest.update(file.read_bytes())
    return f"{Path(run_dir).name}@{digest.hexdigest()[:12]}"


def load_run(run_dir: Path) -> TrainedRun:
    """The best checkpoint of the training run in ``run_dir``."""
    run_dir = Path(run_dir)
    checkpoint = run_dir / "checkpoints" / "best.ckpt"
    if not checkpoint.exists():
        raise ValueError(f"{run_dir}: no checkpoints/best.ckpt; expected a finished training run")
    run = json.loads((run_dir / "run.json").read_text())
    encoders = Path(run["data"]) / "encoders.json"
    if not encoders.is_file():
        raise ValueError(f"{run_dir}/run.json: dataset {run['data']!r} has no encoders.json (from {Path.cwd()}); "
                         "expected the prepared dataset the run trained on (runs record it as an absolute path)")
    encoder = FeatureEncoder.load(encoders)
    config = RunConfig.model_validate(run["config"])
    if run["task"] == "retrieval":
        module, query, items = build_retrieval_module(encoder.schema, config)
        features = {"query": query, "items": items}
    else:
        module, names = build_ranking_module(run["model"], encoder.schema, config)
        features = {"features": names}
    module.load_state_dict(read_weights(checkpoint))  # a sharded checkpoint's tables put together whole
    return TrainedRun(run_dir, module.eval(), run, encoder, features, run_version(run_dir))


def export_models(runs: dict[str, Path], out: Path) -> dict[str, dict]:
    """Scripts each run's model into ``out``: the query tower of a retrieval run, else the ranker.

    ``runs`` maps an export name (e.g. "deepfm") to a run directory. Returns each name's
    interface, also written to ``out/<name>.json``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    exported = {}
    for name, run_dir in runs.items():
        trained = load_run(run_dir)
        ranker = trained.run["task"] == "ranker"
        model = trained.module.model if ranker else trained.module.model.query_tower
        names = trained.features["features" if ranker else "query"]
        features = [f for f in trained.encoder.schema.features if f.name in names]
        keys = [f.name for f in features if f.sparse]
        torch.jit.script(PaddedInput(model, keys, probabilities=ranker)).save(str(out / f"{name}.pt"))
        exported[name] = {
            "task": trained.run["task"], "model": trained.run.get("model", "two_tower"), "version": trained.version,
            "features": [f.name for f in features], "sparse": keys,
            "dense": [f.name for f in features if f.kind == "numerical"],
            "output": "probability" if ranker else "embedding", "encoders": f"{name}.encoders.json",
        }
        (out / f"{name}.json").write_text(json.dumps(exported[name], indent=2))
        shutil.copyfile(Path(trained.run["data"]) / "encoders.json", out / exported[name]["encoders"])
    return exported


class EmbeddingShardWriter(BasePredictionWriter):
    """Writes each predicted batch to ``out/part-<rank>-<batch>.parquet``: item_id, vector, model_version."""

    def __init__(self, out: Path, item_ids: np.ndarray, version: str) -> None:
        super().__init__(write_interval="batch")
        self.out, self.item_ids, self.version = Path(out), item_ids, version

    def write_on_batch_end(self, trainer: L.Trainer, module: L.LightningModule, prediction: tuple, batch_indices,
                           batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        vectors, rows = (t.float().cpu().numpy() for t in prediction)
        write_embedding_shard(self.out / f"part-{trainer.global_rank:03d}-{batch_idx:06d}.parquet",
                              self.item_ids[rows.astype(np.int64)], vectors, self.version)


def write_embedding_shard(path: Path, ids: np.ndarray, vectors: np.ndarray, version: str) -> None:
    """One shard: item_id (N,), vector (N, D) as fixed-size lists of float32, model_version."""
    flat = np.ascontiguousarray(vectors, np.float32).ravel()
    pq.write_table(pa.table({
        "item_id": ids,
        "vector": pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1]),
        "model_version": pa.array([version] * len(ids)),
    }), path, compression="none")  # float vectors do not compress; plain pages read and write fastest


def export_item_embeddings(trained: TrainedRun, items: pd.DataFrame, out: Path, batch_size: int = 8192,
                           accelerator: str = "cpu", devices: int = 1) -> None:
    """Embeds the rows of ``items`` (the item table's columns) with the item tower into shards in ``out``.

    With ``devices`` > 1 Lightning spawns one process per device (``ddp_spawn``, so this works
    inside any caller); each predicts its share of the rows (the distributed predict sampler
    never repeats a row) and writes its own shards.
    """
    if trained.run["task"] != "retrieval":
        raise ValueError(f"{trained.directory} is a {trained.run['task']} run; item embeddings need a retrieval run")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = EncodedRows(items, trained.encoder, [trained.features["items"]])
    writer = EmbeddingShardWriter(out, items["item_id"].to_numpy(np.int64), trained.version)
    trainer = L.Trainer(accelerator=accelerator, devices=devices, strategy="ddp_spawn" if devices > 1 else "auto",
                        callbacks=[writer], logger=False, enable_progress_bar=False, enable_model_summary=False)
    loader = DataLoader(rows, batch_size=batch_size, collate_fn=as_is)
    trainer.predict(trained.module, loader, return_predictions=False)


def read_item_embeddings(*directories: Path) -> tuple[np.ndarray, np.ndarray, str]:
    """(item ids (N,) int64, vectors (N, D) float32, model version) from the shards in ``directories``.

    Each directory is a layer: an item in a later one replaces its vector from earlier ones.
    """
    shards = [s for d in directories for s in sorted(Path(d).glob("part-*.parquet"))]
    if not shards:
        raise ValueError(f"{', '.join(map(str, directories))}: no embedding shards (part-*.parquet)")
    # one dataset read: shards in parallel, in order; the version column as codes of one string
    table = pq.read_table([str(s) for s in shards], read_dictionary=["model_version"])
    vectors = table.column("vector").combine_chunks()
    dim = vectors.type.list_size
    versions = set(table.column("model_version").unique().dictionary.to_pylist())
    if len(versions) != 1:
        raise ValueError(f"{directories}: shards come from several models {sorted(versions)}; expected one")
    ids, vectors = table.column("item_id").to_numpy(), vectors.flatten().to_numpy().reshape(-1, dim)
    if len(directories) > 1:  # keep each id's last row
        _, last = np.unique(ids[::-1], return_index=True)
        keep = np.sort(len(ids) - 1 - last)
        ids, vectors = ids[keep], vectors[keep]
    return ids, vectors, versions.pop()
