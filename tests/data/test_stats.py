import numpy as np
import pytest

from data.stats import format_stats, gini


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
