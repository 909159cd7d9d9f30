"""Shared fixtures: a tiny prepared synthetic dataset, and small models trained on it."""

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from data.prepare import prepare
from data.synthetic import SyntheticConfig, generate
from training.train import RunConfig, train_ranker, train_retrieval

# Small models, one or two epochs: enough to be better than chance, quick to train.
RUN_CONFIGS = {
    "two_tower": {"train": {"lr": 0.01, "max_epochs": 2, "batch_size": 512, "accelerator": "cpu"},
                  "model": {"hidden_sizes": [32], "output_dim": 16}},
    "deepfm": {"train": {"lr": 0.03, "max_epochs": 1, "batch_size": 512, "accelerator": "cpu"},
               "model": {"embedding_dim": 8, "hidden_sizes": [16]}},
    "dlrm": {"train": {"lr": 0.03, "max_epochs": 1, "batch_size": 512, "accelerator": "cpu"},
             "model": {"embedding_dim": 8, "dense_sizes": [16], "over_sizes": [16]}},
    "linear": {"train": {"lr": 0.03, "max_epochs": 1, "batch_size": 512, "accelerator": "cpu"}},
}


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """A prepared dataset directory: 300 users, 200 items, 20,010 exposures split by time into
    16,008 train rows (even, so two ranks split every batch evenly) and 2,001 valid and 2,001
    test rows (odd, so a distributed sampler repeats one row to even out two ranks)."""
    out = tmp_path_factory.mktemp("tiny") / "synthetic"
    return prepare(generate(SyntheticConfig(users=300, items=200, interactions=20_010, seed=1)), out,
                   split="temporal", seed=1)


@pytest.fixture(scope="session")
def trained_runs(tiny_dataset, tmp_path_factory) -> dict[str, Path]:
    """Run directories of the two-tower model and the three rankers, trained on ``tiny_dataset``."""
    root = tmp_path_factory.mktemp("runs")
    with training_state_restored():
        for name, raw in RUN_CONFIGS.items():
            config = RunConfig.model_validate(raw)
            if name == "two_tower":
                train_retrieval(tiny_dataset, root / name, config)
            else:
                train_ranker(name, tiny_dataset, root / name, config)
    return {name: root / name for name in RUN_CONFIGS}


@contextmanager
def training_state_restored() -> Iterator[None]:
    """Training in the block sets seeds, deterministic algorithms and PL_* variables process-wide;
    they are as before once it ends."""
    environ, deterministic, rng = dict(os.environ), torch.are_deterministic_algorithms_enabled(), torch.get_rng_state()
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(environ)
        torch.use_deterministic_algorithms(deterministic)
        torch.set_rng_state(rng)
