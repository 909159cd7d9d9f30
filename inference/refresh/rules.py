"""Static eligibility rules, applied to the items table before any pool is built.

A rules file (YAML) lists rules in order. Each names one column of the items table and
one condition an item must meet to stay eligible:

    rules:
      - name: blocked_categories       # compliance: these never appear
        column: category
        exclude: [gambling, weapons]
      - name: shop_categories          # an allow-list
        column: category
        allow: [books, music, games]
      - name: in_stock
        column: available
        equals: true
      - name: age_limit
        column: age_rating
        at_most: 16                    # also at_least

A missing value (NaN, None) fails every condition except ``exclude``: an item whose value
is unknown is not shown. `apply_rules` reports each removed item once, with the first rule
in file order that removed it. Unknown keys, a rule with no condition or two, and values
of the wrong type for their column are errors.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from pydantic import BaseModel, ConfigDict, StrictBool, StrictFloat, StrictInt, StrictStr, model_validator

Value = StrictBool | StrictInt | StrictFloat | StrictStr
CONDITIONS = ("exclude", "allow", "equals", "at_least", "at_most")


class Rule(BaseModel):
    """One condition on one column; exactly one of the condition fields is set."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    column: str
    exclude: list[Value] | None = None
    allow: list[Value] | None = None
    equals: Value | None = None
    at_least: StrictInt | StrictFloat | None = None
    at_most: StrictInt | StrictFloat | None = None

    @model_validator(mode="after")
    def _one_condition(self) -> Rule:
        given = [c for c in CONDITIONS if getattr(self, c) is not None]
        if len(given) != 1:
            raise ValueError(f"rule {self.name!r} must set exactly one of {list(CONDITIONS)}, got {given}")
        return self

    @property
    def condition(self) -> str:
        """What an eligible item meets, e.g. ``age_rating <= 16``."""
        if self.exclude is not None:
            return f"{self.column} not in {self.exclude}"
        if self.allow is not None:
            return f"{self.column} in {self.allow}"
        if self.equals is not None:
            return f"{self.column} == {self.equals!r}"
        if self.at_least is not None:
            return f"{self.column} >= {self.at_least}"
        return f"{self.column} <= {self.at_most}"


class Rules(BaseModel):
    """The rules of one file, in order."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rules: list[Rule]

    @model_validator(mode="after")
    def _unique_names(self) -> Rules:
        names = [r.name for r in self.rules]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"rule names must be unique, got {repeated} more than once")
        return self


def load_rules(source: Path | str | dict) -> Rules:
    """Rules from a YAML file (a path) or from the mapping such a file holds."""
    if isinstance(source, dict):
        return Rules.model_validate(source)
    path = Path(source)
    if not path.is_file():
        raise ValueError(f"{path}: no such rules file")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: expected a mapping with a 'rules' list, got {type(loaded).__name__}")
    try:
        return Rules.model_validate(loaded)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


def apply_rules(items: pd.DataFrame, rules: Rules) -> tuple[np.ndarray, pd.DataFrame]:
    """Eligible item ids (int64, in table order) and the removed items with a reason each.

    ``items`` has a unique ``item_id`` column and every column the rules name. The removed
    frame has columns ``item_id`` and ``reason``, e.g. ``age_limit: requires age_rating <= 16``.
    """
    if "item_id" not in items.columns:
        raise ValueError(f"items is missing column 'item_id'; it has {list(items.columns)}")
    ids = items["item_id"].to_numpy()
    if items["item_id"].duplicated().any():
        raise ValueError(f"items repeats item ids, e.g. {items['item_id'][items['item_id'].duplicated()][:5].tolist()}")
    removed_by = np.full(len(items), -1)  # (N,) index of the first rule the item fails
    for r, rule in enumerate(rules.rules):
        removed_by[(removed_by < 0) & ~_passes(rule, items)] = r
    removed = removed_by >= 0
    reasons = np.array([f"{rule.name}: requires {rule.condition}" for rule in rules.rules], dtype=object)
    removed_frame = pd.DataFrame({"item_id": ids[removed].astype(np.int64), "reason": reasons[removed_by[removed]]})
    return ids[~removed].astype(np.int64), removed_frame


def _passes(rule: Rule, items: pd.DataFrame) -> np.ndarray:
    """(N,) True where the item meets the rule; missing values fail all but exclude."""
    if rule.column not in items.columns:
        raise ValueError(f"rule {rule.name!r}: items have no column {rule.column!r}; they have {list(items.columns)}")
    column = items[rule.column]
    numeric = pd.api.types.is_numeric_dtype(column) or pd.api.types.is_bool_dtype(column)
    values = [*(rule.exclude or []), *(rule.allow or []),
              *(v for v in (rule.equals, rule.at_least, rule.at_most) if v is not None)]
    wrong = [v for v in values if isinstance(v, str) == numeric]
    if wrong:
        kind = "numbers" if numeric else f"text (dtype {column.dtype})"
        raise ValueError(f"rule {rule.name!r}: column {rule.column!r} holds {kind}, but the rule compares it "
                         f"with {wrong}")
    if rule.exclude is not None:
        passes = ~column.isin(rule.exclude)
    elif rule.allow is not None:
        passes = column.isin(rule.allow)
    elif rule.equals is not None:
        passes = column == rule.equals
    elif rule.at_least is not None:
        passes = column >= rule.at_least
    else:
        passes = column <= rule.at_most
    return passes.fillna(False).to_numpy(dtype=bool)
