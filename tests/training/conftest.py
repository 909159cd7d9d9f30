"""Shared fixtures: a tiny prepared synthetic dataset."""

from pathlib import Path

import pytest

from data.prepare import prepare
from data.synthetic import SyntheticConfig, generate


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """A prepared dataset directory: 300 users, 200 items, 20,010 exposures split by time into
    16,008 train rows (even, so two ranks split every batch evenly) and 2,001 valid and 2,001
    test rows (odd, so a distributed sampler repeats one row to even out two ranks)."""
    out = tmp_path_factory.mktemp("tiny") / "synthetic"
    return prepare(generate(SyntheticConfig(users=300, items=200, interactions=20_010, seed=1)), out,
                   split="temporal", seed=1)
