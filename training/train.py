"""The train entry point behind `recstack train retrieval|ranker`.

A run directory holds `run.json` (the resolved config, enough to rebuild the model),
`checkpoints/` (`best.ckpt` on the validation metric, `last.ckpt` for resuming), CSV and
TensorBoard logs, and `metrics.json` (validation and test metrics of the best checkpoint).
Starting a run in a directory with `checkpoints/last.ckpt` resumes it: the data order is a
function of (seed, epoch), so a resumed run ends where an uninterrupted one would.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from pydantic import BaseModel, ConfigDict, Field

from data.encoders import FeatureEncoder
from models.two_tower import TwoTowerConfig
from training.data import RankingDataModule, RetrievalDataModule
from training.ranking import RankingModule, build_ranker
from training.retrieval import RetrievalModule


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TrainOptions(_Strict):
    max_epochs: int = Field(20, ge=1)
    batch_size: int = Field(1024, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    patience: int = Field(3, ge=1)
    seed: int = 0
    accelerator: str = "auto"
    devices: int = Field(1, ge=1)
    strategy: str = "auto"


class LossOptions(_Strict):
    """Retrieval only: sampled softmax settings."""

    temperature: float = Field(0.05, gt=0)
    logq: bool = True
    negatives: int = Field(0, ge=0)
    k: int = Field(10, ge=1)


class RunConfig(_Strict):
    """A YAML run config: ``model`` holds the model config's own fields (hidden sizes, dims)."""

    train: TrainOptions = TrainOptions()
    loss: LossOptions = LossOptions()
    model: dict = {}
    features: list[str] | None = None  # ranker features; default: every non-sequence feature
    query_features: list[str] | None = None  # two-tower; default: user features and sequences
    item_features: list[str] | None = None  # two-tower; default: item features


def load_config(path: Path | None, **overrides) -> RunConfig:
    """The YAML file at ``path`` (or defaults) with ``train`` fields overridden where not None."""
    raw = yaml.safe_load(Path(path).read_text()) if path else {}
    config = RunConfig.model_validate(raw or {})
    changed = {k: v for k, v in overrides.items() if v is not None}
    return config.model_copy(update={"train": config.train.model_copy(update=changed)})


def train_ranker(name: str, data_dir: Path, out: Path, config: RunConfig) -> dict:
    """Trains DeepFM, DLRM or the linear model on a dataset's labelled rows."""
    schema = FeatureEncoder.load(Path(data_dir) / "encoders.json").schema
    names = config.features or [f.name for f in schema.features if f.kind != "sequence"]
    features = [schema.feature(n) for n in names]
    dense_dim = sum(f.kind == "numerical" for f in features)
    L.seed_everything(config.train.seed, workers=True)
    module = RankingModule(build_ranker(name, features, dense_dim, config.model), config.train.lr,
                           config.train.weight_decay)
    data = RankingDataModule(data_dir, names, config.train.batch_size, config.train.seed)
    return _fit(module, data, out, config, monitor="val_auc", run={"task": "ranker", "model": name})


def train_retrieval(data_dir: Path, out: Path, config: RunConfig) -> dict:
    """Trains the two-tower model; selection is on validation NDCG@K over the full corpus."""
    schema = FeatureEncoder.load(Path(data_dir) / "encoders.json").schema
    query = config.query_features or [f.name for f in schema.features if f.table == "users" or f.kind == "sequence"]
    items = config.item_features or [f.name for f in schema.features if f.table == "items"]
    specs = [schema.feature(n) for n in query], [schema.feature(n) for n in items]
    tower = TwoTowerConfig(
        tuple(specs[0]), tuple(specs[1]),
        query_dense_dim=sum(f.kind == "numerical" for f in specs[0]),
        item_dense_dim=sum(f.kind == "numerical" for f in specs[1]),
        **config.model,
    )
    L.seed_everything(config.train.seed, workers=True)
    loss = config.loss
    module = RetrievalModule(tower, config.train.lr, loss.temperature, loss.logq, loss.negatives, loss.k)
    data = RetrievalDataModule(data_dir, query, items, config.train.batch_size, config.train.seed)
    return _fit(module, data, out, config, monitor=f"val_ndcg@{loss.k}", run={"task": "retrieval"})


def _fit(module: L.LightningModule, data: L.LightningDataModule, out: Path, config: RunConfig, monitor: str,
         run: dict) -> dict:
    out = Path(out)
    opts = config.train
    gpu = opts.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    best = ModelCheckpoint(dirpath=out / "checkpoints", filename="best", monitor=monitor, mode="max",
                           save_last=True, enable_version_counter=False)
    trainer = L.Trainer(
        max_epochs=opts.max_epochs,
        accelerator=opts.accelerator,
        devices=opts.devices,
        strategy=opts.strategy,
        precision="bf16-mixed" if gpu else "32-true",
        callbacks=[best, EarlyStopping(monitor, mode="max", patience=opts.patience)],
        logger=[CSVLogger(out, name="logs"), TensorBoardLogger(out, name="tensorboard")],
        log_every_n_steps=10,
        deterministic=not gpu,
    )
    if trainer.is_global_zero:
        out.mkdir(parents=True, exist_ok=True)
        (out / "run.json").write_text(json.dumps({**run, "data": str(data.data_dir), **config.model_dump()},
                                                 indent=2))
    last = out / "checkpoints" / "last.ckpt"
    trainer.fit(module, datamodule=data, ckpt_path=last if last.is_file() else None)
    results = {**trainer.validate(module, datamodule=data, ckpt_path=best.best_model_path, verbose=False)[0],
               **trainer.test(module, datamodule=data, ckpt_path=best.best_model_path, verbose=False)[0],
               "best_epoch": torch.load(best.best_model_path, weights_only=False)["epoch"],
               "epochs": trainer.current_epoch}
    if trainer.is_global_zero:
        (out / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    return results
