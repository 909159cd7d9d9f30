import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from data.synthetic import START, SyntheticConfig, generate
from inference.refresh.pools import (
    Events,
    build_cooccurrence_similar,
    build_new_items,
    build_popular,
    build_similar_items,
    build_trending,
    build_user_lists,
    read_editorial,
)
from inference.refresh.rules import Rules, apply_rules, load_rules

ITEMS = pd.DataFrame({
    "item_id": [1, 2, 3, 4, 5, 6],
    "category": ["books", "weapons", "music", "books", None, "games"],
    "available": [True, True, False, True, True, True],
    "age_rating": [0, 18, 12, np.nan, 16, 7],
})

RULES = {"rules": [
    {"name": "blocked", "column": "category", "exclude": ["weapons", "gambling"]},
    {"name": "in_stock", "column": "available", "equals": True},
    {"name": "age_limit", "column": "age_rating", "at_most": 16},
    {"name": "shop", "column": "category", "allow": ["books", "music", "games"]},
]}


def test_rules_remove_items_with_the_first_failing_rule_as_reason():
    eligible, removed = apply_rules(ITEMS, load_rules(RULES))
    assert eligible.tolist() == [1, 6] and eligible.dtype == np.int64
    # 2 fails blocked and age_limit: the first rule is reported; 4 has no age rating, 5 no category
    assert removed.to_dict("records") == [
        {"item_id": 2, "reason": "blocked: requires category not in ['weapons', 'gambling']"},
        {"item_id": 3, "reason": "in_stock: requires available == True"},
        {"item_id": 4, "reason": "age_limit: requires age_rating <= 16"},
        {"item_id": 5, "reason": "shop: requires category in ['books', 'music', 'games']"},
    ]


@pytest.mark.parametrize(("rule", "kept"), [
    ({"exclude": ["books"], "column": "category"}, [2, 3, 5, 6]),  # a missing value is not excluded
    ({"allow": ["books", "games"], "column": "category"}, [1, 4, 6]),
    ({"equals": 1, "column": "available"}, [1, 2, 4, 5, 6]),
    ({"at_least": 12, "column": "age_rating"}, [2, 3, 5]),
    ({"at_most": 7.5, "column": "age_rating"}, [1, 6]),
])
def test_each_condition_keeps_what_it_should(rule, kept):
    eligible, removed = apply_rules(ITEMS, Rules.model_validate({"rules": [{"name": "r", **rule}]}))
    assert eligible.tolist() == kept
    assert sorted(removed["item_id"]) == sorted(set(ITEMS["item_id"]) - set(kept))
    assert removed["reason"].str.startswith("r: requires ").all()


def test_missing_values_in_nullable_columns_fail_all_but_exclude():
    items = ITEMS.astype({"category": "string", "available": "boolean", "age_rating": "Int64"}, copy=True)
    items.loc[0, "available"] = pd.NA
    eligible, removed = apply_rules(items, load_rules(RULES))
    assert eligible.tolist() == [6]
    assert removed.set_index("item_id")["reason"].str.split(":").str[0].to_dict() == {
        1: "in_stock", 2: "blocked", 3: "in_stock", 4: "age_limit", 5: "shop"}


def test_no_rules_keep_every_item():
    eligible, removed = apply_rules(ITEMS, load_rules({"rules": []}))
    assert eligible.tolist() == ITEMS["item_id"].tolist() and removed.empty


def test_load_rules_reads_yaml(tmp_path):
    path = tmp_path / "rules.yaml"
    path.write_text("rules:\n  - name: age_limit\n    column: age_rating\n    at_most: 16\n"
                    "  - name: in_stock\n    column: available\n    equals: true\n")
    rules = load_rules(path)
    assert [r.name for r in rules.rules] == ["age_limit", "in_stock"]
    assert rules.rules[1].equals is True
    assert apply_rules(ITEMS, rules)[0].tolist() == [1, 5, 6]


@pytest.mark.parametrize(("config", "message"), [
    ({"rules": [{"name": "a", "column": "category", "exclude": ["x"], "colour": "red"}]}, "colour"),
    ({"rules": [], "version": 2}, "version"),
    ({"rules": [{"name": "a", "column": "category"}]}, "rule 'a' must set exactly one of"),
    ({"rules": [{"name": "a", "column": "age_rating", "at_least": 1, "at_most": 3}]}, r"got \['at_least', 'at_most'\]"),
    ({"rules": [{"name": "a", "column": "c", "equals": 1}, {"name": "a", "column": "c", "equals": 2}]},
     r"unique, got \['a'\]"),
])
def test_bad_configs_are_rejected(config, message):
    with pytest.raises(ValidationError, match=message):
        load_rules(config)


def test_bad_files_name_the_file(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"empty\.yaml: expected a mapping"):
        load_rules(empty)
    extra = tmp_path / "extra.yaml"
    extra.write_text("rules:\n  - {name: a, column: c, equals: 1, when: never}\n")
    with pytest.raises(ValueError, match=r"(?s)extra\.yaml: .*rules\.0\.when"):
        load_rules(extra)
    with pytest.raises(ValueError, match=r"missing\.yaml: no such rules file"):
        load_rules(tmp_path / "missing.yaml")


def test_unknown_column_and_wrong_value_type_name_the_rule_and_column():
    unknown = load_rules({"rules": [{"name": "region", "column": "country", "allow": ["US"]}]})
    with pytest.raises(ValueError, match="rule 'region': items have no column 'country'"):
        apply_rules(ITEMS, unknown)
    # "16" would never equal a number, so a compliance rule would silently pass everything
    text = load_rules({"rules": [{"name": "age", "column": "age_rating", "exclude": ["18"]}]})
    with pytest.raises(ValueError, match=r"rule 'age': column 'age_rating' holds numbers, .* with \['18'\]"):
        apply_rules(ITEMS, text)
    number = load_rules({"rules": [{"name": "cat", "column": "category", "at_least": 3}]})
    with pytest.raises(ValueError, match=r"rule 'cat': column 'category' holds text"):
        apply_rules(ITEMS, number)


def test_ineligible_items_appear_in_no_pool(tmp_path):
    ds = generate(SyntheticConfig(users=100, items=200, interactions=4000, seed=11))
    items, events = ds.items, ds.interactions
    rules = load_rules({"rules": [
        {"name": "compliance", "column": "category", "exclude": [f"category_{c}" for c in range(6)]},
        {"name": "in_stock", "column": "available", "equals": True},
    ]})
    eligible, removed = apply_rules(items, rules)
    blocked = set(removed["item_id"])
    assert blocked and len(eligible) + len(blocked) == len(items)
    expected_reason = np.where(items.set_index("item_id").loc[removed["item_id"], "category"]
                               .isin([f"category_{c}" for c in range(6)]), "compliance", "in_stock")
    assert (removed["reason"].str.split(":").str[0] == expected_reason).all()

    now, k = START + 90 * 86_400, 10
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((len(items), 8)).astype(np.float32)
    ids = items["item_id"].to_numpy()

    def search(queries, kk):
        order = np.argsort(-(queries @ vectors.T), axis=1)[:, :kk]
        padded = np.full((len(queries), kk), -1)
        padded[:, :order.shape[1]] = ids[order]
        return padded, np.zeros(padded.shape, dtype=np.float32)

    editorial = tmp_path / "editorial.csv"
    editorial.write_text("item_id\n" + "\n".join(map(str, ids[:40])) + "\n")
    events.to_parquet(tmp_path / "interactions.parquet")
    events = Events(tmp_path / "interactions.parquet")
    built = {
        "popular": build_popular(events, now, 7 * 86_400, k, eligible=eligible),
        "trending": build_trending(events, now, 7 * 86_400, 30 * 86_400, k, eligible=eligible),
        "new": build_new_items(ids, items["created_at"].to_numpy(), now, 60 * 86_400, k, eligible=eligible),
        "editorial": read_editorial(editorial, ids, eligible=eligible),
        "similar": build_similar_items(ids, vectors, search, k, eligible=eligible),
        "cooccurrence": build_cooccurrence_similar(events, k, eligible=eligible),
        "user": build_user_lists(np.arange(100), rng.standard_normal((100, 8)).astype(np.float32), search,
                                 events, k, eligible=eligible),
    }
    for kind, pool in built.items():
        assert len(pool), kind
        assert not blocked & set(pool["item_id"]), kind
    for kind in ("popular", "new", "similar", "user"):
        assert built[kind].groupby("list", observed=True).size().eq(k).all(), kind  # lists stay full after filtering
    assert len(built["editorial"]) == len(set(ids[:40]) - blocked)
    assert build_popular(events, now, 7 * 86_400, k)["item_id"].isin(list(blocked)).any()  # the filter mattered
    events.close()
