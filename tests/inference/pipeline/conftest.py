"""A refreshed version of the tiny dataset's models, built once per test module."""

import pytest

from inference.artifacts import ArtifactRoot
from inference.refresh.job import RefreshConfig, refresh
from inference.version import ServingVersion, open_version

CONFIG = RefreshConfig(pools={"user_n": 20, "similar_k": 10, "similar_items": 50})


@pytest.fixture(scope="module")
def version(tiny_dataset, trained_runs, tmp_path_factory) -> ServingVersion:
    root = tmp_path_factory.mktemp("artifacts")
    refresh(tiny_dataset, trained_runs["two_tower"].parent, root, CONFIG)
    return open_version(ArtifactRoot(root).path("v0001"))
