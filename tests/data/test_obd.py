import csv
from datetime import datetime

import numpy as np
import pytest

from data.fetch import fetch_wheel_folder
from data.obd import load_obd


def read_raw_log(policy="random", campaign="all"):
    folder = fetch_wheel_folder("obp", "0.4.1", "obp/dataset/obd") / policy / campaign
    with (folder / f"{campaign}.csv").open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def obd():
    return load_obd().check()


def test_random_all_has_every_impression_and_item(obd):
    raw = read_raw_log()
    inter = obd.interactions
    assert len(inter) == len(raw) == 10_000
    assert len(obd.items) == 80
    assert set(inter["position"]) == {1, 2, 3}
    assert inter["label"].mean() == pytest.approx(np.mean([float(r["click"]) for r in raw]))
    assert obd.schema.source == {"package": "obp==0.4.1", "policy": "random", "campaign": "all"}
    assert obd.schema.feature("item_feature_0").buckets == 8


def test_rows_match_the_raw_file(obd):
    raw = read_raw_log()
    inter = obd.interactions
    for k in (0, 4321, 9999):
        row, line = inter.iloc[k], raw[k]
        assert row["propensity"] == float(line["propensity_score"])
        assert row["item_id"] == int(line["item_id"]) and row["position"] == int(line["position"])
        assert row["timestamp"] == int(datetime.fromisoformat(line["timestamp"]).timestamp())
        assert row["user_feature_2"] == line["user_feature_2"]
        affinity = [float(line[f"user-item_affinity_{i}"]) for i in range(80)]
        assert row["affinity"].tolist() == affinity


def test_pseudo_users_are_the_distinct_feature_combinations(obd):
    features = [f"user_feature_{i}" for i in range(4)]
    combos = {tuple(r[f] for f in features) for r in read_raw_log()}
    assert len(obd.users) == len(combos)
    assert obd.users.groupby(features).ngroups == len(combos)
    # the same features give the same id in another policy's log
    bts = load_obd("bts", "all").users
    shared = obd.users.merge(bts, on=features, suffixes=("", "_bts"))
    assert len(shared) > 0 and (shared["user_id"] == shared["user_id_bts"]).all()


def test_items_come_from_item_context(obd):
    items = obd.items
    assert items["item_id"].tolist() == list(range(80))
    assert (items["category"] == items["item_feature_1"]).all()
    assert (items["created_at"] == obd.interactions["timestamp"].min()).all()


def test_men_campaign_has_its_own_items():
    ds = load_obd("random", "men").check()
    assert len(ds.items) == 34 and len(ds.interactions) == 10_000


@pytest.mark.parametrize(("policy", "campaign", "valid"), [("greedy", "all", "bts"), ("random", "kids", "women")])
def test_unknown_policy_or_campaign_lists_the_valid_ones(policy, campaign, valid):
    with pytest.raises(ValueError, match=valid):
        load_obd(policy, campaign)
