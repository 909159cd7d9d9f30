"""What travels between pipeline stages: one `Query` per request and columnar `Candidates`.

Candidates are arrays, never one Python object per item: stage code works on whole columns.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from data.columns import FeatureColumns

# a candidate's own features, which `blend: scoring` passes a ranker (data/candidates.py's table has
# them): the name of the source that proposed it and its two-tower score (`candidate_columns`)
CANDIDATE_FEATURES = ("source", "retrieval_score")


@dataclass(frozen=True)
class Query:
    """A request: who asks (``user_id`` None for an anonymous visitor), request-time ``context``
    features (e.g. hour, weekday, device), the session's recent items (oldest first) and how many
    items to return."""

    user_id: int | None
    context: dict[str, object] = field(default_factory=dict)
    recent_items: tuple[int, ...] = ()
    k: int = 10

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"Query.k = {self.k}; expected at least 1")


@dataclass
class Candidates:
    """N candidates as aligned columns.

    ``item_ids`` (N,) int64; ``sources`` (N,) the name of the source that proposed each item;
    ``scores`` (N,) float32, the latest stage's score; ``columns`` N rows of feature columns
    (a frame passed here is taken column by column): the store's item columns once a filter read
    them, and once hydrated every column a scorer reads: the user's, the item's and the request
    context's.
    """

    item_ids: np.ndarray
    sources: np.ndarray
    scores: np.ndarray
    columns: FeatureColumns | None = None

    def __post_init__(self) -> None:
        if isinstance(self.columns, pd.DataFrame):
            self.columns = FeatureColumns.from_frame(self.columns)
        n = len(self.item_ids)
        lengths = {"sources": len(self.sources), "scores": len(self.scores)}
        if self.columns is not None:
            lengths["columns"] = len(self.columns)
        wrong = {k: v for k, v in lengths.items() if v != n}
        if wrong:
            raise ValueError(f"Candidates columns {wrong} differ in length from item_ids ({n})")

    def __len__(self) -> int:
        return len(self.item_ids)

    @property
    def features(self) -> pd.DataFrame | None:
        """``columns`` as a frame (index 0..N-1), built on each call; stages read ``columns``."""
        return None if self.columns is None else self.columns.to_frame()

    def take(self, positions: np.ndarray) -> Candidates:
        """The candidates at ``positions`` (an int array or a boolean mask), in that order."""
        columns = None if self.columns is None else self.columns.take(positions)
        return Candidates(self.item_ids[positions], self.sources[positions], self.scores[positions], columns)

    def with_columns(self, columns: FeatureColumns) -> Candidates:
        """The same candidates with ``columns`` (N rows) added to theirs, replacing those of the same name."""
        merged = columns if self.columns is None else FeatureColumns(self.columns.arrays | columns.arrays, len(self))
        return Candidates(self.item_ids, self.sources, self.scores, merged)
