import itertools

import numpy as np
import pandas as pd
import pytest

from data import synthetic
from data.dataset import write_dataset
from data.synthetic import (
    DAY,
    NOT_REMOVED,
    START,
    GroundTruth,
    SyntheticConfig,
    generate,
    load_ground_truth,
)
from evaluation.metrics import auc

SMALL = SyntheticConfig(users=200, items=300, interactions=5000, seed=3)


def _truth(ds, directory) -> GroundTruth:
    directory.mkdir(exist_ok=True)
    ds.extras["ground_truth"](directory)
    return load_ground_truth(directory)


@pytest.fixture(scope="module")
def large():
    """200k rows: enough for a calibration check within a few standard errors."""
    return generate(SyntheticConfig(users=2000, items=1000, interactions=200_000, seed=7))


def test_same_seed_same_tables_other_seed_other_tables(tmp_path):
    a, b, c = generate(SMALL), generate(SMALL), generate(SyntheticConfig(**{**SMALL.__dict__, "seed": 4}))
    for name in ("interactions", "users", "items"):
        pd.testing.assert_frame_equal(getattr(a, name), getattr(b, name))
        assert not getattr(a, name).equals(getattr(c, name))
    ta, tb = _truth(a, tmp_path / "a"), _truth(b, tmp_path / "b")
    np.testing.assert_array_equal(ta.user_end, tb.user_end)
    np.testing.assert_array_equal(ta.item_factors, tb.item_factors)


def test_sizes_ids_and_schema():
    ds = generate(SMALL).check()
    assert len(ds.interactions) == SMALL.interactions
    np.testing.assert_array_equal(ds.users["user_id"], np.arange(SMALL.users))
    np.testing.assert_array_equal(ds.items["item_id"], np.arange(SMALL.items))
    assert ds.items["category"].nunique() <= SMALL.categories
    assert ds.schema.names == ["user_id", "segment", "age", "country", "item_id", "category", "price"]
    assert ds.schema.feature("price").buckets == 8
    x = ds.interactions
    assert x.dtypes.to_dict() == {
        "user_id": "int64", "item_id": "int64", "timestamp": "int64",
        "label": "float32", "click_prob": "float32", "exposure_prob": "float32",
    }


def test_timestamps_sorted_and_inside_item_availability():
    cfg = SyntheticConfig(users=100, items=200, interactions=20_000, days=10, seed=1)
    ds = generate(cfg)
    x = ds.interactions.merge(ds.items, on="item_id")
    removed = x["removed_at"] != NOT_REMOVED
    assert removed.mean() > 0.05  # churned items were exposed, so their bound is tested
    assert (x["timestamp"] >= np.maximum(x["created_at"], START)).all()
    assert (x["timestamp"] < START + cfg.days * DAY).all()
    assert (x["timestamp"][removed] < x["removed_at"][removed]).all()
    assert ds.interactions["timestamp"].is_monotonic_increasing
    np.testing.assert_array_equal(ds.items["available"], ds.items["removed_at"] == NOT_REMOVED)


def test_click_prob_column_is_the_ground_truth(tmp_path, monkeypatch):
    ds = generate(SMALL)
    truth, x = _truth(ds, tmp_path), ds.interactions
    args = x["user_id"].to_numpy(), x["item_id"].to_numpy(), x["timestamp"].to_numpy()
    np.testing.assert_array_equal(truth.click_probability(*args), x["click_prob"])
    np.testing.assert_array_equal(truth.popularity[args[1]].astype(np.float32), x["exposure_prob"])
    monkeypatch.setattr(synthetic, "CHUNK", 7)  # many blocks, with a ragged last one
    np.testing.assert_array_equal(truth.click_probability(*args), x["click_prob"])


def test_click_probability_broadcasts_and_rejects_bad_indices(tmp_path):
    truth = _truth(generate(SMALL), tmp_path)
    items = np.arange(SMALL.items)
    every_item = truth.click_probability(5, items, START)  # the ideal ranking for user 5
    assert every_item.shape == (SMALL.items,)
    np.testing.assert_array_equal(every_item, truth.click_probability(np.full(SMALL.items, 5), items,
                                                                      np.full(SMALL.items, START)))
    with pytest.raises(ValueError, match=r"user_idx must be in \[0, 200\)"):
        truth.click_probability(np.array([SMALL.users]), np.array([0]), np.array([START]))
    with pytest.raises(ValueError, match="item_idx must be integers"):
        truth.click_probability(np.array([0]), np.array([0.5]), np.array([START]))


def test_labels_are_calibrated_per_probability_decile(large):
    x = large.interactions
    decile = pd.qcut(x["click_prob"], 10, labels=False)
    bins = x.groupby(decile).agg(p=("click_prob", "mean"), clicked=("label", "mean"), n=("label", "size"))
    standard_error = np.sqrt(bins["p"] * (1 - bins["p"]) / bins["n"])
    assert (np.abs(bins["clicked"] - bins["p"]) < 4 * standard_error).all(), bins


def test_click_rate_and_bayes_auc_are_in_the_designed_range(large):
    x = large.interactions
    assert 0.1 < x["label"].mean() < 0.3
    assert 0.7 < auc(x["label"], x["click_prob"]) < 0.85


def test_popularity_is_skewed_by_zipf():
    def top_share(zipf: float) -> float:
        counts = generate(SyntheticConfig(items=1000, interactions=50_000, zipf=zipf)).interactions["item_id"]
        counts = counts.value_counts().to_numpy()
        return counts[:10].sum() / counts.sum()  # top 1% of the items

    assert top_share(1.1) > 0.3
    assert top_share(0.0) < 0.05


def test_taste_drifts_between_start_and_end_only_when_drift_is_positive(tmp_path):
    rng = np.random.default_rng(0)
    users, items = np.arange(SMALL.users), rng.integers(SMALL.items, size=SMALL.users)
    end = START + SMALL.days * DAY
    fixed = _truth(generate(SyntheticConfig(**{**SMALL.__dict__, "drift": 0.0})), tmp_path / "fixed")
    np.testing.assert_array_equal(fixed.click_probability(users, items, START),
                                  fixed.click_probability(users, items, end))

    moving = _truth(generate(SMALL), tmp_path / "moving")
    at_start, at_end = (moving.click_probability(users, items, t) for t in (START, end))
    assert np.abs(at_start - at_end).mean() > 0.02
    # the taste is a straight line over the period and stays put outside it
    midway = moving.click_probability(users, items, (START + end) // 2)
    logit = lambda p: np.log(p / (1 - p))  # noqa: E731
    np.testing.assert_allclose(logit(midway), (logit(at_start) + logit(at_end)) / 2, atol=1e-3)
    np.testing.assert_array_equal(moving.click_probability(users, items, START - DAY), at_start)
    np.testing.assert_array_equal(moving.click_probability(users, items, end + DAY), at_end)


def test_ground_truth_round_trips_through_the_dataset_directory(tmp_path):
    ds = generate(SMALL)
    out = write_dataset(ds, tmp_path / "synthetic")
    truth = load_ground_truth(out)
    again = GroundTruth.load(tmp_path / "synthetic" / "ground_truth.npz")
    for name in ("user_start", "user_end", "item_factors", "item_bias", "popularity"):
        np.testing.assert_array_equal(getattr(truth, name), getattr(again, name))
    assert (truth.start, truth.seconds) == (START, SMALL.days * DAY)
    assert isinstance(truth.scale, float) and isinstance(truth.start, int)
    x = ds.interactions
    np.testing.assert_array_equal(
        truth.click_probability(x["user_id"].to_numpy(), x["item_id"].to_numpy(), x["timestamp"].to_numpy()),
        x["click_prob"],
    )
    with pytest.raises(FileNotFoundError, match="ground_truth.npz"):
        load_ground_truth(tmp_path)




def test_log_is_drawn_slice_by_slice_in_time_order(monkeypatch):
    monkeypatch.setattr(synthetic, "LOG_CHUNK", 1000)
    ds = generate(SMALL)
    slices = list(ds.interaction_chunks())
    assert len(slices) == 5 and sum(map(len, slices)) == SMALL.interactions
    assert all(a["timestamp"].max() <= b["timestamp"].min() for a, b in itertools.pairwise(slices))
    assert ds.interactions["timestamp"].is_monotonic_increasing
    for again, first in zip(generate(SMALL).interaction_chunks(), slices, strict=True):  # each read: the same slices
        pd.testing.assert_frame_equal(again, first)
