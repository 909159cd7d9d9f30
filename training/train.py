"""The train entry point behind `recstack train retrieval|ranker`.

A run directory holds `run.json` (the resolved config, enough to rebuild the model),
`checkpoints/` (`best.ckpt` on the validation metric, `last.ckpt` for resuming; each a link to a
directory of shards under `--strategy model_parallel`), CSV and
TensorBoard logs, and `metrics.json` (validation and test metrics of the best checkpoint).
Starting a run in a directory with `checkpoints/last.ckpt` resumes it: the data order is a
function of (seed, epoch) and sampled negatives of (seed, step), so a resumed run ends where an
uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from pydantic import BaseModel, ConfigDict, Field, model_validator

from data.config import read_yaml_config
from data.encoders import FeatureEncoder
from data.schema import FeatureSpec, Schema
from models.two_tower import TwoTowerConfig
from training.data import RankingDataModule, RetrievalDataModule
from training.lean_module import NullProfiler, TrainLossBar
from training.model_parallel import SHARDINGS, ModelParallelStrategy, checkpoint_file
from training.optimizers import DENSE_ADAM, EmbeddingOptimizer, fused_optimizer
from training.ranking import RANKERS, RankingModule, build_ranker
from training.retrieval import RetrievalModule, SampledSoftmax

LOG_EVERY_N_STEPS = 10


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TrainOptions(_Strict):
    max_epochs: int = Field(20, ge=1)
    batch_size: int = Field(1024, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    patience: int = Field(3, ge=1)
    seed: int = Field(0, ge=0)
    accelerator: str = "auto"
    devices: int = Field(1, ge=1)
    num_nodes: int = Field(1, ge=1)
    strategy: str = "auto"  # a Lightning strategy name, or "model_parallel" (training/model_parallel.py)
    sharding: str = "auto"  # model_parallel only: one of training.model_parallel.SHARDINGS
    num_workers: int = Field(0, ge=0)  # DataLoader workers per device, each streaming a share of the rows

    @model_validator(mode="after")
    def _batch_splits_over_devices(self) -> TrainOptions:
        world = self.devices * self.num_nodes
        if self.batch_size % world:
            raise ValueError(f"batch_size = {self.batch_size} is the global batch; expected a multiple of "
                             f"devices * num_nodes = {world}")
        units = world * max(self.num_workers, 1)  # each worker of each device streams B / units rows
        if self.batch_size % units:
            raise ValueError(f"batch_size = {self.batch_size} is the global batch; expected a multiple of "
                             f"devices * num_nodes * num_workers = {units}")
        if self.sharding not in SHARDINGS:
            raise ValueError(f"sharding = {self.sharding!r}; expected one of {SHARDINGS}")
        return self


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
    embedding_optimizer: EmbeddingOptimizer = DENSE_ADAM  # how the embedding tables update


def load_config(path: Path | None, **overrides) -> RunConfig:
    """The YAML file at ``path`` (or defaults) with ``train`` fields overridden where not None."""
    config = read_yaml_config(path, RunConfig)
    changed = {k: v for k, v in overrides.items() if v is not None}
    # validated again: model_copy(update=...) would take the overrides unchecked
    return config.model_copy(update={"train": TrainOptions.model_validate({**config.train.model_dump(), **changed})})


def train_ranker(name: str, data_dir: Path, out: Path, config: RunConfig) -> dict | None:
    """Trains DeepFM, DLRM or the linear model on a dataset's labelled rows."""
    schema = FeatureEncoder.load(Path(data_dir) / "encoders.json").schema
    L.seed_everything(config.train.seed, workers=True)
    module, names = build_ranking_module(name, schema, config)
    data = RankingDataModule(data_dir, names, config.train.batch_size, config.train.seed, config.train.num_workers)
    return fit(module, data, out, config, monitor="val_auc", run={"task": "ranker", "model": name})


def train_retrieval(data_dir: Path, out: Path, config: RunConfig) -> dict | None:
    """Trains the two-tower model; selection is on validation NDCG@K over the full corpus."""
    schema = FeatureEncoder.load(Path(data_dir) / "encoders.json").schema
    L.seed_everything(config.train.seed, workers=True)
    module, query, items = build_retrieval_module(schema, config)
    data = RetrievalDataModule(data_dir, query, items, config.train.batch_size, config.train.seed,
                               config.train.num_workers)
    return fit(module, data, out, config, monitor=f"val_ndcg@{config.loss.k}", run={"task": "retrieval"})


def build_ranking_module(name: str, schema: Schema, config: RunConfig) -> tuple[RankingModule, list[str]]:
    """The untrained module of ranker ``name`` and the feature names it reads."""
    if name not in RANKERS:
        raise ValueError(f"ranker {name!r} is not one of {tuple(RANKERS)}")
    _check_model_options(RANKERS[name][1], config.model)
    names = config.features or [f.name for f in schema.features if f.kind != "sequence"]
    features = _features(schema, names, "features")
    dense_dim = sum(f.kind == "numerical" for f in features)
    model = build_ranker(name, features, dense_dim, config.model)
    return RankingModule(model, config.train.lr, config.train.weight_decay, config.embedding_optimizer), names


def build_retrieval_module(schema: Schema, config: RunConfig) -> tuple[RetrievalModule, list[str], list[str]]:
    """The untrained two-tower module and the query and item feature names it reads."""
    query = config.query_features or [f.name for f in schema.features if f.table == "users" or f.kind == "sequence"]
    items = config.item_features or [f.name for f in schema.features if f.table == "items"]
    specs = _features(schema, query, "query_features"), _features(schema, items, "item_features")
    _check_model_options(TwoTowerConfig, config.model)
    tower = TwoTowerConfig(
        tuple(specs[0]), tuple(specs[1]),
        query_dense_dim=sum(f.kind == "numerical" for f in specs[0]),
        item_dense_dim=sum(f.kind == "numerical" for f in specs[1]),
        **config.model,
    )
    loss = config.loss
    module = RetrievalModule(tower, SampledSoftmax(loss.temperature, loss.logq, loss.negatives, loss.k),
                             config.train.lr, config.train.weight_decay, config.embedding_optimizer)
    return module, query, items


# Model config fields that come from the dataset's schema, not from the YAML ``model`` section.
_FROM_DATA = {"features", "dense_dim", "query_features", "item_features", "query_dense_dim", "item_dense_dim"}


def _check_model_options(config_class: type, options: dict) -> None:
    """Each key of the YAML ``model`` section must be a field of the model's config."""
    fields = [f.name for f in dataclasses.fields(config_class) if f.name not in _FROM_DATA]
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise ValueError(f"model options {unknown} are not fields of {config_class.__name__}; "
                         f"expected some of {fields}")


def _features(schema: Schema, names: list[str], key: str) -> list[FeatureSpec]:
    unknown = [n for n in names if n not in schema.names]
    if unknown:
        raise ValueError(f"{key} {unknown} are not features of dataset {schema.name!r}; it has {schema.names}")
    return [schema.feature(n) for n in names]


def _strategy(config: RunConfig) -> str | ModelParallelStrategy:
    """``train.strategy``; model_parallel steps the tables with the fused kernel of ``embedding_optimizer``."""
    opts = config.train
    if opts.strategy != "model_parallel":
        return opts.strategy
    tables = fused_optimizer(config.embedding_optimizer, opts.lr, opts.weight_decay)  # ValueError for kind adam
    return ModelParallelStrategy(opts.sharding, tables)


def fit(module: L.LightningModule, data: L.LightningDataModule, out: Path, config: RunConfig, monitor: str,
         run: dict) -> dict | None:
    """Fits ``module`` (resuming from ``out``), then validates and tests its best checkpoint; the
    metrics on the global rank 0, None on the other ranks of a multi-process run."""
    out = Path(out)
    opts = config.train
    gpu = opts.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    best = ModelCheckpoint(dirpath=out / "checkpoints", filename="best", monitor=monitor, mode="max",
                           save_last=True, enable_version_counter=False)
    trainer = L.Trainer(
        max_epochs=opts.max_epochs,
        accelerator=opts.accelerator,
        devices=opts.devices,
        num_nodes=opts.num_nodes,
        strategy=_strategy(config),
        precision="bf16-mixed" if gpu else "32-true",
        # the bar redraws when the loss is logged, not after every step
        callbacks=[best, EarlyStopping(monitor, mode="max", patience=opts.patience),
                   TrainLossBar(refresh_rate=LOG_EVERY_N_STEPS)],
        logger=[CSVLogger(out, name="logs"), TensorBoardLogger(out, name="tensorboard")],
        log_every_n_steps=LOG_EVERY_N_STEPS,
        profiler=NullProfiler(),
        deterministic=not gpu,
    )
    if trainer.is_global_zero:
        out.mkdir(parents=True, exist_ok=True)
        # absolute, so an export or refresh started from any directory finds the dataset's encoders
        (out / "run.json").write_text(json.dumps({**run, "data": str(Path(data.data_dir).resolve()),
                                                  "config": config.model_dump()}, indent=2))
    last = out / "checkpoints" / "last.ckpt"
    trainer.fit(module, datamodule=data, ckpt_path=last if last.exists() else None)
    results = {**trainer.validate(module, datamodule=data, ckpt_path=best.best_model_path, verbose=False)[0],
               **trainer.test(module, datamodule=data, ckpt_path=best.best_model_path, verbose=False)[0],
               "best_epoch": torch.load(checkpoint_file(best.best_model_path), weights_only=True)["epoch"],
               "epochs": trainer.current_epoch}
    if not trainer.is_global_zero:
        return None  # every rank computed the same metrics; rank 0 reports them
    (out / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    return results
