import numpy as np
import pandas as pd
import pytest

from data.dataset import read_dataset
from data.prepare import prepare
from data.stats import dataset_stats, format_stats, gini
from data.synthetic import SyntheticConfig, generate


def _gini_mean_difference(x):
    """Independent reference: mean absolute difference over twice the mean."""
    x = np.asarray(x, dtype=float)
    return np.abs(x[:, None] - x[None, :]).sum() / (2 * len(x) ** 2 * x.mean())


def test_gini_hand_cases():
    assert gini(np.array([5, 5, 5, 5])) == 0.0
    assert gini(np.array([0, 0, 0, 4])) == pytest.approx(0.75)  # (n-1)/n when one item has all
    assert gini(np.array([])) == 0.0


def test_gini_matches_mean_difference_reference():
    x = np.random.default_rng(0).zipf(1.5, 500)
    assert gini(x) == pytest.approx(_gini_mean_difference(x), rel=1e-9)


def test_format_stats_separates_thousands():
    text = format_stats({"interactions": 100000, "sparsity": 0.93696, "dataset": "ml-100k"})
    assert text.splitlines() == ["interactions  100,000", "sparsity      0.9370", "dataset       ml-100k"]


def test_dataset_stats_match_pandas_over_the_whole_table(tmp_path):
    out = prepare(generate(SyntheticConfig(users=60, items=50, interactions=3000, seed=4)), tmp_path / "ds")
    stats, ds = dataset_stats(out), read_dataset(out)
    log = ds.interactions
    counts = log["item_id"].value_counts().reindex(ds.items["item_id"], fill_value=0).to_numpy()
    assert stats["interactions"] == len(log) == 3000
    assert stats["active_users"] == log["user_id"].nunique()
    assert stats["active_items"] == (counts > 0).sum()
    assert stats["popularity_gini"] == pytest.approx(gini(counts))
    assert stats["label_mean"] == pytest.approx(log["label"].mean())
    assert stats["time_start"] == pd.Timestamp(log["timestamp"].min(), unit="s", tz="UTC").isoformat()
    assert stats["train_rows"] + stats["valid_rows"] + stats["test_rows"] == 3000
