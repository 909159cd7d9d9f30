"""The Open Bandit Dataset sample (ZOZOTOWN, obp 0.4.1 wheel) as a canonical dataset.

Each of the 10,000 rows of a policy/campaign log is one impression: an item shown in
position 1-3 to a user, with ``label`` = click and the logging policy's ``propensity``
(float64, as in the file). The log has no user id, so ``user_id`` is a pseudo-user: the
first 16 hex digits of the MD5 of the four user features joined by "|", stable across
policies and campaigns. The four features also stay on each interaction as context, with
``affinity``: the row's user-item affinity columns as one float32 array indexed by item_id.

Item ids are positions in the campaign's own item list (0..79 for "all", 0..33 "men",
0..45 "women"), and the item feature hashes differ between the two policies' files, so
items are comparable only within one policy and campaign. Every item was on offer for the
whole campaign, so ``created_at`` is the log's first timestamp for all of them.
"""

from __future__ import annotations

import hashlib

import pandas as pd

from data.dataset import Dataset
from data.fetch import fetch_wheel_folder
from data.schema import FeatureSpec, Schema
from data.tables import Column, check_table, read_table

POLICIES = ("random", "bts")
CAMPAIGNS = ("all", "men", "women")
USER_FEATURES = [f"user_feature_{i}" for i in range(4)]
ITEM_FEATURES = [f"item_feature_{i}" for i in range(4)]

LOG = (
    Column("timestamp", "time"),
    Column("item_id", "int"),
    Column("position", "int"),
    Column("click", "float"),
    Column("propensity_score", "float"),
    *(Column(name, "str") for name in USER_FEATURES),
)
ITEM_CONTEXT = (
    Column("item_id", "int"),
    Column("item_feature_0", "float"),
    *(Column(name, "str") for name in ITEM_FEATURES[1:]),
)

FEATURES = (
    FeatureSpec("user_id", "users", "categorical"),
    *(FeatureSpec(name, "users", "categorical") for name in USER_FEATURES),
    FeatureSpec("item_id", "items", "categorical"),
    FeatureSpec("item_feature_0", "items", "numerical", buckets=8),
    *(FeatureSpec(name, "items", "categorical") for name in ITEM_FEATURES[1:]),
    FeatureSpec("position", "interactions", "categorical"),
)


def load_obd(policy: str = "random", campaign: str = "all") -> Dataset:
    """One policy/campaign log of the Open Bandit sample, with its item context."""
    if policy not in POLICIES:
        raise ValueError(f"OBD policy {policy!r} is not one of {POLICIES}")
    if campaign not in CAMPAIGNS:
        raise ValueError(f"OBD campaign {campaign!r} is not one of {CAMPAIGNS}")
    folder = fetch_wheel_folder("obp", "0.4.1", "obp/dataset/obd") / policy / campaign
    log_file, context_file = folder / f"{campaign}.csv", folder / "item_context.csv"
    raw = read_table(log_file).drop(columns="Unnamed: 0")
    log = check_table(raw, str(log_file), LOG)
    log["propensity_score"] = raw["propensity_score"]  # float64: the check narrows to float32
    context = read_table(context_file).drop(columns="Unnamed: 0")
    context = check_table(context, str(context_file), ITEM_CONTEXT, key="item_id")

    interactions = build_interactions(log)
    users = interactions.drop_duplicates("user_id")[["user_id", *USER_FEATURES]].reset_index(drop=True)
    items = context[["item_id", *ITEM_FEATURES]].copy()
    items["category"] = items["item_feature_1"]
    items["available"] = True
    items["moderated"] = False
    items["created_at"] = interactions["timestamp"].min()
    source = {"package": "obp==0.4.1", "policy": policy, "campaign": campaign}
    return Dataset(interactions, users, items, Schema(f"obd-{policy}-{campaign}", FEATURES, source=source))


def build_interactions(log: pd.DataFrame) -> pd.DataFrame:
    """Canonical columns from a checked log, in file (time) order."""
    affinity = log.filter(like="user-item_affinity_").to_numpy("float32")  # (N, items)
    out = pd.DataFrame({
        "user_id": name_pseudo_users(log[USER_FEATURES]),
        "item_id": log["item_id"],
        "timestamp": log["timestamp"],
        "label": log["click"],
        "position": log["position"],
        "propensity": log["propensity_score"],
    })
    out[USER_FEATURES] = log[USER_FEATURES]
    out["affinity"] = pd.Series(list(affinity), dtype=object)
    return out


def name_pseudo_users(features: pd.DataFrame) -> pd.Series:
    """A stable id per combination of user features: MD5 of the values joined by '|', 16 hex digits."""
    keys = features.iloc[:, 0].str.cat(features.iloc[:, 1:], sep="|")
    ids = {key: hashlib.md5(key.encode()).hexdigest()[:16] for key in keys.unique()}
    return keys.map(ids)
