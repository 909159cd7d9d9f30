"""What the refresh tests share: the trained runs' directory, a copy of the tiny dataset to change,
and a change of its catalogue."""

import shutil

import pandas as pd
import pytest


@pytest.fixture(scope="module")
def models_dir(trained_runs):
    return trained_runs["two_tower"].parent


@pytest.fixture
def data_copy(tiny_dataset, tmp_path):
    return shutil.copytree(tiny_dataset, tmp_path / "data")


@pytest.fixture
def change_catalogue():
    """A function of (data_dir, now): changes 3 items' prices, adds 2 items (copies of others, new
    ids) and removes 2 items; returns the changed, added and removed ids."""

    def change(data_dir, now):
        items = pd.read_parquet(data_dir / "items.parquet")
        live = items.index[items["removed_at"] < 0]
        items.loc[live[:3], "price"] += 10
        items.loc[live[3:5], "removed_at"] = now - 1
        added = items.loc[live[5:7]].assign(item_id=[10_000, 10_001])
        pd.concat([items, added], ignore_index=True).to_parquet(data_dir / "items.parquet", index=False)
        return set(items.loc[live[:3], "item_id"]), {10_000, 10_001}, set(items.loc[live[3:5], "item_id"])

    return change
